//! One worker: its ring, event loop and housekeeping, and the wiring of its components.
//!
//! The loop submits, waits for completions and dispatches them by [`OpKind`]. Wake-ups (eventfd)
//! bring a new snapshot to reconcile against, or the stop request; a coarse timer drives idle and
//! drain checks and bind retries. The worker owns the ring and the pieces every protocol shares
//! ([`Core`]: counters, pick state, backend events, warnings, descriptor budget, snapshot store)
//! and one component per protocol: TCP listeners and connections ([`crate::tcp::Listeners`],
//! [`crate::tcp::Connections`]), UDP sockets and flows ([`crate::udp::Flows`]), SCTP listeners and
//! associations ([`crate::sctp::Associations`]). It hands each completion to its component with a
//! [`Ctx`] lent from the core (see [`crate::context`]), whose descriptor [`Room`] counts what the
//! other components hold; components never import this module.
//! Never blocks except in `submit_and_wait`; never locks; logs nothing per connection at info level.
//! Invariant: after reconciling generation `g`, every TCP, UDP and SCTP key of that snapshot has a
//! listener or VIP socket of this worker or waits for one (retried every tick), and none exists for
//! a key outside it (see each component for how).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::opcode;
use io_uring::types::{Fd, Timespec};
use lb_core::{Protocol, ServiceEntry, Snapshot};

use crate::budget::{Room, WORKER_FIXED};
use crate::bufring::BufRing;
use crate::context::Ctx;
use crate::dir::Dir;
use crate::events::EventBuffer;
use crate::pool::{PipePool, RELAY_BUFFER_GROUP, RelayBuffers};
use crate::ring::{OpKind, Ring, UserData};
use crate::sctp::Associations;
use crate::selection::Selection;
use crate::shared::Shared;
use crate::source_ports::SourcePorts;
use crate::stats::{self, WorkerCounters};
use crate::tcp::relay::Path;
use crate::tcp::{Connections, Listeners};
use crate::traffic::WorkerTraffic;
use crate::udp::Flows;
use crate::warnings::Warnings;

/// How long a stopping worker waits for cancelled operations before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Settings a worker needs from the engine configuration.
#[derive(Debug, Clone)]
pub(crate) struct WorkerSettings {
    pub index: usize,
    /// How many workers the engine runs.
    pub workers: usize,
    /// This worker's share of the descriptors (see [`crate::budget`]).
    pub budget: crate::budget::DescriptorBudget,
    pub path: Path,
    pub max_connections: usize,
    pub buffer_size: usize,
    /// Buffers in the copy relay's provided-buffer ring.
    pub relay_buffers: u16,
    pub pipe_size: usize,
    pub housekeeping_interval: Duration,
    /// Multishot accept allowed by configuration (the kernel must support it too).
    pub multishot_accept: bool,
    /// Where TCP and UDP VIPs listen (see [`crate::listener`]).
    pub listen_mode: crate::ListenMode,
    pub udp: crate::udp::UdpConfig,
    /// How backend TCP connects get their source ports, and from which range.
    pub source_ports: crate::SourcePortMode,
    pub source_port_range: Option<std::ops::RangeInclusive<u16>>,
    /// Where backend events are flushed (see [`crate::events`]).
    pub events: std::sync::mpsc::SyncSender<Vec<lb_core::health::BackendEvent>>,
}

/// The pieces of a worker that every protocol component may use, lent to one at a time as a
/// [`Ctx`].
struct Core {
    ring: Ring,
    settings: WorkerSettings,
    shared: Arc<Shared>,
    counters: Arc<WorkerCounters>,
    /// Pick states, load counts and affinity of this worker (every protocol alike).
    selection: Selection,
    events: EventBuffer,
    /// Throttles for the warnings that can repeat per connection, accept or key.
    warnings: Warnings,
    now: Instant,
    stopping: bool,
    /// Graceful shutdown: no new listeners, connections or flows (see `begin_drain`).
    draining: bool,
}

