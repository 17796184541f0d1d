//! One worker's backend selection state: a [`PickState`] per VIP key, the [`LoadTable`] of its open
//! connections and flows, its [`AffinityTable`] and its own random stream; every TCP connection and
//! UDP flow picks through [`Selection::pick`] so all protocols choose the same way.
//!
//! Owned by one worker and never shared (no lock, no shared cache line). Load counts are this
//! worker's share only (see `lb_core::scheduler` `load`): the least-connection family is per worker.
//! Invariant: every [`Selection::open`] is matched by exactly one [`Selection::close`] of the same
//! backend; callers keep the counted backend with the connection or flow, so the sum of the table
//! (published as `WorkerStats::backend_load`) returns to zero when nothing is open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use lb_core::hash::SplitMix64;
use lb_core::{
    AffinityTable, BackendId, BackendIdx, LoadTable, PickContext, PickState, ServiceEntry, VipKey,
};

use crate::stats::{self, WorkerCounters};

/// Clients one worker remembers for `sessionAffinity: ClientIP`; when full, the binding expiring
/// soonest is dropped (that client then gets a fresh pick).
pub(crate) const AFFINITY_CAPACITY: usize = 65_536;

pub(crate) struct Selection {
    worker: usize,
    states: HashMap<VipKey, PickState>,
    load: LoadTable,
    /// Sum of `load`'s counts, kept alongside so the gauge costs nothing to update.
    counted: u64,
    affinity: AffinityTable,
    random: SplitMix64,
}

impl Selection {
    pub fn new(worker: usize, seed: u64) -> Selection {
        Selection {
            worker,
            states: HashMap::new(),
            load: LoadTable::new(),
            counted: 0,
            affinity: AffinityTable::new(AFFINITY_CAPACITY),
            // Distinct per worker even when two workers get the same seed.
            random: SplitMix64(seed ^ (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    /// A backend of `entry` for a new connection or flow from `client`, never one of `exclude`:
    /// the client's affinity binding while it is valid, else the entry's scheduler with this
    /// worker's load and random stream.
    pub fn pick(
        &mut self,
        now: Instant,
        entry: &ServiceEntry,
        client: SocketAddr,
        exclude: &[BackendIdx],
    ) -> Option<BackendIdx> {
        let random = self.random.next_u64();
        let worker = self.worker as u64;
        // The cursor starts at the worker's index: with W workers, the first connections of W
        // workers go to W different backends instead of all to the first one.
        let state = self.states.entry(entry.key).or_insert_with(|| PickState::seeded(worker, random));
        let context = PickContext {
            client,
            destination: Some(entry.key.socket_addr()),
            exclude,
            load: Some(&self.load),
            random,
        };
        self.affinity.pick(now, entry, &context, state)
    }

    /// Counts a connection or flow to `backend` (matched by one [`Selection::close`]).
    pub fn open(&mut self, backend: BackendId, counters: &WorkerCounters) {
        self.load.open(backend);
        self.counted += 1;
        stats::set(&counters.backend_load, self.counted);
    }

    /// Ends what one [`Selection::open`] of `backend` counted.
    pub fn close(&mut self, backend: BackendId, counters: &WorkerCounters) {
        if self.load.active(backend) > 0 {
            self.load.close(backend);
            self.counted = self.counted.saturating_sub(1);
        }
        stats::set(&counters.backend_load, self.counted);
    }

    /// Housekeeping: drops expired affinity bindings.
    pub fn expire(&mut self, now: Instant) {
        self.affinity.expire(now);
    }

    /// Forgets the cursors of keys `served` rejects (a key that comes back starts afresh).
    pub fn retain_keys(&mut self, mut served: impl FnMut(&VipKey) -> bool) {
        self.states.retain(|key, _| served(key));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use lb_core::{
        Backend, EndpointConditions, ObjectRef, Protocol, Scheduler, SchedulerKind, TrafficPolicy,
    };

    use super::*;

    fn entry(kind: SchedulerKind, backends: u16) -> ServiceEntry {
        let backends: Vec<Backend> = (0..backends)
            .map(|i| Backend {
                id: BackendId(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8000 + i)),
                conditions: EndpointConditions::default(),
                weight: 1,
                node_name: None,
                zone: None,
                target: None,
            })
            .collect();
        let eligible: Vec<BackendIdx> = (0..backends.len() as BackendIdx).collect();
        let scheduler = Scheduler::build(kind, &backends, &eligible);
        ServiceEntry {
            key: VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 1, 1, 1)), 80, Protocol::Tcp),
            service: ObjectRef::service("test", "svc"),
            port_name: None,
            backends,
            eligible,
            scheduler,
            policy: Default::default(),
            traffic: TrafficPolicy::default(),
        }
    }

    fn client() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40_000)
    }

    #[test]
    fn each_workers_round_robin_starts_at_its_own_backend() {
        let entry = entry(SchedulerKind::RoundRobin, 4);
        let now = Instant::now();
        let firsts: Vec<_> =
            (0..4).map(|worker| Selection::new(worker, 1).pick(now, &entry, client(), &[])).collect();
        assert_eq!(firsts, [Some(0), Some(1), Some(2), Some(3)]);
        // A worker index past the backend count wraps around instead of failing.
        assert_eq!(Selection::new(5, 1).pick(now, &entry, client(), &[]), Some(1));
    }

    #[test]
    fn least_connection_follows_this_workers_open_and_close() {
        let entry = entry(SchedulerKind::LeastConnection, 2);
        let counters = WorkerCounters::default();
        let mut selection = Selection::new(0, 1);
        let now = Instant::now();
        let first = selection.pick(now, &entry, client(), &[]).expect("a backend");
        selection.open(entry.backends[first as usize].id, &counters);
        let second = selection.pick(now, &entry, client(), &[]).expect("a backend");
        assert_ne!(first, second, "the busier backend was picked again");
        selection.open(entry.backends[second as usize].id, &counters);
        selection.open(entry.backends[second as usize].id, &counters);
        assert_eq!(counters.read().backend_load, 3);
        assert_eq!(selection.pick(now, &entry, client(), &[]), Some(first));
        selection.close(entry.backends[second as usize].id, &counters);
        selection.close(entry.backends[second as usize].id, &counters);
        selection.close(entry.backends[first as usize].id, &counters);
        // A close without an open (a bug elsewhere) must not wrap the gauge.
        selection.close(entry.backends[first as usize].id, &counters);
        assert_eq!(counters.read().backend_load, 0);
    }
}
