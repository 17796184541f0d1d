//! Maglev tables checked by hand, and a pinned digest so the output only changes deliberately.

use std::net::SocketAddr;

use super::*;

fn backends(count: u8, weight: u32) -> Vec<Backend> {
    (1..=count).map(|i| Backend::ready(SocketAddr::from(([10, 0, 0, i], 8080))).with_weight(weight)).collect()
}

#[test]
fn seven_slot_table_of_the_paper_checked_by_hand() {
    // The paper's Table 1 permutations: B0 (offset 3, skip 4) walks 3 0 4 1 5 2 6, B1 (0, 2) walks
    // 0 2 4 6 1 3 5, B2 (3, 1) walks 3 4 5 6 0 1 2. Turns: B0→3, B1→0, B2→4 (3 taken); B0→1 (0, 4
    // taken), B1→2, B2→5; B0→6 (5, 2 taken): full.
    let params = [(3, 4), (0, 2), (3, 1)];
    assert_eq!(populate(&params, &[1, 1, 1], 7), [1, 0, 1, 0, 2, 2, 0]);
    // Without B1: B0→3, B2→4; B0→0, B2→5; B0→1 (4 taken), B2→6; B0→2 (5 taken): full. Slots 1, 3,
    // 4 and 5 keep their backend; slot 6 moves (the paper's "minimal", not zero, disruption).
    assert_eq!(populate(&[(3, 4), (3, 1)], &[1, 1], 7), [0, 0, 0, 0, 1, 1, 1]);
}

#[test]
fn weighted_eleven_slot_table_checked_by_hand() {
    // A (offset 2, skip 3, weight 2) walks 2 5 8 0 3 6 9 1 4 7 10; B (0, 4, weight 1) walks
    // 0 4 8 1 5 9 ...; C (7, 5, weight 1) walks 7 1 6 0 5 ... Targets grow by the largest weight (2)
    // per turn; a backend takes a turn in round r once r * weight reaches its target.
    // r1: A→2, B→0, C→7. r2: A→5, B→4, C→1. r3: A→8 (B and C wait: 3 < 4).
    // r4: A→3 (0 taken), B→9 (8, 1, 5 taken), C→6. r5: A→10 (6, 9, 1, 4, 7 taken): full.
    let table = populate(&[(2, 3), (0, 4), (7, 5)], &[2, 1, 1], 11);
    assert_eq!(table, [1, 2, 0, 0, 1, 0, 2, 2, 0, 1, 0]);
    let count = |p| table.iter().filter(|&&t| t == p).count();
    assert_eq!((count(0), count(1), count(2)), (5, 3, 3), "the weight-2 backend holds the most slots");
}

#[test]
fn reference_table_digest_is_pinned() {
    // Ten backends 10.0.0.1..=10:8080, weight 1, 65537 slots. If this fails, the table changed: bump
    // MAGLEV_VERSION and say why (every instance must then be upgraded together to keep agreeing).
    let backends = backends(10, 1);
    let eligible: Vec<BackendIdx> = (0..10).collect();
    let maglev = Maglev::build(&backends, &eligible, DEFAULT_TABLE_SIZE, HashKey::Ip);
    assert_eq!((maglev.version, maglev.table_size), (1, 65537));
    assert_eq!(permutation(backends[0].id, 65537), PINNED_PERMUTATION);
    assert_eq!(maglev.digest, PINNED_DIGEST, "digest {:#x}", maglev.digest);
    for idx in 0..10 {
        let slots = maglev.table().iter().filter(|&&t| t == idx).count();
        assert!(slots.abs_diff(6554) <= 66, "backend {idx} holds {slots} slots, not ~1/10 of 65537");
    }
}

const PINNED_PERMUTATION: (u32, u32) = (27452, 16927);
const PINNED_DIGEST: u64 = 0xfb9b_7652_fcfe_3544;

