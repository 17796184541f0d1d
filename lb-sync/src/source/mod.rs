//! [`ManifestSource`]: follows a manifest PATH and publishes a new snapshot whenever what it
//! describes changes.
//!
//! Invariants: a load that fails (unreadable file, bad YAML, invalid object, duplicate) never replaces
//! the served snapshot; it is logged with file and object and the previous snapshot keeps serving.
//! A snapshot is published only when its entries differ from the served ones, with the next version.
//! Reading, parsing and building run on tokio's blocking pool, never on the control thread itself.
//! Changes are noticed through file events (debounced) and, in case those are missed, by re-reading
//! the files every poll interval and comparing their content; both paths converge on one reload.
//! Health verdicts from the [`crate::health`] monitor arrive over a channel; this loop applies them
//! with `lb_core::apply_health` and builds every reload with them (see that module for why).

mod publish;
mod watch;

use std::future::{Future, pending};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use lb_core::{BuildOptions, BuildReport, HealthOverlay, Snapshot};
use tokio::sync::watch as channel;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::health::{BackendEventReceiver, HealthMonitor, HealthStatus};

use crate::manifest::{ErrorList, ManifestError, ManifestFile, ManifestSet, ReadError, read_manifest_files};
use crate::readiness::Readiness;
use crate::sink::SnapshotSink;
use publish::Publisher;
use watch::FileWatch;

/// How long file events must pause before a reload (editors and `kubectl` write in bursts).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
/// The longest a burst of events may delay a reload.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(500);
/// How often the files are re-read in case a file event was missed.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Why [`ManifestSource::run`] stopped before shutdown was requested.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The manifests could not be loaded at start-up; there is no previous snapshot to keep.
    #[error("initial load of manifests from {} failed: {}", path.display(), ErrorList(errors))]
    InitialLoad { path: PathBuf, errors: Vec<ManifestError> },
    /// The start-up load did not complete (the blocking task was lost, e.g. it panicked).
    #[error("initial load of manifests from {} did not complete: {reason}", path.display())]
    LoaderFailed { path: PathBuf, reason: String },
}

/// Serves the Service and EndpointSlice objects found in manifest files.
///
/// ```no_run
/// # async fn example(table: std::sync::Arc<arc_swap::ArcSwap<lb_core::Snapshot>>) {
/// let source = lb_sync::ManifestSource::new("/etc/ringlb/manifests", lb_core::BuildOptions::default());
/// let readiness = source.readiness(); // hand this to /readyz
/// let shutdown = std::future::pending::<()>(); // e.g. a signal
/// if let Err(error) = source.run(table, shutdown).await {
///     eprintln!("{error}"); // only the initial load can fail
/// }
/// # let _ = readiness;
/// # }
/// ```
#[derive(Debug)]
pub struct ManifestSource {
    path: PathBuf,
    options: BuildOptions,
    readiness: Readiness,
    health: HealthStatus,
    debounce: Duration,
    max_delay: Duration,
    poll_interval: Duration,
    file_events: bool,
    /// The datapath's backend events, for passive outlier detection (taken by `run`; in a mutex
    /// only so the source stays `Sync` while `run` borrows it across awaits).
    backend_events: std::sync::Mutex<Option<BackendEventReceiver>>,
}

/// What the last reload saw, so an unchanged input is neither rebuilt nor re-logged.
#[derive(PartialEq)]
enum Seen {
    Files(Arc<Vec<ManifestFile>>),
    Unreadable(String),
}

impl ManifestSource {
    /// A source for `path` (a file or a directory, see [`crate::manifest`]) built with `options`.
    pub fn new(path: impl Into<PathBuf>, options: BuildOptions) -> Self {
        ManifestSource {
            path: path.into(),
            options,
            readiness: Readiness::new(),
            health: HealthStatus::new(),
            debounce: DEFAULT_DEBOUNCE,
            max_delay: DEFAULT_MAX_DELAY,
            poll_interval: DEFAULT_POLL_INTERVAL,
            file_events: true,
            backend_events: std::sync::Mutex::new(None),
        }
    }

    /// Feeds passive outlier detection (`ringlb.io/outlier-*`) with the datapath's backend events
    /// (`lb_datapath::Engine::take_backend_events`); its ejections join the health overlay.
    pub fn with_backend_events(mut self, events: BackendEventReceiver) -> Self {
        self.backend_events = std::sync::Mutex::new(Some(events));
        self
    }

