//! `sessionAffinity: ClientIP` across workers: one table of client bindings shared by every worker,
//! so a client keeps its backend whichever worker the kernel hands its connection or flow to.
//!
//! Why a shared table and not steering: `SO_REUSEPORT` spreads one client's connections over the
//! workers by source port, and a reuseport BPF program that hashes only the source address would
//! pin each client to one worker's listener, but a listener group's order is the order its sockets
//! were bound, so that mapping breaks whenever one worker's listener is re-created (a bind retry,
//! a key that comes back) and cannot tie a TCP connection and the same client's UDP flows, or the
//! VIPs of one Service, to one worker. A shared table keeps the promise whatever the worker count
//! and whatever the sockets do.
//!
//! Cost: only entries with affinity touch it (the pick path of every other Service takes no lock);
//! the table is split into [`SHARDS`] mutex-guarded lb-core [`AffinityTable`]s by a hash of the
//! client IP, so two workers contend only when two new connections of clients in the same shard
//! arrive at the same instant, and a lock is held for one lookup and one pick. The lookup, the pick
//! and the recording of a fresh binding happen under one lock, so two workers racing for the first
//! connections of a new client still agree on its backend.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use lb_core::hash::{hash_ip, seed};
use lb_core::{AffinityTable, BackendIdx, PickContext, PickState, ServiceEntry};

/// Shards of the table; a power of two well above any worker count.
pub(crate) const SHARDS: usize = 64;

/// Client bindings all workers together remember; when a shard is full, its binding expiring
/// soonest is dropped (that client then gets a fresh pick). About 100 bytes each.
pub(crate) const AFFINITY_CAPACITY: usize = 262_144;

pub(crate) struct SharedAffinity {
    shards: Box<[Mutex<AffinityTable>]>,
}

impl SharedAffinity {
    pub fn new(capacity: usize) -> SharedAffinity {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        SharedAffinity { shards: (0..SHARDS).map(|_| Mutex::new(AffinityTable::new(per_shard))).collect() }
    }

    fn shard(&self, client: IpAddr) -> MutexGuard<'_, AffinityTable> {
        let index = hash_ip(client.to_canonical(), seed::LOOKUP) as usize % SHARDS;
        // A worker that panicked while holding the lock left a consistent table (every operation is
        // a few map updates); keep using it.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The backend for a new connection or flow of `entry` (which has affinity): the client's
    /// binding while it is valid, else the scheduler's pick, then (re)recorded.
    pub fn pick(
        &self,
        now: Instant,
        entry: &ServiceEntry,
        context: &PickContext<'_>,
        state: &mut PickState,
    ) -> Option<BackendIdx> {
        self.shard(context.client.ip()).pick(now, entry, context, state)
    }

    /// Drops expired bindings of the shards worker `worker` of `workers` looks after (each shard is
    /// expired by one worker).
    pub fn expire(&self, now: Instant, worker: usize, workers: usize) {
        for shard in self.shards.iter().skip(worker).step_by(workers.max(1)) {
            shard.lock().unwrap_or_else(|e| e.into_inner()).expire(now);
        }
    }

    /// Bindings held now (all shards).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }
}