#[test]
fn table_sizes_are_primes_and_other_sizes_round_up_to_one() {
    for &size in TABLE_SIZES {
        assert!(is_prime(size), "{size}");
    }
    let maglev = Maglev::build(&backends(3, 1), &[0, 1, 2], 10, HashKey::Ip);
    assert_eq!(maglev.table_size, 11);
    assert_eq!(maglev.table().len(), 11);
    assert!(Maglev::build(&backends(3, 1), &[], 7, HashKey::Ip).table().is_empty());
}

#[test]
fn independently_built_tables_agree_whatever_the_index_order() {
    let a = backends(5, 1);
    let one = Maglev::build(&a, &[0, 1, 2, 3, 4], 251, HashKey::Ip);
    let two = Maglev::build(&a, &[4, 3, 2, 1, 0], 251, HashKey::Ip);
    assert_eq!(one.table(), two.table());
    assert_eq!(one.digest, two.digest);
}

/// The round-by-round population of MAGLEV_VERSION 1 as first written: the heap-ordered one must
/// give the very same tables.
fn populate_by_rounds(params: &[(u32, u32)], weights: &[u32], size: u32) -> Vec<u32> {
    const FREE: u32 = u32::MAX;
    let size64 = u64::from(size);
    let weight = |i: usize| u64::from(weights.get(i).copied().unwrap_or(1).max(1));
    let max_weight = (0..params.len()).map(weight).max().unwrap_or(1);
    let mut table = vec![FREE; size as usize];
    let (mut next, mut target) = (vec![0u64; params.len()], vec![0u64; params.len()]);
    let (mut filled, mut round) = (0u64, 0u64);
    while filled < size64 {
        round += 1;
        let mut walking = false;
        for (i, &(offset, skip)) in params.iter().enumerate() {
            if next[i] >= size64 {
                continue;
            }
            walking = true;
            if round * weight(i) < target[i] {
                continue;
            }
            target[i] += max_weight;
            while next[i] < size64 {
                let slot = ((u64::from(offset) + next[i] * u64::from(skip)) % size64) as usize;
                next[i] += 1;
                if table[slot] == FREE {
                    table[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == size64 {
                break;
            }
        }
        if !walking {
            break;
        }
    }
    for (spare, slot) in table.iter_mut().filter(|s| **s == FREE).enumerate() {
        *slot = (spare % params.len()) as u32;
    }
    table
}

#[test]
fn heap_ordered_population_equals_the_round_by_round_one() {
    let mut random = crate::hash::SplitMix64(7);
    for case in 0..300 {
        let size = [7, 11, 251, 1021, 10, 12][case % 6];
        let n = 1 + (random.next_u64() % 12) as usize;
        let params: Vec<(u32, u32)> = (0..n)
            .map(|_| {
                let offset = (random.next_u64() % u64::from(size)) as u32;
                let skip = (random.next_u64() % u64::from(size - 1)) as u32 + 1;
                (offset, skip)
            })
            .collect();
        let weights: Vec<u32> =
            (0..n).map(|_| 1 + (random.next_u64() % [1, 3, 100, 10_000][case % 4]) as u32).collect();
        assert_eq!(
            populate(&params, &weights, size),
            populate_by_rounds(&params, &weights, size),
            "case {case}: {params:?} {weights:?} size {size}"
        );
    }
}

#[test]
fn skewed_weights_cost_no_more_than_equal_ones() {
    // One backend of weight 10000 among 2000 of weight 1: the round-by-round build scanned all 2001
    // backends in each of about 65537 rounds (~1.3e8 steps); the work must stay near the table size.
    let size = DEFAULT_TABLE_SIZE;
    let n = 2001;
    let params: Vec<(u32, u32)> = (0..n)
        .map(|i| {
            permutation(BackendId(SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 80))), size)
        })
        .collect();
    let mut weights = vec![1; n];
    weights[0] = 10_000;
    let (table, work) = populate_counted(&params, &weights, size);
    assert_eq!(table.len(), size as usize);
    let bound = 32 * u64::from(size);
    assert!(work <= bound, "{work} steps for a {size}-slot table (bound {bound})");
    let (_, equal_work) = populate_counted(&params, &vec![1; n], size);
    assert!(equal_work <= bound, "{equal_work}");
}