    /// Sets how long file events must pause before a reload, and the longest a burst may delay one.
    pub fn with_debounce(mut self, quiet: Duration, max_delay: Duration) -> Self {
        self.debounce = quiet;
        self.max_delay = max_delay.max(quiet);
        self
    }

    /// Sets how often the files are re-read regardless of file events (the safety net).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Turns file events off, leaving only the periodic re-read (for file systems without inotify,
    /// and to test that safety net on its own).
    pub fn with_file_events(mut self, enabled: bool) -> Self {
        self.file_events = enabled;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that tells whether the initial snapshot was published (for `/readyz`).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// A handle on the active health checks' counters (for `/status`).
    pub fn health_status(&self) -> HealthStatus {
        self.health.clone()
    }

    /// Loads the manifests once (no snapshot is built).
    pub fn load(&self) -> Result<ManifestSet, Vec<ManifestError>> {
        ManifestSet::load(&self.path)
    }

    /// Loads the manifests once and builds snapshot `version` from them (what `ringlb check` shows).
    pub fn load_and_build(
        &self,
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Result<BuildReport, Vec<ManifestError>> {
        let set = self.load()?;
        Ok(lb_core::build(&set.services, &set.slices, &set.endpoints, &self.options, previous, version))
    }

    /// Publishes the initial snapshot to `sink`, then follows the files and publishes every change
    /// until `shutdown` resolves. Fails only when the initial load fails (the caller decides whether
    /// that is fatal); later bad edits are logged and the previous snapshot keeps serving.
    pub async fn run(self, sink: impl SnapshotSink, shutdown: impl Future) -> Result<(), SyncError> {
        let mut shutdown = pin!(shutdown);
        // Started before the first read, so a change made during the initial load is not missed.
        let watch = self.start_watch();
        let (feed, snapshots) = channel::channel(None);
        let (verdicts, mut overlays) = channel::channel(HealthOverlay::new());
        // Dropped (and so aborted, with its probes) when this loop returns.
        let mut monitor = JoinSet::new();
        let health = HealthMonitor::new(self.health.clone())
            .with_events(self.backend_events.lock().unwrap_or_else(|e| e.into_inner()).take());
        monitor.spawn(health.run(snapshots, verdicts));
        let mut out = Outlet { sink, feed, publisher: Publisher::default(), health: HealthOverlay::new() };

        let loader_failed = |reason| SyncError::LoaderFailed { path: self.path.clone(), reason };
        let initial_load = |errors| SyncError::InitialLoad { path: self.path.clone(), errors };
        let files = self
            .read_files()
            .await
            .map_err(loader_failed)?
            .map_err(|error| initial_load(vec![error.into()]))?;
        let files = Arc::new(files);
        let mut seen = Seen::Files(Arc::clone(&files));
        let report = self.build(files, None, out.publisher.next_version(), out.health.clone()).await;
        let report = report.map_err(loader_failed)?.map_err(initial_load)?;
        self.readiness.set_rejected_objects(report.errors.len());
        if let Some(snapshot) = out.publisher.accept(report) {
            self.publish(&out, snapshot);
        }
        self.readiness.count_load();

        let mut poll = tokio::time::interval_at(Instant::now() + self.poll_interval, self.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut monitor_alive = true;
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return Ok(()),
                () = next_change(watch.as_ref()) => {
                    if let Some(watch) = &watch {
                        tokio::select! {
                            _ = &mut shutdown => return Ok(()),
                            () = watch.settle(self.debounce, self.max_delay) => {}
                        }
                    }
                    self.reload(&mut seen, &mut out).await;
                }
                _ = poll.tick() => self.reload(&mut seen, &mut out).await,
                changed = overlays.changed(), if monitor_alive => match changed {
                    Ok(()) => {
                        out.health = overlays.borrow_and_update().clone();
                        self.apply_health(&mut out).await;
                    }
                    Err(_) => {
                        tracing::warn!("health monitor stopped; verdicts are frozen as they are");
                        monitor_alive = false;
                    }
                },
            }
        }
    }

    /// Republishes the served snapshot with `out.health` applied (no rebuild from the objects).
    async fn apply_health<S: SnapshotSink>(&self, out: &mut Outlet<S>) {
        let Some(current) = out.publisher.current().cloned() else { return };
        let options = BuildOptions { health: out.health.clone(), ..self.options.clone() };
        let version = out.publisher.next_version();
        match blocking(move || lb_core::apply_health(&current, &options, version)).await {
            Ok(snapshot) => {
                if let Some(snapshot) = out.publisher.offer(snapshot) {
                    self.publish(out, snapshot);
                }
            }
            Err(reason) => tracing::warn!(reason, "applying health verdicts did not complete"),
        }
    }

    fn start_watch(&self) -> Option<FileWatch> {
        if !self.file_events {
            return None;
        }
        match FileWatch::start(&self.path) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    poll_interval = ?self.poll_interval,
                    "cannot watch manifests for changes; re-reading them periodically only"
                );
                None
            }
        }
    }

    /// Re-reads the files and, if they changed, rebuilds and publishes a changed snapshot.
    async fn reload<S: SnapshotSink>(&self, seen: &mut Seen, out: &mut Outlet<S>) {
        let files = match self.read_files().await {
            Ok(files) => files,
            Err(reason) => {
                tracing::warn!(path = %self.path.display(), reason, "manifest reload did not complete");
                return;
            }
        };
        let now = match files {
            Ok(files) => Seen::Files(Arc::new(files)),
            Err(error) => Seen::Unreadable(error.to_string()),
        };
        if now == *seen {
            return;
        }
        let files = match &now {
            Seen::Files(files) => Arc::clone(files),
            Seen::Unreadable(error) => {
                tracing::warn!(
                    error = error.as_str(),
                    "manifests unreadable; the previous snapshot keeps serving"
                );
                self.readiness.mark_inputs_rejected();
                *seen = now;
                self.readiness.count_load();
                return;
            }
        };
        let previous = out.publisher.current().cloned();
        let report = match self.build(files, previous, out.publisher.next_version(), out.health.clone()).await
        {
            Ok(report) => report,
            Err(reason) => {
                // `seen` stays as it was, so the next poll tries these files again.
                tracing::warn!(path = %self.path.display(), reason, "manifest reload did not complete");
                return;
            }
        };
        *seen = now;
        match report {
            Ok(report) => {
                if self.readiness.inputs_rejected() {
                    tracing::info!(path = %self.path.display(), "manifests valid again");
                }
                self.readiness.mark_inputs_valid();
                self.readiness.set_rejected_objects(report.errors.len());
                if let Some(snapshot) = out.publisher.accept(report) {
                    self.publish(out, snapshot);
                }
            }
            Err(errors) => {
                for error in &errors {
                    tracing::warn!(
                        file = %error.file().display(),
                        object = error.object().map(ToString::to_string),
                        %error,
                        "manifest edit rejected; the previous snapshot keeps serving"
                    );
                }
                self.readiness.mark_inputs_rejected();
            }
        }
        self.readiness.count_load();
    }

    fn publish<S: SnapshotSink>(&self, out: &Outlet<S>, snapshot: Arc<Snapshot>) {
        let version = snapshot.version;
        out.sink.publish(Arc::clone(&snapshot));
        out.feed.send_replace(Some(snapshot));
        self.readiness.mark_published(version);
    }

    /// Reads the files on the blocking pool. The outer error means the task itself was lost.
    async fn read_files(&self) -> Result<Result<Vec<ManifestFile>, ReadError>, String> {
        let path = self.path.clone();
        blocking(move || read_manifest_files(&path)).await
    }

    /// Parses `files` and builds snapshot `version` on the blocking pool.
    async fn build(
        &self,
        files: Arc<Vec<ManifestFile>>,
        previous: Option<Arc<Snapshot>>,
        version: u64,
        health: HealthOverlay,
    ) -> Result<Result<BuildReport, Vec<ManifestError>>, String> {
        let options = BuildOptions { health, ..self.options.clone() };
        blocking(move || {
            let set = ManifestSet::from_files(&files)?;
            Ok(lb_core::build(
                &set.services,
                &set.slices,
                &set.endpoints,
                &options,
                previous.as_deref(),
                version,
            ))
        })
        .await
    }
}

/// Where published snapshots go, and the state that decides what is published next. Owned by the
/// run loop alone: the one writer of versions.
struct Outlet<S> {
    sink: S,
    /// The health monitor's view of the served snapshot.
    feed: channel::Sender<Option<Arc<Snapshot>>>,
    publisher: Publisher,
    /// The latest health verdicts; every build and republish applies them.
    health: HealthOverlay,
}

/// Resolves on the next file event; never, when there are no file events.
async fn next_change(watch: Option<&FileWatch>) {
    match watch {
        Some(watch) => watch.changed().await,
        None => pending().await,
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work).await.map_err(|error| error.to_string())
}
