//! Active health checks on the control thread: [`HealthMonitor`] probes the backends of every Service
//! that sets `ringlb.io/health-check` and turns the verdicts of lb-core's sans-IO [`ActiveChecker`]s
//! (one per Service) into a [`HealthOverlay`]; [`HealthStatus`] counts probes for `/status`.
//!
//! Ownership (why a channel and not a shared publisher): the source loop alone owns the `Publisher`,
//! its version counter and the current overlay. The monitor only sees published snapshots (through a
//! `watch`) and sends whole overlays back (through another `watch`, so a burst of verdicts collapses
//! into the latest). The loop then publishes `apply_health(current, options + overlay, next_version)`,
//! and every manifest rebuild is built with the current overlay, so versions stay monotonic and
//! a reload never forgets a verdict. There is one writer of the table and no lock.
//!
//! Must never: touch datapath connections (probes open their own sockets); empty an entry (panic mode
//! is applied by lb-core when the overlay is, never decided here); block the control thread.

mod probe;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lb_core::health::{ActiveChecker, Health, HealthCheckConfig};
use lb_core::{BackendId, HealthOverlay, ObjectRef, Snapshot};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Counters of the active health checks, shared between clones (for `/status`).
#[derive(Debug, Clone, Default)]
pub struct HealthStatus(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    probes_sent: AtomicU64,
    probes_failed: AtomicU64,
    checked_backends: AtomicU64,
    unhealthy_backends: AtomicU64,
}

impl HealthStatus {
    pub fn new() -> Self {
        HealthStatus::default()
    }

    /// Probes started since start.
    pub fn probes_sent(&self) -> u64 {
        self.0.probes_sent.load(Ordering::Relaxed)
    }

    /// Probes that failed (refused, wrong status, timed out) since start.
    pub fn probes_failed(&self) -> u64 {
        self.0.probes_failed.load(Ordering::Relaxed)
    }

    /// (Service, backend) pairs under active checks now.
    pub fn checked_backends(&self) -> u64 {
        self.0.checked_backends.load(Ordering::Relaxed)
    }

    /// (Service, backend) pairs whose checks say unhealthy now (panic mode may still serve them).
    pub fn unhealthy_backends(&self) -> u64 {
        self.0.unhealthy_backends.load(Ordering::Relaxed)
    }
}

/// What a finished probe task reports.
type ProbeOutcome = (ObjectRef, BackendId, Result<(), String>);

/// Drives one [`ActiveChecker`] per checked Service with the real clock and real sockets.
pub(crate) struct HealthMonitor {
    checkers: BTreeMap<ObjectRef, ActiveChecker>,
    overlay: HealthOverlay,
    probes: JoinSet<ProbeOutcome>,
    status: HealthStatus,
    seeds: std::collections::hash_map::RandomState,
}

impl HealthMonitor {
    pub(crate) fn new(status: HealthStatus) -> Self {
        HealthMonitor {
            checkers: BTreeMap::new(),
            overlay: HealthOverlay::new(),
            probes: JoinSet::new(),
            status,
            seeds: Default::default(),
        }
    }

    /// Follows `snapshots` (the published ones) and sends every changed overlay to `verdicts`, until
    /// either channel closes. Dropping the future aborts the probes in flight.
    pub(crate) async fn run(
        mut self,
        mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        verdicts: watch::Sender<HealthOverlay>,
    ) {
        loop {
            let now = Instant::now();
            for (service, checker) in &mut self.checkers {
                for (backend, health) in checker.handle_timeout(now) {
                    log_verdict(service, backend, health, "probe timed out");
                }
                while let Some(request) = checker.poll_probe(now) {
                    self.status.0.probes_sent.fetch_add(1, Ordering::Relaxed);
                    let (service, backend, kind) = (service.clone(), request.backend, request.kind);
                    let deadline = tokio::time::Instant::from_std(request.deadline);
                    self.probes.spawn(async move {
                        let outcome = tokio::time::timeout_at(deadline, probe::probe(backend.0, &kind)).await;
                        (service, backend, outcome.unwrap_or_else(|_| Err("probe timed out".to_owned())))
                    });
                }
            }
            if !self.publish_overlay(&verdicts) {
                return;
            }
            let wake = self.checkers.values().filter_map(ActiveChecker::next_deadline).min();
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Some(snapshot) = snapshot {
                        self.track(&snapshot, Instant::now());
                    }
                }
                Some(joined) = self.probes.join_next() => {
                    if let Ok((service, backend, outcome)) = joined {
                        self.record(&service, backend, outcome);
                    }
                }
                () = sleep_until(wake) => {}
            }
        }
    }

    /// Checks exactly the backends of the Services that configure checks in `snapshot`.
    fn track(&mut self, snapshot: &Snapshot, now: Instant) {
        let mut wanted: BTreeMap<ObjectRef, (HealthCheckConfig, BTreeSet<BackendId>)> = BTreeMap::new();
        for entry in snapshot.entries() {
            let Some(config) = &entry.traffic.health_check else { continue };
            let (_, backends) =
                wanted.entry(entry.service.clone()).or_insert_with(|| (config.clone(), BTreeSet::new()));
            // Endpoints Kubernetes already keeps out (neither ready nor serving) are not probed: their
            // failures say nothing new and would only log noise while pods go away.
            let candidates = entry.backends.iter().filter(|b| b.conditions.ready || b.conditions.serving);
            backends.extend(candidates.map(|b| b.id));
        }
        self.checkers.retain(|service, checker| {
            wanted.get(service).is_some_and(|(config, _)| config == checker.config())
        });
        let mut checked = 0;
        for (service, (config, backends)) in wanted {
            checked += backends.len() as u64;
            let checker = self
                .checkers
                .entry(service.clone())
                .or_insert_with(|| ActiveChecker::new(config, self.seeds.hash_one(&service)));
            checker.set_backends(now, backends);
        }
        self.status.0.checked_backends.store(checked, Ordering::Relaxed);
    }

    fn record(&mut self, service: &ObjectRef, backend: BackendId, outcome: Result<(), String>) {
        let Some(checker) = self.checkers.get_mut(service) else { return };
        if outcome.is_err() {
            self.status.0.probes_failed.fetch_add(1, Ordering::Relaxed);
        }
        let changed = checker.handle_result(Instant::now(), backend, outcome.is_ok());
        if let Some(health) = changed {
            let reason = match &outcome {
                Ok(()) => "probes succeed",
                Err(reason) => reason.as_str(),
            };
            log_verdict(service, backend, health, reason);
        }
    }

    /// Sends the overlay when it changed; false when nobody listens any more.
    fn publish_overlay(&mut self, verdicts: &watch::Sender<HealthOverlay>) -> bool {
        let mut overlay = HealthOverlay::new();
        let mut unhealthy = 0;
        for (service, checker) in &self.checkers {
            let backends: Vec<_> = checker.unhealthy().collect();
            unhealthy += backends.len() as u64;
            overlay.extend(service, backends);
        }
        self.status.0.unhealthy_backends.store(unhealthy, Ordering::Relaxed);
        if overlay == self.overlay {
            return !verdicts.is_closed();
        }
        self.overlay = overlay.clone();
        verdicts.send(overlay).is_ok()
    }
}

fn log_verdict(service: &ObjectRef, backend: BackendId, health: Health, reason: &str) {
    match health {
        Health::Unhealthy => tracing::info!(%service, %backend, reason, "backend failed its health checks"),
        Health::Healthy => {
            tracing::info!(%service, %backend, reason, "backend passes its health checks again")
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(wake) => tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await,
        None => std::future::pending().await,
    }
}
