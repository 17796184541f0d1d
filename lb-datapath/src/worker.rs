//! One worker: its ring, event loop, listeners and housekeeping.
//!
//! The loop submits, waits for completions and dispatches them by [`OpKind`]. Wake-ups (eventfd)
//! bring a new snapshot to reconcile listeners against, or the stop request; a coarse timer drives
//! idle and drain checks and bind retries. The worker owns the ring and the pieces every protocol
//! shares ([`Core`]: counters, pick state, backend events, warnings, descriptor budget, snapshot
//! store) and one component per protocol: TCP connections ([`crate::tcp::Connections`]), UDP
//! sockets and flows ([`crate::udp`]), SCTP listeners and associations ([`crate::sctp`]). It hands
//! each completion to its component with a [`Ctx`] lent from the core (see [`crate::context`]);
//! components never import this module.
//! Never blocks except in `submit_and_wait`; never locks; logs nothing per connection at info level.
//! Invariant: after reconciling generation `g`, every TCP key of that snapshot is served by a
//! listener of the worker's [`ListenPlan`] (its own, or its port's wildcard) or that listen key is
//! in `unbound` (retried every tick), and no open listener is outside the plan; likewise every UDP
//! (SCTP) key has a VIP socket (listener) or waits for one, and none exists for a key outside it.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{Fd, Timespec};
use io_uring::{cqueue, opcode};
use lb_core::{LocalResource, Protocol, ServiceEntry, Snapshot, VipKey};
use socket2::Socket;

