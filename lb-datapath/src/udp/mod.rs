//! The UDP datapath of a worker: one `SO_REUSEPORT` socket per UDP VIP key, a flow table keyed by
//! client address, one connected upstream socket per flow, replies sent back from the VIP socket.
//!
//! Receives go through io_uring: a multishot `recvmsg` per socket drawing from the worker's provided
//! buffer ring (6.0+), or single-shot `recvmsg` re-armed after each datagram (5.19, or
//! [`UdpConfig::multishot_recv`] off). Sends are plain non-blocking `send`/`sendto` calls made while
//! the received buffer is in hand, so the buffer goes straight back to the kernel: a UDP send never
//! waits, and a full socket buffer drops the datagram as a router would (counted in `udp_drops_send`).
//! With `SO_REUSEPORT` the kernel hashes each client 4-tuple to one worker, so a flow lives in one
//! worker's table only. The VIP socket is bound to the exact VIP, so replies leave with the VIP as
//! source address (no `IP_PKTINFO` needed).
//! Never allocates per datagram in steady state; never tears down a VIP socket because of one flow's
//! error. Invariants: every received buffer is recycled on every path (flow gone or not); a flow's
//! socket is closed when the flow leaves the table (its cancelled receive holds the file until done);
//! `in_flight` counts armed receives, and buffers are only freed once it is zero.

pub(crate) mod flow_table;
pub(crate) mod socket;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::squeue::Flags;
use io_uring::types::{Fd, RecvMsgOut};
use io_uring::{cqueue, opcode};
use lb_core::{BackendId, PickRequest, Protocol, ServiceEntry, Snapshot, VipKey};
use socket2::{SockAddr, Socket};

use self::flow_table::{FlowHandle, FlowKey, FlowTable, FlowTimeouts};
use self::socket::{BUFFER_GROUP, BUFFER_SIZE, BufRing};
use crate::ring::{GENERATION_MASK, OpKind, Ring, UserData};
use crate::stats::{self, WorkerCounters};
use crate::worker::Worker;

/// What happens to a flow whose backend is no longer eligible (not ready, or removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StaleFlowPolicy {
    /// The flow's next client datagram ends it and opens a new flow to a freshly picked backend
    /// (counted in `flows_moved`). No flow keeps feeding a backend that left — the kube-proxy
    /// complaint where stale conntrack entries pin UDP clients (e.g. DNS) to a deleted pod. A
    /// backend that is merely not ready loses its flows too, which is what readiness asks for.
    #[default]
    Move,
    /// The flow keeps its backend for at most the entry's `drain_timeout` after its first datagram
    /// that found the backend ineligible (as TCP connections drain), then moves as above; a quiet
    /// flow ends at its idle timeout first. For protocols that keep state per client in the backend.
    Drain,
}

/// UDP settings of the engine (per worker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// Flows one worker tracks at most; the least recently used is evicted beyond.
    pub max_flows_per_worker: usize,
    /// Idle timeout of a flow whose backend never replied (conntrack's `nf_conntrack_udp_timeout`).
    pub unreplied_timeout: Duration,
    /// Idle timeout of a flow that saw a reply (conntrack's `nf_conntrack_udp_timeout_stream`).
    pub replied_timeout: Duration,
    pub stale_flows: StaleFlowPolicy,
    /// Receive buffers per worker (rounded up to a power of two); each holds a 65 527-byte datagram.
    /// Memory is mapped lazily, so only buffers the kernel ever filled cost resident memory.
    pub recv_buffers: u16,
    /// Use multishot `recvmsg` where the kernel supports it (6.0+); `false` forces the re-armed
    /// single-shot receive (useful to exercise that path on a new kernel).
    pub multishot_recv: bool,
}

impl Default for UdpConfig {
    fn default() -> Self {
        UdpConfig {
            max_flows_per_worker: 65_536,
            unreplied_timeout: Duration::from_secs(30),
            replied_timeout: Duration::from_secs(120),
            stale_flows: StaleFlowPolicy::Move,
            recv_buffers: 128,
            multishot_recv: true,
        }
    }
}

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

