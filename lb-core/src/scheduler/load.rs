//! Per-worker active connection counts and the least-cost scan shared by `lc`, `wlc`, `sed`, `nq`
//! and `p2c`.
//!
//! Counts are per worker: each worker counts only the connections it opened, so a backend's
//! "load" is this worker's share of it. With the kernel spreading accepts evenly over workers (one
//! `SO_REUSEPORT` listener each) that share approximates global load divided by the worker count, and
//! it costs no cross-core lock or shared cache line. Counts are keyed by [`BackendId`], not by index,
//! so they survive snapshot swaps; a backend shared by two Services counts all its connections.
//! Must never underflow or panic: closing more than was opened saturates at 0.

use std::collections::BTreeMap;

use super::{PickContext, PickState};
use crate::model::{Backend, BackendId, BackendIdx};

/// One worker's active connections per backend. The datapath calls [`LoadTable::open`] when a
/// connection to a backend is established (or its connect is submitted) and [`LoadTable::close`]
/// exactly once when it ends.
#[derive(Debug, Clone, Default)]
pub struct LoadTable {
    // A BTreeMap (not a HashMap): deterministic, no random keys, and a handful of backends per worker.
    active: BTreeMap<BackendId, u32>,
}

impl LoadTable {
    pub fn new() -> Self {
        LoadTable::default()
    }

    pub fn open(&mut self, backend: BackendId) {
        let count = self.active.entry(backend).or_insert(0);
        *count = count.saturating_add(1);
    }

    pub fn close(&mut self, backend: BackendId) {
        if let Some(count) = self.active.get_mut(&backend) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.active.remove(&backend);
            }
        }
    }

    /// Active connections to `backend` opened by this worker.
    pub fn active(&self, backend: BackendId) -> u32 {
        self.active.get(&backend).copied().unwrap_or(0)
    }

    /// Sets a count directly (tests, or a worker restoring state).
    pub fn set(&mut self, backend: BackendId, active: u32) {
        if active == 0 {
            self.active.remove(&backend);
        } else {
            self.active.insert(backend, active);
        }
    }

    /// Backends with at least one active connection.
    pub fn iter(&self) -> impl Iterator<Item = (BackendId, u32)> + '_ {
        self.active.iter().map(|(&id, &n)| (id, n))
    }
}

/// An eligible backend as the load-aware schedulers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub idx: BackendIdx,
    pub id: BackendId,
    /// At least 1.
    pub weight: u32,
}

impl Member {
    /// The members for `eligible` indices into `backends` (an index outside `backends` is skipped).
    pub fn collect(backends: &[Backend], eligible: &[BackendIdx]) -> Vec<Member> {
        eligible
            .iter()
            .filter_map(|&idx| {
                backends.get(idx as usize).map(|b| Member { idx, id: b.id, weight: b.weight.max(1) })
            })
            .collect()
    }
}

/// A cost as an exact fraction `numerator / denominator` (denominator > 0), compared by
/// cross-multiplication so weights never lose precision to division.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cost {
    pub numerator: u64,
    pub denominator: u64,
}

impl Cost {
    pub fn lower_than(self, other: Cost) -> bool {
        u128::from(self.numerator) * u128::from(other.denominator)
            < u128::from(other.numerator) * u128::from(self.denominator)
    }
}

/// The member of least `cost` not excluded. The scan starts at the worker's cursor and keeps the
/// first of equal costs, so ties rotate through the backends instead of piling onto the first one
/// (every worker starts with all counts at 0).
pub(crate) fn least_cost(
    members: &[Member],
    context: &PickContext<'_>,
    state: &mut PickState,
    cost: impl Fn(&Member, u64) -> Cost,
) -> Option<BackendIdx> {
    let len = members.len();
    if len == 0 {
        return None;
    }
    let start = (state.cursor % len as u64) as usize;
    let mut best: Option<(usize, Cost)> = None;
    for step in 0..len {
        let position = (start + step) % len;
        let member = &members[position];
        if context.excluded(member.idx) {
            continue;
        }
        let candidate = cost(member, context.active(member));
        if best.is_none_or(|(_, current)| candidate.lower_than(current)) {
            best = Some((position, candidate));
        }
    }
    let (position, _) = best?;
    state.cursor = position as u64 + 1;
    Some(members[position].idx)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn counts_never_underflow_and_vanish_at_zero() {
        let id = BackendId(SocketAddr::from(([10, 0, 0, 1], 80)));
        let mut load = LoadTable::new();
        load.close(id);
        assert_eq!(load.active(id), 0);
        load.open(id);
        load.open(id);
        assert_eq!(load.active(id), 2);
        load.close(id);
        load.close(id);
        load.close(id);
        assert_eq!(load.active(id), 0);
        assert_eq!(load.iter().count(), 0);
    }

    #[test]
    fn cost_compares_fractions_exactly() {
        let c = |numerator, denominator| Cost { numerator, denominator };
        assert!(c(1, 3).lower_than(c(1, 2)));
        assert!(!c(2, 4).lower_than(c(1, 2)));
        assert!(c(u64::MAX - 1, u64::MAX).lower_than(c(1, 1)));
    }
}
