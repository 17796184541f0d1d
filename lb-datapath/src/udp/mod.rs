//! The UDP datapath of a worker: `SO_REUSEPORT` VIP sockets where the [`ListenPlan`] shared with TCP
//! says (one per UDP VIP key while they fit the descriptor budget, else one per port and family on
//! the wildcard address for the VIPs sharing it), a flow table keyed by VIP and client address, one
//! connected upstream socket per flow (bound to the client's address for a transparent entry, see
//! `crate::transparent`), replies sent back from the VIP socket.
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
//! worker's table only. An exact VIP socket is bound to the VIP, so replies leave with the VIP as
//! source address. A wildcard socket learns each datagram's destination (`IP_PKTINFO` /
//! `IPV6_PKTINFO`), serves the entry of that VIP, drops (and counts, `udp_drops_not_a_vip`) a
//! datagram to an address that is no VIP of the port, and names the VIP as source of every reply in
//! a control message (see `send`). Moving a group between exact sockets and a wildcard ends the
//! flows of the sockets that close (the next datagram makes a new flow on the new socket).
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

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
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
use crate::ListenMode;
use crate::bufring::BufRing;
use crate::context::Ctx;
use crate::listener::{ListenPlan, is_wildcard};
use crate::ring::{OpKind, Ring, UserData};
use crate::selection::Selection;
use crate::slots::KeyedSlots;
use crate::stats::{self, WorkerCounters};
use crate::warnings::{Warning, warn_limited};

/// Control data of a single-shot receive, aligned for a `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; socket::CONTROL_SPACE]);

/// The `msghdr` (with its name storage, control buffer and iovec) a single-shot receive of one VIP
/// socket uses; boxed so its address stays put while the receive is in flight.
struct SingleShotHeader {
    header: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    control: ControlBuffer,
}

impl SingleShotHeader {
    fn new() -> Box<SingleShotHeader> {
        // SAFETY: msghdr, iovec and sockaddr_storage are plain data; all-zero is valid for each.
        let mut boxed: Box<SingleShotHeader> = Box::new(unsafe { std::mem::zeroed() });
        boxed.iov = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: BUFFER_SIZE };
        boxed.header.msg_iov = &mut boxed.iov;
        boxed.header.msg_iovlen = 1;
        boxed.header.msg_name = (&mut boxed.name as *mut libc::sockaddr_storage).cast();
        boxed.header.msg_control = boxed.control.0.as_mut_ptr().cast();
        boxed
    }

    /// Resets what the kernel may have rewritten before the next receive.
    fn prepare(&mut self) -> *const libc::msghdr {
        self.header.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        self.header.msg_controllen = socket::CONTROL_SPACE;
        &self.header
    }

    /// The control data the last receive wrote.
    fn control(&self) -> &[u8] {
        &self.control.0[..self.header.msg_controllen.min(socket::CONTROL_SPACE)]
    }
}

/// The entries a VIP socket serves, from the snapshot last reconciled; new flows pick from them.
enum Served {
    /// An exact socket: its VIP's entry.
    One(Arc<ServiceEntry>),
    /// A wildcard socket: the entry of each VIP of its port and family, by address.
    Many(HashMap<IpAddr, Arc<ServiceEntry>>),
}

impl Served {
    /// What the socket of `listen` serves under `plan` in `snapshot` (`None`: not in the plan).
    fn of(plan: &ListenPlan, snapshot: &Snapshot, listen: &VipKey) -> Option<Served> {
        if plan.exact.contains(listen) {
            return snapshot.get(listen).map(|entry| Served::One(Arc::clone(entry)));
        }
        let keys = plan.wildcards.get(listen)?;
        let entries = keys.iter().filter_map(|key| Some((key.addr, Arc::clone(snapshot.get(key)?))));
        Some(Served::Many(entries.collect()))
    }

