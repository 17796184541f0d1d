//! `sh`: source hashing (IPVS `sh`): the client's hash picks a slot of a precomputed bucket table.
//!
//! The table is the `wrr` smooth sequence of the eligible backends (each backend holds `weight / gcd`
//! slots, at most [`super::MAX_SEQUENCE_LEN`] in all), so weights are honoured and the table is the
//! same on every instance given the same backends. Like IPVS it is modulo hashing: a change in the
//! backend set remaps most clients (use `maglev` or `ring-hash` for minimal disruption). An excluded
//! backend's clients go to the next slot's backend.

use std::sync::Arc;

use serde::Serialize;

use super::{HashKey, PickContext, WeightedRoundRobin, walk_table};
use crate::model::{Backend, BackendIdx};

#[derive(Debug, Clone, Serialize)]
pub struct SourceHash {
    pub hash_key: HashKey,
    #[serde(skip)]
    buckets: Arc<[BackendIdx]>,
    #[serde(skip)]
    eligible: Arc<[BackendIdx]>,
}

impl SourceHash {
    pub fn build(backends: &[Backend], eligible: &[BackendIdx], hash_key: HashKey) -> Self {
        let buckets = WeightedRoundRobin::build(backends, eligible).sequence().into();
        SourceHash { hash_key, buckets, eligible: eligible.into() }
    }

    pub fn pick(&self, context: &PickContext<'_>) -> Option<BackendIdx> {
        let len = self.buckets.len().max(1) as u64;
        let slot = (self.hash_key.hash(context.client) % len) as usize;
        walk_table(&self.buckets, &self.eligible, slot, context)
    }

    /// The bucket table, one slot per weight unit.
    pub fn buckets(&self) -> &[BackendIdx] {
        &self.buckets
    }
}
