//! The per-datagram path of the UDP datapath: a client datagram finds (or creates, or moves) its
//! flow and goes to the flow's backend; a backend datagram goes back to its client from the VIP socket.
//! On a wildcard VIP socket the datagram's destination address picks the VIP (and its entry); one to
//! an address that is no VIP of the port is dropped and counted.
//!
//! Runs once per completion; never allocates (payloads stay in the provided buffer they arrived in and
//! are sent from there, see `send`), never blocks. Invariant: every completion's buffer is recycled —
//! at once, or by the completion of the send that took it — whatever happens to its flow or VIP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use io_uring::cqueue;
use io_uring::types::RecvMsgOut;
use lb_core::{Established, LocalResource, Protocol, ProxyHeader, ServiceEntry, VipKey};
use socket2::SockAddr;

use super::Flows;
use super::flow_table::{FlowHandle, FlowKey, FlowTable, FlowTimeouts};
use super::socket::{self, BUFFER_SIZE, UpstreamError};
use super::{FlowEnd, SingleShotHeader, UdpFlow, count_end};
use crate::bufring::BufRing;
use crate::context::Ctx;
use crate::ring::UserData;
use crate::stats;
use crate::traffic::Refusal;

/// A datagram as received: its source (VIP sockets), destination (wildcard VIP sockets) and
/// payload, or why it cannot be used.
struct Received<'a> {
    source: Option<SocketAddr>,
    destination: Option<IpAddr>,
    payload: &'a [u8],
    truncated: bool,
}

