//! One SCTP association pair's life: accept → pick (the worker's `Selection`, as TCP) → connect with
//! a linked timeout and retries → relay one message at a time per direction (`RecvMsg` gathering
//! pieces until `MSG_EOR`, then `SendMsg` with the message's `SCTP_SNDINFO`) → graceful close or
//! abort → release.
//! Never releases an association with an operation in flight; never forwards part of a message.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use io_uring::opcode;
use io_uring::types::Fd;
use lb_core::{LocalResource, VipKey};
use socket2::{Domain, Socket};

use super::socket::{MSG_NOTIFICATION, enable_rcvinfo, sctp_socket};
use super::{Assoc, Associations, Direction, Pending, abort_socket};
use crate::connect::{self, Attempt, Failure};
use crate::context::Ctx;
use crate::dir::Dir;
use crate::ring::{ConnectTarget, OpKind, UserData};
use crate::stats;
use crate::traffic::ConnectError;
use crate::warnings::{Warning, warn_limited};

impl Associations {
    pub(super) fn new_association(&mut self, ctx: &mut Ctx<'_>, key: VipKey, client: Socket) {
        stats::add(&ctx.counters.sctp_accepted, 1);
        let entry = ctx.shared.snapshot.load().get(&key).cloned();
        let client_addr = client
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
        let over_budget = self.assocs.len() >= self.max_connections || !ctx.room.fits(self.descriptors(), 2);
        if over_budget && entry.is_some() {
            ctx.refuse_for_budget("an SCTP association was aborted at accept");
        }
        let refuse = match &entry {
            None => true,
            Some(entry) => !entry.allows(client_addr.ip()) || over_budget,
        };
        // Accepted sockets inherit the listener's options on Linux; set again so a kernel that does
        // not copy them still delivers SCTP_RCVINFO.
        let Some(entry) = entry.filter(|_| !refuse && enable_rcvinfo(&client).is_ok()) else {
            stats::add(&ctx.counters.sctp_aborts, 1);
            abort_socket(&client);
            return;
        };
        let Ok(vip_load) = connect::admit(ctx, &entry, client_addr.ip()) else {
            stats::add(&ctx.counters.sctp_aborts, 1);
            abort_socket(&client);
            return;
        };
        let assoc = Assoc {
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
            tried: Default::default(),
            vip_load,
            connect_target: ConnectTarget::unset(),
            connect_pending: false,
            relaying: false,
            closing: false,
            reset: false,
            in_flight: 0,
            last_activity: ctx.now,
            dirs: [Direction::new(), Direction::new()],
        };
        let (index, generation) = self.assocs.insert(assoc);
        stats::set(&ctx.counters.sctp_active, self.assocs.len() as u64);
        self.try_connect(ctx, index, generation);
    }

    /// Connects to the next eligible backend not tried yet (the TCP path's selection and attempt
    /// bound), or aborts the client when none is left.
    pub(super) fn try_connect(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) {
        if let Err(failure) = self.connect_next(ctx, index, generation) {
            failure.report(ctx, "an SCTP backend socket");
            self.begin_close(ctx, index, generation, true);
        }
    }

    /// One attempt of [`Associations::try_connect`]: `Ok` with a connect in flight (or the
    /// association gone). A failed connect comes back through `on_connect`.
    fn connect_next(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) -> Result<(), Failure> {
        let Some(assoc) = self.get(index, generation) else { return Ok(()) };
        let Some(entry) = assoc.entry.clone() else { return Ok(()) };
        let attempt = Attempt { client: assoc.client_addr, tried: &mut assoc.tried };
        let backend = attempt.next(ctx.selection, ctx.counters, ctx.now, &entry)?;
        let addr = backend.addr();
        let socket = sctp_socket(Domain::for_address(addr)).map_err(Failure::local)?;
        assoc.backend_id = Some(backend.id);
        let fd = socket.as_raw_fd();
        assoc.backend = Some(socket);
        // SAFETY: the target lives in the boxed association, released only after both completions
        // were reaped; the socket is owned by it for as long.
        unsafe {
            ctx.ring.push_connect(
                fd,
                &mut assoc.connect_target,
                addr,
                entry.policy.connect_timeout,
                UserData::new(OpKind::SctpConnect, index, generation).encode(),
                UserData::new(OpKind::SctpConnectTimeout, index, generation).encode(),
            )
        }
        .map_err(Failure::Submit)?;
        assoc.in_flight += 2;
        assoc.connect_pending = true;
        let retry = assoc.tried.connects() > 1;
        assoc.counted = Some(ctx.selection.open(assoc.key, backend, retry, ctx.now, ctx.counters));
        Ok(())
    }

