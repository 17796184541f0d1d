//! One worker's backend selection: a [`PickState`] per VIP key and its own random stream, the
//! shared session-affinity table, and the counting of what it opens on each backend's shared load
//! counter; every TCP connection, UDP flow and SCTP association picks through [`Selection::pick`]
//! so all protocols choose the same way.
//!
//! Pick states are this worker's alone (no lock). What must hold across workers is shared: each
//! backend's [`BackendLoad`] (the least-connection family sees every worker's connections, see
//! `lb_core::scheduler` `load`) and, for entries with `sessionAffinity: ClientIP` only, the
//! [`SharedAffinity`] table. An entry without affinity picks without taking any lock.
//! Invariant: every [`Selection::open`] is matched by exactly one [`Selection::close`] of the
//! handle it returned; callers keep that handle with the connection or flow, so this worker's count
//! (published as `WorkerStats::backend_load`) returns to zero when nothing is open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use lb_core::hash::SplitMix64;
use lb_core::{
    Backend, BackendIdx, BackendLoad, LoadRegistry, PickContext, PickState, ServiceEntry, Snapshot, VipKey,
};

use crate::affinity::SharedAffinity;
use crate::stats::{self, WorkerCounters};
use crate::traffic::{Counted, Refusal, WorkerTraffic};

pub(crate) struct Selection {
    worker: usize,
    workers: usize,
    states: HashMap<VipKey, PickState>,
    /// Connections and flows this worker opened and has not closed yet.
    counted: u64,
    affinity: Arc<SharedAffinity>,
    random: SplitMix64,
    /// This worker's traffic counters per VIP key and backend (`/metrics`).
    traffic: WorkerTraffic,
    /// The shared open-connection counters of the VIP keys with `max-connections` this worker
    /// served, so the registry's lock is taken once per key, not per connection.
    vip_loads: HashMap<VipKey, BackendLoad>,
}

