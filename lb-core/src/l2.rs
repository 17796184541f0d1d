//! L2 mode's one rule: which node answers for each IP. One announcer per IP, never per Service
//! (two Services sharing an IP must not be announced from two nodes), spread over the nodes by
//! rendezvous hashing, and handed over between live replicas without a moment where two claim it.
//!
//! - **Candidates** of an IP come from the snapshot's entries on it: an entry with
//!   `externalTrafficPolicy: Local` can be served only by the nodes that hold one of its
//!   serviceable endpoints (ready, else serving and terminating: kube-proxy's per-node fallback);
//!   any other entry by every node, as long as it has an eligible backend at all. An IP shared by
//!   several entries goes to the nodes every one of them admits, or, when no node does, to those
//!   that some admit. An IP no entry can be served on is announced by nobody. Of those, only the
//!   nodes MetalLB's `L2Advertisement`s let announce it stay ([`crate::announcement`]).
//! - **Winner**: among the live members a candidate admits, the one with the highest
//!   `xxh64(ip ‖ node)` ([`crate::hash`], stable across builds and platforms), ties to the greater
//!   name. A member leaving moves only the IPs it held; one joining takes about `1/n` of them.
//! - **Liveness** ([`Peers`]): each replica hears the others' heartbeats; a peer not heard for
//!   `timeout` is gone. A heartbeat says who its sender counts as live and whether it has settled
//!   (heard everyone or waited one `timeout` since it started). Only settled members are counted,
//!   so a starting replica takes nothing from the others until it knows who is there.
//! - **Handover without overlap**: a node claims an IP only if it wins it among its live members
//!   *and* no live peer would still win it by that peer's own last word. When a replica joins,
//!   the old owner sees it, releases, says so in its next heartbeat (sent at once on a change), and
//!   only then does the newcomer claim. When an owner dies, the survivors drop it after `timeout`
//!   and the new winner claims at once (the other survivors' last word names the dead owner, not
//!   themselves).
//! - **Isolation** ([`Peers::claims`]'s `may_claim`, decided by the caller): with static peers
//!   and a quorum rule ([`Peers::has_quorum`]), a replica that hears no more than half of the
//!   members claims nothing, so the minority side of a partition falls silent while the majority
//!   takes its IPs over. The isolation rules count only peers heard within half of `timeout`,
//!   so the minority falls silent before the majority counts it gone: a partition never puts an
//!   IP on both sides at once. Without it (two appliance nodes: a survivor never has a majority) a
//!   partition can make both sides answer, as with VRRP. In a cluster the Kubernetes API
//!   arbitrates instead: [`members`] (who is listed, and the gate).
//!
//! - **Same inputs**: replicas whose snapshots differ for a moment (an endpoint change reaching
//!   one first) would disagree about an IP's candidates, so heartbeats carry a [`digest`] of the
//!   candidates, and a replica takes no new IP while a live peer's digest differs from its own
//!   (it keeps what it holds and may release); the caller bounds that wait, for replicas whose
//!   inputs differ for good.
//!
//! All of it is a function of the members' heartbeats, the snapshot and the clock passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::builder::endpoints::{is_ready, is_serving_terminating};
use crate::hash::{encode_ip, xxh64};
use crate::model::{ServiceEntry, Snapshot};

pub mod members;

/// The seed of [`score`]; changing it moves every IP.
const SEED: u64 = 0x004c_326f_776e_6572; // "L2owner"

/// The nodes that may announce one IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidates {
    /// Every node.
    Any,
    /// Only these nodes.
    Nodes(BTreeSet<Arc<str>>),
}

impl Candidates {
    pub fn admits(&self, node: &str) -> bool {
        match self {
            Candidates::Any => true,
            Candidates::Nodes(nodes) => nodes.contains(node),
        }
    }

