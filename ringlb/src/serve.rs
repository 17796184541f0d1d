//! `ringlb run` and the serving half of `ringlb demo`: start the datapath engine, run the control
//! thread (a current-thread tokio runtime: the source, its health probes, the admin listener, the
//! health servers external load balancers probe, signals) until SIGINT or SIGTERM, then shut down
//! gracefully: the node health answers turn 503 and the listeners close at once (`/readyz` turns
//! 503), established connections and UDP flows go on for `--shutdown-grace`, then what is left is
//! closed and ringlb exits 0; a second signal closes everything at once.
//!
//! The main thread becomes the control thread; datapath workers are the engine's own pinned threads.
//! The only thing handed from control to datapath is a `Snapshot`, through `Engine::publish`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lb_core::{
    BuildOptions, ClientRate, EntryPolicy, NotReadyConnections, ServiceEntry, ServiceSelection, Snapshot,
    StaleFlowPolicy, VipSource,
};
use lb_datapath::{Engine, EngineConfig, ListenMode, RelayMode, SourcePortMode, TrafficDetail, UdpConfig};
use lb_sync::allocator::{Allocator, PoolUsageHandle};
use lb_sync::announce::Announcer;
use lb_sync::announce::responder::Responder;
use lb_sync::bird::{self, Advertised, Bird, BirdConfig, BirdStatus, Peering};
use lb_sync::l2::members::{self, MemberLease};
use lb_sync::l2::{Arbiter, L2, L2Config, L2Counters, L2State, MemberList};
use lb_sync::leader::{self, LeaseConfig};
use lb_sync::liveness_link::LivenessLink;
use lb_sync::vip_link::{self, LinkKind, VipLink, VipLinkConfig};
use lb_sync::{ControlLoop, HealthStatus, KubeSource, ManifestSource, Readiness, SnapshotSink};
use serde_json::json;

use crate::admin::{self, AdminState};
use crate::cli::{
    AdminArgs, ClusterArgs, DefaultsArgs, EngineArgs, ListenersArg, MetricsDetailArg, NotReadyArg, RelayArg,
    RunArgs, SourcePortsArg, StaleFlowsArg, VipLinkKindArg,
};
use crate::metrics;
use crate::node_health::{self, NodeHealth};
use crate::service_health::{self, ServiceHealthStatus};
use crate::upgrade;

/// Where the served snapshots come from.
#[allow(clippy::large_enum_variant, reason = "one value per process, moved once")]
pub enum Source {
    /// Manifest files, followed as they change, and the control loop that builds from them.
    Manifests(ManifestSource, ControlLoop),
    /// A cluster's API: watched objects, leader election and allocation.
    Cluster(Cluster, ControlLoop),
    /// One snapshot built up front (the demo).
    Fixed(Snapshot),
}

/// Where the VIPs live on the host (`--vip-link`), who is told (`--announce-interface`), and
/// which of them this replica holds when it shares a segment with others (`--l2-listen`): with
/// manifests among the `--l2-peer`s (`l2_peers`), in a cluster among the member Lease's.
pub struct Vips {
    pub link: VipLinkConfig,
    pub announce_interface: Option<String>,
    pub l2: Option<L2Config>,
    pub l2_peers: Vec<SocketAddr>,
}

/// The health servers external load balancers probe (see `node_health` and `service_health`).
#[derive(Debug, Clone, Copy, Default)]
pub struct HealthServers {
    /// `--healthz-bind-address`: the node health server.
    pub node: Option<SocketAddr>,
    /// Answer the snapshots' health-check node ports (`--service-health-checks` with a node name).
    pub service_ports: bool,
}

/// BGP mode: how BIRD learns the routes (`--bird-include` …), and the liveness link's name.
pub struct Routes {
    pub bird: BirdConfig,
    pub liveness_link: Option<String>,
    /// `--bgp-from-cluster`: this Node's sessions and routes from MetalLB's BGP objects.
    pub from_cluster: Option<String>,
}