impl Core {
    /// What a component may use for one call, with the descriptor `room` the rest leaves it.
    #[inline]
    fn ctx(&mut self, room: Room) -> Ctx<'_> {
        Ctx {
            ring: &mut self.ring,
            now: self.now,
            worker: self.settings.index,
            counters: &self.counters,
            shared: &self.shared,
            selection: &mut self.selection,
            events: &mut self.events,
            warnings: &mut self.warnings,
            room,
            draining: self.draining,
            stopping: self.stopping,
        }
    }
}

/// One worker: the shared pieces, its TCP listeners, and one component per protocol.
pub(crate) struct Worker {
    core: Core,
    reconciled: Arc<AtomicU64>,
    wake_fd: RawFd,
    /// Leaked on purpose: the kernel may still own a read into it when the ring is torn down.
    wake_buffer: &'static mut u64,
    tick: Box<Timespec>,
    listeners: Listeners,
    tcp: Connections,
    udp: Flows,
    sctp: Associations,
    /// The snapshot last reconciled: the next one is compared with it.
    applied: Arc<Snapshot>,
}

impl Worker {
    pub fn new(
        ring: Ring,
        settings: WorkerSettings,
        shared: Arc<Shared>,
        counters: Arc<WorkerCounters>,
        reconciled: Arc<AtomicU64>,
        wake_fd: RawFd,
    ) -> Worker {
        let interval = settings.housekeeping_interval.max(Duration::from_millis(10));
        let multishot_accept = ring.features.multishot_accept && settings.multishot_accept;
        let listeners = Listeners::new(settings.listen_mode, multishot_accept, settings.workers);
        let udp = Flows::new(&ring, settings.udp.clone(), settings.listen_mode, settings.index);
        let sctp = Associations::new(settings.max_connections);
        let selection = Selection::new(
            settings.index,
            settings.workers,
            Arc::clone(&shared.affinity),
            WorkerTraffic::new(Arc::clone(&shared.traffic), settings.index),
            worker_seed(settings.index),
        );
        let relay_ring = match BufRing::register(
            &ring,
            settings.relay_buffers,
            settings.buffer_size,
            RELAY_BUFFER_GROUP,
        ) {
            Ok(buffers) => Some(buffers),
            Err(error) => {
                tracing::warn!(worker = settings.index, %error, "io_uring buffer ring refused (kernel before 5.19?); each TCP connection holds a buffer while it waits");
                None
            }
        };
        let tcp = Connections::new(
            settings.path,
            settings.max_connections,
            RelayBuffers::new(relay_ring, settings.buffer_size),
            PipePool::new(settings.pipe_size),
            SourcePorts::new(
                settings.source_ports,
                settings.source_port_range.clone(),
                settings.index,
                settings.workers,
            ),
        );
        let events = EventBuffer::new(settings.events.clone());
        let warnings = Warnings::new(settings.index);
        Worker {
            core: Core {
                ring,
                settings,
                shared,
                counters,
                selection,
                events,
                warnings,
                now: Instant::now(),
                stopping: false,
                draining: false,
            },
            reconciled,
            wake_fd,
            wake_buffer: Box::leak(Box::new(0u64)),
            tick: Box::new(Timespec::new().sec(interval.as_secs()).nsec(interval.subsec_nanos())),
            listeners,
            tcp,
            udp,
            sctp,
            applied: Arc::new(Snapshot::empty()),
        }
    }

    /// Runs until the engine asks to stop and every connection and listener is gone.
    pub fn run(mut self) {
        if let Err(err) = self.arm_wake().and_then(|()| self.arm_tick()) {
            tracing::error!(worker = self.core.settings.index, error = %err, "cannot arm worker ring");
            return;
        }
        self.sync_with_engine();
        let mut completions = Vec::with_capacity(1024);
        let mut stop_deadline = None;
        stats::set(
            &self.core.counters.ring_completion_entries,
            u64::from(self.core.ring.completion_capacity()),
        );
        self.update_descriptor_gauges();
        loop {
            if let Err(error) = self.core.ring.submit_and_wait(1) {
                self.abandon(error);
                return;
            }
            self.core.now = Instant::now();
            self.core.ring.reap(&mut completions);
            for &(user_data, result, flags) in &completions {
                self.dispatch(user_data, result, flags);
            }
            if self.core.stopping {
                let deadline = *stop_deadline.get_or_insert(self.core.now + STOP_GRACE);
                let idle = self.tcp.is_empty()
                    && self.listeners.is_empty()
                    && self.udp.is_idle()
                    && self.sctp.is_idle();
                if idle || self.core.now >= deadline {
                    self.finish_stop();
                    return;
                }
            }
        }
    }

