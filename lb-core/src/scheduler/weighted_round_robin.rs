//! `wrr`: eligible backends in proportion to their weights, interleaved.
//!
//! The sequence is precomputed once per snapshot with nginx's smooth weighted round robin (each
//! round every backend gains its weight, the richest is picked and pays the total), which spreads a
//! heavy backend's turns evenly instead of sending it bursts: weights 5,1,1 give `a a b a c a a`.
//! Weights are first divided by their gcd, so one pass of the sequence holds each backend exactly
//! `weight / gcd` times. If that pass would be longer than [`MAX_SEQUENCE_LEN`], weights are scaled
//! down (every eligible backend keeps at least one slot; ratios are then approximate), so memory per
//! entry stays bounded. Picking walks the sequence with the worker's cursor (`next_in_sequence`).

use serde::Serialize;

use super::{PickContext, PickState, next_in_sequence};
use crate::model::{Backend, BackendIdx};

/// Longest precomputed sequence, unless there are more eligible backends than this (each backend then
/// appears once and weights are ignored).
pub const MAX_SEQUENCE_LEN: usize = 4096;

#[derive(Debug, Clone, Serialize)]
pub struct WeightedRoundRobin {
    // Derived from the entry's weights and eligible set, so output for people omits its 4096 slots.
    #[serde(skip)]
    sequence: Vec<BackendIdx>,
}

impl WeightedRoundRobin {
    /// Precomputes the sequence over `eligible` using `backends[i].weight` (an index outside
    /// `backends` counts as weight 1; a weight of 0 as 1).
    pub fn build(backends: &[Backend], eligible: &[BackendIdx]) -> Self {
        let weights: Vec<u64> = eligible
            .iter()
            .map(|&i| backends.get(i as usize).map_or(1, |b| u64::from(b.weight.max(1))))
            .collect();
        let weights = reduce(weights);
        if weights.iter().all(|&w| w == 1) {
            return WeightedRoundRobin { sequence: eligible.to_vec() };
        }
        WeightedRoundRobin { sequence: smooth_sequence(eligible, &weights) }
    }

    pub fn pick(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        next_in_sequence(&self.sequence, context, state)
    }

    /// One full pass of picks, as precomputed.
    pub fn sequence(&self) -> &[BackendIdx] {
        &self.sequence
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Divides by the gcd, then scales down to fit [`MAX_SEQUENCE_LEN`]: `1 + w * (MAX - n) / sum` keeps
/// every backend at least once and sums to at most `MAX`.
fn reduce(weights: Vec<u64>) -> Vec<u64> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<u64> = weights.into_iter().map(|w| w / divisor).collect();
    let sum: u64 = weights.iter().sum();
    let n = weights.len() as u64;
    let max = MAX_SEQUENCE_LEN as u64;
    if sum <= max {
        return weights;
    }
    if n >= max {
        return vec![1; weights.len()];
    }
    let scaled: Vec<u64> = weights.iter().map(|&w| 1 + w.saturating_mul(max - n) / sum).collect();
    let divisor = scaled.iter().copied().fold(0, gcd).max(1);
    scaled.into_iter().map(|w| w / divisor).collect()
}

fn smooth_sequence(eligible: &[BackendIdx], weights: &[u64]) -> Vec<BackendIdx> {
    // Weights and their sum are at most MAX_SEQUENCE_LEN here, so i64 never overflows.
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(eligible[best]);
    }
    sequence
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                Backend::ready(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16))).with_weight(weight)
            })
            .collect()
    }

    #[test]
    fn smooth_sequence_interleaves_like_nginx() {
        let wrr = WeightedRoundRobin::build(&backends(&[5, 1, 1]), &[0, 1, 2]);
        assert_eq!(wrr.sequence(), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_are_divided_by_their_gcd() {
        let wrr = WeightedRoundRobin::build(&backends(&[300, 200, 100]), &[0, 1, 2]);
        assert_eq!(wrr.sequence().len(), 6);
    }

    #[test]
    fn equal_weights_give_the_eligible_order() {
        let wrr = WeightedRoundRobin::build(&backends(&[7, 7, 7, 7]), &[0, 2, 3]);
        assert_eq!(wrr.sequence(), [0, 2, 3]);
    }

    #[test]
    fn oversized_weights_are_capped_and_keep_every_backend() {
        let wrr = WeightedRoundRobin::build(&backends(&[10_000, 9_999, 1, 2]), &[0, 1, 2, 3]);
        let sequence = wrr.sequence();
        assert!(sequence.len() <= MAX_SEQUENCE_LEN, "{}", sequence.len());
        for idx in 0..4 {
            assert!(sequence.contains(&idx), "backend {idx} lost");
        }
        let count = |idx| sequence.iter().filter(|&&i| i == idx).count();
        assert!(count(0) >= count(1) && count(1) > 1000 * count(3), "ratios roughly kept");
    }

    #[test]
    fn no_eligible_backend_gives_an_empty_sequence() {
        assert!(WeightedRoundRobin::build(&backends(&[3]), &[]).sequence().is_empty());
    }
}
