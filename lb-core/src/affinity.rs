//! Session affinity (`sessionAffinity: ClientIP`): a client keeps the backend of its last new
//! connection while it connects again within the entry's timeout.
//!
//! An [`AffinityTable`] is a plain single-threaded table; the datapath shares one set of them
//! between all its workers (sharded by client IP, each shard behind a lock taken only for entries
//! with affinity), so the promise holds whichever worker a client's connection or flow lands on. It
//! is keyed by (`VipKey`, client IP) and stores [`BackendId`]s, so it survives snapshot swaps: a
//! lookup is honoured only while that backend is still eligible in the current entry. Sans-IO:
//! every call takes `now`. Bounded: when full, the entry expiring soonest (the oldest, for equal
//! timeouts) is evicted. Call order: `lookup` before picking; `record` after every new connection the
//! entry's scheduler or affinity chose; `expire` at `next_deadline()` (or whenever convenient).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::model::{BackendId, BackendIdx, ServiceEntry, VipKey};
use crate::scheduler::{PickContext, PickState};

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10_800);

/// kube-proxy's limit for `timeoutSeconds` (one day).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

type Key = (VipKey, IpAddr);

#[derive(Debug, Clone, Copy)]
struct Slot {
    backend: BackendId,
    expires: Instant,
    seq: u64,
}

/// Client IP → backend with expiry, per worker. See the module doc.
#[derive(Debug, Clone)]
pub struct AffinityTable {
    capacity: usize,
    slots: BTreeMap<Key, Slot>,
    /// The same slots ordered by expiry (then insertion), for `expire` and eviction.
    by_expiry: BTreeSet<(Instant, u64, Key)>,
    seq: u64,
}

impl AffinityTable {
    /// A table holding at most `capacity` clients (at least 1).
    pub fn new(capacity: usize) -> Self {
        AffinityTable {
            capacity: capacity.max(1),
            slots: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            seq: 0,
        }
    }

    /// The backend `client` is bound to in `entry`, if the binding has not expired at `now`, the
    /// entry still has affinity, and the backend is still eligible there.
    pub fn lookup(&self, now: Instant, client: IpAddr, entry: &ServiceEntry) -> Option<BackendIdx> {
        entry.traffic.session_affinity?;
        let slot = self.slots.get(&(entry.key, client.to_canonical()))?;
        if slot.expires <= now {
            return None;
        }
        let idx = entry.index_of(slot.backend)?;
        entry.is_eligible(idx).then_some(idx)
    }

    /// Binds `client` to `backend` of `entry` until `now` plus the entry's affinity timeout; does
    /// nothing for an entry without affinity or an index that is not one of its backends.
    pub fn record(&mut self, now: Instant, client: IpAddr, entry: &ServiceEntry, backend: BackendIdx) {
        let (Some(timeout), Some(backend)) = (entry.traffic.session_affinity, entry.backend(backend)) else {
            return;
        };
        self.record_id(now, entry.key, client, backend.id, timeout);
    }

    /// [`AffinityTable::record`] by key and identity.
    pub fn record_id(
        &mut self,
        now: Instant,
        key: VipKey,
        client: IpAddr,
        backend: BackendId,
        timeout: Duration,
    ) {
        let key = (key, client.to_canonical());
        let Some(expires) = now.checked_add(timeout) else { return };
        if let Some(old) = self.slots.remove(&key) {
            self.by_expiry.remove(&(old.expires, old.seq, key));
        }
        while self.slots.len() >= self.capacity {
            let Some((_, _, oldest)) = self.by_expiry.pop_first() else { break };
            self.slots.remove(&oldest);
        }
        self.seq += 1;
        let slot = Slot { backend, expires, seq: self.seq };
        self.slots.insert(key, slot);
        self.by_expiry.insert((expires, slot.seq, key));
    }

    /// The backend for a new connection to `entry`: the client's binding when it is still valid and
    /// not excluded, else the entry's scheduler; the choice is then (re)recorded, so an entry with
    /// affinity keeps each client on its backend while it stays eligible. Without affinity this is
    /// exactly [`crate::Scheduler::pick_with`].
    pub fn pick(
        &mut self,
        now: Instant,
        entry: &ServiceEntry,
        context: &PickContext<'_>,
        state: &mut PickState,
    ) -> Option<BackendIdx> {
        if entry.traffic.session_affinity.is_none() {
            return entry.scheduler.pick_with(context, state);
        }
        let client = context.client.ip();
        let bound = self.lookup(now, client, entry).filter(|idx| !context.exclude.contains(idx));
        let chosen = bound.or_else(|| entry.scheduler.pick_with(context, state))?;
        self.record(now, client, entry, chosen);
        Some(chosen)
    }

    /// Drops every binding expired at `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some(&(expires, _, key)) = self.by_expiry.first() {
            if expires > now {
                break;
            }
            self.by_expiry.pop_first();
            self.slots.remove(&key);
            dropped += 1;
        }
        dropped
    }

    /// When the next binding expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_expiry.first().map(|&(expires, _, _)| expires)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests;
