//! Backend selection: a closed set of schedulers behind one enum.
//!
//! A [`Scheduler`] is built once per snapshot from an entry's backends (everything that can be
//! precomputed is, e.g. the weighted round-robin sequence) and then only read. Mutable selection state
//! lives in the datapath worker as a [`PickState`] per entry, so workers never share a cache line on
//! the hot path and a snapshot swap never invalidates it (a stale cursor is simply taken modulo).
//!
//! Contract of [`Scheduler::pick`]: it returns an index from `eligible` that is not in
//! `request.exclude`, or `None` when every eligible backend is excluded or there is none. Callers retry a
//! failed connect by calling `pick` again with the failed backend added to `exclude`.

mod round_robin;
mod weighted_round_robin;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::Serialize;

use crate::model::{Backend, BackendIdx};

pub use round_robin::RoundRobin;
pub use weighted_round_robin::{MAX_SEQUENCE_LEN, WeightedRoundRobin};

/// Which scheduler a service uses, as named in the `ringlb.io/scheduler` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// `rr`: each eligible backend in turn.
    #[default]
    RoundRobin,
    /// `wrr`: each eligible backend in proportion to its weight, interleaved.
    WeightedRoundRobin,
}

impl SchedulerKind {
    pub const ALL: &'static [SchedulerKind] = &[SchedulerKind::RoundRobin, SchedulerKind::WeightedRoundRobin];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::RoundRobin => "rr",
            SchedulerKind::WeightedRoundRobin => "wrr",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not one of [`SchedulerKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (known: rr, wrr)")]
pub struct UnknownScheduler(pub String);

impl FromStr for SchedulerKind {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| UnknownScheduler(s.to_owned()))
    }
}

/// What the datapath knows about a new connection or flow when it asks for a backend.
#[derive(Debug, Clone, Copy)]
pub struct PickRequest<'a> {
    /// The client's address (for hashing schedulers and affinity).
    pub client: SocketAddr,
    /// Backends already tried for this connection; never returned again.
    pub exclude: &'a [BackendIdx],
}

/// Per-worker, per-entry mutable selection state. Owned by one worker; never shared.
#[derive(Debug, Clone, Default)]
pub struct PickState {
    pub(crate) cursor: u64,
}

/// A scheduler with its per-snapshot precomputed data.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Scheduler {
    RoundRobin(RoundRobin),
    WeightedRoundRobin(WeightedRoundRobin),
}

impl Scheduler {
    /// Precomputes a scheduler of `kind` over `eligible` indices into `backends`.
    pub fn build(kind: SchedulerKind, backends: &[Backend], eligible: &[BackendIdx]) -> Scheduler {
        match kind {
            SchedulerKind::RoundRobin => Scheduler::RoundRobin(RoundRobin::build(eligible)),
            SchedulerKind::WeightedRoundRobin => {
                Scheduler::WeightedRoundRobin(WeightedRoundRobin::build(backends, eligible))
            }
        }
    }

    pub fn kind(&self) -> SchedulerKind {
        match self {
            Scheduler::RoundRobin(_) => SchedulerKind::RoundRobin,
            Scheduler::WeightedRoundRobin(_) => SchedulerKind::WeightedRoundRobin,
        }
    }

    /// Picks a backend for a new connection; see the module doc for the contract.
    pub fn pick(&self, request: &PickRequest<'_>, state: &mut PickState) -> Option<BackendIdx> {
        match self {
            Scheduler::RoundRobin(s) => s.pick(request, state),
            Scheduler::WeightedRoundRobin(s) => s.pick(request, state),
        }
    }
}

/// Walks `sequence` from the state's cursor and returns the first index not excluded, advancing the
/// cursor past it. Shared by the sequence-based schedulers (rr, wrr).
pub(crate) fn next_in_sequence(
    sequence: &[BackendIdx],
    request: &PickRequest<'_>,
    state: &mut PickState,
) -> Option<BackendIdx> {
    let len = sequence.len() as u64;
    if len == 0 {
        return None;
    }
    for step in 0..len {
        let position = (state.cursor.wrapping_add(step)) % len;
        let candidate = sequence[position as usize];
        if !request.exclude.contains(&candidate) {
            state.cursor = position + 1;
            return Some(candidate);
        }
    }
    None
}
