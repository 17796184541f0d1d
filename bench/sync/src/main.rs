//! `ringlb-sync-bench`: ringlb's control plane at cluster scale, in one process and without I/O
//! (the datapath is a channel; watch decoding is the kube client's and not measured here).
//!
//! - **full build**: `lb_core::build` of every Service and EndpointSlice, as at start-up or after
//!   a relist;
//! - **one change**: one EndpointSlice edited (an endpoint's readiness flipped) handed to the control
//!   loop as a watch event would be, timed until the control loop has published the snapshot that
//!   contains it (what the datapath swaps in);
//! - **memory**: this process's resident set once the objects are stored and the table is built.
//!
//! Objects: `--services` LoadBalancer Services of ringlb's class, each with an allocated address
//! (`ipMode: Proxy`) and one port, each with one EndpointSlice of `--endpoints` ready endpoints,
//! with the metadata an API server gives them (uid, resourceVersion, labels, owner references,
//! node, zone and Pod of each endpoint), kept as the Kubernetes source keeps them (Services
//! compact, slices parsed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use lb_core::{BuildOptions, ServiceSelection, Snapshot, VipSource};
use lb_sync::{Change, ControlLoop, Object, Source, SourceHandle, SyncError};
use std::collections::BTreeMap;
use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
#[command(about = "Control-plane benchmark: full builds and one-change latency at cluster scale")]
struct Args {
    /// Services (one allocated address and port each).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Ready endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Full builds to time.
    #[arg(long, default_value_t = 10)]
    full_builds: usize,
    /// Single-slice changes to time.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Run this ringlb binary against an API server emulator instead (see `cluster`).
    #[arg(long)]
    ringlb: Option<std::path::PathBuf>,
    /// Datapath workers of that ringlb. 1, as in the figures of `bench/RESULTS.md`: on a 2-core
    /// machine a second worker competes with the emulator and the control thread.
    #[arg(long, default_value_t = 1)]
    ringlb_workers: usize,
}

/// Metadata as an API server returns it (what the source keeps of it is up to `lb_sync::slimmed`
/// and `lb_core::CompactService`).
fn metadata(meta: &mut ObjectMeta, i: usize, kind: &str) {
    meta.uid = Some(format!("{kind}-0000-4000-8000-{i:012}"));
    meta.resource_version = Some(format!("{}", 100_000 + i));
    meta.creation_timestamp =
        Some(Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).expect("a time")));
    meta.generation = Some(1);
}

fn service(i: usize) -> Service {
    let ip = format!("127.1.{}.{}", i / 256, i % 256);
    ServiceBuilder::new(&format!("ns{}", i % 100), &format!("svc{i}"))
        .service_type("LoadBalancer")
        .load_balancer_class(lb_core::selection::DEFAULT_CLASS)
        .port("http", 80, "TCP", TargetPort::String("http".into()))
        .with(|service| {
            metadata(&mut service.metadata, i, "svc");
            let app = BTreeMap::from([("app.kubernetes.io/name".to_owned(), format!("svc{i}"))]);
            service.metadata.labels = Some(app.clone());
            let spec = service.spec.get_or_insert_with(Default::default);
            spec.selector = Some(app);
            // A load balancer that proxies needs no node ports, and 10,000 Services would not fit
            // the default node port range (30000-32767) anyway.
            spec.allocate_load_balancer_node_ports = Some(false);
            service.status = Some(
                serde_json::from_value(serde_json::json!({
                    "loadBalancer": {"ingress": [{"ip": ip, "ipMode": "Proxy"}]}
                }))
                .expect("a status"),
            );
        })
        .build()
}