    /// The nodes both admit; `None` when none.
    fn within(self, allowed: &Candidates) -> Option<Candidates> {
        let both = match (self, allowed) {
            (candidates, Candidates::Any) => candidates,
            (Candidates::Any, allowed) => allowed.clone(),
            (Candidates::Nodes(nodes), Candidates::Nodes(allowed)) => {
                Candidates::Nodes(nodes.into_iter().filter(|node| allowed.contains(node)).collect())
            }
        };
        match &both {
            Candidates::Nodes(nodes) if nodes.is_empty() => None,
            _ => Some(both),
        }
    }
}

/// The nodes that may serve `entry`, if any may.
fn entry_candidates(entry: &ServiceEntry) -> Option<Candidates> {
    if !entry.traffic.node_local {
        return (!entry.eligible.is_empty()).then_some(Candidates::Any);
    }
    let on = |wanted: fn(&crate::model::EndpointConditions) -> bool| -> BTreeSet<Arc<str>> {
        entry
            .backends
            .iter()
            .filter(|b| wanted(&b.conditions))
            .filter_map(|b| b.placement.node_name.clone())
            .collect()
    };
    // kube-proxy falls back to serving-terminating endpoints per node: a node whose endpoints
    // all terminate still serves with them.
    let mut nodes = on(is_ready);
    nodes.extend(on(is_serving_terminating));
    (!nodes.is_empty()).then_some(Candidates::Nodes(nodes))
}

/// The candidates of every IP of `snapshot` that some node can serve and that the snapshot's
/// [`Announcements`](crate::announcement::Announcements) let some node announce on `interface`
/// (see the module doc).
pub fn candidates(snapshot: &Snapshot, interface: Option<&str>) -> BTreeMap<IpAddr, Candidates> {
    let mut per_ip: BTreeMap<IpAddr, Vec<Candidates>> = BTreeMap::new();
    for entry in snapshot.entries() {
        if let Some(candidates) = entry_candidates(entry) {
            per_ip.entry(entry.key.addr).or_default().push(candidates);
        }
    }
    let announcements = snapshot.announcements();
    per_ip
        .into_iter()
        .filter_map(|(ip, all)| {
            let allowed = announcements.l2(ip, interface)?;
            Some((ip, combine(all).within(&allowed)?))
        })
        .collect()
}

/// The nodes every entry admits, else those some entry admits.
fn combine(all: Vec<Candidates>) -> Candidates {
    let sets: Vec<&BTreeSet<Arc<str>>> = all
        .iter()
        .filter_map(|c| match c {
            Candidates::Any => None,
            Candidates::Nodes(nodes) => Some(nodes),
        })
        .collect();
    let Some((first, rest)) = sets.split_first() else { return Candidates::Any };
    let every: BTreeSet<Arc<str>> =
        first.iter().filter(|node| rest.iter().all(|set| set.contains(*node))).cloned().collect();
    if !every.is_empty() {
        return Candidates::Nodes(every);
    }
    Candidates::Nodes(sets.into_iter().flatten().cloned().collect())
}

/// A digest of `candidates` that replicas compare in heartbeats: equal digests, equal decisions.
pub fn digest(candidates: &BTreeMap<IpAddr, Candidates>) -> u64 {
    let mut input = Vec::with_capacity(candidates.len() * 24);
    let mut encoded = [0u8; 18];
    for (ip, candidates) in candidates {
        let len = encode_ip(*ip, &mut encoded);
        input.extend_from_slice(&encoded[..len]);
        match candidates {
            Candidates::Any => input.push(0),
            Candidates::Nodes(nodes) => {
                for node in nodes {
                    input.push(1);
                    input.extend_from_slice(node.as_bytes());
                }
                input.push(2);
            }
        }
    }
    xxh64(&input, SEED)
}

/// The rendezvous score of `node` for `ip`. Computed for every IP and member on each decision,
/// so without allocating for any node name Kubernetes allows (253 bytes).
pub fn score(ip: IpAddr, node: &str) -> u64 {
    let mut input = [0u8; 18 + 253];
    let len = encode_ip(ip, (&mut input[..18]).try_into().expect("18 bytes"));
    let name = node.as_bytes();
    match input.get_mut(len..len + name.len()) {
        Some(rest) => {
            rest.copy_from_slice(name);
            xxh64(&input[..len + name.len()], SEED)
        }
        None => xxh64(&[&input[..len], name].concat(), SEED),
    }
}