struct VipSlot {
    generation: u32,
    vip: Option<UdpVip>,
}

/// One client flow.
pub(crate) struct UdpFlow {
    upstream: Socket,
    backend: BackendId,
    vip_slot: u32,
    client: SockAddr,
    armed: bool,
    rearm_at_tick: bool,
    /// `StaleFlowPolicy::Drain`: when a datagram first found the backend ineligible.
    stale_since: Option<Instant>,
}

/// Everything UDP a worker owns.
pub(crate) struct UdpState {
    config: UdpConfig,
    /// `None` when the kernel refused the buffer ring (before 5.19): UDP keys are then not served.
    buffers: Option<BufRing>,
    /// Leaked on purpose (like the wake-up buffer): receives in flight may read it after the worker.
    multishot_header: &'static libc::msghdr,
    /// Single-shot receives of connected upstream sockets: no name wanted, one shared header.
    upstream_header: &'static libc::msghdr,
    multishot: bool,
    vips: Vec<VipSlot>,
    unbound: Vec<VipKey>,
    flows: FlowTable<UdpFlow>,
    /// Armed receives whose final completion has not been reaped (freed flows' included).
    in_flight: u32,
    scratch: Vec<FlowHandle>,
}

impl UdpState {
    pub fn new(ring: &Ring, config: UdpConfig, worker: usize) -> UdpState {
        let buffers = match BufRing::register(ring, config.recv_buffers) {
            Ok(buffers) => Some(buffers),
            Err(err) => {
                tracing::warn!(worker, error = %err, "io_uring buffer ring refused (kernel before 5.19?); UDP services are not served");
                None
            }
        };
        let upstream = {
            let iov: &'static mut libc::iovec =
                Box::leak(Box::new(libc::iovec { iov_base: std::ptr::null_mut(), iov_len: BUFFER_SIZE }));
            let mut header = socket::recvmsg_template();
            header.msg_namelen = 0;
            header.msg_iov = iov;
            header.msg_iovlen = 1;
            &*Box::leak(Box::new(header))
        };
        UdpState {
            multishot: ring.features.multishot_recvmsg && config.multishot_recv,
            flows: FlowTable::new(config.max_flows_per_worker),
            config,
            buffers,
            multishot_header: Box::leak(Box::new(socket::recvmsg_template())),
            upstream_header: upstream,
            vips: Vec::new(),
            unbound: Vec::new(),
            in_flight: 0,
            scratch: Vec::new(),
        }
    }

    /// No receive is in flight and no socket is open.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.vips.iter().all(|s| s.vip.is_none())
    }

    /// Gives up buffers the kernel may still write into (stop grace exceeded).
    pub fn leak_if_busy(&mut self) {
        if self.in_flight > 0 {
            std::mem::forget(self.buffers.take());
        }
    }

    fn vip_mut(&mut self, slot: u32, generation: u32) -> Option<&mut UdpVip> {
        let entry = self.vips.get_mut(slot as usize)?;
        if entry.generation != generation {
            return None;
        }
        entry.vip.as_mut()
    }

    fn find_vip(&self, key: &VipKey) -> Option<u32> {
        self.vips
            .iter()
            .position(|s| s.vip.as_ref().is_some_and(|v| v.key == *key && !v.closing))
            .map(|i| i as u32)
    }

    fn timeouts(&self) -> FlowTimeouts {
        FlowTimeouts { unreplied: self.config.unreplied_timeout, replied: self.config.replied_timeout }
    }
}

/// A datagram as received: its source (VIP sockets) and payload, or why it cannot be used.
struct Received<'a> {
    source: Option<SocketAddr>,
    payload: &'a [u8],
    truncated: bool,
}

