//! Active health checks on the control thread: [`HealthMonitor`] probes the backends of every Service
//! that sets `ringlb.io/health-check` and turns the verdicts of lb-core's sans-IO [`ActiveChecker`]s
//! (one per Service) into a [`HealthOverlay`]; [`HealthStatus`] counts probes for `/status`.
//!
//! Ownership (why a channel and not a shared publisher): the control loop alone owns the `Publisher`,
//! its version counter and the current overlay. The monitor only sees published snapshots (through a
//! `watch`) and sends whole overlays back (through another `watch`, so a burst of verdicts collapses
//! into the latest). The loop then publishes `apply_health(current, options + overlay, next_version)`,
//! and every rebuild is built with the current overlay, so versions stay monotonic and
//! a reload never forgets a verdict. There is one writer of the table and no lock.
//!
//! Passive outlier detection lives here too: with [`crate::ControlLoop::with_backend_events`], the
//! monitor drains the datapath's batches of backend events every [`EVENT_POLL`], routes each to the
//! lb-core [`OutlierDetector`] of the Service owning its VIP key (per the published snapshot), and
//! merges the ejections into the same overlay as the active checks' verdicts: one overlay, one
//! publish path. The detector enforces `max-ejection-percent`; ejections end at its deadlines.
//!
//! Following the table costs what changed, not its size: each published snapshot is compared with
//! the last by entry identity ([`Snapshot::changes_from`]) and only the Services of changed entries
//! are looked at again; only detectors with an ejection running are visited for timeouts, deadlines
//! and the overlay. With 10,000 Services, one changed EndpointSlice is one Service's work here.
//!
//! Must never: touch datapath connections (probes open their own sockets); empty an entry (panic mode
//! is applied by lb-core when the overlay is, never decided here); block the control thread.

mod probe;

use probe::ProbeFailure;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use lb_core::health::{ActiveChecker, BackendEvent, Health, OutlierDetector};
use lb_core::{BackendId, HealthOverlay, LogThrottle, ObjectRef, Snapshot, VipKey};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Counters of the active health checks, shared between clones (for `/status`).
#[derive(Debug, Clone, Default)]
pub struct HealthStatus(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    probes_sent: AtomicU64,
    probes_failed: AtomicU64,
    probes_local_failures: AtomicU64,
    checked_backends: AtomicU64,
    unhealthy_backends: AtomicU64,
    backend_events: AtomicU64,
    ejections: AtomicU64,
    ejected_backends: AtomicU64,
    /// Why each backend the overlay keeps out is kept out (`/backends`, `/metrics`).
    verdicts: std::sync::Mutex<Arc<Verdicts>>,
}

/// The backends the monitor keeps out of new connections now, by why: failing their Service's
/// active checks, or ejected by its outlier detection (a backend may be both).
#[derive(Debug, Default)]
pub struct Verdicts {
    pub failing_checks: HealthOverlay,
    pub ejected: HealthOverlay,
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

    /// Probes that could not be made for lack of local resources (descriptors, source ports, memory)
    /// since start; they count against no backend.
    pub fn probes_local_failures(&self) -> u64 {
        self.0.probes_local_failures.load(Ordering::Relaxed)
    }

    /// (Service, backend) pairs under active checks now.
    pub fn checked_backends(&self) -> u64 {
        self.0.checked_backends.load(Ordering::Relaxed)
    }

    /// (Service, backend) pairs whose checks say unhealthy now (panic mode may still serve them).
    pub fn unhealthy_backends(&self) -> u64 {
        self.0.unhealthy_backends.load(Ordering::Relaxed)
    }

    /// Backend events (connect outcomes, resets) received from the datapath since start.
    pub fn backend_events(&self) -> u64 {
        self.0.backend_events.load(Ordering::Relaxed)
    }

    /// Outlier ejections since start.
    pub fn ejections(&self) -> u64 {
        self.0.ejections.load(Ordering::Relaxed)
    }