/// The member of `members` that announces `ip`: the highest score among those `candidates` admit.
pub fn winner<'a>(
    ip: IpAddr,
    members: impl IntoIterator<Item = &'a str>,
    candidates: &Candidates,
) -> Option<&'a str> {
    members.into_iter().filter(|node| candidates.admits(node)).max_by_key(|node| (score(ip, node), *node))
}

/// What one peer last said.
#[derive(Debug, Clone)]
struct Peer {
    heard: Instant,
    incarnation: u64,
    settled: bool,
    /// The members it counts as live (itself included).
    live: BTreeSet<Arc<str>>,
    /// Its [`digest`] of the candidates.
    digest: u64,
}

impl Peer {
    fn from(now: Instant, heartbeat: &Heartbeat<'_>, live: BTreeSet<Arc<str>>) -> Peer {
        let (incarnation, settled, digest) = (heartbeat.incarnation, heartbeat.settled, heartbeat.digest);
        Peer { heard: now, incarnation, settled, live, digest }
    }
}

/// One peer's heartbeat, as received.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    pub node: &'a str,
    /// Grows with each start of the peer's process: a heartbeat of an older start is ignored.
    pub incarnation: u64,
    pub settled: bool,
    pub live: &'a [String],
    /// The sender's [`digest`] of the candidates.
    pub digest: u64,
}

/// This replica's knowledge of its peers (see the module doc).
#[derive(Debug)]
pub struct Peers {
    me: Arc<str>,
    timeout: Duration,
    started: Instant,
    peers: BTreeMap<Arc<str>, Peer>,
}

