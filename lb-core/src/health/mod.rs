//! Health beyond Kubernetes readiness: active checks ([`ActiveChecker`]), passive outlier detection
//! ([`OutlierDetector`]) and the [`HealthOverlay`] their verdicts become.
//!
//! Both machines are sans-IO (quinn's vocabulary): `handle_*(now, input)` feeds events,
//! `poll_*(now)` drains effects (probes to start), `next_deadline()` says when to call back. They
//! never touch a socket or a clock; the control thread probes and keeps time. Their verdicts are
//! collected into a `HealthOverlay`, an input of [`crate::build`] (through
//! [`crate::BuildOptions::health`]), so a snapshot and its health are published together.
//!
//! Panic mode (as Envoy's panic threshold at 100%): an overlay never empties a set of backends.
//! When every otherwise-eligible backend of an entry is unhealthy, all of them stay eligible, since
//! a health check that fails everywhere more likely says the check is wrong than that every
//! backend is down, and refusing every client is the worse failure.

mod active;
mod events;
mod outlier;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::{BackendId, ObjectRef};

pub use active::{ActiveChecker, HealthCheckConfig, JITTER_PERCENT, ProbeKind, ProbeRequest, jittered};
pub use events::{BackendEvent, BackendOutcome};
pub use outlier::{OutlierConfig, OutlierDetector};

/// A health verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

/// Backends to keep out of new connections, globally or for one Service. Applied when building
/// (see the module doc for panic mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthOverlay {
    global: BTreeSet<BackendId>,
    per_service: BTreeMap<ObjectRef, BTreeSet<BackendId>>,
}

impl HealthOverlay {
    pub fn new() -> Self {
        HealthOverlay::default()
    }

    /// Marks `backend` unhealthy for every Service (e.g. its host is unreachable).
    pub fn mark_global(&mut self, backend: BackendId) {
        self.global.insert(backend);
    }

    /// Marks `backend` unhealthy for `service` only (its checks and ejections are per Service).
    pub fn mark(&mut self, service: &ObjectRef, backend: BackendId) {
        self.per_service.entry(service.clone()).or_default().insert(backend);
    }

    /// Marks every backend of `backends` unhealthy for `service`, e.g. from
    /// [`ActiveChecker::unhealthy`] or [`OutlierDetector::ejected`].
    pub fn extend(&mut self, service: &ObjectRef, backends: impl IntoIterator<Item = BackendId>) {
        for backend in backends {
            self.mark(service, backend);
        }
    }

    pub fn is_unhealthy(&self, service: &ObjectRef, backend: BackendId) -> bool {
        self.global.contains(&backend) || self.per_service.get(service).is_some_and(|s| s.contains(&backend))
    }

    pub fn is_empty(&self) -> bool {
        self.global.is_empty() && self.per_service.values().all(BTreeSet::is_empty)
    }
}

#[cfg(test)]
mod tests;
