//! A worker's UDP flow table: client address (+ VIP) → flow, bounded, with least-recently-used
//! eviction and conntrack-like idle timeouts that each flow takes from its Service.
//!
//! Pure data structure: no sockets, no clock (every call takes `now`), so it is tested on its own.
//! Flows live in the worker's slot table ([`crate::slots`]), addressed by `(index, generation)`
//! [`FlowHandle`]s that fit in `user_data`; a slot's generation advances when its flow is removed, so
//! a handle of a removed flow never finds its successor. Flows with the same timeouts form a class; each class threads its slots on an intrusive
//! doubly-linked list in recency order (head = most recent), so within a class recency order is
//! expiry order: `touch` is O(1), expiry costs the number of old flows, and eviction (the least
//! recently used flow of all: the oldest of the class tails) the number of classes, which is at most
//! the number of distinct timeouts in use. Nothing allocates once the table has grown to its working
//! size.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_core::VipKey;

use crate::slots::{SlotKey, Slots};

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
    /// The timeouts of a Service's flows, from its entry's policy.
    pub fn of(policy: &lb_core::EntryPolicy) -> FlowTimeouts {
        FlowTimeouts { unreplied: policy.udp_unreplied_timeout, replied: policy.udp_replied_timeout }
    }

    fn for_flow(&self, replied: bool) -> Duration {
        if replied { self.replied } else { self.unreplied }
    }

    fn shortest(&self) -> Duration {
        self.unreplied.min(self.replied)
    }
}

const NONE: u32 = u32::MAX;

impl SlotKey for FlowKey {}

/// A flow and its place in its class's recency list.
struct Entry<V> {
    value: V,
    last_seen: Instant,
    replied: bool,
    class: u16,
    prev: u32,
    next: u32,
}

/// The flows of one set of timeouts, in recency order.
struct Class {
    timeouts: FlowTimeouts,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    len: usize,
}

/// Bounded flow table with LRU order. See the module doc.
pub(crate) struct FlowTable<V> {
    slots: Slots<Entry<V>, FlowKey>,
    /// Never shrinks; an empty class is reused for the next new timeouts.
    classes: Vec<Class>,
    capacity: usize,
}

