//! A worker's UDP flow table: client address (+ VIP) → flow, bounded, with least-recently-used
//! eviction and conntrack-like idle timeouts.
//!
//! Pure data structure: no sockets, no clock (every call takes `now`), so it is tested on its own.
//! Flows live in slots addressed by `(index, generation)` [`FlowHandle`]s that fit in `user_data`; a
//! slot's generation advances when its flow is removed, so a handle of a removed flow never finds its
//! successor. Slots are threaded on an intrusive doubly-linked list in recency order (head = most
//! recent), so `touch`, eviction and expiry are O(1) per flow and nothing allocates once the table
//! has grown to its working size.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_core::VipKey;

use crate::ring::GENERATION_MASK;

/// What a flow is keyed by: the VIP it was sent to and the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub vip: VipKey,
    pub client: SocketAddr,
}

/// Names one flow: slot index and the slot's generation at insertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowHandle {
    pub index: u32,
    pub generation: u32,
}

/// A flow pushed out of a full table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Evicted<V> {
    pub handle: FlowHandle,
    pub key: FlowKey,
    pub value: V,
}

/// Idle timeouts, as conntrack has them: short while the backend never answered, longer once it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowTimeouts {
    pub unreplied: Duration,
    pub replied: Duration,
}

impl FlowTimeouts {
    fn for_flow(&self, replied: bool) -> Duration {
        if replied { self.replied } else { self.unreplied }
    }
}

const NONE: u32 = u32::MAX;

struct Slot<V> {
    generation: u32,
    key: Option<FlowKey>,
    value: Option<V>,
    last_seen: Instant,
    replied: bool,
    prev: u32,
    next: u32,
}

/// Bounded flow table with LRU order. See the module doc.
pub(crate) struct FlowTable<V> {
    index: HashMap<FlowKey, u32>,
    slots: Vec<Slot<V>>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: evicted first.
    tail: u32,
    capacity: usize,
}

impl<V> FlowTable<V> {
    /// A table that holds at most `capacity` flows (at least 1).
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NONE,
            tail: NONE,
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn find(&self, key: &FlowKey) -> Option<FlowHandle> {
        let index = *self.index.get(key)?;
        Some(FlowHandle { index, generation: self.slots[index as usize].generation })
    }

    fn live(&self, handle: FlowHandle) -> Option<&Slot<V>> {
        let slot = self.slots.get(handle.index as usize)?;
        (slot.generation == handle.generation && slot.value.is_some()).then_some(slot)
    }

    pub fn get(&self, handle: FlowHandle) -> Option<&V> {
        self.live(handle)?.value.as_ref()
    }

    pub fn get_mut(&mut self, handle: FlowHandle) -> Option<&mut V> {
        self.live(handle)?;
        self.slots[handle.index as usize].value.as_mut()
    }

    /// Records traffic on a flow at `now` (a reply from the backend if `reply`), making it the most
    /// recently used.
    pub fn touch(&mut self, handle: FlowHandle, now: Instant, reply: bool) {
        if self.live(handle).is_none() {
            return;
        }
        let slot = &mut self.slots[handle.index as usize];
        slot.last_seen = now;
        slot.replied |= reply;
        self.unlink(handle.index);
        self.push_front(handle.index);
    }

    /// Inserts a new flow (the key must not be present: callers `find` first). If the table is full,
    /// the least recently used flow is evicted and returned (with its retired handle) so the caller
    /// can release what it holds.
    pub fn insert(&mut self, key: FlowKey, value: V, now: Instant) -> (FlowHandle, Option<Evicted<V>>) {
        debug_assert!(!self.index.contains_key(&key), "insert of a present flow key");
        let evicted = if self.len() >= self.capacity && self.tail != NONE {
            let handle =
                FlowHandle { index: self.tail, generation: self.slots[self.tail as usize].generation };
            self.remove(handle).map(|(key, value)| Evicted { handle, key, value })
        } else {
            None
        };
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    key: None,
                    value: None,
                    last_seen: now,
                    replied: false,
                    prev: NONE,
                    next: NONE,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.key = Some(key);
        slot.value = Some(value);
        slot.last_seen = now;
        slot.replied = false;
        let handle = FlowHandle { index, generation: slot.generation };
        self.push_front(index);
        self.index.insert(key, index);
        (handle, evicted)
    }

