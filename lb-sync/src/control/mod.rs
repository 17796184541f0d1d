//! The one control loop every source feeds: it keeps the [`ObjectStore`], builds a snapshot whenever
//! the objects changed, applies the health overlay, and publishes. Sources (manifest files, the
//! Kubernetes API) only report changes into it through a [`SourceHandle`]; nothing about building,
//! versions, health or publishing lives in a source.
//!
//! Invariants: a build that the builder rejects objects of never costs the last good table (the
//! builder keeps each rejected Service's last good spec, see `lb_core::build`); a snapshot is
//! published only when its entries differ from the served ones, with the next version; building
//! runs on tokio's blocking pool, never on the control thread itself; a burst of changes is applied
//! as a whole before one build. Health verdicts arrive from the [`crate::health`] monitor over a
//! channel and are applied with `lb_core::apply_health`; every build includes them.

mod publish;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;

use lb_core::announcement::{Announcements, BgpObjects};
use lb_core::{BuildOptions, BuildReport, HealthOverlay, Snapshot};
use tokio::sync::{mpsc, watch as channel};
use tokio::task::JoinSet;

use crate::health::{BackendEventReceiver, HealthMonitor, HealthStatus};
use crate::readiness::Readiness;
use crate::sink::SnapshotSink;
use crate::source::{Source, SyncError};
use crate::store::{Change, ObjectStore, Objects};
use publish::Publisher;

/// Batches of changes a source may have queued before it waits for the control loop.
const QUEUED_BATCHES: usize = 64;

/// What a source reports through: batches of changes, and its progress for `/readyz` and `/status`.
#[derive(Debug, Clone)]
pub struct SourceHandle {
    changes: mpsc::Sender<Vec<Change>>,
    readiness: Readiness,
}

impl SourceHandle {
    /// Hands `changes` to the control loop, which applies them as one; `false` once the control loop
    /// is gone (the source should then stop).
    pub async fn send(&self, changes: Vec<Change>) -> bool {
        self.changes.send(changes).await.is_ok()
    }

    /// The progress the source reports into (input rejections, loads that built nothing).
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
}

/// Builds and publishes what one source reports. See the module doc.
///
/// ```no_run
/// # async fn example(table: std::sync::Arc<arc_swap::ArcSwap<lb_core::Snapshot>>) {
/// let control = lb_sync::ControlLoop::new(lb_core::BuildOptions::default());
/// let readiness = control.readiness(); // hand this to /readyz
/// let source = lb_sync::ManifestSource::new("/etc/ringlb/manifests");
/// let shutdown = std::future::pending::<()>(); // e.g. a signal
/// if let Err(error) = control.run(source, table, shutdown).await {
///     eprintln!("{error}"); // the source could not start
/// }
/// # let _ = readiness;
/// # }
/// ```
pub struct ControlLoop {
    options: BuildOptions,
    readiness: Readiness,
    health: HealthStatus,
    backend_events: Option<BackendEventReceiver>,
    objects: Option<channel::Sender<Arc<Objects>>>,
    announcements: bool,
}

impl ControlLoop {
    /// A loop that builds with `options` (their `health` is replaced by the monitor's verdicts).
    pub fn new(options: BuildOptions) -> Self {
        ControlLoop {
            options,
            readiness: Readiness::new(),
            health: HealthStatus::new(),
            backend_events: None,
            objects: None,
            announcements: false,
        }
    }

    /// Says in every snapshot which nodes may announce each IP, as MetalLB's advertisement objects
    /// and the Nodes' labels in the store say (`lb_core::announcement`; a cluster's source watches
    /// them). Without it every node may announce every IP.
    pub fn with_announcements(mut self) -> Self {
        self.announcements = true;
        self
    }