/// What serving a cluster needs besides the control loop.
pub struct Cluster {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub namespaces: Vec<String>,
    pub pool_namespace: String,
    pub selection: ServiceSelection,
    pub lease: LeaseConfig,
    /// Watch MetalLB's L2Advertisements and the Nodes, for L2 agreement (`--l2-listen`).
    pub l2_advertisements: bool,
    /// Watch MetalLB's BGP objects and the Nodes (`--bgp-from-cluster`).
    pub bgp: bool,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let in_cluster = args.manifests.is_none();
    let source = match args.manifests {
        Some(path) => {
            let control = ControlLoop::new(build_options(&args.defaults, &args.cluster, false));
            Source::Manifests(ManifestSource::new(path), control)
        }
        None => {
            let options = build_options(&args.defaults, &args.cluster, true);
            let identity = args.election.identity.clone().unwrap_or_else(default_identity);
            let lease = LeaseConfig::new(&args.election.lease_namespace, &args.election.lease_name, identity)
                .with_lease_duration(args.election.lease_duration.max(Duration::from_secs(2)));
            let cluster = Cluster {
                kubeconfig: args.cluster.kubeconfig.clone(),
                namespaces: args.cluster.namespaces.clone(),
                pool_namespace: args.cluster.pool_namespace.clone(),
                selection: options.selection.clone(),
                lease,
                l2_advertisements: args.vips.l2_listen.is_some(),
                bgp: args.bgp.bgp_from_cluster,
            };
            let control = ControlLoop::new(options);
            // L2 agreement follows MetalLB's L2Advertisements (which pools, nodes, interfaces), BGP
            // its BGP objects.
            let governed = cluster.l2_advertisements || cluster.bgp;
            let control = if governed { control.with_announcements() } else { control };
            Source::Cluster(cluster, control)
        }
    };
    let vips = args.vips.vip_link.as_ref().map(|name| Vips {
        link: VipLinkConfig {
            name: name.clone(),
            kind: match args.vips.vip_link_kind {
                VipLinkKindArg::Dummy => LinkKind::Dummy,
                VipLinkKindArg::Bridge => LinkKind::Bridge,
                VipLinkKindArg::Tun => LinkKind::Tun,
            },
        },
        announce_interface: args.vips.announce_interface.clone(),
        l2: args.vips.l2_listen.map(|listen| L2Config {
            node: args
                .vips
                .l2_node
                .clone()
                .or_else(|| args.defaults.node_name.clone())
                .unwrap_or_else(host_name),
            listen,
            interval: args.vips.l2_interval,
            timeout: args.vips.l2_timeout,
            quorum: args.vips.l2_quorum,
            interface: args.vips.announce_interface.clone(),
        }),
        l2_peers: args.vips.l2_peers.clone(),
    });
    if let Some(l2) = vips.as_ref().and_then(|vips| vips.l2.as_ref()) {
        // A cut-off replica falls silent after half of the timeout; its peers take over after all
        // of it: the heartbeats' phase (one interval) must fit in between.
        anyhow::ensure!(
            l2.interval * 4 <= l2.timeout,
            "--l2-interval {:?} must be at most a quarter of --l2-timeout {:?}",
            l2.interval,
            l2.timeout
        );
    }
    if in_cluster
        && let Some(vips) = &vips
        && let Some(l2) = &vips.l2
    {
        // In a cluster the member Lease lists the replicas, each at its --l2-listen address.
        anyhow::ensure!(
            vips.l2_peers.is_empty(),
            "--l2-peer is for --manifests; in a cluster the replicas find each other through the member Lease"
        );
        anyhow::ensure!(
            !l2.listen.ip().is_unspecified(),
            "--l2-listen {} is what the peers are told: in a cluster give this node's own address",
            l2.listen
        );
    }
    let health = HealthServers {
        node: args.health.healthz_bind_address,
        // Without a node name the builder ignores externalTrafficPolicy: Local, so there is
        // nothing to answer; no task either.
        service_ports: args.health.service_health_checks && args.defaults.node_name.is_some(),
    };
    let routes = args.bgp.bird_include.clone().map(|include| Routes {
        bird: BirdConfig {
            include,
            socket: args.bgp.bird_socket.clone(),
            birdc: args.bgp.birdc.clone(),
            peering: args.bgp.bgp_asn.map(|local_asn| Peering {
                local_asn,
                peers: args.bgp.bgp_peers.clone(),
                bfd: args.bgp.bgp_bfd,
            }),
        },
        liveness_link: args.bgp.bird_liveness_link.clone(),
        from_cluster: args.bgp.bgp_from_cluster.then(|| args.defaults.node_name.clone()).flatten(),
    });
    serve(source, &args.engine, &args.admin, vips, health, routes)
}

/// `$POD_NAME` is the usual identity; outside a pod, the host name and PID.
fn default_identity() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_owned()
}

/// Which Services are ringlb's: in a cluster only allocated IPs are served and classless
/// Services only with `--default-class`; manifests are ringlb's own input, class or not.
pub fn selection(cluster: &ClusterArgs, in_cluster: bool) -> ServiceSelection {
    ServiceSelection {
        class: cluster.load_balancer_class.clone(),
        default_class: !in_cluster || cluster.default_class,
        external_ips: cluster.external_ips,
        vips: if in_cluster { VipSource::Allocated } else { VipSource::Requested },
    }
}

