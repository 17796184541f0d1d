//! L2 mode's agreement between ringlb replicas on one segment: heartbeats over UDP, decided by
//! `lb_core::l2` into the set of IPs this replica announces, which [`crate::vip_link::run`]
//! puts on the VIP link (and announces with gratuitous ARP / unsolicited NA).
//!
//! Who the replicas are comes from one of two sources, through one [`MemberList`] watch: the
//! configured `--l2-peer` addresses (appliance mode), or the member Lease of the cluster
//! ([`members`]), where the Kubernetes API arbitrates membership: a replica claims only while
//! listed and hearing enough of the list (`lb_core::l2::members`), proposes its own joining,
//! and, as the election's leader, the removal of members it no longer hears.
//!
//! Every `interval` a replica sends each peer a heartbeat (`{"v":1,"node","incarnation",
//! "settled","live","digest"}`, a few dozen bytes whatever the number of VIPs) and sends one at once when
//! what it counts as live changes, so a release is heard within a round trip. A peer unheard for
//! `timeout` is gone: a dead owner's IPs move after `timeout` plus the time to add an address and
//! send the first announcement.
//!
//! Invariants:
//! - heartbeats are taken only from the members' addresses (a stranger on the segment cannot
//!   add a member that would win IPs, nor keep a dead one alive), and in cluster mode only
//!   under the name listed for that address; others are counted and logged at most every 30 s.
//!   In cluster mode a well-formed heartbeat of an unlisted replica (one joining) is answered
//!   with this replica's own, at most twice per interval per address, so the joiner hears a
//!   listed member and may add itself; it is remembered a `timeout`, so the moment the list
//!   names it, it counts as heard;
//! - the owned set is recomputed on every heartbeat that changes the picture, every snapshot, and
//!   the moment a peer would expire or this replica settles, never later;
//! - a send or receive error never stops the loop (the peer just goes unheard) and is throttled in
//!   the log.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lb_core::l2::members::{ListChange, Membership, Roster};
use lb_core::l2::{self, Candidates, Heartbeat, Peers};
use lb_core::{LogThrottle, Snapshot};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;

pub mod members;

/// The heartbeat format's version; a heartbeat of another is ignored.
const VERSION: u32 = 1;

/// Log at most this often per kind of trouble.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Joiners' heartbeats remembered at most (a flood of strangers cannot grow it).
const MAX_JOINERS: usize = 64;

/// How L2 agreement runs.
#[derive(Debug, Clone)]
pub struct L2Config {
    /// This replica's name among its peers (the Kubernetes node name, when ringlb knows it):
    /// what the owner hash and `externalTrafficPolicy: Local` candidates are computed over.
    pub node: String,
    /// The UDP address heartbeats are received on (and sent from); in cluster mode also the
    /// address the member list gives for this replica.
    pub listen: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    /// With configured peers: fall silent without hearing a majority of the members (this
    /// replica and its peers). The member list's own gate replaces it in cluster mode.
    pub quorum: bool,
    /// The interface this replica announces on (`--announce-interface`), which MetalLB's
    /// `L2Advertisement.interfaces` are compared with; the same on every replica.
    pub interface: Option<String>,
}

/// The replicas the agreement runs among, as their source gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberList {
    /// `--l2-peer` (appliance mode): the other replicas' addresses; their names come from their
    /// heartbeats, and this replica is always a member.
    Configured(Vec<SocketAddr>),
    /// The member Lease (cluster mode): every member's name and heartbeat address, and the
    /// Lease's resourceVersion (`None`: no Lease yet), which a change is decided on.
    Leased { members: Roster, version: Option<String> },
}

/// A change to the member list this replica wants, and the list version it was decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub change: ListChange,
    pub version: Option<String>,
}

/// Cluster mode's tie between the agreement and the API: whether this replica leads the
/// election (only the leader removes members), and where its proposals go ([`members::run`]).
pub struct Arbiter {
    pub leading: watch::Receiver<bool>,
    pub proposals: watch::Sender<Option<Proposal>>,
}

/// The wire form of a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Wire {
    v: u32,
    node: String,
    incarnation: u64,
    settled: bool,
    live: Vec<String>,
    digest: u64,
}

impl Wire {
    fn heartbeat(&self) -> Heartbeat<'_> {
        Heartbeat {
            node: &self.node,
            incarnation: self.incarnation,
            settled: self.settled,
            live: &self.live,
            digest: self.digest,
        }
    }
}