    /// The entry of the VIP at `addr` (an exact socket serves only its own).
    fn entry(&self, addr: IpAddr) -> Option<&Arc<ServiceEntry>> {
        match self {
            Served::One(entry) => Some(entry),
            Served::Many(entries) => entries.get(&addr),
        }
    }
}

/// One worker's socket for one UDP listen key (a VIP key, or a wildcard of the plan).
struct UdpVip {
    key: VipKey,
    socket: crate::handover::VipSocket,
    served: Served,
    header: Box<SingleShotHeader>,
    armed: bool,
    closing: bool,
    rearm_at_tick: bool,
    /// False once the socket is shared with a new process (hot upgrade): that one receives its
    /// datagrams; this one only sends its flows' replies from it.
    receiving: bool,
}

/// One client flow.
pub(crate) struct UdpFlow {
    upstream: Socket,
    backend: BackendId,
    /// The backend's load counter and traffic cell this flow is counted on (closed when the flow
    /// leaves the table).
    load: crate::traffic::Counted,
    vip_slot: u32,
    client: SockAddr,
    /// The VIP replies name as source address: set when the VIP socket is a wildcard.
    source: Option<IpAddr>,
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
    /// The PROXY protocol v2 header every datagram to the backend starts with, if the entry sends
    /// one (built once per flow: client and VIP are the flow's key).
    proxy_header: Option<lb_core::ProxyHeader>,
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
    mode: ListenMode,
    /// Where the UDP keys of the snapshot last reconciled are received (shared rules with TCP).
    plan: ListenPlan,
    /// Wildcards whose bind collided with another socket on the host: their groups bind exactly.
    exact_only: HashSet<VipKey>,
    /// Listen keys of the plan whose bind failed; retried every tick.
    unbound: Vec<VipKey>,
    flows: FlowTable<UdpFlow>,
    /// Armed receives and submitted sends whose final completion has not been reaped (freed flows'
    /// included).
    in_flight: u32,
    sends: send::SendSlots,
    scratch: Vec<FlowHandle>,
}