pub fn build_options(defaults: &DefaultsArgs, cluster: &ClusterArgs, in_cluster: bool) -> BuildOptions {
    let fallback = EntryPolicy::default();
    BuildOptions {
        default_scheduler: defaults.scheduler,
        default_policy: EntryPolicy {
            connect_timeout: defaults.connect_timeout.unwrap_or(fallback.connect_timeout),
            idle_timeout: defaults.idle_timeout.unwrap_or(fallback.idle_timeout),
            drain_timeout: defaults.drain_timeout.unwrap_or(fallback.drain_timeout),
            not_ready_connections: match defaults.not_ready_connections {
                NotReadyArg::Drain => NotReadyConnections::Drain,
                NotReadyArg::Keep => NotReadyConnections::Keep,
                NotReadyArg::Close => NotReadyConnections::Close,
            },
            udp_unreplied_timeout: defaults.udp_unreplied_timeout.unwrap_or(fallback.udp_unreplied_timeout),
            udp_replied_timeout: defaults.udp_replied_timeout.unwrap_or(fallback.udp_replied_timeout),
            udp_stale_flows: match defaults.udp_stale_flows {
                StaleFlowsArg::Move => StaleFlowPolicy::Move,
                StaleFlowsArg::Drain => StaleFlowPolicy::Drain,
            },
            max_connections: defaults.max_connections.unwrap_or(0),
            max_backend_connections: defaults.max_backend_connections.unwrap_or(0),
            client_rate: defaults.client_connection_rate.map(|per_second| ClientRate {
                per_second,
                burst: defaults.client_connection_burst.unwrap_or(per_second),
            }),
            proxy_protocol: defaults.proxy_protocol,
            transparent: defaults.transparent,
            ..fallback
        },
        node_name: defaults.node_name.clone(),
        selection: selection(cluster, in_cluster),
        ..BuildOptions::default()
    }
}

pub fn engine_config(args: &EngineArgs) -> EngineConfig {
    let defaults = EngineConfig::default();
    EngineConfig {
        workers: args.workers.unwrap_or(defaults.workers).max(1),
        pin_workers: !args.no_pin,
        relay: match args.relay {
            RelayArg::Auto => RelayMode::Auto,
            RelayArg::Copy => RelayMode::Copy,
            RelayArg::Splice => RelayMode::Splice,
        },
        listen_mode: match args.listeners {
            ListenersArg::Auto => ListenMode::Auto,
            ListenersArg::Exact => ListenMode::Exact,
            ListenersArg::Wildcard => ListenMode::Wildcard,
        },
        source_ports: match args.source_ports {
            SourcePortsArg::Worker => SourcePortMode::Worker,
            SourcePortsArg::KernelPerWorker => SourcePortMode::KernelPerWorker,
            SourcePortsArg::Kernel => SourcePortMode::Kernel,
        },
        source_port_range: args.source_port_range.clone(),
        traffic_detail: match args.metrics_detail {
            MetricsDetailArg::Backend => TrafficDetail::Backend,
            MetricsDetailArg::Vip => TrafficDetail::Vip,
        },
        udp: UdpConfig {
            max_flows_per_worker: args.udp_max_flows.unwrap_or(defaults.udp.max_flows_per_worker).max(1),
            vip_receive_buffer: args.udp_receive_buffer.unwrap_or(defaults.udp.vip_receive_buffer),
            ..defaults.udp.clone()
        },
        ..defaults
    }
}

/// Publishes every snapshot the source produces to the engine, and records in the node's health
/// that one arrived; when some task follows the served table (`--vip-link`, the health-check node
/// ports), also to their `watch`.
struct EngineSink {
    engine: Arc<Engine>,
    node: Arc<NodeHealth>,
    followers: Option<tokio::sync::watch::Sender<Arc<Snapshot>>>,
}

impl SnapshotSink for EngineSink {
    fn publish(&self, snapshot: Arc<Snapshot>) {
        if let Some(followers) = &self.followers {
            followers.send_replace(Arc::clone(&snapshot));
        }
        self.engine.publish(snapshot);
        self.node.published();
    }
}

/// What the admin endpoints see of a serving ringlb.
struct ServeState {
    engine: Arc<Engine>,
    node: Arc<NodeHealth>,
    /// Progress of the manifest source; `None` for a fixed snapshot.
    source: Option<Readiness>,
    /// Counters of the active health checks; `None` for a fixed snapshot (nothing is probed).
    health: Option<HealthStatus>,
    /// Whether this replica leads (allocates and writes statuses); `None` outside a cluster.
    leading: Option<tokio::sync::watch::Receiver<bool>>,
    /// The health-check node ports; `None` when they are not answered.
    service_health: Option<Arc<ServiceHealthStatus>>,
    /// BGP mode's routes in BIRD; `None` without `--bird-include`.
    bgp: Option<BirdStatus>,
    /// The L2 agreement; `None` without `--l2-listen`.
    l2: Option<(Arc<std::sync::Mutex<L2State>>, Arc<L2Counters>)>,
    /// This node, when ringlb knows it (`externalTrafficPolicy: Local`).
    node_name: Option<String>,
    /// The pools' usage by the leader's last plan; `None` outside a cluster.
    pools: Option<PoolUsageHandle>,
}

impl ServeState {
    fn verdicts(&self) -> Option<Arc<lb_sync::Verdicts>> {
        self.health.as_ref().map(HealthStatus::verdicts)
    }
}

impl AdminState for ServeState {
    fn is_ready(&self) -> bool {
        self.node.has_published() && self.engine.is_ready()
    }

