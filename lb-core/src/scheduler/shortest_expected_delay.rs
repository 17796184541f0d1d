//! `sed`: shortest expected delay, `(active + 1) / weight` (IPVS `sed`):
//! unlike `wlc`, an idle light backend does not tie with an idle heavy one.
//!
//! Loads are every worker's connections ([`BackendLoad`](super::BackendLoad), see `load`); ties go to
//! the first backend from the worker's cursor, so equal loads rotate. Never returns an excluded index.

use serde::Serialize;

use super::load::{Cost, Member, least_cost};
use super::{PickContext, PickState};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct ShortestExpectedDelay {
    #[serde(skip)]
    members: Vec<Member>,
}

impl ShortestExpectedDelay {
    pub fn build(members: Vec<Member>) -> Self {
        ShortestExpectedDelay { members }
    }

    pub fn pick(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        least_cost(&self.members, context, state, |member, active| Cost {
            numerator: active + 1,
            denominator: u64::from(member.weight),
        })
    }
}
