//! `/metrics`: what a serving ringlb knows, in the OpenMetrics text format Prometheus scrapes,
//! encoded with `prometheus-client`.
//!
//! A scrape reads everything first into a [`Scrape`] (the datapath's traffic cells and per-worker
//! counters, the served snapshot, the control loop's timings, health verdicts, pools, leadership,
//! announcers) and then encodes it, so the encoder never holds a lock the datapath or the control
//! loop waits for. Names follow Prometheus' conventions (`ringlb_` prefix, base units in the
//! name, `_total` on counters, added by the encoder). Label cardinality is bounded by the served
//! table: VIP keys, their backends, workers, pools; never a client.

use std::fmt::Write as _;
use std::sync::Arc;

use lb_core::histogram::HistogramSnapshot;
use lb_core::ipam::PoolUsage;
use lb_core::{BackendState, HealthOverlay, Protocol, Snapshot, VipKey};
use lb_datapath::{ConnectError, Refusal, TrafficKey, TrafficStats, WorkerStats};
use lb_sync::{HealthStatus, Readiness, Verdicts};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`to_prometheus_text`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus does); others (curl,
/// `promtool check metrics`, older scrapers) get the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| accept.contains("application/openmetrics-text"))
}

/// `openmetrics` (as [`render`] writes it) in the Prometheus text format 0.0.4: a counter's
/// `HELP` and `TYPE` name its samples' `_total` name, and OpenMetrics' `# EOF` and `# UNIT`
/// lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match comment {
            Some(rewritten) => out.push_str(rewritten.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Per-worker statistics that are levels, not counts since start (every other field of
/// [`WorkerStats`] is a counter).
const WORKER_GAUGES: &[&str] = &[
    "active",
    "draining",
    "listeners",
    "buffers_in_use",
    "pipes_in_use",
    "pipes_idle",
    "udp_listeners",
    "flows_active",
    "backend_load",
    "sctp_listeners",
    "sctp_active",
    "descriptors",
    "descriptor_budget",
    "ring_completion_entries",
    "ring_failed",
];

/// Everything one scrape reports, read before encoding.
#[derive(Debug)]
pub struct Scrape {
    pub ready: bool,
    pub reconciled: bool,
    pub snapshot: Arc<Snapshot>,
    /// This node, for `externalTrafficPolicy: Local`'s backend states.
    pub node: Option<String>,
    pub traffic: Vec<(TrafficKey, TrafficStats)>,
    /// Whether traffic is counted per backend (else per VIP key only, and no backend states).
    pub per_backend: bool,
    pub workers: Vec<WorkerStats>,
    pub source: Option<Readiness>,
    pub health: Option<HealthStatus>,
    pub leading: Option<bool>,
    pub pools: Vec<PoolUsage>,
    /// `(routes, failing)` of BGP mode.
    pub bgp: Option<(u64, bool)>,
    /// `(owned VIPs, may claim)` of the L2 agreement.
    pub l2: Option<(u64, bool)>,
}

/// The exposition of `scrape`.
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(%error, "encoding /metrics failed");
    }
    out
}

type Labels = Vec<(&'static str, String)>;

/// Writes one family: its descriptor, then each `(labels, value)`.
struct Family<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
}

impl Family<'_, '_> {
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = self.encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauges(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = self.encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
        self.gauges(name, help, [(Labels::new(), value)])
    }

