//! The command line: every flag of every subcommand, declared once with `clap`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_core::{ProxyProtocol, SchedulerKind};

#[derive(Debug, Parser)]
#[command(
    name = "ringlb",
    version,
    about = "A thread-per-core io_uring L4 load balancer for Kubernetes Services"
)]
pub struct Cli {
    /// A TOML file of flags: top-level keys for the global flags, a table per subcommand (`[run]`)
    /// keyed by long flag name (`workers = 2`). Flags on the command line, then their environment
    /// variables, win over the file. See README, "The appliance package".
    #[arg(long, env = "RINGLB_CONFIG", value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    /// Log format: `human` for terminals, `json` for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (overridden by RUST_LOG when set), e.g. `info,lb_datapath=debug`.
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum Command {
    /// Serve the LoadBalancer Services and external IPs of a Kubernetes cluster (watched through its
    /// API), or, with `--manifests`, of manifest files followed as they change.
    Run(RunArgs),
    /// Print the table that `run` would serve (from manifests or from the cluster) and exit non-zero
    /// when anything is rejected.
    Check(CheckArgs),
    /// Start built-in backends on loopback and balance a VIP on 127.0.0.1 across them.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Serve a manifest file or directory (multi-document YAML as `kubectl get -o yaml` writes it)
    /// instead of a cluster.
    #[arg(long, conflicts_with_all = ["kubeconfig", "namespaces"])]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub election: ElectionArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub defaults: DefaultsArgs,
    #[command(flatten)]
    pub vips: VipArgs,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub bgp: BgpArgs,
}

/// What external load balancers probe, as they probe kube-proxy.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Serve kube-proxy's node health check on this address (e.g. 0.0.0.0:10256): `GET /healthz`
    /// and `/livez` answer 200 while ringlb serves and 503 before the first table is served and
    /// from the first shutdown signal on (the whole grace period), with kube-proxy's JSON body.
    /// Meant to be reachable by external load balancers, unlike --admin. Where kube-proxy runs it
    /// holds 10256 itself: pick another port. [default: off]
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<SocketAddr>,
    /// Answer the `spec.healthCheckNodePort` of every served LoadBalancer Service with
    /// `externalTrafficPolicy: Local`, on all addresses, as kube-proxy does: 200 while this node
    /// has a ready endpoint of the Service, else 503 (always 503 while shutting down). Needs
    /// --node-name: without it (appliance mode) that policy is ignored and no port is answered.
    /// A port that cannot be bound (e.g. kube-proxy holds it) is counted in /status and retried.
    /// `--service-health-checks=false` turns it off.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub service_health_checks: bool,
}

/// BGP mode: advertising VIPs through BIRD 2.
#[derive(Debug, Args)]
pub struct BgpArgs {
    /// Advertise every VIP with an eligible backend as a /32 (/128) route of BIRD 2: ringlb
    /// writes them to this file (static protocols `ringlb_vips4` and `ringlb_vips6`), which the
    /// node's bird.conf includes and exports to its BGP peers (see deploy/bird/), and reloads BIRD
    /// after each change. Every route is withdrawn on shutdown.
    #[arg(long, value_name = "PATH")]
    pub bird_include: Option<PathBuf>,
    /// BIRD's control socket.
    #[arg(long, value_name = "PATH", default_value = lb_sync::bird::DEFAULT_SOCKET, requires = "bird_include")]
    pub bird_socket: PathBuf,
    /// The birdc program that reloads BIRD (`birdc -s SOCKET configure`).
    #[arg(long, value_name = "PROGRAM", default_value = "birdc", requires = "bird_include")]
    pub birdc: PathBuf,
    /// Route the VIPs through a TUN interface of this name that ringlb creates and that the kernel
    /// deletes when ringlb ends, however it ends: BIRD then withdraws the routes of a ringlb that
    /// was killed or crashed. Needs /dev/net/tun and CAP_NET_ADMIN.
    #[arg(long, value_name = "NAME", requires = "bird_include")]
    pub bird_liveness_link: Option<String>,
    /// This node's AS number, for the BGP sessions ringlb renders itself (--bgp-peer): then
    /// bird.conf needs only a router id, `protocol device` and the include.
    #[arg(long, value_name = "ASN", requires_all = ["bird_include", "bgp_peers"])]
    pub bgp_asn: Option<u32>,
    /// A BGP neighbour as ADDRESS:ASN (repeatable), rendered into --bird-include; it gets the
    /// VIPs of its address family and nothing is imported from it.
    #[arg(long = "bgp-peer", value_name = "ADDRESS:ASN", requires = "bgp_asn", value_parser = parse_peer)]
    pub bgp_peers: Vec<lb_sync::bird::BgpPeer>,
    /// Guard the rendered sessions with BFD (100 ms x 3): renders a BFD protocol of ringlb's own, so
    /// bird.conf must have none.
    #[arg(long, requires = "bgp_asn")]
    pub bgp_bfd: bool,
    /// Take the BGP sessions and what each advertises from MetalLB's BGPPeer, BGPAdvertisement,
    /// Community and BFDProfile objects in --pool-namespace (cluster mode), for the Node
    /// --node-name: rendered into --bird-include, so bird.conf needs only a router id,
    /// `protocol device` and the include. A pool no BGPAdvertisement selects is not advertised.
    #[arg(long, requires_all = ["bird_include", "node_name"], conflicts_with_all = ["bgp_asn", "manifests"])]
    pub bgp_from_cluster: bool,
}