    fn dispatch(&mut self, user_data: u64, result: i32, flags: u32) {
        let Some(data) = UserData::decode(user_data) else { return };
        match data.kind {
            OpKind::Wake => {
                if let Err(err) = self.arm_wake() {
                    tracing::error!(worker = self.core.settings.index, error = %err, "cannot re-arm wake-up read");
                }
                self.sync_with_engine();
            }
            OpKind::Tick => {
                if let Err(err) = self.arm_tick() {
                    tracing::error!(worker = self.core.settings.index, error = %err, "cannot re-arm housekeeping");
                }
                self.housekeeping();
            }
            OpKind::Accept => {
                let room = self.tcp_room();
                let tcp = &mut self.tcp;
                let accepted = |ctx: &mut Ctx<'_>, key, client| tcp.new_connection(ctx, key, client);
                self.listeners.on_accept(&mut self.core.ctx(room), data, result, flags, accepted);
            }
            OpKind::Connect => {
                let room = self.tcp_room();
                self.tcp.on_connect(&mut self.core.ctx(room), data, result);
            }
            OpKind::ConnectTimeout => {
                let room = self.tcp_room();
                self.tcp.on_connect_timeout(&mut self.core.ctx(room), data);
            }
            OpKind::ClientToBackend => {
                let room = self.tcp_room();
                self.tcp.on_direction(&mut self.core.ctx(room), data, Dir::ToBackend, result, flags);
            }
            OpKind::BackendToClient => {
                let room = self.tcp_room();
                self.tcp.on_direction(&mut self.core.ctx(room), data, Dir::ToClient, result, flags);
            }
            OpKind::UdpVip => {
                let room = self.udp_room();
                self.udp.on_vip_receive(&mut self.core.ctx(room), data, result, flags);
            }
            OpKind::UdpFlow => {
                let room = self.udp_room();
                self.udp.on_flow_receive(&mut self.core.ctx(room), data, result, flags);
            }
            OpKind::UdpSend => {
                let room = self.udp_room();
                self.udp.on_send(&mut self.core.ctx(room), data, result);
            }
            OpKind::SctpAccept
            | OpKind::SctpConnect
            | OpKind::SctpConnectTimeout
            | OpKind::SctpClientToBackend
            | OpKind::SctpBackendToClient => {
                let room = self.sctp_room();
                self.sctp.on_completion(&mut self.core.ctx(room), data, result);
            }
            OpKind::Cancel => {}
        }
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        let buffer: *mut u64 = &mut *self.wake_buffer;
        let entry = opcode::Read::new(Fd(self.wake_fd), buffer.cast::<u8>(), 8)
            .build()
            .user_data(UserData::new(OpKind::Wake, 0, 0).encode());
        // SAFETY: the buffer is leaked ('static) and the eventfd is owned by the engine, which joins
        // this thread before closing it.
        unsafe { self.core.ring.push(&entry) }
    }

    fn arm_tick(&mut self) -> std::io::Result<()> {
        let entry =
            opcode::Timeout::new(&*self.tick).build().user_data(UserData::new(OpKind::Tick, 0, 0).encode());
        // SAFETY: the timespec is boxed in the worker and read by the kernel at submission.
        unsafe { self.core.ring.push(&entry) }
    }

