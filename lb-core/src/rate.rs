//! Per-client connection rate limits: a token bucket per (VIP key, client IP) that admits a new
//! connection when it holds a token, refilled at the entry's rate up to its burst.
//!
//! A [`RateTable`] is a plain single-threaded table; the datapath shares a set of them between its
//! workers (sharded by client IP, each shard behind a lock taken only for entries with a rate), so
//! the limit holds for a client whichever worker its connections land on. Sans-IO: every call
//! takes `now`. Bounded: at capacity, buckets that have refilled (equivalent to no bucket) are
//! dropped first, then the least recently used one; so a flood of distinct clients costs memory up
//! to the capacity and never denies a client that would have a full bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use serde::Serialize;

use crate::model::VipKey;

/// A client's allowance of new connections to one VIP key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClientRate {
    /// Tokens added per second (≥ 1).
    pub per_second: u32,
    /// Tokens a bucket holds at most: the connections a client may open at once after a pause (≥ 1).
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant, rate: ClientRate) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst.max(1)))
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct RateTable {
    capacity: usize,
    buckets: HashMap<(VipKey, IpAddr), Bucket>,
}

impl RateTable {
    /// A table of at most `capacity` buckets (at least 1).
    pub fn new(capacity: usize) -> RateTable {
        RateTable { capacity: capacity.max(1), buckets: HashMap::new() }
    }

    /// Whether `client` may open a new connection to `key` at `now` under `rate`; takes a token if so.
    pub fn admit(&mut self, now: Instant, key: VipKey, client: IpAddr, rate: ClientRate) -> bool {
        let burst = f64::from(rate.burst.max(1));
        let id = (key, client.to_canonical());
        if !self.buckets.contains_key(&id) && self.buckets.len() >= self.capacity {
            self.make_room(now, rate);
        }
        let bucket = self.buckets.entry(id).or_insert(Bucket { tokens: burst, at: now });
        let tokens = bucket.refilled(now, rate);
        *bucket = Bucket { tokens, at: now };
        if tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops every bucket that refilled by `now` (as if under `rate`; another key's rate may
    /// differ, a bucket idle for longer than its burst takes is full at any rate ≥ 1/s), or else
    /// the one unused longest.
    fn make_room(&mut self, now: Instant, rate: ClientRate) {
        let before = self.buckets.len();
        self.buckets.retain(|_, bucket| bucket.refilled(now, rate) < f64::from(rate.burst.max(1)));
        if self.buckets.len() < before {
            return;
        }
        if let Some(oldest) = self.buckets.iter().min_by_key(|(_, bucket)| bucket.at).map(|(id, _)| *id) {
            self.buckets.remove(&oldest);
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::model::Protocol;

    fn key(port: u16) -> VipKey {
        VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port, Protocol::Tcp)
    }

    fn client(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
    }

    #[test]
    fn a_client_gets_its_burst_then_the_rate_and_other_clients_and_keys_are_apart() {
        let rate = ClientRate { per_second: 10, burst: 3 };
        let mut table = RateTable::new(16);
        let start = crate::testing::origin();
        let admitted = (0..5).filter(|_| table.admit(start, key(80), client(1), rate)).count();
        assert_eq!(admitted, 3, "the burst");
        assert!(table.admit(start, key(80), client(2), rate), "another client has its own bucket");
        assert!(table.admit(start, key(443), client(1), rate), "another key has its own bucket");
        // 10/s: one token per 100 ms.
        assert!(!table.admit(start + Duration::from_millis(50), key(80), client(1), rate));
        assert!(table.admit(start + Duration::from_millis(160), key(80), client(1), rate));
        assert!(!table.admit(start + Duration::from_millis(170), key(80), client(1), rate));
        // A long pause refills to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..5).filter(|_| table.admit(later, key(80), client(1), rate)).count(), 3);
    }

    #[test]
    fn a_full_table_drops_refilled_buckets_first_and_never_denies_a_new_client() {
        let rate = ClientRate { per_second: 1, burst: 2 };
        let mut table = RateTable::new(2);
        let start = crate::testing::origin();
        assert!(table.admit(start, key(80), client(1), rate));
        for _ in 0..2 {
            table.admit(start, key(80), client(2), rate);
        }
        assert!(!table.admit(start, key(80), client(2), rate), "client 2 used its burst");
        // Client 1 refilled by now; client 3 takes its place, client 2 stays limited.
        let now = start + Duration::from_millis(1500);
        assert!(table.admit(now, key(80), client(3), rate));
        assert_eq!(table.len(), 2);
        assert!(table.admit(now, key(80), client(2), rate), "1.5 s gave client 2 one token");
        assert!(!table.admit(now, key(80), client(2), rate));
        // With no refilled bucket, the least recently used goes: a new client is never denied.
        assert!(table.admit(now, key(80), client(4), rate));
        assert_eq!(table.len(), 2);
    }
}
