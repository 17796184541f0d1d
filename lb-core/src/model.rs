//! The served model: VIP keys, backends and the immutable [`Snapshot`] that maps one to the other.
//!
//! Invariants a reader can rely on:
//! - a `Snapshot` is never mutated after [`crate::build`] returns it; workers share it through `Arc`;
//! - every [`ServiceEntry::eligible`] index points into that entry's own [`ServiceEntry::backends`];
//!   the eligible backends are the `ready` (not terminating) ones, or, when the entry has no ready
//!   backend, the `serving` and `terminating` ones (kube-proxy's fallback), in both cases narrowed to
//!   this node's endpoints under `externalTrafficPolicy: Local` (see [`crate::BuildOptions::node_name`])
//!   and to the healthy ones of a [`crate::health::HealthOverlay`] unless none is healthy;
//! - a backend's identity ([`BackendId`]) is its socket address, so per-worker state keyed by it stays
//!   valid across snapshot swaps;
//! - the only mutable part of a snapshot is each backend's [`BackendLoad`]: live connection counts
//!   shared with the datapath by design (everything else is fixed once built);
//! - [`Snapshot::health_check_node_ports`] is sorted by port, one Service per port, and counts the
//!   same backends the entries list (it is built from them).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::announcement::Announcements;
use crate::builder::service::ParsedService;
use crate::cidr::Cidr;
use crate::health::{HealthCheckConfig, OutlierConfig};
use crate::lifecycle::{NotReadyConnections, StaleFlowPolicy};
use crate::proxy_protocol::ProxyProtocol;
use crate::rate::ClientRate;
use crate::scheduler::{BackendLoad, Scheduler};

/// Transport protocol of a service port, as in `Service.spec.ports[].protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; `None` (unset) means TCP as in Kubernetes.
    pub fn from_k8s(value: Option<&str>) -> Option<Protocol> {
        match value {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client addresses: a VIP, a port and a protocol. One [`ServiceEntry`] per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VipKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl VipKey {
    pub fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        VipKey { addr, port, protocol }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for VipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.protocol)
    }
}

/// Names a Kubernetes object in errors and logs: `Service default/web`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn service(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef { kind: "Service", namespace: namespace.into(), name: name.into() }
    }

    pub fn endpoint_slice(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef { kind: "EndpointSlice", namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A backend's stable identity across snapshots: the address new connections are sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendId(pub SocketAddr);

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Index of a backend inside one [`ServiceEntry::backends`]; only meaningful with that entry.
pub type BackendIdx = u32;

/// An EndpointSlice endpoint's conditions with Kubernetes' defaults applied
/// (`ready` and `serving` unset mean true, `terminating` unset means false).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct EndpointConditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Default for EndpointConditions {
    fn default() -> Self {
        EndpointConditions { ready: true, serving: true, terminating: false }
    }
}

/// Where an endpoint runs and what it is. One allocation per endpoint, made when its slice is
/// parsed and shared by every backend and snapshot built from it: at 100,000 endpoints, three
/// `Option<Arc<str>>` in each parsed endpoint and each backend held 8 MB more.
#[derive(Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Placement {
    /// `nodeName`, interned per source (one node's name is one allocation).
    pub node_name: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// `targetRef` of the endpoint (usually a Pod), for display.
    pub target: Option<Arc<str>>,
}

/// One resolved endpoint of one service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub id: BackendId,
    pub conditions: EndpointConditions,
    /// Relative weight for weighted schedulers; at least 1.
    pub weight: u32,
    /// Shared with the parsed slice it came from, so a backend costs no string copies.
    #[serde(flatten)]
    pub placement: Arc<Placement>,
    /// Its open connections and flows, counted by every worker and shared by every snapshot that
    /// lists this backend (from the build's [`crate::LoadRegistry`]). Not part of its value: equal
    /// backends compare equal whatever their loads, and it is not serialised.
    #[serde(skip)]
    pub load: BackendLoad,
}

