//! Traffic counters per VIP key and backend — connections (TCP), flows (UDP) and associations
//! (SCTP) opened and open, connect errors by cause, retries, bytes and datagrams each way, clients
//! refused, connect latency and lifetime histograms — for `/metrics`.
//!
//! Each worker keeps its own [`TrafficCell`] per [`TrafficKey`] (a cache-line-aligned block of
//! relaxed atomics only that worker writes), found once per connection or flow through the worker's
//! own map and then held by the connection's [`Counted`] handle, so the relay's byte counts cost
//! one uncontended add and never a lookup. A cell is created on the key's first event and published
//! once into the [`TrafficRegistry`] (a mutex the worker takes only then and when it prunes);
//! readers add up the workers' cells of a key. A cell nothing holds (no connection or flow open)
//! whose VIP key or backend left the snapshot is pruned by housekeeping ([`PRUNE_INTERVAL`]), so
//! the registry stays the size of what is served and has been used; its series then disappear.
//! Label cardinality is bounded by the table: VIP keys times their backends ([`TrafficDetail::Vip`]
//! keeps one cell per VIP key), never a client.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_core::histogram::{CONNECT_SECONDS, Histogram, HistogramSnapshot, LIFETIME_SECONDS};
use lb_core::{Backend, BackendId, BackendLoad, LocalResource, Snapshot, VipKey};

/// How often a worker looks for cells to prune (never per publish: at 10,000 VIPs a walk over the
/// cells costs a millisecond).
pub(crate) const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// How finely traffic is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficDetail {
    /// Per VIP key and backend.
    #[default]
    Backend,
    /// Per VIP key only (a table of many backends with fewer series).
    Vip,
}

/// What a cell counts for: a VIP key and, with [`TrafficDetail::Backend`], one of its backends
/// (`None`: what concerns the key before any backend, e.g. a client no backend was left for).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrafficKey {
    pub vip: VipKey,
    pub backend: Option<BackendId>,
}

/// Why a connect to a backend failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// The backend refused (nothing listens), or a connect reached itself.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// No route to the backend, or its host is down.
    Unreachable,
    /// No descriptor, memory or source port here: never the backend's fault.
    Local,
    Other,
}

impl ConnectError {
    pub const ALL: [ConnectError; 5] = [
        ConnectError::Refused,
        ConnectError::Timeout,
        ConnectError::Unreachable,
        ConnectError::Local,
        ConnectError::Other,
    ];

    pub fn of_errno(errno: i32) -> ConnectError {
        if LocalResource::of_errno(errno).is_some() {
            return ConnectError::Local;
        }
        match errno {
            libc::ECONNREFUSED => ConnectError::Refused,
            // The linked timeout cancels the connect.
            libc::ECANCELED | libc::ETIMEDOUT => ConnectError::Timeout,
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN => {
                ConnectError::Unreachable
            }
            _ => ConnectError::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ConnectError::Refused => "refused",
            ConnectError::Timeout => "timeout",
            ConnectError::Unreachable => "unreachable",
            ConnectError::Local => "local",
            ConnectError::Other => "other",
        }
    }
}

/// Why a client was refused before reaching any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No eligible backend (or every attempt failed).
    NoBackend,
    /// Outside `loadBalancerSourceRanges`.
    SourceRange,
    /// The VIP key has `max-connections` open.
    VipLimit,
    /// Every eligible backend not tried yet has `max-backend-connections` open.
    BackendLimit,
    /// The client is over its `client-connection-rate`.
    ClientRate,
    /// The entry is transparent and no backend socket could be bound to the client's address
    /// (see `local_transparent_failed`).
    Transparent,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::NoBackend,
        Refusal::SourceRange,
        Refusal::VipLimit,
        Refusal::BackendLimit,
        Refusal::ClientRate,
        Refusal::Transparent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::NoBackend => "no_backend",
            Refusal::SourceRange => "source_range",
            Refusal::VipLimit => "vip_limit",
            Refusal::BackendLimit => "backend_limit",
            Refusal::ClientRate => "client_rate",
            Refusal::Transparent => "transparent",
        }
    }
}

/// One worker's counters of one [`TrafficKey`]. See the module doc.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct TrafficCell {
    opened: AtomicU64,
    active: AtomicU64,
    connect_errors: [AtomicU64; ConnectError::ALL.len()],
    retries: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    bytes: [AtomicU64; 2],
    packets: [AtomicU64; 2],
    draining: AtomicU64,
    /// The worker's count in progress during its walk over its connections (see
    /// [`TrafficCell::count_draining`]); only that worker touches it.
    draining_next: AtomicU64,
    connect: Histogram,
    lifetime: Histogram,
}

