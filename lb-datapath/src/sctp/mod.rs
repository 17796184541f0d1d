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
use lb_core::{BackendId, BackendIdx, LocalResource, Protocol, ServiceEntry, Snapshot, VipKey};
use socket2::Socket;

use self::socket::{MsgBuf, bind_sctp_listener};
use crate::connect::MAX_ATTEMPTS;
use crate::dir::Dir;
use crate::listener::{Listener, ListenerTable};
use crate::ring::{ConnectTarget, OpKind, UserData};
use crate::slots::{Pinned, Slots};
use crate::stats;
use crate::warnings::{Warning, warn_limited};
use crate::worker::Worker;

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
    counted: Option<lb_core::BackendLoad>,
    entry: Option<Arc<ServiceEntry>>,
    tried: [BackendIdx; MAX_ATTEMPTS],
    tried_len: usize,
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

/// Everything SCTP a worker owns.
pub(crate) struct SctpState {
    listeners: ListenerTable,
    /// Keys of the current snapshot without a listener; retried every tick (unless unsupported).
    unbound: Vec<VipKey>,
    /// The kernel refused SCTP sockets (`EPROTONOSUPPORT`); logged once.
    unsupported: bool,
    /// Pinned: the kernel reads the connect target inside an association.
    assocs: Slots<Assoc, (), Pinned<Assoc>>,
}

fn abort_socket(socket: &Socket) {
    let _ = socket.set_linger(Some(Duration::ZERO));
}

impl SctpState {
    pub fn new() -> SctpState {
        SctpState {
            listeners: ListenerTable::default(),
            unbound: Vec::new(),
            unsupported: false,
            assocs: Slots::default(),
        }
    }

    /// No listener and no association left (the stopping worker may leave).
    /// Descriptors held: listeners, and a client and a backend socket per association.
    pub fn descriptors(&self) -> usize {
        self.listeners.len() + 2 * self.assocs.len()
    }

    /// Listening sockets held (open or closing).
    pub fn listeners(&self) -> usize {
        self.listeners.len()
    }

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

impl Worker {
    /// Opens listeners for new SCTP keys and closes those of removed keys.
    pub(crate) fn reconcile_sctp(&mut self, snapshot: &Snapshot) {
        let mut removed = Vec::new();
        for (index, listener) in self.sctp.listeners.iter_mut() {
            if !listener.closing && snapshot.get(&listener.key).is_none() {
                removed.push(index);
            }
        }
        for index in removed {
            self.close_sctp_listener(index);
        }
        self.sctp.unbound.clear();
        for key in snapshot.keys() {
            if key.protocol == Protocol::Sctp && self.sctp.listeners.find(key).is_none() {
                self.sctp.unbound.push(*key);
            }
        }
        self.bind_unbound_sctp(true);
        self.mark_sctp_draining(snapshot);
    }