impl<V> FlowTable<V> {
    /// A table that holds at most `capacity` flows (at least 1).
    pub fn new(capacity: usize) -> Self {
        FlowTable { slots: Slots::default(), classes: Vec::new(), capacity: capacity.max(1) }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn find(&self, key: &FlowKey) -> Option<FlowHandle> {
        let index = self.slots.find(key)?;
        Some(FlowHandle { index, generation: self.slots.generation(index) })
    }

    pub fn get(&self, handle: FlowHandle) -> Option<&V> {
        self.slots.get(handle.index, handle.generation).map(|entry| &entry.value)
    }

    pub fn get_mut(&mut self, handle: FlowHandle) -> Option<&mut V> {
        self.slots.get_mut(handle.index, handle.generation).map(|entry| &mut entry.value)
    }

    /// A flow threaded on a class list; the lists hold live flows only.
    fn linked(&self, index: u32) -> &Entry<V> {
        self.slots.at(index).expect("class lists link live flows only")
    }

    fn linked_mut(&mut self, index: u32) -> &mut Entry<V> {
        self.slots.at_mut(index).expect("class lists link live flows only")
    }

    /// Records traffic on a flow at `now` (a reply from the backend if `reply`), making it the most
    /// recently used.
    pub fn touch(&mut self, handle: FlowHandle, now: Instant, reply: bool) {
        let Some(entry) = self.slots.get_mut(handle.index, handle.generation) else { return };
        entry.last_seen = now;
        entry.replied |= reply;
        self.unlink(handle.index);
        self.push_front(handle.index);
    }

    /// Inserts a new flow that expires by `timeouts` (the key must not be present: callers `find`
    /// first). If the table is full, the least recently used flow is evicted and returned (with its
    /// retired handle) so the caller can release what it holds.
    pub fn insert(
        &mut self,
        key: FlowKey,
        value: V,
        now: Instant,
        timeouts: FlowTimeouts,
    ) -> (FlowHandle, Option<Evicted<V>>) {
        debug_assert!(self.slots.find(&key).is_none(), "insert of a present flow key");
        let evicted = match self.least_recently_used() {
            Some(handle) if self.len() >= self.capacity => {
                self.remove(handle).map(|(key, value)| Evicted { handle, key, value })
            }
            _ => None,
        };
        let class = self.class_for(timeouts);
        let entry = Entry { value, last_seen: now, replied: false, class, prev: NONE, next: NONE };
        let (index, generation) = self.slots.insert(key, entry);
        self.push_front(index);
        (FlowHandle { index, generation }, evicted)
    }

    /// Removes a flow, retiring its handle.
    pub fn remove(&mut self, handle: FlowHandle) -> Option<(FlowKey, V)> {
        self.slots.get(handle.index, handle.generation)?;
        self.unlink(handle.index);
        let key = *self.slots.key(handle.index)?;
        let entry = self.slots.remove(handle.index)?;
        Some((key, entry.value))
    }

    /// Appends to `out` every flow idle past its timeout at `now`. Walks each class from its least
    /// recently used end and stops at the first flow younger than the class's shorter timeout, so
    /// the cost is the number of old flows, not the table size.
    pub fn expired(&self, now: Instant, out: &mut Vec<FlowHandle>) {
        for class in &self.classes {
            let shortest = class.timeouts.shortest();
            let mut cursor = class.tail;
            while cursor != NONE {
                let entry = self.linked(cursor);
                let idle = now.saturating_duration_since(entry.last_seen);
                if idle < shortest {
                    break;
                }
                if idle >= class.timeouts.for_flow(entry.replied) {
                    out.push(FlowHandle { index: cursor, generation: self.slots.generation(cursor) });
                }
                cursor = entry.prev;
            }
        }
    }

    /// Appends to `out` every flow for which `select(key, value)` holds (housekeeping only: O(n)).
    pub fn select(&self, out: &mut Vec<FlowHandle>, mut select: impl FnMut(&FlowKey, &V) -> bool) {
        for (index, generation, entry) in self.slots.iter() {
            if self.slots.key(index).is_some_and(|key| select(key, &entry.value)) {
                out.push(FlowHandle { index, generation });
            }
        }
    }

    /// The oldest of the class tails: the least recently used flow of the whole table.
    fn least_recently_used(&self) -> Option<FlowHandle> {
        let index = self
            .classes
            .iter()
            .filter(|class| class.tail != NONE)
            .map(|class| class.tail)
            .min_by_key(|&tail| self.linked(tail).last_seen)?;
        Some(FlowHandle { index, generation: self.slots.generation(index) })
    }

    /// The class of `timeouts`: an existing one, else an empty one reused, else a new one.
    fn class_for(&mut self, timeouts: FlowTimeouts) -> u16 {
        if let Some(found) = self.classes.iter().position(|c| c.timeouts == timeouts) {
            return found as u16;
        }
        let fresh = Class { timeouts, head: NONE, tail: NONE, len: 0 };
        if let Some(empty) = self.classes.iter().position(|c| c.len == 0) {
            self.classes[empty] = fresh;
            return empty as u16;
        }
        // More distinct timeouts than u16 classes cannot be in use at once (each needs a Service
        // and the table holds far fewer); should it happen, the last class absorbs the rest.
        if self.classes.len() > usize::from(u16::MAX) {
            return u16::MAX;
        }
        self.classes.push(fresh);
        (self.classes.len() - 1) as u16
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next, class) = {
            let entry = self.linked(index);
            (entry.prev, entry.next, usize::from(entry.class))
        };
        let class = &mut self.classes[class];
        if prev != NONE {
            self.slots.at_mut(prev).expect("class lists link live flows only").next = next;
        } else if class.head == index {
            class.head = next;
        }
        if next != NONE {
            self.slots.at_mut(next).expect("class lists link live flows only").prev = prev;
        } else if class.tail == index {
            class.tail = prev;
        }
        class.len -= 1;
        let entry = self.linked_mut(index);
        entry.prev = NONE;
        entry.next = NONE;
    }