impl Backend {
    /// A ready backend of weight 1 at `addr`, placed nowhere in particular, with a counter of its own.
    pub fn ready(addr: SocketAddr) -> Backend {
        Backend {
            id: BackendId(addr),
            conditions: EndpointConditions::default(),
            weight: 1,
            placement: Arc::default(),
            load: BackendLoad::new(),
        }
    }

    /// The node it runs on, if its endpoint says.
    pub fn node_name(&self) -> Option<&str> {
        self.placement.node_name.as_deref()
    }

    pub fn with_weight(self, weight: u32) -> Backend {
        Backend { weight, ..self }
    }

    pub fn with_conditions(self, conditions: EndpointConditions) -> Backend {
        Backend { conditions, ..self }
    }

    pub fn addr(&self) -> SocketAddr {
        self.id.0
    }
}

/// Per-entry datapath policy, from annotations with global defaults ([`crate::BuildOptions`]). The
/// datapath executes it; what it decides for established connections is in [`crate::lifecycle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EntryPolicy {
    /// How long one backend connect may take before the next backend is tried.
    pub connect_timeout: Duration,
    /// How many backends one client connection may try in all (first try included).
    pub connect_attempts: u32,
    /// A connection with no bytes in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// How long established connections of a removed VIP or backend (or, under
    /// [`NotReadyConnections::Drain`], of a backend that turned not ready) may continue.
    pub drain_timeout: Duration,
    /// What happens to established TCP/SCTP connections of a backend that turned not ready.
    pub not_ready_connections: NotReadyConnections,
    /// Idle timeout of a UDP flow whose backend never replied (conntrack's `nf_conntrack_udp_timeout`).
    pub udp_unreplied_timeout: Duration,
    /// Idle timeout of a UDP flow that saw a reply (conntrack's `nf_conntrack_udp_timeout_stream`).
    pub udp_replied_timeout: Duration,
    /// What happens to a UDP flow whose backend is no longer eligible.
    pub udp_stale_flows: StaleFlowPolicy,
    /// TCP connections and SCTP associations of this VIP key open at once, over every worker; one
    /// beyond is refused (reset). 0: no limit.
    pub max_connections: u32,
    /// Connections (and UDP flows) a backend may have open at once, from every Service; a full
    /// backend is passed over for new TCP connections and SCTP associations, and a client finding
    /// every eligible backend full is refused. 0: no limit.
    pub max_backend_connections: u32,
    /// New TCP connections and SCTP associations one client IP may open to this VIP key;
    /// beyond it they are refused. `None`: no limit.
    pub client_rate: Option<ClientRate>,
    /// The PROXY protocol header the backends receive first (per datagram on UDP). In a built
    /// entry it is one the entry's protocol supports ([`ProxyProtocol::for_protocol`]).
    pub proxy_protocol: ProxyProtocol,
    /// Backend connects (TCP) and UDP upstream sockets leave from the client's own IP address, so
    /// backends see the client as the source (`ringlb.io/transparent`). Never set on an SCTP entry.
    pub transparent: bool,
}

impl Default for EntryPolicy {
    fn default() -> Self {
        EntryPolicy {
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(300),
            not_ready_connections: NotReadyConnections::Drain,
            udp_unreplied_timeout: Duration::from_secs(30),
            udp_replied_timeout: Duration::from_secs(120),
            udp_stale_flows: StaleFlowPolicy::Move,
            max_connections: 0,
            max_backend_connections: 0,
            client_rate: None,
            proxy_protocol: ProxyProtocol::None,
            transparent: false,
        }
    }
}

/// Per-entry policy that is not `Copy` (unlike [`EntryPolicy`], which each connection copies): who
/// may connect, affinity, and how backends' health is watched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    /// `spec.loadBalancerSourceRanges`: clients outside every range are refused (TCP) or dropped
    /// (UDP) before anything else. Empty: every client is allowed.
    pub source_ranges: Vec<Cidr>,
    /// `sessionAffinity: ClientIP`: how long a client keeps its backend after its last new
    /// connection (`sessionAffinityConfig.clientIP.timeoutSeconds`). `None`: no affinity.
    pub session_affinity: Option<Duration>,
    /// Whether `externalTrafficPolicy: Local` narrowed the backends to this node's endpoints.
    pub node_local: bool,
    /// Active health checks (`ringlb.io/health-check`); `None`: Kubernetes readiness only.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive outlier detection parameters (always on; see [`crate::health::OutlierDetector`]).
    pub outlier: OutlierConfig,
}