fn received<'a>(
    buffers: &'a BufRing,
    multishot_header: &libc::msghdr,
    single_shot: Option<&SingleShotHeader>,
    multishot: bool,
    bid: Option<u16>,
    result: usize,
) -> Option<Received<'a>> {
    if multishot {
        let bid = bid?;
        let filled = buffers.filled(bid, result);
        let out = RecvMsgOut::parse(filled, multishot_header).ok()?;
        // `RecvMsgOut` lends its parts for its own lifetime; slice the payload from the buffer
        // itself (it follows the header and the fixed-size name and control fields).
        let start = socket::MULTISHOT_HEADER;
        let payload = filled.get(start..start + out.payload_data().len())?;
        Some(Received {
            source: socket::parse_sockaddr(out.name_data()),
            destination: socket::parse_destination(out.control_data()),
            payload,
            truncated: out.is_payload_truncated(),
        })
    } else {
        // MSG_TRUNC makes the result the datagram's real length, larger than the buffer if cut.
        let source = single_shot.map(|header| &header.name).and_then(|name| {
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
        let destination = single_shot.and_then(|header| socket::parse_destination(header.control()));
        Some(Received { source, destination, payload, truncated: result > BUFFER_SIZE })
    }
}

impl Flows {
    /// A completion of a VIP socket's receive: a client datagram (or the receive's end).
    pub(crate) fn on_vip_receive(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let stopping = ctx.stopping;
        let closing = self.vips.get_mut(data.slot, data.generation).map(|vip| {
            if !more {
                vip.armed = false;
            }
            vip.closing
        });
        // A receive that ended after a datagram is re-armed at once: single-shot ones always end, and a
        // multishot recvmsg ends after a zero-length datagram (the kernel takes 0 bytes for end of
        // stream).
        let mut rearm = Rearm::Now;
        let mut sending = false;
        if let Some(closing) = closing {
            match (result, bid) {
                (len, _) if len >= 0 && (bid.is_some() || !self.multishot) => {
                    if !closing && !stopping {
                        sending = self.client_datagram(ctx, data.slot, bid, len as usize);
                    }
                }
                _ => rearm = self.receive_failed(ctx, result),
            }
        }
        if let (Some(bid), Some(buffers), false) = (bid, self.buffers.as_mut(), sending) {
            buffers.recycle(bid);
        }
        let Some(vip) = self.vips.get_mut(data.slot, data.generation) else { return };
        if vip.armed {
            return;
        }
        if vip.closing {
            self.vips.remove(data.slot);
            self.update_gauges(ctx);
            return;
        }
        if !vip.receiving {
            return;
        }
        match rearm {
            Rearm::Now => {
                stats::add(&ctx.counters.udp_recv_rearms, 1);
                self.arm_vip(ctx, data.slot);
            }
            Rearm::AtTick => vip.rearm_at_tick = true,
        }
    }

    /// A receive ended without a datagram: decides when it is re-armed.
    fn receive_failed(&mut self, ctx: &mut Ctx<'_>, result: i32) -> Rearm {
        let errno = -result;
        if errno == libc::EINVAL && self.multishot {
            // Kernels before 6.0 reject IORING_RECV_MULTISHOT: fall back to single-shot receives.
            tracing::info!(worker = ctx.worker, "multishot recvmsg refused; using single-shot receives");
            self.multishot = false;
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
    /// Returns true if a send now owns the receive buffer.
    fn client_datagram(&mut self, ctx: &mut Ctx<'_>, vip_slot: u32, bid: Option<u16>, len: usize) -> bool {
        let (key, mut handle, payload) = {
            let Some(buffers) = self.buffers.as_ref() else { return false };
            let Some(vip) = self.vips.at(vip_slot) else {
                return false;
            };
            let multishot_header = self.multishot_header;
            let header = Some(&*vip.header);
            let Some(datagram) = received(buffers, multishot_header, header, self.multishot, bid, len) else {
                return false;
            };
            if datagram.truncated {
                stats::add(&ctx.counters.udp_drops_truncated, 1);
                return false;
            }
            let Some(client) = datagram.source else { return false };
            let vip_key = if crate::listener::is_wildcard(&vip.key) {
                let destination = datagram.destination.filter(|addr| vip.served.entry(*addr).is_some());
                let Some(destination) = destination else {
                    // An address of this host that is no VIP of the port.
                    stats::add(&ctx.counters.udp_drops_not_a_vip, 1);
                    return false;
                };
                VipKey::new(destination, vip.key.port, vip.key.protocol)
            } else {
                vip.key
            };
            let key = FlowKey { vip: vip_key, client };
            let handle = self.flows.find(&key);
            (key, handle, (datagram.payload.as_ptr(), datagram.payload.len()))
        };
        if let Some(existing) = handle {
            let entry = self.vips.at(vip_slot).and_then(|vip| vip.served.entry(key.vip.addr)).map(Arc::clone);
            if entry.is_some_and(|entry| flow_must_move(&mut self.flows, ctx.now, existing, &entry)) {
                self.end_flow(ctx, existing, FlowEnd::Moved);
                handle = None;
            }
        }
        let handle = match handle {
            Some(handle) => handle,
            None => match self.create_flow(ctx, vip_slot, key) {
                Some(handle) => handle,
                None => return false,
            },
        };
        match bid {
            Some(bid) => self.send_to_backend(ctx, handle, bid, payload.0, payload.1),
            None => {
                // A zero-length datagram of a single-shot receive has no buffer to send from.
                let sent = self.flows.get(handle).map(|flow| {
                    flow.upstream.send(flow.proxy_header.as_ref().map_or(&[][..], ProxyHeader::as_bytes))
                });
                if let Some(sent) = sent {
                    self.sent_to_backend(ctx, handle, sent);
                }
                false
            }
        }
    }

    /// Picks a backend for a new flow and opens its upstream socket (evicting the least recently
    /// used flow if the table is full).
    fn create_flow(&mut self, ctx: &mut Ctx<'_>, vip_slot: u32, key: FlowKey) -> Option<FlowHandle> {
        let vip = self.vips.at(vip_slot)?;
        let entry = vip.served.entry(key.vip.addr)?;
        if !entry.allows(key.client.ip()) {
            stats::add(&ctx.counters.udp_drops_source_range, 1);
            return None;
        }
        if ctx.draining {
            // Shutting down: established flows go on, new clients are not taken.
            stats::add(&ctx.counters.udp_drops_no_backend, 1);
            return None;
        }
        if !ctx.room.fits(self.descriptors(), 1) {
            stats::add(&ctx.counters.udp_drops_no_backend, 1);
            ctx.refuse_for_budget("a datagram of a new UDP flow was dropped");
            return None;
        }
        let vip = self.vips.at(vip_slot)?;
        let source = crate::listener::is_wildcard(&vip.key).then_some(key.vip.addr);
        let entry = vip.served.entry(key.vip.addr)?;
        let backend = ctx.selection.pick(ctx.now, entry, key.client, &[]).and_then(|idx| entry.backend(idx));
        let Some(backend) = backend else {
            stats::add(&ctx.counters.udp_drops_no_backend, 1);
            ctx.selection.refuse(entry.key, Refusal::NoBackend);
            return None;
        };
        let from_client = entry.policy.transparent.then_some(key.client);
        let upstream = match socket::connect_upstream(backend.addr(), from_client) {
            Ok(upstream) => upstream,
            Err(UpstreamError::Io(error)) => {
                stats::add(&ctx.counters.udp_drops_no_backend, 1);
                let errno = error.raw_os_error().unwrap_or(0);
                if let Some(resource) = LocalResource::of_errno(errno) {
                    ctx.local_failure(resource, "a UDP upstream socket", errno);
                }
                return None;
            }
            // Dropped rather than sent from the host's address (see `crate::transparent`).
            Err(UpstreamError::Transparent(error)) => {
                stats::add(&ctx.counters.udp_drops_no_backend, 1);
                ctx.transparent_failure(entry.key, error);
                return None;
            }
        };
        let proxy_header = ProxyHeader::encode(
            entry.policy.proxy_protocol,
            Protocol::Udp,
            key.client,
            key.vip.socket_addr(),
        );
        // Datagrams that each carry a header are not grouped (see `send`).
        let to_backend = if proxy_header.is_some() { 0 } else { socket::segment_limit(&upstream) };
        let mut load = ctx.selection.open(entry.key, backend, false, ctx.now, ctx.counters);
        load.created(ctx.now);
        let flow = UdpFlow {
            upstream,
            backend: backend.id,
            load,
            vip_slot,
            client: SockAddr::from(key.client),
            source,
            armed: false,
            rearm_at_tick: false,
            stale_since: None,
            fd_queued_at: None,
            proxy_header,
            open_sends: [None; 2],
            max_segment: [to_backend, socket::CLIENT_SEGMENT_LIMIT],
        };
        let timeouts = FlowTimeouts::of(&entry.policy);
        let (handle, evicted) = self.flows.insert(key, flow, ctx.now, timeouts);
        stats::add(&ctx.counters.flows_created, 1);
        if let Some(evicted) = evicted {
            count_end(ctx.counters, FlowEnd::Evicted);
            self.release_flow(ctx, evicted.handle, evicted.value);
        }
        self.arm_flow(ctx, handle);
        self.update_gauges(ctx);
        Some(handle)
    }

    fn sent_to_backend(&mut self, ctx: &mut Ctx<'_>, handle: FlowHandle, sent: std::io::Result<usize>) {
        match sent {
            Ok(bytes) => {
                stats::add(&ctx.counters.udp_datagrams_client_to_backend, 1);
                stats::add(&ctx.counters.udp_bytes_client_to_backend, bytes as u64);
                if let Some(flow) = self.flows.get_mut(handle) {
                    flow.load.cell().moved(true, bytes as u64, 1);
                }
                self.flows.touch(handle, ctx.now, false);
            }
            Err(err) => {
                stats::add(&ctx.counters.udp_drops_send, 1);
                if err.raw_os_error() == Some(libc::ECONNREFUSED) {
                    // An ICMP error answered an earlier datagram: this backend's port is closed.
                    self.end_flow(ctx, handle, FlowEnd::Failed);
                    self.update_gauges(ctx);
                }
            }
        }
    }

    /// A completion of a flow's upstream receive: a backend reply (or the receive's end).
    pub(crate) fn on_flow_receive(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        if !more {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let handle = FlowHandle { index: data.slot, generation: data.generation };
        let live = self.flows.get_mut(handle).map(|flow| {
            if !more {
                flow.armed = false;
            }
        });
        let mut rearm = Rearm::Now;
        let mut sending = false;
        if live.is_some() {
            match (result, bid) {
                (len, _) if len >= 0 && (bid.is_some() || !self.multishot) => {
                    sending = self.backend_datagram(ctx, handle, bid, len as usize)
                }
                _ if result == -libc::ECONNREFUSED => {
                    // ICMP port unreachable from this flow's backend: only this flow ends.
                    self.end_flow(ctx, handle, FlowEnd::Failed);
                    self.update_gauges(ctx);
                }
                _ => rearm = self.receive_failed(ctx, result),
            }
        }
        if let (Some(bid), Some(buffers), false) = (bid, self.buffers.as_mut(), sending) {
            buffers.recycle(bid);
        }
        if ctx.stopping {
            return;
        }
        let Some(flow) = self.flows.get_mut(handle) else { return };
        if flow.armed {
            return;
        }
        match rearm {
            Rearm::Now => {
                stats::add(&ctx.counters.udp_recv_rearms, 1);
                self.arm_flow(ctx, handle);
            }
            Rearm::AtTick => flow.rearm_at_tick = true,
        }
    }

    /// Sends a backend datagram to its flow's client. Returns true if a send now owns the buffer.
    fn backend_datagram(
        &mut self,
        ctx: &mut Ctx<'_>,
        handle: FlowHandle,
        bid: Option<u16>,
        len: usize,
    ) -> bool {
        let payload = {
            let Some(buffers) = self.buffers.as_ref() else { return false };
            let multishot = self.multishot;
            let Some(datagram) = received(buffers, self.multishot_header, None, multishot, bid, len) else {
                return false;
            };
            if datagram.truncated {
                stats::add(&ctx.counters.udp_drops_truncated, 1);
                return false;
            }
            (datagram.payload.as_ptr(), datagram.payload.len())
        };
        if let Some(bid) = bid {
            return self.send_to_client(ctx, handle, bid, payload.0, payload.1);
        }
        // A zero-length datagram of a single-shot receive has no buffer to send from. From a
        // wildcard socket it would need a control message naming the VIP: dropped (counted) instead.
        let sent = {
            let Some(flow) = self.flows.get(handle) else { return false };
            let Some(vip) = self.vips.at(flow.vip_slot) else {
                return false;
            };
            if flow.source.is_some() {
                Err(std::io::ErrorKind::Unsupported.into())
            } else {
                vip.socket.send_to(&[], &flow.client)
            }
        };
        match sent {
            Ok(_) => {
                stats::add(&ctx.counters.udp_datagrams_backend_to_client, 1);
                self.flows.touch(handle, ctx.now, true);
            }
            Err(_) => stats::add(&ctx.counters.udp_drops_send, 1),
        }
        false
    }
}

/// When a receive that ended is armed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rearm {
    Now,
    AtTick,
}

/// Whether an existing flow must leave its backend, as the entry decides (`ServiceEntry::flow`).
fn flow_must_move(
    flows: &mut FlowTable<UdpFlow>,
    now: Instant,
    handle: FlowHandle,
    entry: &ServiceEntry,
) -> bool {
    let Some(flow) = flows.get_mut(handle) else { return false };
    match entry.flow(flow.backend) {
        Established::Continue => {
            flow.stale_since = None;
            false
        }
        Established::Drain(limit) => {
            let since = *flow.stale_since.get_or_insert(now);
            now.saturating_duration_since(since) >= limit
        }
    }
}
