//! L2 mode's agreement between ringlb replicas on one segment: heartbeats over UDP, decided by
//! `lb_core::l2` into the set of IPs this replica announces, which [`crate::vip_link::run`]
//! puts on the VIP link (and announces with gratuitous ARP / unsolicited NA).
//!
//! Every `interval` a replica sends each peer a heartbeat (`{"v":1,"node","incarnation",
//! "settled","live","digest"}`, a few dozen bytes whatever the number of VIPs) and sends one at once when
//! what it counts as live changes, so a release is heard within a round trip. A peer unheard for
//! `timeout` is gone: a dead owner's IPs move after `timeout` plus the time to add an address and
//! send the first announcement.
//!
//! Invariants:
//! - heartbeats are taken only from the configured peer addresses (a stranger on the segment
//!   cannot add a member that would win IPs, nor keep a dead one alive); others are counted and
//!   logged at most every 30 s;
//! - the owned set is recomputed on every heartbeat that changes the picture, every snapshot, and
//!   the moment a peer would expire or this replica settles, never later;
//! - a send or receive error never stops the loop (the peer just goes unheard) and is throttled in
//!   the log.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use lb_core::l2::{self, Candidates, Heartbeat, Peers};
use lb_core::{LogThrottle, Snapshot};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// The heartbeat format's version; a heartbeat of another is ignored.
const VERSION: u32 = 1;

/// Log at most this often per kind of trouble.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// How L2 agreement runs.
#[derive(Debug, Clone)]
pub struct L2Config {
    /// This replica's name among its peers (the Kubernetes node name, when ringlb knows it):
    /// what the owner hash and `externalTrafficPolicy: Local` candidates are computed over.
    pub node: String,
    /// The UDP address heartbeats are received on (and sent from).
    pub listen: SocketAddr,
    /// The other replicas' heartbeat addresses.
    pub peers: Vec<SocketAddr>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Fall silent without hearing a majority of the members (this replica and its peers).
    pub quorum: bool,
}

/// The wire form of a heartbeat.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    v: u32,
    node: String,
    incarnation: u64,
    settled: bool,
    live: Vec<String>,
    digest: u64,
}

/// What the L2 agreement did, for `/status`.
#[derive(Debug, Default)]
pub struct L2Counters {
    pub heartbeats_sent: AtomicU64,
    pub heartbeats_received: AtomicU64,
    /// From an address that is no configured peer, or not a heartbeat at all.
    pub heartbeats_rejected: AtomicU64,
    pub send_errors: AtomicU64,
    /// Each time the owned set changed.
    pub ownership_changes: AtomicU64,
}

/// A bound L2 agreement, before it runs.
pub struct L2 {
    config: L2Config,
    socket: UdpSocket,
    counters: Arc<L2Counters>,
}

impl L2 {
    /// Binds the heartbeat socket (so that a taken port fails the start, not a later moment).
    pub async fn bind(config: L2Config) -> std::io::Result<L2> {
        let socket = UdpSocket::bind(config.listen).await?;
        Ok(L2 { config, socket, counters: Arc::default() })
    }

