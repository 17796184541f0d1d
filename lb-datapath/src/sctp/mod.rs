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
//! Invariants: every association is boxed (its buffers and timespec never move while the kernel may
//! use them) and released only when `in_flight == 0`; each direction has one operation at a time.

pub(crate) mod socket;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::opcode;
use io_uring::squeue::Flags;
use io_uring::types::{Fd, Timespec};
use lb_core::{BackendId, BackendIdx, Protocol, ServiceEntry, Snapshot, VipKey};
use socket2::{Domain, SockAddr, Socket};

use self::socket::{MSG_NOTIFICATION, MsgBuf, bind_sctp_listener, enable_rcvinfo, sctp_socket};
use crate::connection::MAX_ATTEMPTS;
use crate::listener::{Listener, ListenerTable};
use crate::ring::{GENERATION_MASK, OpKind, UserData};
use crate::stats;
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
    counted: Option<BackendId>,
    entry: Option<Arc<ServiceEntry>>,
    tried: [BackendIdx; MAX_ATTEMPTS],
    tried_len: usize,
    connect_addr: SockAddr,
    connect_timeout: Timespec,
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
    /// [client→backend, backend→client]
    dirs: [Direction; 2],
}

struct AssocSlot {
    generation: u32,
    assoc: Option<Box<Assoc>>,
}

/// Everything SCTP a worker owns.
pub(crate) struct SctpState {
    listeners: ListenerTable,
    /// Keys of the current snapshot without a listener; retried every tick (unless unsupported).
    unbound: Vec<VipKey>,
    /// The kernel refused SCTP sockets (`EPROTONOSUPPORT`); logged once.
    unsupported: bool,
    assocs: Vec<AssocSlot>,
    active: usize,
}

const C2B: usize = 0;
const B2C: usize = 1;

