//! A cheap, cloneable view of a source's progress for the admin endpoint (`/readyz`) and logs.
//!
//! Written by the control loop and its source, read from anywhere without locks (build times and
//! sync lag too, for `/metrics`). "Ready" means the initial
//! snapshot has been handed to the sink; it never goes back to false, because after that a bad edit
//! keeps the previous snapshot serving (see [`Readiness::inputs_rejected`] for that condition).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lb_core::histogram::{CONTROL_SECONDS, Histogram, HistogramSnapshot};

/// Shared progress of one source; clones observe the same state.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<State>);

#[derive(Debug)]
struct State {
    /// How long builds took (on the blocking pool), and how long changes took from the control
    /// loop's receiving them (a watch event, a file load) to their publish.
    build: Histogram,
    lag: Histogram,
    /// Seconds since the Unix epoch of the last publish (0: none yet).
    published_at: AtomicU64,
    ready: AtomicBool,
    /// Version of the last published snapshot (meaningful once `ready`).
    version: AtomicU64,
    rejected: AtomicBool,
    rejected_reloads: AtomicU64,
    rejected_objects: AtomicU64,
    loads: AtomicU64,
}

impl Default for State {
    fn default() -> Self {
        State {
            build: Histogram::new(CONTROL_SECONDS),
            lag: Histogram::new(CONTROL_SECONDS),
            published_at: AtomicU64::new(0),
            ready: AtomicBool::default(),
            version: AtomicU64::default(),
            rejected: AtomicBool::default(),
            rejected_reloads: AtomicU64::default(),
            rejected_objects: AtomicU64::default(),
            loads: AtomicU64::default(),
        }
    }
}

impl Readiness {
    pub fn new() -> Self {
        Readiness::default()
    }

    /// Whether the initial snapshot has been published.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Acquire)
    }

    /// Version of the snapshot published last, if any.
    pub fn published_version(&self) -> Option<u64> {
        self.is_ready().then(|| self.0.version.load(Ordering::Acquire))
    }

    /// Whether the inputs as they are now were rejected (a bad edit), so an older snapshot serves.
    pub fn inputs_rejected(&self) -> bool {
        self.0.rejected.load(Ordering::Acquire)
    }

    /// How many reloads were rejected since start (each changed-but-bad input counts once).
    pub fn rejected_reloads(&self) -> u64 {
        self.0.rejected_reloads.load(Ordering::Acquire)
    }

    /// How many times changed inputs were loaded since start, whatever the outcome (published,
    /// unchanged table, or rejected); unchanged files are not loaded again and do not count.
    pub fn loads(&self) -> u64 {
        self.0.loads.load(Ordering::Acquire)
    }

    /// Objects the builder rejected in the last load that parsed (their Services keep serving what
    /// they served before, see `lb_core::build`); 0 when everything was accepted.
    pub fn rejected_objects(&self) -> u64 {
        self.0.rejected_objects.load(Ordering::Acquire)
    }

    pub(crate) fn set_rejected_objects(&self, count: usize) {
        self.0.rejected_objects.store(count as u64, Ordering::Release);
    }

    /// Counts a finished load; called after its outcome is visible (published or marked rejected).
    pub(crate) fn count_load(&self) {
        self.0.loads.fetch_add(1, Ordering::AcqRel);
    }

    /// Build durations so far.
    pub fn builds(&self) -> HistogramSnapshot {
        self.0.build.read()
    }

    /// Times from a change's arrival at the control loop to the publish that carried it.
    pub fn sync_lag(&self) -> HistogramSnapshot {
        self.0.lag.read()
    }

    /// When the last snapshot was published, in seconds since the Unix epoch.
    pub fn published_at(&self) -> Option<u64> {
        Some(self.0.published_at.load(Ordering::Acquire)).filter(|&at| at > 0)
    }

    pub(crate) fn record_build(&self, took: Duration) {
        self.0.build.record(took);
    }

    pub(crate) fn record_lag(&self, took: Duration) {
        self.0.lag.record(took);
    }

    pub(crate) fn mark_published(&self, version: u64) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
        self.0.published_at.store(now, Ordering::Release);
        self.0.version.store(version, Ordering::Release);
        self.0.ready.store(true, Ordering::Release);
    }

    pub(crate) fn mark_inputs_valid(&self) {
        self.0.rejected.store(false, Ordering::Release);
    }

    /// Sets the rejected condition before counting, so whoever sees the count change also sees it.
    pub(crate) fn mark_inputs_rejected(&self) {
        self.0.rejected.store(true, Ordering::Release);
        self.0.rejected_reloads.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_shared_between_clones_and_starts_unready() {
        let readiness = Readiness::new();
        let view = readiness.clone();
        assert!(!view.is_ready());
        assert_eq!(view.published_version(), None);
        readiness.mark_published(3);
        assert!(view.is_ready());
        assert_eq!(view.published_version(), Some(3));
    }
}