    /// The objects as the loop holds them, after every batch that changed them (what the leader
    /// allocates from: every replica builds and allocates from the same watched state).
    pub fn objects(&mut self) -> channel::Receiver<Arc<Objects>> {
        match &self.objects {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = channel::channel(Arc::new(Objects::default()));
                self.objects = Some(sender);
                receiver
            }
        }
    }

    /// Feeds passive outlier detection (`ringlb.io/outlier-*`) with the datapath's backend events
    /// (`lb_datapath::Engine::take_backend_events`); its ejections join the health overlay.
    pub fn with_backend_events(mut self, events: BackendEventReceiver) -> Self {
        self.backend_events = Some(events);
        self
    }

    /// The node the builds narrow `externalTrafficPolicy: Local` to, if known.
    pub fn node_name(&self) -> Option<String> {
        self.options.node_name.clone()
    }

    /// A handle that tells whether the first snapshot was published (for `/readyz`).
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// A handle on the health checks' counters (for `/status`).
    pub fn health_status(&self) -> HealthStatus {
        self.health.clone()
    }

    /// Runs `source`, publishing its first complete view and then every change to `sink`, until
    /// `shutdown` resolves. Fails when the source fails (a source that cannot start, e.g. manifests
    /// that do not load, fails before anything is published).
    pub async fn run(
        self,
        source: impl Source,
        sink: impl SnapshotSink,
        shutdown: impl Future,
    ) -> Result<(), SyncError> {
        let mut shutdown = pin!(shutdown);
        let (changes, mut batches) = mpsc::channel(QUEUED_BATCHES);
        let handle = SourceHandle { changes, readiness: self.readiness.clone() };
        let mut source = pin!(source.run(handle));
        let mut source_running = true;
        let (feed, snapshots) = channel::channel(None);
        let (verdicts, mut overlays) = channel::channel(HealthOverlay::new());
        // Dropped (and so aborted, with its probes) when this loop returns.
        let mut monitor = JoinSet::new();
        monitor.spawn(
            HealthMonitor::new(self.health.clone()).with_events(self.backend_events).run(snapshots, verdicts),
        );
        let mut out = Outlet {
            sink,
            feed,
            publisher: Publisher::default(),
            health: HealthOverlay::new(),
            store: ObjectStore::new(),
            cache: lb_core::BuildCache::new(),
            options: self.options,
            readiness: self.readiness,
            objects: self.objects,
            announcements: self.announcements,
            announced: None,
        };
        let mut monitor_alive = true;
        // The source is polled beside the loop, not inside it: while a build runs, the source
        // goes on reading its watches, and what it queues meanwhile is built as one batch.
        let control = async {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut shutdown => return,
                    Some(batch) = batches.recv() => {
                        let received = std::time::Instant::now();
                        let mut count = objects_in(&batch);
                        let mut changed = out.apply(batch);
                        while let Ok(more) = batches.try_recv() {
                            count += objects_in(&more);
                            changed |= out.apply(more);
                        }
                        tracing::debug!(objects = count, changed, "changes in");
                        if changed || out.publisher.current().is_none() {
                            // One view of the store serves the build and the allocator's feed.
                            let objects = Arc::new(out.store.objects());
                            if out.rebuild(Arc::clone(&objects)).await {
                                out.readiness.record_lag(received.elapsed());
                            }
                            if let Some(feed) = &out.objects {
                                feed.send_replace(objects);
                            }
                            if count >= BULK_CHANGES {
                                let _ = blocking(release_free_memory).await;
                            }
                        }
                        out.readiness.count_load();
                    }
                    changed = overlays.changed(), if monitor_alive => match changed {
                        Ok(()) => {
                            out.health = overlays.borrow_and_update().clone();
                            out.apply_health().await;
                        }
                        Err(_) => {
                            tracing::warn!("health monitor stopped; verdicts are frozen as they are");
                            monitor_alive = false;
                        }
                    },
                }
            }
        };
        let mut control = pin!(control);
        loop {
            tokio::select! {
                () = &mut control => return Ok(()),
                result = &mut source, if source_running => {
                    source_running = false;
                    result?;
                    tracing::debug!("the source ended; the table stays as it is");
                }
            }
        }
    }
}

/// The loop's state: the objects, where snapshots go, and what decides what is published next.
/// Owned by the run loop alone: the one writer of versions.
struct Outlet<S> {
    sink: S,
    /// The health monitor's view of the served snapshot.
    feed: channel::Sender<Option<Arc<Snapshot>>>,
    publisher: Publisher,
    /// The latest health verdicts; every build and republish applies them.
    health: HealthOverlay,
    store: ObjectStore,
    /// What earlier builds computed (see `lb_core::BuildCache`).
    cache: lb_core::BuildCache,
    options: BuildOptions,
    readiness: Readiness,
    objects: Option<channel::Sender<Arc<Objects>>>,
    /// See [`ControlLoop::with_announcements`].
    announcements: bool,
    /// The last announcements computed, and the revisions of the objects they came from: most
    /// builds (an endpoint change) change none of those and reuse them.
    announced: Option<(Vec<u64>, Arc<Announcements>)>,
}

impl<S: SnapshotSink> Outlet<S> {
    fn apply(&mut self, batch: Vec<Change>) -> bool {
        let mut changed = false;
        for change in batch {
            changed |= self.store.apply(change);
        }
        changed
    }

    /// Builds from the store on the blocking pool and publishes the result if it differs. The
    /// build cache goes with the build and comes back with its result; a build that was lost
    /// (panicked) loses the cache too, and the next build starts from scratch. Whether it published.
    async fn rebuild(&mut self, objects: Arc<Objects>) -> bool {
        let previous = self.publisher.current().cloned();
        let options = BuildOptions { health: self.health.clone(), ..self.options.clone() };
        let version = self.publisher.next_version();
        let mut cache = std::mem::take(&mut self.cache);
        let announced = self.announcements.then(|| {
            let revisions = announcement_revisions(&objects);
            let reused = self.announced.take().filter(|(last, _)| *last == revisions).map(|(_, a)| a);
            (revisions, reused)
        });
        let built = blocking(move || {
            let started = std::time::Instant::now();
            let services: Vec<_> = objects.services.iter().map(|o| o.revised()).collect();
            let slices: Vec<_> = objects.slices.iter().map(|o| o.revised()).collect();
            let endpoints: Vec<&_> = objects.endpoints.iter().map(|o| &**o).collect();
            let report = lb_core::build_incremental(
                &services,
                &slices,
                &endpoints,
                &options,
                previous.as_deref(),
                version,
                &mut cache,
            );
            let (report, announced) = match announced {
                Some((revisions, reused)) => {
                    let announcements = reused.unwrap_or_else(|| Arc::new(announcements_of(&objects)));
                    let snapshot = report.snapshot.with_announcements(Arc::clone(&announcements));
                    (BuildReport { snapshot, ..report }, Some((revisions, announcements)))
                }
                None => (report, None),
            };
            (report, cache, announced, started.elapsed())
        })
        .await;
        match built {
            Ok((report, cache, announced, took)) => {
                self.readiness.record_build(took);
                self.cache = cache;
                self.announced = announced;
                self.publish_report(report)
            }
            Err(reason) => {
                tracing::warn!(reason, "a build did not complete; the table stays as it is");
                false
            }
        }
    }