    /// Applies a newly published snapshot (if any) or the stop request.
    fn sync_with_engine(&mut self) {
        if self.core.shared.stop.load(Ordering::Acquire) {
            self.begin_stop();
            return;
        }
        if self.core.shared.draining.load(Ordering::Acquire) && !self.core.draining {
            self.begin_drain();
        }
        let generation = self.core.shared.generation.load(Ordering::Acquire);
        if generation == self.reconciled.load(Ordering::Relaxed) {
            return;
        }
        let snapshot = self.core.shared.snapshot.load_full();
        self.reconcile(&snapshot);
        self.applied = snapshot;
        self.reconciled.store(generation, Ordering::Release);
    }

    /// Opens listeners for new TCP keys, closes those of removed keys, and sets drain deadlines; then
    /// does the same for UDP keys (their sockets and flows). A snapshot with the keys of the last
    /// one (most changes: endpoints moved, no VIP came or went) touches no listener and looks at
    /// no key: with 10,000 keys that is the difference between a pointer walk and 30,000 lookups.
    fn reconcile(&mut self, snapshot: &Snapshot) {
        // One walk finds whether the keys are the same and, if so, the UDP entries that changed.
        let mut changed_udp = Vec::new();
        let same_keys = snapshot.changes_from(&self.applied).all(|change| match change {
            (Some(_), Some(after)) => {
                if after.key.protocol == Protocol::Udp {
                    changed_udp.push(Arc::clone(after));
                }
                true
            }
            _ => false,
        });
        if same_keys {
            self.reconcile_entries(snapshot, &changed_udp);
            return;
        }
        self.core.selection.retain_keys(|key| snapshot.get(key).is_some());
        let room = self.listeners_room();
        self.listeners.reconcile(&mut self.core.ctx(room), snapshot);
        self.update_descriptor_gauges();
        let room = self.tcp_room();
        let ctx = &mut self.core.ctx(room);
        self.tcp.mark_draining(ctx, snapshot);
        // A drain of zero (`not-ready-connections: close`) closes now, not at the next tick.
        self.tcp.expire(ctx);
        let room = self.udp_room();
        self.udp.reconcile(&mut self.core.ctx(room), snapshot);
        let room = self.sctp_room();
        self.sctp.reconcile(&mut self.core.ctx(room), snapshot);
    }

    /// [`Worker::reconcile`] for a snapshot with the keys of the last one: only entries changed
    /// (of the UDP ones, `changed_udp`), so listeners stay and the keys whose bind failed stay
    /// queued for the tick's retry.
    fn reconcile_entries(&mut self, snapshot: &Snapshot, changed_udp: &[Arc<ServiceEntry>]) {
        let room = self.tcp_room();
        let ctx = &mut self.core.ctx(room);
        self.tcp.mark_draining(ctx, snapshot);
        self.tcp.expire(ctx);
        for entry in changed_udp {
            self.udp.refresh_entry(entry);
        }
        let room = self.sctp_room();
        self.sctp.mark_draining(&mut self.core.ctx(room), snapshot);
    }

    fn housekeeping(&mut self) {
        let room = self.listeners_room();
        self.listeners.housekeeping(&mut self.core.ctx(room));
        let room = self.tcp_room();
        self.tcp.housekeeping(&mut self.core.ctx(room));
        self.core.selection.expire(self.core.now, &self.applied);
        self.core.events.flush(&self.core.counters);
        self.core.warnings.flush(self.core.now);
        self.update_descriptor_gauges();
        let ring = self.core.ring.counters;
        stats::set(&self.core.counters.ring_cq_overflowed, ring.overflowed);
        stats::set(&self.core.counters.ring_cq_dropped, ring.dropped);
        stats::set(&self.core.counters.ring_submit_retries, ring.retried);
        if !self.core.stopping {
            let room = self.udp_room();
            self.udp.housekeeping(&mut self.core.ctx(room));
            let room = self.sctp_room();
            self.sctp.housekeeping(&mut self.core.ctx(room));
        }
    }

