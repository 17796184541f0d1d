//! `rr`: every eligible backend in turn, starting where this worker left off.

use serde::Serialize;

use super::{PickRequest, PickState, next_in_sequence};
use crate::model::BackendIdx;

#[derive(Debug, Clone, Serialize)]
pub struct RoundRobin {
    sequence: Vec<BackendIdx>,
}

impl RoundRobin {
    pub fn build(eligible: &[BackendIdx]) -> Self {
        RoundRobin { sequence: eligible.to_vec() }
    }

    pub fn pick(&self, request: &PickRequest<'_>, state: &mut PickState) -> Option<BackendIdx> {
        next_in_sequence(&self.sequence, request, state)
    }
}
