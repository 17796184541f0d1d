//! `wrr`: eligible backends in proportion to their weights, interleaved (TODO: helper fills in).

use serde::Serialize;

use super::{PickRequest, PickState, next_in_sequence};
use crate::model::{Backend, BackendIdx};

#[derive(Debug, Clone, Serialize)]
pub struct WeightedRoundRobin {
    sequence: Vec<BackendIdx>,
}

impl WeightedRoundRobin {
    pub fn build(_backends: &[Backend], eligible: &[BackendIdx]) -> Self {
        WeightedRoundRobin { sequence: eligible.to_vec() }
    }

    pub fn pick(&self, request: &PickRequest<'_>, state: &mut PickState) -> Option<BackendIdx> {
        next_in_sequence(&self.sequence, request, state)
    }
}