use crate::budget::{Room, WORKER_FIXED};
use crate::bufring::BufRing;
use crate::context::Ctx;
use crate::dir::Dir;
use crate::events::EventBuffer;
use crate::listener::{ListenPlan, Listener, ListenerTable, bind_listener, is_wildcard};
use crate::pool::{PipePool, RELAY_BUFFER_GROUP, RelayBuffers};
use crate::ring::{OpKind, Ring, UserData};
use crate::sctp::Associations;
use crate::selection::Selection;
use crate::shared::Shared;
use crate::stats::{self, WorkerCounters};
use crate::tcp::Connections;
use crate::tcp::relay::Path;
use crate::udp::Flows;
use crate::warnings::{Warning, Warnings, warn_limited};

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
    /// Where TCP VIPs listen (see [`crate::listener`]).
    pub listen_mode: crate::ListenMode,
    pub udp: crate::udp::UdpConfig,
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
    listeners: ListenerTable,
    /// Where this worker listens for the TCP keys of the snapshot last reconciled.
    plan: ListenPlan,
    /// Wildcards whose bind collided with another socket on the host: their groups bind exactly.
    exact_only: HashSet<VipKey>,
    /// Listen keys (TCP keys or wildcards) of the plan whose bind failed; retried every tick.
    unbound: Vec<VipKey>,
    multishot_accept: bool,
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
        let udp = Flows::new(&ring, settings.udp.clone(), settings.index);
        let max_connections = settings.max_connections;
        let selection = Selection::new(
            settings.index,
            settings.workers,
            Arc::clone(&shared.affinity),
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
            listeners: ListenerTable::default(),
            plan: ListenPlan::default(),
            exact_only: HashSet::new(),
            unbound: Vec::new(),
            multishot_accept,
            tcp,
            udp,
            sctp: Associations::new(max_connections),
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
            OpKind::Accept => self.on_accept(data, result, flags),
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
        let other_sockets = snapshot.keys().filter(|key| key.protocol != Protocol::Tcp).count();
        let tcp = snapshot.keys().filter(|key| key.protocol == Protocol::Tcp);
        let room = self.core.settings.budget.max_listeners().saturating_sub(other_sockets);
        self.plan = ListenPlan::new(tcp, self.core.settings.listen_mode, room, &mut self.exact_only);
        self.warn_if_listeners_cannot_fit(self.plan.sockets() + other_sockets);
        // New sockets open before unwanted ones close, so a group moving between exact sockets and
        // a wildcard never stops accepting. `bind_unbound` pops from the end: wildcards, pushed
        // last, are bound first, as they serve the most keys.
        self.unbound.clear();
        for listen in self.plan.exact.iter().chain(self.plan.wildcards.keys()) {
            if self.listeners.find(listen).is_none() {
                self.unbound.push(*listen);
            }
        }
        self.core.selection.retain_keys(|key| snapshot.get(key).is_some());
        self.bind_unbound(true);
        let mut unwanted = Vec::new();
        for (index, listener) in self.listeners.iter_mut() {
            if !listener.closing && !self.plan.wants(&listener.key) {
                unwanted.push(index);
            }
        }
        for index in unwanted {
            self.close_listener(index);
        }
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

    fn bind_unbound(&mut self, first_try: bool) {
        if self.core.draining {
            self.unbound.clear();
        }
        // A stack: the keys of a wildcard that collides are pushed to be bound exactly.
        let mut keys = std::mem::take(&mut self.unbound);
        while let Some(key) = keys.pop() {
            if !self.may_listen() {
                if first_try {
                    self.refuse_for_budget("a TCP VIP is left unbound (retried every tick)");
                }
                self.unbound.push(key);
                continue;
            }
            match bind_listener(key.socket_addr()) {
                Ok(socket) => {
                    let listener = Listener::new(key, socket);
                    let (index, _) = self.listeners.insert(key, listener);
                    self.arm_accept(index);
                }
                Err(error) if is_wildcard(&key) && error.raw_os_error() == Some(libc::EADDRINUSE) => {
                    // Another socket on the host holds this port on some address: one socket per
                    // VIP then, as long as the group exists.
                    self.exact_only.insert(key);
                    let group = self.plan.fall_back(&key);
                    if self.core.settings.index == 0 {
                        tracing::info!(%key, vips = group.len(), "the port is taken on some address of this host; listening on each VIP of it instead of the wildcard");
                    }
                    keys.extend(group.into_iter().filter(|vip| self.listeners.find(vip).is_none()));
                }
                Err(error) => {
                    stats::add(&self.core.counters.bind_failures, 1);
                    if first_try {
                        warn_limited!(self.core, Warning::Bind, %key, %error, "cannot listen; retrying every housekeeping tick");
                    } else {
                        tracing::debug!(worker = self.core.settings.index, %key, %error, "listen retry failed");
                    }
                    self.unbound.push(key);
                }
            }
        }
        stats::set(&self.core.counters.listeners, self.listeners.len() as u64);
    }

    /// Says, throttled, that the VIPs need more listening sockets than the descriptor budget lets
    /// a worker bind (the rest stay unbound, retried every tick), and the limit that would fit.
    fn warn_if_listeners_cannot_fit(&mut self, needed: usize) {
        let allowed = self.core.settings.budget.max_listeners();
        if needed <= allowed || self.core.settings.index != 0 {
            return;
        }
        let limit = crate::budget::DescriptorBudget::limit_for_listeners(needed, self.core.settings.workers);
        warn_limited!(
            self.core,
            Warning::Budget,
            needed,
            allowed,
            limit,
            "the VIPs need {needed} listening sockets per worker but the descriptor budget allows {allowed}; the rest stay unbound: raise the descriptor limit to {limit}, or run fewer workers"
        );
    }

    fn arm_accept(&mut self, index: u32) {
        let generation = self.listeners.generation(index);
        let multishot = self.multishot_accept;
        let Some(listener) = self.listeners.get_mut(index, generation) else { return };
        let fd = Fd(listener.socket.as_raw_fd());
        let accept_flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let user_data = UserData::new(OpKind::Accept, index, generation).encode();
        let entry = if multishot {
            opcode::AcceptMulti::new(fd).flags(accept_flags).build().user_data(user_data)
        } else {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
                .flags(accept_flags)
                .build()
                .user_data(user_data)
        };
        // SAFETY: no user memory is passed (null address pointers); the listening socket is only
        // dropped once the accept's final completion (no IORING_CQE_F_MORE) was reaped.
        unsafe { listener.arm(&mut self.core.ring, &entry, multishot, self.core.settings.index) };
    }

    /// Stops accepting on a listener: the kernel stops listening at once (`shutdown(SHUT_RD)` on a
    /// listening socket leaves the listen state, so new SYNs are refused), the armed accept is cancelled,
    /// and the slot is freed when its last completion arrives.
    fn close_listener(&mut self, index: u32) {
        let generation = self.listeners.generation(index);
        let Some(listener) = self.listeners.close(index) else { return };
        let _ = listener.socket.shutdown(std::net::Shutdown::Read);
        if listener.armed {
            let target = UserData::new(OpKind::Accept, index, generation).encode();
            let entry = opcode::AsyncCancel::new(target)
                .build()
                .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
            // SAFETY: a cancel request references no memory.
            let _ = unsafe { self.core.ring.push(&entry) };
        } else {
            self.listeners.remove(index);
        }
        stats::set(&self.core.counters.listeners, self.listeners.len() as u64);
    }

    fn on_accept(&mut self, data: UserData, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let Some(listener) = self.listeners.get_mut(data.slot, data.generation) else {
            close_raw(result);
            return;
        };
        if !more {
            listener.armed = false;
        }
        let key = listener.key;
        let closing = listener.closing;
        if result >= 0 {
            // SAFETY: a non-negative accept result is a new fd that nothing else owns.
            let socket = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(result) };
            if closing || self.core.stopping {
                drop(socket);
            } else {
                let room = self.tcp_room();
                self.tcp.new_connection(&mut self.core.ctx(room), key, socket);
            }
        } else {
            let errno = -result;
            if errno == libc::EINVAL && listener.multishot && !closing {
                // Kernels before 5.19 reject IORING_ACCEPT_MULTISHOT; fall back to re-armed accepts.
                self.multishot_accept = false;
            } else if let Some(resource) = LocalResource::of_errno(errno) {
                // Back off until the next tick: the accept would fail again at once (the client
                // waits in the backlog meanwhile).
                listener.rearm_at_tick = true;
                self.local_failure(resource, "an accept", errno);
            }
        }
        let Some(listener) = self.listeners.get_mut(data.slot, data.generation) else { return };
        if !listener.armed {
            if listener.closing {
                self.listeners.remove(data.slot);
                stats::set(&self.core.counters.listeners, self.listeners.len() as u64);
            } else if !listener.rearm_at_tick {
                self.arm_accept(data.slot);
            }
        }
    }

    fn housekeeping(&mut self) {
        if !self.unbound.is_empty() && !self.core.stopping {
            self.bind_unbound(false);
        }
        let mut rearm = Vec::new();
        for (index, listener) in self.listeners.iter_mut() {
            if listener.rearm_at_tick && !listener.armed && !listener.closing {
                rearm.push(index);
            }
        }
        for index in rearm {
            self.arm_accept(index);
        }
        let room = self.tcp_room();
        self.tcp.housekeeping(&mut self.core.ctx(room));
        self.core.selection.expire(self.core.now);
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
        self.unbound.clear();
        let open: Vec<u32> = self.listeners.iter_mut().filter(|(_, l)| !l.closing).map(|(i, _)| i).collect();
        for index in open {
            self.close_listener(index);
        }
        let room = self.sctp_room();
        self.sctp.close_listeners(&mut self.core.ctx(room));
        self.udp.stop_binding();
    }

    fn begin_stop(&mut self) {
        if self.core.stopping {
            return;
        }
        self.core.stopping = true;
        self.core.draining = true;
        self.unbound.clear();
        let open: Vec<u32> = self.listeners.iter_mut().filter(|(_, l)| !l.closing).map(|(i, _)| i).collect();
        for index in open {
            self.close_listener(index);
        }
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
        for (_, listener) in self.listeners.iter_mut() {
            let _ = listener.socket.shutdown(std::net::Shutdown::Read);
        }
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

    /// Whether one more listening socket may be bound (see `DescriptorBudget::max_listeners`).
    fn may_listen(&self) -> bool {
        self.room(0, 0).may_listen(0, 0)
    }

    /// Counts and warns about `what` being refused for the budget.
    fn refuse_for_budget(&mut self, what: &'static str) {
        let room = self.room(0, 0);
        self.core.ctx(room).refuse_for_budget(what);
    }

    /// Counts a failure of `what` for lack of a local resource and warns, throttled.
    fn local_failure(&mut self, resource: LocalResource, what: &'static str, errno: i32) {
        let room = self.room(0, 0);
        self.core.ctx(room).local_failure(resource, what, errno);
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

fn close_raw(fd: i32) {
    if fd >= 0 {
        // SAFETY: an accepted fd for a listener we no longer track; nothing else owns it.
        unsafe { libc::close(fd) };
    }
}
