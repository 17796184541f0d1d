use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::model::{Backend, EndpointConditions, Placement, Protocol, TrafficPolicy, VipKey};
use crate::testing::{entry, origin};

const TIMEOUT: Duration = Duration::from_millis(300);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn nodes(names: &[&str]) -> BTreeSet<Arc<str>> {
    names.iter().map(|n| Arc::from(*n)).collect()
}

fn any(ips: impl IntoIterator<Item = IpAddr>) -> BTreeMap<IpAddr, Candidates> {
    ips.into_iter().map(|ip| (ip, Candidates::Any)).collect()
}

/// An entry on `vip`:80/`protocol` whose backends sit on `on` (node, ready).
fn placed(vip: IpAddr, protocol: Protocol, local: bool, on: &[(&str, bool)]) -> ServiceEntry {
    let mut entry =
        entry(&vec![true; on.len()], TrafficPolicy { node_local: local, ..TrafficPolicy::default() });
    entry.key = VipKey::new(vip, 80, protocol);
    let backends: Vec<Backend> = entry
        .backends
        .iter()
        .zip(on)
        .map(|(b, (node, ready))| {
            let mut b = b.clone().with_conditions(EndpointConditions { ready: *ready, ..Default::default() });
            b.placement = Arc::new(Placement { node_name: Some(Arc::from(*node)), ..Placement::default() });
            b
        })
        .collect();
    entry.eligible = (0..on.len() as u32).filter(|i| on[*i as usize].1).collect();
    entry.backends = backends.into();
    entry
}

/// What `peers` claims holding nothing yet, free to take, if `may_claim`.
fn free(
    peers: &Peers,
    now: Instant,
    may_claim: bool,
    candidates: &BTreeMap<IpAddr, Candidates>,
) -> BTreeSet<IpAddr> {
    peers.claims(now, may_claim, candidates, &BTreeSet::new(), true)
}

