//! `p2c`: the power of two random choices (Mitzenmacher): two eligible backends drawn from the
//! pick's random value, the one with fewer active connections per unit of weight wins (the first
//! on a tie).
//!
//! Randomness is an input ([`PickContext::random`]), never a thread RNG, so picks are reproducible.
//! An excluded draw moves to the next eligible backend not excluded; so with retries the two choices
//! may coincide, which only loses the comparison, never the contract.

use serde::Serialize;

use super::PickContext;
use super::load::{Cost, Member};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct PowerOfTwoChoices {
    #[serde(skip)]
    members: Vec<Member>,
}

/// The two distinct positions in `0..n` that `random` draws (both 0 when `n` is 1). The low 32 bits
/// draw the first, the high 32 bits the second (Lemire's multiply-shift: no modulo bias worth noting
/// below 2^16 members).
pub fn two_choices(random: u64, n: usize) -> (usize, usize) {
    if n <= 1 {
        return (0, 0);
    }
    let n = n as u64;
    let first = ((random & 0xFFFF_FFFF) * n) >> 32;
    let mut second = ((random >> 32) * (n - 1)) >> 32;
    if second >= first {
        second += 1;
    }
    (first as usize, second as usize)
}

impl PowerOfTwoChoices {
    pub fn build(members: Vec<Member>) -> Self {
        PowerOfTwoChoices { members }
    }

    pub fn pick(&self, context: &PickContext<'_>) -> Option<BackendIdx> {
        let (first, second) = two_choices(context.random, self.members.len());
        let first = self.first_allowed(first, context)?;
        let second = self.first_allowed(second, context)?;
        let cost = |m: &Member| Cost { numerator: context.active(m), denominator: u64::from(m.weight) };
        let winner = if cost(second).lower_than(cost(first)) { second } else { first };
        Some(winner.idx)
    }

    fn first_allowed(&self, start: usize, context: &PickContext<'_>) -> Option<&Member> {
        let len = self.members.len();
        (0..len).map(|step| &self.members[(start + step) % len]).find(|m| !context.excluded(m.idx))
    }
}
