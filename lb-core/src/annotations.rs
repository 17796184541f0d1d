//! Every annotation ringlb reads, declared once with its meaning and accepted values.
//!
//! Parsing lives in `builder::policy` and `builder::health_policy` (once per build); the README lists
//! the same table. Kubernetes fields ringlb reads besides these (`spec.loadBalancerSourceRanges`,
//! `spec.sessionAffinity`, `spec.externalTrafficPolicy`) are parsed in `builder::traffic`. An invalid
//! value rejects the object it is on (see [`crate::BuildError::InvalidAnnotation`]), never silently
//! falls back, except [`WEIGHT`] on an EndpointSlice (the slice's endpoints keep weight 1, and an error
//! is reported) because dropping a slice would take healthy backends out of service.

/// MetalLB's requested VIPs (comma-separated, at most one per address family) for a
/// `LoadBalancer` Service. Takes precedence over the deprecated `spec.loadBalancerIP`. The
/// allocator assigns them when a pool holds them and nothing else has them; in standalone use
/// (manifests, no allocator) they are served directly when the status holds no IP.
pub const METALLB_LOAD_BALANCER_IPS: &str = "metallb.io/loadBalancerIPs";

/// On a `LoadBalancer` Service: the name of the `IPAddressPool` to allocate from (otherwise every
/// pool that admits the Service, by priority).
pub const METALLB_ADDRESS_POOL: &str = "metallb.io/address-pool";

/// On a `LoadBalancer` Service: a sharing key. Services with the same key may share an IP when
/// their ports and protocols do not collide (ringlb dispatches per port, so unlike MetalLB it also
/// shares between Services that select different pods or use `externalTrafficPolicy: Local`).
pub const METALLB_ALLOW_SHARED_IP: &str = "metallb.io/allow-shared-ip";

/// The deprecated spelling MetalLB still reads for each of its annotations.
pub const METALLB_DEPRECATED: &[(&str, &str)] = &[
    (METALLB_LOAD_BALANCER_IPS, "metallb.universe.tf/loadBalancerIPs"),
    (METALLB_ADDRESS_POOL, "metallb.universe.tf/address-pool"),
    (METALLB_ALLOW_SHARED_IP, "metallb.universe.tf/allow-shared-ip"),
];

/// The value of MetalLB annotation `name` (one of the `METALLB_*` constants), under its current
/// spelling or else its deprecated one, trimmed; `None` when absent or empty.
pub fn metallb<'a>(annotations: &'a crate::Labels, name: &str) -> Option<&'a str> {
    let old = METALLB_DEPRECATED.iter().find(|(new, _)| *new == name).map(|(_, old)| *old);
    let value = annotations.get(name).or_else(|| old.and_then(|old| annotations.get(old)))?;
    Some(value.trim()).filter(|v| !v.is_empty())
}

/// On a Service: the scheduler of all its ports: `rr`, `wrr`, `lc`, `wlc`, `sed`, `nq`, `dh`, `sh`,
/// `maglev`, `p2c` or `ring-hash` (see [`crate::SchedulerKind`]). Default:
/// `BuildOptions::default_scheduler` (`rr`).
pub const SCHEDULER: &str = "ringlb.io/scheduler";

/// On a Service: what the hashing schedulers (`sh`, `dh`, `maglev`, `ring-hash`) hash: `ip` (the
/// client IP, or for `dh` the VIP) or `ip-port` (IP and port). Default `ip`.
pub const HASH_KEY: &str = "ringlb.io/hash-key";

/// On a Service with `maglev`: the lookup table size, one of the primes 251, 1021, 4093, 16381,
/// 65537, 131071, 262139 (see [`crate::scheduler::TABLE_SIZES`]). Default 65537. Each slot costs 4
/// bytes per VIP key; keep it above 100 times the backend count for an even spread.
pub const MAGLEV_TABLE_SIZE: &str = "ringlb.io/maglev-table-size";

/// On a Service: active health checks of its backends: `tcp` (a connect) or `http:/path` (a GET of
/// `/path` expecting [`HEALTH_CHECK_STATUS`]). Unset: no active checks (Kubernetes readiness only).
/// The other `health-*` annotations are refused without this one.
pub const HEALTH_CHECK: &str = "ringlb.io/health-check";

