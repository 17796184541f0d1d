//! The engine: spawns the workers, publishes snapshots to them and reports their state.
//!
//! The current snapshot lives in one `ArcSwap`; `publish` stores it, bumps a generation counter and
//! writes each worker's eventfd, on which the worker keeps a read armed in its ring. Workers load the
//! snapshot per accepted connection (lock-free) and reconcile listeners per generation.
//! Never blocks a worker; `shutdown` (also run on drop) stops and joins them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use lb_core::{LoadRegistry, Snapshot};

use crate::affinity::{AFFINITY_CAPACITY, SharedAffinity};
use crate::budget::{DescriptorBudget, descriptor_limit};
use crate::events::{BackendEvents, CHANNEL_BATCHES};
use crate::handover::SocketRegistry;
use crate::rates::{RATE_CAPACITY, SharedRates};
use crate::ring::{Ring, RingFeatures, completion_entries};
use crate::shared::Shared;
use crate::stats::{EngineStats, WorkerCounters};
use crate::tcp::relay::Path;
use crate::traffic::{TrafficKey, TrafficRegistry, TrafficStats};
use crate::worker::{Worker, WorkerSettings};
use crate::{DatapathError, EngineConfig, RelayMode};

/// How long `start` waits for a worker to report its ring set up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

struct WorkerHandle {
    wake: OwnedFd,
    counters: Arc<WorkerCounters>,
    reconciled: Arc<AtomicU64>,
}

/// The running datapath.
pub struct Engine {
    config: EngineConfig,
    shared: Arc<Shared>,
    workers: Vec<WorkerHandle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    features: RingFeatures,
    relay: RelayMode,
    backend_events: Mutex<Option<BackendEvents>>,
    budget: DescriptorBudget,
}