#[derive(Debug, Args)]
pub struct VipArgs {
    /// Hold every served VIP as a host address (/32, /128) of this link, through netlink: found,
    /// or created and deleted again on exit. Only addresses ringlb added are ever removed. Without
    /// it VIPs are bound with IP_FREEBIND and the network must route them to this host.
    #[arg(long, value_name = "NAME")]
    pub vip_link: Option<String>,
    /// The kind of link --vip-link creates when none of that name exists (bridge: a port-less
    /// bridge, for kernels without the dummy driver; tun: a TUN interface of the process, which
    /// the kernel deletes with its VIPs however ringlb ends, so a crashed ringlb's node never
    /// keeps answering for VIPs a peer took over: the choice for L2 mode).
    #[arg(long, value_enum, default_value_t = VipLinkKindArg::Dummy, requires = "vip_link")]
    pub vip_link_kind: VipLinkKindArg,
    /// Announce each VIP added to --vip-link on this interface, 3 times 500 ms apart (IPv4:
    /// gratuitous ARP; IPv6: unsolicited neighbour advertisements), so neighbours that cached
    /// another owner switch at once. Needs CAP_NET_RAW. For one ringlb per network segment:
    /// several replicas would announce the same VIPs.
    #[arg(long, value_name = "INTERFACE", requires = "vip_link")]
    pub announce_interface: Option<String>,
    /// L2 mode with several ringlb replicas on one segment: take the peers' heartbeats on this UDP
    /// address, and hold (and announce) on --vip-link only the VIPs this replica owns, one owner
    /// per IP, moved to a survivor when its owner dies. In a cluster the replicas find each other
    /// through the member Lease `<--lease-name>-l2` (give this node's own IP, e.g.
    /// `$(NODE_IP):7946`), which the API arbitrates: only listed replicas that hear all or a
    /// majority of the list announce, and the leader removes those it no longer hears.
    #[arg(long, value_name = "IP:PORT", requires = "vip_link")]
    pub l2_listen: Option<SocketAddr>,
    /// With --manifests: another replica's --l2-listen address (repeatable). Heartbeats from any
    /// other address are ignored.
    #[arg(long = "l2-peer", value_name = "IP:PORT", requires = "l2_listen")]
    pub l2_peers: Vec<SocketAddr>,
    /// This replica's name in the owner hash [default: --node-name, else the host name]; unique
    /// among the replicas.
    #[arg(long, value_name = "NAME", requires = "l2_listen")]
    pub l2_node: Option<String>,
    /// How often heartbeats are sent.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub l2_interval: Duration,
    /// A peer unheard for this long is gone and its VIPs move: the failover time, less the
    /// announcement's few milliseconds. A replica that hears too few peers for half of it falls
    /// silent (so a cut-off one is silent before the others take over): keep --l2-interval at
    /// most a quarter of it.
    #[arg(long, value_parser = parse_duration, default_value = "400ms")]
    pub l2_timeout: Duration,
    /// With --l2-peer: announce nothing while hearing half of the replicas or fewer, so the
    /// minority side of a partition falls silent (for 3 replicas or more; with 2, a survivor would
    /// never announce). A cluster's member Lease has a gate of its own.
    #[arg(long, requires = "l2_listen")]
    pub l2_quorum: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VipLinkKindArg {
    Dummy,
    Bridge,
    Tun,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check a manifest file or directory instead of a cluster.
    #[arg(long, conflicts_with_all = ["kubeconfig", "namespaces"])]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Print the table as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub defaults: DefaultsArgs,
}

/// Where the cluster is and which of its Services are ringlb's.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// kubeconfig file [default: $KUBECONFIG, then ~/.kube/config, then the in-cluster
    /// ServiceAccount].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Watch only this namespace (repeatable) [default: every namespace].
    #[arg(long = "namespace", value_name = "NAMESPACE")]
    pub namespaces: Vec<String>,
    /// The `spec.loadBalancerClass` of the Services ringlb serves.
    #[arg(long, default_value = lb_core::selection::DEFAULT_CLASS)]
    pub load_balancer_class: String,
    /// Also serve LoadBalancer Services without a class (ringlb as the cluster's default
    /// implementation). Manifests are always ringlb's, class or not.
    #[arg(long)]
    pub default_class: bool,
    /// Serve `spec.externalIPs` of any Service (`--external-ips=false` turns that off).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub external_ips: bool,
    /// The namespace of the MetalLB `IPAddressPool`s addresses are allocated from.
    #[arg(long, default_value = "metallb-system")]
    pub pool_namespace: String,
}