/// What the L2 agreement did, for `/status`.
#[derive(Debug, Default)]
pub struct L2Counters {
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_received: AtomicU64,
    /// From an address that is no member's (or under another name than the list's), or not a
    /// heartbeat at all.
    pub heartbeats_rejected: AtomicU64,
    /// Heartbeats sent back to a replica not (yet) listed.
    pub joiners_answered: AtomicU64,
    pub send_errors: AtomicU64,
    /// Each time the owned set changed.
    pub ownership_changes: AtomicU64,
}

/// The agreement as it stands, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct L2State {
    /// `configured` or `leased`.
    pub source: &'static str,
    /// The members but this replica: name → address (configured peers: address → `?`).
    pub members: BTreeMap<String, String>,
    /// Whether the member list names this replica at its address (configured: always).
    pub listed: bool,
    /// The members heard within the timeout.
    pub heard: Vec<String>,
    /// The members sharing the IPs (settled and heard), this replica included.
    pub live: Vec<String>,
    /// Whether the gate lets this replica claim (settled, and quorum or membership).
    pub may_claim: bool,
    pub owned: usize,
    /// Whether this replica leads the election (`None` outside a cluster).
    pub leader: Option<bool>,
}

/// A bound L2 agreement, before it runs.
pub struct L2 {
    config: L2Config,
    socket: UdpSocket,
    counters: Arc<L2Counters>,
    state: Arc<Mutex<L2State>>,
}

/// Whom this replica talks to under the current member list.
#[derive(Debug, Default)]
struct Addressing {
    /// Heartbeats go here.
    send_to: Vec<SocketAddr>,
    /// Heartbeats are taken from here, under this name when the list gives one.
    accept: BTreeMap<SocketAddr, Option<Arc<str>>>,
    /// Cluster mode: the list is the member Lease's, at this version.
    leased: Option<Option<String>>,
}

impl Addressing {
    fn of(list: &MemberList, me: &str) -> Addressing {
        match list {
            MemberList::Configured(peers) => Addressing {
                send_to: peers.clone(),
                accept: peers.iter().map(|addr| (*addr, None)).collect(),
                leased: None,
            },
            MemberList::Leased { members, version } => {
                let others = members.iter().filter(|(node, _)| &***node != me);
                Addressing {
                    send_to: others.clone().map(|(_, addr)| *addr).collect(),
                    accept: others.map(|(node, addr)| (*addr, Some(Arc::clone(node)))).collect(),
                    leased: Some(version.clone()),
                }
            }
        }
    }

    /// Whether `wire`, from `from`, is a member's heartbeat.
    fn admits(&self, from: SocketAddr, wire: &Wire) -> bool {
        match self.accept.get(&from) {
            Some(None) => true,
            Some(Some(name)) => **name == *wire.node,
            None => false,
        }
    }
}

/// A heartbeat of a replica not listed, and when it was last answered.
struct Joiner {
    heard: Instant,
    wire: Wire,
    answered: Option<Instant>,
}

/// The replicas heard while not listed (cluster mode), by address; at most [`MAX_JOINERS`].
#[derive(Default)]
struct Joiners(BTreeMap<SocketAddr, Joiner>);

impl Joiners {
    /// Takes in `wire` from the unlisted `from`; returns whether to answer it now (at most
    /// twice per interval per address).
    fn heard(&mut self, now: Instant, from: SocketAddr, wire: Wire, config: &L2Config) -> bool {
        let previous = self.0.get(&from).and_then(|joiner| joiner.answered);
        let answer = previous.is_none_or(|at| now.duration_since(at) >= config.interval / 2);
        if self.0.len() >= MAX_JOINERS && !self.0.contains_key(&from) {
            self.0.retain(|_, joiner| now.duration_since(joiner.heard) < config.timeout);
        }
        if self.0.len() < MAX_JOINERS || self.0.contains_key(&from) {
            let answered = if answer { Some(now) } else { previous };
            self.0.insert(from, Joiner { heard: now, wire, answered });
        }
        answer
    }

