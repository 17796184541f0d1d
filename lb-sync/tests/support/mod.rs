//! Test support shared by lb-sync's integration tests: manifest text, editor-style writes, and a
//! running [`ManifestSource`] with a channel sink that every test waits on with a deadline.
//!
//! Every wait here is bounded; nothing sleeps to synchronise (conditions are polled with deadlines).

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lb_core::{BuildOptions, Snapshot};
use lb_sync::{ControlLoop, HealthStatus, ManifestSource, Readiness, SyncError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// How long a test waits for something that must happen (generous: the machine is shared).
pub const MUST_HAPPEN_WITHIN: Duration = Duration::from_secs(10);

/// The VIP and port of the `web` Service in [`web_manifest`].
pub const WEB_VIP: &str = "127.0.0.50:80";

/// The backend addresses of [`web_manifest`], in order.
pub const WEB_BACKENDS: [&str; 4] = ["127.0.0.2:8080", "127.0.0.3:8080", "127.0.0.4:8080", "127.0.0.5:8080"];

/// A Service `shop/web` on `WEB_VIP` and one EndpointSlice with the four [`WEB_BACKENDS`], whose
/// readiness is `ready[i]`, in two YAML documents.
pub fn web_manifest(ready: [bool; 4]) -> String {
    let mut endpoints = String::new();
    for (backend, ready) in WEB_BACKENDS.iter().zip(ready) {
        let ip = backend.trim_end_matches(":8080");
        endpoints.push_str(&format!("- addresses: [\"{ip}\"]\n  conditions:\n    ready: {ready}\n"));
    }
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: 10.96.0.20
  externalIPs: [\"127.0.0.50\"]
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
{}endpoints:
{endpoints}",
        slice_header("shop", "web-abcde", "web")
    )
}

/// The head of an EndpointSlice of `service` with one `http` port 8080 (append `endpoints:`).
pub fn slice_header(namespace: &str, name: &str, service: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
"
    )
}

/// A Service `namespace/name` with an external IP `vip` and port 80 → 8080, one YAML document.
pub fn service_yaml(namespace: &str, name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  externalIPs: [\"{vip}\"]
  ports:
  - name: http
    port: 80
    targetPort: 8080
"
    )
}

/// Saves like vim or an IDE do: write a temporary file in the same directory, then rename it over
/// `path`, so the original inode disappears.
pub fn save_by_rename(path: &Path, text: &str) {
    let name = path.file_name().and_then(|n| n.to_str()).expect("test paths have UTF-8 file names");
    let temporary = path.with_file_name(format!(".{name}.tmp~"));
    fs::write(&temporary, text).expect("write the temporary file");
    fs::rename(&temporary, path).expect("rename the temporary file over the manifest");
}

/// The eligible backends of the entry for `vip` (empty when there is no such entry).
pub fn eligible(snapshot: &Snapshot, vip: &str) -> Vec<SocketAddr> {
    let vip: SocketAddr = vip.parse().expect("test VIPs are valid socket addresses");
    snapshot
        .entries()
        .filter(|entry| entry.key.socket_addr() == vip)
        .flat_map(|entry| entry.eligible.iter().filter_map(|&idx| entry.backend(idx)).map(|b| b.addr()))
        .collect()
}

/// Parses backend addresses written as strings.
pub fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().expect("test addresses are valid")).collect()
}

/// A temporary directory that holds one manifest file, `services.yaml`.
pub struct ManifestDir {
    pub dir: tempfile::TempDir,
}

impl ManifestDir {
    pub fn with_file(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let this = ManifestDir { dir };
        fs::write(this.file(), text).expect("write the manifest");
        this
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self) -> PathBuf {
        self.dir.path().join("services.yaml")
    }
}

/// A [`ManifestSource`] running under a [`ControlLoop`] on the test's runtime, publishing into a
/// channel.
pub struct Running {
    pub snapshots: mpsc::UnboundedReceiver<Arc<Snapshot>>,
    pub readiness: Readiness,
    pub health: HealthStatus,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), SyncError>>,
}

/// A source for `path` whose safety-net poll is too slow to matter within a test, so what a test
/// observes comes from file events.
pub fn events_only_source(path: &Path) -> ManifestSource {
    ManifestSource::new(path).with_poll_interval(Duration::from_secs(3600))
}

impl Running {
    pub fn start(source: ManifestSource) -> Running {
        Running::start_with(ControlLoop::new(BuildOptions::default()), source)
    }

    /// [`Running::start`] under a given control loop.
    pub fn start_with(control: ControlLoop, source: ManifestSource) -> Running {
        let (sink, snapshots) = mpsc::unbounded_channel();
        let (shutdown, stop) = oneshot::channel::<()>();
        let (readiness, health) = (control.readiness(), control.health_status());
        let task = tokio::spawn(control.run(source, sink, stop));
        Running { snapshots, readiness, health, shutdown, task }
    }

    /// The next published snapshot; fails the test if none arrives within [`MUST_HAPPEN_WITHIN`].
    pub async fn next_snapshot(&mut self) -> Arc<Snapshot> {
        match timeout(MUST_HAPPEN_WITHIN, self.snapshots.recv()).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => panic!("the source stopped without publishing"),
            Err(_) => panic!("no snapshot published within {MUST_HAPPEN_WITHIN:?}"),
        }
    }

    /// Waits until `rejected_reloads` exceeds `before`, i.e. the source has seen and refused an edit.
    pub async fn rejected_after(&self, before: u64) {
        let deadline = Instant::now() + MUST_HAPPEN_WITHIN;
        while self.readiness.rejected_reloads() <= before {
            assert!(Instant::now() < deadline, "the bad edit was not noticed within {MUST_HAPPEN_WITHIN:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `loads` exceeds `before`, i.e. the source has loaded changed files (any outcome).
    pub async fn loaded_after(&self, before: u64) {
        let deadline = Instant::now() + MUST_HAPPEN_WITHIN;
        while self.readiness.loads() <= before {
            assert!(Instant::now() < deadline, "the edit was not loaded within {MUST_HAPPEN_WITHIN:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts nothing was published so far (call after a condition proved the reload happened).
    pub fn assert_nothing_published(&mut self) {
        if let Ok(snapshot) = self.snapshots.try_recv() {
            panic!("unexpected snapshot version {} was published", snapshot.version);
        }
    }

    /// Stops the source and checks it ended cleanly.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        match timeout(MUST_HAPPEN_WITHIN, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("source failed: {error}"),
            Ok(Err(error)) => panic!("source task failed: {error}"),
            Err(_) => panic!("source did not stop within {MUST_HAPPEN_WITHIN:?} of shutdown"),
        }
    }
}

/// Polls `condition` on the health counters every 10 ms until it holds; fails the test naming `what`
/// after [`MUST_HAPPEN_WITHIN`].
pub async fn until(
    status: &lb_sync::HealthStatus,
    what: &str,
    condition: impl Fn(&lb_sync::HealthStatus) -> bool,
) {
    let deadline = Instant::now() + MUST_HAPPEN_WITHIN;
    while !condition(status) {
        assert!(Instant::now() < deadline, "{what}: not within {MUST_HAPPEN_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
