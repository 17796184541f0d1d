//! A cheap, cloneable view of a source's progress for the admin endpoint (`/readyz`) and logs.
//!
//! Written by the control loop and its source, read from anywhere without locks. "Ready" means the initial
//! snapshot has been handed to the sink; it never goes back to false, because after that a bad edit
//! keeps the previous snapshot serving (see [`Readiness::inputs_rejected`] for that condition).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shared progress of one source; clones observe the same state.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<State>);

#[derive(Debug, Default)]
struct State {
    ready: AtomicBool,
    /// Version of the last published snapshot (meaningful once `ready`).
    version: AtomicU64,
    rejected: AtomicBool,
    rejected_reloads: AtomicU64,
    rejected_objects: AtomicU64,
    loads: AtomicU64,
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

    pub(crate) fn mark_published(&self, version: u64) {
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
