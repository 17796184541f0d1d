//! The UDP datapath of a worker: one `SO_REUSEPORT` socket per UDP VIP key, a flow table keyed by
//! client address, one connected upstream socket per flow, replies sent back from the VIP socket.
//!
//! Receives go through io_uring: a multishot `recvmsg` per socket drawing from the worker's provided
//! buffer ring (6.0+), or single-shot `recvmsg` re-armed after each datagram (5.19, or
//! [`UdpConfig::multishot_recv`] off). Sends go through io_uring too (`sendmsg` on the upstream socket,
//! or with the client's address from the VIP socket), straight from the receive buffer, which
//! returns to the kernel when the send completes; a batch of completions is answered by one batch of
//! sends, and a flow's datagrams of one batch leave as one UDP GSO send (see `send`), which the kernel
//! splits back into the same datagrams. A failed send (full socket buffer, error) drops its datagrams
//! as a router would (counted in `udp_drops_send`).
//! With `SO_REUSEPORT` the kernel hashes each client 4-tuple to one worker, so a flow lives in one
//! worker's table only. The VIP socket is bound to the exact VIP, so replies leave with the VIP as
//! source address (no `IP_PKTINFO` needed).
//! Never allocates per datagram in steady state; never tears down a VIP socket because of one flow's
//! error. Invariants: every received buffer is recycled on every path (flow gone or not); a flow's
//! socket is closed when the flow leaves the table (its cancelled receive holds the file until done);
//! `in_flight` counts armed receives, and buffers are only freed once it is zero.
//! This file: the component ([`Flows`]), VIP sockets' life (reconcile, bind retry, close), arming
//! receives, flow expiry; `forward` is the per-datagram path, `send` the sends and their slots,
//! `flow_table` the pure table, `socket` sockets and the buffer ring, `config` the settings.

mod config;
pub(crate) mod flow_table;
mod forward;
mod send;
pub(crate) mod socket;

pub use config::UdpConfig;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::opcode;
use io_uring::squeue::Flags;
use io_uring::types::Fd;
use lb_core::{BackendId, Protocol, ServiceEntry, Snapshot, VipKey};
use socket2::{SockAddr, Socket};

use self::flow_table::{FlowHandle, FlowTable};
use self::socket::{BUFFER_GROUP, BUFFER_SIZE};
use crate::bufring::BufRing;
use crate::context::Ctx;
use crate::ring::{OpKind, Ring, UserData};
use crate::selection::Selection;
use crate::slots::KeyedSlots;
use crate::stats::{self, WorkerCounters};
use crate::warnings::{Warning, warn_limited};

/// The `msghdr` (with its name storage and iovec) a single-shot receive of one VIP socket uses;
/// boxed so its address stays put while the receive is in flight.
struct SingleShotHeader {
    header: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
}

impl SingleShotHeader {
    fn new() -> Box<SingleShotHeader> {
        // SAFETY: msghdr, iovec and sockaddr_storage are plain data; all-zero is valid for each.
        let mut boxed: Box<SingleShotHeader> = Box::new(unsafe { std::mem::zeroed() });
        boxed.iov = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: BUFFER_SIZE };
        boxed.header.msg_iov = &mut boxed.iov;
        boxed.header.msg_iovlen = 1;
        boxed.header.msg_name = (&mut boxed.name as *mut libc::sockaddr_storage).cast();
        boxed
    }

    /// Resets what the kernel may have rewritten before the next receive.
    fn prepare(&mut self) -> *const libc::msghdr {
        self.header.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        &self.header
    }
}

/// One worker's socket for one UDP key.
struct UdpVip {
    key: VipKey,
    socket: Socket,
    /// The entry of the snapshot last reconciled; new flows pick from it.
    entry: Arc<ServiceEntry>,
    header: Box<SingleShotHeader>,
    armed: bool,
    closing: bool,
    rearm_at_tick: bool,
}

/// One client flow.
pub(crate) struct UdpFlow {
    upstream: Socket,
    backend: BackendId,
    /// The backend's load counter this flow is counted on (closed when the flow leaves the table).
    load: lb_core::BackendLoad,
    vip_slot: u32,
    client: SockAddr,
    armed: bool,
    rearm_at_tick: bool,
    /// When a datagram first found the backend no longer eligible (see `lb_core::ServiceEntry::flow`).
    stale_since: Option<Instant>,
    /// `Ring::submissions` when an entry naming the upstream socket's fd (its receive, a send to the
    /// backend) was last queued: if unchanged when the flow ends, that entry must reach the kernel
    /// before the fd is closed, or it would name a closed fd, or another flow's socket that reuses the
    /// number.
    fd_queued_at: Option<u64>,
    /// By [`crate::dir::Dir::index`]: the head buffer of the queued send later datagrams may join, if any.
    open_sends: [Option<u16>; 2],
    /// By [`crate::dir::Dir::index`]: largest datagram that may be a GSO segment (0: never group), so that
    /// every segment fits the path MTU unfragmented.
    max_segment: [u16; 2],
}