/// On a Service with an `http:` health check: the expected status code, 100..=599. Default 200.
pub const HEALTH_CHECK_STATUS: &str = "ringlb.io/health-check-status";

/// On a Service with a health check: time between probes of one backend (each moved randomly by up
/// to 10% so probes do not synchronise). Duration as [`CONNECT_TIMEOUT`], > 0. Default `10s`.
pub const HEALTH_INTERVAL: &str = "ringlb.io/health-interval";

/// On a Service with a health check: how long one probe may take before it counts as failed.
/// Duration as [`CONNECT_TIMEOUT`], > 0. Default `2s`.
pub const HEALTH_TIMEOUT: &str = "ringlb.io/health-timeout";

/// On a Service with a health check: consecutive successful probes that make an unhealthy backend
/// healthy again, 1..=100. Default 2.
pub const HEALTH_RISE: &str = "ringlb.io/health-rise";

/// On a Service with a health check: consecutive failed probes that make a backend unhealthy,
/// 1..=100. Default 3.
pub const HEALTH_FALL: &str = "ringlb.io/health-fall";

/// On a Service: consecutive connect failures or resets that eject a backend (passive outlier
/// detection), 1..=1000. Default 5.
pub const OUTLIER_FAILURES: &str = "ringlb.io/outlier-consecutive-failures";

/// On a Service: length of a backend's first ejection; each repeat doubles it up to
/// [`OUTLIER_MAX_EJECTION`]. Duration as [`CONNECT_TIMEOUT`], > 0. Default `30s`.
pub const OUTLIER_BASE_EJECTION: &str = "ringlb.io/outlier-base-ejection";

/// On a Service: the longest ejection. Duration as [`CONNECT_TIMEOUT`], > 0. Default `5m`.
pub const OUTLIER_MAX_EJECTION: &str = "ringlb.io/outlier-max-ejection";

/// On a Service: most of its backends ejected at once, in percent, 0..=100 (rounded down: at 50, one
/// of two or three backends, none of one). Default 50.
pub const MAX_EJECTION_PERCENT: &str = "ringlb.io/max-ejection-percent";

/// Kubernetes' older spelling of `spec.loadBalancerSourceRanges` (comma-separated CIDRs), used only
/// when the field is empty, as kube-proxy does.
pub const LOAD_BALANCER_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// On a Service: how long one backend connect may take before the next backend is tried.
/// A duration in Go's syntax, as kube-proxy and most controllers take them (`250ms`, `5s`, `1m30s`,
/// `1.5s`, `2h`; see [`crate::parse_duration`]); must be > 0.
pub const CONNECT_TIMEOUT: &str = "ringlb.io/connect-timeout";

/// On a Service: close a connection idle in both directions for this long. Duration as
/// [`CONNECT_TIMEOUT`]; must be > 0.
pub const IDLE_TIMEOUT: &str = "ringlb.io/idle-timeout";

/// On a Service: how long established connections of a removed VIP or backend may continue. Duration
/// as [`CONNECT_TIMEOUT`]; `0s` closes them at once.
pub const DRAIN_TIMEOUT: &str = "ringlb.io/drain-timeout";

/// On a Service: what happens to established TCP and SCTP connections of a backend that turns not
/// ready: `drain` (continue up to [`DRAIN_TIMEOUT`]), `keep` (continue while the endpoint is listed,
/// as kube-proxy does) or `close` (at once). See [`crate::NotReadyConnections`]. Default: the
/// command line's `--not-ready-connections` (`drain`).
pub const NOT_READY_CONNECTIONS: &str = "ringlb.io/not-ready-connections";

/// On a Service: idle timeout of a UDP flow whose backend never replied. Duration as
/// [`CONNECT_TIMEOUT`], > 0. Default: `--udp-unreplied-timeout` (30s).
pub const UDP_UNREPLIED_TIMEOUT: &str = "ringlb.io/udp-unreplied-timeout";

/// On a Service: idle timeout of a UDP flow that saw a reply. Duration as [`CONNECT_TIMEOUT`], > 0.
/// Default: `--udp-replied-timeout` (120s).
pub const UDP_REPLIED_TIMEOUT: &str = "ringlb.io/udp-replied-timeout";