/// Leader election: one replica allocates and writes statuses.
#[derive(Debug, Args)]
pub struct ElectionArgs {
    /// Namespace of the election Lease [default: $POD_NAMESPACE, else ringlb-system].
    #[arg(long, env = "POD_NAMESPACE", default_value = "ringlb-system")]
    pub lease_namespace: String,
    /// Name of the election Lease.
    #[arg(long, default_value = "ringlb")]
    pub lease_name: String,
    /// This replica's identity in the Lease [default: $POD_NAME, else the host name and PID].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the Lease holds without renewal: a dead leader is replaced after at most this.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Port of the demo VIP on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// First port of the built-in backends (three consecutive ports; a fourth, not ready, follows).
    #[arg(long, default_value_t = 18081)]
    pub backend_port: u16,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Datapath worker threads, each with its own io_uring ring [default: one per available core].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Do not pin worker threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// How TCP bytes are relayed.
    #[arg(long, value_enum, default_value_t = RelayArg::Auto)]
    pub relay: RelayArg,
    /// Where TCP and UDP VIPs listen. auto: a socket per VIP:port and worker while they fit the
    /// descriptor budget, beyond that VIPs sharing a port share one wildcard socket per worker
    /// (0.0.0.0:port, [::]:port), which refuses connections (drops datagrams) to addresses of the
    /// host that are no VIP of that port; exact: never a wildcard; wildcard: always for VIPs
    /// sharing a port. A port some other socket of the host holds keeps a socket per VIP anyway.
    #[arg(long, value_enum, default_value_t = ListenersArg::Auto)]
    pub listeners: ListenersArg,
    /// On SIGTERM or SIGINT, how long established connections and UDP flows may go on after the
    /// listeners closed; then what is left is closed. 0 closes everything at once; a second signal
    /// does too.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// UDP flows one worker tracks at most (least recently used evicted beyond) [default: 65536].
    #[arg(long)]
    pub udp_max_flows: Option<usize>,
    /// Receive buffer of each UDP VIP socket in bytes (forced past net.core.rmem_max when ringlb may);
    /// it absorbs bursts while a worker is busy. 0 keeps the kernel default [default: 16777216].
    #[arg(long)]
    pub udp_receive_buffer: Option<usize>,
    /// How backend TCP connects get their source ports. kernel: the kernel searches its whole
    /// net.ipv4.ip_local_port_range for a free one; kernel-per-worker: the kernel searches within
    /// the worker's share of the range; worker: each worker binds the socket to the next port of
    /// its share of --source-port-range, so the kernel only checks the 4-tuple. worker needs a
    /// range of its own (outside ip_local_port_range, or listed in ip_local_reserved_ports): ports
    /// bound that way, and their TIME_WAIT, are closed to every other process's connect.
    #[arg(long, value_enum, default_value_t = SourcePortsArg::Kernel)]
    pub source_ports: SourcePortsArg,
    /// The source ports the workers share out for backend TCP connects, as LOW-HIGH [default: the
    /// kernel's net.ipv4.ip_local_port_range; required by --source-ports worker].
    #[arg(long, value_parser = parse_port_range, required_if_eq("source_ports", "worker"))]
    pub source_port_range: Option<std::ops::RangeInclusive<u16>>,
    /// Hot upgrade: listen on this unix socket for a new ringlb; started with the same path while
    /// one runs, a ringlb takes the VIP sockets of the running one over it (no client is refused)
    /// and the old one drains and exits. Its directory must exist and be private to ringlb.
    #[arg(long)]
    pub upgrade_socket: Option<PathBuf>,
    /// How finely /metrics counts traffic: `backend` (per VIP key and backend) or `vip` (per VIP
    /// key only: fewer series for tables of many backends).
    #[arg(long, value_enum, default_value_t = MetricsDetailArg::Backend)]
    pub metrics_detail: MetricsDetailArg,
}