    fn status(&self) -> serde_json::Value {
        let snapshot = self.engine.current();
        let source = self.source.as_ref().map(|source| {
            json!({
                "loads": source.loads(),
                "inputs_rejected": source.inputs_rejected(),
                "rejected_reloads": source.rejected_reloads(),
                "rejected_objects": source.rejected_objects(),
            })
        });
        let health = self.health.as_ref().map(|health| {
            json!({
                "probes_sent": health.probes_sent(),
                "probes_failed": health.probes_failed(),
                "probes_local_failures": health.probes_local_failures(),
                "checked_backends": health.checked_backends(),
                "unhealthy_backends": health.unhealthy_backends(),
                "backend_events": health.backend_events(),
                "ejections": health.ejections(),
                "ejected_backends": health.ejected_backends(),
            })
        });
        let workers = self.engine.stats().workers;
        json!({
            "pid": std::process::id(),
            "ready": self.is_ready(),
            // `reconciled`: every worker serves the snapshot published last.
            "snapshot": {
                "version": snapshot.version,
                "entries": snapshot.len(),
                "reconciled": self.engine.is_reconciled(),
            },
            "source": source,
            "health": health,
            "leader": self.leading.as_ref().map(|leading| *leading.borrow()),
            "bgp": self.bgp.as_ref().map(|bgp| json!({
                "routes": bgp.routes(),
                "reconfigurations": bgp.reconfigurations(),
                "failures": bgp.failures(),
                "failing": bgp.failing(),
            })),
            "node_healthy": self.node.is_healthy(),
            "service_health": self.service_health.as_ref().map(|status| status.to_json()),
            "l2": self.l2.as_ref().map(|(state, counters)| l2_status(state, counters)),
            "workers": workers,
        })
    }

    fn metrics(&self) -> String {
        let l2 = self.l2.as_ref().map(|(state, _)| {
            state.lock().map(|state| (state.owned as u64, state.may_claim)).unwrap_or_default()
        });
        let pools = self.pools.as_ref().map(|pools| pools.lock().map(|p| p.clone()).unwrap_or_default());
        metrics::render(metrics::Scrape {
            ready: self.is_ready(),
            reconciled: self.engine.is_reconciled(),
            snapshot: self.engine.current(),
            node: self.node_name.clone(),
            traffic: self.engine.traffic(),
            per_backend: self.engine.config().traffic_detail == TrafficDetail::Backend,
            workers: self.engine.stats().workers,
            source: self.source.clone(),
            health: self.health.clone(),
            leading: self.leading.as_ref().map(|leading| *leading.borrow()),
            pools: pools.unwrap_or_default(),
            bgp: self.bgp.as_ref().map(|bgp| (bgp.routes(), bgp.failing())),
            l2,
        })
    }

    fn snapshot(&self) -> serde_json::Value {
        let snapshot = self.engine.current();
        let entries: Vec<&ServiceEntry> = snapshot.entries().map(|entry| entry.as_ref()).collect();
        json!({ "version": snapshot.version, "entries": entries })
    }

    fn backends(&self) -> serde_json::Value {
        metrics::backends(&self.engine.current(), self.node_name.as_deref(), self.verdicts().as_deref())
    }
}

/// The L2 agreement's part of `/status`: its state and counters.
fn l2_status(state: &std::sync::Mutex<L2State>, counters: &L2Counters) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let state = state.lock().map(|state| state.clone()).unwrap_or_default();
    let mut shown = serde_json::to_value(state).unwrap_or_default();
    shown["counters"] = json!({
        "heartbeats_sent": counters.heartbeats_sent.load(Relaxed),
        "heartbeats_received": counters.heartbeats_received.load(Relaxed),
        "heartbeats_rejected": counters.heartbeats_rejected.load(Relaxed),
        "joiners_answered": counters.joiners_answered.load(Relaxed),
        "send_errors": counters.send_errors.load(Relaxed),
        "ownership_changes": counters.ownership_changes.load(Relaxed),
    });
    shown
}