impl TrafficPolicy {
    /// Whether `client` may connect: inside one of the source ranges, or there are none.
    pub fn allows(&self, client: IpAddr) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|range| range.contains(client))
    }
}

/// Everything the datapath needs to serve one [`VipKey`].
#[derive(Debug, Serialize)]
pub struct ServiceEntry {
    pub key: VipKey,
    pub service: ObjectRef,
    /// `spec.ports[].name` of the service port, if any.
    pub port_name: Option<String>,
    /// All endpoints of the Service resolved for this port, sorted by [`BackendId`], eligible or not
    /// (kept for display and for draining decisions). Shared with the build cache and with the
    /// entries of the same Service port on its other VIPs.
    pub backends: Arc<[Backend]>,
    /// Indices into `backends` of those that may receive new connections, ascending.
    pub eligible: Vec<BackendIdx>,
    pub scheduler: Scheduler,
    pub policy: EntryPolicy,
    pub traffic: TrafficPolicy,
}

impl ServiceEntry {
    /// Whether `other` serves exactly as this entry does: same key, Service, port, backends and
    /// policies, and a scheduler built from the same configuration (a scheduler is a function of
    /// its configuration, the backends and the eligible ones). What decides whether a build must be
    /// published; cheaper than comparing the schedulers' tables.
    pub fn serves_like(&self, other: &ServiceEntry) -> bool {
        self.key == other.key
            && self.service == other.service
            && self.port_name == other.port_name
            && self.backends == other.backends
            && self.eligible == other.eligible
            && self.policy == other.policy
            && self.traffic == other.traffic
            && self.scheduler.config() == other.scheduler.config()
    }

    pub fn backend(&self, idx: BackendIdx) -> Option<&Backend> {
        self.backends.get(idx as usize)
    }

    /// The index of backend `id` in this entry, if it is one of its backends.
    pub fn index_of(&self, id: BackendId) -> Option<BackendIdx> {
        let position = self.backends.binary_search_by_key(&id, |b| b.id).ok()?;
        BackendIdx::try_from(position).ok()
    }

    /// Whether `idx` may receive new connections.
    pub fn is_eligible(&self, idx: BackendIdx) -> bool {
        self.eligible.binary_search(&idx).is_ok()
    }

    /// Whether serving this entry reads the client's address: source ranges, session affinity, a
    /// scheduler hashing it, a PROXY protocol header carrying it or a transparent backend socket
    /// bound to it. The datapath skips looking the address up (a `getpeername` per connection) when
    /// it does not.
    pub fn needs_client_address(&self) -> bool {
        self.policy.proxy_protocol != ProxyProtocol::None
            || self.policy.transparent
            || !self.traffic.source_ranges.is_empty()
            || self.traffic.session_affinity.is_some()
            || self.policy.client_rate.is_some()
            || self.scheduler.kind().uses_client()
    }

    /// Whether `client` may connect at all (see [`TrafficPolicy::allows`]).
    pub fn allows(&self, client: IpAddr) -> bool {
        self.traffic.allows(client)
    }
}

/// One Service's `spec.healthCheckNodePort` as this node answers it (kube-proxy's contract for
/// external load balancers, see `crate::builder` and its `health_check_node_ports` rule): an HTTP
/// server on `port` says 200 while `local_endpoints` is not zero, 503 otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheckNodePort {
    pub port: u16,
    pub service: ObjectRef,
    /// The Service's ready (and not terminating) endpoints on this node, counted once per IP
    /// whatever the number of ports and VIPs (as kube-proxy counts them).
    pub local_endpoints: u32,
}