/// Everything UDP a worker owns, one component: the VIP sockets, the flow table with each flow's
/// upstream socket, the receive buffers and the sends. The worker calls it with a [`Ctx`] for each
/// completion, snapshot and tick; it reaches nothing else of the worker.
pub(crate) struct Flows {
    config: UdpConfig,
    /// `None` when the kernel refused the buffer ring (before 5.19): UDP keys are then not served.
    buffers: Option<BufRing>,
    /// Leaked on purpose (like the wake-up buffer): receives in flight may read it after the worker.
    /// Multishot receives only read it (they write name and flags into the buffer instead).
    multishot_header: &'static libc::msghdr,
    /// Single-shot receives of connected upstream sockets: no name wanted, one shared header. Leaked,
    /// and a raw pointer because the kernel writes `msg_flags`/`msg_namelen` back into it (nothing here
    /// reads them).
    upstream_header: *mut libc::msghdr,
    multishot: bool,
    vips: KeyedSlots<UdpVip>,
    unbound: Vec<VipKey>,
    flows: FlowTable<UdpFlow>,
    /// Armed receives and submitted sends whose final completion has not been reaped (freed flows'
    /// included).
    in_flight: u32,
    sends: send::SendSlots,
    scratch: Vec<FlowHandle>,
}

impl Flows {
    pub fn new(ring: &Ring, config: UdpConfig, worker: usize) -> Flows {
        let buffers = match BufRing::register(ring, config.recv_buffers, BUFFER_SIZE, BUFFER_GROUP) {
            Ok(buffers) => Some(buffers),
            Err(err) => {
                tracing::warn!(worker, error = %err, "io_uring buffer ring refused (kernel before 5.19?); UDP services are not served");
                None
            }
        };
        let buffer_count = buffers.as_ref().map_or(0, BufRing::count);
        let upstream = {
            let iov: &'static mut libc::iovec =
                Box::leak(Box::new(libc::iovec { iov_base: std::ptr::null_mut(), iov_len: BUFFER_SIZE }));
            let mut header = socket::recvmsg_template();
            header.msg_namelen = 0;
            header.msg_iov = iov;
            header.msg_iovlen = 1;
            Box::into_raw(Box::new(header))
        };
        Flows {
            multishot: ring.features.multishot_recvmsg && config.multishot_recv,
            flows: FlowTable::new(config.max_flows_per_worker),
            config,
            buffers,
            multishot_header: Box::leak(Box::new(socket::recvmsg_template())),
            upstream_header: upstream,
            vips: KeyedSlots::default(),
            unbound: Vec::new(),
            in_flight: 0,
            sends: send::SendSlots::new(buffer_count),
            scratch: Vec::new(),
        }
    }

    /// Descriptors held: one per VIP socket and one per flow's upstream socket.
    #[inline]
    pub fn descriptors(&self) -> usize {
        self.vips.len() + self.flows.len()
    }

    /// VIP sockets held (open or closing).
    #[inline]
    pub fn listeners(&self) -> usize {
        self.vips.len()
    }

