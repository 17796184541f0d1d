//! ringlb's datapath: one worker thread per core, each with its own io_uring ring, its own
//! `SO_REUSEPORT` listeners and its own connection slab. (TODO: helper fills in the engine.)
//!
//! The only input from the control plane is a [`Snapshot`] published through [`Engine::publish`]
//! (an `arc-swap` store plus a wake-up of every worker); workers never talk to Kubernetes.

use std::sync::Arc;

use lb_core::Snapshot;

/// How a worker moves bytes between client and backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Choose per kernel and measurement (see the relay module).
    #[default]
    Auto,
    /// recv/send through per-worker buffers.
    Copy,
    /// `splice` through pipes from a per-worker pool.
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
    /// Upper bound of simultaneously open client connections per worker.
    pub max_connections_per_worker: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            pin_workers: true,
            relay: RelayMode::Auto,
            max_connections_per_worker: 65_536,
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

/// The running datapath.
pub struct Engine {
    _config: EngineConfig,
    _current: Arc<Snapshot>,
}

impl Engine {
    pub fn start(config: EngineConfig, initial: Arc<Snapshot>) -> Result<Engine, DatapathError> {
        Ok(Engine { _config: config, _current: initial })
    }

    /// Makes `snapshot` current for every new connection and reconciles listeners on every worker.
    pub fn publish(&self, snapshot: Arc<Snapshot>) {
        let _ = snapshot;
    }

    /// True once every worker runs and has reconciled its listeners with the current snapshot.
    pub fn is_ready(&self) -> bool {
        false
    }
}
