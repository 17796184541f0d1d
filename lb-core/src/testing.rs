//! Helpers shared by lb-core's unit tests (compiled only for tests).

use std::time::{Duration, Instant};

/// A fixed origin for tests that pass explicit instants: only offsets from it matter, so tests stay
/// deterministic although the origin itself comes from the clock (the one clock read in lb-core).
#[allow(clippy::disallowed_methods, reason = "an origin for relative instants; its value never matters")]
pub fn origin() -> Instant {
    Instant::now()
}

/// `origin + secs` seconds.
pub fn at(origin: Instant, secs: u64) -> Instant {
    origin + Duration::from_secs(secs)
}

use std::net::SocketAddr;

use crate::model::{
    Backend, BackendId, BackendIdx, EndpointConditions, EntryPolicy, ObjectRef, Protocol, ServiceEntry,
    TrafficPolicy, VipKey,
};
use crate::scheduler::{Scheduler, SchedulerKind};

/// Backend `i`: `10.0.0.<i>:8080`.
pub fn backend_id(i: u8) -> BackendId {
    BackendId(SocketAddr::from(([10, 0, 0, i], 8080)))
}

/// An entry on `192.0.2.1:80/TCP` with backends `1..=ready.len()` (ready or not) and `traffic`.
pub fn entry(ready: &[bool], traffic: TrafficPolicy) -> ServiceEntry {
    let backends: Vec<Backend> = (1..=ready.len() as u8)
        .map(|i| {
            let conditions = EndpointConditions { ready: ready[usize::from(i) - 1], ..Default::default() };
            Backend::ready(backend_id(i).0).with_conditions(conditions)
        })
        .collect();
    let eligible: Vec<BackendIdx> = (0..ready.len() as BackendIdx).filter(|&i| ready[i as usize]).collect();
    ServiceEntry {
        key: VipKey::new([192, 0, 2, 1].into(), 80, Protocol::Tcp),
        service: ObjectRef::service("default", "web"),
        port_name: None,
        scheduler: Scheduler::build(SchedulerKind::RoundRobin, &backends, &eligible),
        backends: backends.into(),
        eligible,
        policy: EntryPolicy::default(),
        traffic,
    }
}