pub fn serve(
    source: Source,
    engine_args: &EngineArgs,
    admin_args: &AdminArgs,
    vips_on_host: Option<Vips>,
    health: HealthServers,
    routes: Option<Routes>,
) -> anyhow::Result<ExitCode> {
    let admin_addr = admin::listen_addr(admin_args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ringlb-control")
        .build()
        .context("starting the control runtime")?;
    match lb_datapath::raise_descriptor_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(before, after, "raised the soft descriptor limit to the hard limit")
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the descriptor limit"),
    }
    // Hot upgrade: a ringlb already serving on the upgrade socket hands its VIP sockets over.
    let mut config = engine_config(engine_args);
    let takeover = match &engine_args.upgrade_socket {
        Some(path) => upgrade::take_over(path)?,
        None => None,
    };
    let takeover = takeover.map(|(takeover, fds)| {
        let received = fds.len();
        let (inherited, rejected) = lb_datapath::Inherited::new(fds);
        tracing::info!(received, rejected, "upgrade: took the running ringlb's VIP sockets");
        config.inherited = Some(Arc::new(inherited));
        takeover
    });
    let engine =
        Arc::new(Engine::start(config, Arc::new(Snapshot::empty())).context("starting the datapath")?);
    let (config, budget) = (engine.config(), engine.budget());
    tracing::info!(workers = config.workers, relay = ?engine.relay_mode(), "datapath started");
    tracing::info!(
        limit = budget.limit,
        control_reserve = budget.reserve,
        per_worker = budget.per_worker,
        max_connections_per_worker = config.max_connections_per_worker,
        max_udp_flows_per_worker = config.udp.max_flows_per_worker,
        max_listeners_per_worker = budget.max_listeners(),
        "descriptor budget"
    );
    let node = Arc::new(NodeHealth::new(Arc::clone(&engine)));
    let (followers, vips_wanted) = tokio::sync::watch::channel(Arc::new(Snapshot::empty()));
    let ports_wanted = followers.subscribe();
    let routes_wanted = followers.subscribe();
    let followers = (vips_on_host.is_some() || health.service_ports || routes.is_some()).then_some(followers);
    let sink = EngineSink { engine: Arc::clone(&engine), node: Arc::clone(&node), followers };

    let bgp_status = routes.as_ref().map(|_| BirdStatus::default());
    let grace = engine_args.shutdown_grace;
    let outcome = runtime.block_on(async {
        let mut signals = Signals::new();
        // Passive outlier detection: the workers' connect outcomes and resets flow back to the
        // control loop's health monitor, whose ejections join the one health overlay.
        let events = engine.take_backend_events();
        let with_events = |control: ControlLoop| match events {
            Some(events) => control.with_backend_events(events),
            None => control,
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }
        };
        // In a cluster: the API client, leader election and the allocator, beside the control loop.
        let mut duties = Vec::new();
        let mut leading = None;
        let mut pools = None;
        // For L2 cluster mode: the API and where the member Lease goes.
        let mut arbitration = None;
        let source = match source {
            Source::Manifests(source, control) => Running::Manifests(source, with_events(control)),
            Source::Cluster(cluster, control) => {
                let client = lb_sync::kubeconfig::client(cluster.kubeconfig.as_deref()).await?;
                let mut control = with_events(control);
                let objects = control.objects();
                let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
                tracing::info!(identity = %cluster.lease.identity, lease = %cluster.lease.name, namespace = %cluster.lease.namespace, "leader election");
                let allocator = Allocator::new(client.clone(), cluster.selection.clone(), &cluster.lease.identity);
                pools = Some(allocator.usage());
                let member_lease = MemberLease::beside(&cluster.lease.namespace, &cluster.lease.name);
                duties.push(tokio::spawn(leader::run(client.clone(), cluster.lease, leader_tx, until_stopped())));
                duties.push(tokio::spawn(allocator.run(objects, leader_rx.clone(), until_stopped())));
                arbitration = Some((client.clone(), member_lease, leader_rx.clone()));
                leading = Some(leader_rx);
                let source = KubeSource::new(client, cluster.namespaces).with_pools(cluster.pool_namespace);
                let source = if cluster.l2_advertisements { source.with_l2_advertisements() } else { source };
                let source = if cluster.bgp { source.with_bgp() } else { source };
                Running::Cluster(source, control)
            }
            Source::Fixed(snapshot) => Running::Fixed(snapshot),
        };
        let control = match &source {
            Running::Manifests(_, control) | Running::Cluster(_, control) => Some(control),
            Running::Fixed(_) => None,
        };
        let service_health = health.service_ports.then(|| Arc::new(ServiceHealthStatus::default()));
        let (vips_on_host, l2) = match vips_on_host {
            Some(Vips { link, announce_interface, l2: Some(config), l2_peers }) => {
                let listen = config.listen;
                let l2 = L2::bind(config).await.with_context(|| format!("binding the L2 heartbeats on {listen}"))?;
                (Some(Vips { link, announce_interface, l2: None, l2_peers }), Some(l2))
            }
            other => (other, None),
        };
        let admin_state = ServeState {
                engine: Arc::clone(&engine),
                node: Arc::clone(&node),
                source: control.map(ControlLoop::readiness),
                health: control.map(ControlLoop::health_status),
                leading,
                service_health: service_health.clone(),
                bgp: bgp_status.clone(),
                l2: l2.as_ref().map(|l2| (l2.state(), l2.counters())),
                node_name: control.and_then(ControlLoop::node_name),
                pools: pools.clone(),
        };
        // The admin and node health listeners; after an upgrade only once the old process let
        // go of their ports. Aborted when this process hands over in turn.
        let open_listeners = {
            let node = Arc::clone(&node);
            let health_node = health.node;
            async move {
                let mut tasks = Vec::new();
                if let Some(addr) = admin_addr {
                    let listener = admin::bind(addr).await?;
                    tracing::info!(%addr, "admin listening (/healthz, /readyz, /metrics, /snapshot, /backends, /status)");
                    tasks.push(tokio::spawn(admin::serve(listener, Arc::new(admin_state))));
                }
                if let Some(addr) = health_node {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the node health server on {addr}"))?;
                    tracing::info!(%addr, "node health listening (/healthz, /livez)");
                    tasks.push(tokio::spawn(node_health::serve(listener, node)));
                }
                anyhow::Ok(tasks)
            }
        };
        let (handed_tx, mut handed_rx) = tokio::sync::oneshot::channel::<upgrade::Handed>();
        let listener_tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let upgrade_path = engine_args.upgrade_socket.clone();
        match takeover {
            None => {
                *listener_tasks.lock().unwrap_or_else(|e| e.into_inner()) = open_listeners.await?;
                if let Some(path) = &upgrade_path {
                    offer_upgrades(upgrade::Offer::bind(path)?, Arc::clone(&engine), handed_tx);
                }
            }
            Some(takeover) => {
                let (engine, node, tasks) = (Arc::clone(&engine), Arc::clone(&node), Arc::clone(&listener_tasks));
                tokio::spawn(async move {
                    if let Err(error) = finish_takeover(takeover, &engine, &node, open_listeners, &tasks, handed_tx).await {
                        tracing::error!(error = format!("{error:#}"), "upgrade: taking over did not complete");
                    }
                });
            }
        }
        if let Some(status) = service_health {
            tokio::spawn(service_health::run(ports_wanted, Arc::clone(&node), status));
        }
        // BGP mode: the routes follow the table and are withdrawn as soon as serving ends, before
        // the listeners close. Nothing is advertised before the first table, so a start-up error
        // below leaves no route behind.
        let routes_task = match routes {
            Some(Routes { bird: config, liveness_link, from_cluster }) => {
                let mut routing = Bird::new(config).with_status(bgp_status.clone().unwrap_or_default());
                if let Some(name) = liveness_link {
                    let link = LivenessLink::open(&name)
                        .await
                        .with_context(|| format!("preparing the liveness link {name}"))?;
                    routing = routing.with_liveness_link(link);
                }
                let advertised = move |snapshot: &Arc<Snapshot>| {
                    let vips = lb_core::advertised_vips(snapshot);
                    match &from_cluster {
                        Some(node) => Advertised::plan(snapshot.announcements().bgp(node, &vips)),
                        None => Advertised::vips(&vips),
                    }
                };
                Some(tokio::spawn(bird::run(routing, routes_wanted, advertised, until_stopped())))
            }
            None => None,
        };
        // Last before serving, so that no later start-up error leaves the link behind; the VIPs
        // stay on it until the connections on them have drained.
        let (release_vips, vips_released) = tokio::sync::oneshot::channel::<()>();
        let vip_task = match vips_on_host {
            Some(Vips { link, announce_interface, l2: _, l2_peers }) => {
                let announcer = match &announce_interface {
                    Some(interface) => Some(Arc::new(
                        Announcer::new(interface)
                            .with_context(|| format!("preparing announcements on {interface}"))?,
                    )),
                    None => None,
                };
                let link =
                    VipLink::open(&link).await.with_context(|| format!("preparing the VIP link {}", link.name))?;
                // Who asks for a held VIP is answered where the kernel would not (IPv6 always,
                // IPv4 under arp_ignore), for as long as the link holds it.
                if let Some(announcer) = &announcer {
                    let responder = Responder::new(Arc::clone(announcer)).with_context(|| {
                        format!("preparing ARP and neighbour answers on {}", announcer.interface())
                    })?;
                    tokio::spawn(responder.run(link.held(), std::future::pending::<()>()));
                }
                Some(match l2 {
                    // Only the VIPs this replica owns go onto the link; on the way out it lets
                    // them go at once, so a peer takes them while this one drains.
                    Some(l2) => {
                        let (owned, owned_wanted) = tokio::sync::watch::channel(BTreeSet::new());
                        // One agreement, two sources of its members: the configured peers, or
                        // the cluster's member Lease (written on joins and removals only).
                        let (members, arbiter) = match arbitration.take() {
                            Some((client, lease, leading)) => {
                                let (list, members) = tokio::sync::watch::channel(MemberList::Leased {
                                    members: Default::default(),
                                    version: None,
                                });
                                let (proposals, proposed) = tokio::sync::watch::channel(None);
                                let me = l2.node().to_owned();
                                duties.push(tokio::spawn(members::run(client, lease, me, list, proposed, until_stopped())));
                                (members, Some(Arbiter { leading, proposals }))
                            }
                            None => (tokio::sync::watch::channel(MemberList::Configured(l2_peers)).1, None),
                        };
                        tokio::spawn(l2.run(vips_wanted, members, arbiter, owned, link.held(), until_stopped()));
                        let addresses = |owned: &BTreeSet<IpAddr>| owned.clone();
                        tokio::spawn(vip_link::run(link, announcer, owned_wanted, addresses, vips_released))
                    }
                    None => {
                        let addresses = |snapshot: &Arc<Snapshot>| vip_link::vip_addresses(snapshot);
                        tokio::spawn(vip_link::run(link, announcer, vips_wanted, addresses, vips_released))
                    }
                })
            }
            None => None,
        };
        // Serving ends at a signal, or when a new process took the sockets over (hot upgrade).
        let handed = std::cell::RefCell::new(None);
        let until_shutdown = async {
            tokio::select! {
                () = signals.next() => {}
                Ok(taken) = &mut handed_rx => *handed.borrow_mut() = Some(taken),
            }
        };
        let served = match source {
            Running::Manifests(source, control) => {
                control.run(source, sink, until_shutdown).await.map_err(anyhow::Error::from)
            }
            Running::Cluster(source, control) => {
                control.run(source, sink, until_shutdown).await.map_err(anyhow::Error::from)
            }
            Running::Fixed(snapshot) => {
                sink.publish(Arc::new(snapshot));
                until_shutdown.await;
                Ok(())
            }
        };
        let upgraded = handed.borrow().is_some();
        if let Some(handed) = handed.take() {
            // The new process serves on the VIP sockets: free the admin and node health ports for
            // it, then let it go on; this one drains what it holds.
            let tasks: Vec<_> = listener_tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
            for task in tasks {
                task.abort();
                // Done once the task is dropped, with its listener.
                let _ = task.await;
            }
            let _ = tokio::task::spawn_blocking(move || handed.bye()).await;
            tracing::info!("upgrade: the new ringlb serves; draining what this one holds");
        }
        // External balancers are told at once (before the Lease and the listeners go), so they
        // move new traffic elsewhere while established connections drain.
        node.begin_drain();
        // A leader gives the Lease up now, so another replica takes over while this one drains.
        let _ = stop.send(true);
        // BGP mode: the routes go before the listeners close, so that a connection the router still
        // sends here meanwhile is accepted (and then drained) rather than refused.
        if let Some(task) = routes_task
            && tokio::time::timeout(Duration::from_secs(6), task).await.is_err()
        {
            tracing::warn!("BIRD's routes were not withdrawn within 6 s");
        }
        for duty in duties {
            if tokio::time::timeout(Duration::from_secs(5), duty).await.is_err() {
                tracing::warn!("a cluster task did not stop within 5 s");
            }
        }
        if served.is_ok() {
            drain(&engine, grace, &mut signals).await;
        }
        // After an upgrade the new process holds the VIPs on the link: they stay.
        if let Some(task) = vip_task.filter(|_| !upgraded) {
            let _ = release_vips.send(());
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                tracing::warn!("the VIP link was not released within 5 s");
            }
        }
        served
    });
    drop(runtime);
    engine.shutdown();
    tracing::info!("stopped");
    outcome.map(|()| ExitCode::SUCCESS)
}