/// On a Service: what happens to a UDP flow whose backend is no longer eligible: `move` (its next
/// datagram picks a new backend) or `drain` (it keeps its backend up to [`DRAIN_TIMEOUT`]). See
/// [`crate::StaleFlowPolicy`]. Default: `--udp-stale-flows` (`move`).
pub const UDP_STALE_FLOWS: &str = "ringlb.io/udp-stale-flows";

/// On a Service: the PROXY protocol header its backends receive before any client byte, carrying
/// the client's address and the VIP:port it addressed: `v1` (text, TCP only), `v2` (binary; TCP,
/// and UDP with a header in every datagram) or `none`. `v1` on a Service with a UDP or SCTP port,
/// or `v2` on one with an SCTP port, is refused (the Service keeps its last good policy): a backend
/// that expects the header must never silently go without it. See [`crate::ProxyProtocol`].
/// Default: `--proxy-protocol` (`none`), applied to the ports whose protocol it has a header for.
pub const PROXY_PROTOCOL: &str = "ringlb.io/proxy-protocol";

/// On a Service: `true` makes its backend TCP connects and UDP upstream sockets leave from the
/// client's own IP address (`IP_TRANSPARENT`; the kernel picks the port), so its backends see the
/// client as the source, as without a proxy; `false` keeps the load balancer's address. Needs
/// `CAP_NET_ADMIN` (or `CAP_NET_RAW`) and the policy routing of the README's "Transparent mode":
/// without them connections fail (counted), never fall back to the load balancer's address.
/// `true` on a Service with an SCTP port is refused (the Service keeps its last good policy).
/// Default: `--transparent` (off), applied to TCP and UDP ports.
pub const TRANSPARENT: &str = "ringlb.io/transparent";

/// On a Service: how many backends one client connection may try in all, first try included; 1..=16.
pub const CONNECT_ATTEMPTS: &str = "ringlb.io/connect-attempts";

/// On a Service: TCP connections (and SCTP associations) one VIP key may have open at once, over
/// every worker, 1..=10000000; one beyond is refused with a reset. Default: `--max-connections`
/// (no limit).
pub const MAX_CONNECTIONS: &str = "ringlb.io/max-connections";

/// On a Service: connections a backend may have open at once (counting every Service's), same
/// range; a full backend gets no new connection of this Service. Default:
/// `--max-backend-connections` (no limit).
pub const MAX_BACKEND_CONNECTIONS: &str = "ringlb.io/max-backend-connections";

/// On a Service: new TCP connections (and SCTP associations) per second one client IP may open to
/// each of its VIP keys, 1..=1000000; beyond it they are refused with a reset. Default:
/// `--client-connection-rate` (no limit).
pub const CLIENT_CONNECTION_RATE: &str = "ringlb.io/client-connection-rate";

/// On a Service: how many connections a client may open at once after a pause under
/// [`CLIENT_CONNECTION_RATE`], 1..=1000000. Default: the rate; with the command line's rate, its
/// `--client-connection-burst`.
pub const CLIENT_CONNECTION_BURST: &str = "ringlb.io/client-connection-burst";

/// On an EndpointSlice: the weight of all its endpoints for `wrr`, 1..=10000. Default 1.
pub const WEIGHT: &str = "ringlb.io/weight";

/// On a Service: per-endpoint weights by endpoint IP, `10.0.0.1=3,10.0.0.2=1` (each 1..=10000). They
/// override [`WEIGHT`] of the slice; addresses that are not endpoints of the Service are ignored.
pub const BACKEND_WEIGHTS: &str = "ringlb.io/backend-weights";

/// The label that ties an EndpointSlice to its Service (set by Kubernetes, not by users).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Longest duration any timeout annotation accepts (30 days), so adding it to an `Instant` in the
/// datapath can never overflow.
pub const MAX_DURATION_SECS: u64 = 30 * 24 * 3600;

/// On the member Lease of L2 cluster mode (`<--lease-name>-l2`): the members as a JSON object of
/// node name → heartbeat address, `{"node-a": "10.0.0.1:7946"}`. Written by ringlb only (see
/// [`crate::l2::members`]); a value that does not parse counts as an empty list, logged.
pub const L2_MEMBERS: &str = "ringlb.io/l2-members";