impl Peers {
    /// `me`, started at `now`; a peer unheard for `timeout` is gone.
    pub fn new(me: &str, timeout: Duration, now: Instant) -> Peers {
        Peers { me: Arc::from(me), timeout, started: now, peers: BTreeMap::new() }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Takes in a heartbeat; returns whether what this replica counts as live may have changed.
    pub fn handle_heartbeat(&mut self, now: Instant, heartbeat: &Heartbeat<'_>) -> bool {
        if heartbeat.node == &*self.me {
            return false;
        }
        let live: BTreeSet<Arc<str>> = heartbeat.live.iter().map(|n| Arc::from(n.as_str())).collect();
        match self.peers.get_mut(heartbeat.node) {
            Some(peer) if heartbeat.incarnation < peer.incarnation => false,
            Some(peer) => {
                let was_live = now.duration_since(peer.heard) < self.timeout;
                let changed = !was_live
                    || peer.settled != heartbeat.settled
                    || peer.live != live
                    || peer.digest != heartbeat.digest;
                *peer = Peer::from(now, heartbeat, live);
                changed
            }
            None => {
                let peer = Peer::from(now, heartbeat, live);
                self.peers.insert(Arc::from(heartbeat.node), peer);
                true
            }
        }
    }

    /// Forgets `node` (no longer a member).
    pub fn forget(&mut self, node: &str) {
        self.peers.remove(node);
    }

    fn is_live(&self, peer: &Peer, now: Instant) -> bool {
        now.duration_since(peer.heard) < self.timeout
    }

    /// Whether this replica has settled: it hears `expected` peers, or waited one `timeout` since
    /// it started.
    pub fn settled(&self, now: Instant, expected: usize) -> bool {
        now.duration_since(self.started) >= self.timeout || self.heard_from(now) > expected
    }

    /// The settled peers heard within `timeout`, and this replica: who shares the IPs.
    pub fn live(&self, now: Instant) -> BTreeSet<Arc<str>> {
        let peers = self.peers.iter().filter(|(_, peer)| peer.settled && self.is_live(peer, now));
        peers.map(|(node, _)| Arc::clone(node)).chain([Arc::clone(&self.me)]).collect()
    }

    /// Peers heard within `timeout`, settled or not, and this replica: what a heartbeat tells.
    pub fn heard_from(&self, now: Instant) -> usize {
        1 + self.peers.values().filter(|peer| self.is_live(peer, now)).count()
    }

    /// The peers heard within `timeout`, settled or not (this replica not included).
    pub fn heard(&self, now: Instant) -> BTreeSet<Arc<str>> {
        self.peers
            .iter()
            .filter(|(_, peer)| self.is_live(peer, now))
            .map(|(node, _)| Arc::clone(node))
            .collect()
    }

    /// How recently a peer must have been heard to count for the isolation rules: half of
    /// `timeout`. A replica cut off from its peers so falls silent before they count it gone and
    /// take its IPs, whatever the phase of their heartbeats, as long as the heartbeat interval is
    /// at most a quarter of `timeout` (the rest is the time to take the IPs off the link).
    fn isolation_window(&self) -> Duration {
        self.timeout / 2
    }

    /// The peers heard within the isolation window, settled or not (this replica not included):
    /// what the member list's gate counts ([`members::Membership::admits`]).
    pub fn heard_recently(&self, now: Instant) -> BTreeSet<Arc<str>> {
        self.recent(now).map(|(node, _)| Arc::clone(node)).collect()
    }

    /// The peers heard within the isolation window.
    fn recent(&self, now: Instant) -> impl Iterator<Item = (&Arc<str>, &Peer)> {
        let window = self.isolation_window();
        self.peers.iter().filter(move |(_, peer)| now.duration_since(peer.heard) < window)
    }

    /// The static quorum rule: whether this replica counts more than half of `members` (itself
    /// included) as live, by the isolation window.
    pub fn has_quorum(&self, now: Instant, members: usize) -> bool {
        (1 + self.recent(now).filter(|(_, peer)| peer.settled).count()) * 2 > members
    }

    /// The earliest moment after `now` when a live peer would leave the isolation window or be
    /// gone, or this replica settles.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let window = self.isolation_window();
        let expiries = self.peers.values().flat_map(|peer| [peer.heard + window, peer.heard + self.timeout]);
        expiries.chain([self.started + self.timeout]).filter(|at| *at > now).min()
    }

    /// Whether every live peer computed the candidates this replica did (`digest`).
    pub fn agreed(&self, now: Instant, digest: u64) -> bool {
        let live = self.live(now);
        self.peers.iter().filter(|(node, _)| live.contains(*node)).all(|(_, peer)| peer.digest == digest)
    }

    /// The IPs this replica announces now, of `candidates`: none unless `may_claim` (it settled
    /// and its isolation rule lets it: [`Peers::has_quorum`], [`members::Membership::admits`]),
    /// else those it wins among [`Peers::live`] that no live peer still claims by its last
    /// heartbeat; and, unless `may_take` (the caller's judgement of [`Peers::agreed`]), only
    /// those it already `held`: a peer that computed other candidates may still hold the rest.
    pub fn claims(
        &self,
        now: Instant,
        may_claim: bool,
        candidates: &BTreeMap<IpAddr, Candidates>,
        held: &BTreeSet<IpAddr>,
        may_take: bool,
    ) -> BTreeSet<IpAddr> {
        if !may_claim {
            return BTreeSet::new();
        }
        let live = self.live(now);
        let others: Vec<(&Arc<str>, &Peer)> =
            self.peers.iter().filter(|(node, _)| live.contains(*node)).collect();
        candidates
            .iter()
            .filter(|(ip, c)| winner(**ip, live.iter().map(|n| &**n), c) == Some(&*self.me))
            .filter(|(ip, c)| {
                others
                    .iter()
                    .all(|(node, peer)| winner(**ip, peer.live.iter().map(|n| &**n), c) != Some(&***node))
            })
            .map(|(ip, _)| *ip)
            .filter(|ip| may_take || held.contains(ip))
            .collect()
    }
}

#[cfg(test)]
mod tests;
