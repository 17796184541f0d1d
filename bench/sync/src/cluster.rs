//! `--ringlb PATH`: the same objects through a real watch. testkit's API server emulator (HTTPS on
//! loopback) is filled with the Services, EndpointSlices and one IPAddressPool; the ringlb binary
//! at PATH (`run --kubeconfig`, one worker) allocates every address, writes every status and
//! serves every VIP; then one EndpointSlice at a time is patched through the API and timed until
//! ringlb's `/status` shows the snapshot that contains it reconciled by every worker (watch,
//! decode, store, build, publish, the workers' reconcile, plus the polling of `/status`, every
//! 200 µs). Its resident memory is read from `/proc` once everything is served.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use testkit::apiserver::ApiServer;

/// Writes in flight while the emulator is filled.
const PARALLEL_WRITES: usize = 32;

pub struct Report {
    pub fill_seconds: f64,
    pub all_served_seconds: f64,
    /// Once every VIP is served.
    pub rss_mib: f64,
    /// After the timed changes, and the peak of the whole run (`VmHWM`).
    pub rss_after_changes_mib: f64,
    pub peak_rss_mib: f64,
    pub latencies: hdrhistogram::Histogram<u64>,
}

struct Ringlb(Child);

impl Drop for Ringlb {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let mut stream = TcpStream::connect(admin)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET /status HTTP/1.1\r\nhost: ringlb\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    Ok(serde_json::from_str(body)?)
}

/// The resident set of process `pid`, from `/proc`.
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// The largest resident set process `pid` has had.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Polls `condition` until it holds or `limit` passes.
fn wait_for<T>(what: &str, limit: Duration, mut condition: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = condition() {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_micros(200)); // the polling interval
    }
}

/// Creates `objects` in their namespaces as a user would (without what the server sets, and what
/// `clear` removes besides), `PARALLEL_WRITES` at a time.
async fn create_all<K>(client: &kube::Client, objects: Vec<K>, clear: fn(&mut K)) -> anyhow::Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    futures::stream::iter(objects.into_iter().map(|mut object| {
        let client = client.clone();
        async move {
            let meta = object.meta_mut();
            meta.uid = None;
            meta.resource_version = None;
            meta.creation_timestamp = None;
            meta.generation = None;
            clear(&mut object);
            let namespace = object.meta().namespace.clone().unwrap_or_else(|| "default".to_owned());
            let api: Api<K> = Api::namespaced(client, &namespace);
            api.create(&PostParams::default(), &object).await.map(|_| ())
        }
    }))
    .buffer_unordered(PARALLEL_WRITES)
    .try_collect::<Vec<()>>()
    .await?;
    Ok(())
}

pub fn run(
    ringlb: &std::path::Path,
    workers: usize,
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    changes: usize,
    changed: impl Fn(usize) -> EndpointSlice,
) -> anyhow::Result<Report> {
    let count = services.len();
    let server = ApiServer::start();
    let dir = std::env::temp_dir().join(format!("ringlb-sync-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = server.write_kubeconfig(&dir.join("kubeconfig"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let client = runtime.block_on(async { kube::Client::try_from(server.kube_config().await) })?;

    let filling = Instant::now();
    runtime.block_on(async {
        let mut namespaces: Vec<String> =
            services.iter().filter_map(|s| s.metadata.namespace.clone()).collect();
        namespaces.extend(["metallb-system".to_owned(), "ringlb-system".to_owned()]);
        namespaces.sort();
        namespaces.dedup();
        let api: Api<Namespace> = Api::all(client.clone());
        for name in namespaces {
            let namespace: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
            api.create(&PostParams::default(), &namespace).await?;
        }
        let pools: Api<lb_core::ipam::IpAddressPool> = Api::namespaced(client.clone(), "metallb-system");
        let pool = serde_json::from_value(serde_json::json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
            "metadata": {"name": "bench", "namespace": "metallb-system"},
            "spec": {"addresses": ["127.1.0.0/16"]},
        }))?;
        pools.create(&PostParams::default(), &pool).await?;
        // What a user creates: no status, no server-set metadata.
        create_all(&client, services, |service| service.status = None).await?;
        create_all(&client, slices, |slice| slice.metadata.owner_references = None).await?;
        anyhow::Ok(())
    })?;
    let fill_seconds = filling.elapsed().as_secs_f64();

    let admin = {
        let probe = TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?
    };
    let started = Instant::now();
    let child = Command::new(ringlb)
        .args(["--log-level", "warn", "run", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--workers", &workers.to_string(), "--identity", "bench", "--admin", &admin.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ringlb")?;
    let ringlb = Ringlb(child);
    let entries = |admin| status(admin).ok().and_then(|s| s["snapshot"]["entries"].as_u64());
    wait_for("ringlb to allocate and serve every Service", Duration::from_secs(600), || {
        (entries(admin) == Some(count as u64)).then_some(())
    })?;
    let all_served_seconds = started.elapsed().as_secs_f64();
    let rss = rss_mib(ringlb.0.id());

    let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
    // A version counts once every worker serves it (the datapath, not only the publisher).
    let version = |admin| {
        let status = status(admin).ok()?;
        let snapshot = &status["snapshot"];
        (snapshot["reconciled"] == true).then(|| snapshot["version"].as_u64()).flatten()
    };
    for n in 0..changes {
        let slice = changed(n);
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let name = slice.metadata.name.clone().unwrap_or_default();
        let before = wait_for("a version", Duration::from_secs(10), || version(admin))?;
        let patch = serde_json::json!({"endpoints": slice.endpoints});
        let sent = Instant::now();
        runtime.block_on(async {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await
        })?;
        wait_for("the change to be published", Duration::from_secs(10), || {
            version(admin).filter(|v| *v > before)
        })?;
        latencies.record(sent.elapsed().as_micros() as u64)?;
    }
    let rss_after_changes_mib = rss_mib(ringlb.0.id());
    let peak_rss_mib = peak_rss_mib(ringlb.0.id());
    drop(ringlb);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Report {
        fill_seconds,
        all_served_seconds,
        rss_mib: rss,
        rss_after_changes_mib,
        peak_rss_mib,
        latencies,
    })
}