/// As the EndpointSlice controller writes it: nodes, zones, Pods as targets, an owner reference.
fn slice(i: usize, endpoints: usize, not_ready: Option<usize>) -> EndpointSlice {
    let namespace = format!("ns{}", i % 100);
    let mut builder =
        SliceBuilder::new(&namespace, &format!("svc{i}-abcde"), &format!("svc{i}")).port("http", 8080, "TCP");
    for k in 0..endpoints {
        let address = format!("10.{}.{}.{}", (i / 256) % 256, i % 256, k + 1);
        let conditions = if not_ready == Some(k) { Cond::not_ready() } else { Cond::ready() };
        let (node, pod) = (format!("node-{}", (i + k) % 50), format!("svc{i}-7d9f8c6b5-{k:05}"));
        builder = builder.pod_endpoint(&address, conditions, &node, &pod);
    }
    builder
        .with(|slice| {
            metadata(&mut slice.metadata, i, "eps");
            let labels = slice.metadata.labels.get_or_insert_with(BTreeMap::new);
            labels.insert(
                "endpointslice.kubernetes.io/managed-by".to_owned(),
                "endpointslice-controller.k8s.io".to_owned(),
            );
            slice.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "Service".to_owned(),
                name: format!("svc{i}"),
                uid: format!("svc-0000-4000-8000-{i:012}"),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]);
            for (k, endpoint) in slice.endpoints.iter_mut().flatten().enumerate() {
                endpoint.zone = Some(format!("zone-{}", k % 3));
                if let Some(target) = endpoint.target_ref.as_mut() {
                    target.uid = Some(format!("pod-0000-4000-8000-{:06}{k:06}", i));
                }
            }
        })
        .build()
}

fn options() -> BuildOptions {
    let selection = ServiceSelection { vips: VipSource::Allocated, ..ServiceSelection::default() };
    BuildOptions { selection, ..BuildOptions::default() }
}

/// A source that reports everything at once, then whatever the benchmark hands it.
struct Scripted {
    initial: Vec<Object>,
    changes: mpsc::UnboundedReceiver<Change>,
}

impl Source for Scripted {
    async fn run(mut self, handle: SourceHandle) -> Result<(), SyncError> {
        if !handle.send(vec![Change::everything(self.initial)]).await {
            return Ok(());
        }
        while let Some(change) = self.changes.recv().await {
            if !handle.send(vec![change]).await {
                break;
            }
        }
        Ok(())
    }
}

