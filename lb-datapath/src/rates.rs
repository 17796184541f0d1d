//! Per-client connection rates (`ringlb.io/client-connection-rate`) across workers: one set of
//! lb-core [`RateTable`]s shared by every worker, so a client's limit holds whichever worker the
//! kernel hands its connection to (`SO_REUSEPORT` spreads one client's connections over them by
//! source port).
//!
//! Cost: only entries with a rate touch it; the table is split into [`SHARDS`] mutex-guarded
//! tables by a hash of the client IP, so two workers contend only when new connections of two
//! clients of one shard arrive at the same instant, and a lock is held for one bucket update.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use lb_core::hash::{hash_ip, seed};
use lb_core::{ClientRate, RateTable, VipKey};

/// Shards of the table; a power of two well above any worker count.
const SHARDS: usize = 64;

/// Buckets all workers together keep (about 80 bytes each); see [`RateTable`] for what happens
/// beyond.
pub(crate) const RATE_CAPACITY: usize = 131_072;

pub(crate) struct SharedRates {
    shards: Box<[Mutex<RateTable>]>,
}

impl SharedRates {
    pub fn new(capacity: usize) -> SharedRates {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        SharedRates { shards: (0..SHARDS).map(|_| Mutex::new(RateTable::new(per_shard))).collect() }
    }

    /// Whether `client` may open a new connection to `key` now under `rate`.
    pub fn admit(&self, now: Instant, key: VipKey, client: IpAddr, rate: ClientRate) -> bool {
        let index = hash_ip(client.to_canonical(), seed::LOOKUP) as usize % SHARDS;
        // A worker that panicked under the lock left a consistent table (one bucket update).
        let mut shard = self.shards[index].lock().unwrap_or_else(|e| e.into_inner());
        shard.admit(now, key, client, rate)
    }
}
