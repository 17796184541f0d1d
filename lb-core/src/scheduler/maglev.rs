//! `maglev`: the lookup table of Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer" (NSDI 2016), section 3.4, version [`MAGLEV_VERSION`].
//!
//! A pure function of the eligible backends (taken in identity order) and a prime table size `M`:
//! each backend's permutation is `offset = h1(id) % M`, `skip = h2(id) % (M - 1) + 1`,
//! `slot_j = (offset + j * skip) % M`, with `h1`, `h2` XXH64 of the backend's canonical address bytes
//! under two seeds ([`crate::hash::seed`]); backends take turns claiming their next free slot until
//! the table is full. Weights give heavier backends more turns (as Envoy does: a backend takes a
//! turn in round `r` once `r * weight` reaches its running target, which grows by the largest weight
//! per turn), so its share of slots is proportional to its weight. Lookup hashes the client
//! ([`super::HashKey`]) to a slot. Any change to this output is a new version: the tests pin
//! hand-checked 7- and 11-slot tables and a digest of a 65537-slot reference table.
//!
//! Must never be built per pick: the table is built once per snapshot and shared (`Arc`).

use std::sync::Arc;

use serde::Serialize;

use super::{HashKey, PickContext, walk_table};
use crate::hash::{encode_socket_addr, seed, xxh64};
use crate::model::{Backend, BackendId, BackendIdx};

/// Bumped whenever the table for given backends and size changes.
pub const MAGLEV_VERSION: u32 = 1;

/// Table size unless `ringlb.io/maglev-table-size` says otherwise; the paper's prime.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// The table sizes `ringlb.io/maglev-table-size` accepts: primes, each roughly 4x the previous. The
/// paper advises `M` well above 100x the backend count for an even spread (within about 1%).
pub const TABLE_SIZES: &[u32] = &[251, 1021, 4093, 16381, 65537, 131071, 262139];

#[derive(Debug, Clone, Serialize)]
pub struct Maglev {
    pub version: u32,
    pub table_size: u32,
    pub hash_key: HashKey,
    /// XXH64 of the table, to compare instances (`ringlb check --json`) without shipping the table.
    pub digest: u64,
    #[serde(skip)]
    table: Arc<[BackendIdx]>,
    #[serde(skip)]
    eligible: Arc<[BackendIdx]>,
}

impl Maglev {
    /// Builds the table over `eligible` indices into `backends` (sorted by identity, as an entry's
    /// backends are). A `table_size` that is not prime is raised to the next prime (the permutation
    /// is only a full cycle for a prime); the builder only passes [`TABLE_SIZES`].
    pub fn build(backends: &[Backend], eligible: &[BackendIdx], table_size: u32, hash_key: HashKey) -> Self {
        let size = next_prime(table_size.max(2));
        let mut members: Vec<(BackendId, BackendIdx, u32)> = eligible
            .iter()
            .filter_map(|&idx| backends.get(idx as usize).map(|b| (b.id, idx, b.weight.max(1))))
            .collect();
        members.sort_unstable();
        let params: Vec<(u32, u32)> = members.iter().map(|m| permutation(m.0, size)).collect();
        let weights: Vec<u32> = members.iter().map(|m| m.2).collect();
        let table: Arc<[BackendIdx]> = populate(&params, &weights, size)
            .into_iter()
            .map(|position| members[position as usize].1)
            .collect();
        let digest = table_digest(&table);
        let eligible = members.iter().map(|m| m.1).collect();
        Maglev { version: MAGLEV_VERSION, table_size: size, hash_key, digest, table, eligible }
    }

    pub fn pick(&self, context: &PickContext<'_>) -> Option<BackendIdx> {
        let slot = (self.hash_key.hash(context.client) % u64::from(self.table_size)) as usize;
        walk_table(&self.table, &self.eligible, slot, context)
    }

    /// The lookup table: one backend index per slot (empty when nothing is eligible).
    pub fn table(&self) -> &[BackendIdx] {
        &self.table
    }
}