impl Flows {
    pub fn new(ring: &Ring, config: UdpConfig, mode: ListenMode, worker: usize) -> Flows {
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
            mode,
            plan: ListenPlan::default(),
            exact_only: HashSet::new(),
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

    /// The VIP sockets are shared with a new process (hot upgrade): this worker stops receiving
    /// on them (the new process receives every datagram) and keeps them open, unshut, for the
    /// replies of its flows.
    pub fn stop_receiving(&mut self, ctx: &mut Ctx<'_>) {
        let mut armed = Vec::new();
        for (index, vip) in self.vips.iter_mut() {
            vip.receiving = false;
            if vip.armed {
                armed.push(index);
            }
        }
        for index in armed {
            let generation = self.vips.generation(index);
            let _ = ctx.ring.push_cancel(UserData::new(OpKind::UdpVip, index, generation));
        }
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
    now: Instant,
    handle: FlowHandle,
    flow: UdpFlow,
) -> std::io::Result<()> {
    selection.close(flow.load, now, counters);
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
    /// Points the VIP socket serving `entry`'s key (its own, or its port's wildcard) at `entry`.
    pub(crate) fn refresh_entry(&mut self, entry: &Arc<ServiceEntry>) {
        let listen = crate::listener::wildcard_of(&entry.key);
        let Some(index) = self.vips.find(&entry.key).or_else(|| self.vips.find(&listen)) else { return };
        let generation = self.vips.generation(index);
        let Some(vip) = self.vips.get_mut(index, generation) else { return };
        match &mut vip.served {
            Served::One(served) => *served = Arc::clone(entry),
            Served::Many(entries) => {
                if let Some(served) = entries.get_mut(&entry.key.addr) {
                    *served = Arc::clone(entry);
                }
            }
        }
    }

    /// Plans where the UDP keys of `snapshot` are received, binds what the plan lacks, then closes
    /// the sockets (and their flows) it no longer wants and ends the flows of removed VIPs; every
    /// open VIP socket gets the entries of `snapshot`.
    pub(crate) fn reconcile(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot) {
        // TCP planned first: what the rest of the worker listens on is what TCP and SCTP hold.
        let udp = snapshot.keys().filter(|key| key.protocol == Protocol::Udp);
        let room = ctx.room.max_listeners().saturating_sub(ctx.room.listening_elsewhere());
        self.plan = ListenPlan::new(udp, self.mode, room, &mut self.exact_only);
        let mut unwanted = Vec::new();
        for (index, vip) in self.vips.iter_mut().filter(|(_, v)| !v.closing) {
            match Served::of(&self.plan, snapshot, &vip.key) {
                Some(served) => vip.served = served,
                None => unwanted.push(index),
            }
        }
        self.unbound.clear();
        for listen in self.plan.exact.iter().chain(self.plan.wildcards.keys()) {
            if self.vips.find(listen).is_none() {
                self.unbound.push(*listen);
            }
        }
        // New sockets open before unwanted ones close, as for TCP.
        self.bind_unbound(ctx, snapshot, true);
        for index in unwanted {
            self.close_vip(ctx, index);
        }
        // A VIP removed from a wildcard that stays: its flows end here.
        let mut gone = std::mem::take(&mut self.scratch);
        gone.clear();
        self.flows.select(&mut gone, |flow_key, _| snapshot.get(&flow_key.vip).is_none());
        for &handle in &gone {
            self.end_flow(ctx, handle, FlowEnd::Closed);
        }
        self.scratch = gone;
        self.update_gauges(ctx);
    }

    /// Binds the listen keys in `unbound`; `unbound` pops from the end, so wildcards (pushed last)
    /// are bound first. A wildcard that collides with another socket on the host (`EADDRINUSE`)
    /// falls back to exact sockets for its group, as for TCP.
    fn bind_unbound(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot, first_try: bool) {
        if self.buffers.is_none() || ctx.draining {
            self.unbound.clear();
            return;
        }
        let mut keys = std::mem::take(&mut self.unbound);
        while let Some(key) = keys.pop() {
            let Some(served) = Served::of(&self.plan, snapshot, &key) else { continue };
            let wildcard = is_wildcard(&key);
            let bind = if wildcard { socket::bind_wildcard } else { socket::bind_vip };
            let bound = crate::handover::open_vip_socket(ctx.shared, key.socket_addr(), Protocol::Udp, bind);
            match bound {
                Ok(socket) => {
                    if let Err(err) = socket::set_receive_buffer(&socket, self.config.vip_receive_buffer) {
                        tracing::debug!(worker = ctx.worker, %key, error = %err, "VIP receive buffer not enlarged");
                    }
                    let vip = UdpVip {
                        key,
                        socket,
                        served,
                        header: SingleShotHeader::new(),
                        armed: false,
                        closing: false,
                        rearm_at_tick: false,
                        receiving: true,
                    };
                    let (index, _) = self.vips.insert(key, vip);
                    self.arm_vip(ctx, index);
                }
                Err(error) if wildcard && error.raw_os_error() == Some(libc::EADDRINUSE) => {
                    self.exact_only.insert(key);
                    let group = self.plan.fall_back(&key);
                    if ctx.worker == 0 {
                        tracing::info!(%key, vips = group.len(), "the UDP port is taken on some address of this host; receiving on each VIP of it instead of the wildcard");
                    }
                    keys.extend(group.into_iter().filter(|vip| self.vips.find(vip).is_none()));
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
        if vip.armed {
            let _ = ctx.ring.push_cancel(UserData::new(OpKind::UdpVip, index, generation));
        } else {
            self.vips.remove(index);
        }
        let mut doomed = std::mem::take(&mut self.scratch);
        doomed.clear();
        self.flows.select(&mut doomed, |_, flow| flow.vip_slot == index);
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
        if let Err(error) = release_flow(ctx.ring, ctx.selection, ctx.counters, ctx.now, handle, flow) {
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
            .filter(|(_, v)| v.rearm_at_tick && !v.armed && !v.closing && v.receiving)
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