    /// (Service, backend) pairs ejected by outlier detection now (panic mode may still serve them).
    pub fn ejected_backends(&self) -> u64 {
        self.0.ejected_backends.load(Ordering::Relaxed)
    }

    /// The verdicts of the overlay sent last.
    pub fn verdicts(&self) -> Arc<Verdicts> {
        Arc::clone(&self.0.verdicts.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How often the monitor drains the datapath's backend events (workers flush once per housekeeping
/// tick, so polling much faster gains nothing).
pub const EVENT_POLL: Duration = Duration::from_millis(50);

/// The control side's end of the datapath's backend events (`lb_datapath::Engine::take_backend_events`).
pub type BackendEventReceiver = std::sync::mpsc::Receiver<Vec<BackendEvent>>;

/// What a finished probe task reports.
type ProbeOutcome = (ObjectRef, BackendId, Result<(), ProbeFailure>);

/// Drives one [`ActiveChecker`] per checked Service with the real clock and real sockets.
pub(crate) struct HealthMonitor {
    checkers: BTreeMap<ObjectRef, ActiveChecker>,
    outliers: BTreeMap<ObjectRef, OutlierDetector>,
    /// The last snapshot followed.
    last: Arc<Snapshot>,
    /// The Service of every VIP key of `last` (routes backend events).
    services: HashMap<VipKey, ObjectRef>,
    /// The VIP keys of every Service of `last`, in key order.
    keys: HashMap<ObjectRef, BTreeSet<VipKey>>,
    /// The Services whose detector has an ejection running.
    ejecting: BTreeSet<ObjectRef>,
    /// Backends under active checks, summed over `checkers`.
    checked: usize,
    events: Option<BackendEventReceiver>,
    overlay: HealthOverlay,
    probes: JoinSet<ProbeOutcome>,
    status: HealthStatus,
    seeds: std::collections::hash_map::RandomState,
    /// One warning line per interval about probes that could not be made.
    local_failures_logged: LogThrottle,
}

impl HealthMonitor {
    pub(crate) fn new(status: HealthStatus) -> Self {
        HealthMonitor {
            checkers: BTreeMap::new(),
            outliers: BTreeMap::new(),
            last: Arc::new(Snapshot::empty()),
            services: HashMap::new(),
            keys: HashMap::new(),
            ejecting: BTreeSet::new(),
            checked: 0,
            events: None,
            overlay: HealthOverlay::new(),
            probes: JoinSet::new(),
            status,
            seeds: Default::default(),
            local_failures_logged: LogThrottle::default(),
        }
    }

    /// Feeds passive outlier detection from the datapath's batches of backend events.
    pub(crate) fn with_events(mut self, events: Option<BackendEventReceiver>) -> Self {
        self.events = events;
        self
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
            // Drained on every turn, not only when the poll timer fires: busy probes would otherwise
            // keep restarting that timer.
            self.drain_events(now);
            for (service, checker) in &mut self.checkers {
                for (backend, health) in checker.handle_timeout(now) {
                    log_verdict(service, backend, health, "probe timed out");
                }
                while let Some(request) = checker.poll_probe(now) {
                    self.status.0.probes_sent.fetch_add(1, Ordering::Relaxed);
                    let (service, backend, kind) = (service.clone(), request.backend, request.kind);
                    let proxy_protocol = request.proxy_protocol;
                    let deadline = tokio::time::Instant::from_std(request.deadline);
                    self.probes.spawn(async move {
                        let outcome =
                            tokio::time::timeout_at(deadline, probe::probe(backend.0, &kind, proxy_protocol))
                                .await;
                        let timed_out = || Err(ProbeFailure::Backend("probe timed out".to_owned()));
                        (service, backend, outcome.unwrap_or_else(|_| timed_out()))
                    });
                }
            }
            let outliers = &mut self.outliers;
            self.ejecting.retain(|service| {
                let Some(detector) = outliers.get_mut(service) else { return false };
                for backend in detector.handle_timeout(now) {
                    tracing::info!(%service, %backend, "outlier ejection ended; backend gets connections again");
                }
                detector.next_deadline().is_some()
            });
            if !self.publish_overlay(&verdicts) {
                return;
            }
            let checks = self.checkers.values().filter_map(ActiveChecker::next_deadline);
            let ejections = self.ejecting.iter().filter_map(|s| self.outliers.get(s)?.next_deadline());
            let wake = checks.chain(ejections).min();
            let polling = self.events.is_some();
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Some(snapshot) = snapshot {
                        self.track(snapshot, Instant::now());
                    }
                }
                Some(joined) = self.probes.join_next() => {
                    if let Ok((service, backend, outcome)) = joined {
                        self.record(&service, backend, outcome);
                    }
                }
                () = sleep_until(wake) => {}
                () = tokio::time::sleep(EVENT_POLL), if polling => {}
            }
        }
    }