/// `LOW-HIGH`, both ports, LOW at most HIGH.
fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = text.split_once('-').ok_or_else(|| format!("{text}: expected LOW-HIGH"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p}: {e}"));
    let (low, high) = (port(low)?, port(high)?);
    if low == 0 || low > high {
        return Err(format!("{text}: expected 1 <= LOW <= HIGH"));
    }
    Ok(low..=high)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourcePortsArg {
    Worker,
    KernelPerWorker,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricsDetailArg {
    Backend,
    Vip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListenersArg {
    Auto,
    Exact,
    Wildcard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StaleFlowsArg {
    /// A flow whose backend is no longer eligible moves to a new backend on its next datagram.
    Move,
    /// Such a flow keeps its backend until the entry's drain timeout.
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RelayArg {
    Auto,
    Copy,
    Splice,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin HTTP listener (`/healthz`, `/readyz`); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:9901", value_parser = parse_admin)]
    pub admin: AdminAddr,
    /// Allow the admin listener on a non-loopback address.
    #[arg(long)]
    pub admin_allow_remote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAddr {
    Off,
    Listen(SocketAddr),
}

fn parse_admin(value: &str) -> Result<AdminAddr, String> {
    if value == "off" {
        return Ok(AdminAddr::Off);
    }
    value.parse().map(AdminAddr::Listen).map_err(|e| format!("{value:?} is not `off` or an IP:port ({e})"))
}

/// Global defaults that Service annotations override.
#[derive(Debug, Args)]
pub struct DefaultsArgs {
    /// Scheduler for Services without a `ringlb.io/scheduler` annotation.
    #[arg(long, default_value = "rr", value_parser = parse_scheduler)]
    pub scheduler: SchedulerKind,
    /// Time one backend connect may take before the next backend is tried (e.g. `2s`, `500ms`).
    #[arg(long, value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Close connections idle for this long.
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// How long established connections of removed VIPs and backends may continue.
    #[arg(long, value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// The Kubernetes node ringlb runs on (set it from the downward API when ringlb runs on cluster
    /// nodes). With it, Services with `externalTrafficPolicy: Local` use only this node's endpoints
    /// and `run` answers their `healthCheckNodePort` (see --service-health-checks); without it
    /// (appliance mode) that policy is ignored and no health-check node port is answered.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// What happens to established TCP/SCTP connections of a backend that turns not ready, for
    /// Services without `ringlb.io/not-ready-connections`.
    #[arg(long, value_enum, default_value_t = NotReadyArg::Drain)]
    pub not_ready_connections: NotReadyArg,
    /// Idle timeout of a UDP flow whose backend never replied (`ringlb.io/udp-unreplied-timeout`)
    /// [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub udp_unreplied_timeout: Option<Duration>,
    /// Idle timeout of a UDP flow that saw a reply (`ringlb.io/udp-replied-timeout`) [default: 120s].
    #[arg(long, value_parser = parse_duration)]
    pub udp_replied_timeout: Option<Duration>,
    /// What happens to a UDP flow whose backend turns not ready or goes away
    /// (`ringlb.io/udp-stale-flows`).
    #[arg(long, value_enum, default_value_t = StaleFlowsArg::Move)]
    pub udp_stale_flows: StaleFlowsArg,
    /// Default `ringlb.io/max-connections`: TCP connections (and SCTP associations) one VIP key
    /// may have open at once; beyond, clients are reset (counted in /metrics). Default: no limit.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: Option<u32>,
    /// Default `ringlb.io/max-backend-connections`: connections a backend may have open at once;
    /// a full backend is passed over. Default: no limit.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_backend_connections: Option<u32>,
    /// Default `ringlb.io/client-connection-rate`: new connections per second one client IP may
    /// open to a VIP key; beyond, they are reset. Default: no limit.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_connection_rate: Option<u32>,
    /// Default `ringlb.io/client-connection-burst` (connections at once after a pause) for
    /// --client-connection-rate. Default: the rate.
    #[arg(long, requires = "client_connection_rate", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_connection_burst: Option<u32>,
    /// PROXY protocol header (`none`, `v1`, `v2`) the backends of Services without
    /// `ringlb.io/proxy-protocol` receive before any client byte: `v1` reaches their TCP ports
    /// only, `v2` their TCP and UDP ports (a header in every datagram); SCTP ports never get one.
    #[arg(long, default_value = "none", value_parser = ProxyProtocol::parse)]
    pub proxy_protocol: ProxyProtocol,
    /// Default `ringlb.io/transparent`: backend connects of TCP ports and UDP upstream sockets
    /// leave from the client's own IP address, so backends see the client (SCTP ports never do).
    /// Needs CAP_NET_ADMIN (or CAP_NET_RAW) and policy routing (README "Transparent mode").
    #[arg(long)]
    pub transparent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NotReadyArg {
    /// They continue for at most the drain timeout.
    Drain,
    /// They continue while the endpoint is listed, as kube-proxy does.
    Keep,
    /// They are closed at once.
    Close,
}

fn parse_peer(value: &str) -> Result<lb_sync::bird::BgpPeer, String> {
    value.parse().map_err(|e: lb_sync::bird::peers::InvalidPeer| e.to_string())
}

fn parse_scheduler(value: &str) -> Result<SchedulerKind, String> {
    value.parse().map_err(|e: lb_core::scheduler::UnknownScheduler| e.to_string())
}

/// Durations as annotations spell them (Go syntax: `250ms`, `1m30s`, `1.5s`), parsed by lb-core's one
/// parser.
fn parse_duration(value: &str) -> Result<Duration, String> {
    lb_core::parse_duration(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_address_accepts_off_and_socket_addresses() {
        assert_eq!(parse_admin("off"), Ok(AdminAddr::Off));
        assert_eq!(parse_admin("127.0.0.1:9901"), Ok(AdminAddr::Listen("127.0.0.1:9901".parse().unwrap())));
        assert!(parse_admin("localhost").is_err());
    }

    #[test]
    fn bgp_peers_need_an_asn_and_an_include_file() {
        let run =
            |flags: &[&str]| Cli::try_parse_from(["ringlb", "run", "--manifests", "m"].iter().chain(flags));
        let parsed = run(&["--bird-include", "f", "--bgp-asn", "64513", "--bgp-peer", "192.0.2.1:64512"]);
        let Command::Run(args) = parsed.expect("valid flags").command else { panic!("not run") };
        assert_eq!((args.bgp.bgp_asn, args.bgp.bgp_peers.len(), args.bgp.bgp_bfd), (Some(64513), 1, false));
        assert!(run(&["--bird-include", "f", "--bgp-peer", "192.0.2.1:64512"]).is_err(), "no --bgp-asn");
        assert!(run(&["--bird-include", "f", "--bgp-asn", "64513"]).is_err(), "no --bgp-peer");
        assert!(run(&["--bgp-asn", "64513", "--bgp-peer", "192.0.2.1:64512"]).is_err(), "no include");
        let bad =
            run(&["--bird-include", "f", "--bgp-asn", "1", "--bgp-peer", "192.0.2.1"]).expect_err("bad");
        assert!(bad.to_string().contains("no :ASN"), "{bad}");
    }

    #[test]
    fn bgp_from_the_cluster_needs_an_include_file_and_a_node_and_excludes_the_other_sources_of_sessions() {
        let run = |flags: &[&str]| Cli::try_parse_from(["ringlb", "run"].iter().chain(flags));
        let parsed = run(&["--bgp-from-cluster", "--bird-include", "f", "--node-name", "node1"]);
        let Command::Run(args) = parsed.expect("valid flags").command else { panic!("not run") };
        assert!(args.bgp.bgp_from_cluster);
        assert!(run(&["--bgp-from-cluster", "--node-name", "node1"]).is_err(), "no include");
        assert!(run(&["--bgp-from-cluster", "--bird-include", "f"]).is_err(), "no node");
        let asn = ["--bgp-asn", "64513", "--bgp-peer", "192.0.2.1:64512"];
        let with_asn =
            [&["--bgp-from-cluster", "--bird-include", "f", "--node-name", "n"][..], &asn].concat();
        assert!(run(&with_asn).is_err(), "sessions from flags and from the cluster at once");
        let manifests = ["--bgp-from-cluster", "--bird-include", "f", "--node-name", "n", "--manifests", "m"];
        assert!(run(&manifests).is_err(), "no cluster to read them from");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