impl Engine {
    /// Spawns `config.workers` workers serving `initial`. Fails if any worker cannot set up its ring
    /// (io_uring refused or too old), so a misconfigured host fails loudly at start.
    pub fn start(config: EngineConfig, initial: Arc<Snapshot>) -> Result<Engine, DatapathError> {
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::new(initial),
            generation: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            backend_events_wanted: AtomicBool::new(false),
            affinity: Arc::new(SharedAffinity::new(AFFINITY_CAPACITY)),
            traffic: Arc::new(TrafficRegistry::new(config.workers.max(1), config.traffic_detail)),
            rates: SharedRates::new(RATE_CAPACITY),
            vip_loads: LoadRegistry::new(),
            sockets: Arc::default(),
            inherited: config.inherited.clone(),
            handed_over: AtomicBool::new(false),
        });
        let (events_tx, events_rx) = mpsc::sync_channel(CHANNEL_BATCHES);
        let workers = config.workers.max(1);
        let limit = match config.descriptor_limit {
            Some(limit) => limit,
            None => descriptor_limit().map_err(DatapathError::RingSetup)?.0,
        };
        let budget = DescriptorBudget::new(limit, workers);
        let mut config = config;
        config.max_connections_per_worker = config.max_connections_per_worker.min(budget.max_connections());
        config.udp.max_flows_per_worker = config.udp.max_flows_per_worker.min(budget.max_flows());
        let cores = allowed_cores();
        let mut engine = Engine {
            shared: shared.clone(),
            workers: Vec::new(),
            threads: Mutex::new(Vec::new()),
            features: RingFeatures {
                multishot_accept: false,
                multishot_recvmsg: false,
                recv_poll_first: false,
            },
            relay: config.relay,
            config: config.clone(),
            backend_events: Mutex::new(Some(events_rx)),
            budget,
        };
        let (started_tx, started_rx) = mpsc::channel::<(usize, Result<RingFeatures, std::io::Error>)>();
        for index in 0..workers {
            // SAFETY: eventfd(2) with constant flags; the result is checked before use. The fd is
            // blocking on purpose: io_uring returns EAGAIN for reads on O_NONBLOCK files instead of
            // waiting.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if raw < 0 {
                engine.shutdown();
                return Err(DatapathError::RingSetup(std::io::Error::last_os_error()));
            }
            // SAFETY: eventfd succeeded; we are the only owner of the new fd.
            let wake = unsafe { OwnedFd::from_raw_fd(raw) };
            let counters = Arc::new(WorkerCounters::default());
            let reconciled = Arc::new(AtomicU64::new(0));
            let settings = WorkerSettings {
                index,
                workers,
                budget,
                path: Path::Copy,
                max_connections: config.max_connections_per_worker.max(1),
                buffer_size: config.buffer_size,
                relay_buffers: config.relay_buffers,
                pipe_size: config.pipe_size,
                housekeeping_interval: config.housekeeping_interval,
                multishot_accept: config.multishot_accept,
                listen_mode: config.listen_mode,
                udp: config.udp.clone(),
                source_ports: config.source_ports,
                source_port_range: config.source_port_range.clone(),
                events: events_tx.clone(),
            };
            let core =
                if config.pin_workers && !cores.is_empty() { Some(cores[index % cores.len()]) } else { None };
            let thread = {
                let shared = shared.clone();
                let counters = counters.clone();
                let reconciled = reconciled.clone();
                let started = started_tx.clone();
                let wake_fd = wake.as_raw_fd();
                let relay = config.relay;
                let ring_entries = config.ring_entries.max(1);
                let completions = config.completion_entries.unwrap_or_else(|| {
                    completion_entries(
                        ring_entries,
                        config.max_connections_per_worker,
                        config.udp.max_flows_per_worker,
                        usize::from(config.udp.recv_buffers),
                    )
                });
                std::thread::Builder::new().name(format!("ringlb-w{index}")).spawn(move || {
                    if let Some(core) = core {
                        pin_to_core(index, core);
                    }
                    let ring = match Ring::new(ring_entries, completions) {
                        Ok(ring) => ring,
                        Err(err) => {
                            let _ = started.send((index, Err(err)));
                            return;
                        }
                    };
                    let mut settings = settings;
                    settings.path = choose_path(relay);
                    let _ = started.send((index, Ok(ring.features)));
                    Worker::new(ring, settings, shared, counters, reconciled, wake_fd).run();
                })
            };
            match thread {
                Ok(thread) => {
                    engine.threads.lock().unwrap_or_else(|e| e.into_inner()).push(thread);
                    engine.workers.push(WorkerHandle { wake, counters, reconciled });
                }
                Err(source) => {
                    engine.shutdown();
                    return Err(DatapathError::Spawn { worker: index, source });
                }
            }
        }
        drop(started_tx);
        for _ in 0..engine.workers.len() {
            match started_rx.recv_timeout(START_TIMEOUT) {
                Ok((_, Ok(features))) => engine.features = features,
                Ok((index, Err(err))) => {
                    engine.shutdown();
                    return Err(DatapathError::RingSetup(std::io::Error::new(
                        err.kind(),
                        format!("worker {index}: {err}"),
                    )));
                }
                Err(_) => {
                    engine.shutdown();
                    return Err(DatapathError::RingSetup(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "a worker did not report its ring set up",
                    )));
                }
            }
        }
        engine.relay = config.relay;
        Ok(engine)
    }

    /// Makes `snapshot` current for every new connection and reconciles listeners on every worker.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        self.shared.snapshot.store(snapshot);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.wake_all();
    }

    /// True once every worker runs and has reconciled its listeners with the current snapshot,
    /// and the engine is neither stopping nor draining.
    pub fn is_ready(&self) -> bool {
        self.is_serving() && self.is_reconciled()
    }

    /// True while every worker runs (none has failed) and the engine is neither stopping nor
    /// draining. Unlike [`Engine::is_ready`] it stays true while workers catch up with a snapshot
    /// just published, so a health answer built on it does not blink at every table change.
    pub fn is_serving(&self) -> bool {
        let running = self.threads.lock().map(|t| t.iter().all(|t| !t.is_finished())).unwrap_or(false);
        running && !self.shared.stop.load(Ordering::Acquire) && !self.shared.draining.load(Ordering::Acquire)
    }

    /// Whether every worker has reconciled with the snapshot published last (draining or not).
    pub fn is_reconciled(&self) -> bool {
        let generation = self.shared.generation.load(Ordering::Acquire);
        self.workers.iter().all(|w| w.reconciled.load(Ordering::Acquire) == generation)
    }

    /// Begins a graceful shutdown: every worker closes its TCP and SCTP listeners at once (so the
    /// kernel refuses new connections and clients go elsewhere) and takes no new UDP flow, while
    /// established connections, associations and flows go on. The engine is no longer ready. Call
    /// [`Engine::shutdown`] once [`Engine::is_drained`] or a grace period is over.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Whether no connection, association or UDP flow is left (after [`Engine::begin_drain`]).
    pub fn is_drained(&self) -> bool {
        let total = self.stats().total();
        total.active == 0 && total.flows_active == 0 && total.sctp_active == 0
    }

    /// The receiver of the workers' backend events (connect outcomes, backend resets), for passive
    /// outlier detection on the control side. Workers start collecting when it is taken; only the
    /// first call returns it.
    pub fn take_backend_events(&self) -> Option<BackendEvents> {
        let taken = self.backend_events.lock().unwrap_or_else(|e| e.into_inner()).take();
        if taken.is_some() {
            self.shared.backend_events_wanted.store(true, Ordering::Release);
        }
        taken
    }

    /// The snapshot new connections are served from.
    pub fn current(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Per-worker counters.
    /// The open VIP sockets, for handing them to a new process (see [`SocketRegistry::with_open`]).
    pub fn sockets(&self) -> &SocketRegistry {
        &self.shared.sockets
    }

    /// From now on the VIP sockets are shared with another process: none is shut down when it
    /// closes (the other process listens on it too). Called before the sockets are sent, and
    /// taken back ([`Engine::take_sockets_back`]) if the other process never took over.
    pub fn share_sockets(&self) {
        self.shared.handed_over.store(true, Ordering::Release);
    }

    /// The other process did not take over: this one owns its sockets alone again.
    pub fn take_sockets_back(&self) {
        self.shared.handed_over.store(false, Ordering::Release);
    }

    /// Closes the inherited sockets no worker took; how many (call once serving).
    pub fn close_unclaimed_inherited(&self) -> usize {
        self.shared.inherited.as_ref().map_or(0, |inherited| inherited.close_unclaimed())
    }

    /// Traffic per VIP key (and backend), every worker's added up, in key order.
    pub fn traffic(&self) -> Vec<(TrafficKey, TrafficStats)> {
        self.shared.traffic.read()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats { workers: self.workers.iter().map(|w| w.counters.read()).collect() }
    }

    /// The kernel features the workers probed.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// The relay path in use (`Auto` resolved).
    pub fn relay_mode(&self) -> RelayMode {
        self.relay
    }

    /// The configuration the engine runs with (connection and flow caps as the budget made them).
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// How the process's descriptors are shared out between the workers and the control thread.
    pub fn budget(&self) -> DescriptorBudget {
        self.budget
    }

    /// Stops accepting, resets open connections and joins the workers. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }

    fn wake_all(&self) {
        let one: u64 = 1;
        for worker in &self.workers {
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter (EAGAIN
            // cannot happen on a blocking eventfd before 2^64-2 pending wake-ups) is harmless.
            unsafe { libc::write(worker.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The relay path of a mode. Splicing runs `splice(2)` inline (no `IORING_OP_SPLICE` needed), so
/// every kernel can do all three.
fn choose_path(mode: RelayMode) -> Path {
    match mode {
        RelayMode::Auto => Path::Adaptive,
        RelayMode::Copy => Path::Copy,
        RelayMode::Splice => Path::Splice,
    }
}

/// CPUs this process may run on (cgroup/cpuset aware), ascending.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, filled by sched_getaffinity.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 = this thread; the size matches the set passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set within CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

fn pin_to_core(worker: usize, core: usize) {
    // SAFETY: as in `allowed_cores`: a zeroed set is valid and CPU_SET stays within CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` came from `allowed_cores`, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 = the calling (worker) thread; the size matches the set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        tracing::warn!(worker, core, error = %std::io::Error::last_os_error(), "cannot pin worker");
    }
}