    /// Checks exactly the backends of the Services that configure checks in `snapshot`, and keeps
    /// one outlier detector per Service (when events are fed); only the Services of entries that
    /// changed since the last snapshot are looked at.
    fn track(&mut self, snapshot: Arc<Snapshot>, now: Instant) {
        let mut touched = BTreeSet::new();
        for (before, after) in snapshot.changes_from(&self.last) {
            if let Some(entry) = before {
                self.services.remove(&entry.key);
                if let Some(keys) = self.keys.get_mut(&entry.service) {
                    keys.remove(&entry.key);
                }
                touched.insert(entry.service.clone());
            }
            if let Some(entry) = after {
                self.services.insert(entry.key, entry.service.clone());
                self.keys.entry(entry.service.clone()).or_default().insert(entry.key);
                touched.insert(entry.service.clone());
            }
        }
        for service in touched {
            let entries: Vec<&Arc<lb_core::ServiceEntry>> = match self.keys.get(&service) {
                Some(keys) if !keys.is_empty() => keys.iter().filter_map(|key| snapshot.get(key)).collect(),
                _ => {
                    self.keys.remove(&service);
                    Vec::new()
                }
            };
            self.track_service(&service, &entries, now);
        }
        self.status.0.checked_backends.store(self.checked as u64, Ordering::Relaxed);
        crate::control::drop_aside(std::mem::replace(&mut self.last, snapshot));
    }

    /// Brings `service`'s checker and detector in line with its `entries` (none: it is gone). The
    /// configuration is its first entry's (in key order); a changed one starts afresh.
    fn track_service(&mut self, service: &ObjectRef, entries: &[&Arc<lb_core::ServiceEntry>], now: Instant) {
        // Endpoints Kubernetes already keeps out (neither ready nor serving) are neither probed nor
        // watched: their failures say nothing new and would only log noise while pods go away.
        let candidates = |checked_only: bool| -> BTreeSet<BackendId> {
            let entries =
                entries.iter().filter(|entry| !checked_only || entry.traffic.health_check.is_some());
            let backends = entries.flat_map(|entry| entry.backends.iter());
            backends.filter(|b| b.conditions.ready || b.conditions.serving).map(|b| b.id).collect()
        };
        if let Some(checker) = self.checkers.get(service) {
            self.checked -= checker.len();
        }
        match entries.iter().find_map(|entry| entry.traffic.health_check.as_ref()) {
            None => {
                self.checkers.remove(service);
            }
            Some(config) => {
                let fresh = || ActiveChecker::new(config.clone(), self.seeds.hash_one(service));
                let checker = self.checkers.entry(service.clone()).or_insert_with(fresh);
                if checker.config() != config {
                    *checker = fresh();
                }
                checker.set_backends(now, candidates(true));
                self.checked += checker.len();
            }
        }
        if self.events.is_none() {
            return;
        }
        let Some(first) = entries.first() else {
            self.outliers.remove(service);
            self.ejecting.remove(service);
            return;
        };
        let config = first.traffic.outlier;
        let detector = self.outliers.entry(service.clone()).or_insert_with(|| OutlierDetector::new(config));
        if *detector.config() != config {
            *detector = OutlierDetector::new(config);
        }
        detector.set_backends(candidates(false));
        if detector.next_deadline().is_none() {
            self.ejecting.remove(service);
        }
    }