/// A backend's `(offset, skip)` in a table of prime `size`.
pub fn permutation(id: BackendId, size: u32) -> (u32, u32) {
    let mut bytes = [0u8; 18];
    let len = encode_socket_addr(id.0, &mut bytes);
    let size = u64::from(size.max(2));
    let offset = xxh64(&bytes[..len], seed::MAGLEV_OFFSET) % size;
    let skip = xxh64(&bytes[..len], seed::MAGLEV_SKIP) % (size - 1) + 1;
    (offset as u32, skip as u32)
}

/// Fills a table of prime `size` from each backend's `(offset, skip)` and weight; the result holds,
/// per slot, the position of its backend in `params`. Empty when `params` is.
pub fn populate(params: &[(u32, u32)], weights: &[u32], size: u32) -> Vec<u32> {
    populate_counted(params, weights, size).0
}

/// [`populate`], and the work it took: turns taken plus permutation steps walked. The turns are
/// drawn from a heap in (round, backend) order, so skewed weights cost nothing extra: the work is
/// O(size log n) turns plus the walks, which the permutations bound (each backend walks its own at
/// most once; about size * ln(size) in all for random permutations), whatever the weights. A
/// round-by-round scan would instead cost rounds * n, with rounds up to size * max/sum of weights.
pub fn populate_counted(params: &[(u32, u32)], weights: &[u32], size: u32) -> (Vec<u32>, u64) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const FREE: u32 = u32::MAX;
    if params.is_empty() || size == 0 {
        return (Vec::new(), 0);
    }
    let size64 = u64::from(size);
    let weight = |i: usize| u64::from(weights.get(i).copied().unwrap_or(1).max(1));
    let max_weight = (0..params.len()).map(weight).max().unwrap_or(1);
    // Backend i takes at most one turn per round, its k-th (k from 0) in the first round r after
    // its previous turn's with r * weight >= k * max_weight (its target grows by the largest weight
    // per turn): round max(k + 1, ceil(k * max_weight / weight)). Within a round backends go in
    // order: the heap yields turns in exactly that (round, backend) order.
    let round_of = |i: usize, turn: u64| (turn * max_weight).div_ceil(weight(i)).max(turn + 1);
    let mut turns: BinaryHeap<Reverse<(u64, usize, u64)>> =
        (0..params.len()).map(|i| Reverse((round_of(i, 0), i, 0))).collect();
    let mut table = vec![FREE; size as usize];
    // `next[i]`: how far backend i has walked its permutation.
    let mut next = vec![0u64; params.len()];
    let mut filled = 0u64;
    let mut work = 0u64;
    while filled < size64 {
        let Some(Reverse((_, i, turn))) = turns.pop() else {
            // Only reachable for a non-prime size (every permutation walked without filling).
            break;
        };
        work += 1;
        let (offset, skip) = params[i];
        while next[i] < size64 {
            let slot = ((u64::from(offset) + next[i] * u64::from(skip)) % size64) as usize;
            next[i] += 1;
            work += 1;
            if table[slot] == FREE {
                table[slot] = i as u32;
                filled += 1;
                break;
            }
        }
        if next[i] < size64 {
            turns.push(Reverse((round_of(i, turn + 1), i, turn + 1)));
        }
    }
    // Slots no permutation reached (non-prime size only) go to the backends in turn.
    for (spare, slot) in table.iter_mut().filter(|s| **s == FREE).enumerate() {
        *slot = (spare % params.len()) as u32;
    }
    (table, work)
}

fn table_digest(table: &[BackendIdx]) -> u64 {
    let bytes: Vec<u8> = table.iter().flat_map(|idx| idx.to_le_bytes()).collect();
    xxh64(&bytes, 0)
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

fn next_prime(n: u32) -> u32 {
    (n..=u32::MAX).find(|&c| is_prime(c)).unwrap_or(DEFAULT_TABLE_SIZE)
}

#[cfg(test)]
mod tests;