    /// Removes a flow, retiring its handle.
    pub fn remove(&mut self, handle: FlowHandle) -> Option<(FlowKey, V)> {
        self.live(handle)?;
        self.unlink(handle.index);
        let slot = &mut self.slots[handle.index as usize];
        let key = slot.key.take()?;
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.index.remove(&key);
        self.free.push(handle.index);
        Some((key, value))
    }

    /// Appends to `out` every flow idle past its timeout at `now`. Walks from the least recently
    /// used end and stops at the first flow younger than the shorter timeout, so the cost is the
    /// number of old flows, not the table size.
    pub fn expired(&self, now: Instant, timeouts: FlowTimeouts, out: &mut Vec<FlowHandle>) {
        let shortest = timeouts.unreplied.min(timeouts.replied);
        let mut cursor = self.tail;
        while cursor != NONE {
            let slot = &self.slots[cursor as usize];
            let idle = now.saturating_duration_since(slot.last_seen);
            if idle < shortest {
                break;
            }
            if idle >= timeouts.for_flow(slot.replied) {
                out.push(FlowHandle { index: cursor, generation: slot.generation });
            }
            cursor = slot.prev;
        }
    }

    /// Appends to `out` every flow for which `select(key, value)` holds (housekeeping only: O(n)).
    pub fn select(&self, out: &mut Vec<FlowHandle>, mut select: impl FnMut(&FlowKey, &V) -> bool) {
        for (index, slot) in self.slots.iter().enumerate() {
            let selected = match (&slot.key, &slot.value) {
                (Some(key), Some(value)) => select(key, value),
                _ => false,
            };
            if selected {
                out.push(FlowHandle { index: index as u32, generation: slot.generation });
            }
        }
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next) = {
            let slot = &self.slots[index as usize];
            (slot.prev, slot.next)
        };
        if prev != NONE {
            self.slots[prev as usize].next = next;
        } else if self.head == index {
            self.head = next;
        }
        if next != NONE {
            self.slots[next as usize].prev = prev;
        } else if self.tail == index {
            self.tail = prev;
        }
        let slot = &mut self.slots[index as usize];
        slot.prev = NONE;
        slot.next = NONE;
    }

    fn push_front(&mut self, index: u32) {
        let old_head = self.head;
        {
            let slot = &mut self.slots[index as usize];
            slot.prev = NONE;
            slot.next = old_head;
        }
        if old_head != NONE {
            self.slots[old_head as usize].prev = index;
        } else {
            self.tail = index;
        }
        self.head = index;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use lb_core::Protocol;

    use super::*;

    fn key(client_port: u16) -> FlowKey {
        FlowKey {
            vip: VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 53, Protocol::Udp),
            client: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), client_port),
        }
    }

    const TIMEOUTS: FlowTimeouts =
        FlowTimeouts { unreplied: Duration::from_secs(30), replied: Duration::from_secs(120) };

    #[test]
    fn a_flow_is_found_by_its_key_until_removed() {
        let now = Instant::now();
        let mut table = FlowTable::new(4);
        let (handle, evicted) = table.insert(key(1), "a", now);
        assert!(evicted.is_none());
        assert_eq!(table.find(&key(1)), Some(handle));
        assert_eq!(table.get(handle), Some(&"a"));
        assert_eq!(table.find(&key(2)), None);
        assert_eq!(table.remove(handle), Some((key(1), "a")));
        assert_eq!(table.find(&key(1)), None);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_removed_flows_handle_never_reaches_the_slots_next_flow() {
        let now = Instant::now();
        let mut table = FlowTable::new(4);
        let (old, _) = table.insert(key(1), 1, now);
        table.remove(old);
        let (new, _) = table.insert(key(2), 2, now);
        assert_eq!(new.index, old.index, "the slot is reused");
        assert_eq!(table.get(old), None);
        assert_eq!(table.remove(old), None);
        assert_eq!(table.get(new), Some(&2));
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_flow() {
        let now = Instant::now();
        let mut table = FlowTable::new(3);
        let (first, _) = table.insert(key(1), 1, now);
        table.insert(key(2), 2, now);
        table.insert(key(3), 3, now);
        // Flow 1 is used again, so flow 2 is now the least recently used.
        table.touch(first, now + Duration::from_secs(1), false);
        let (_, evicted) = table.insert(key(4), 4, now + Duration::from_secs(2));
        let evicted = evicted.expect("a full table evicts");
        assert_eq!((evicted.key, evicted.value), (key(2), 2));
        assert_eq!(table.get(evicted.handle), None, "the evicted flow's handle is retired");
        assert_eq!(table.len(), 3);
        let (_, evicted) = table.insert(key(5), 5, now + Duration::from_secs(3));
        assert_eq!(evicted.map(|e| (e.key, e.value)), Some((key(3), 3)));
        assert!(table.find(&key(1)).is_some());
    }

    #[test]
    fn unreplied_flows_expire_sooner_than_replied_ones() {
        let start = Instant::now();
        let mut table = FlowTable::new(8);
        let (quiet, _) = table.insert(key(1), 1, start);
        let (answered, _) = table.insert(key(2), 2, start);
        table.touch(answered, start, true);
        let mut out = Vec::new();
        table.expired(start + Duration::from_secs(29), TIMEOUTS, &mut out);
        assert!(out.is_empty());
        table.expired(start + Duration::from_secs(30), TIMEOUTS, &mut out);
        assert_eq!(out, vec![quiet]);
        out.clear();
        table.remove(quiet);
        table.expired(start + Duration::from_secs(119), TIMEOUTS, &mut out);
        assert!(out.is_empty());
        table.expired(start + Duration::from_secs(120), TIMEOUTS, &mut out);
        assert_eq!(out, vec![answered]);
    }

    #[test]
    fn traffic_postpones_expiry() {
        let start = Instant::now();
        let mut table = FlowTable::new(8);
        let (flow, _) = table.insert(key(1), (), start);
        table.touch(flow, start + Duration::from_secs(20), false);
        let mut out = Vec::new();
        table.expired(start + Duration::from_secs(40), TIMEOUTS, &mut out);
        assert!(out.is_empty());
        table.expired(start + Duration::from_secs(50), TIMEOUTS, &mut out);
        assert_eq!(out, vec![flow]);
    }

    #[test]
    fn lru_order_survives_many_touches_and_removals() {
        let start = Instant::now();
        let mut table = FlowTable::new(100);
        let handles: Vec<_> = (0..50).map(|port| table.insert(key(port), port, start).0).collect();
        // Remove every third, then touch all in reverse order (touching a removed flow is a no-op).
        for (i, &handle) in handles.iter().enumerate() {
            if i % 3 == 0 {
                table.remove(handle);
            }
        }
        for (step, &handle) in handles.iter().rev().enumerate() {
            table.touch(handle, start + Duration::from_secs(step as u64), false);
        }
        let mut out = Vec::new();
        table.expired(start + Duration::from_secs(1000), TIMEOUTS, &mut out);
        let ports: Vec<u16> = out.iter().map(|&h| *table.get(h).expect("live")).collect();
        // Expired from least to most recently used: flow 49 was touched first, flow 1 last.
        let expected: Vec<u16> = (0..50).rev().filter(|p| p % 3 != 0).collect();
        assert_eq!(ports, expected);
        assert_eq!(table.len(), expected.len());
    }

    #[test]
    fn select_finds_the_flows_of_one_vip() {
        let now = Instant::now();
        let mut table = FlowTable::new(8);
        let other_vip = VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 53, Protocol::Udp);
        let (a, _) = table.insert(key(1), 1, now);
        table.insert(FlowKey { vip: other_vip, ..key(2) }, 2, now);
        let mut out = Vec::new();
        table.select(&mut out, |k, _| k.vip == key(0).vip);
        assert_eq!(out, vec![a]);
    }
}
