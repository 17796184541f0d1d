//! `rr`: every eligible backend in turn, starting where this worker left off.
//!
//! The sequence is the eligible indices in ascending (backend identity) order; each worker walks it
//! with its own cursor, so workers spread independently and never share state.

use serde::Serialize;

use super::{PickContext, PickState, next_in_sequence};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct RoundRobin {
    // Derived from the entry's eligible set, so output for people (`ringlb check --json`) omits it.
    #[serde(skip)]
    sequence: Vec<BackendIdx>,
}

impl RoundRobin {
    pub fn build(eligible: &[BackendIdx]) -> Self {
        RoundRobin { sequence: eligible.to_vec() }
    }

    pub fn pick(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        next_in_sequence(&self.sequence, context, state)
    }

    /// One full pass of picks.
    pub fn sequence(&self) -> &[BackendIdx] {
        &self.sequence
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_through_every_eligible_backend_in_order() {
        let rr = RoundRobin::build(&[1, 4, 6]);
        let request = PickContext::new(([127, 0, 0, 1], 5000).into(), &[]);
        let mut state = PickState::default();
        let picks: Vec<_> = (0..7).filter_map(|_| rr.pick(&request, &mut state)).collect();
        assert_eq!(picks, [1, 4, 6, 1, 4, 6, 1]);
    }

    #[test]
    fn skips_excluded_and_gives_none_when_all_are_excluded() {
        let rr = RoundRobin::build(&[1, 4, 6]);
        let mut state = PickState::default();
        let client = ([127, 0, 0, 1], 5000).into();
        for _ in 0..5 {
            assert_eq!(rr.pick(&PickContext::new(client, &[1, 6]), &mut state), Some(4));
        }
        assert_eq!(rr.pick(&PickContext::new(client, &[6, 4, 1]), &mut state), None);
        assert_eq!(RoundRobin::build(&[]).pick(&PickContext::new(client, &[]), &mut state), None);
    }
}
