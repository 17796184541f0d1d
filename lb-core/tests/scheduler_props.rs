//! Property tests of the schedulers' contract: weights honoured, every backend reached, `exclude`
//! respected.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use lb_core::scheduler::MAX_SEQUENCE_LEN;
use lb_core::{Backend, BackendIdx, PickRequest, PickState, Scheduler, SchedulerKind};
use proptest::prelude::*;

fn backends(weights: &[u32]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            Backend::ready(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16))).with_weight(weight)
        })
        .collect()
}

fn client() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

fn picks(scheduler: &Scheduler, count: usize, exclude: &[BackendIdx]) -> BTreeMap<BackendIdx, usize> {
    let mut state = PickState::default();
    let request = PickRequest { client: client(), exclude };
    let mut counts = BTreeMap::new();
    for _ in 0..count {
        if let Some(idx) = scheduler.pick(&request, &mut state) {
            *counts.entry(idx).or_insert(0) += 1;
        }
    }
    counts
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A backend set and a subset of its indices that is eligible (ascending, never empty).
fn weighted_set() -> impl Strategy<Value = (Vec<u32>, Vec<BackendIdx>)> {
    prop::collection::vec(1u32..=10_000, 1..40).prop_flat_map(|weights| {
        let n = weights.len();
        (Just(weights), prop::collection::btree_set(0..n as BackendIdx, 1..=n))
            .prop_map(|(w, eligible)| (w, eligible.into_iter().collect()))
    })
}

proptest! {
    #[test]
    fn wrr_one_pass_holds_each_backend_exactly_weight_over_gcd_times(
        (weights, eligible) in weighted_set().prop_filter("fits one pass", |(w, e)| {
            let g = e.iter().map(|&i| w[i as usize]).fold(0, gcd);
            e.iter().map(|&i| (w[i as usize] / g) as usize).sum::<usize>() <= MAX_SEQUENCE_LEN
        })
    ) {
        let backends = backends(&weights);
        let scheduler = Scheduler::build(SchedulerKind::WeightedRoundRobin, &backends, &eligible);
        let g = eligible.iter().map(|&i| weights[i as usize]).fold(0, gcd);
        let pass: usize = eligible.iter().map(|&i| (weights[i as usize] / g) as usize).sum();
        let counts = picks(&scheduler, pass, &[]);
        for &idx in &eligible {
            prop_assert_eq!(counts.get(&idx).copied().unwrap_or(0), (weights[idx as usize] / g) as usize);
        }
        prop_assert_eq!(counts.len(), eligible.len());
    }

    #[test]
    fn wrr_many_picks_follow_the_weights_and_reach_every_backend((weights, eligible) in weighted_set()) {
        let backends = backends(&weights);
        let scheduler = Scheduler::build(SchedulerKind::WeightedRoundRobin, &backends, &eligible);
        let total_weight: u64 = eligible.iter().map(|&i| u64::from(weights[i as usize])).sum();
        // Prime, so the picks end mid-pass and the interleaving (not only whole passes) is checked.
        let rounds = 20_011;
        let counts = picks(&scheduler, rounds, &[]);
        prop_assert_eq!(counts.len(), eligible.len(), "every eligible backend is picked");
        for &idx in &eligible {
            let share = counts[&idx] as f64 / rounds as f64;
            let expected = f64::from(weights[idx as usize]) / total_weight as f64;
            // Capping a pass to MAX slots (n backends) moves a share by at most 1/(MAX-n) up or
            // n/MAX of itself down; a partial pass adds a few picks of slack.
            let n = eligible.len() as f64;
            let max = MAX_SEQUENCE_LEN as f64;
            let tolerance = 1.0 / (max - n) + expected * n / max + 0.002;
            prop_assert!(
                (share - expected).abs() <= tolerance,
                "backend {} share {} expected {} (weights {:?})", idx, share, expected, weights
            );
        }
    }

    #[test]
    fn rr_cycles_through_all_eligible_in_each_pass(eligible in prop::collection::btree_set(0u32..500, 0..60)) {
        let eligible: Vec<BackendIdx> = eligible.into_iter().collect();
        let scheduler = Scheduler::build(SchedulerKind::RoundRobin, &backends(&[1; 500]), &eligible);
        let mut state = PickState::default();
        let request = PickRequest { client: client(), exclude: &[] };
        for _ in 0..3 {
            let pass: Vec<_> = (0..eligible.len()).filter_map(|_| scheduler.pick(&request, &mut state)).collect();
            prop_assert_eq!(&pass, &eligible);
        }
    }

    #[test]
    fn pick_never_returns_an_excluded_backend_and_none_only_when_all_are(
        (weights, eligible) in weighted_set(),
        exclude_mask in prop::collection::vec(any::<bool>(), 40),
        wrr in any::<bool>(),
        start in any::<u64>(),
    ) {
        let kind = if wrr { SchedulerKind::WeightedRoundRobin } else { SchedulerKind::RoundRobin };
        let scheduler = Scheduler::build(kind, &backends(&weights), &eligible);
        let exclude: Vec<BackendIdx> =
            eligible.iter().copied().filter(|&i| exclude_mask[i as usize]).collect();
        let mut state = PickState::default();
        // A stale cursor from an older snapshot must be harmless.
        for _ in 0..(start % 17) {
            scheduler.pick(&PickRequest { client: client(), exclude: &[] }, &mut state);
        }
        let request = PickRequest { client: client(), exclude: &exclude };
        for _ in 0..50 {
            match scheduler.pick(&request, &mut state) {
                Some(idx) => {
                    prop_assert!(!exclude.contains(&idx));
                    prop_assert!(eligible.contains(&idx));
                }
                None => prop_assert_eq!(exclude.len(), eligible.len()),
            }
        }
    }
}
