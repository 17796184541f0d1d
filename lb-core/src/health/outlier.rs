//! Passive outlier detection: consecutive connect failures or resets reported by the datapath eject
//! a backend for a back-off that doubles with each ejection (capped), but never more than
//! `max_ejection_percent` of the Service's backends at once (rounded down: with 50%, one of two or
//! three, none of one).
//!
//! Call order: `set_backends` when the Service's backends change; `handle_success(now, ..)` /
//! `handle_failure(now, ..)` per connection outcome; `handle_timeout(now)` at `next_deadline()`
//! returns the backends whose ejection ended. An ejection count decays: a backend that has gone
//! `max_ejection` without being ejected starts over at the base back-off. Sans-IO.
//!
//! A detector holds state only for the backends that failed since they last recovered (a sorted
//! list of the tracked ones besides): with 100,000 backends and none failing, a few bytes each.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::model::BackendId;

/// Outlier detection parameters, from the `ringlb.io/outlier-*` and `ringlb.io/max-ejection-percent`
/// annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct OutlierConfig {
    /// Consecutive failures that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection's length; each further one doubles it.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most backends of a Service ejected at once, in percent (0..=100).
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// The length of ejection number `ejections` (1 for the first).
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        let factor = 1u32.checked_shl(ejections.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base_ejection.saturating_mul(factor).min(self.max_ejection.max(self.base_ejection))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
struct State {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    released_at: Option<Instant>,
}

/// Outlier detection over one Service's backends. See the module doc.
#[derive(Debug, Clone)]
pub struct OutlierDetector {
    config: OutlierConfig,
    /// The tracked backends, sorted, each once.
    tracked: Vec<BackendId>,
    /// The tracked backends whose state is not the default one.
    backends: BTreeMap<BackendId, State>,
}

impl OutlierDetector {
    pub fn new(config: OutlierConfig) -> Self {
        OutlierDetector { config, tracked: Vec::new(), backends: BTreeMap::new() }
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// Tracks exactly `backends`, keeping the state of those already tracked.
    pub fn set_backends(&mut self, backends: impl IntoIterator<Item = BackendId>) {
        let mut tracked: Vec<BackendId> = backends.into_iter().collect();
        tracked.sort_unstable();
        tracked.dedup();
        tracked.shrink_to_fit();
        self.backends.retain(|backend, _| tracked.binary_search(backend).is_ok());
        self.tracked = tracked;
    }

    fn tracks(&self, backend: &BackendId) -> bool {
        self.tracked.binary_search(backend).is_ok()
    }

    /// A connection to `backend` was established and not reset.
    pub fn handle_success(&mut self, now: Instant, backend: BackendId) {
        let max = self.config.max_ejection;
        let Some(state) = self.backends.get_mut(&backend) else { return };
        state.consecutive = 0;
        if state.ejected_until.is_none() && state.released_at.is_some_and(|at| now >= at + max) {
            state.ejections = 0;
            state.released_at = None;
        }
        if *state == State::default() {
            self.backends.remove(&backend);
        }
    }

    /// A connect to `backend` failed or was reset; returns true when this ejects it.
    pub fn handle_failure(&mut self, now: Instant, backend: BackendId) -> bool {
        let ejected = self.ejected().count();
        let limit = self.max_ejected();
        let config = self.config;
        if !self.tracks(&backend) {
            return false;
        }
        let state = self.backends.entry(backend).or_default();
        if state.ejected_until.is_some() {
            return false;
        }
        state.consecutive = state.consecutive.saturating_add(1);
        if state.consecutive < config.consecutive_failures.max(1) || ejected >= limit {
            return false;
        }
        state.ejections = state.ejections.saturating_add(1);
        state.ejected_until = Some(now + config.ejection_time(state.ejections));
        state.consecutive = 0;
        true
    }

    /// Ends every ejection due at `now`; returns the backends released.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<BackendId> {
        let mut released = Vec::new();
        for (&backend, state) in &mut self.backends {
            if state.ejected_until.is_some_and(|until| until <= now) {
                state.ejected_until = None;
                state.released_at = Some(now);
                released.push(backend);
            }
        }
        released
    }

    /// When the next ejection ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backends.values().filter_map(|s| s.ejected_until).min()
    }

    pub fn is_ejected(&self, backend: BackendId) -> bool {
        self.backends.get(&backend).is_some_and(|s| s.ejected_until.is_some())
    }

    pub fn ejected(&self) -> impl Iterator<Item = BackendId> + '_ {
        self.backends.iter().filter(|(_, s)| s.ejected_until.is_some()).map(|(&id, _)| id)
    }

    /// How many backends may be ejected at once.
    pub fn max_ejected(&self) -> usize {
        self.tracked.len() * usize::from(self.config.max_ejection_percent.min(100)) / 100
    }
}