    /// No receive is in flight and no socket is open.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.vips.is_empty()
    }

    /// Gives up buffers the kernel may still write into (stop grace exceeded).
    pub fn leak_if_busy(&mut self) {
        if self.in_flight > 0 {
            std::mem::forget(self.buffers.take());
        }
    }

    /// Graceful shutdown: VIP sockets stay (their flows go on) but none is bound again.
    pub fn stop_binding(&mut self) {
        self.unbound.clear();
    }

    /// Shuts every VIP and upstream socket down (the ring failed; see `Worker::abandon`).
    pub fn shut_down_sockets(&mut self) {
        for (_, vip) in self.vips.iter_mut() {
            let _ = vip.socket.shutdown(std::net::Shutdown::Both);
        }
        let mut handles = Vec::new();
        self.flows.select(&mut handles, |_, _| true);
        for handle in handles {
            if let Some(flow) = self.flows.get(handle) {
                let _ = flow.upstream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Pushes a receive on `fd`: multishot from the buffer ring, or one single-shot `recvmsg` with
/// `header` (whose name field, if any, receives the source address).
fn arm_receive(
    ring: &mut Ring,
    fd: i32,
    multishot: bool,
    multishot_header: &'static libc::msghdr,
    header: *const libc::msghdr,
    user_data: u64,
) -> std::io::Result<()> {
    let entry = if multishot {
        opcode::RecvMsgMulti::new(Fd(fd), multishot_header, BUFFER_GROUP).build().user_data(user_data)
    } else {
        opcode::RecvMsg::new(Fd(fd), header.cast_mut())
            .buf_group(BUFFER_GROUP)
            .flags(libc::MSG_TRUNC as u32)
            .build()
            .flags(Flags::BUFFER_SELECT)
            .user_data(user_data)
    };
    // SAFETY: the multishot header is leaked ('static); a single-shot header lives in its VIP's box
    // (freed only after the receive's final completion) or is leaked (upstream sockets); buffers come
    // from the registered ring, which outlives every receive (or is leaked). The fd's file is held by
    // the kernel while the receive is in flight.
    unsafe { ring.push(&entry) }
}

/// Why a flow ends (each has its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowEnd {
    Expired,
    Evicted,
    Moved,
    Failed,
    /// VIP removed or worker stopping: not counted beyond `flows_active`.
    Closed,
}

fn count_end(counters: &WorkerCounters, end: FlowEnd) {
    let counter = match end {
        FlowEnd::Expired => &counters.flows_expired,
        FlowEnd::Evicted => &counters.flows_evicted,
        FlowEnd::Moved => &counters.flows_moved,
        FlowEnd::Failed => &counters.flows_failed,
        FlowEnd::Closed => return,
    };
    stats::add(counter, 1);
}

/// Cancels a removed flow's receive (if armed), closes its socket and ends its load count (every flow
/// that leaves the table passes here exactly once).
fn release_flow(
    ring: &mut Ring,
    selection: &mut Selection,
    counters: &WorkerCounters,
    handle: FlowHandle,
    flow: UdpFlow,
) -> std::io::Result<()> {
    selection.close(flow.load, counters);
    let mut outcome = Ok(());
    if flow.fd_queued_at == Some(ring.submissions()) {
        outcome = ring.submit().map(drop);
    }
    if flow.armed {
        outcome =
            outcome.and(ring.push_cancel(UserData::new(OpKind::UdpFlow, handle.index, handle.generation)));
    }
    // Closes the socket; its cancelled receive holds the file until it completes.
    drop(flow.upstream);
    outcome
}

impl Flows {
    /// Points the VIP socket of `entry`'s key (if bound) at `entry`.
    pub(crate) fn refresh_entry(&mut self, entry: &Arc<ServiceEntry>) {
        let Some(index) = self.vips.find(&entry.key) else { return };
        let generation = self.vips.generation(index);
        if let Some(vip) = self.vips.get_mut(index, generation) {
            vip.entry = Arc::clone(entry);
        }
    }

    /// Opens sockets for new UDP keys, closes those (and their flows) of removed keys, and hands
    /// every open VIP the entry of `snapshot`.
    pub(crate) fn reconcile(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot) {
        let mut removed = Vec::new();
        for (index, vip) in self.vips.iter_mut().filter(|(_, v)| !v.closing) {
            match snapshot.get(&vip.key) {
                Some(entry) => vip.entry = entry.clone(),
                None => removed.push(index),
            }
        }
        for index in removed {
            self.close_vip(ctx, index);
        }
        self.unbound.clear();
        for key in snapshot.keys().filter(|k| k.protocol == Protocol::Udp) {
            if self.vips.find(key).is_none() {
                self.unbound.push(*key);
            }
        }
        self.bind_unbound(ctx, snapshot, true);
    }

    fn bind_unbound(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot, first_try: bool) {
        if self.buffers.is_none() || ctx.draining {
            self.unbound.clear();
            return;
        }
        let keys = std::mem::take(&mut self.unbound);
        for key in keys {
            let Some(entry) = snapshot.get(&key) else { continue };
            match socket::bind_vip(key.socket_addr()) {
                Ok(socket) => {
                    if let Err(err) = socket::set_receive_buffer(&socket, self.config.vip_receive_buffer) {
                        tracing::debug!(worker = ctx.worker, %key, error = %err, "VIP receive buffer not enlarged");
                    }
                    let vip = UdpVip {
                        key,
                        socket,
                        entry: entry.clone(),
                        header: SingleShotHeader::new(),
                        armed: false,
                        closing: false,
                        rearm_at_tick: false,
                    };
                    let (index, _) = self.vips.insert(key, vip);
                    self.arm_vip(ctx, index);
                }
                Err(error) => {
                    stats::add(&ctx.counters.bind_failures, 1);
                    if first_try {
                        warn_limited!(ctx, Warning::Bind, %key, %error, "cannot bind UDP VIP; retrying every housekeeping tick");
                    }
                    self.unbound.push(key);
                }
            }
        }
        self.update_gauges(ctx);
    }

    fn arm_vip(&mut self, ctx: &mut Ctx<'_>, index: u32) {
        let multishot = self.multishot;
        let multishot_header = self.multishot_header;
        let generation = self.vips.generation(index);
        let Some(vip) = self.vips.get_mut(index, generation) else { return };
        let user_data = UserData::new(OpKind::UdpVip, index, generation).encode();
        let header = vip.header.prepare();
        match arm_receive(ctx.ring, vip.socket.as_raw_fd(), multishot, multishot_header, header, user_data) {
            Ok(()) => {
                vip.armed = true;
                vip.rearm_at_tick = false;
                self.in_flight += 1;
            }
            Err(error) => {
                vip.rearm_at_tick = true;
                let key = vip.key;
                warn_limited!(ctx, Warning::Submit, %key, %error, "cannot arm a UDP receive");
            }
        }
    }

    fn arm_flow(&mut self, ctx: &mut Ctx<'_>, handle: FlowHandle) {
        let multishot = self.multishot;
        let (multishot_header, upstream_header) = (self.multishot_header, self.upstream_header);
        let Some(flow) = self.flows.get_mut(handle) else { return };
        let user_data = UserData::new(OpKind::UdpFlow, handle.index, handle.generation).encode();
        match arm_receive(
            ctx.ring,
            flow.upstream.as_raw_fd(),
            multishot,
            multishot_header,
            upstream_header,
            user_data,
        ) {
            Ok(()) => {
                flow.armed = true;
                flow.rearm_at_tick = false;
                flow.fd_queued_at = Some(ctx.ring.submissions());
                self.in_flight += 1;
            }
            Err(_) => flow.rearm_at_tick = true,
        }
    }

    /// Stops receiving on a VIP socket and ends its flows; the slot is freed with the receive's
    /// last completion.
    fn close_vip(&mut self, ctx: &mut Ctx<'_>, index: u32) {
        let generation = self.vips.generation(index);
        self.vips.retire(index);
        let Some(vip) = self.vips.get_mut(index, generation) else { return };
        vip.closing = true;
        let key = vip.key;
        if vip.armed {
            let _ = ctx.ring.push_cancel(UserData::new(OpKind::UdpVip, index, generation));
        } else {
            self.vips.remove(index);
        }
        let mut doomed = std::mem::take(&mut self.scratch);
        doomed.clear();
        self.flows.select(&mut doomed, |flow_key, _| flow_key.vip == key);
        for &handle in &doomed {
            self.end_flow(ctx, handle, FlowEnd::Closed);
        }
        self.scratch = doomed;
        self.update_gauges(ctx);
    }

    fn end_flow(&mut self, ctx: &mut Ctx<'_>, handle: FlowHandle, end: FlowEnd) {
        if let Some((_, flow)) = self.flows.remove(handle) {
            count_end(ctx.counters, end);
            self.release_flow(ctx, handle, flow);
        }
    }

    /// [`release_flow`], warning (throttled) when the ring refused what the flow queued.
    pub(super) fn release_flow(&mut self, ctx: &mut Ctx<'_>, handle: FlowHandle, flow: UdpFlow) {
        if let Err(error) = release_flow(ctx.ring, ctx.selection, ctx.counters, handle, flow) {
            warn_limited!(ctx, Warning::Submit, %error, "cannot submit a UDP flow's last operations");
        }
    }

    fn update_gauges(&self, ctx: &mut Ctx<'_>) {
        stats::set(&ctx.counters.udp_listeners, self.vips.len() as u64);
        stats::set(&ctx.counters.flows_active, self.flows.len() as u64);
    }

    /// Ends idle flows, re-arms receives that failed for lack of resources, retries binds.
    pub(crate) fn housekeeping(&mut self, ctx: &mut Ctx<'_>) {
        if !self.unbound.is_empty() {
            let snapshot = ctx.shared.snapshot.load_full();
            self.bind_unbound(ctx, &snapshot, false);
        }
        let rearm: Vec<u32> = self
            .vips
            .iter_mut()
            .filter(|(_, v)| v.rearm_at_tick && !v.armed && !v.closing)
            .map(|(index, _)| index)
            .collect();
        for index in rearm {
            self.arm_vip(ctx, index);
        }
        let mut handles = std::mem::take(&mut self.scratch);
        handles.clear();
        self.flows.expired(ctx.now, &mut handles);
        for &handle in &handles {
            self.end_flow(ctx, handle, FlowEnd::Expired);
        }
        handles.clear();
        self.flows.select(&mut handles, |_, flow| flow.rearm_at_tick && !flow.armed);
        for &handle in &handles {
            self.arm_flow(ctx, handle);
        }
        self.scratch = handles;
        self.update_gauges(ctx);
    }

    /// Closes every UDP socket (worker stopping).
    pub(crate) fn stop(&mut self, ctx: &mut Ctx<'_>) {
        self.unbound.clear();
        let open: Vec<u32> =
            self.vips.iter_mut().filter(|(_, v)| !v.closing).map(|(index, _)| index).collect();
        for index in open {
            self.close_vip(ctx, index);
        }
    }
}