impl Default for TrafficCell {
    fn default() -> Self {
        TrafficCell {
            opened: AtomicU64::new(0),
            active: AtomicU64::new(0),
            connect_errors: Default::default(),
            retries: AtomicU64::new(0),
            refused: Default::default(),
            bytes: Default::default(),
            packets: Default::default(),
            draining: AtomicU64::new(0),
            draining_next: AtomicU64::new(0),
            connect: Histogram::new(CONNECT_SECONDS),
            lifetime: Histogram::new(LIFETIME_SECONDS),
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn sub(counter: &AtomicU64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
}

impl TrafficCell {
    /// `bytes` moved towards the backend (`to_backend`) or the client, in `packets` datagrams or
    /// messages (0 for a TCP stream).
    pub fn moved(&self, to_backend: bool, bytes: u64, packets: u64) {
        let index = usize::from(!to_backend);
        add(&self.bytes[index], bytes);
        if packets > 0 {
            add(&self.packets[index], packets);
        }
    }

    /// One more draining connection in the walk under way (see [`WorkerTraffic::publish_draining`]).
    pub fn count_draining(&self) {
        add(&self.draining_next, 1);
    }

    fn read_into(&self, stats: &mut TrafficStats) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        stats.opened += get(&self.opened);
        stats.active += get(&self.active);
        for (sum, counter) in stats.connect_errors.iter_mut().zip(&self.connect_errors) {
            *sum += get(counter);
        }
        stats.retries += get(&self.retries);
        for (sum, counter) in stats.refused.iter_mut().zip(&self.refused) {
            *sum += get(counter);
        }
        for i in 0..2 {
            stats.bytes[i] += get(&self.bytes[i]);
            stats.packets[i] += get(&self.packets[i]);
        }
        stats.draining += get(&self.draining);
        stats.connect.add(&self.connect);
        stats.lifetime.add(&self.lifetime);
    }
}

/// What the workers' cells of one key hold, added up.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficStats {
    /// Connections established, flows created, associations up.
    pub opened: u64,
    /// Of those, open now.
    pub active: u64,
    /// By [`ConnectError::ALL`].
    pub connect_errors: [u64; ConnectError::ALL.len()],
    /// Connects that were a client's second or later attempt.
    pub retries: u64,
    /// By [`Refusal::ALL`].
    pub refused: [u64; Refusal::ALL.len()],
    /// `[towards the backend, towards the client]`.
    pub bytes: [u64; 2],
    /// Datagrams (UDP) or messages (SCTP), `[towards the backend, towards the client]`.
    pub packets: [u64; 2],
    /// Connections draining now (their backend or VIP left the table, or turned not ready).
    pub draining: u64,
    /// From connect submission to established.
    pub connect: HistogramSnapshot,
    /// From established to closed.
    pub lifetime: HistogramSnapshot,
}

impl Default for TrafficStats {
    fn default() -> Self {
        TrafficStats {
            opened: 0,
            active: 0,
            connect_errors: [0; ConnectError::ALL.len()],
            retries: 0,
            refused: [0; Refusal::ALL.len()],
            bytes: [0; 2],
            packets: [0; 2],
            draining: 0,
            connect: HistogramSnapshot::empty(CONNECT_SECONDS),
            lifetime: HistogramSnapshot::empty(LIFETIME_SECONDS),
        }
    }
}

impl TrafficStats {
    pub fn connect_errors(&self, cause: ConnectError) -> u64 {
        self.connect_errors[ConnectError::ALL.iter().position(|&c| c == cause).unwrap_or(0)]
    }

    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[Refusal::ALL.iter().position(|&r| r == why).unwrap_or(0)]
    }
}

/// Every worker's published cells; read by [`TrafficRegistry::read`]. See the module doc.
#[derive(Debug)]
pub struct TrafficRegistry {
    detail: TrafficDetail,
    workers: Box<[Mutex<Published>]>,
}

/// One worker's cells as readers see them.
type Published = Vec<(TrafficKey, Arc<TrafficCell>)>;

impl TrafficRegistry {
    pub(crate) fn new(workers: usize, detail: TrafficDetail) -> TrafficRegistry {
        TrafficRegistry { detail, workers: (0..workers).map(|_| Mutex::default()).collect() }
    }

    /// Every key some worker counted, in key order, its workers' cells added up.
    pub fn read(&self) -> Vec<(TrafficKey, TrafficStats)> {
        let mut sums: BTreeMap<TrafficKey, TrafficStats> = BTreeMap::new();
        for worker in &self.workers {
            let cells = worker.lock().unwrap_or_else(|e| e.into_inner());
            for (key, cell) in cells.iter() {
                cell.read_into(sums.entry(*key).or_default());
            }
        }
        sums.into_iter().collect()
    }
}

