//! The state the engine handle and its workers share: the snapshot store, the publish generation,
//! the stop and drain requests, the session-affinity table, the traffic counters and the per-client rates and per-VIP counts of
//! the connection limits.
//!
//! Its own module so that the workers and their components read it without importing the engine
//! that spawns them. Everything here is lock-free: atomics and one `ArcSwap`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use arc_swap::ArcSwap;
use lb_core::{LoadRegistry, Snapshot, VipKey};

use crate::affinity::SharedAffinity;
use crate::handover::{Inherited, SocketRegistry};
use crate::rates::SharedRates;
use crate::traffic::TrafficRegistry;

/// State shared between the engine handle and its workers.
pub(crate) struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Bumped by every publish; workers report the generation they reconciled with.
    pub generation: AtomicU64,
    pub stop: AtomicBool,
    /// Graceful shutdown has begun: listeners close, established connections and flows go on.
    pub draining: AtomicBool,
    /// Set once the control side took the backend events' receiver; workers collect only then.
    pub backend_events_wanted: AtomicBool,
    /// `sessionAffinity: ClientIP` bindings, shared by every worker (see [`crate::affinity`]).
    pub affinity: Arc<SharedAffinity>,
    /// Every worker's traffic cells (see [`crate::traffic`]).
    pub traffic: Arc<TrafficRegistry>,
    /// Per-client connection rates (see [`crate::rates`]).
    pub rates: SharedRates,
    /// Each VIP key's open connections, for `max-connections` (workers keep the counters they use).
    pub vip_loads: LoadRegistry<VipKey>,
    /// Every open VIP socket, for a hot upgrade (see [`crate::handover`]).
    pub sockets: Arc<SocketRegistry>,
    /// Sockets of the process this one upgrades, taken instead of binding.
    pub inherited: Option<Arc<Inherited>>,
    /// The VIP sockets are shared with a new process (they were sent to it): closing one must only
    /// drop this process's descriptor, never `shutdown(2)` it, and UDP VIP sockets stop receiving.
    pub handed_over: AtomicBool,
}
