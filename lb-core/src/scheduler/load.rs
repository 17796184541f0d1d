//! Active connection counts shared by every worker, and the least-cost scan shared by `lc`, `wlc`,
//! `sed`, `nq` and `p2c`.
//!
//! Each backend of a snapshot carries a [`BackendLoad`]: one atomic count of the connections and UDP
//! flows every worker has open to it, so the least-connection family sees the whole load as IPVS
//! does, whatever the worker count. A [`LoadRegistry`] (in [`crate::BuildOptions`]) hands every build
//! the same counter for the same [`BackendId`] while anything holds it, so counts survive snapshot
//! swaps; a backend shared by two Services counts all its connections. Reading and updating is a
//! relaxed atomic operation, never a lock: two workers picking at the same instant may both see the
//! same least-loaded backend, a transient imbalance of one connection that the next pick corrects.
//! Must never underflow or panic: closing more than was opened saturates at 0.

// foldhash: the keys are backend addresses and names from the cluster, hashed on every build;
// SipHash was a tenth of a full build. Seeded per process.
use foldhash::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{PickContext, PickState};
use crate::model::{Backend, BackendId, BackendIdx};

/// The active connections (and UDP flows) of one backend, counted by every worker. Clones share the
/// count. The datapath calls [`BackendLoad::open`] when a connection to the backend is submitted and
/// [`BackendLoad::close`] exactly once when it ends, on the handle it opened.
#[derive(Clone, Default)]
pub struct BackendLoad(Arc<AtomicU32>);

impl BackendLoad {
    /// A counter of its own, not shared with any registry (tests, hand-built entries).
    pub fn new() -> Self {
        BackendLoad::default()
    }

    pub fn open(&self) {
        // Saturating: 4 billion connections to one backend are not reachable, but wrapping would be.
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
    }

    pub fn close(&self) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Connections open now, from every worker.
    pub fn active(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the count directly (tests).
    pub fn set(&self, active: u32) {
        self.0.store(active, Ordering::Relaxed);
    }

    /// Whether `self` and `other` are the same counter.
    pub fn same_as(&self, other: &BackendLoad) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for BackendLoad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendLoad({})", self.active())
    }
}

/// A live count is not part of what a backend *is*: two snapshots with the same backends are equal
/// whatever their loads (the publisher compares builds this way).
impl PartialEq for BackendLoad {
    fn eq(&self, _: &BackendLoad) -> bool {
        true
    }
}

impl Eq for BackendLoad {}

/// Hands out one [`BackendLoad`] per key (a [`BackendId`]; the datapath counts per VIP key too),
/// the same for as long as a snapshot or a connection holds it. Clones share the registry. The
/// lock is taken per backend per build; the datapath takes it only for a VIP key's first
/// connection of a worker (it keeps the counter).
pub struct LoadRegistry<K = BackendId>(Arc<Mutex<HashMap<K, Weak<AtomicU32>>>>);

impl<K> Clone for LoadRegistry<K> {
    fn clone(&self) -> Self {
        LoadRegistry(Arc::clone(&self.0))
    }
}

impl<K> Default for LoadRegistry<K> {
    fn default() -> Self {
        LoadRegistry(Arc::default())
    }
}

impl<K: Eq + std::hash::Hash + Copy> LoadRegistry<K> {
    pub fn new() -> Self {
        LoadRegistry::default()
    }

    /// Whether `other` is this registry (a clone of it), not merely an equal one.
    pub fn same(&self, other: &LoadRegistry<K>) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The counter of `backend`: the one already handed out if anything still holds it, else a new
    /// one at 0 (a counter nobody holds counts no connection).
    pub fn counter(&self, backend: K) -> BackendLoad {
        self.counters([backend]).pop().unwrap_or_default()
    }

    /// The counters of `backends`, in order, as [`LoadRegistry::counter`] gives each, under one
    /// lock (a build asks for a port's backends at once).
    pub fn counters(&self, backends: impl IntoIterator<Item = K>) -> Vec<BackendLoad> {
        let mut counters = self.0.lock().unwrap_or_else(|e| e.into_inner());
        backends
            .into_iter()
            .map(|backend| {
                if let Some(live) = counters.get(&backend).and_then(Weak::upgrade) {
                    return BackendLoad(live);
                }
                let fresh = Arc::new(AtomicU32::new(0));
                counters.insert(backend, Arc::downgrade(&fresh));
                BackendLoad(fresh)
            })
            .collect()
    }

    /// Forgets the backends nothing holds any more (once per build, so the registry stays the size
    /// of what is served).
    pub fn prune(&self) {
        let mut counters = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counters.retain(|_, counter| counter.strong_count() > 0);
    }

    /// Backends with a live counter.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K> fmt::Debug for LoadRegistry<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.0.lock().map_or(0, |counters| counters.len());
        write!(f, "LoadRegistry({len} counters)")
    }
}

/// An eligible backend as the load-aware schedulers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub idx: BackendIdx,
    pub id: BackendId,
    /// At least 1.
    pub weight: u32,
    /// The backend's shared count of active connections.
    pub load: BackendLoad,
}

impl Member {
    /// The members for `eligible` indices into `backends` (an index outside `backends` is skipped).
    pub fn collect(backends: &[Backend], eligible: &[BackendIdx]) -> Vec<Member> {
        eligible
            .iter()
            .filter_map(|&idx| {
                backends.get(idx as usize).map(|b| Member {
                    idx,
                    id: b.id,
                    weight: b.weight.max(1),
                    load: b.load.clone(),
                })
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
/// first of equal costs, so ties rotate through the backends instead of piling onto the first one.
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
        let candidate = cost(member, u64::from(member.load.active()));
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

    fn id(port: u16) -> BackendId {
        BackendId(SocketAddr::from(([10, 0, 0, 1], port)))
    }

    #[test]
    fn counts_never_underflow_or_wrap() {
        let load = BackendLoad::new();
        load.close();
        assert_eq!(load.active(), 0);
        load.open();
        load.open();
        assert_eq!(load.active(), 2);
        for _ in 0..3 {
            load.close();
        }
        assert_eq!(load.active(), 0);
        load.set(u32::MAX);
        load.open();
        assert_eq!(load.active(), u32::MAX);
    }

    #[test]
    fn the_registry_hands_out_one_counter_per_backend_while_it_is_held() {
        let registry = LoadRegistry::new();
        let first = registry.counter(id(80));
        first.open();
        let again = registry.counter(id(80));
        assert!(again.same_as(&first), "the same backend shares one count");
        assert_eq!(again.active(), 1);
        assert!(!registry.counter(id(81)).same_as(&first));
        drop((first, again));
        registry.prune();
        assert!(registry.is_empty(), "counters nobody holds are forgotten");
        assert_eq!(registry.counter(id(80)).active(), 0);
    }

    #[test]
    fn cost_compares_fractions_exactly() {
        let c = |numerator, denominator| Cost { numerator, denominator };
        assert!(c(1, 3).lower_than(c(1, 2)));
        assert!(!c(2, 4).lower_than(c(1, 2)));
        assert!(c(u64::MAX - 1, u64::MAX).lower_than(c(1, 1)));
    }
}
