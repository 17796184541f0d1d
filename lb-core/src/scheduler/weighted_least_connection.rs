//! `wlc`: fewest active connections per unit of weight, `active / weight`
//! (IPVS `wlc` without the inactive-connection term).
//!
//! Loads are every worker's connections ([`BackendLoad`](super::BackendLoad), see `load`); ties go to
//! the first backend from the worker's cursor, so equal loads rotate. Never returns an excluded index.

use serde::Serialize;

use super::load::{Cost, Member, least_cost};
use super::{PickContext, PickState};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct WeightedLeastConnection {
    #[serde(skip)]
    members: Vec<Member>,
}

impl WeightedLeastConnection {
    pub fn build(members: Vec<Member>) -> Self {
        WeightedLeastConnection { members }
    }

    pub fn pick(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        least_cost(&self.members, context, state, |member, active| Cost {
            numerator: active,
            denominator: u64::from(member.weight),
        })
    }
}