fn received<'a>(
    buffers: &'a BufRing,
    multishot_header: &libc::msghdr,
    single_shot_name: Option<&libc::sockaddr_storage>,
    multishot: bool,
    bid: Option<u16>,
    result: usize,
) -> Option<Received<'a>> {
    if multishot {
        let bid = bid?;
        let filled = buffers.filled(bid, result);
        let out = RecvMsgOut::parse(filled, multishot_header).ok()?;
        // `RecvMsgOut` lends its parts for its own lifetime; slice the payload from the buffer
        // itself (it follows the header and the fixed-size name field; no control data is asked for).
        let start = socket::MULTISHOT_HEADER;
        let payload = filled.get(start..start + out.payload_data().len())?;
        Some(Received {
            source: socket::parse_sockaddr(out.name_data()),
            payload,
            truncated: out.is_payload_truncated(),
        })
    } else {
        // MSG_TRUNC makes the result the datagram's real length, larger than the buffer if cut.
        let source = single_shot_name.and_then(|name| {
            // SAFETY: a sockaddr_storage is `size_of` initialised bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (name as *const libc::sockaddr_storage).cast::<u8>(),
                    std::mem::size_of::<libc::sockaddr_storage>(),
                )
            };
            socket::parse_sockaddr(bytes)
        });
        // A zero-length datagram consumes no provided buffer: the completion names none.
        let payload = match bid {
            Some(bid) => buffers.filled(bid, result),
            None if result == 0 => &[],
            None => return None,
        };
        Some(Received { source, payload, truncated: result > BUFFER_SIZE })
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

/// Cancels a removed flow's receive (if armed) and closes its socket.
fn release_flow(ring: &mut Ring, handle: FlowHandle, flow: UdpFlow) {
    if flow.armed {
        let target = UserData::new(OpKind::UdpFlow, handle.index, handle.generation).encode();
        let cancel =
            opcode::AsyncCancel::new(target).build().user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request references no memory.
        if let Err(err) = unsafe { ring.push(&cancel) } {
            tracing::warn!(error = %err, "cannot cancel a UDP flow's receive");
        }
    }
    drop(flow);
}

impl Worker {
    /// Opens sockets for new UDP keys, closes those (and their flows) of removed keys, and hands
    /// every open VIP the entry of `snapshot`.
    pub(crate) fn reconcile_udp(&mut self, snapshot: &Snapshot) {
        let mut removed = Vec::new();
        for (index, slot) in self.udp.vips.iter_mut().enumerate() {
            let Some(vip) = slot.vip.as_mut().filter(|v| !v.closing) else { continue };
            match snapshot.get(&vip.key) {
                Some(entry) => vip.entry = entry.clone(),
                None => removed.push(index as u32),
            }
        }
        for index in removed {
            self.close_udp_vip(index);
        }
        self.udp.unbound.clear();
        for key in snapshot.keys().filter(|k| k.protocol == Protocol::Udp) {
            if self.udp.find_vip(key).is_none() {
                self.udp.unbound.push(*key);
            }
        }
        self.bind_unbound_udp(snapshot, true);
    }

    fn bind_unbound_udp(&mut self, snapshot: &Snapshot, first_try: bool) {
        if self.udp.buffers.is_none() {
            self.udp.unbound.clear();
            return;
        }
        let keys = std::mem::take(&mut self.udp.unbound);
        for key in keys {
            let Some(entry) = snapshot.get(&key) else { continue };
            match socket::bind_vip(key.socket_addr()) {
                Ok(socket) => {
                    let vip = UdpVip {
                        key,
                        socket,
                        entry: entry.clone(),
                        header: SingleShotHeader::new(),
                        armed: false,
                        closing: false,
                        rearm_at_tick: false,
                    };
                    let index = match self.udp.vips.iter().position(|s| s.vip.is_none()) {
                        Some(index) => {
                            let slot = &mut self.udp.vips[index];
                            slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
                            slot.vip = Some(vip);
                            index
                        }
                        None => {
                            self.udp.vips.push(VipSlot { generation: 0, vip: Some(vip) });
                            self.udp.vips.len() - 1
                        }
                    };
                    self.arm_udp_vip(index as u32);
                }
                Err(err) => {
                    stats::add(&self.counters.bind_failures, 1);
                    if first_try {
                        tracing::warn!(worker = self.settings.index, %key, error = %err, "cannot bind UDP VIP; retrying every housekeeping tick");
                    }
                    self.udp.unbound.push(key);
                }
            }
        }
        self.update_udp_gauges();
    }