/// Hands the VIP sockets to the next ringlb that connects to `offer` (on a thread of its own: the
/// exchange blocks), then tells the serving loop through `handed`.
fn offer_upgrades(
    offer: upgrade::Offer,
    engine: Arc<Engine>,
    handed: tokio::sync::oneshot::Sender<upgrade::Handed>,
) {
    let spawned = std::thread::Builder::new().name("ringlb-upgrade".into()).spawn(move || {
        let taken = offer.hand_over(&engine);
        let _ = handed.send(taken);
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot offer upgrades");
    }
}

/// The new process's side of an upgrade, once its workers run on the inherited sockets: waits
/// until it serves, tells the old process, opens its own admin and node health listeners once the
/// old one let go of them, and offers the next upgrade.
async fn finish_takeover(
    takeover: upgrade::Takeover,
    engine: &Arc<Engine>,
    node: &NodeHealth,
    open_listeners: impl std::future::Future<Output = anyhow::Result<Vec<tokio::task::JoinHandle<()>>>>,
    tasks: &std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    handed: tokio::sync::oneshot::Sender<upgrade::Handed>,
) -> anyhow::Result<()> {
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while !(node.has_published() && engine.is_ready()) {
        poll.tick().await;
    }
    let path = tokio::task::spawn_blocking(move || takeover.finish()).await??;
    let unclaimed = engine.close_unclaimed_inherited();
    if unclaimed > 0 {
        tracing::warn!(
            unclaimed,
            "upgrade: closed inherited VIP sockets no worker took (more workers before, or other VIPs)"
        );
    }
    *tasks.lock().unwrap_or_else(|e| e.into_inner()) = open_listeners.await?;
    offer_upgrades(upgrade::Offer::bind(&path)?, Arc::clone(engine), handed);
    tracing::info!("upgrade: serving; the old ringlb drains");
    Ok(())
}

/// A source being served (the cluster's client made).
#[allow(clippy::large_enum_variant, reason = "one value per process")]
enum Running {
    Manifests(ManifestSource, ControlLoop),
    Cluster(KubeSource, ControlLoop),
    Fixed(Snapshot),
}

/// The first half of a graceful shutdown: the listeners close at once, then established
/// connections and flows have up to `grace` to end by themselves (a second signal cuts it short).
async fn drain(engine: &Engine, grace: Duration, signals: &mut Signals) {
    let open = |engine: &Engine| {
        let total = engine.stats().total();
        (total.active, total.flows_active, total.sctp_active)
    };
    if grace.is_zero() {
        let (connections, flows, associations) = open(engine);
        tracing::info!(connections, flows, associations, "shutting down now (--shutdown-grace 0)");
        return;
    }
    engine.begin_drain();
    let (connections, flows, associations) = open(engine);
    tracing::info!(
        ?grace,
        connections,
        flows,
        associations,
        "shutting down: listeners closed, established connections and flows continue"
    );
    let deadline = tokio::time::Instant::now() + grace;
    let mut poll = tokio::time::interval(DRAIN_POLL);
    loop {
        tokio::select! {
            () = signals.next() => {
                tracing::warn!("second signal: closing every connection now");
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                let (connections, flows, associations) = open(engine);
                tracing::info!(connections, flows, associations, "shutdown grace over; closing what is left");
                return;
            }
            _ = poll.tick() => {
                if engine.is_drained() {
                    tracing::info!("every connection and flow ended");
                    return;
                }
            }
        }
    }
}

/// How often a draining ringlb checks whether everything ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// SIGINT (Ctrl-C) and SIGTERM, each delivery one [`Signals::next`].
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot watch {name}");
                None
            }
        };
        Signals {
            terminate: watch(SignalKind::terminate(), "SIGTERM"),
            interrupt: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Resolves at the next SIGINT or SIGTERM.
    async fn next(&mut self) {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    if signal.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.terminate) => tracing::info!("SIGTERM"),
            () = one(&mut self.interrupt) => tracing::info!("SIGINT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn engine_args(flags: &[&str]) -> EngineArgs {
        let argv = ["ringlb", "demo"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Demo(args) => args.engine,
            other => panic!("parsed {other:?}"),
        }
    }

    fn check_args(flags: &[&str]) -> crate::cli::CheckArgs {
        let argv = ["ringlb", "check"].iter().chain(flags);
        match Cli::try_parse_from(argv).expect("valid flags").command {
            Command::Check(args) => args,
            other => panic!("parsed {other:?}"),
        }
    }

    fn build_options_of(flags: &[&str], in_cluster: bool) -> BuildOptions {
        let args = check_args(flags);
        build_options(&args.defaults, &args.cluster, in_cluster)
    }

    #[test]
    fn cluster_flags_choose_the_services_and_only_a_cluster_serves_allocated_ips_alone() {
        let cluster = build_options_of(&[], true).selection;
        assert_eq!(
            (cluster.class.as_str(), cluster.default_class, cluster.external_ips),
            ("ringlb.io/lb", false, true)
        );
        assert_eq!(cluster.vips, VipSource::Allocated);
        let flags = ["--load-balancer-class", "example.com/lb", "--default-class", "--external-ips=false"];
        let chosen = build_options_of(&flags, true).selection;
        assert_eq!(
            (chosen.class.as_str(), chosen.default_class, chosen.external_ips),
            ("example.com/lb", true, false)
        );
        let manifests = build_options_of(&["--manifests", "x.yaml"], false).selection;
        assert!(manifests.default_class, "manifests are ringlb's, class or not");
        assert_eq!(manifests.vips, VipSource::Requested);
        assert!(Cli::try_parse_from(["ringlb", "run", "--manifests", "x", "--kubeconfig", "k"]).is_err());
    }

    #[test]
    fn udp_flags_reach_the_engine_config_and_defaults_stay_the_engines() {
        let config =
            engine_config(&engine_args(&["--udp-max-flows", "1000", "--udp-receive-buffer", "1048576"]));
        assert_eq!(config.udp.max_flows_per_worker, 1000);
        assert_eq!(config.udp.vip_receive_buffer, 1 << 20);
        assert_eq!(engine_config(&engine_args(&[])).udp, UdpConfig::default());
    }

    #[test]
    fn policy_flags_are_the_defaults_annotations_override() {
        let options = build_options_of(
            &[
                "--manifests",
                "x.yaml",
                "--udp-unreplied-timeout",
                "5s",
                "--udp-replied-timeout",
                "1m",
                "--udp-stale-flows",
                "drain",
                "--not-ready-connections",
                "keep",
                "--proxy-protocol",
                "v2",
                "--transparent",
            ],
            false,
        );
        let policy = options.default_policy;
        assert_eq!(policy.proxy_protocol, lb_core::ProxyProtocol::V2);
        assert!(policy.transparent);
        let unknown = Cli::try_parse_from(["ringlb", "run", "--manifests", "x", "--proxy-protocol", "v3"]);
        assert!(unknown.expect_err("v3 is no version").to_string().contains("none, v1, v2"));
        assert_eq!(policy.udp_unreplied_timeout, Duration::from_secs(5));
        assert_eq!(policy.udp_replied_timeout, Duration::from_secs(60));
        assert_eq!(policy.udp_stale_flows, StaleFlowPolicy::Drain);
        assert_eq!(policy.not_ready_connections, NotReadyConnections::Keep);
        assert_eq!(build_options_of(&[], false).default_policy, EntryPolicy::default());
    }
}
