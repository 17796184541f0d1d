//! The worker's one slot table: items addressed by `(index, generation)`, which is what a
//! completion's `user_data` carries (see [`crate::ring::UserData`]), optionally also found by key.
//!
//! Every table of the worker is one of these: TCP connections, SCTP associations, UDP flows (the
//! flow table adds recency order and timeouts on top), and the sockets per VIP key (TCP and SCTP
//! listeners, UDP VIP sockets: [`KeyedSlots`]).
//! Invariants:
//! - a slot's generation advances (wrapping at [`GENERATION_MASK`], the bits `user_data` has for it)
//!   when its item is removed, so a completion for the item that held the slot before is recognised
//!   and ignored;
//! - freed slots are reused (last freed first) before the table grows, and the table never shrinks:
//!   nothing allocates once it has grown to its working size;
//! - with a key, `find` is one hash lookup, and a key maps to at most one *open* slot, while slots
//!   [`Slots::retire`]d (closing: their last completion has not arrived yet) keep their item but are
//!   no longer found by key, so the key can be bound again meanwhile. So a reconcile of thousands of
//!   VIP:ports is linear in the number of keys, not quadratic;
//! - with [`Pinned`] cells an item never moves while the table grows (the kernel reads connect
//!   addresses and timespecs inside connections and associations); the box of a slot is allocated
//!   once and kept when the item leaves.

use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;

use lb_core::VipKey;

use crate::ring::GENERATION_MASK;

/// Where a slot keeps its item: inline (`Option<T>`), or in a box that stays with the slot
/// ([`Pinned`]).
pub(crate) trait Cell<T> {
    fn vacant() -> Self;
    fn get(&self) -> Option<&T>;
    fn get_mut(&mut self) -> Option<&mut T>;
    fn put(&mut self, item: T);
    fn take(&mut self) -> Option<T>;
}

impl<T> Cell<T> for Option<T> {
    #[inline]
    fn vacant() -> Self {
        None
    }

    #[inline]
    fn get(&self) -> Option<&T> {
        self.as_ref()
    }

    #[inline]
    fn get_mut(&mut self) -> Option<&mut T> {
        self.as_mut()
    }

    #[inline]
    fn put(&mut self, item: T) {
        *self = Some(item);
    }

    #[inline]
    fn take(&mut self) -> Option<T> {
        Option::take(self)
    }
}

/// A cell whose item stays at one address however the table grows; the box is the slot's for good.
pub(crate) struct Pinned<T>(Box<Option<T>>);

impl<T> Cell<T> for Pinned<T> {
    #[inline]
    fn vacant() -> Self {
        Pinned(Box::new(None))
    }

    #[inline]
    fn get(&self) -> Option<&T> {
        self.0.as_ref().as_ref()
    }

    #[inline]
    fn get_mut(&mut self) -> Option<&mut T> {
        self.0.as_mut().as_mut()
    }

    #[inline]
    fn put(&mut self, item: T) {
        *self.0 = Some(item);
    }

    #[inline]
    fn take(&mut self) -> Option<T> {
        self.0.take()
    }
}

/// A key a table can find its slots by (see [`Slots::find`]).
pub(crate) trait SlotKey: Copy + Eq + Hash {}

impl SlotKey for VipKey {}

struct Slot<K, C> {
    generation: u32,
    /// The key of the item last stored here (`()` for tables without keys).
    key: K,
    item: C,
}

/// Items by slot index and generation (and by key unless `K` is `()`). See the module doc.
pub(crate) struct Slots<T, K = (), C = Option<T>> {
    slots: Vec<Slot<K, C>>,
    free: Vec<u32>,
    /// Open slots by key; always empty without keys.
    open: HashMap<K, u32>,
    len: usize,
    item: PhantomData<fn() -> T>,
}

/// The sockets of a worker per VIP key (TCP and SCTP listeners, UDP VIP sockets).
pub(crate) type KeyedSlots<T> = Slots<T, VipKey>;

impl<T, K, C> Default for Slots<T, K, C> {
    fn default() -> Self {
        Slots { slots: Vec::new(), free: Vec::new(), open: HashMap::new(), len: 0, item: PhantomData }
    }
}

