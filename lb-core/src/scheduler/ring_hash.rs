//! `ring-hash`: a consistent hash ring (Karger et al.; ketama-style virtual nodes) over the client
//! hash.
//!
//! Each eligible backend gets [`POINTS_PER_WEIGHT`] points per unit of (gcd-reduced) weight, scaled
//! down so the ring holds at most [`MAX_POINTS`] (every backend keeps at least one); point `r` of a
//! backend is XXH64 of its canonical address bytes and `r`. A client goes to the first point at or
//! after its hash, wrapping; when that backend is excluded, to the next point's. Removing a backend
//! moves only the keys of its own arcs. Built once per snapshot; same on every instance.

use std::sync::Arc;

use serde::Serialize;

use super::{HashKey, PickContext};
use crate::hash::{encode_socket_addr, seed, xxh64};
use crate::model::{Backend, BackendIdx};

/// Ring points per unit of weight (before scaling down to [`MAX_POINTS`]).
pub const POINTS_PER_WEIGHT: u64 = 160;

/// Most points a ring holds (unless there are more backends; each then has one).
pub const MAX_POINTS: u64 = 1 << 17;

#[derive(Debug, Clone, Serialize)]
pub struct RingHash {
    pub hash_key: HashKey,
    #[serde(skip)]
    ring: Arc<[(u64, BackendIdx)]>,
    #[serde(skip)]
    eligible: Arc<[BackendIdx]>,
}

impl RingHash {
    pub fn build(backends: &[Backend], eligible: &[BackendIdx], hash_key: HashKey) -> Self {
        let members: Vec<(BackendIdx, &Backend)> =
            eligible.iter().filter_map(|&idx| backends.get(idx as usize).map(|b| (idx, b))).collect();
        let divisor = members.iter().map(|(_, b)| u64::from(b.weight.max(1))).fold(0, gcd).max(1);
        let total: u64 = members.iter().map(|(_, b)| u64::from(b.weight.max(1)) / divisor).sum();
        let points_of = |weight: u64| {
            let w = weight / divisor;
            if total.saturating_mul(POINTS_PER_WEIGHT) <= MAX_POINTS {
                w * POINTS_PER_WEIGHT
            } else {
                (w.saturating_mul(MAX_POINTS) / total.max(1)).max(1)
            }
        };
        let mut ring = Vec::new();
        for &(idx, backend) in &members {
            let mut bytes = [0u8; 22];
            let mut addr = [0u8; 18];
            let len = encode_socket_addr(backend.id.0, &mut addr);
            bytes[..len].copy_from_slice(&addr[..len]);
            for replica in 0..points_of(u64::from(backend.weight.max(1))) {
                bytes[len..len + 4].copy_from_slice(&(replica as u32).to_le_bytes());
                ring.push((xxh64(&bytes[..len + 4], seed::RING_NODE), idx));
            }
        }
        ring.sort_unstable();
        RingHash { hash_key, ring: ring.into(), eligible: members.iter().map(|m| m.0).collect() }
    }

    pub fn pick(&self, context: &PickContext<'_>) -> Option<BackendIdx> {
        if self.ring.is_empty() || self.eligible.iter().all(|&idx| context.excluded(idx)) {
            return None;
        }
        let hash = self.hash_key.hash(context.client);
        let start = self.ring.partition_point(|&(point, _)| point < hash);
        (0..self.ring.len())
            .map(|step| self.ring[(start + step) % self.ring.len()].1)
            .find(|&idx| !context.excluded(idx))
    }

    /// Number of points on the ring.
    pub fn points(&self) -> usize {
        self.ring.len()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