/// A connection's, flow's or association's count on its backend: the shared load the
/// least-connection schedulers read, and this worker's traffic cell of its key. Taken by
/// `Selection::open`, given back exactly once to `Selection::close`.
#[derive(Debug)]
pub(crate) struct Counted {
    pub load: BackendLoad,
    cell: Arc<TrafficCell>,
    /// When the connect was submitted, and from [`Counted::established`] on, when it was.
    since: Instant,
    established: bool,
}

impl Counted {
    pub fn cell(&self) -> &TrafficCell {
        &self.cell
    }

    /// The connect succeeded: counts it opened and open, and its connect latency.
    pub fn established(&mut self, now: Instant) {
        if !self.established {
            self.cell.connect.record(now.saturating_duration_since(self.since));
            self.created(now);
        }
    }

    /// What needs no connect (a UDP flow) is open: counts it opened and open.
    pub fn created(&mut self, now: Instant) {
        if self.established {
            return;
        }
        self.established = true;
        add(&self.cell.opened, 1);
        add(&self.cell.active, 1);
        self.since = now;
    }

    /// The connect failed for `cause` (the handle is then closed).
    pub fn failed(&self, cause: ConnectError) {
        let index = ConnectError::ALL.iter().position(|&c| c == cause).unwrap_or(0);
        add(&self.cell.connect_errors[index], 1);
    }

    /// Ends the count: an established one records its lifetime.
    pub(crate) fn end(self, now: Instant) -> BackendLoad {
        if self.established {
            sub(&self.cell.active);
            self.cell.lifetime.record(now.saturating_duration_since(self.since));
        }
        self.load
    }
}

/// One worker's cells: the map it looks keys up in, published into the registry. See the module
/// doc.
pub(crate) struct WorkerTraffic {
    registry: Arc<TrafficRegistry>,
    worker: usize,
    cells: HashMap<TrafficKey, Arc<TrafficCell>>,
    pruned_at: Option<Instant>,
    /// Whether the last [`WorkerTraffic::publish_draining`] left some gauge above zero.
    draining_published: bool,
}

impl WorkerTraffic {
    pub fn new(registry: Arc<TrafficRegistry>, worker: usize) -> WorkerTraffic {
        WorkerTraffic { registry, worker, cells: HashMap::new(), pruned_at: None, draining_published: false }
    }

    fn cell(&mut self, vip: VipKey, backend: Option<BackendId>) -> &Arc<TrafficCell> {
        let backend = match self.registry.detail {
            TrafficDetail::Backend => backend,
            TrafficDetail::Vip => None,
        };
        let key = TrafficKey { vip, backend };
        let registry = &self.registry;
        let worker = self.worker;
        self.cells.entry(key).or_insert_with(|| {
            let cell = Arc::new(TrafficCell::default());
            if let Some(published) = registry.workers.get(worker) {
                published.lock().unwrap_or_else(|e| e.into_inner()).push((key, Arc::clone(&cell)));
            }
            cell
        })
    }

    /// Counts a connect to `backend` of `vip` from its submission on (`retry`: the client's
    /// second or later attempt).
    pub fn open(&mut self, vip: VipKey, backend: &Backend, retry: bool, now: Instant) -> Counted {
        let cell = Arc::clone(self.cell(vip, Some(backend.id)));
        if retry {
            add(&cell.retries, 1);
        }
        Counted { load: backend.load.clone(), cell, since: now, established: false }
    }

    /// Counts a client of `vip` refused before any backend.
    pub fn refuse(&mut self, vip: VipKey, why: Refusal) {
        let index = Refusal::ALL.iter().position(|&r| r == why).unwrap_or(0);
        add(&self.cell(vip, None).refused[index], 1);
    }

    /// Housekeeping, at most every [`PRUNE_INTERVAL`]: drops the cells nothing holds whose key
    /// `snapshot` no longer serves (or whose backend it no longer lists for that key).
    pub fn prune(&mut self, now: Instant, snapshot: &Snapshot) {
        if self.pruned_at.is_some_and(|at| now.saturating_duration_since(at) < PRUNE_INTERVAL) {
            return;
        }
        self.pruned_at = Some(now);
        let served = |key: &TrafficKey| match snapshot.get(&key.vip) {
            None => false,
            Some(entry) => key.backend.is_none_or(|id| entry.backends.iter().any(|b| b.id == id)),
        };
        // Held by the map and the registry only: no connection or flow counts on it.
        let idle = |cell: &Arc<TrafficCell>| Arc::strong_count(cell) <= 2;
        let before = self.cells.len();
        self.cells.retain(|key, cell| served(key) || !idle(cell));
        if self.cells.len() == before {
            return;
        }
        if let Some(published) = self.registry.workers.get(self.worker) {
            let cells = &self.cells;
            published.lock().unwrap_or_else(|e| e.into_inner()).retain(|(key, _)| cells.contains_key(key));
        }
    }