    fn push_front(&mut self, index: u32) {
        let class_index = usize::from(self.linked(index).class);
        let class = &mut self.classes[class_index];
        let old_head = class.head;
        class.head = index;
        class.len += 1;
        if old_head == NONE {
            class.tail = index;
        }
        if old_head != NONE {
            self.slots.at_mut(old_head).expect("class lists link live flows only").prev = index;
        }
        let entry = self.linked_mut(index);
        entry.prev = NONE;
        entry.next = old_head;
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

    impl<V> FlowTable<V> {
        fn insert_default(
            &mut self,
            key: FlowKey,
            value: V,
            now: Instant,
        ) -> (FlowHandle, Option<Evicted<V>>) {
            self.insert(key, value, now, TIMEOUTS)
        }
    }

    #[test]
    fn a_flow_is_found_by_its_key_until_removed() {
        let now = Instant::now();
        let mut table = FlowTable::new(4);
        let (handle, evicted) = table.insert_default(key(1), "a", now);
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
        let (old, _) = table.insert_default(key(1), 1, now);
        table.remove(old);
        let (new, _) = table.insert_default(key(2), 2, now);
        assert_eq!(new.index, old.index, "the slot is reused");
        assert_eq!(table.get(old), None);
        assert_eq!(table.remove(old), None);
        assert_eq!(table.get(new), Some(&2));
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_flow() {
        let now = Instant::now();
        let mut table = FlowTable::new(3);
        let (first, _) = table.insert_default(key(1), 1, now);
        table.insert_default(key(2), 2, now);
        table.insert_default(key(3), 3, now);
        // Flow 1 is used again, so flow 2 is now the least recently used.
        table.touch(first, now + Duration::from_secs(1), false);
        let (_, evicted) = table.insert_default(key(4), 4, now + Duration::from_secs(2));
        let evicted = evicted.expect("a full table evicts");
        assert_eq!((evicted.key, evicted.value), (key(2), 2));
        assert_eq!(table.get(evicted.handle), None, "the evicted flow's handle is retired");
        assert_eq!(table.len(), 3);
        let (_, evicted) = table.insert_default(key(5), 5, now + Duration::from_secs(3));
        assert_eq!(evicted.map(|e| (e.key, e.value)), Some((key(3), 3)));
        assert!(table.find(&key(1)).is_some());
    }

    #[test]
    fn unreplied_flows_expire_sooner_than_replied_ones() {
        let start = Instant::now();
        let mut table = FlowTable::new(8);
        let (quiet, _) = table.insert_default(key(1), 1, start);
        let (answered, _) = table.insert_default(key(2), 2, start);
        table.touch(answered, start, true);
        let mut out = Vec::new();
        table.expired(start + Duration::from_secs(29), &mut out);
        assert!(out.is_empty());
        table.expired(start + Duration::from_secs(30), &mut out);
        assert_eq!(out, vec![quiet]);
        out.clear();
        table.remove(quiet);
        table.expired(start + Duration::from_secs(119), &mut out);
        assert!(out.is_empty());
        table.expired(start + Duration::from_secs(120), &mut out);
        assert_eq!(out, vec![answered]);
    }

    #[test]
    fn traffic_postpones_expiry() {
        let start = Instant::now();
        let mut table = FlowTable::new(8);
        let (flow, _) = table.insert_default(key(1), (), start);
        table.touch(flow, start + Duration::from_secs(20), false);
        let mut out = Vec::new();
        table.expired(start + Duration::from_secs(40), &mut out);
        assert!(out.is_empty());
        table.expired(start + Duration::from_secs(50), &mut out);
        assert_eq!(out, vec![flow]);
    }

    #[test]
    fn lru_order_survives_many_touches_and_removals() {
        let start = Instant::now();
        let mut table = FlowTable::new(100);
        let handles: Vec<_> = (0..50).map(|port| table.insert_default(key(port), port, start).0).collect();
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
        table.expired(start + Duration::from_secs(1000), &mut out);
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
        let (a, _) = table.insert_default(key(1), 1, now);
        table.insert_default(FlowKey { vip: other_vip, ..key(2) }, 2, now);
        let mut out = Vec::new();
        table.select(&mut out, |k, _| k.vip == key(0).vip);
        assert_eq!(out, vec![a]);
    }

    #[test]
    fn each_flow_expires_by_its_own_services_timeouts() {
        let start = Instant::now();
        let mut table = FlowTable::new(8);
        let short = FlowTimeouts { unreplied: Duration::from_secs(2), replied: Duration::from_secs(5) };
        let (dns, _) = table.insert(key(1), "dns", start, short);
        let (game, _) = table.insert_default(key(2), "game", start);
        let (dns_answered, _) = table.insert(key(3), "dns answered", start, short);
        table.touch(dns_answered, start, true);
        let mut out = Vec::new();
        table.expired(start + Duration::from_secs(2), &mut out);
        assert_eq!(out, vec![dns], "the short-lived Service's unanswered flow only");
        out.clear();
        table.expired(start + Duration::from_secs(5), &mut out);
        assert_eq!(out, vec![dns, dns_answered]);
        out.clear();
        table.expired(start + Duration::from_secs(30), &mut out);
        assert!(out.contains(&game) && out.len() == 3, "{out:?}");
    }

    #[test]
    fn eviction_takes_the_least_recently_used_flow_across_classes_and_classes_are_reused() {
        let start = Instant::now();
        let mut table = FlowTable::new(2);
        let short = FlowTimeouts { unreplied: Duration::from_secs(2), replied: Duration::from_secs(5) };
        let (old, _) = table.insert(key(1), 1, start, short);
        let (young, _) = table.insert_default(key(2), 2, start + Duration::from_secs(1));
        table.touch(old, start + Duration::from_secs(2), false);
        let (_, evicted) = table.insert_default(key(3), 3, start + Duration::from_secs(3));
        assert_eq!(evicted.map(|e| e.key), Some(key(2)), "the flow of the other class was older");
        assert_eq!(table.get(young), None);
        table.remove(old);
        let other = FlowTimeouts { unreplied: Duration::from_secs(7), replied: Duration::from_secs(7) };
        table.insert(key(4), 4, start, other);
        assert_eq!(table.classes.len(), 2, "the emptied class was reused");
    }
}