/// What [`Snapshot::changes_from`] yields.
pub struct EntryChanges<'a> {
    before: std::iter::Peekable<std::collections::btree_map::Iter<'a, VipKey, Arc<ServiceEntry>>>,
    after: std::iter::Peekable<std::collections::btree_map::Iter<'a, VipKey, Arc<ServiceEntry>>>,
}

impl<'a> Iterator for EntryChanges<'a> {
    type Item = (Option<&'a Arc<ServiceEntry>>, Option<&'a Arc<ServiceEntry>>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.before.peek(), self.after.peek()) {
                (None, None) => return None,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((a, _)), Some((b, _))) => a.cmp(b),
            };
            match order {
                std::cmp::Ordering::Less => return self.before.next().map(|(_, e)| (Some(e), None)),
                std::cmp::Ordering::Greater => return self.after.next().map(|(_, e)| (None, Some(e))),
                std::cmp::Ordering::Equal => {
                    let (_, a) = self.before.next()?;
                    let (_, b) = self.after.next()?;
                    if !Arc::ptr_eq(a, b) {
                        return Some((Some(a), Some(b)));
                    }
                }
            }
        }
    }
}

/// The last good spec of every Service a snapshot was built from, by Service.
pub(crate) type LastGood = BTreeMap<ObjectRef, Arc<ParsedService>>;

/// The immutable table the datapath serves: one [`ServiceEntry`] per [`VipKey`].
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Increases with every snapshot a source publishes; 0 is the empty start-up snapshot.
    pub version: u64,
    /// Serialised as a list in key order: JSON map keys must be strings and a `VipKey` is a struct.
    #[serde(serialize_with = "serialize_entries")]
    entries: BTreeMap<VipKey, Arc<ServiceEntry>>,
    /// The health-check node ports this node answers, sorted by port (see [`HealthCheckNodePort`]).
    /// Empty without a node name: `externalTrafficPolicy: Local` is then ignored.
    health_check_node_ports: Arc<[HealthCheckNodePort]>,
    /// Which nodes may announce each IP (MetalLB's advertisement objects); set by the control loop
    /// after a build, kept by [`crate::apply_health`]. Not served by the workers, not shown.
    #[serde(skip)]
    announcements: Arc<Announcements>,
    /// What the next build needs of this one: the spec each Service was served from, so that a
    /// Service rejected next time keeps its policy (see [`crate::build`]). Not served, not shown.
    #[serde(skip)]
    last_good: Arc<LastGood>,
}

fn serialize_entries<S: serde::Serializer>(
    entries: &BTreeMap<VipKey, Arc<ServiceEntry>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(entries.values())
}

impl Snapshot {
    pub fn empty() -> Self {
        Snapshot::default()
    }

    pub fn from_entries(version: u64, entries: impl IntoIterator<Item = ServiceEntry>) -> Self {
        let entries = entries.into_iter().map(|e| (e.key, Arc::new(e))).collect();
        Snapshot {
            version,
            entries,
            health_check_node_ports: Arc::default(),
            announcements: Arc::default(),
            last_good: Arc::default(),
        }
    }

    pub(crate) fn from_parts(
        version: u64,
        entries: BTreeMap<VipKey, Arc<ServiceEntry>>,
        last_good: Arc<LastGood>,
    ) -> Self {
        Snapshot {
            version,
            entries,
            health_check_node_ports: Arc::default(),
            announcements: Arc::default(),
            last_good,
        }
    }

    /// This snapshot with `ports` (sorted by port, one Service each) as its health-check node ports.
    pub(crate) fn with_health_check_node_ports(self, ports: Arc<[HealthCheckNodePort]>) -> Self {
        debug_assert!(ports.windows(2).all(|w| w[0].port < w[1].port), "sorted, one Service per port");
        Snapshot { health_check_node_ports: ports, ..self }
    }

    /// The `spec.healthCheckNodePort`s this node answers, sorted by port; what an external load
    /// balancer probes to learn whether this node has an endpoint of a Service.
    pub fn health_check_node_ports(&self) -> &Arc<[HealthCheckNodePort]> {
        &self.health_check_node_ports
    }

    /// This snapshot with `announcements` saying which nodes may announce its IPs.
    pub fn with_announcements(self, announcements: Arc<Announcements>) -> Self {
        Snapshot { announcements, ..self }
    }

