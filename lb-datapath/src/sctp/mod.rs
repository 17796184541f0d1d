//! The SCTP datapath of a worker: one-to-one (`SOCK_STREAM`) SCTP listeners per `Protocol::Sctp` key
//! (`SO_REUSEPORT`, one per worker, like TCP), one backend association per client association, and
//! a message relay that keeps each message's stream id, payload protocol id and unordered flag
//! (`SCTP_RCVINFO` in through io_uring `RecvMsg`, `SCTP_SNDINFO` out through `SendMsg`).
//!
//! Backends are picked through the worker's [`crate::selection::Selection`] exactly as for TCP,
//! connects use io_uring `Connect` with a linked timeout and retry other backends. A clean end
//! (receive returns 0) becomes `shutdown(SHUT_WR)` (SCTP SHUTDOWN) toward the other peer and a
//! graceful close of both (SCTP has no half-close); a reset or any relay error aborts both
//! associations (`SO_LINGER {on, 0}` + close sends ABORT).
//! Messages up to [`socket::MAX_MESSAGE`] bytes are relayed whole (pieces are gathered until
//! `MSG_EOR`); larger ones abort the association. Where the kernel has no SCTP, each worker logs once
//! and counts a bind failure per key; TCP and UDP keys of the same snapshot are unaffected.
//! Each association allocates its two 64 KiB message buffers when accepted (not per message).
//! This file: state, listeners (reconcile, bind, accept), drain and idle checks, stop;
//! `association` one association's life; `socket` socket options and control messages.
//! Invariants: every association is pinned (its buffers and timespec never move while the kernel may
//! use them) and released only when `in_flight == 0`; each direction has one operation at a time.

mod association;
pub(crate) mod socket;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::opcode;
use io_uring::types::Fd;
use lb_core::{BackendId, LocalResource, Protocol, ServiceEntry, Snapshot, VipKey};
use socket2::Socket;

use self::socket::{MsgBuf, bind_sctp_listener};
use crate::context::Ctx;
use crate::dir::Dir;
use crate::listener::{Listener, ListenerTable};
use crate::ring::{ConnectTarget, OpKind, UserData};
use crate::slots::{Pinned, Slots};
use crate::stats;
use crate::warnings::{Warning, warn_limited};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Recv,
    Send,
}

struct Direction {
    buf: Box<MsgBuf>,
    pending: Pending,
}

impl Direction {
    fn new() -> Direction {
        Direction { buf: MsgBuf::new(), pending: Pending::None }
    }
}

/// One client association and its backend association.
struct Assoc {
    key: VipKey,
    client: Socket,
    client_addr: SocketAddr,
    backend: Option<Socket>,
    backend_id: Option<BackendId>,
    /// The backend counted in the worker's load (between connect submission and release).
    counted: Option<crate::traffic::Counted>,
    entry: Option<Arc<ServiceEntry>>,
    tried: crate::connect::Tried,
    /// Its count on its VIP key's open associations (`max-connections`); `None` without a limit.
    vip_load: Option<lb_core::BackendLoad>,
    /// Read by the kernel when the connect is submitted.
    connect_target: ConnectTarget,
    connect_pending: bool,
    relaying: bool,
    closing: bool,
    reset: bool,
    in_flight: u32,
    idle_timeout: Duration,
    drain_timeout: Duration,
    /// Set while the key or the backend is missing from the snapshot (aborted when it passes).
    drain_deadline: Option<Instant>,
    last_activity: Instant,
    /// By [`Dir::index`].
    dirs: [Direction; 2],
}

/// Everything SCTP a worker owns, one component: its listeners and the association pairs. The worker
/// calls it with a [`Ctx`] for each completion, snapshot and tick; it reaches nothing else of the
/// worker.
pub(crate) struct Associations {
    listeners: ListenerTable,
    /// Keys of the current snapshot without a listener; retried every tick (unless unsupported).
    unbound: Vec<VipKey>,
    /// The kernel refused SCTP sockets (`EPROTONOSUPPORT`); logged once.
    unsupported: bool,
    /// Pinned: the kernel reads the connect target inside an association.
    assocs: Slots<Assoc, (), Pinned<Assoc>>,
    /// Upper bound of open associations, as for TCP connections (the budget may allow fewer).
    max_connections: usize,
}

fn abort_socket(socket: &Socket) {
    let _ = socket.set_linger(Some(Duration::ZERO));
}

impl Associations {
    pub fn new(max_connections: usize) -> Associations {
        Associations {
            max_connections,
            listeners: ListenerTable::default(),
            unbound: Vec::new(),
            unsupported: false,
            assocs: Slots::default(),
        }
    }