    pub fn counters(&self) -> Arc<L2Counters> {
        Arc::clone(&self.counters)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Runs until `stop` resolves, keeping `owned` at the IPs of `snapshots` this replica
    /// announces. `held` is what is on the link: a change that lets peers take IPs over is told
    /// only once the IPs it releases are off the link, so no IP is on two nodes at once. On the
    /// way out the owned set is emptied and the peers are told this replica leaves (a heartbeat
    /// that is not settled), so they take its IPs over at once rather than after `timeout`.
    pub async fn run(
        self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        owned: watch::Sender<BTreeSet<IpAddr>>,
        mut held: watch::Receiver<BTreeSet<IpAddr>>,
        stop: impl Future,
    ) {
        let L2 { config, socket, counters } = self;
        let mut stop = std::pin::pin!(stop);
        let incarnation = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX));
        let me = Arc::<str>::from(config.node.as_str());
        let mut peers = Peers::new(&config.node, config.timeout, Instant::now());
        let members = config.peers.len() + 1;
        let (mut candidates, mut digest) = candidates_of(&snapshots.borrow_and_update());
        let mut ticker = tokio::time::interval(config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buffer = vec![0u8; 64 * 1024];
        let (mut rejected_log, mut send_log, mut disagreement_log) =
            (LogThrottle::new(LOG_EVERY), LogThrottle::new(LOG_EVERY), LogThrottle::new(LOG_EVERY));
        // What the peers were last told; before anything safe to tell, an unsettled word.
        let mut told = Told { settled: false, live: BTreeSet::from([Arc::clone(&me)]), digest };
        let mut unsent = true;
        let mut disagreeing_since: Option<Instant> = None;
        let (mut open, mut link_open) = (true, true);
        tracing::info!(node = %config.node, listen = %config.listen, peers = ?config.peers, "L2 agreement");
        loop {
            let now = Instant::now();
            let settled = peers.settled(now, config.peers.len());
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
            let may_claim = settled && (!config.quorum || peers.has_quorum(now, members));
            let claims = peers.claims(now, may_claim, &candidates, &holding, agreed || patience_over);
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
            // A change in what this replica tells is sent at once, not at the next tick; while
            // IPs it let go are still on the link, the last word stands.
            let telling = Told { settled, live: peers.live(now), digest };
            if holding.is_subset(&claims) && told != telling {
                told = telling;
                unsent = true;
            }
            let wake = [peers.next_change(now), disagreeing_since.map(|since| since + DISAGREEMENT_GRACE)]
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
            tokio::select! {
                biased;
                _ = &mut stop => break,
                () = send_now => {
                    beat(&socket, &config, incarnation, &told, &counters, &mut send_log).await;
                    unsent = false;
                }
                _ = ticker.tick() => {
                    beat(&socket, &config, incarnation, &told, &counters, &mut send_log).await;
                    unsent = false;
                }
                received = socket.recv_from(&mut buffer) => {
                    let Ok((len, from)) = received else { continue };
                    match parse(&buffer[..len], from, &config.peers) {
                        Some(wire) => {
                            counters.heartbeats_received.fetch_add(1, Ordering::Relaxed);
                            let heartbeat = Heartbeat {
                                node: &wire.node,
                                incarnation: wire.incarnation,
                                settled: wire.settled,
                                live: &wire.live,
                                digest: wire.digest,
                            };
                            peers.handle_heartbeat(Instant::now(), &heartbeat);
                        }
                        None => {
                            counters.heartbeats_rejected.fetch_add(1, Ordering::Relaxed);
                            if let Some(suppressed) = rejected_log.admit(Instant::now()) {
                                tracing::warn!(%from, suppressed, "ignored a datagram that is no peer's heartbeat");
                            }
                        }
                    }
                }
                changed = held.changed(), if link_open => link_open = changed.is_ok(),
                changed = snapshots.changed(), if open => match changed {
                    Ok(()) => (candidates, digest) = candidates_of(&snapshots.borrow_and_update()),
                    Err(_) => open = false,
                },
                () = expiry => {}
            }
        }
        owned.send_if_modified(|current| !std::mem::take(current).is_empty());
        let leaving = Told { settled: false, live: BTreeSet::from([me]), digest };
        beat(&socket, &config, incarnation, &leaving, &counters, &mut send_log).await;
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

fn candidates_of(snapshot: &Snapshot) -> (BTreeMap<IpAddr, Candidates>, u64) {
    let candidates = l2::candidates(snapshot);
    let digest = l2::digest(&candidates);
    (candidates, digest)
}

/// A heartbeat from one of `peers`, in this version's format.
fn parse(datagram: &[u8], from: SocketAddr, peers: &[SocketAddr]) -> Option<Wire> {
    if !peers.contains(&from) {
        return None;
    }
    serde_json::from_slice::<Wire>(datagram).ok().filter(|wire| wire.v == VERSION)
}

async fn beat(
    socket: &UdpSocket,
    config: &L2Config,
    incarnation: u64,
    told: &Told,
    counters: &L2Counters,
    log: &mut LogThrottle,
) {
    let wire = Wire {
        v: VERSION,
        node: config.node.clone(),
        incarnation,
        settled: told.settled,
        live: told.live.iter().map(|n| n.to_string()).collect(),
        digest: told.digest,
    };
    let Ok(datagram) = serde_json::to_vec(&wire) else { return };
    for peer in &config.peers {
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
