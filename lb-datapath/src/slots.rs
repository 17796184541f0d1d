//! A worker's sockets per VIP key (TCP and SCTP listeners, UDP VIP sockets): slots addressed by
//! index and generation in `user_data`, found by key in O(1).
//!
//! Why keyed: a worker reconciles every published snapshot against its sockets, and with thousands
//! of VIP:ports a scan per key (or per free slot) made each publish quadratic. Here `find` is one
//! hash lookup, `insert` reuses a freed slot from a free list, and `len` is a counter, so a
//! reconcile is linear in the number of keys.
//! Invariants: a slot's generation advances whenever it is reused, so a completion for the socket
//! that held it before is recognised and ignored; a key maps to at most one *open* slot, while
//! slots [`KeyedSlots::retire`]d (closing: their last completion has not arrived yet) keep their
//! socket but are no longer found by key, so the key can be bound again meanwhile.

use std::collections::HashMap;

use lb_core::VipKey;

use crate::ring::GENERATION_MASK;

struct Slot<T> {
    generation: u32,
    key: VipKey,
    item: Option<T>,
}

/// Sockets by slot and by key. See the module doc.
pub(crate) struct KeyedSlots<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    open: HashMap<VipKey, u32>,
    len: usize,
}

impl<T> Default for KeyedSlots<T> {
    fn default() -> Self {
        KeyedSlots { slots: Vec::new(), free: Vec::new(), open: HashMap::new(), len: 0 }
    }
}

impl<T> KeyedSlots<T> {
    /// Stores `item` as the open socket of `key` (replacing none: callers `find` first); returns its
    /// slot index and generation.
    pub fn insert(&mut self, key: VipKey, item: T) -> (u32, u32) {
        self.len += 1;
        let index = match self.free.pop() {
            Some(index) => {
                let slot = &mut self.slots[index as usize];
                slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
                slot.key = key;
                slot.item = Some(item);
                index
            }
            None => {
                self.slots.push(Slot { generation: 0, key, item: Some(item) });
                (self.slots.len() - 1) as u32
            }
        };
        self.open.insert(key, index);
        (index, self.slots[index as usize].generation)
    }

    /// The socket in `index` if it still has `generation`.
    pub fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut T> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.item.as_mut()
    }

    /// The socket in `index`, whatever its generation (for callers that hold a current index).
    pub fn at(&self, index: u32) -> Option<&T> {
        self.slots.get(index as usize)?.item.as_ref()
    }

    pub fn generation(&self, index: u32) -> u32 {
        self.slots.get(index as usize).map_or(0, |s| s.generation)
    }

    /// The open (not retired) slot of `key`.
    pub fn find(&self, key: &VipKey) -> Option<u32> {
        self.open.get(key).copied()
    }

    /// Stops finding `index` by its key (it is closing); its socket stays until [`KeyedSlots::remove`].
    pub fn retire(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize) else { return };
        if self.open.get(&slot.key) == Some(&index) {
            self.open.remove(&slot.key);
        }
    }

    /// Frees `index` and returns its socket.
    pub fn remove(&mut self, index: u32) -> Option<T> {
        self.retire(index);
        let item = self.slots.get_mut(index as usize)?.item.take()?;
        self.free.push(index);
        self.len -= 1;
        Some(item)
    }

    /// `(index, socket)` of every slot in use, retired ones included.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| s.item.as_mut().map(|item| (i as u32, item)))
    }

    /// Slots in use, retired ones included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
