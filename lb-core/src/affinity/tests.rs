//! Affinity expiry, eligibility and eviction with explicit instants.

use std::net::IpAddr;

use super::*;
use crate::model::TrafficPolicy;
use crate::testing::{at, backend_id, entry, origin};

fn affine(ready: &[bool], timeout: u64) -> ServiceEntry {
    entry(ready, TrafficPolicy { session_affinity: Some(Duration::from_secs(timeout)), ..Default::default() })
}

fn client(last: u8) -> IpAddr {
    IpAddr::from([198, 51, 100, last])
}

#[test]
fn binding_holds_until_its_timeout_then_expires() {
    let t0 = origin();
    let web = affine(&[true, true, true], 60);
    let mut table = AffinityTable::new(16);
    table.record(t0, client(1), &web, 2);
    assert_eq!(table.lookup(at(t0, 59), client(1), &web), Some(2));
    assert_eq!(table.lookup(at(t0, 60), client(1), &web), None, "expired exactly at the timeout");
    assert_eq!(table.lookup(at(t0, 1), client(2), &web), None, "other clients are not bound");
    assert_eq!(table.next_deadline(), Some(at(t0, 60)));
    assert_eq!(table.expire(at(t0, 59)), 0);
    assert_eq!(table.expire(at(t0, 60)), 1);
    assert!(table.is_empty());
}

#[test]
fn recording_again_extends_the_binding() {
    let t0 = origin();
    let web = affine(&[true, true], 60);
    let mut table = AffinityTable::new(16);
    table.record(t0, client(1), &web, 0);
    table.record(at(t0, 50), client(1), &web, 1);
    assert_eq!(table.lookup(at(t0, 100), client(1), &web), Some(1));
    assert_eq!(table.len(), 1);
    assert_eq!(table.expire(at(t0, 100)), 0, "the first binding's expiry is gone with it");
}

#[test]
fn binding_to_a_backend_no_longer_eligible_is_not_honoured() {
    let t0 = origin();
    let mut table = AffinityTable::new(16);
    table.record(t0, client(1), &affine(&[true, true], 60), 1);
    // The next snapshot: backend 2 (index 1) turned not ready, then came back.
    assert_eq!(table.lookup(at(t0, 1), client(1), &affine(&[true, false], 60)), None);
    assert_eq!(table.lookup(at(t0, 2), client(1), &affine(&[true, true], 60)), Some(1));
    // A snapshot where the backend is gone and indices shifted: never a wrong index.
    let mut shifted = affine(&[true], 60);
    let mut backends = shifted.backends.to_vec();
    backends[0].id = backend_id(9);
    shifted.backends = backends.into();
    assert_eq!(table.lookup(at(t0, 3), client(1), &shifted), None);
}

#[test]
fn entries_without_affinity_record_and_honour_nothing() {
    let t0 = origin();
    let plain = entry(&[true], TrafficPolicy::default());
    let mut table = AffinityTable::new(16);
    table.record(t0, client(1), &plain, 0);
    assert!(table.is_empty());
    table.record(t0, client(1), &affine(&[true], 60), 0);
    assert_eq!(table.lookup(t0, client(1), &plain), None);
}

#[test]
fn a_full_table_evicts_the_binding_expiring_soonest() {
    let t0 = origin();
    let web = affine(&[true, true], 60);
    let mut table = AffinityTable::new(2);
    table.record(t0, client(1), &web, 0);
    table.record(at(t0, 1), client(2), &web, 1);
    table.record(at(t0, 2), client(3), &web, 0);
    assert_eq!(table.len(), 2);
    assert_eq!(table.lookup(at(t0, 3), client(1), &web), None, "oldest evicted");
    assert_eq!(table.lookup(at(t0, 3), client(2), &web), Some(1));
    assert_eq!(table.lookup(at(t0, 3), client(3), &web), Some(0));
}

#[test]
fn ipv4_mapped_clients_share_the_ipv4_binding() {
    let t0 = origin();
    let web = affine(&[true, true], 60);
    let mut table = AffinityTable::new(4);
    table.record(t0, "::ffff:198.51.100.1".parse().expect("addr"), &web, 1);
    assert_eq!(table.lookup(t0, client(1), &web), Some(1));
}

#[test]
fn pick_keeps_a_client_on_its_backend_and_moves_it_when_excluded() {
    let t0 = origin();
    let web = affine(&[true, true, true], 60);
    let mut table = AffinityTable::new(16);
    let mut state = crate::PickState::default();
    let from = |port| std::net::SocketAddr::new(client(1), port);
    let first =
        table.pick(t0, &web, &crate::PickContext::new(from(1000), &[]), &mut state).expect("eligible");
    for port in 1001..1010 {
        let again = table.pick(at(t0, 1), &web, &crate::PickContext::new(from(port), &[]), &mut state);
        assert_eq!(again, Some(first), "round robin would move on; affinity keeps the backend");
    }
    let retry = table.pick(at(t0, 2), &web, &crate::PickContext::new(from(2000), &[first]), &mut state);
    assert!(retry.is_some_and(|idx| idx != first));
    assert_eq!(table.lookup(at(t0, 2), client(1), &web), retry, "the retry's backend is the new binding");

    let plain = entry(&[true, true], TrafficPolicy::default());
    let a = table.pick(t0, &plain, &crate::PickContext::new(from(1), &[]), &mut state);
    let b = table.pick(t0, &plain, &crate::PickContext::new(from(1), &[]), &mut state);
    assert_ne!(a, b, "without affinity the scheduler (round robin) decides alone");
}