    pub(super) fn on_connect(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32) {
        let Some(assoc) = self.get(data.slot, data.generation) else { return };
        assoc.in_flight -= 1;
        assoc.connect_pending = false;
        if assoc.closing {
            self.release_if_idle(ctx, data.slot, data.generation);
            return;
        }
        // io_uring retries a connect that reported EINPROGRESS once the socket is writable; SCTP
        // answers that second connect with EISCONN when the association is up.
        if result < 0 && result != -libc::EISCONN {
            match LocalResource::of_errno(-result) {
                Some(resource) => ctx.local_failure(resource, "an SCTP backend connect", -result),
                None => stats::add(&ctx.counters.connect_failures, 1),
            }
            let Some(assoc) = self.get(data.slot, data.generation) else { return };
            if let Some(backend) = assoc.backend.take() {
                abort_socket(&backend);
            }
            if let Some(counted) = assoc.counted.take() {
                counted.failed(ConnectError::of_errno(-result));
                ctx.selection.close(counted, ctx.now, ctx.counters);
            }
            self.try_connect(ctx, data.slot, data.generation);
            return;
        }
        if let Some(counted) = assoc.counted.as_mut() {
            counted.established(ctx.now);
        }
        assoc.relaying = true;
        assoc.entry = None;
        assoc.last_activity = ctx.now;
        for dir in Dir::BOTH {
            if !self.arm_recv(ctx, data.slot, data.generation, dir) {
                return;
            }
        }
    }

    fn sctp_fds(assoc: &Assoc, dir: Dir) -> Option<(i32, i32)> {
        let client = assoc.client.as_raw_fd();
        let backend = assoc.backend.as_ref()?.as_raw_fd();
        Some(dir.ends(client, backend))
    }

    pub(super) fn arm_recv(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32, dir: Dir) -> bool {
        let Some(assoc) = self.get(index, generation) else { return false };
        let Some((source, _)) = Self::sctp_fds(assoc, dir) else { return false };
        let direction = &mut assoc.dirs[dir.index()];
        let header = direction.buf.prepare_recv();
        let entry = opcode::RecvMsg::new(Fd(source), header)
            .build()
            .user_data(UserData::new(OpKind::sctp_relay(dir), index, generation).encode());
        // SAFETY: the msghdr, iovec, control and data live in the boxed association's boxed
        // buffer, which is not released while this receive is in flight.
        match unsafe { ctx.ring.push(&entry) } {
            Ok(()) => {
                direction.pending = Pending::Recv;
                assoc.in_flight += 1;
                true
            }
            Err(error) => {
                warn_limited!(ctx, Warning::Submit, %error, "cannot submit an SCTP receive");
                self.begin_close(ctx, index, generation, true);
                false
            }
        }
    }