fn resident_mib() -> f64 {
    cluster::rss_mib(std::process::id())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

mod cluster;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(ringlb) = &args.ringlb {
        let services: Vec<Service> = (0..args.services).map(service).collect();
        let slices: Vec<EndpointSlice> = (0..args.services).map(|i| slice(i, args.endpoints, None)).collect();
        let (count, endpoints) = (args.services, args.endpoints);
        let report = cluster::run(ringlb, args.ringlb_workers, services, slices, args.changes, |n| {
            slice((n * 7919) % count, endpoints, Some(n % endpoints))
        })?;
        let quantile = |q: f64| report.latencies.value_at_quantile(q) as f64 / 1e3;
        println!(
            "{}",
            serde_json::json!({
                "services": args.services,
                "endpoints_per_service": args.endpoints,
                "emulator_filled_s": report.fill_seconds,
                "start_to_all_served_s": report.all_served_seconds,
                "ringlb_rss_mib_all_served": report.rss_mib,
                "ringlb_rss_mib_after_changes": report.rss_after_changes_mib,
                "ringlb_peak_rss_mib": report.peak_rss_mib,
                "one_slice_patch_to_published_ms": {
                    "p50": quantile(0.5), "p99": quantile(0.99), "max": report.latencies.max() as f64 / 1e3,
                    "count": report.latencies.len(),
                },
            })
        );
        return Ok(());
    }
    let started = Instant::now();
    let services: Vec<Service> = (0..args.services).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..args.services).map(|i| slice(i, args.endpoints, None)).collect();
    eprintln!(
        "generated {} Services and slices in {:.0} ms; RSS {:.0} MiB",
        args.services,
        millis(started.elapsed()),
        resident_mib()
    );
    let options = options();
    // First what a ringlb process holds (RSS), then one change at a time, then full builds (their
    // garbage would otherwise be in the RSS figure).
    // One change at a time through the control loop.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut parser = lb_sync::SliceParser::default();
    let (latencies, rss) = runtime.block_on(async {
        let initial: Vec<Object> = services
            .into_iter()
            .map(Object::from)
            .chain(slices.into_iter().filter_map(|slice| parser.object(&slice)))
            .map(lb_sync::slimmed)
            .collect();
        let (changes, script) = mpsc::unbounded_channel();
        let (sink, mut published) = mpsc::unbounded_channel::<Arc<Snapshot>>();
        let control = ControlLoop::new(options.clone());
        let running = tokio::spawn(control.run(
            Scripted { initial, changes: script },
            sink,
            std::future::pending::<()>(),
        ));
        let first = published.recv().await.context("the first snapshot")?;
        anyhow::ensure!(first.len() == args.services, "{} entries published", first.len());
        drop(first);
        let rss = resident_mib();
        let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
        for n in 0..args.changes {
            let i = (n * 7919) % args.services;
            let edited = slice(i, args.endpoints, Some(n % args.endpoints));
            let change = Change::Applied(parser.object(&edited).context("a named slice")?);
            let sent = Instant::now();
            changes.send(change).map_err(|_| anyhow::anyhow!("the control loop stopped"))?;
            let snapshot = published.recv().await.context("a snapshot per change")?;
            latencies.record(sent.elapsed().as_micros() as u64)?;
            anyhow::ensure!(snapshot.len() == args.services, "{} entries after a change", snapshot.len());
        }
        running.abort();
        anyhow::Ok((latencies, rss))
    })?;

    let services: Vec<Service> = (0..args.services).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..args.services).map(|i| slice(i, args.endpoints, None)).collect();
    // Full builds, each from scratch with the previous snapshot (as a relist does).
    let mut previous: Option<Snapshot> = None;
    let mut full = Vec::new();
    for version in 1..=args.full_builds as u64 {
        let started = Instant::now();
        let report = lb_core::build(&services, &slices, &[], &options, previous.as_ref(), version);
        full.push(millis(started.elapsed()));
        anyhow::ensure!(report.is_clean(), "the build rejected objects: {report}");
        anyhow::ensure!(report.snapshot.len() == args.services, "{} entries built", report.snapshot.len());
        previous = Some(report.snapshot);
    }
    drop(previous);
    full.sort_by(f64::total_cmp);
    // What a start costs the control loop: the slices come parsed (a source parses each as it
    // arrives), the build cache is empty.
    let mut names = lb_core::SliceNames::default();
    let parsed: Vec<_> = slices
        .iter()
        .filter_map(|slice| lb_core::ParsedEndpointSlice::parse(slice, &mut names).ok())
        .collect();
    anyhow::ensure!(parsed.len() == slices.len(), "every slice is named");
    let revised = |revision: usize| revision as u64 + 1;
    // As the store keeps them.
    let compact: Vec<lb_core::CompactService> = services.iter().map(lb_core::CompactService::from).collect();
    let services: Vec<_> = compact
        .iter()
        .enumerate()
        .map(|(i, object)| lb_core::Revised { object, revision: revised(i) })
        .collect();
    let parsed: Vec<_> = parsed
        .iter()
        .enumerate()
        .map(|(i, object)| lb_core::Revised { object, revision: revised(i) })
        .collect();
    let mut from_parsed = Vec::new();
    for version in 1..=args.full_builds as u64 {
        let mut cache = lb_core::BuildCache::new();
        let started = Instant::now();
        let report = lb_core::build_incremental(&services, &parsed, &[], &options, None, version, &mut cache);
        from_parsed.push(millis(started.elapsed()));
        anyhow::ensure!(report.snapshot.len() == args.services, "{} entries built", report.snapshot.len());
    }
    from_parsed.sort_by(f64::total_cmp);

    let quantile = |q: f64| latencies.value_at_quantile(q) as f64 / 1e3;
    println!(
        "{}",
        serde_json::json!({
            "services": args.services,
            "endpoints_per_service": args.endpoints,
            "full_build_ms": {
                "min": full.first(), "median": full.get(full.len() / 2), "max": full.last(),
            },
            "full_build_from_parsed_slices_ms": {
                "min": from_parsed.first(), "median": from_parsed.get(from_parsed.len() / 2),
                "max": from_parsed.last(),
            },
            "one_slice_change_to_published_ms": {
                "p50": quantile(0.5), "p99": quantile(0.99), "max": latencies.max() as f64 / 1e3,
                "count": latencies.len(),
            },
            "rss_mib_after_first_publish": rss,
        })
    );
    Ok(())
}
