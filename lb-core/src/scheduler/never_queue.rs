//! `nq`: never queue (IPVS `nq`): an idle backend (0 active connections) if there is one,
//! else the shortest expected delay `(active + 1) / weight` as `sed`.
//!
//! Loads are every worker's connections ([`BackendLoad`](super::BackendLoad), see `load`); ties go to
//! the first backend from the worker's cursor, so equal loads rotate. Never returns an excluded index.

use serde::Serialize;

use super::load::{Cost, Member, least_cost};
use super::{PickContext, PickState};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct NeverQueue {
    #[serde(skip)]
    members: Vec<Member>,
}

impl NeverQueue {
    pub fn build(members: Vec<Member>) -> Self {
        NeverQueue { members }
    }

    pub fn pick(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        // An idle backend costs 0 whatever its weight, so it beats every busy one; among idle ones the
        // cursor order decides.
        least_cost(&self.members, context, state, |member, active| {
            if active == 0 {
                Cost { numerator: 0, denominator: 1 }
            } else {
                Cost { numerator: active + 1, denominator: u64::from(member.weight) }
            }
        })
    }
}
