//! How long a worker takes to reconcile a published snapshot with many VIP:ports: the time from
//! `Engine::publish` until every worker reports the new generation reconciled.
//!
//! `cargo run --release -p lb-datapath --example reconcile_cost -- 5000` publishes N TCP keys on
//! 127.0.0.2 (one listener each per worker), then the same table with one key changed, then an
//! empty table, and prints each reconcile time. One worker, so the worker's own cost is measured.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::{
    Backend, EntryPolicy, ObjectRef, Protocol, Scheduler, SchedulerKind, ServiceEntry, Snapshot, VipKey,
};
use lb_datapath::{Engine, EngineConfig};

fn table(version: u64, keys: impl Iterator<Item = u16>) -> Arc<Snapshot> {
    let backends = vec![Backend::ready(SocketAddr::from(([127, 0, 0, 1], 9)))];
    let entries = keys.map(|port| ServiceEntry {
        key: VipKey::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port, Protocol::Tcp),
        service: ObjectRef::service("bench", format!("s{port}")),
        port_name: None,
        scheduler: Scheduler::build(SchedulerKind::RoundRobin, &backends, &[0]),
        backends: backends.clone().into(),
        eligible: vec![0],
        policy: EntryPolicy::default(),
        traffic: Default::default(),
    });
    Arc::new(Snapshot::from_entries(version, entries))
}

fn reconcile(engine: &Engine, snapshot: Arc<Snapshot>) -> Duration {
    let started = Instant::now();
    engine.publish(snapshot);
    while !engine.is_ready() {
        std::thread::yield_now();
    }
    started.elapsed()
}

fn main() {
    let n: u16 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let config = EngineConfig { workers: 1, pin_workers: false, ..EngineConfig::default() };
    let engine = Engine::start(config, Arc::new(Snapshot::empty())).expect("engine");
    let first = 20_000;
    let full = reconcile(&engine, table(1, first..first + n));
    let one_changed = reconcile(&engine, table(2, (first + 1)..=(first + n)));
    let empty = reconcile(&engine, table(3, std::iter::empty()));
    let listeners = engine.stats().total().listeners;
    println!(
        "{n} keys: open all {:.1} ms, one key changed {:.1} ms, close all {:.1} ms (listeners left {listeners})",
        full.as_secs_f64() * 1e3,
        one_changed.as_secs_f64() * 1e3,
        empty.as_secs_f64() * 1e3
    );
}