    /// Feeds every batch the datapath flushed so far to the detectors. A closed channel (the engine
    /// stopped) ends polling.
    fn drain_events(&mut self, now: Instant) {
        let Some(events) = &self.events else { return };
        let mut received = 0u64;
        loop {
            match events.try_recv() {
                Ok(batch) => {
                    received += batch.len() as u64;
                    for event in batch {
                        let Some(service) = self.services.get(&event.key) else { continue };
                        let Some(detector) = self.outliers.get_mut(service) else { continue };
                        if !event.outcome.is_failure() {
                            detector.handle_success(now, event.backend);
                        } else if detector.handle_failure(now, event.backend) {
                            self.ejecting.insert(service.clone());
                            self.status.0.ejections.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                %service,
                                backend = %event.backend,
                                outcome = ?event.outcome,
                                "backend ejected after consecutive failures"
                            );
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.events = None;
                    break;
                }
            }
        }
        self.status.0.backend_events.fetch_add(received, Ordering::Relaxed);
    }

    fn record(&mut self, service: &ObjectRef, backend: BackendId, outcome: Result<(), ProbeFailure>) {
        let Some(checker) = self.checkers.get_mut(service) else { return };
        let now = Instant::now();
        let changed = match &outcome {
            Ok(()) => checker.handle_result(now, backend, true),
            Err(ProbeFailure::Backend(_)) => {
                self.status.0.probes_failed.fetch_add(1, Ordering::Relaxed);
                checker.handle_result(now, backend, false)
            }
            Err(failure @ ProbeFailure::Local(..)) => {
                // The load balancer's own shortage: the backend keeps its verdict and its streak.
                self.status.0.probes_local_failures.fetch_add(1, Ordering::Relaxed);
                checker.handle_inconclusive(backend);
                if let Some(suppressed) = self.local_failures_logged.admit(now) {
                    tracing::warn!(%service, %backend, %failure, suppressed, "health probe could not be made");
                }
                None
            }
        };
        if let Some(health) = changed {
            let reason = match &outcome {
                Ok(()) => "probes succeed".to_owned(),
                Err(failure) => failure.to_string(),
            };
            log_verdict(service, backend, health, &reason);
        }
    }

    /// Sends the overlay when it changed; false when nobody listens any more.
    fn publish_overlay(&mut self, verdicts: &watch::Sender<HealthOverlay>) -> bool {
        let mut overlay = HealthOverlay::new();
        let mut why = Verdicts::default();
        let mut unhealthy = 0;
        for (service, checker) in &self.checkers {
            let backends: Vec<_> = checker.unhealthy().collect();
            unhealthy += backends.len() as u64;
            why.failing_checks.extend(service, backends.iter().copied());
            overlay.extend(service, backends);
        }
        self.status.0.unhealthy_backends.store(unhealthy, Ordering::Relaxed);
        let mut ejected = 0;
        for service in &self.ejecting {
            let Some(detector) = self.outliers.get(service) else { continue };
            let backends: Vec<_> = detector.ejected().collect();
            ejected += backends.len() as u64;
            why.ejected.extend(service, backends.iter().copied());
            overlay.extend(service, backends);
        }
        self.status.0.ejected_backends.store(ejected, Ordering::Relaxed);
        if overlay == self.overlay {
            return !verdicts.is_closed();
        }
        *self.status.0.verdicts.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(why);
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