    fn histograms<'h>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, &'h HistogramSnapshot)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = self.encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, histogram) in samples {
            let buckets: Vec<(f64, u64)> = histogram
                .by_bound()
                .map(|(bound, n)| (if bound.is_finite() { bound } else { f64::MAX }, n))
                .collect();
            family.encode_family(&labels)?.encode_histogram::<Labels>(
                histogram.sum_seconds(),
                histogram.count(),
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

fn gauge_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The labels naming a VIP key and the Service it serves now (empty once it left the table).
fn vip_labels(key: &VipKey, snapshot: &Snapshot) -> Labels {
    let (namespace, service) = snapshot
        .get(key)
        .map(|entry| (entry.service.namespace.clone(), entry.service.name.clone()))
        .unwrap_or_default();
    vec![
        ("namespace", namespace),
        ("service", service),
        ("vip", key.addr.to_string()),
        ("port", key.port.to_string()),
        ("protocol", key.protocol.as_str().to_ascii_lowercase()),
    ]
}

fn traffic_labels(key: &TrafficKey, snapshot: &Snapshot) -> Labels {
    let mut labels = vip_labels(&key.vip, snapshot);
    if let Some(backend) = key.backend {
        labels.push(("backend", backend.0.to_string()));
    }
    labels
}

fn with(mut labels: Labels, name: &'static str, value: impl Into<String>) -> Labels {
    labels.push((name, value.into()));
    labels
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut f = Family { encoder: &mut encoder };
        self.encode_process(&mut f)?;
        self.encode_control(&mut f)?;
        self.encode_table(&mut f)?;
        self.encode_traffic(&mut f)?;
        self.encode_workers(&mut f)
    }
}

impl Scrape {
    fn encode_process(&self, f: &mut Family<'_, '_>) -> Result<(), std::fmt::Error> {
        f.gauges(
            "ringlb_up",
            "1 while ringlb runs; the version label names the build.",
            [(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
        )?;
        f.gauge(
            "ringlb_ready",
            "1 once every worker serves the first table (as /readyz).",
            i64::from(self.ready),
        )
    }

    fn encode_control(&self, f: &mut Family<'_, '_>) -> Result<(), std::fmt::Error> {
        let snapshot = &self.snapshot;
        f.gauge("ringlb_snapshot_version", "Version of the table served.", gauge_of(snapshot.version))?;
        f.gauge(
            "ringlb_snapshot_entries",
            "VIP keys (address, port, protocol) served.",
            gauge_of(snapshot.len() as u64),
        )?;
        f.gauge(
            "ringlb_snapshot_reconciled",
            "1 when every worker serves the table published last.",
            i64::from(self.reconciled),
        )?;
        if let Some(source) = &self.source {
            f.gauge(
                "ringlb_snapshot_published_timestamp_seconds",
                "When the last table was published (Unix time).",
                gauge_of(source.published_at().unwrap_or(0)),
            )?;
            f.histograms(
                "ringlb_snapshot_build_duration_seconds",
                "How long building a table took.",
                [(Labels::new(), &source.builds())],
            )?;
            f.histograms(
                "ringlb_sync_lag_seconds",
                "From a change reaching the control loop (a watch event, a manifest load) to the publish of the table that carries it.",
                [(Labels::new(), &source.sync_lag())],
            )?;
            f.counters(
                "ringlb_source_loads",
                "Changes loaded from the source.",
                [(Labels::new(), source.loads())],
            )?;
            f.counters(
                "ringlb_source_rejected_reloads",
                "Manifest reloads rejected (the previous table kept serving).",
                [(Labels::new(), source.rejected_reloads())],
            )?;
            f.gauge(
                "ringlb_source_inputs_rejected",
                "1 while the source's current input is rejected and an older table serves.",
                i64::from(source.inputs_rejected()),
            )?;
            f.gauge(
                "ringlb_source_rejected_objects",
                "Objects the last build rejected (their Services serve their last good spec).",
                gauge_of(source.rejected_objects()),
            )?;
        }
        if let Some(health) = &self.health {
            f.counters(
                "ringlb_health_probes",
                "Active health probes sent.",
                [(Labels::new(), health.probes_sent())],
            )?;
            f.counters(
                "ringlb_health_probe_failures",
                "Active health probes that failed.",
                [(Labels::new(), health.probes_failed())],
            )?;
            f.counters(
                "ringlb_health_ejections",
                "Backends ejected by outlier detection.",
                [(Labels::new(), health.ejections())],
            )?;
            f.gauge(
                "ringlb_health_unhealthy_backends",
                "Backends failing their active checks now.",
                gauge_of(health.unhealthy_backends()),
            )?;
            f.gauge(
                "ringlb_health_ejected_backends",
                "Backends ejected now.",
                gauge_of(health.ejected_backends()),
            )?;
        }
        if let Some(leading) = self.leading {
            f.gauge(
                "ringlb_leader",
                "1 while this replica leads (allocates and writes statuses).",
                i64::from(leading),
            )?;
        }
        if !self.pools.is_empty() {
            let labels = |usage: &PoolUsage| vec![("pool", usage.pool.clone())];
            f.gauges(
                "ringlb_pool_addresses",
                "Addresses of an IPAddressPool.",
                self.pools.iter().map(|u| (labels(u), gauge_of(u.total))),
            )?;
            f.gauges(
                "ringlb_pool_addresses_in_use",
                "Addresses of an IPAddressPool assigned to Services.",
                self.pools.iter().map(|u| (labels(u), gauge_of(u.in_use))),
            )?;
        }
        if let Some((routes, failing)) = self.bgp {
            f.gauge("ringlb_bgp_routes", "Routes handed to BIRD.", gauge_of(routes))?;
            f.gauge(
                "ringlb_bgp_failing",
                "1 while BIRD refuses ringlb's configuration.",
                i64::from(failing),
            )?;
        }
        if let Some((owned, may_claim)) = self.l2 {
            f.gauge("ringlb_l2_owned_vips", "VIPs this replica answers ARP/NDP for.", gauge_of(owned))?;
            f.gauge(
                "ringlb_l2_may_claim",
                "1 while the L2 agreement lets this replica claim VIPs.",
                i64::from(may_claim),
            )?;
        }
        Ok(())
    }

    fn encode_table(&self, f: &mut Family<'_, '_>) -> Result<(), std::fmt::Error> {
        let snapshot = &self.snapshot;
        f.gauges(
            "ringlb_vip_backends",
            "Backends of a VIP key, eligible or not.",
            snapshot.entries().map(|e| (vip_labels(&e.key, snapshot), gauge_of(e.backends.len() as u64))),
        )?;
        f.gauges(
            "ringlb_vip_eligible_backends",
            "Backends of a VIP key that get new connections.",
            snapshot.entries().map(|e| (vip_labels(&e.key, snapshot), gauge_of(e.eligible.len() as u64))),
        )?;
        if !self.per_backend {
            return Ok(());
        }
        let verdicts = self.health.as_ref().map(HealthStatus::verdicts);
        let none = HealthOverlay::new();
        let (failing, ejected) = match &verdicts {
            Some(v) => (&v.failing_checks, &v.ejected),
            None => (&none, &none),
        };
        let node = self.node.as_deref();
        let states = snapshot.entries().flat_map(|entry| {
            let labels = vip_labels(&entry.key, snapshot);
            entry.backends.iter().enumerate().map(move |(idx, backend)| {
                let state = BackendState::of(entry, idx as u32, node, failing, ejected);
                let labels =
                    with(with(labels.clone(), "backend", backend.addr().to_string()), "state", state.name());
                (labels, 1)
            })
        });
        f.gauges(
            "ringlb_backend_state",
            "1 for each backend, labelled with its state (eligible, or why not).",
            states,
        )
    }

    fn encode_traffic(&self, f: &mut Family<'_, '_>) -> Result<(), std::fmt::Error> {
        let snapshot = &self.snapshot;
        // Cells of connections, not only of refusals (per backend, those have no backend).
        let used = |key: &TrafficKey, _: &TrafficStats| !self.per_backend || key.backend.is_some();
        let of = |protocol: Protocol| {
            self.traffic.iter().filter(move |(key, stats)| key.vip.protocol == protocol && used(key, stats))
        };
        for (protocol, name, what) in [
            (Protocol::Tcp, "ringlb_connections", "TCP connections"),
            (Protocol::Udp, "ringlb_udp_flows", "UDP flows"),
            (Protocol::Sctp, "ringlb_sctp_associations", "SCTP associations"),
        ] {
            f.counters(
                name,
                &format!("{what} established to a backend."),
                of(protocol).map(|(key, stats)| (traffic_labels(key, snapshot), stats.opened)),
            )?;
            f.gauges(
                &format!("{name}_active"),
                &format!("{what} open now."),
                of(protocol).map(|(key, stats)| (traffic_labels(key, snapshot), gauge_of(stats.active))),
            )?;
        }
        f.gauges(
            "ringlb_connections_draining",
            "TCP connections draining now (their backend or VIP left the table, or turned not ready).",
            of(Protocol::Tcp).map(|(key, stats)| (traffic_labels(key, snapshot), gauge_of(stats.draining))),
        )?;
        // UDP flows connect nothing.
        let connecting = || {
            self.traffic
                .iter()
                .filter(move |(key, stats)| used(key, stats) && key.vip.protocol != Protocol::Udp)
        };
        f.counters(
            "ringlb_backend_connect_errors",
            "Backend connects that failed, by cause (local: no descriptor, memory or source port here).",
            connecting().flat_map(|(key, stats)| {
                let labels = traffic_labels(key, snapshot);
                ConnectError::ALL.into_iter().map(move |cause| {
                    (with(labels.clone(), "cause", cause.name()), stats.connect_errors(cause))
                })
            }),
        )?;
        f.counters(
            "ringlb_backend_connect_retries",
            "Backend connects that were a client's second or later attempt.",
            connecting().map(|(key, stats)| (traffic_labels(key, snapshot), stats.retries)),
        )?;
        f.counters(
            "ringlb_refused",
            "Clients (UDP: datagrams of new flows) refused before any backend, by reason.",
            self.traffic.iter().filter(|(key, _)| key.backend.is_none()).flat_map(|(key, stats)| {
                let labels = vip_labels(&key.vip, snapshot);
                Refusal::ALL
                    .into_iter()
                    .map(move |why| (with(labels.clone(), "reason", why.name()), stats.refused(why)))
            }),
        )?;
        let directions = |(key, stats): &(TrafficKey, TrafficStats),
                          values: fn(&TrafficStats) -> [u64; 2]| {
            let labels = traffic_labels(key, snapshot);
            let [to_backend, to_client] = values(stats);
            [
                (with(labels.clone(), "direction", "to_backend"), to_backend),
                (with(labels, "direction", "to_client"), to_client),
            ]
        };
        let all = || self.traffic.iter().filter(|(key, stats)| used(key, stats));
        f.counters(
            "ringlb_relayed_bytes",
            "Bytes relayed, by direction.",
            all().flat_map(|cell| directions(cell, |s| s.bytes)),
        )?;
        f.counters(
            "ringlb_relayed_packets",
            "UDP datagrams and SCTP messages relayed, by direction.",
            all()
                .filter(|(key, _)| key.vip.protocol != Protocol::Tcp)
                .flat_map(|cell| directions(cell, |s| s.packets)),
        )?;
        f.histograms(
            "ringlb_backend_connect_duration_seconds",
            "From a backend connect's submission to its connection (TCP, SCTP).",
            all()
                .filter(|(key, _)| key.vip.protocol != Protocol::Udp)
                .map(|(key, stats)| (traffic_labels(key, snapshot), &stats.connect)),
        )?;
        f.histograms(
            "ringlb_connection_duration_seconds",
            "How long connections, flows and associations lived, from established to closed.",
            all().map(|(key, stats)| (traffic_labels(key, snapshot), &stats.lifetime)),
        )
    }

    /// Every field of [`WorkerStats`] as `ringlb_worker_<field>{worker}`: one list of fields for
    /// `/status` and `/metrics`.
    fn encode_workers(&self, f: &mut Family<'_, '_>) -> Result<(), std::fmt::Error> {
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = self
            .workers
            .iter()
            .filter_map(|w| match serde_json::to_value(w) {
                Ok(serde_json::Value::Object(fields)) => Some(fields),
                _ => None,
            })
            .collect();
        let Some(first) = rows.first() else { return Ok(()) };
        let mut name = String::new();
        for field in first.keys() {
            let samples = rows.iter().enumerate().map(|(worker, row)| {
                (
                    vec![("worker", worker.to_string())],
                    row.get(field).and_then(serde_json::Value::as_u64).unwrap_or(0),
                )
            });
            name.clear();
            let _ = write!(name, "ringlb_worker_{field}");
            let help = format!("Per worker: {} (see /status).", field.replace('_', " "));
            if WORKER_GAUGES.contains(&field.as_str()) {
                f.gauges(&name, &help, samples.map(|(labels, v)| (labels, gauge_of(v))))?;
            } else {
                f.counters(&name, &help, samples)?;
            }
        }
        Ok(())
    }
}

/// What `/backends` answers: every VIP key with each backend's state and why, its active
/// connections (every worker's) and where it runs.
pub fn backends(snapshot: &Snapshot, node: Option<&str>, verdicts: Option<&Verdicts>) -> serde_json::Value {
    let none = HealthOverlay::new();
    let (failing, ejected) = verdicts.map_or((&none, &none), |v| (&v.failing_checks, &v.ejected));
    let entries: Vec<serde_json::Value> = snapshot
        .entries()
        .map(|entry| {
            let backends: Vec<serde_json::Value> = entry
                .backends
                .iter()
                .enumerate()
                .map(|(idx, backend)| {
                    serde_json::json!({
                        "address": backend.addr(),
                        "state": BackendState::of(entry, idx as u32, node, failing, ejected),
                        "weight": backend.weight,
                        "active": backend.load.active(),
                        "conditions": backend.conditions,
                        "node": backend.node_name(),
                        "target": backend.placement.target,
                    })
                })
                .collect();
            serde_json::json!({
                "vip": entry.key.addr,
                "port": entry.key.port,
                "protocol": entry.key.protocol,
                "service": format!("{}/{}", entry.service.namespace, entry.service.name),
                "eligible": entry.eligible.len(),
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({ "version": snapshot.version, "entries": entries })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use lb_core::{Backend, BackendId, ObjectRef, Scheduler, SchedulerKind, ServiceEntry, TrafficPolicy};

    use super::*;

    fn entry(protocol: Protocol) -> ServiceEntry {
        let backends = vec![Backend::ready(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080))];
        let scheduler = Scheduler::build(SchedulerKind::RoundRobin, &backends, &[0]);
        ServiceEntry {
            key: VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80, protocol),
            service: ObjectRef::service("shop", "web"),
            port_name: None,
            backends: backends.into(),
            eligible: vec![0],
            scheduler,
            policy: Default::default(),
            traffic: TrafficPolicy::default(),
        }
    }

    /// A scrape with every optional part present: what a leading cluster replica with BGP and
    /// L2 reports.
    fn everything() -> Scrape {
        let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
        let snapshot = Snapshot::from_entries(7, protocols.map(entry));
        let backend = Some(BackendId(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080)));
        let traffic = protocols
            .into_iter()
            .flat_map(|protocol| {
                let vip = VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80, protocol);
                [TrafficKey { vip, backend: None }, TrafficKey { vip, backend }]
            })
            .map(|key| (key, TrafficStats { opened: 1, ..TrafficStats::default() }))
            .collect();
        Scrape {
            ready: true,
            reconciled: true,
            snapshot: Arc::new(snapshot),
            node: None,
            traffic,
            per_backend: true,
            workers: vec![WorkerStats::default(), WorkerStats::default()],
            source: Some(Readiness::new()),
            health: Some(HealthStatus::new()),
            leading: Some(true),
            pools: vec![PoolUsage { pool: "default".into(), total: 16, in_use: 3 }],
            bgp: Some((3, false)),
            l2: Some((2, true)),
        }
    }

    /// Every series name an exposition can hold: `name`, `name_total` for counters, the three
    /// series of a histogram.
    fn series_names(exposition: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for line in exposition.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
            let Some((name, kind)) = rest.split_once(' ') else { continue };
            match kind {
                "counter" => names.insert(format!("{name}_total")),
                "histogram" => {
                    for suffix in ["bucket", "sum", "count"] {
                        names.insert(format!("{name}_{suffix}"));
                    }
                    true
                }
                _ => names.insert(name.to_owned()),
            };
        }
        names
    }

    /// The `ringlb_…` names in a PromQL expression.
    fn names_in(expr: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = expr;
        while let Some(start) = rest.find("ringlb_") {
            let tail = &rest[start..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn every_family_has_help_and_a_type_and_samples_carry_bounded_labels() {
        let exposition = render(everything());
        assert!(exposition.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        let types = exposition.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = exposition.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        for wanted in [
            "ringlb_connections_total{namespace=\"shop\",service=\"web\",vip=\"192.0.2.1\",port=\"80\",protocol=\"tcp\",backend=\"10.0.0.1:8080\"} 1",
            "ringlb_udp_flows_total{namespace=\"shop\",service=\"web\",vip=\"192.0.2.1\",port=\"80\",protocol=\"udp\",backend=\"10.0.0.1:8080\"} 1",
            "ringlb_backend_state{namespace=\"shop\",service=\"web\",vip=\"192.0.2.1\",port=\"80\",protocol=\"sctp\",backend=\"10.0.0.1:8080\",state=\"eligible\"} 1",
            "ringlb_pool_addresses_in_use{pool=\"default\"} 3",
            "ringlb_leader 1",
            "ringlb_worker_descriptor_budget{worker=\"1\"} 0",
        ] {
            let wanted = wanted.replace("ringlb_leader 1", "ringlb_leader{} 1");
            assert!(exposition.contains(&wanted), "{wanted} in:\n{exposition}");
        }
        // No client address or port becomes a label.
        for line in exposition.lines().filter(|l| !l.starts_with('#')) {
            assert!(!line.contains("client=") && !line.contains("client_ip="), "{line}");
        }
    }

    #[test]
    fn the_prometheus_text_format_names_counters_by_their_samples_and_drops_eof() {
        let text = to_prometheus_text(&render(everything()));
        assert!(text.contains("# TYPE ringlb_connections_total counter\n"), "{text}");
        assert!(text.contains("# HELP ringlb_connections_total TCP connections established to a backend.\n"));
        assert!(text.contains("# TYPE ringlb_connections_active gauge\n"));
        assert!(!text.contains("# EOF"));
        assert!(wants_openmetrics(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")));
        assert!(!wants_openmetrics(Some("*/*")) && !wants_openmetrics(None));
    }

    #[test]
    fn the_dashboard_and_the_alert_rules_query_only_metrics_ringlb_exports() {
        let exported = series_names(&render(everything()));
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{root}/grafana/ringlb-dashboard.json")).expect("the dashboard"),
        )
        .expect("the dashboard is JSON");
        let mut queried = Vec::new();
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(panels.len() >= 10, "a dashboard worth the name");
        for panel in panels {
            let targets = panel["targets"].as_array().expect("every panel queries");
            assert!(!targets.is_empty(), "{panel}");
            for target in targets {
                let expr = target["expr"].as_str().expect("a PromQL expression");
                let names = names_in(expr);
                assert!(!names.is_empty(), "{expr} names no ringlb metric");
                queried.extend(names.into_iter().map(|name| (panel["title"].to_string(), name)));
            }
        }
        let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(format!("{root}/prometheus/ringlb-rules.yaml")).expect("the rules"),
        )
        .expect("the rules are YAML");
        let rules = rules["groups"][0]["rules"].as_sequence().expect("rules");
        for rule in rules {
            let expr = rule["expr"].as_str().expect("an expression");
            queried.extend(names_in(expr).into_iter().map(|name| (format!("{:?}", rule["alert"]), name)));
        }
        let unknown: Vec<_> = queried.iter().filter(|(_, name)| !exported.contains(name)).collect();
        assert!(unknown.is_empty(), "queried but not exported: {unknown:?}\nexported: {exported:?}");
    }
}