    /// Descriptors held: listeners, and a client and a backend socket per association.
    #[inline]
    pub fn descriptors(&self) -> usize {
        self.listeners.len() + 2 * self.assocs.len()
    }

    /// Listening sockets held (open or closing).
    #[inline]
    pub fn listeners(&self) -> usize {
        self.listeners.len()
    }

    /// No listener and no association left (the stopping worker may leave).
    pub fn is_idle(&self) -> bool {
        self.listeners.is_empty() && self.assocs.is_empty()
    }

    /// Associations whose cancelled operations never completed keep their buffers (the kernel may
    /// still write into them).
    pub fn leak_if_busy(&mut self) {
        if !self.assocs.is_empty() {
            std::mem::forget(std::mem::take(&mut self.assocs));
        }
    }

    /// Shuts every listener and association down (the ring failed; see `Worker::abandon`).
    pub fn shut_down_sockets(&mut self) {
        for (_, listener) in self.listeners.iter_mut() {
            let _ = listener.socket.shutdown(std::net::Shutdown::Read);
        }
        for (_, assoc) in self.assocs.iter_mut() {
            let _ = assoc.client.shutdown(std::net::Shutdown::Both);
            if let Some(backend) = &assoc.backend {
                let _ = backend.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn get(&mut self, index: u32, generation: u32) -> Option<&mut Assoc> {
        self.assocs.get_mut(index, generation)
    }

    fn live(&self) -> Vec<(u32, u32)> {
        let mut live = Vec::new();
        self.assocs.live(&mut live);
        live
    }
}

impl Associations {
    /// Opens listeners for new SCTP keys and closes those of removed keys.
    pub(crate) fn reconcile(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot) {
        let mut removed = Vec::new();
        for (index, listener) in self.listeners.iter_mut() {
            if !listener.closing && snapshot.get(&listener.key).is_none() {
                removed.push(index);
            }
        }
        for index in removed {
            self.close_listener(ctx, index);
        }
        self.unbound.clear();
        for key in snapshot.keys() {
            if key.protocol == Protocol::Sctp && self.listeners.find(key).is_none() {
                self.unbound.push(*key);
            }
        }
        self.bind_unbound(ctx, true);
        self.mark_draining(ctx, snapshot);
    }

    /// Gives associations whose key or backend left the snapshot, or whose backend turned not ready,
    /// a drain deadline (and takes it back if they return), as TCP connections get.
    pub(crate) fn mark_draining(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot) {
        let now = ctx.now;
        for (_, assoc) in self.assocs.iter_mut() {
            assoc.drain_deadline = crate::connect::drain_deadline(
                snapshot,
                assoc.key,
                assoc.backend_id,
                assoc.drain_deadline,
                now,
                assoc.drain_timeout,
            );
        }
    }

    fn bind_unbound(&mut self, ctx: &mut Ctx<'_>, first_try: bool) {
        if ctx.draining {
            self.unbound.clear();
        }
        let keys = std::mem::take(&mut self.unbound);
        for key in keys {
            if !ctx.room.may_listen(self.descriptors(), self.listeners()) {
                if first_try {
                    ctx.refuse_for_budget("an SCTP VIP is left unbound (retried every tick)");
                }
                self.unbound.push(key);
                continue;
            }
            match crate::handover::open_vip_socket(
                ctx.shared,
                key.socket_addr(),
                Protocol::Sctp,
                bind_sctp_listener,
            ) {
                Ok(socket) => {
                    let listener = Listener::new(key, socket);
                    let (index, _) = self.listeners.insert(key, listener);
                    self.arm_accept(ctx, index);
                }
                Err(err) => {
                    let unsupported = err.raw_os_error() == Some(libc::EPROTONOSUPPORT);
                    if first_try {
                        stats::add(&ctx.counters.bind_failures, 1);
                    }
                    if unsupported {
                        if !self.unsupported {
                            self.unsupported = true;
                            tracing::warn!(worker = ctx.worker, %key, error = %err, "kernel has no SCTP; SCTP keys are not served");
                        }
                    } else if first_try {
                        warn_limited!(ctx, Warning::Bind, %key, error = %err, "cannot listen (SCTP); retrying every housekeeping tick");
                    }
                    self.unbound.push(key);
                }
            }
        }
        stats::set(&ctx.counters.sctp_listeners, self.listeners.len() as u64);
    }

    fn arm_accept(&mut self, ctx: &mut Ctx<'_>, index: u32) {
        let generation = self.listeners.generation(index);
        let Some(listener) = self.listeners.get_mut(index, generation) else { return };
        let entry =
            opcode::Accept::new(Fd(listener.socket.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(UserData::new(OpKind::SctpAccept, index, generation).encode());
        // SAFETY: no user memory is passed; the listening socket is dropped only after the accept's
        // completion was reaped.
        unsafe { listener.arm(ctx.ring, &entry, false, ctx.worker) };
    }

    fn close_listener(&mut self, ctx: &mut Ctx<'_>, index: u32) {
        let generation = self.listeners.generation(index);
        let Some(listener) = self.listeners.close(index) else { return };
        if listener.armed {
            ctx.cancel(UserData::new(OpKind::SctpAccept, index, generation));
        } else {
            self.listeners.remove(index);
        }
        stats::set(&ctx.counters.sctp_listeners, self.listeners.len() as u64);
    }

    /// Dispatches every SCTP completion.
    pub(crate) fn on_completion(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32) {
        match data.kind {
            OpKind::SctpAccept => self.on_accept(ctx, data, result),
            OpKind::SctpConnect => self.on_connect(ctx, data, result),
            OpKind::SctpConnectTimeout => {
                let Some(assoc) = self.get(data.slot, data.generation) else { return };
                assoc.in_flight -= 1;
                self.release_if_idle(ctx, data.slot, data.generation);
            }
            OpKind::SctpClientToBackend => self.on_direction(ctx, data, Dir::ToBackend, result),
            OpKind::SctpBackendToClient => self.on_direction(ctx, data, Dir::ToClient, result),
            _ => {}
        }
    }

    fn on_accept(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32) {
        let Some(listener) = self.listeners.get_mut(data.slot, data.generation) else {
            if result >= 0 {
                // SAFETY: an accepted fd for a listener no longer tracked; nothing else owns it.
                unsafe { libc::close(result) };
            }
            return;
        };
        listener.armed = false;
        let (key, closing) = (listener.key, listener.closing);
        if result >= 0 {
            // SAFETY: a non-negative accept result is a new fd that nothing else owns.
            let socket = unsafe { <Socket as std::os::fd::FromRawFd>::from_raw_fd(result) };
            if closing || ctx.stopping {
                abort_socket(&socket);
            } else {
                self.new_association(ctx, key, socket);
            }
        } else if let Some(resource) = LocalResource::of_errno(-result) {
            // Back off until the next tick: the accept would fail again at once.
            listener.rearm_at_tick = true;
            ctx.local_failure(resource, "an SCTP accept", -result);
        }
        let Some(listener) = self.listeners.get_mut(data.slot, data.generation) else { return };
        if listener.closing {
            self.listeners.remove(data.slot);
            stats::set(&ctx.counters.sctp_listeners, self.listeners.len() as u64);
        } else if !listener.rearm_at_tick {
            self.arm_accept(ctx, data.slot);
        }
    }

    /// Housekeeping: bind retries (not where SCTP is unsupported), accept re-arms, drain deadlines,
    /// idle timeouts.
    pub(crate) fn housekeeping(&mut self, ctx: &mut Ctx<'_>) {
        if !self.unbound.is_empty() && !self.unsupported {
            self.bind_unbound(ctx, false);
        }
        let rearm: Vec<u32> = self
            .listeners
            .iter_mut()
            .filter(|(_, l)| l.rearm_at_tick && !l.armed && !l.closing)
            .map(|(i, _)| i)
            .collect();
        for index in rearm {
            self.arm_accept(ctx, index);
        }
        let now = ctx.now;
        for (index, generation) in self.live() {
            let Some(assoc) = self.get(index, generation) else { continue };
            if assoc.closing {
                continue;
            }
            if assoc.drain_deadline.is_some_and(|deadline| now >= deadline) {
                stats::add(&ctx.counters.drain_closes, 1);
                self.begin_close(ctx, index, generation, true);
            } else if assoc.relaying
                && !assoc.closing
                && now.saturating_duration_since(assoc.last_activity) >= assoc.idle_timeout
            {
                stats::add(&ctx.counters.idle_timeouts, 1);
                self.begin_close(ctx, index, generation, false);
            }
        }
    }

    /// Stop: listeners close, associations are aborted.
    /// Closes every SCTP listener and binds none again (graceful shutdown, or stop).
    pub(crate) fn close_listeners(&mut self, ctx: &mut Ctx<'_>) {
        self.unbound.clear();
        let open: Vec<u32> = self.listeners.iter_mut().filter(|(_, l)| !l.closing).map(|(i, _)| i).collect();
        for index in open {
            self.close_listener(ctx, index);
        }
    }

    pub(crate) fn stop(&mut self, ctx: &mut Ctx<'_>) {
        self.close_listeners(ctx);
        for (index, generation) in self.live() {
            self.begin_close(ctx, index, generation, true);
        }
    }
}