    /// The heartbeats of `addressing`'s members heard within `timeout` of `now`, forgetting
    /// every member's.
    fn now_listed(
        &mut self,
        addressing: &Addressing,
        now: Instant,
        timeout: Duration,
    ) -> Vec<(Instant, Wire)> {
        let listed: Vec<SocketAddr> =
            self.0.keys().filter(|addr| addressing.accept.contains_key(*addr)).copied().collect();
        listed
            .into_iter()
            .filter_map(|addr| self.0.remove(&addr).map(|joiner| (addr, joiner)))
            .filter(|(addr, joiner)| {
                addressing.admits(*addr, &joiner.wire) && now.duration_since(joiner.heard) < timeout
            })
            .map(|(_, joiner)| (joiner.heard, joiner.wire))
            .collect()
    }
}

impl L2 {
    /// Binds the heartbeat socket (so that a taken port fails the start, not a later moment).
    pub async fn bind(config: L2Config) -> std::io::Result<L2> {
        let socket = UdpSocket::bind(config.listen).await?;
        Ok(L2 { config, socket, counters: Arc::default(), state: Arc::default() })
    }

    pub fn counters(&self) -> Arc<L2Counters> {
        Arc::clone(&self.counters)
    }

    /// The agreement's state, kept current while it runs.
    pub fn state(&self) -> Arc<Mutex<L2State>> {
        Arc::clone(&self.state)
    }