    /// Ends a walk that called [`TrafficCell::count_draining`] for each draining connection: each
    /// cell's gauge takes its count (readers never see a walk half done). `any`: some connection
    /// drains now; when none did at the last walk either, no cell needs a look.
    pub fn publish_draining(&mut self, any: bool) {
        if !any && !self.draining_published {
            return;
        }
        for cell in self.cells.values() {
            cell.draining.store(cell.draining_next.swap(0, Ordering::Relaxed), Ordering::Relaxed);
        }
        self.draining_published = any;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use lb_core::Protocol;

    use super::*;

    fn vip() -> VipKey {
        VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80, Protocol::Tcp)
    }

    fn backend(port: u16) -> Backend {
        Backend::ready(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), port))
    }

    #[test]
    fn workers_cells_of_a_key_add_up_and_a_connection_counts_once_opened_and_open_until_closed() {
        let registry = Arc::new(TrafficRegistry::new(2, TrafficDetail::Backend));
        let mut workers =
            [WorkerTraffic::new(Arc::clone(&registry), 0), WorkerTraffic::new(Arc::clone(&registry), 1)];
        let start = Instant::now();
        let b = backend(8080);
        let mut first = workers[0].open(vip(), &b, false, start);
        first.established(start + Duration::from_millis(3));
        first.established(start + Duration::from_millis(4));
        first.cell().moved(true, 100, 0);
        let failed = workers[1].open(vip(), &b, true, start);
        failed.failed(ConnectError::of_errno(libc::ECONNREFUSED));
        let _ = failed.end(start);
        workers[1].refuse(vip(), Refusal::NoBackend);

        let read = registry.read();
        assert_eq!(read.len(), 2, "{read:?}");
        let (key, stats) = &read[1];
        assert_eq!(key.backend, Some(b.id));
        assert_eq!((stats.opened, stats.active, stats.retries, stats.bytes), (1, 1, 1, [100, 0]));
        assert_eq!(stats.connect_errors(ConnectError::Refused), 1);
        assert_eq!(stats.connect.count(), 1);
        assert_eq!(read[0].1.refused(Refusal::NoBackend), 1);

        let _ = first.end(start + Duration::from_secs(2));
        let stats = &registry.read()[1].1;
        assert_eq!((stats.opened, stats.active, stats.lifetime.count()), (1, 0, 1));
    }

    #[test]
    fn idle_cells_of_keys_no_longer_served_are_pruned_and_held_ones_stay() {
        let registry = Arc::new(TrafficRegistry::new(1, TrafficDetail::Backend));
        let mut worker = WorkerTraffic::new(Arc::clone(&registry), 0);
        let now = Instant::now();
        let held = worker.open(vip(), &backend(1), false, now);
        let idle = worker.open(vip(), &backend(2), false, now);
        let _ = idle.end(now);
        worker.prune(now, &Snapshot::empty());
        assert_eq!(registry.read().len(), 1, "the held cell stays while its connection is open");
        let _ = held.end(now);
        worker.prune(now + Duration::from_secs(1), &Snapshot::empty());
        assert_eq!(registry.read().len(), 1, "pruning waits for its interval");
        worker.prune(now + PRUNE_INTERVAL, &Snapshot::empty());
        assert!(registry.read().is_empty());
    }

    #[test]
    fn vip_detail_counts_every_backend_of_a_key_in_one_cell() {
        let registry = Arc::new(TrafficRegistry::new(1, TrafficDetail::Vip));
        let mut worker = WorkerTraffic::new(Arc::clone(&registry), 0);
        let now = Instant::now();
        for port in [1, 2, 3] {
            let mut counted = worker.open(vip(), &backend(port), false, now);
            counted.established(now);
            let _ = counted.end(now);
        }
        let read = registry.read();
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].0.backend, read[0].1.opened), (None, 3));
    }

    #[test]
    fn connect_errors_are_told_apart_by_errno() {
        assert_eq!(ConnectError::of_errno(libc::ECONNREFUSED), ConnectError::Refused);
        assert_eq!(ConnectError::of_errno(libc::ECANCELED), ConnectError::Timeout);
        assert_eq!(ConnectError::of_errno(libc::EHOSTUNREACH), ConnectError::Unreachable);
        assert_eq!(ConnectError::of_errno(libc::EMFILE), ConnectError::Local);
        assert_eq!(ConnectError::of_errno(libc::EADDRNOTAVAIL), ConnectError::Local);
        assert_eq!(ConnectError::of_errno(libc::EPROTO), ConnectError::Other);
    }
}