/// A heartbeat of `node` counting `live` as live.
fn beat<'a>(node: &'a str, settled: bool, live: &'a [String]) -> Heartbeat<'a> {
    Heartbeat { node, incarnation: 1, settled, live, digest: 0 }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn every_ip_has_one_winner_whatever_the_order_of_the_members() {
    let members = ["node-a", "node-b", "node-c"];
    let mut won = BTreeMap::<&str, usize>::new();
    for last in 0..=255 {
        let forward = winner(ip(last), members, &Candidates::Any).expect("a winner");
        let backward = winner(ip(last), members.iter().rev().copied(), &Candidates::Any);
        assert_eq!(Some(forward), backward);
        *won.entry(forward).or_default() += 1;
    }
    // 256 IPs over 3 nodes: each gets a fair share (expected 85, binomial sd ~7.5).
    assert_eq!(won.len(), 3, "{won:?}");
    assert!(won.values().all(|&n| (50..=120).contains(&n)), "{won:?}");
}

#[test]
fn a_member_leaving_moves_only_the_ips_it_won() {
    let (all, without_c) = (["node-a", "node-b", "node-c"], ["node-a", "node-b"]);
    for last in 0..=255 {
        let before = winner(ip(last), all, &Candidates::Any).expect("a winner");
        let after = winner(ip(last), without_c, &Candidates::Any).expect("a winner");
        if before != "node-c" {
            assert_eq!(before, after, "{} moved from {before}", ip(last));
        }
    }
}

#[test]
fn scores_do_not_change_between_releases() {
    // Every replica must compute the same owner; these values pin the hash and its input layout.
    assert_ne!(score(ip(1), "node-a"), score(ip(1), "node-b"));
    assert_ne!(score(ip(1), "node-a"), score(ip(2), "node-a"));
    let pinned = [score(ip(1), "node-a"), score("2001:db8::1".parse().expect("literal"), "node-a")];
    assert_eq!(pinned, [PINNED_V4, PINNED_V6], "the L2 owner hash changed: every IP would move");
}

const PINNED_V4: u64 = 7_013_696_380_428_409_987;
const PINNED_V6: u64 = 1_207_056_458_089_835_601;

#[test]
fn local_entries_are_announced_only_where_they_have_endpoints() {
    let snapshot = Snapshot::from_entries(
        1,
        [
            placed(ip(1), Protocol::Tcp, true, &[("node-a", true), ("node-b", false)]),
            placed(ip(2), Protocol::Tcp, false, &[("node-a", true)]),
            placed(ip(3), Protocol::Tcp, false, &[("node-a", false)]),
            placed(ip(4), Protocol::Tcp, true, &[("node-a", false)]),
        ],
    );
    let candidates = candidates(&snapshot, None);
    assert_eq!(candidates.get(&ip(1)), Some(&Candidates::Nodes(nodes(&["node-a"]))));
    assert_eq!(candidates.get(&ip(2)), Some(&Candidates::Any));
    assert_eq!(candidates.get(&ip(3)), None, "no eligible backend: not announced");
    assert_eq!(candidates.get(&ip(4)), None, "no ready local endpoint anywhere");
}

#[test]
fn entries_sharing_an_ip_go_to_the_nodes_all_of_them_admit() {
    let shared =
        |entries: Vec<ServiceEntry>| candidates(&Snapshot::from_entries(1, entries), None).remove(&ip(1));
    let dns_tcp = || placed(ip(1), Protocol::Tcp, true, &[("node-a", true), ("node-b", true)]);
    let dns_udp = placed(ip(1), Protocol::Udp, true, &[("node-b", true), ("node-c", true)]);
    assert_eq!(shared(vec![dns_tcp(), dns_udp]), Some(Candidates::Nodes(nodes(&["node-b"]))));
    let elsewhere = placed(ip(1), Protocol::Udp, true, &[("node-c", true)]);
    assert_eq!(
        shared(vec![dns_tcp(), elsewhere]),
        Some(Candidates::Nodes(nodes(&["node-a", "node-b", "node-c"]))),
        "no node serves both: any node that serves one"
    );
    let cluster_wide = placed(ip(1), Protocol::Udp, false, &[("node-c", true)]);
    assert_eq!(shared(vec![dns_tcp(), cluster_wide]), Some(Candidates::Nodes(nodes(&["node-a", "node-b"]))));
}

#[test]
fn a_starting_replica_claims_nothing_until_it_settled() {
    let t0 = origin();
    let peers = Peers::new("node-a", TIMEOUT, t0);
    let all = any((0..32).map(ip));
    assert!(!peers.settled(t0, 1));
    assert!(free(&peers, t0, false, &all).is_empty());
    assert!(peers.settled(t0 + TIMEOUT, 1), "settles after one timeout alone");
    assert_eq!(free(&peers, t0 + TIMEOUT, true, &all).len(), 32, "alone, it holds everything");
}

#[test]
fn two_live_replicas_split_the_ips_and_never_both_claim_one() {
    let t0 = origin();
    let (mut a, mut b) = (Peers::new("node-a", TIMEOUT, t0), Peers::new("node-b", TIMEOUT, t0));
    let both = names(&["node-a", "node-b"]);
    a.handle_heartbeat(t0, &beat("node-b", true, &both));
    b.handle_heartbeat(t0, &beat("node-a", true, &both));
    let all = any((0..64).map(ip));
    let (claims_a, claims_b) = (free(&a, t0, true, &all), free(&b, t0, true, &all));
    assert!(claims_a.is_disjoint(&claims_b));
    assert_eq!(claims_a.len() + claims_b.len(), 64, "every IP is someone's");
    assert!(!claims_a.is_empty() && !claims_b.is_empty());
}

#[test]
fn a_joining_replica_takes_an_ip_only_after_its_owner_released_it() {
    let t0 = origin();
    let all = any((0..64).map(ip));
    let mut a = Peers::new("node-a", TIMEOUT, t0);
    let held = free(&a, t0 + TIMEOUT, true, &all);
    assert_eq!(held.len(), 64);
    // node-b starts: unsettled, it takes nothing and costs node-a nothing.
    let t1 = t0 + TIMEOUT * 2;
    let (alone, both) = (names(&["node-b"]), names(&["node-a", "node-b"]));
    a.handle_heartbeat(t1, &beat("node-b", false, &alone));
    assert_eq!(free(&a, t1, true, &all), held);
    // node-b heard node-a and settled, but node-a's last word still counts only itself.
    let mut b = Peers::new("node-b", TIMEOUT, t1);
    b.handle_heartbeat(t1, &beat("node-a", true, &names(&["node-a"])));
    assert!(b.settled(t1, 1), "settled at once: it hears the one peer it expects");
    assert!(free(&b, t1, true, &all).is_empty(), "node-a has not released yet");
    // node-a hears node-b settled and releases node-b's share...
    a.handle_heartbeat(t1, &beat("node-b", true, &both));
    let kept = free(&a, t1, true, &all);
    assert!(kept.len() < 64);
    // ...and once node-b hears that, it takes exactly the rest.
    b.handle_heartbeat(t1, &beat("node-a", true, &both));
    let taken = free(&b, t1, true, &all);
    assert!(taken.is_disjoint(&kept));
    assert_eq!(taken.len() + kept.len(), 64);
}

#[test]
fn a_dead_owners_ips_go_to_the_survivors_after_one_timeout() {
    let t0 = origin();
    let all = any((0..64).map(ip));
    let three = names(&["node-a", "node-b", "node-c"]);
    let mut a = Peers::new("node-a", TIMEOUT, t0);
    a.handle_heartbeat(t0, &beat("node-b", true, &three));
    a.handle_heartbeat(t0, &beat("node-c", true, &three));
    let before = free(&a, t0, true, &all);
    // node-c dies: its heartbeats stop; node-b keeps beating, still counting node-c for a while.
    let later = t0 + TIMEOUT / 2;
    a.handle_heartbeat(later, &beat("node-b", true, &three));
    assert_eq!(free(&a, t0 + TIMEOUT - Duration::from_millis(1), true, &all), before);
    assert_eq!(a.next_change(later), Some(t0 + TIMEOUT), "re-decided when node-c would be gone");
    let after = free(&a, t0 + TIMEOUT, true, &all);
    let c_held: BTreeSet<IpAddr> = all
        .keys()
        .copied()
        .filter(|ip| winner(*ip, three.iter().map(String::as_str), &Candidates::Any) == Some("node-c"))
        .collect();
    assert!(!c_held.is_empty());
    let expected: BTreeSet<IpAddr> = all
        .keys()
        .copied()
        .filter(|ip| winner(*ip, ["node-a", "node-b"], &Candidates::Any) == Some("node-a"))
        .collect();
    assert_eq!(after, expected, "node-a takes its share of node-c's IPs at once");
    assert!(before.is_subset(&after), "and keeps its own");
}

#[test]
fn without_a_quorum_a_replica_falls_silent() {
    let t0 = origin();
    let all = any((0..16).map(ip));
    let mut a = Peers::new("node-a", TIMEOUT, t0);
    let three = names(&["node-a", "node-b", "node-c"]);
    a.handle_heartbeat(t0, &beat("node-b", true, &three));
    assert!(a.has_quorum(t0, 3), "2 of 3 is a majority");
    assert!(!a.has_quorum(t0 + TIMEOUT, 3), "1 of 3 is not");
    // Half a timeout unheard: node-b is still live (its IPs stay where they are), but node-a
    // no longer counts it for its quorum, so a cut-off node-a is silent before node-b takes over.
    let half = t0 + TIMEOUT / 2;
    assert!(a.live(half).contains("node-b"), "still live");
    assert!(!a.has_quorum(half, 3), "no longer a majority for the isolation rule");
    assert!(a.heard_recently(half).is_empty() && a.heard_recently(t0).contains("node-b"));
    assert_eq!(a.next_change(t0), Some(half), "woken when the isolation window closes");
    assert_eq!(free(&a, t0 + TIMEOUT, true, &all).len(), 16, "without the rule it holds all");
    assert!(free(&a, t0 + TIMEOUT, false, &all).is_empty(), "a closed gate claims nothing");
}

#[test]
fn an_older_incarnations_heartbeat_is_ignored() {
    let t0 = origin();
    let mut a = Peers::new("node-a", TIMEOUT, t0);
    let live = names(&["node-b"]);
    assert!(a.handle_heartbeat(
        t0,
        &Heartbeat { node: "node-b", incarnation: 2, settled: true, live: &live, digest: 0 }
    ));
    assert!(!a.handle_heartbeat(
        t0,
        &Heartbeat { node: "node-b", incarnation: 1, settled: false, live: &live, digest: 0 }
    ));
    assert_eq!(a.live(t0), nodes(&["node-a", "node-b"]), "still the settled incarnation 2");
    assert!(!a.handle_heartbeat(t0, &beat("node-a", true, &live)), "its own heartbeat is no peer");
}

#[test]
fn a_replica_whose_peer_computed_other_candidates_takes_nothing_new() {
    let t0 = origin();
    let mut a = Peers::new("node-a", TIMEOUT, t0);
    let both = names(&["node-a", "node-b"]);
    let all = any((0..16).map(ip));
    let ours = digest(&all);
    let stale = Heartbeat { node: "node-b", incarnation: 1, settled: true, live: &both, digest: ours ^ 1 };
    a.handle_heartbeat(t0, &stale);
    assert!(!a.agreed(t0, ours));
    let wins = free(&a, t0, true, &all);
    assert!(!wins.is_empty());
    let kept: BTreeSet<IpAddr> = wins.iter().copied().take(1).collect();
    assert_eq!(a.claims(t0, true, &all, &kept, false), kept, "keeps what it holds, takes nothing new");
    a.handle_heartbeat(t0, &Heartbeat { digest: ours, ..stale });
    assert!(a.agreed(t0, ours));
}

#[test]
fn the_digest_follows_the_candidates() {
    let all = any((0..4).map(ip));
    let mut local = all.clone();
    local.insert(ip(1), Candidates::Nodes(nodes(&["node-a"])));
    assert_eq!(digest(&all), digest(&all.clone()));
    assert_ne!(digest(&all), digest(&local));
    assert_ne!(digest(&all), digest(&any((0..3).map(ip))));
}