    /// Gives associations whose key or backend left the snapshot, or whose backend turned not ready,
    /// a drain deadline (and takes it back if they return), as TCP connections get.
    pub(crate) fn mark_sctp_draining(&mut self, snapshot: &Snapshot) {
        let now = self.core.now;
        for (_, assoc) in self.sctp.assocs.iter_mut() {
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

    fn bind_unbound_sctp(&mut self, first_try: bool) {
        if self.is_draining() {
            self.sctp.unbound.clear();
        }
        let keys = std::mem::take(&mut self.sctp.unbound);
        for key in keys {
            if !self.may_listen() {
                if first_try {
                    self.refuse_for_budget("an SCTP VIP is left unbound (retried every tick)");
                }
                self.sctp.unbound.push(key);
                continue;
            }
            match bind_sctp_listener(key.socket_addr()) {
                Ok(socket) => {
                    let listener = Listener::new(key, socket);
                    let (index, _) = self.sctp.listeners.insert(key, listener);
                    self.arm_sctp_accept(index);
                }
                Err(err) => {
                    let unsupported = err.raw_os_error() == Some(libc::EPROTONOSUPPORT);
                    if first_try {
                        stats::add(&self.core.counters.bind_failures, 1);
                    }
                    if unsupported {
                        if !self.sctp.unsupported {
                            self.sctp.unsupported = true;
                            tracing::warn!(worker = self.core.settings.index, %key, error = %err, "kernel has no SCTP; SCTP keys are not served");
                        }
                    } else if first_try {
                        warn_limited!(self.core, Warning::Bind, %key, error = %err, "cannot listen (SCTP); retrying every housekeeping tick");
                    }
                    self.sctp.unbound.push(key);
                }
            }
        }
        stats::set(&self.core.counters.sctp_listeners, self.sctp.listeners.len() as u64);
    }

    fn arm_sctp_accept(&mut self, index: u32) {
        let generation = self.sctp.listeners.generation(index);
        let Some(listener) = self.sctp.listeners.get_mut(index, generation) else { return };
        let entry =
            opcode::Accept::new(Fd(listener.socket.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(UserData::new(OpKind::SctpAccept, index, generation).encode());
        // SAFETY: no user memory is passed; the listening socket is dropped only after the accept's
        // completion was reaped.
        unsafe { listener.arm(&mut self.core.ring, &entry, false, self.core.settings.index) };
    }

    fn close_sctp_listener(&mut self, index: u32) {
        let generation = self.sctp.listeners.generation(index);
        let Some(listener) = self.sctp.listeners.close(index) else { return };
        if listener.armed {
            self.cancel(UserData::new(OpKind::SctpAccept, index, generation));
        } else {
            self.sctp.listeners.remove(index);
        }
        stats::set(&self.core.counters.sctp_listeners, self.sctp.listeners.len() as u64);
    }

    fn cancel(&mut self, target: UserData) {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request references no memory.
        if let Err(error) = unsafe { self.core.ring.push(&entry) } {
            warn_limited!(self.core, Warning::Submit, %error, "cannot submit a cancel");
        }
    }

    /// Dispatches every SCTP completion.
    pub(crate) fn on_sctp(&mut self, data: UserData, result: i32) {
        match data.kind {
            OpKind::SctpAccept => self.on_sctp_accept(data, result),
            OpKind::SctpConnect => self.on_sctp_connect(data, result),
            OpKind::SctpConnectTimeout => {
                let Some(assoc) = self.sctp.get(data.slot, data.generation) else { return };
                assoc.in_flight -= 1;
                self.release_sctp_if_idle(data.slot, data.generation);
            }
            OpKind::SctpClientToBackend => self.on_sctp_direction(data, Dir::ToBackend, result),
            OpKind::SctpBackendToClient => self.on_sctp_direction(data, Dir::ToClient, result),
            _ => {}
        }
    }

    fn on_sctp_accept(&mut self, data: UserData, result: i32) {
        let Some(listener) = self.sctp.listeners.get_mut(data.slot, data.generation) else {
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
            if closing || self.is_stopping() {
                abort_socket(&socket);
            } else {
                self.new_sctp_association(key, socket);
            }
        } else if let Some(resource) = LocalResource::of_errno(-result) {
            // Back off until the next tick: the accept would fail again at once.
            listener.rearm_at_tick = true;
            self.local_failure(resource, "an SCTP accept", -result);
        }
        let Some(listener) = self.sctp.listeners.get_mut(data.slot, data.generation) else { return };
        if listener.closing {
            self.sctp.listeners.remove(data.slot);
            stats::set(&self.core.counters.sctp_listeners, self.sctp.listeners.len() as u64);
        } else if !listener.rearm_at_tick {
            self.arm_sctp_accept(data.slot);
        }
    }

    /// Housekeeping: bind retries (not where SCTP is unsupported), accept re-arms, drain deadlines,
    /// idle timeouts.
    pub(crate) fn sctp_housekeeping(&mut self) {
        if !self.sctp.unbound.is_empty() && !self.sctp.unsupported {
            self.bind_unbound_sctp(false);
        }
        let rearm: Vec<u32> = self
            .sctp
            .listeners
            .iter_mut()
            .filter(|(_, l)| l.rearm_at_tick && !l.armed && !l.closing)
            .map(|(i, _)| i)
            .collect();
        for index in rearm {
            self.arm_sctp_accept(index);
        }
        let now = self.core.now;
        for (index, generation) in self.sctp.live() {
            let Some(assoc) = self.sctp.get(index, generation) else { continue };
            if assoc.closing {
                continue;
            }
            if assoc.drain_deadline.is_some_and(|deadline| now >= deadline) {
                stats::add(&self.core.counters.drain_closes, 1);
                self.begin_sctp_close(index, generation, true);
            } else if assoc.relaying
                && !assoc.closing
                && now.saturating_duration_since(assoc.last_activity) >= assoc.idle_timeout
            {
                stats::add(&self.core.counters.idle_timeouts, 1);
                self.begin_sctp_close(index, generation, false);
            }
        }
    }

    /// Stop: listeners close, associations are aborted.
    /// Closes every SCTP listener and binds none again (graceful shutdown, or stop).
    pub(crate) fn close_sctp_listeners(&mut self) {
        self.sctp.unbound.clear();
        let open: Vec<u32> =
            self.sctp.listeners.iter_mut().filter(|(_, l)| !l.closing).map(|(i, _)| i).collect();
        for index in open {
            self.close_sctp_listener(index);
        }
    }

    pub(crate) fn stop_sctp(&mut self) {
        self.close_sctp_listeners();
        for (index, generation) in self.sctp.live() {
            self.begin_sctp_close(index, generation, true);
        }
    }
}