    /// Whether it published.
    fn publish_report(&mut self, report: BuildReport) -> bool {
        self.readiness.set_rejected_objects(report.errors.len());
        match self.publisher.accept(report) {
            Some(snapshot) => {
                self.publish(snapshot);
                true
            }
            None => false,
        }
    }

    /// Republishes the served snapshot with `self.health` applied (no rebuild from the objects).
    async fn apply_health(&mut self) {
        let Some(current) = self.publisher.current().cloned() else { return };
        let options = BuildOptions { health: self.health.clone(), ..self.options.clone() };
        let version = self.publisher.next_version();
        match blocking(move || lb_core::apply_health(&current, &options, version)).await {
            Ok(snapshot) => {
                if let Some(snapshot) = self.publisher.offer(snapshot) {
                    self.publish(snapshot);
                }
            }
            Err(reason) => tracing::warn!(reason, "applying health verdicts did not complete"),
        }
    }

    fn publish(&self, snapshot: Arc<Snapshot>) {
        let version = snapshot.version;
        self.sink.publish(Arc::clone(&snapshot));
        self.feed.send_replace(Some(snapshot));
        self.readiness.mark_published(version);
    }
}

/// Who may announce what, by `objects`' pools, advertisements, BGP objects and Node labels; what
/// they leave out is logged (this runs only when one of those objects changed).
fn announcements_of(objects: &Objects) -> Announcements {
    fn refs<T>(stored: &[crate::store::Stored<T>]) -> Vec<&T> {
        stored.iter().map(|o| &*o.object).collect()
    }
    let (pools, l2) = (refs(&objects.pools), refs(&objects.l2_advertisements));
    let (peers, advertisements) = (refs(&objects.bgp_peers), refs(&objects.bgp_advertisements));
    let (communities, bfd_profiles) = (refs(&objects.communities), refs(&objects.bfd_profiles));
    let bgp = BgpObjects {
        peers: &peers,
        advertisements: &advertisements,
        communities: &communities,
        bfd_profiles: &bfd_profiles,
    };
    let announcements = Announcements::governed(&pools, &l2, &bgp, &objects.node_labels());
    for problem in announcements.problems() {
        tracing::warn!(%problem, "an announcement object is rejected");
    }
    announcements
}

/// The revisions of what [`announcements_of`] reads: equal lists, equal objects (a revision is
/// never reused, and one deleted leaves the list).
fn announcement_revisions(objects: &Objects) -> Vec<u64> {
    fn revisions<T>(stored: &[crate::store::Stored<T>]) -> impl Iterator<Item = u64> + '_ {
        // A separator ends each kind, so that an object moving between lists cannot look the same.
        stored.iter().map(|o| o.revision).chain([0])
    }
    revisions(&objects.pools)
        .chain(revisions(&objects.l2_advertisements))
        .chain(revisions(&objects.bgp_peers))
        .chain(revisions(&objects.bgp_advertisements))
        .chain(revisions(&objects.communities))
        .chain(revisions(&objects.bfd_profiles))
        .chain(revisions(&objects.nodes))
        .collect()
}

/// How many objects `batch` brings (a relist brings all of its kind at once).
fn objects_in(batch: &[Change]) -> usize {
    batch
        .iter()
        .map(|change| if let Change::Reset { objects, .. } = change { objects.len() } else { 1 })
        .sum()
}

/// A batch of at least this many changed objects (an initial list, a relist) leaves a build's worth of
/// freed memory behind: decoded lists, the previous cache.
const BULK_CHANGES: usize = 1024;

/// Gives the allocator's free pages back to the system. glibc keeps what a burst freed in its
/// arenas (a cluster's initial lists are decoded, slimmed and parsed once, then dropped), and
/// only an explicit trim returns pages from the middle of a heap.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and madvises the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs `work` on tokio's blocking pool; the error means the task itself was lost (it panicked).
/// Drops `value` on the blocking pool when a runtime is at hand: the last reference to a table or
/// an object list of a large cluster frees some 10,000 allocations (a millisecond), which the next
/// change should not wait for.
pub(crate) fn drop_aside<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || drop(value));
        }
        Err(_) => drop(value),
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work).await.map_err(|error| error.to_string())
}
