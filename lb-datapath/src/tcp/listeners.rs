//! Where a worker accepts TCP connections: its listening sockets for the TCP keys of the snapshot
//! (planned by [`ListenPlan`], set up by [`crate::listener`]), bound, retried, armed with accepts
//! and closed. Each accepted client is handed on (to [`super::Connections`]) by the worker.
//!
//! Invariants: after a reconcile, every TCP key of the snapshot is served by a listener of the
//! plan (its own, or its port's wildcard) or its listen key is in `unbound` (retried every tick),
//! and no open listener is outside the plan; new sockets open before unwanted ones close, so a
//! group moving between exact sockets and a wildcard never stops accepting; a listener slot is
//! freed only once its accept has completed for the last time.

use std::collections::HashSet;
use std::os::fd::AsRawFd;

use io_uring::types::Fd;
use io_uring::{cqueue, opcode};
use lb_core::{LocalResource, Protocol, Snapshot, VipKey};
use socket2::Socket;

use crate::ListenMode;
use crate::budget::DescriptorBudget;
use crate::context::Ctx;
use crate::handover::open_vip_socket;
use crate::listener::{ListenPlan, Listener, ListenerTable, bind_listener, fewest_sockets, is_wildcard};
use crate::ring::{OpKind, UserData};
use crate::stats;
use crate::warnings::{Warning, warn_limited};

/// The TCP listening sockets of one worker. See the module doc.
pub(crate) struct Listeners {
    table: ListenerTable,
    /// Where this worker listens for the TCP keys of the snapshot last reconciled.
    plan: ListenPlan,
    /// Wildcards whose bind collided with another socket on the host: their groups bind exactly.
    exact_only: HashSet<VipKey>,
    /// Listen keys (TCP keys or wildcards) of the plan whose bind failed; retried every tick.
    unbound: Vec<VipKey>,
    mode: ListenMode,
    /// Multishot accepts: allowed by configuration and the kernel, until one is refused.
    multishot: bool,
    /// How many workers the engine runs (for the limit a warning names).
    workers: usize,
}

impl Listeners {
    pub fn new(mode: ListenMode, multishot: bool, workers: usize) -> Listeners {
        Listeners {
            table: ListenerTable::default(),
            plan: ListenPlan::default(),
            exact_only: HashSet::new(),
            unbound: Vec::new(),
            mode,
            multishot,
            workers,
        }
    }

    /// Listening sockets held (open or closing), one descriptor each.
    #[inline]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Plans where the TCP keys of `snapshot` (whose keys changed) listen, binds what the plan lacks
    /// and then closes what it no longer wants. `bind_unbound` pops from the end: wildcards, pushed
    /// last, are bound first, as they serve the most keys.
    pub fn reconcile(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot) {
        // SCTP keys take a socket each; UDP ones at least what its own plan would give them.
        let sctp = snapshot.keys().filter(|key| key.protocol == Protocol::Sctp).count();
        let udp = snapshot.keys().filter(|key| key.protocol == Protocol::Udp);
        let other_sockets = sctp + fewest_sockets(udp, self.mode);
        let tcp = snapshot.keys().filter(|key| key.protocol == Protocol::Tcp);
        let room = ctx.room.max_listeners().saturating_sub(other_sockets);
        self.plan = ListenPlan::new(tcp, self.mode, room, &mut self.exact_only);
        self.warn_if_they_cannot_fit(ctx, self.plan.sockets() + other_sockets);
        self.unbound.clear();
        for listen in self.plan.exact.iter().chain(self.plan.wildcards.keys()) {
            if self.table.find(listen).is_none() {
                self.unbound.push(*listen);
            }
        }
        self.bind_unbound(ctx, true);
        let mut unwanted = Vec::new();
        for (index, listener) in self.table.iter_mut() {
            if !listener.closing && !self.plan.wants(&listener.key) {
                unwanted.push(index);
            }
        }
        for index in unwanted {
            self.close(ctx, index);
        }
    }

    fn bind_unbound(&mut self, ctx: &mut Ctx<'_>, first_try: bool) {
        if ctx.draining {
            self.unbound.clear();
        }
        // A stack: the keys of a wildcard that collides are pushed to be bound exactly.
        let mut keys = std::mem::take(&mut self.unbound);
        while let Some(key) = keys.pop() {
            if !ctx.room.may_listen(self.len(), self.len()) {
                if first_try {
                    ctx.refuse_for_budget("a TCP VIP is left unbound (retried every tick)");
                }
                self.unbound.push(key);
                continue;
            }
            match open_vip_socket(ctx.shared, key.socket_addr(), Protocol::Tcp, bind_listener) {
                Ok(socket) => {
                    let listener = Listener::new(key, socket);
                    let (index, _) = self.table.insert(key, listener);
                    self.arm_accept(ctx, index);
                }
                Err(error) if is_wildcard(&key) && error.raw_os_error() == Some(libc::EADDRINUSE) => {
                    // Another socket on the host holds this port on some address: one socket per
                    // VIP then, as long as the group exists.
                    self.exact_only.insert(key);
                    let group = self.plan.fall_back(&key);
                    if ctx.worker == 0 {
                        tracing::info!(%key, vips = group.len(), "the port is taken on some address of this host; listening on each VIP of it instead of the wildcard");
                    }
                    keys.extend(group.into_iter().filter(|vip| self.table.find(vip).is_none()));
                }
                Err(error) => {
                    stats::add(&ctx.counters.bind_failures, 1);
                    if first_try {
                        warn_limited!(ctx, Warning::Bind, %key, %error, "cannot listen; retrying every housekeeping tick");
                    } else {
                        tracing::debug!(worker = ctx.worker, %key, %error, "listen retry failed");
                    }
                    self.unbound.push(key);
                }
            }
        }
        stats::set(&ctx.counters.listeners, self.len() as u64);
    }