impl<T, K, C: Cell<T>> Slots<T, K, C> {
    /// Stores `item` (with `key`) in a free slot or a new one; its index and generation.
    fn store(&mut self, key: K, item: T) -> (u32, u32) {
        self.len += 1;
        let index = match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.key = key;
                slot.item.put(item);
                index
            }
            None => {
                let mut cell = C::vacant();
                cell.put(item);
                self.slots.push(Slot { generation: 0, key, item: cell });
                (self.slots.len() - 1) as u32
            }
        };
        (index, self.slots[index as usize].generation)
    }

    /// Takes the item out of `index` and retires the slot's generation.
    fn vacate(&mut self, index: u32) -> Option<T> {
        let slot = self.slots.get_mut(index as usize)?;
        let item = slot.item.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(index);
        self.len -= 1;
        Some(item)
    }

    /// The item in `index` if the slot still has `generation`.
    #[inline]
    pub fn get(&self, index: u32, generation: u32) -> Option<&T> {
        let slot = self.slots.get(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.item.get()
    }

    /// The item in `index` if the slot still has `generation`.
    #[inline]
    pub fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut T> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.item.get_mut()
    }

    /// The item in `index`, whatever its generation (for callers that hold a current index).
    #[inline]
    pub fn at(&self, index: u32) -> Option<&T> {
        self.slots.get(index as usize)?.item.get()
    }

    /// The item in `index`, whatever its generation (for callers that hold a current index).
    #[inline]
    pub fn at_mut(&mut self, index: u32) -> Option<&mut T> {
        self.slots.get_mut(index as usize)?.item.get_mut()
    }

    /// The current generation of `index` (0 for a slot that does not exist).
    #[inline]
    pub fn generation(&self, index: u32) -> u32 {
        self.slots.get(index as usize).map_or(0, |s| s.generation)
    }

    /// `(index, generation, item)` of every slot in use (retired ones included), by index.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.item.get().map(|item| (i as u32, s.generation, item)))
    }

    /// `(index, item)` of every slot in use (retired ones included), by index.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| s.item.get_mut().map(|item| (i as u32, item)))
    }

    /// Replaces `out` with the `(index, generation)` of every slot in use (for walks that change
    /// the table; housekeeping only).
    pub fn live(&self, out: &mut Vec<(u32, u32)>) {
        out.clear();
        out.extend(self.iter().map(|(index, generation, _)| (index, generation)));
    }

    /// Slots in use, retired ones included.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T, C: Cell<T>> Slots<T, (), C> {
    /// Stores `item`; returns its slot index and generation.
    pub fn insert(&mut self, item: T) -> (u32, u32) {
        self.store((), item)
    }

    /// Frees `index` and returns its item.
    pub fn remove(&mut self, index: u32) -> Option<T> {
        self.vacate(index)
    }
}

impl<T, K: SlotKey, C: Cell<T>> Slots<T, K, C> {
    /// Stores `item` as the open item of `key` (replacing none: callers `find` first); returns its
    /// slot index and generation.
    pub fn insert(&mut self, key: K, item: T) -> (u32, u32) {
        let (index, generation) = self.store(key, item);
        self.open.insert(key, index);
        (index, generation)
    }

    /// The open (not retired) slot of `key`.
    #[inline]
    pub fn find(&self, key: &K) -> Option<u32> {
        self.open.get(key).copied()
    }

    /// The key of the item in `index`, if one is there.
    #[inline]
    pub fn key(&self, index: u32) -> Option<&K> {
        let slot = self.slots.get(index as usize)?;
        slot.item.get().map(|_| &slot.key)
    }

    /// Stops finding `index` by its key (it is closing); its item stays until [`Slots::remove`].
    pub fn retire(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize) else { return };
        if self.open.get(&slot.key) == Some(&index) {
            self.open.remove(&slot.key);
        }
    }

    /// Frees `index` (no longer found by key) and returns its item.
    pub fn remove(&mut self, index: u32) -> Option<T> {
        self.retire(index);
        self.vacate(index)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use lb_core::Protocol;

    use super::*;

    fn key(port: u16) -> VipKey {
        VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port, Protocol::Tcp)
    }

    #[test]
    fn keys_find_their_open_slot_and_reused_slots_get_a_new_generation() {
        let mut slots = KeyedSlots::default();
        let (a, generation) = slots.insert(key(1), "a");
        slots.insert(key(2), "b");
        assert_eq!((slots.find(&key(1)), slots.len()), (Some(a), 2));
        slots.retire(a);
        assert_eq!(slots.find(&key(1)), None, "a closing socket is not found by key");
        assert_eq!(slots.get_mut(a, generation), Some(&mut "a"), "but keeps its socket");
        let (again, _) = slots.insert(key(1), "a2");
        assert_ne!(again, a, "the key is bound again while the old slot drains");
        assert_eq!(slots.remove(a), Some("a"));
        assert_eq!(slots.find(&key(1)), Some(again), "removing the old slot keeps the new binding");
        let (reused, new_generation) = slots.insert(key(3), "c");
        assert_eq!(reused, a);
        assert_ne!(new_generation, generation);
        assert_eq!(slots.get_mut(a, generation), None, "a stale completion finds nothing");
        assert_eq!(slots.len(), 3);
    }

    #[test]
    fn thousands_of_keys_stay_consistent() {
        let mut slots = KeyedSlots::default();
        for port in 1..=5000 {
            slots.insert(key(port), port);
        }
        for port in (1..=5000).step_by(2) {
            let index = slots.find(&key(port)).expect("bound");
            assert_eq!(slots.remove(index), Some(port));
        }
        assert_eq!(slots.len(), 2500);
        assert!(
            (2..=5000).step_by(2).all(|port| slots.find(&key(port)).and_then(|i| slots.at(i)) == Some(&port))
        );
        assert_eq!(slots.slots.len(), 5000, "freed slots are reused, not appended");
        for port in 5001..=7500 {
            slots.insert(key(port), port);
        }
        assert_eq!(slots.slots.len(), 5000);
    }
}
