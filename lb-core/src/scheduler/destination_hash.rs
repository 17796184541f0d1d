//! `dh`: destination hashing (IPVS `dh`): the hash of the address the client connected to picks a
//! slot of the same weighted bucket table as `sh`.
//!
//! IPVS meant the packet's destination, which in a transparent cache cluster varies per request.
//! Here a client connects to a VIP, so the destination is the entry's own VIP and port
//! ([`PickContext::destination`]): every new connection of one entry goes to one backend, chosen by
//! hash and the same on every instance; when it fails or is excluded the next slot's backend takes
//! over. That is an active/standby pair (or chain) without configuration. `ringlb.io/hash-key`
//! decides whether the port is hashed too.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use super::{HashKey, PickContext, WeightedRoundRobin, walk_table};
use crate::hash::{hash_ip, hash_socket_addr, seed, xxh64};
use crate::model::{Backend, BackendIdx};

#[derive(Debug, Clone, Serialize)]
pub struct DestinationHash {
    pub hash_key: HashKey,
    #[serde(skip)]
    buckets: Arc<[BackendIdx]>,
    #[serde(skip)]
    eligible: Arc<[BackendIdx]>,
}

impl DestinationHash {
    pub fn build(backends: &[Backend], eligible: &[BackendIdx], hash_key: HashKey) -> Self {
        let buckets = WeightedRoundRobin::build(backends, eligible).sequence().into();
        DestinationHash { hash_key, buckets, eligible: eligible.into() }
    }

    pub fn pick(&self, context: &PickContext<'_>) -> Option<BackendIdx> {
        let len = self.buckets.len().max(1) as u64;
        let slot = (self.destination_hash(context.destination) % len) as usize;
        walk_table(&self.buckets, &self.eligible, slot, context)
    }

    fn destination_hash(&self, destination: Option<SocketAddr>) -> u64 {
        match (destination, self.hash_key) {
            (None, _) => xxh64(&[], seed::LOOKUP),
            (Some(addr), HashKey::Ip) => hash_ip(addr.ip(), seed::LOOKUP),
            (Some(addr), HashKey::IpPort) => hash_socket_addr(addr, seed::LOOKUP),
        }
    }
}