    /// Graceful shutdown begins: every TCP and SCTP listener closes at once (the kernel refuses
    /// new connections, so clients go to another instance), no listener is bound again and no UDP
    /// flow is created, while established connections, associations and flows go on.
    fn begin_drain(&mut self) {
        self.core.draining = true;
        let room = self.listeners_room();
        self.listeners.close_all(&mut self.core.ctx(room));
        let room = self.sctp_room();
        self.sctp.close_listeners(&mut self.core.ctx(room));
        self.udp.stop_binding();
        if self.core.shared.handed_over.load(Ordering::Acquire) {
            let room = self.udp_room();
            self.udp.stop_receiving(&mut self.core.ctx(room));
        }
    }

    fn begin_stop(&mut self) {
        if self.core.stopping {
            return;
        }
        self.core.stopping = true;
        self.core.draining = true;
        let room = self.listeners_room();
        self.listeners.close_all(&mut self.core.ctx(room));
        let room = self.udp_room();
        self.udp.stop(&mut self.core.ctx(room));
        let room = self.sctp_room();
        self.sctp.stop(&mut self.core.ctx(room));
        let room = self.tcp_room();
        self.tcp.close_all(&mut self.core.ctx(room));
    }

    /// The ring failed for good (its submissions are refused): this worker can neither learn the
    /// outcome of what is in flight nor cancel it. It shuts every socket down, so its clients see
    /// the end and the kernel stops steering new connections to its listeners (the other workers
    /// keep serving them), and stops. Everything the kernel might still use (the ring itself, the
    /// relay and UDP buffers, the slots) is leaked on purpose rather than freed under the kernel.
    fn abandon(mut self, error: std::io::Error) {
        tracing::error!(
            worker = self.core.settings.index,
            %error,
            connections = self.tcp.len(),
            "io_uring failed; this worker shuts its sockets down and stops (its buffers are leaked)"
        );
        self.listeners.shut_down_sockets();
        self.tcp.shut_down_sockets();
        self.udp.shut_down_sockets();
        self.sctp.shut_down_sockets();
        stats::set(&self.core.counters.ring_failed, 1);
        stats::set(&self.core.counters.listeners, 0);
        std::mem::forget(self);
    }

    /// Leaves the loop. Connections whose cancelled operations never completed are leaked on
    /// purpose: their buffers may still be owned by the kernel.
    fn finish_stop(mut self) {
        stats::set(&self.core.counters.listeners, 0);
        self.udp.leak_if_busy();
        self.sctp.leak_if_busy();
        self.tcp.leak_if_busy(self.core.settings.index);
    }

    /// Descriptors this worker holds now, as counted against its budget (see [`crate::budget`]).
    fn descriptors(&self) -> usize {
        WORKER_FIXED
            + self.listeners.len()
            + self.tcp.descriptors()
            + self.udp.descriptors()
            + self.sctp.descriptors()
    }

    /// Listening sockets this worker holds (open or closing).
    fn listening(&self) -> usize {
        self.listeners.len() + self.udp.listeners() + self.sctp.listeners()
    }

    /// The descriptor room left to a component that holds `held_here` descriptors of which
    /// `listening_here` listen.
    #[inline]
    fn room(&self, held_here: usize, listening_here: usize) -> Room {
        Room::new(
            self.core.settings.budget,
            self.descriptors() - held_here,
            self.listening() - listening_here,
        )
    }

    fn listeners_room(&self) -> Room {
        self.room(self.listeners.len(), self.listeners.len())
    }

    #[inline]
    fn udp_room(&self) -> Room {
        self.room(self.udp.descriptors(), self.udp.listeners())
    }

    #[inline]
    fn sctp_room(&self) -> Room {
        self.room(self.sctp.descriptors(), self.sctp.listeners())
    }

    #[inline]
    fn tcp_room(&self) -> Room {
        self.room(self.tcp.descriptors(), 0)
    }

    /// Housekeeping: the descriptor gauges.
    fn update_descriptor_gauges(&self) {
        stats::set(&self.core.counters.descriptors, self.descriptors() as u64);
        stats::set(&self.core.counters.descriptor_budget, self.core.settings.budget.per_worker as u64);
    }
}

/// A seed for a worker's random stream (`p2c`); differs between workers and between runs. Not for
/// secrets.
fn worker_seed(index: usize) -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ index as u64
}