    fn arm_udp_vip(&mut self, index: u32) {
        let multishot = self.udp.multishot;
        let multishot_header = self.udp.multishot_header;
        let Some(slot) = self.udp.vips.get_mut(index as usize) else { return };
        let generation = slot.generation;
        let Some(vip) = slot.vip.as_mut() else { return };
        let user_data = UserData::new(OpKind::UdpVip, index, generation).encode();
        let header = vip.header.prepare();
        match arm_receive(
            &mut self.ring,
            vip.socket.as_raw_fd(),
            multishot,
            multishot_header,
            header,
            user_data,
        ) {
            Ok(()) => {
                vip.armed = true;
                vip.rearm_at_tick = false;
                self.udp.in_flight += 1;
            }
            Err(err) => {
                vip.rearm_at_tick = true;
                tracing::warn!(worker = self.settings.index, key = %vip.key, error = %err, "cannot arm a UDP receive");
            }
        }
    }

    fn arm_udp_flow(&mut self, handle: FlowHandle) {
        let multishot = self.udp.multishot;
        let (multishot_header, upstream_header) = (self.udp.multishot_header, self.udp.upstream_header);
        let Some(flow) = self.udp.flows.get_mut(handle) else { return };
        let user_data = UserData::new(OpKind::UdpFlow, handle.index, handle.generation).encode();
        match arm_receive(
            &mut self.ring,
            flow.upstream.as_raw_fd(),
            multishot,
            multishot_header,
            upstream_header,
            user_data,
        ) {
            Ok(()) => {
                flow.armed = true;
                flow.rearm_at_tick = false;
                self.udp.in_flight += 1;
            }
            Err(_) => flow.rearm_at_tick = true,
        }
    }

    /// Stops receiving on a VIP socket and ends its flows; the slot is freed with the receive's
    /// last completion.
    fn close_udp_vip(&mut self, index: u32) {
        let Some(slot) = self.udp.vips.get_mut(index as usize) else { return };
        let generation = slot.generation;
        let Some(vip) = slot.vip.as_mut() else { return };
        vip.closing = true;
        let key = vip.key;
        if vip.armed {
            let target = UserData::new(OpKind::UdpVip, index, generation).encode();
            let cancel = opcode::AsyncCancel::new(target)
                .build()
                .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
            // SAFETY: a cancel request references no memory.
            let _ = unsafe { self.ring.push(&cancel) };
        } else {
            slot.vip = None;
        }
        let mut doomed = std::mem::take(&mut self.udp.scratch);
        doomed.clear();
        self.udp.flows.select(&mut doomed, |flow_key, _| flow_key.vip == key);
        for &handle in &doomed {
            self.end_flow(handle, FlowEnd::Closed);
        }
        self.udp.scratch = doomed;
        self.update_udp_gauges();
    }

    fn end_flow(&mut self, handle: FlowHandle, end: FlowEnd) {
        if let Some((_, flow)) = self.udp.flows.remove(handle) {
            count_end(&self.counters, end);
            release_flow(&mut self.ring, handle, flow);
        }
    }

    fn update_udp_gauges(&self) {
        let open = self.udp.vips.iter().filter(|s| s.vip.is_some()).count();
        stats::set(&self.counters.udp_listeners, open as u64);
        stats::set(&self.counters.flows_active, self.udp.flows.len() as u64);
    }