    /// Says, throttled, that the VIPs need more listening sockets than the descriptor budget lets
    /// a worker bind (the rest stay unbound, retried every tick), and the limit that would fit.
    fn warn_if_they_cannot_fit(&mut self, ctx: &mut Ctx<'_>, needed: usize) {
        let allowed = ctx.room.max_listeners();
        if needed <= allowed || ctx.worker != 0 {
            return;
        }
        let limit = DescriptorBudget::limit_for_listeners(needed, self.workers);
        warn_limited!(
            ctx,
            Warning::Budget,
            needed,
            allowed,
            limit,
            "the VIPs need {needed} listening sockets per worker but the descriptor budget allows {allowed}; the rest stay unbound: raise the descriptor limit to {limit}, or run fewer workers"
        );
    }

    fn arm_accept(&mut self, ctx: &mut Ctx<'_>, index: u32) {
        let generation = self.table.generation(index);
        let multishot = self.multishot;
        let Some(listener) = self.table.get_mut(index, generation) else { return };
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
        unsafe { listener.arm(ctx.ring, &entry, multishot, ctx.worker) };
    }

    /// Stops accepting on a listener: the kernel stops listening at once (`shutdown(SHUT_RD)` on a
    /// listening socket leaves the listen state, so new SYNs are refused), the armed accept is cancelled,
    /// and the slot is freed when its last completion arrives.
    fn close(&mut self, ctx: &mut Ctx<'_>, index: u32) {
        let generation = self.table.generation(index);
        let Some(listener) = self.table.close(index) else { return };
        // A socket shared with a new process (hot upgrade) listens on there: only this process's
        // descriptor goes.
        if !ctx.shared.handed_over.load(std::sync::atomic::Ordering::Acquire) {
            let _ = listener.socket.shutdown(std::net::Shutdown::Read);
        }
        if listener.armed {
            let _ = ctx.ring.push_cancel(UserData::new(OpKind::Accept, index, generation));
        } else {
            self.table.remove(index);
        }
        stats::set(&ctx.counters.listeners, self.len() as u64);
    }

    /// An accept completed: the new client (unless the listener closes or the worker stops) goes
    /// to `connect`, then the accept is re-armed if it ended (at the next tick after a local
    /// shortage), or the closing listener's slot is freed.
    pub fn on_accept(
        &mut self,
        ctx: &mut Ctx<'_>,
        data: UserData,
        result: i32,
        flags: u32,
        connect: impl FnOnce(&mut Ctx<'_>, VipKey, Socket),
    ) {
        let more = cqueue::more(flags);
        let Some(listener) = self.table.get_mut(data.slot, data.generation) else {
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
            // A client accepted while the listener closes is dropped, unless the socket went to a
            // new process (hot upgrade): that close is no refusal, so the accept race's client is
            // served here.
            let handed_over = ctx.shared.handed_over.load(std::sync::atomic::Ordering::Acquire);
            if ctx.stopping || (closing && !handed_over) {
                drop(socket);
            } else {
                connect(ctx, key, socket);
            }
        } else {
            let errno = -result;
            if errno == libc::EINVAL && listener.multishot && !closing {
                // Kernels before 5.19 reject IORING_ACCEPT_MULTISHOT; fall back to re-armed accepts.
                self.multishot = false;
            } else if let Some(resource) = LocalResource::of_errno(errno) {
                // Back off until the next tick: the accept would fail again at once (the client
                // waits in the backlog meanwhile).
                listener.rearm_at_tick = true;
                ctx.local_failure(resource, "an accept", errno);
            }
        }
        let Some(listener) = self.table.get_mut(data.slot, data.generation) else { return };
        if !listener.armed {
            if listener.closing {
                self.table.remove(data.slot);
                stats::set(&ctx.counters.listeners, self.len() as u64);
            } else if !listener.rearm_at_tick {
                self.arm_accept(ctx, data.slot);
            }
        }
    }

    /// Housekeeping: retries the binds that failed (not when stopping) and re-arms the accepts that
    /// backed off.
    pub fn housekeeping(&mut self, ctx: &mut Ctx<'_>) {
        if !self.unbound.is_empty() && !ctx.stopping {
            self.bind_unbound(ctx, false);
        }
        let mut rearm = Vec::new();
        for (index, listener) in self.table.iter_mut() {
            if listener.rearm_at_tick && !listener.armed && !listener.closing {
                rearm.push(index);
            }
        }
        for index in rearm {
            self.arm_accept(ctx, index);
        }
    }

    /// Graceful shutdown or stop: every listener closes and none is bound again.
    pub fn close_all(&mut self, ctx: &mut Ctx<'_>) {
        self.unbound.clear();
        let open: Vec<u32> = self.table.iter_mut().filter(|(_, l)| !l.closing).map(|(i, _)| i).collect();
        for index in open {
            self.close(ctx, index);
        }
    }

    /// Stops every listener at once (the ring failed; see `Worker::abandon`).
    pub fn shut_down_sockets(&mut self) {
        for (_, listener) in self.table.iter_mut() {
            let _ = listener.socket.shutdown(std::net::Shutdown::Read);
        }
    }
}

fn close_raw(fd: i32) {
    if fd >= 0 {
        // SAFETY: an accepted fd for a listener we no longer track; nothing else owns it.
        unsafe { libc::close(fd) };
    }
}
