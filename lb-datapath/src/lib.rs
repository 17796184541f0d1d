//! ringlb's datapath: one worker thread per core, each with its own io_uring ring, its own
//! `SO_REUSEPORT` listeners (TCP) and VIP sockets (UDP), its own connection slab and UDP flow table.
//!
//! The only input from the control plane is a [`Snapshot`] published through [`Engine::publish`]
//! (an `arc-swap` store plus a wake-up of every worker); workers never talk to Kubernetes and never
//! decide policy (timeouts, attempts and backends come from the snapshot's entries).
//!
//! Modules: [`engine`](Engine) (threads, publish), `shared` (what the engine and its workers
//! share), `worker` (event loop, TCP listeners, housekeeping; owns the ring and the pieces every
//! protocol shares, and one component per protocol), `context` (the narrow `Ctx` a component is
//! lent for one call), the components `tcp` (connections: their life, `connection` state, `relay`
//! copy and splice paths), `udp` (VIP sockets, flow table, upstream sockets, buffer ring, sends)
//! and `sctp` (listeners, associations, message relay keeping stream ids and PPIDs); what they
//! share: `connect` (backend attempts, shared by TCP and SCTP), `dir` (the one relay direction),
//! `slots` (the one slot table, by generation and key), `source_ports` (backend connects' source
//! ports, chosen per worker), `transparent` (backend sockets bound to the client's address),
//! `listener` (socket setup), `budget`
//! (descriptors, local shortages), `warnings` (throttled), `pool` (buffers and pipes), `bufring`
//! (provided-buffer rings), `ring` (probe, `user_data`), `selection` (per-worker pick state,
//! counting on the backends' shared loads), `affinity` (the session-affinity table all workers
//! share), `stats`, `events` (backend events for outlier detection).
//! Components never import `worker`; the worker imports them.
//! `unsafe` lives only where io_uring and libc need it, each block with a `// SAFETY:` note.

mod affinity;
mod budget;
mod bufring;
mod connect;
mod context;
mod dir;
mod engine;
mod events;
mod handover;
mod listener;
mod pool;
mod rates;
mod ring;
mod sctp;
mod selection;
mod shared;
mod slots;
mod source_ports;
mod stats;
mod tcp;
mod traffic;
mod transparent;
mod udp;
mod warnings;
mod worker;

use std::time::Duration;

pub use budget::{DescriptorBudget, descriptor_limit, raise_descriptor_limit};
pub use engine::Engine;
pub use events::BackendEvents;
pub use handover::{Inherited, SocketRegistry, owned as owned_fds};
pub use lb_core::Snapshot;
pub use listener::ListenMode;
pub use ring::RingFeatures;
pub use source_ports::SourcePortMode;
pub use stats::{EngineStats, WorkerStats};
pub use traffic::{ConnectError, Refusal, TrafficDetail, TrafficKey, TrafficRegistry, TrafficStats};
pub use udp::UdpConfig;

/// How a worker moves bytes between client and backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Copy first; a connection direction that proves bulk (full buffers in a row) moves to splice.
    /// Request/response traffic stays on copy, bulk streams get zero-copy (see the relay module).
    #[default]
    Auto,
    /// recv/send through per-worker buffers, for every connection.
    Copy,
    /// `splice(2)` through pipes from a per-worker pool, for every connection.
    Splice,
}

/// Engine settings that are not per service.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of worker threads; each owns one ring.
    pub workers: usize,
    /// Pin worker `i` to available core `i % cores`.
    pub pin_workers: bool,
    pub relay: RelayMode,
    /// Upper bound of simultaneously open client connections per worker (the descriptor budget may
    /// allow fewer).
    pub max_connections_per_worker: usize,
    /// The descriptors the process may hold, shared out by [`DescriptorBudget`]; `None`: the soft
    /// `RLIMIT_NOFILE` when the engine starts (raise it first, see [`raise_descriptor_limit`]).
    pub descriptor_limit: Option<u64>,
    /// Bytes per copy-relay buffer (the ring's and the pool's). A direction holds one only while
    /// received bytes wait to be sent, so an idle connection holds none.
    pub buffer_size: usize,
    /// Buffers of each worker's copy-relay buffer ring (rounded to a power of two), which receives
    /// on a waiting connection draw from: how many such receives may hold bytes at once before
    /// they fall back to pool buffers (`relay_buffers_exhausted`). At most `relay_buffers ×
    /// buffer_size` resident per worker (16 MiB by default), and only the pages the kernel wrote
    /// into: 1 MiB per worker when messages are small.
    pub relay_buffers: u16,
    /// Requested pipe size (splice relay, `F_SETPIPE_SZ`), one per spliced direction. 1 MiB (the
    /// default `fs.pipe-max-size`) measured best: against 256 KiB the same Gbit/s at ~35 % less proxy
    /// CPU; 4 MiB lost both (interleaved `bench/compare` runs, tcp-stream-1 and -8). An empty pipe
    /// pins no memory; a full one holds page references, not copies.
    pub pipe_size: usize,
    /// Submission-queue entries of each worker's ring (a power of two).
    pub ring_entries: u32,
    /// Completion-queue entries of each worker's ring; `None`: sized for what can be in flight
    /// with the connection and flow caps (see `ring::completion_entries`). Tests set it small to
    /// exercise an overflowing completion queue.
    pub completion_entries: Option<u32>,
    /// Period of the housekeeping timer that enforces idle and drain timeouts and retries binds.
    pub housekeeping_interval: Duration,
    /// Use multishot accept where the kernel supports it (5.19+); `false` forces the re-armed
    /// single-shot accept older kernels get (useful to exercise that path on a new kernel).
    pub multishot_accept: bool,
    /// Where TCP VIPs listen: a socket per VIP:port and worker, or (`Auto`: once those do not
    /// fit the descriptor budget) one wildcard socket per worker for the VIPs sharing a port, told
    /// apart by each connection's local address (see the `listener` module).
    pub listen_mode: ListenMode,
    /// UDP flow table, timeouts and receive settings.
    pub udp: UdpConfig,
    /// How backend TCP connects get their source ports (see [`SourcePortMode`]).
    pub source_ports: SourcePortMode,
    /// The source ports the workers share out for backend TCP connects; `None`: the kernel's
    /// `ip_local_port_range`, re-read now and then.
    pub source_port_range: Option<std::ops::RangeInclusive<u16>>,
    /// How finely `/metrics` counts traffic: per VIP key and backend, or per VIP key.
    pub traffic_detail: TrafficDetail,
    /// VIP sockets received from the process this one upgrades: workers take them instead of
    /// binding (see the `handover` module).
    pub inherited: Option<std::sync::Arc<Inherited>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            pin_workers: true,
            relay: RelayMode::Auto,
            max_connections_per_worker: 65_536,
            descriptor_limit: None,
            buffer_size: 64 * 1024,
            relay_buffers: 256,
            pipe_size: 1024 * 1024,
            ring_entries: 4096,
            completion_entries: None,
            housekeeping_interval: Duration::from_millis(250),
            multishot_accept: true,
            listen_mode: ListenMode::Auto,
            udp: UdpConfig::default(),
            source_ports: SourcePortMode::default(),
            source_port_range: None,
            traffic_detail: TrafficDetail::default(),
            inherited: None,
        }
    }
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("io_uring setup failed: {0}")]
    RingSetup(#[source] std::io::Error),
    #[error("spawning worker {worker}: {source}")]
    Spawn { worker: usize, source: std::io::Error },
}