    /// Ends idle flows, re-arms receives that failed for lack of resources, retries binds.
    pub(crate) fn udp_housekeeping(&mut self) {
        if !self.udp.unbound.is_empty() {
            let snapshot = self.shared.snapshot.load_full();
            self.bind_unbound_udp(&snapshot, false);
        }
        let rearm: Vec<u32> = (0..self.udp.vips.len() as u32)
            .filter(|&i| {
                self.udp.vips[i as usize]
                    .vip
                    .as_ref()
                    .is_some_and(|v| v.rearm_at_tick && !v.armed && !v.closing)
            })
            .collect();
        for index in rearm {
            self.arm_udp_vip(index);
        }
        let mut handles = std::mem::take(&mut self.udp.scratch);
        handles.clear();
        self.udp.flows.expired(self.now, self.udp.timeouts(), &mut handles);
        for &handle in &handles {
            self.end_flow(handle, FlowEnd::Expired);
        }
        handles.clear();
        self.udp.flows.select(&mut handles, |_, flow| flow.rearm_at_tick && !flow.armed);
        for &handle in &handles {
            self.arm_udp_flow(handle);
        }
        self.udp.scratch = handles;
        self.update_udp_gauges();
    }

    /// Closes every UDP socket (worker stopping).
    pub(crate) fn stop_udp(&mut self) {
        self.udp.unbound.clear();
        for index in 0..self.udp.vips.len() as u32 {
            if self.udp.vips[index as usize].vip.as_ref().is_some_and(|v| !v.closing) {
                self.close_udp_vip(index);
            }
        }
    }

