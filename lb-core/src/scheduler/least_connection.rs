//! `lc`: fewest active connections; weights are ignored (IPVS `lc`,
//! counting active connections only: a userspace proxy has no "inactive" TCP state to add).
//!
//! Loads are every worker's connections ([`BackendLoad`](super::BackendLoad), see `load`); ties go to
//! the first backend from the worker's cursor, so equal loads rotate. Never returns an excluded index.

use serde::Serialize;

use super::load::{Cost, Member, least_cost};
use super::{PickContext, PickState};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct LeastConnection {
    #[serde(skip)]
    members: Vec<Member>,
}

impl LeastConnection {
    pub fn build(members: Vec<Member>) -> Self {
        LeastConnection { members }
    }

    pub fn pick(&self, context: &PickContext<'_>, state: &mut PickState) -> Option<BackendIdx> {
        least_cost(&self.members, context, state, |_, active| Cost { numerator: active, denominator: 1 })
    }
}