    /// This replica's name among its peers.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Runs until `stop` resolves, keeping `owned` at the IPs of `snapshots` this replica
    /// announces among the replicas `members` lists (with `arbiter` in cluster mode). `held` is
    /// what is on the link: a change that lets peers take IPs over is told only once the IPs it
    /// releases are off the link, so no IP is on two nodes at once. On the way out the owned
    /// set is emptied and the peers are told this replica leaves (a heartbeat that is not
    /// settled), so they take its IPs over at once rather than after `timeout`.
    pub async fn run(
        self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut members: watch::Receiver<MemberList>,
        arbiter: Option<Arbiter>,
        owned: watch::Sender<BTreeSet<IpAddr>>,
        mut held: watch::Receiver<BTreeSet<IpAddr>>,
        stop: impl Future,
    ) {
        let L2 { config, socket, counters, state } = self;
        let mut stop = std::pin::pin!(stop);
        let incarnation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
        let me = Arc::<str>::from(config.node.as_str());
        let started = Instant::now();
        let mut peers = Peers::new(&config.node, config.timeout, started);
        let mut membership = Membership::new(&config.node, config.listen, config.timeout);
        let (mut leading, proposals) = match arbiter {
            Some(Arbiter { leading, proposals }) => (Some(leading), Some(proposals)),
            None => (None, None),
        };
        let mut joiners = Joiners::default();
        let mut addressing = Addressing::default();
        adopt(
            &members.borrow_and_update(),
            &mut addressing,
            &mut membership,
            &mut peers,
            &mut joiners,
            started,
            (&me, config.timeout),
        );
        let (mut candidates, mut digest) =
            candidates_of(&snapshots.borrow_and_update(), config.interface.as_deref());
        let mut ticker = tokio::time::interval(config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buffer = vec![0u8; 64 * 1024];
        let (mut rejected_log, mut send_log, mut disagreement_log) =
            (LogThrottle::new(LOG_EVERY), LogThrottle::new(LOG_EVERY), LogThrottle::new(LOG_EVERY));
        // What the peers were last told; before anything safe to tell, an unsettled word.
        let mut told = Told { settled: false, live: BTreeSet::from([Arc::clone(&me)]), digest };
        let mut unsent = true;
        let mut disagreeing_since: Option<Instant> = None;
        let (mut open, mut link_open, mut members_open, mut leading_open) = (true, true, true, true);
        // The decision is redone only when an input changed: with thousands of VIPs it is
        // hundreds of thousands of hashes, and most heartbeats change nothing.
        let (mut dirty, mut claims, mut last_timed) = (true, BTreeSet::new(), None);
        tracing::info!(node = %config.node, listen = %config.listen, members = ?*members.borrow(), "L2 agreement");
        loop {
            let now = Instant::now();
            let heard = peers.heard(now);
            let leader = leading.as_ref().map(|leading| *leading.borrow());
            let settled = peers.settled(now, addressing.send_to.len());
            let gate = match &addressing.leased {
                None => !config.quorum || peers.has_quorum(now, addressing.send_to.len() + 1),
                Some(_) => membership.admits(&peers.heard_recently(now), leader == Some(true)),
            };
            let agreed = peers.agreed(now, digest);
            disagreeing_since = if agreed { None } else { disagreeing_since.or(Some(now)) };
            let patience_over =
                disagreeing_since.is_some_and(|since| now.duration_since(since) >= DISAGREEMENT_GRACE);
            if patience_over && let Some(suppressed) = disagreement_log.admit(now) {
                tracing::warn!(
                    suppressed,
                    "the L2 peers serve other Services or endpoints than this replica; deciding anyway"
                );
            }
            let holding = held.borrow_and_update().clone();
            // What time alone changes (settling, a peer going quiet, patience running out) is
            // compared rather than tied to the timer, which another branch may beat.
            let timed = (settled && gate, peers.live(now), agreed || patience_over);
            if last_timed.as_ref() != Some(&timed) {
                last_timed = Some(timed);
                dirty = true;
            }
            if std::mem::take(&mut dirty) {
                claims = peers.claims(now, settled && gate, &candidates, &holding, agreed || patience_over);
            }
            owned.send_if_modified(|current| {
                if *current == claims {
                    return false;
                }
                let (taken, released) = (claims.difference(current).count(), current.difference(&claims).count());
                tracing::info!(node = %config.node, owned = claims.len(), taken, released, "L2 ownership changed");
                counters.ownership_changes.fetch_add(1, Ordering::Relaxed);
                current.clone_from(&claims);
                true
            });
            if let (Some(version), Some(proposals)) = (&addressing.leased, &proposals) {
                let change = membership.poll_change(now, &heard, leader == Some(true));
                let proposal = change.map(|change| Proposal { change, version: version.clone() });
                proposals.send_if_modified(|current| {
                    let changed = *current != proposal;
                    if changed {
                        if let Some(proposal) = &proposal {
                            tracing::info!(node = %config.node, change = ?proposal.change, "proposing an L2 member list change");
                        }
                        current.clone_from(&proposal);
                    }
                    changed
                });
            }
            let live = peers.live(now);
            let current = L2State {
                source: if addressing.leased.is_some() { "leased" } else { "configured" },
                members: addressing
                    .accept
                    .iter()
                    .map(|(addr, name)| match name {
                        Some(name) => (name.to_string(), addr.to_string()),
                        None => (addr.to_string(), "?".to_owned()),
                    })
                    .collect(),
                listed: addressing.leased.is_none() || membership.is_listed(),
                heard: heard.iter().map(|n| n.to_string()).collect(),
                live: live.iter().map(|n| n.to_string()).collect(),
                may_claim: settled && gate,
                owned: claims.len(),
                leader,
            };
            if let Ok(mut shown) = state.lock()
                && *shown != current
            {
                *shown = current;
            }
            // A change in what this replica tells is sent at once, not at the next tick; while
            // IPs it let go are still on the link, the last word stands.
            let telling = Told { settled, live, digest };
            if holding.is_subset(&claims) && told != telling {
                told = telling;
                unsent = true;
            }
            let removal_due = addressing.leased.as_ref().and_then(|_| membership.next_deadline(now, &heard));
            let wake = [
                peers.next_change(now),
                disagreeing_since.map(|since| since + DISAGREEMENT_GRACE),
                removal_due,
            ]
            .into_iter()
            .flatten()
            .filter(|at| *at > now)
            .min();
            let expiry = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let send_now = async {
                if !unsent {
                    std::future::pending::<()>().await;
                }
            };
            let leadership = async {
                match leading.as_mut() {
                    Some(leading) if leading_open => leading.changed().await.is_ok(),
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut stop => break,
                () = send_now => {
                    beat(&socket, &config.node, incarnation, &told, &addressing.send_to, &counters, &mut send_log).await;
                    unsent = false;
                }
                _ = ticker.tick() => {
                    beat(&socket, &config.node, incarnation, &told, &addressing.send_to, &counters, &mut send_log).await;
                    unsent = false;
                }
                received = socket.recv_from(&mut buffer) => {
                    let Ok((len, from)) = received else { continue };
                    let wire = parse(&buffer[..len]);
                    match wire {
                        Some(wire) if addressing.admits(from, &wire) => {
                            counters.heartbeats_received.fetch_add(1, Ordering::Relaxed);
                            dirty = peers.handle_heartbeat(Instant::now(), &wire.heartbeat());
                        }
                        Some(wire) if addressing.leased.is_some() && !addressing.accept.contains_key(&from) => {
                            // A replica that is not listed (yet): answered, so it hears a member.
                            counters.heartbeats_rejected.fetch_add(1, Ordering::Relaxed);
                            if joiners.heard(Instant::now(), from, wire, &config) {
                                let one = [from];
                                beat(&socket, &config.node, incarnation, &told, &one, &counters, &mut send_log).await;
                                counters.joiners_answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            counters.heartbeats_rejected.fetch_add(1, Ordering::Relaxed);
                            if let Some(suppressed) = rejected_log.admit(Instant::now()) {
                                tracing::warn!(%from, suppressed, "ignored a datagram that is no member's heartbeat");
                            }
                        }
                    }
                }
                changed = members.changed(), if members_open => match changed {
                    Ok(()) => {
                        let list = members.borrow_and_update().clone();
                        adopt(&list, &mut addressing, &mut membership, &mut peers, &mut joiners, Instant::now(), (&me, config.timeout));
                        dirty = true;
                    }
                    Err(_) => members_open = false,
                },
                open_still = leadership => leading_open = open_still,
                changed = held.changed(), if link_open => {
                    link_open = changed.is_ok();
                    dirty = true;
                }
                changed = snapshots.changed(), if open => match changed {
                    Ok(()) => {
                        (candidates, digest) = candidates_of(&snapshots.borrow_and_update(), config.interface.as_deref());
                        dirty = true;
                    }
                    Err(_) => open = false,
                },
                () = expiry => {}
            }
        }
        owned.send_if_modified(|current| !std::mem::take(current).is_empty());
        let leaving = Told { settled: false, live: BTreeSet::from([me]), digest };
        beat(&socket, &config.node, incarnation, &leaving, &addressing.send_to, &counters, &mut send_log)
            .await;
    }
}

/// Takes a new member list in: whom to talk to, the membership's view, and the peers that left
/// it forgotten; a newly listed member whose heartbeat was heard while it joined counts as
/// heard from then.
fn adopt(
    list: &MemberList,
    addressing: &mut Addressing,
    membership: &mut Membership,
    peers: &mut Peers,
    joiners: &mut Joiners,
    now: Instant,
    (me, timeout): (&str, Duration),
) {
    *addressing = Addressing::of(list, me);
    if let MemberList::Leased { members, .. } = list {
        for node in membership.handle_list(now, members.clone()) {
            peers.forget(&node);
        }
        for (heard, wire) in joiners.now_listed(addressing, now, timeout) {
            peers.handle_heartbeat(heard, &wire.heartbeat());
        }
    }
}

/// How long a replica waits for its peers to compute the candidates it did before it takes new
/// IPs anyway (replicas reading different manifests would otherwise never take any).
const DISAGREEMENT_GRACE: Duration = Duration::from_secs(2);

/// What a heartbeat tells.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Told {
    settled: bool,
    live: BTreeSet<Arc<str>>,
    digest: u64,
}

fn candidates_of(snapshot: &Snapshot, interface: Option<&str>) -> (BTreeMap<IpAddr, Candidates>, u64) {
    let candidates = l2::candidates(snapshot, interface);
    let digest = l2::digest(&candidates);
    (candidates, digest)
}

/// A heartbeat in this version's format.
fn parse(datagram: &[u8]) -> Option<Wire> {
    serde_json::from_slice::<Wire>(datagram).ok().filter(|wire| wire.v == VERSION)
}

async fn beat(
    socket: &UdpSocket,
    node: &str,
    incarnation: u64,
    told: &Told,
    to: &[SocketAddr],
    counters: &L2Counters,
    log: &mut LogThrottle,
) {
    let wire = Wire {
        v: VERSION,
        node: node.to_owned(),
        incarnation,
        settled: told.settled,
        live: told.live.iter().map(|n| n.to_string()).collect(),
        digest: told.digest,
    };
    let Ok(datagram) = serde_json::to_vec(&wire) else { return };
    for peer in to {
        match socket.send_to(&datagram, peer).await {
            Ok(_) => counters.heartbeats_sent.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                counters.send_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = log.admit(Instant::now()) {
                    tracing::warn!(%peer, %error, suppressed, "cannot send a heartbeat");
                }
                continue;
            }
        };
    }
}