    /// A completion of a VIP socket's receive: a client datagram (or the receive's end).
    pub(crate) fn on_udp_vip(&mut self, data: UserData, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.udp.in_flight = self.udp.in_flight.saturating_sub(1);
        }
        let stopping = self.is_stopping();
        let closing = self.udp.vip_mut(data.slot, data.generation).map(|vip| {
            if !more {
                vip.armed = false;
            }
            vip.closing
        });
        let mut rearm = Rearm::Now;
        if let Some(closing) = closing {
            match (result, bid) {
                (len, _) if len >= 0 && (bid.is_some() || !self.udp.multishot) => {
                    if !closing && !stopping {
                        self.client_datagram(data.slot, bid, len as usize);
                    }
                }
                _ => rearm = self.receive_failed(result),
            }
        }
        if let (Some(bid), Some(buffers)) = (bid, self.udp.buffers.as_mut()) {
            buffers.recycle(bid);
        }
        let Some(vip) = self.udp.vip_mut(data.slot, data.generation) else { return };
        if vip.armed {
            return;
        }
        if vip.closing {
            self.udp.vips[data.slot as usize].vip = None;
            self.update_udp_gauges();
            return;
        }
        match rearm {
            Rearm::Now => {
                stats::add(&self.counters.udp_recv_rearms, 1);
                self.arm_udp_vip(data.slot);
            }
            Rearm::AtTick => vip.rearm_at_tick = true,
        }
    }

    /// A receive ended without a datagram: decides when it is re-armed.
    fn receive_failed(&mut self, result: i32) -> Rearm {
        let errno = -result;
        if errno == libc::EINVAL && self.udp.multishot {
            // Kernels before 6.0 reject IORING_RECV_MULTISHOT: fall back to single-shot receives.
            tracing::info!(
                worker = self.settings.index,
                "multishot recvmsg refused; using single-shot receives"
            );
            self.udp.multishot = false;
            Rearm::Now
        } else if errno == libc::ENOBUFS || result >= 0 {
            // Every buffer was in use and the datagram waits in the socket: the buffers of the
            // completions handled in this batch are back by the time the kernel runs the new receive.
            Rearm::Now
        } else {
            // Anything else might repeat at once; retry at the next tick rather than spin.
            Rearm::AtTick
        }
    }

    /// Forwards a client datagram to its flow's backend, creating (or moving) the flow if needed.
    fn client_datagram(&mut self, vip_slot: u32, bid: Option<u16>, len: usize) {
        let (key, handle) = {
            let Some(buffers) = self.udp.buffers.as_ref() else { return };
            let Some(vip) = self.udp.vips.get(vip_slot as usize).and_then(|s| s.vip.as_ref()) else { return };
            let multishot_header = self.udp.multishot_header;
            let name = Some(&vip.header.name);
            let Some(datagram) = received(buffers, multishot_header, name, self.udp.multishot, bid, len)
            else {
                return;
            };
            if datagram.truncated {
                stats::add(&self.counters.udp_drops_truncated, 1);
                return;
            }
            let Some(client) = datagram.source else { return };
            let key = FlowKey { vip: vip.key, client };
            let mut handle = self.udp.flows.find(&key);
            if let Some(existing) = handle {
                let policy = self.udp.config.stale_flows;
                if flow_must_move(&mut self.udp.flows, policy, self.now, existing, &vip.entry) {
                    if let Some((_, flow)) = self.udp.flows.remove(existing) {
                        count_end(&self.counters, FlowEnd::Moved);
                        release_flow(&mut self.ring, existing, flow);
                    }
                    handle = None;
                }
            }
            if let Some(handle) = handle {
                // Steady state: the flow exists, send while the buffer is in hand.
                let sent = self.udp.flows.get(handle).map(|flow| flow.upstream.send(datagram.payload));
                if let Some(sent) = sent {
                    self.sent_to_backend(handle, sent);
                }
                return;
            }
            (key, handle)
        };
        debug_assert!(handle.is_none());
        let Some(handle) = self.create_flow(vip_slot, key) else { return };
        let sent = {
            let Some(buffers) = self.udp.buffers.as_ref() else { return };
            let Some(vip) = self.udp.vips.get(vip_slot as usize).and_then(|s| s.vip.as_ref()) else { return };
            let name = Some(&vip.header.name);
            let datagram = received(buffers, self.udp.multishot_header, name, self.udp.multishot, bid, len);
            let flow = self.udp.flows.get(handle);
            match (datagram, flow) {
                (Some(datagram), Some(flow)) => flow.upstream.send(datagram.payload),
                _ => return,
            }
        };
        self.sent_to_backend(handle, sent);
    }

    /// Picks a backend for a new flow and opens its upstream socket (evicting the least recently
    /// used flow if the table is full).
    fn create_flow(&mut self, vip_slot: u32, key: FlowKey) -> Option<FlowHandle> {
        let vip = self.udp.vips.get(vip_slot as usize).and_then(|s| s.vip.as_ref())?;
        let entry = &vip.entry;
        let state = self.pick_states.entry(key.vip).or_default();
        let request = PickRequest { client: key.client, exclude: &[] };
        let backend = entry.scheduler.pick(&request, state).and_then(|idx| entry.backend(idx));
        let Some(upstream) = backend.and_then(|b| socket::connect_upstream(b.addr()).ok()) else {
            stats::add(&self.counters.udp_drops_no_backend, 1);
            return None;
        };
        let flow = UdpFlow {
            upstream,
            backend: backend?.id,
            vip_slot,
            client: SockAddr::from(key.client),
            armed: false,
            rearm_at_tick: false,
            stale_since: None,
        };
        let (handle, evicted) = self.udp.flows.insert(key, flow, self.now);
        stats::add(&self.counters.flows_created, 1);
        if let Some(evicted) = evicted {
            count_end(&self.counters, FlowEnd::Evicted);
            release_flow(&mut self.ring, evicted.handle, evicted.value);
        }
        self.arm_udp_flow(handle);
        self.update_udp_gauges();
        Some(handle)
    }

    fn sent_to_backend(&mut self, handle: FlowHandle, sent: std::io::Result<usize>) {
        match sent {
            Ok(bytes) => {
                stats::add(&self.counters.udp_datagrams_client_to_backend, 1);
                stats::add(&self.counters.udp_bytes_client_to_backend, bytes as u64);
                self.udp.flows.touch(handle, self.now, false);
            }
            Err(err) => {
                stats::add(&self.counters.udp_drops_send, 1);
                if err.raw_os_error() == Some(libc::ECONNREFUSED) {
                    // An ICMP error answered an earlier datagram: this backend's port is closed.
                    self.end_flow(handle, FlowEnd::Failed);
                    self.update_udp_gauges();
                }
            }
        }
    }

    /// A completion of a flow's upstream receive: a backend reply (or the receive's end).
    pub(crate) fn on_udp_flow(&mut self, data: UserData, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.udp.in_flight = self.udp.in_flight.saturating_sub(1);
        }
        let handle = FlowHandle { index: data.slot, generation: data.generation };
        let live = self.udp.flows.get_mut(handle).map(|flow| {
            if !more {
                flow.armed = false;
            }
        });
        let mut rearm = Rearm::Now;
        if live.is_some() {
            match (result, bid) {
                (len, _) if len >= 0 && (bid.is_some() || !self.udp.multishot) => {
                    self.backend_datagram(handle, bid, len as usize)
                }
                _ if result == -libc::ECONNREFUSED => {
                    // ICMP port unreachable from this flow's backend: only this flow ends.
                    self.end_flow(handle, FlowEnd::Failed);
                    self.update_udp_gauges();
                }
                _ => rearm = self.receive_failed(result),
            }
        }
        if let (Some(bid), Some(buffers)) = (bid, self.udp.buffers.as_mut()) {
            buffers.recycle(bid);
        }
        if self.is_stopping() {
            return;
        }
        let Some(flow) = self.udp.flows.get_mut(handle) else { return };
        if flow.armed {
            return;
        }
        match rearm {
            Rearm::Now => {
                stats::add(&self.counters.udp_recv_rearms, 1);
                self.arm_udp_flow(handle);
            }
            Rearm::AtTick => flow.rearm_at_tick = true,
        }
    }

    fn backend_datagram(&mut self, handle: FlowHandle, bid: Option<u16>, len: usize) {
        let sent = {
            let Some(buffers) = self.udp.buffers.as_ref() else { return };
            let multishot = self.udp.multishot;
            let Some(datagram) = received(buffers, self.udp.multishot_header, None, multishot, bid, len)
            else {
                return;
            };
            if datagram.truncated {
                stats::add(&self.counters.udp_drops_truncated, 1);
                return;
            }
            let Some(flow) = self.udp.flows.get(handle) else { return };
            let Some(vip) = self.udp.vips.get(flow.vip_slot as usize).and_then(|s| s.vip.as_ref()) else {
                return;
            };
            vip.socket.send_to(datagram.payload, &flow.client)
        };
        match sent {
            Ok(bytes) => {
                stats::add(&self.counters.udp_datagrams_backend_to_client, 1);
                stats::add(&self.counters.udp_bytes_backend_to_client, bytes as u64);
                self.udp.flows.touch(handle, self.now, true);
            }
            Err(_) => stats::add(&self.counters.udp_drops_send, 1),
        }
    }
}

/// When a receive that ended is armed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rearm {
    Now,
    AtTick,
}

/// Whether an existing flow must leave its backend (see [`StaleFlowPolicy`]).
fn flow_must_move(
    flows: &mut FlowTable<UdpFlow>,
    policy: StaleFlowPolicy,
    now: Instant,
    handle: FlowHandle,
    entry: &ServiceEntry,
) -> bool {
    let Some(flow) = flows.get_mut(handle) else { return false };
    // `backends` is sorted by id and `eligible` ascending (model invariants).
    let eligible = entry
        .backends
        .binary_search_by_key(&flow.backend, |b| b.id)
        .is_ok_and(|position| entry.eligible.binary_search(&(position as u32)).is_ok());
    if eligible {
        flow.stale_since = None;
        return false;
    }
    match policy {
        StaleFlowPolicy::Move => true,
        StaleFlowPolicy::Drain => {
            let since = *flow.stale_since.get_or_insert(now);
            now.saturating_duration_since(since) >= entry.policy.drain_timeout
        }
    }
}