    /// Which nodes may announce each IP ([`Announcements::ungoverned`] unless a source set it).
    pub fn announcements(&self) -> &Arc<Announcements> {
        &self.announcements
    }

    pub(crate) fn last_good(&self) -> &Arc<LastGood> {
        &self.last_good
    }

    pub fn get(&self, key: &VipKey) -> Option<&Arc<ServiceEntry>> {
        self.entries.get(key)
    }

    /// Entries in `VipKey` order.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.entries.values()
    }

    pub fn keys(&self) -> impl Iterator<Item = &VipKey> {
        self.entries.keys()
    }

    /// The entries that differ from `previous`'s, in key order: `(before, after)` for each key that
    /// was added, removed or holds another entry now. An entry is the same when it is the same
    /// `Arc` (successive builds and health overlays keep unchanged entries so), which makes this a
    /// pointer compare per key rather than a deep one: followers of the table (the health monitor)
    /// then do work for what changed, not for the table's size.
    pub fn changes_from<'a>(&'a self, previous: &'a Snapshot) -> EntryChanges<'a> {
        EntryChanges { before: previous.entries.iter().peekable(), after: self.entries.iter().peekable() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::SchedulerKind;
    use crate::testing::entry;

    #[test]
    fn only_ranges_affinity_and_client_hashing_need_the_client_address() {
        let mut plain = entry(&[true, true], TrafficPolicy::default());
        assert!(!plain.needs_client_address());
        for kind in SchedulerKind::ALL {
            plain.scheduler = Scheduler::build(*kind, &plain.backends, &plain.eligible);
            let hashes_client =
                matches!(kind, SchedulerKind::SourceHash | SchedulerKind::Maglev | SchedulerKind::RingHash);
            assert_eq!(plain.needs_client_address(), hashes_client, "{kind}");
        }
        let ranged = TrafficPolicy {
            source_ranges: vec!["10.0.0.0/8".parse().expect("cidr")],
            ..TrafficPolicy::default()
        };
        assert!(entry(&[true], ranged).needs_client_address());
        let sticky =
            TrafficPolicy { session_affinity: Some(Duration::from_secs(60)), ..TrafficPolicy::default() };
        assert!(entry(&[true], sticky).needs_client_address());
        let mut proxied = entry(&[true], TrafficPolicy::default());
        proxied.policy.proxy_protocol = ProxyProtocol::V1;
        assert!(proxied.needs_client_address());
        let mut transparent = entry(&[true], TrafficPolicy::default());
        transparent.policy.transparent = true;
        assert!(transparent.needs_client_address(), "its backend socket is bound to that address");
    }

    #[test]
    fn changes_from_yields_exactly_the_added_removed_and_replaced_entries() {
        let at = |port: u16| {
            let mut e = entry(&[true], TrafficPolicy::default());
            e.key = VipKey::new([192, 0, 2, 1].into(), port, Protocol::Tcp);
            Arc::new(e)
        };
        let (kept, replaced, removed) = (at(1), at(2), at(3));
        let before = Snapshot::from_parts(
            1,
            [&kept, &replaced, &removed].into_iter().map(|e| (e.key, Arc::clone(e))).collect(),
            Arc::default(),
        );
        let (replacement, added) = (at(2), at(4));
        let after = Snapshot::from_parts(
            2,
            [&kept, &replacement, &added].into_iter().map(|e| (e.key, Arc::clone(e))).collect(),
            Arc::default(),
        );
        let ports = |(a, b): (Option<&Arc<ServiceEntry>>, Option<&Arc<ServiceEntry>>)| {
            (a.map(|e| e.key.port), b.map(|e| e.key.port))
        };
        let changes: Vec<_> = after.changes_from(&before).map(ports).collect();
        assert_eq!(changes, [(Some(2), Some(2)), (Some(3), None), (None, Some(4))]);
        assert_eq!(after.changes_from(&after).count(), 0);
        assert_eq!(after.changes_from(&Snapshot::empty()).count(), 3);
    }
}