fn dir_kind(dir: usize) -> OpKind {
    if dir == C2B { OpKind::SctpClientToBackend } else { OpKind::SctpBackendToClient }
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
            assocs: Vec::new(),
            active: 0,
        }
    }

    /// No listener and no association left (the stopping worker may leave).
    pub fn is_idle(&self) -> bool {
        self.listeners.count() == 0 && self.active == 0
    }

    /// Associations whose cancelled operations never completed keep their buffers (the kernel may
    /// still write into them).
    pub fn leak_if_busy(&mut self) {
        if self.active > 0 {
            std::mem::forget(std::mem::take(&mut self.assocs));
        }
    }

    fn get(&mut self, index: u32, generation: u32) -> Option<&mut Assoc> {
        let slot = self.assocs.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.assoc.as_deref_mut()
    }

    fn insert(&mut self, assoc: Box<Assoc>) -> (u32, u32) {
        self.active += 1;
        if let Some(index) = self.assocs.iter().position(|s| s.assoc.is_none()) {
            let slot = &mut self.assocs[index];
            slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
            slot.assoc = Some(assoc);
            return (index as u32, slot.generation);
        }
        self.assocs.push(AssocSlot { generation: 0, assoc: Some(assoc) });
        ((self.assocs.len() - 1) as u32, 0)
    }

    fn live(&self) -> Vec<(u32, u32)> {
        self.assocs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.assoc.is_some())
            .map(|(i, s)| (i as u32, s.generation))
            .collect()
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

    /// Gives associations whose key or backend left the snapshot a drain deadline (and takes it
    /// back if they reappear), as TCP connections get.
    fn mark_sctp_draining(&mut self, snapshot: &Snapshot) {
        let now = self.now;
        for slot in &mut self.sctp.assocs {
            let Some(assoc) = slot.assoc.as_deref_mut() else { continue };
            let kept = snapshot.get(&assoc.key).is_some_and(|entry| match assoc.backend_id {
                // `backends` is sorted by id (model invariant).
                Some(id) => entry.backends.binary_search_by_key(&id, |b| b.id).is_ok(),
                None => true,
            });
            if kept {
                assoc.drain_deadline = None;
            } else if assoc.drain_deadline.is_none() {
                assoc.drain_deadline = Some(now + assoc.drain_timeout);
            }
        }
    }

    fn bind_unbound_sctp(&mut self, first_try: bool) {
        let keys = std::mem::take(&mut self.sctp.unbound);
        for key in keys {
            match bind_sctp_listener(key.socket_addr()) {
                Ok(socket) => {
                    let listener = Listener {
                        key,
                        socket,
                        armed: false,
                        multishot: false,
                        closing: false,
                        rearm_at_tick: false,
                    };
                    let (index, _) = self.sctp.listeners.insert(listener);
                    self.arm_sctp_accept(index);
                }
                Err(err) => {
                    let unsupported = err.raw_os_error() == Some(libc::EPROTONOSUPPORT);
                    if first_try {
                        stats::add(&self.counters.bind_failures, 1);
                    }
                    if unsupported {
                        if !self.sctp.unsupported {
                            self.sctp.unsupported = true;
                            tracing::warn!(worker = self.settings.index, %key, error = %err, "kernel has no SCTP; SCTP keys are not served");
                        }
                    } else if first_try {
                        tracing::warn!(worker = self.settings.index, %key, error = %err, "cannot listen (SCTP); retrying every housekeeping tick");
                    }
                    self.sctp.unbound.push(key);
                }
            }
        }
        stats::set(&self.counters.sctp_listeners, self.sctp.listeners.count() as u64);
    }

    fn arm_sctp_accept(&mut self, index: u32) {
        let generation = self.sctp.listeners.generation(index);
        let Some(listener) = self.sctp.listeners.get_mut(index, generation) else { return };
        let entry =
            opcode::Accept::new(Fd(listener.socket.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(UserData::new(OpKind::SctpAccept, index, generation).encode());
        listener.armed = true;
        listener.rearm_at_tick = false;
        // SAFETY: no user memory is passed; the listening socket is dropped only after the accept's
        // completion was reaped.
        if let Err(err) = unsafe { self.ring.push(&entry) } {
            listener.armed = false;
            listener.rearm_at_tick = true;
            tracing::warn!(worker = self.settings.index, key = %listener.key, error = %err, "cannot arm SCTP accept");
        }
    }

    fn close_sctp_listener(&mut self, index: u32) {
        let generation = self.sctp.listeners.generation(index);
        let Some(listener) = self.sctp.listeners.get_mut(index, generation) else { return };
        listener.closing = true;
        if listener.armed {
            self.cancel(UserData::new(OpKind::SctpAccept, index, generation));
        } else {
            self.sctp.listeners.remove(index);
        }
        stats::set(&self.counters.sctp_listeners, self.sctp.listeners.count() as u64);
    }

    fn cancel(&mut self, target: UserData) {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request references no memory.
        if let Err(err) = unsafe { self.ring.push(&entry) } {
            tracing::warn!(error = %err, "cannot submit a cancel");
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
            OpKind::SctpClientToBackend => self.on_sctp_direction(data, C2B, result),
            OpKind::SctpBackendToClient => self.on_sctp_direction(data, B2C, result),
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
        } else if matches!(-result, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) {
            listener.rearm_at_tick = true;
        }
        let Some(listener) = self.sctp.listeners.get_mut(data.slot, data.generation) else { return };
        if listener.closing {
            self.sctp.listeners.remove(data.slot);
            stats::set(&self.counters.sctp_listeners, self.sctp.listeners.count() as u64);
        } else if !listener.rearm_at_tick {
            self.arm_sctp_accept(data.slot);
        }
    }

    fn new_sctp_association(&mut self, key: VipKey, client: Socket) {
        stats::add(&self.counters.sctp_accepted, 1);
        let entry = self.shared.snapshot.load().get(&key).cloned();
        let client_addr = client
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
        let refuse = match &entry {
            None => true,
            Some(entry) => {
                !entry.allows(client_addr.ip()) || self.sctp.active >= self.settings.max_connections
            }
        };
        // Accepted sockets inherit the listener's options on Linux; set again so a kernel that does
        // not copy them still delivers SCTP_RCVINFO.
        let Some(entry) = entry.filter(|_| !refuse && enable_rcvinfo(&client).is_ok()) else {
            stats::add(&self.counters.sctp_aborts, 1);
            abort_socket(&client);
            return;
        };
        let assoc = Box::new(Assoc {
            key,
            drain_timeout: entry.policy.drain_timeout,
            drain_deadline: None,
            client,
            client_addr,
            backend: None,
            backend_id: None,
            counted: None,
            idle_timeout: entry.policy.idle_timeout,
            entry: Some(entry),
            tried: [0; MAX_ATTEMPTS],
            tried_len: 0,
            connect_addr: SockAddr::from(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
            connect_timeout: Timespec::new(),
            connect_pending: false,
            relaying: false,
            closing: false,
            reset: false,
            in_flight: 0,
            last_activity: self.now,
            dirs: [Direction::new(), Direction::new()],
        });
        let (index, generation) = self.sctp.insert(assoc);
        stats::set(&self.counters.sctp_active, self.sctp.active as u64);
        self.try_sctp_connect(index, generation);
    }

    /// Connects to the next eligible backend not tried yet (the TCP path's selection and attempt
    /// bound), or aborts the client when none is left.
    fn try_sctp_connect(&mut self, index: u32, generation: u32) {
        let Some(assoc) = self.sctp.get(index, generation) else { return };
        let Some(entry) = assoc.entry.clone() else { return };
        let attempts = (entry.policy.connect_attempts.max(1) as usize).min(MAX_ATTEMPTS);
        while assoc.tried_len < attempts {
            let exclude = &assoc.tried[..assoc.tried_len];
            let Some(picked) = self.selection.pick(self.now, &entry, assoc.client_addr, exclude) else {
                if assoc.tried_len == 0 {
                    stats::add(&self.counters.no_backend, 1);
                }
                break;
            };
            let Some(backend) = entry.backend(picked) else { break };
            assoc.tried[assoc.tried_len] = picked;
            assoc.tried_len += 1;
            if assoc.tried_len > 1 {
                stats::add(&self.counters.retries, 1);
            }
            let addr = backend.addr();
            let Ok(socket) = sctp_socket(Domain::for_address(addr)) else {
                stats::add(&self.counters.connect_failures, 1);
                continue;
            };
            assoc.connect_addr = SockAddr::from(addr);
            assoc.backend_id = Some(backend.id);
            let timeout = entry.policy.connect_timeout;
            assoc.connect_timeout = Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
            let connect = opcode::Connect::new(
                Fd(socket.as_raw_fd()),
                assoc.connect_addr.as_ptr().cast(),
                assoc.connect_addr.len(),
            )
            .build()
            .flags(Flags::IO_LINK)
            .user_data(UserData::new(OpKind::SctpConnect, index, generation).encode());
            let link_timeout = opcode::LinkTimeout::new(&assoc.connect_timeout)
                .build()
                .user_data(UserData::new(OpKind::SctpConnectTimeout, index, generation).encode());
            assoc.backend = Some(socket);
            // SAFETY: the address and timespec live in the boxed association, released only after
            // both completions were reaped; the socket is owned by it for as long.
            let pushed = self
                .ring
                .reserve(2)
                .and_then(|()| unsafe { self.ring.push(&connect) })
                .and_then(|()| unsafe { self.ring.push(&link_timeout) });
            match pushed {
                Ok(()) => {
                    assoc.in_flight += 2;
                    assoc.connect_pending = true;
                    assoc.counted = Some(backend.id);
                    self.selection.open(backend.id, &self.counters);
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot submit an SCTP backend connect");
                    break;
                }
            }
        }
        self.begin_sctp_close(index, generation, true);
    }

    fn on_sctp_connect(&mut self, data: UserData, result: i32) {
        let Some(assoc) = self.sctp.get(data.slot, data.generation) else { return };
        assoc.in_flight -= 1;
        assoc.connect_pending = false;
        if assoc.closing {
            self.release_sctp_if_idle(data.slot, data.generation);
            return;
        }
        // io_uring retries a connect that reported EINPROGRESS once the socket is writable; SCTP
        // answers that second connect with EISCONN when the association is up.
        if result < 0 && result != -libc::EISCONN {
            stats::add(&self.counters.connect_failures, 1);
            if let Some(backend) = assoc.backend.take() {
                abort_socket(&backend);
            }
            if let Some(backend) = assoc.counted.take() {
                self.selection.close(backend, &self.counters);
            }
            self.try_sctp_connect(data.slot, data.generation);
            return;
        }
        assoc.relaying = true;
        assoc.entry = None;
        assoc.last_activity = self.now;
        for dir in [C2B, B2C] {
            if !self.arm_sctp_recv(data.slot, data.generation, dir) {
                return;
            }
        }
    }

    fn sctp_fds(assoc: &Assoc, dir: usize) -> Option<(i32, i32)> {
        let client = assoc.client.as_raw_fd();
        let backend = assoc.backend.as_ref()?.as_raw_fd();
        Some(if dir == C2B { (client, backend) } else { (backend, client) })
    }

    fn arm_sctp_recv(&mut self, index: u32, generation: u32, dir: usize) -> bool {
        let Some(assoc) = self.sctp.get(index, generation) else { return false };
        let Some((source, _)) = Self::sctp_fds(assoc, dir) else { return false };
        let direction = &mut assoc.dirs[dir];
        let header = direction.buf.prepare_recv();
        let entry = opcode::RecvMsg::new(Fd(source), header)
            .build()
            .user_data(UserData::new(dir_kind(dir), index, generation).encode());
        // SAFETY: the msghdr, iovec, control and data live in the boxed association's boxed
        // buffer, which is not released while this receive is in flight.
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => {
                direction.pending = Pending::Recv;
                assoc.in_flight += 1;
                true
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot submit an SCTP receive");
                self.begin_sctp_close(index, generation, true);
                false
            }
        }
    }

    fn arm_sctp_send(&mut self, index: u32, generation: u32, dir: usize) {
        let Some(assoc) = self.sctp.get(index, generation) else { return };
        let Some((_, destination)) = Self::sctp_fds(assoc, dir) else { return };
        let direction = &mut assoc.dirs[dir];
        let header = direction.buf.prepare_send();
        let entry = opcode::SendMsg::new(Fd(destination), header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(UserData::new(dir_kind(dir), index, generation).encode());
        // SAFETY: as for the receive: everything the msghdr points to lives in the boxed buffer.
        match unsafe { self.ring.push(&entry) } {
            Ok(()) => {
                direction.pending = Pending::Send;
                assoc.in_flight += 1;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot submit an SCTP send");
                self.begin_sctp_close(index, generation, true);
            }
        }
    }

    fn on_sctp_direction(&mut self, data: UserData, dir: usize, result: i32) {
        let (index, generation) = (data.slot, data.generation);
        let Some(assoc) = self.sctp.get(index, generation) else { return };
        assoc.in_flight -= 1;
        let pending = std::mem::replace(&mut assoc.dirs[dir].pending, Pending::None);
        if assoc.closing {
            self.release_sctp_if_idle(index, generation);
            return;
        }
        if result < 0 {
            // ECONNRESET (the peer aborted), EPIPE, or anything else: abort both sides.
            self.begin_sctp_close(index, generation, true);
            return;
        }
        assoc.last_activity = self.now;
        match pending {
            Pending::Send => {
                let direction = &mut assoc.dirs[dir];
                if result as usize != direction.buf.filled {
                    // SCTP sends a message whole or not at all; anything else is a broken association.
                    self.begin_sctp_close(index, generation, true);
                    return;
                }
                let counter = if dir == C2B {
                    &self.counters.sctp_messages_client_to_backend
                } else {
                    &self.counters.sctp_messages_backend_to_client
                };
                stats::add(counter, 1);
                direction.buf.filled = 0;
                self.arm_sctp_recv(index, generation, dir);
            }
            Pending::Recv if result == 0 => {
                let destination = if dir == C2B { assoc.backend.as_ref() } else { Some(&assoc.client) };
                if let Some(destination) = destination {
                    // SHUT_WR on a one-to-one SCTP socket starts the SHUTDOWN sequence.
                    let _ = destination.shutdown(std::net::Shutdown::Write);
                }
                // SCTP has no half-close: once the SHUTDOWN is acknowledged the association is
                // gone, and the side that sent it never reports EOF on our end (no RCV_SHUTDOWN is
                // set for a SHUTDOWN we initiate). So the whole pair ends here, gracefully: the
                // kernel finishes each SHUTDOWN after the close.
                self.begin_sctp_close(index, generation, false);
            }
            Pending::Recv => {
                let buf = &mut assoc.dirs[dir].buf;
                let flags = buf.received_flags();
                if flags & MSG_NOTIFICATION != 0 {
                    // None is subscribed; should one arrive, it is not payload.
                    self.arm_sctp_recv(index, generation, dir);
                    return;
                }
                if buf.filled == 0 {
                    buf.info = buf.received_info().unwrap_or_default();
                }
                buf.filled += result as usize;
                if flags & libc::MSG_EOR != 0 {
                    self.arm_sctp_send(index, generation, dir);
                } else if buf.is_full() {
                    stats::add(&self.counters.sctp_too_large, 1);
                    self.begin_sctp_close(index, generation, true);
                } else {
                    self.arm_sctp_recv(index, generation, dir);
                }
            }
            Pending::None => {}
        }
    }

    /// Cancels what is in flight; the association is released once nothing is. With `reset`, both
    /// sockets are closed with `SO_LINGER {on, 0}`, which sends ABORT.
    fn begin_sctp_close(&mut self, index: u32, generation: u32, reset: bool) {
        let Some(assoc) = self.sctp.get(index, generation) else { return };
        if assoc.closing {
            assoc.reset |= reset;
            return;
        }
        assoc.closing = true;
        assoc.reset = reset;
        let mut targets = Vec::with_capacity(3);
        if assoc.connect_pending {
            targets.push(OpKind::SctpConnect);
        }
        for dir in [C2B, B2C] {
            if assoc.dirs[dir].pending != Pending::None {
                targets.push(dir_kind(dir));
            }
        }
        for kind in targets {
            self.cancel(UserData::new(kind, index, generation));
        }
        self.release_sctp_if_idle(index, generation);
    }

    fn release_sctp_if_idle(&mut self, index: u32, generation: u32) {
        let Some(assoc) = self.sctp.get(index, generation) else { return };
        if !assoc.closing || assoc.in_flight > 0 {
            return;
        }
        let Some(slot) = self.sctp.assocs.get_mut(index as usize) else { return };
        let Some(assoc) = slot.assoc.take() else { return };
        self.sctp.active -= 1;
        if assoc.reset {
            stats::add(&self.counters.sctp_aborts, 1);
            abort_socket(&assoc.client);
            if let Some(backend) = &assoc.backend {
                abort_socket(backend);
            }
        }
        if let Some(backend) = assoc.counted {
            self.selection.close(backend, &self.counters);
        }
        stats::set(&self.counters.sctp_active, self.sctp.active as u64);
        drop(assoc);
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
        let now = self.now;
        for (index, generation) in self.sctp.live() {
            let Some(assoc) = self.sctp.get(index, generation) else { continue };
            if assoc.closing {
                continue;
            }
            if assoc.drain_deadline.is_some_and(|deadline| now >= deadline) {
                stats::add(&self.counters.drain_closes, 1);
                self.begin_sctp_close(index, generation, true);
            } else if assoc.relaying
                && !assoc.closing
                && now.saturating_duration_since(assoc.last_activity) >= assoc.idle_timeout
            {
                stats::add(&self.counters.idle_timeouts, 1);
                self.begin_sctp_close(index, generation, false);
            }
        }
    }

    /// Stop: listeners close, associations are aborted.
    pub(crate) fn stop_sctp(&mut self) {
        self.sctp.unbound.clear();
        let open: Vec<u32> =
            self.sctp.listeners.iter_mut().filter(|(_, l)| !l.closing).map(|(i, _)| i).collect();
        for index in open {
            self.close_sctp_listener(index);
        }
        for (index, generation) in self.sctp.live() {
            self.begin_sctp_close(index, generation, true);
        }
    }
}