impl Selection {
    pub fn new(
        worker: usize,
        workers: usize,
        affinity: Arc<SharedAffinity>,
        traffic: WorkerTraffic,
        seed: u64,
    ) -> Selection {
        Selection {
            traffic,
            vip_loads: HashMap::new(),
            worker,
            workers,
            states: HashMap::new(),
            counted: 0,
            affinity,
            // Distinct per worker even when two workers get the same seed.
            random: SplitMix64(seed ^ (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    /// A backend of `entry` for a new connection or flow from `client`, never one of `exclude`:
    /// the client's affinity binding while it is valid, else the entry's scheduler with the
    /// backends' shared loads and this worker's random stream.
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
        let context = PickContext { client, destination: Some(entry.key.socket_addr()), exclude, random };
        if entry.traffic.session_affinity.is_some() {
            self.affinity.pick(now, entry, &context, state)
        } else {
            entry.scheduler.pick_with(&context, state)
        }
    }

    /// Counts a connection or flow of `key` to `backend` on its shared load and in this worker's
    /// traffic cell, from its connect submission at `now` (`retry`: not the client's first
    /// attempt); the returned handle is what [`Selection::close`] takes back (it stays valid across
    /// snapshot swaps).
    pub fn open(
        &mut self,
        key: VipKey,
        backend: &Backend,
        retry: bool,
        now: Instant,
        counters: &WorkerCounters,
    ) -> Counted {
        backend.load.open();
        self.counted += 1;
        stats::set(&counters.backend_load, self.counted);
        self.traffic.open(key, backend, retry, now)
    }

    /// Ends what one [`Selection::open`] counted, at `now`.
    pub fn close(&mut self, counted: Counted, now: Instant, counters: &WorkerCounters) {
        counted.end(now).close();
        self.counted = self.counted.saturating_sub(1);
        stats::set(&counters.backend_load, self.counted);
    }

    /// Counts a client of `key` refused before any backend was tried.
    pub fn refuse(&mut self, key: VipKey, why: Refusal) {
        self.traffic.refuse(key, why);
    }

    /// This worker's traffic cells (housekeeping sets their draining gauges).
    pub fn traffic(&mut self) -> &mut WorkerTraffic {
        &mut self.traffic
    }

    /// Housekeeping: drops expired affinity bindings of the shards this worker looks after, and
    /// traffic cells `snapshot` no longer serves that nothing holds.
    pub fn expire(&mut self, now: Instant, snapshot: &Snapshot) {
        self.affinity.expire(now, self.worker, self.workers);
        self.traffic.prune(now, snapshot);
    }

    /// Forgets the cursors of keys `served` rejects (a key that comes back starts afresh).
    pub fn retain_keys(&mut self, mut served: impl FnMut(&VipKey) -> bool) {
        self.states.retain(|key, _| served(key));
        self.vip_loads.retain(|key, _| served(key));
    }

    /// The shared count of `key`'s open connections, from `registry` the first time.
    pub fn vip_load(&mut self, key: VipKey, registry: &LoadRegistry<VipKey>) -> BackendLoad {
        self.vip_loads.entry(key).or_insert_with(|| registry.counter(key)).clone()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use lb_core::{ObjectRef, Protocol, Scheduler, SchedulerKind, TrafficPolicy};

    use super::*;
    use crate::affinity::AFFINITY_CAPACITY;
    use crate::traffic::{TrafficDetail, TrafficRegistry};

    fn entry(kind: SchedulerKind, backends: u16) -> ServiceEntry {
        let backends: Vec<Backend> = (0..backends)
            .map(|i| Backend::ready(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8000 + i)))
            .collect();
        let eligible: Vec<BackendIdx> = (0..backends.len() as BackendIdx).collect();
        let scheduler = Scheduler::build(kind, &backends, &eligible);
        ServiceEntry {
            key: VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 1, 1, 1)), 80, Protocol::Tcp),
            service: ObjectRef::service("test", "svc"),
            port_name: None,
            backends: backends.into(),
            eligible,
            scheduler,
            policy: Default::default(),
            traffic: TrafficPolicy::default(),
        }
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), port)
    }

    fn workers(count: usize) -> Vec<Selection> {
        let affinity = Arc::new(SharedAffinity::new(AFFINITY_CAPACITY));
        let traffic = Arc::new(TrafficRegistry::new(count, TrafficDetail::Backend));
        (0..count)
            .map(|worker| {
                let cells = WorkerTraffic::new(Arc::clone(&traffic), worker);
                Selection::new(worker, count, Arc::clone(&affinity), cells, 1)
            })
            .collect()
    }

    #[test]
    fn each_workers_round_robin_starts_at_its_own_backend() {
        let entry = entry(SchedulerKind::RoundRobin, 4);
        let now = Instant::now();
        let firsts: Vec<_> =
            workers(4).iter_mut().map(|selection| selection.pick(now, &entry, client(1), &[])).collect();
        assert_eq!(firsts, [Some(0), Some(1), Some(2), Some(3)]);
        // A worker index past the backend count wraps around instead of failing.
        assert_eq!(workers(6)[5].pick(now, &entry, client(1), &[]), Some(1));
    }

    #[test]
    fn least_connection_sees_every_workers_connections() {
        let entry = entry(SchedulerKind::LeastConnection, 2);
        let counters = WorkerCounters::default();
        let mut workers = workers(2);
        let now = Instant::now();
        let first = workers[0].pick(now, &entry, client(1), &[]).expect("a backend");
        let key = entry.key;
        let held = workers[0].open(key, &entry.backends[first as usize], false, now, &counters);
        // The other worker sees worker 0's connection: it picks the other backend.
        let second = workers[1].pick(now, &entry, client(2), &[]).expect("a backend");
        assert_ne!(first, second);
        let other = workers[1].open(key, &entry.backends[second as usize], false, now, &counters);
        let extra = workers[1].open(key, &entry.backends[second as usize], false, now, &counters);
        assert_eq!(workers[0].pick(now, &entry, client(3), &[]), Some(first));
        for counted in [held, other, extra] {
            assert!(counted.load.active() > 0);
            workers[0].close(counted, now, &counters);
        }
        assert!(entry.backends.iter().all(|b| b.load.active() == 0));
    }

    #[test]
    fn affinity_holds_across_workers_and_only_affinity_entries_use_the_table() {
        let mut sticky = entry(SchedulerKind::RoundRobin, 4);
        sticky.traffic.session_affinity = Some(Duration::from_secs(60));
        let plain = entry(SchedulerKind::RoundRobin, 4);
        let mut workers = workers(4);
        let now = Instant::now();
        let chosen: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(i, w)| w.pick(now, &sticky, client(1000 + i as u16), &[]))
            .collect();
        assert!(
            chosen.iter().all(|&c| c == chosen[0]),
            "one client IP, one backend on every worker: {chosen:?}"
        );
        assert_eq!(workers[0].affinity.len(), 1);
        let _ = workers[1].pick(now, &plain, client(5), &[]);
        assert_eq!(workers[0].affinity.len(), 1, "a Service without affinity records nothing");
        for worker in &mut workers {
            worker.expire(now + Duration::from_secs(61), &Snapshot::empty());
        }
        assert_eq!(workers[0].affinity.len(), 0, "every shard is expired by some worker");
    }
}