    pub(super) fn arm_send(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32, dir: Dir) {
        let Some(assoc) = self.get(index, generation) else { return };
        let Some((_, destination)) = Self::sctp_fds(assoc, dir) else { return };
        let direction = &mut assoc.dirs[dir.index()];
        let header = direction.buf.prepare_send();
        let entry = opcode::SendMsg::new(Fd(destination), header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(UserData::new(OpKind::sctp_relay(dir), index, generation).encode());
        // SAFETY: as for the receive: everything the msghdr points to lives in the boxed buffer.
        match unsafe { ctx.ring.push(&entry) } {
            Ok(()) => {
                direction.pending = Pending::Send;
                assoc.in_flight += 1;
            }
            Err(error) => {
                warn_limited!(ctx, Warning::Submit, %error, "cannot submit an SCTP send");
                self.begin_close(ctx, index, generation, true);
            }
        }
    }

    pub(super) fn on_direction(&mut self, ctx: &mut Ctx<'_>, data: UserData, dir: Dir, result: i32) {
        let (index, generation) = (data.slot, data.generation);
        let Some(assoc) = self.get(index, generation) else { return };
        assoc.in_flight -= 1;
        let pending = std::mem::replace(&mut assoc.dirs[dir.index()].pending, Pending::None);
        if assoc.closing {
            self.release_if_idle(ctx, index, generation);
            return;
        }
        if result < 0 {
            // ECONNRESET (the peer aborted), EPIPE, or anything else: abort both sides.
            self.begin_close(ctx, index, generation, true);
            return;
        }
        assoc.last_activity = ctx.now;
        match pending {
            Pending::Send => {
                let direction = &mut assoc.dirs[dir.index()];
                if result as usize != direction.buf.filled {
                    // SCTP sends a message whole or not at all; anything else is a broken association.
                    self.begin_close(ctx, index, generation, true);
                    return;
                }
                let counter = if dir == Dir::ToBackend {
                    &ctx.counters.sctp_messages_client_to_backend
                } else {
                    &ctx.counters.sctp_messages_backend_to_client
                };
                stats::add(counter, 1);
                if let Some(counted) = &assoc.counted {
                    counted.cell().moved(dir == Dir::ToBackend, result as u64, 1);
                }
                let direction = &mut assoc.dirs[dir.index()];
                direction.buf.filled = 0;
                self.arm_recv(ctx, index, generation, dir);
            }
            Pending::Recv if result == 0 => {
                let destination =
                    if dir == Dir::ToBackend { assoc.backend.as_ref() } else { Some(&assoc.client) };
                if let Some(destination) = destination {
                    // SHUT_WR on a one-to-one SCTP socket starts the SHUTDOWN sequence.
                    let _ = destination.shutdown(std::net::Shutdown::Write);
                }
                // SCTP has no half-close: once the SHUTDOWN is acknowledged the association is
                // gone, and the side that sent it never reports EOF on our end (no RCV_SHUTDOWN is
                // set for a SHUTDOWN we initiate). So the whole pair ends here, gracefully: the
                // kernel finishes each SHUTDOWN after the close.
                self.begin_close(ctx, index, generation, false);
            }
            Pending::Recv => {
                let buf = &mut assoc.dirs[dir.index()].buf;
                let flags = buf.received_flags();
                if flags & MSG_NOTIFICATION != 0 {
                    // None is subscribed; should one arrive, it is not payload.
                    self.arm_recv(ctx, index, generation, dir);
                    return;
                }
                if buf.filled == 0 {
                    buf.info = buf.received_info().unwrap_or_default();
                }
                buf.filled += result as usize;
                if flags & libc::MSG_EOR != 0 {
                    self.arm_send(ctx, index, generation, dir);
                } else if buf.is_full() {
                    stats::add(&ctx.counters.sctp_too_large, 1);
                    self.begin_close(ctx, index, generation, true);
                } else {
                    self.arm_recv(ctx, index, generation, dir);
                }
            }
            Pending::None => {}
        }
    }

    /// Cancels what is in flight; the association is released once nothing is. With `reset`, both
    /// sockets are closed with `SO_LINGER {on, 0}`, which sends ABORT.
    pub(super) fn begin_close(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32, reset: bool) {
        let Some(assoc) = self.get(index, generation) else { return };
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
        for dir in Dir::BOTH {
            if assoc.dirs[dir.index()].pending != Pending::None {
                targets.push(OpKind::sctp_relay(dir));
            }
        }
        for kind in targets {
            ctx.cancel(UserData::new(kind, index, generation));
        }
        self.release_if_idle(ctx, index, generation);
    }

    pub(super) fn release_if_idle(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) {
        let Some(assoc) = self.get(index, generation) else { return };
        if !assoc.closing || assoc.in_flight > 0 {
            return;
        }
        let Some(mut assoc) = self.assocs.remove(index) else { return };
        if assoc.reset {
            stats::add(&ctx.counters.sctp_aborts, 1);
            abort_socket(&assoc.client);
            if let Some(backend) = &assoc.backend {
                abort_socket(backend);
            }
        }
        if let Some(counted) = assoc.counted.take() {
            ctx.selection.close(counted, ctx.now, ctx.counters);
        }
        if let Some(vip_load) = assoc.vip_load.take() {
            vip_load.close();
        }
        stats::set(&ctx.counters.sctp_active, self.assocs.len() as u64);
        drop(assoc);
    }
}
