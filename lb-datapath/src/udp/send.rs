//! Sends of the UDP datapath through io_uring: a datagram leaves straight from the receive buffer it
//! arrived in (no copy), that buffer goes back to the kernel when the send completes, and every send of
//! one completion batch reaches the kernel with the next `io_uring_enter` instead of one syscall each.
//!
//! Datagrams of one flow and direction that arrive in the same completion batch leave as one
//! `sendmsg` with a `UDP_SEGMENT` control message (UDP GSO): the kernel builds one packet chain, walks
//! the IP stack once, and splits it back into the original datagrams (in software, in the NIC, or at a
//! local receiver), so datagram boundaries and order are kept exactly. A send is grown while it waits
//! in the submission queue: until the ring's next submission ([`Ring::submissions`] unchanged) the
//! kernel has not read its `msghdr`, so another iovec (and the segment size) can still be added.
//! GSO requires every segment but the last to have the first one's size, the last no larger, at most
//! [`MAX_SEGMENTS`] segments and [`MAX_SEND_BYTES`] bytes in all, and segments that fit the path MTU
//! unfragmented; any datagram that breaks a rule starts a new send, which keeps the order.
//!
//! A buffer is in at most one send, so there is one [`SendSlot`] per buffer id, allocated once; a send
//! lives in the slot of its first buffer (its head), which lists every buffer it carries. The `msghdr`,
//! iovecs, control message and client address live there, at a fixed address, until the send completes.
//! A reply from a wildcard VIP socket (see [`crate::listener`]) names its source, the VIP the client
//! sent to, in an `IP_PKTINFO`/`IPV6_PKTINFO` control message beside the segment size; a reply from
//! an exact VIP socket needs none (the socket is bound to the VIP).
//! A flow whose entry sends a PROXY protocol v2 header (see `lb_core::proxy_protocol`) sends each
//! datagram to its backend as two iovecs, the header (copied into the send's slot) then the payload,
//! and never groups them: a GSO segment after the first would reach the backend without a header.
//! Never allocates; never blocks. Invariant: each buffer of a send is recycled exactly once, by the
//! send's completion (or at once if the send could not be submitted).
//!
//! [`Ring::submissions`]: crate::ring::Ring::submissions

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use io_uring::opcode;
use io_uring::types::Fd;
use lb_core::ProxyHeader;
use socket2::SockAddr;

use super::Flows;
use super::flow_table::FlowHandle;
use super::{FlowEnd, UdpFlow};
use crate::context::Ctx;
use crate::dir::Dir;
use crate::ring::{OpKind, UserData};
use crate::stats;

/// Most datagrams one send carries: the kernel's `UDP_MAX_SEGMENTS` (64 before Linux 6.11, 128 since).
pub(crate) const MAX_SEGMENTS: usize = 64;
/// Most payload bytes one send carries: what fits one IPv4 packet (the GSO packet is one IP packet
/// until it is split).
pub(crate) const MAX_SEND_BYTES: usize = 65_507;

/// Room for a source address (`CMSG_SPACE(sizeof(in6_pktinfo))` is 40 on 64-bit Linux) and a
/// segment size (`CMSG_SPACE(2)`, 24), aligned for a `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// What one in-flight send headed by buffer `bid` needs to stay put, and what it carries.
struct SendSlot {
    header: libc::msghdr,
    iov: [libc::iovec; MAX_SEGMENTS],
    /// The receive buffers of the datagrams, in order (`bids[0]` is this slot's own buffer).
    bids: [u16; MAX_SEGMENTS],
    control: Control,
    address: libc::sockaddr_storage,
    /// The source address the send names (a reply from a wildcard VIP socket), if any.
    source: Option<IpAddr>,
    /// The PROXY protocol header `iov[0]` points at, if the datagram carries one (then `iov[1]` is
    /// the datagram).
    proxy: Option<ProxyHeader>,
    flow: FlowHandle,
    direction: Dir,
    /// Datagrams carried (iovecs and buffers in use).
    count: usize,
    /// Size of the first datagram: the GSO segment size once a second one joins.
    segment: usize,
    bytes: usize,
    /// Whether another datagram may still join (see the module doc for the rules).
    open: bool,
    /// `Ring::submissions` when the send was queued; it may grow only while that is unchanged.
    queued_at: u64,
}

impl SendSlot {
    /// Makes this (idle) slot a send of one datagram at `payload` (in its own buffer `bid`), queued at
    /// submission `queued_at`; it does not admit others until `open` is set.
    fn start(
        &mut self,
        flow: FlowHandle,
        direction: Dir,
        bid: u16,
        payload: *const u8,
        len: usize,
        queued_at: u64,
    ) {
        self.flow = flow;
        self.direction = direction;
        self.iov[0] = libc::iovec { iov_base: payload.cast_mut().cast(), iov_len: len };
        self.bids[0] = bid;
        self.count = 1;
        self.segment = len;
        self.bytes = len;
        self.open = false;
        self.queued_at = queued_at;
        self.header.msg_iov = self.iov.as_mut_ptr();
        self.header.msg_iovlen = 1;
        self.header.msg_control = std::ptr::null_mut();
        self.header.msg_controllen = 0;
        self.source = None;
        self.proxy = None;
    }

    /// Puts `proxy` before the single datagram of this (just started) send, from the slot's own
    /// copy of it; nothing may join the send afterwards (see the module doc).
    fn prefix(&mut self, proxy: ProxyHeader) {
        let payload = self.iov[0];
        let proxy = self.proxy.insert(proxy).as_bytes();
        self.iov[0] = libc::iovec { iov_base: proxy.as_ptr().cast_mut().cast(), iov_len: proxy.len() };
        self.iov[1] = payload;
        self.header.msg_iovlen = 2;
        self.bytes += proxy.len();
        self.open = false;
    }

    /// Addresses the send to `client` (from an unconnected VIP socket), or to nobody (a connected
    /// upstream socket), from `source` if given (a wildcard VIP socket).
    fn address(&mut self, client: Option<&SockAddr>, source: Option<IpAddr>) {
        self.source = source;
        if source.is_some() {
            self.write_control();
        }
        let Some(client) = client else {
            self.header.msg_name = std::ptr::null_mut();
            self.header.msg_namelen = 0;
            return;
        };
        let name_len = (client.len() as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: copies the client's socket address (`name_len` initialised bytes) into the slot's
        // storage, which is at least as large; the two never overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                client.as_ptr().cast::<u8>(),
                (&mut self.address as *mut libc::sockaddr_storage).cast::<u8>(),
                name_len,
            );
        }
        self.header.msg_name = (&mut self.address as *mut libc::sockaddr_storage).cast();
        self.header.msg_namelen = name_len as libc::socklen_t;
    }

    /// Whether `len` more bytes of `flow` going `direction` may join this send before submission
    /// `now`.
    fn admits(&self, flow: FlowHandle, direction: Dir, now: u64, len: usize) -> bool {
        self.open
            && self.proxy.is_none()
            && self.queued_at == now
            && self.flow == flow
            && self.direction == direction
            && self.count < MAX_SEGMENTS
            && len > 0
            && len <= self.segment
            && self.bytes + len <= MAX_SEND_BYTES
    }

    /// Adds a datagram at `payload` (in buffer `bid`) to this queued send: one more iovec, and the
    /// segment size once there are two.
    fn join(&mut self, bid: u16, payload: *const u8, len: usize) {
        self.iov[self.count] = libc::iovec { iov_base: payload.cast_mut().cast(), iov_len: len };
        self.bids[self.count] = bid;
        self.count += 1;
        if self.count == 2 {
            self.write_control();
        }
        self.bytes += len;
        self.header.msg_iovlen = self.count;
        // A shorter datagram can only be the last segment.
        self.open = len == self.segment;
    }

    /// Writes the control messages the send needs, the source address (if any) and the
    /// `UDP_SEGMENT` size (the first datagram's, once there are two), and points the header at them.
    fn write_control(&mut self) {
        let pktinfo = match self.source {
            Some(IpAddr::V4(_)) => std::mem::size_of::<libc::in_pktinfo>(),
            Some(IpAddr::V6(_)) => std::mem::size_of::<libc::in6_pktinfo>(),
            None => 0,
        };
        let segmented = self.count > 1;
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let space = |len: usize| unsafe { libc::CMSG_SPACE(len as u32) } as usize;
        let total = if pktinfo > 0 { space(pktinfo) } else { 0 }
            + if segmented { space(std::mem::size_of::<u16>()) } else { 0 };
        debug_assert!(total <= std::mem::size_of::<Control>());
        self.control.0 = [0; std::mem::size_of::<Control>()];
        if total == 0 {
            self.header.msg_control = std::ptr::null_mut();
            self.header.msg_controllen = 0;
            return;
        }
        self.header.msg_control = self.control.0.as_mut_ptr().cast();
        self.header.msg_controllen = total;
        // SAFETY: the header's control buffer is `self.control`, zeroed, aligned for a cmsghdr and
        // `total` (at most its size) bytes long, the sum of the CMSG_SPACE of each message written:
        // CMSG_FIRSTHDR/CMSG_NXTHDR return pointers inside it with room for each header and its data
        // (or null, checked).
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&self.header);
            if let (Some(source), false) = (self.source, cmsg.is_null()) {
                match source {
                    IpAddr::V4(addr) => {
                        (*cmsg).cmsg_level = libc::IPPROTO_IP;
                        (*cmsg).cmsg_type = libc::IP_PKTINFO;
                        (*cmsg).cmsg_len = libc::CMSG_LEN(pktinfo as u32) as usize;
                        let info = libc::in_pktinfo {
                            ipi_ifindex: 0,
                            ipi_spec_dst: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
                            ipi_addr: libc::in_addr { s_addr: 0 },
                        };
                        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(), info);
                    }
                    IpAddr::V6(addr) => {
                        (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                        (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                        (*cmsg).cmsg_len = libc::CMSG_LEN(pktinfo as u32) as usize;
                        let info = libc::in6_pktinfo {
                            ipi6_addr: libc::in6_addr { s6_addr: addr.octets() },
                            ipi6_ifindex: 0,
                        };
                        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>(), info);
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&self.header, cmsg);
            }
            if segmented && !cmsg.is_null() {
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
                // `segment` <= MAX_SEND_BYTES < 65 536.
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), self.segment as u16);
            }
        }
    }
}

/// One [`SendSlot`] per receive buffer; boxed once, never resized, so the kernel's pointers hold.
pub(crate) struct SendSlots {
    slots: Box<[SendSlot]>,
}

impl SendSlots {
    pub fn new(count: usize) -> SendSlots {
        let slots = (0..count)
            .map(|_| SendSlot {
                // SAFETY: msghdr, iovec and sockaddr_storage are plain data; all-zero is valid.
                header: unsafe { std::mem::zeroed() },
                iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_SEGMENTS],
                bids: [0; MAX_SEGMENTS],
                control: Control([0; 64]),
                // SAFETY: as above.
                address: unsafe { std::mem::zeroed() },
                source: None,
                proxy: None,
                flow: FlowHandle { index: 0, generation: 0 },
                direction: Dir::ToBackend,
                count: 0,
                segment: 0,
                bytes: 0,
                open: false,
                queued_at: 0,
            })
            .collect();
        SendSlots { slots }
    }
}

impl Flows {
    /// Sends `len` bytes at `payload` (inside receive buffer `bid`) to a flow's backend. Returns true
    /// if a send now owns the buffer (the caller must not recycle it).
    pub(super) fn send_to_backend(
        &mut self,
        ctx: &mut Ctx<'_>,
        flow: FlowHandle,
        bid: u16,
        payload: *const u8,
        len: usize,
    ) -> bool {
        self.send_datagram(ctx, Dir::ToBackend, flow, bid, payload, len)
    }

    /// Sends `len` bytes at `payload` (inside receive buffer `bid`) from the flow's VIP socket to its
    /// client. Returns true if a send now owns the buffer.
    pub(super) fn send_to_client(
        &mut self,
        ctx: &mut Ctx<'_>,
        flow: FlowHandle,
        bid: u16,
        payload: *const u8,
        len: usize,
    ) -> bool {
        self.send_datagram(ctx, Dir::ToClient, flow, bid, payload, len)
    }

    /// Adds the datagram to the flow's queued send in `direction` if it may join (see the module
    /// doc), else queues a new send headed by its buffer.
    fn send_datagram(
        &mut self,
        ctx: &mut Ctx<'_>,
        direction: Dir,
        handle: FlowHandle,
        bid: u16,
        payload: *const u8,
        len: usize,
    ) -> bool {
        let now = ctx.ring.submissions();
        let to_client = direction == Dir::ToClient;
        let Some(flow) = self.flows.get_mut(handle) else { return false };
        let open = &mut flow.open_sends[direction.index()];
        if let Some(slot) = open.and_then(|head| self.sends.slots.get_mut(usize::from(head)))
            && slot.admits(handle, direction, now, len)
        {
            slot.join(bid, payload, len);
            if !slot.open {
                *open = None;
            }
            self.flows.touch(handle, ctx.now, to_client);
            return true;
        }
        *open = None;
        let max_segment = usize::from(flow.max_segment[direction.index()]);
        let proxy = if direction == Dir::ToBackend { flow.proxy_header } else { None };
        let (fd, client, source) = match direction {
            Dir::ToBackend => (flow.upstream.as_raw_fd(), None, None),
            Dir::ToClient => {
                let Some(vip) = self.vips.at(flow.vip_slot) else {
                    return false;
                };
                (vip.socket.as_raw_fd(), Some(&flow.client), flow.source)
            }
        };
        let Some(slot) = self.sends.slots.get_mut(usize::from(bid)) else { return false };
        slot.start(handle, direction, bid, payload, len, now);
        slot.address(client, source);
        if let Some(proxy) = proxy {
            slot.prefix(proxy);
        }
        let entry = opcode::SendMsg::new(Fd(fd), &slot.header)
            .build()
            .user_data(UserData::new(OpKind::UdpSend, u32::from(bid), direction.index() as u32).encode());
        // SAFETY: header, iovecs, control message and address live in the boxed send slot of buffer
        // `bid`, the payloads in the buffers the slot lists; none is reused before this send's
        // completion, and they change only before the next submission (module doc). The kernel holds
        // the socket's file while the send is in flight.
        let pushed = unsafe { ctx.ring.push(&entry) };
        let queued = self.submitted(ctx, pushed);
        // Only a send still waiting in the queue may grow (`push` submits when the queue is full).
        let joinable =
            queued && proxy.is_none() && len > 0 && len <= max_segment && ctx.ring.submissions() == now;
        if let Some(slot) = self.sends.slots.get_mut(usize::from(bid)) {
            slot.open = joinable;
        }
        if let (true, Some(flow)) = (queued, self.flows.get_mut(handle)) {
            if direction == Dir::ToBackend {
                flow.fd_queued_at = Some(now);
            }
            if joinable {
                flow.open_sends[direction.index()] = Some(bid);
            }
        }
        self.flows.touch(handle, ctx.now, to_client);
        queued
    }

    fn submitted(&mut self, ctx: &mut Ctx<'_>, pushed: std::io::Result<()>) -> bool {
        match pushed {
            Ok(()) => {
                self.in_flight += 1;
                true
            }
            Err(_) => {
                stats::add(&ctx.counters.udp_drops_send, 1);
                false
            }
        }
    }

    /// A send completed: count its datagrams, hand their buffers back, end the flow if the backend's
    /// port is closed (an ICMP error reported on the connected upstream socket), and stop grouping a
    /// flow's datagrams if the kernel refused a grouped send.
    pub(crate) fn on_send(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(slot) = self.sends.slots.get_mut(data.slot as usize) else { return };
        let (flow, count) = (slot.flow, slot.count.max(1));
        // A slot is reused only after this completion; mark it empty so nothing joins it meanwhile.
        slot.open = false;
        if let Some(buffers) = self.buffers.as_mut() {
            buffers.recycle_all(&slot.bids[..count]);
        }
        let direction = Dir::from_index(data.generation);
        let to_backend = direction == Dir::ToBackend;
        if result >= 0 {
            let (datagrams, bytes) = if to_backend {
                (&ctx.counters.udp_datagrams_client_to_backend, &ctx.counters.udp_bytes_client_to_backend)
            } else {
                (&ctx.counters.udp_datagrams_backend_to_client, &ctx.counters.udp_bytes_backend_to_client)
            };
            stats::add(datagrams, count as u64);
            stats::add(bytes, result as u64);
            if let Some(UdpFlow { load, .. }) = self.flows.get_mut(flow) {
                load.cell().moved(to_backend, result as u64, count as u64);
            }
            stats::add(&ctx.counters.udp_sends, 1);
            return;
        }
        stats::add(&ctx.counters.udp_drops_send, count as u64);
        if to_backend && result == -libc::ECONNREFUSED {
            self.end_flow(ctx, flow, FlowEnd::Failed);
            self.update_gauges(ctx);
        } else if count > 1 && matches!(-result, libc::EMSGSIZE | libc::EINVAL | libc::EIO) {
            // The path MTU shrank below the segment size, or the route cannot segment (IPsec): send
            // this flow's datagrams one by one from now on.
            if let Some(UdpFlow { max_segment, .. }) = self.flows.get_mut(flow) {
                max_segment[direction.index()] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dir::Dir as Direction;

    fn queued(len: usize, max_segment: usize) -> SendSlot {
        let mut slot = SendSlots::new(1).slots.into_vec().pop().expect("one slot");
        slot.start(FLOW, Direction::ToBackend, 0, std::ptr::null(), len, 7);
        // As `send_datagram` decides once the send is queued.
        slot.open = len > 0 && len <= max_segment;
        slot
    }

    const FLOW: FlowHandle = FlowHandle { index: 3, generation: 1 };

    #[test]
    fn only_same_flow_direction_and_submission_join() {
        let slot = queued(100, 1400);
        assert!(slot.admits(FLOW, Direction::ToBackend, 7, 100));
        assert!(!slot.admits(FLOW, Direction::ToBackend, 8, 100), "already submitted");
        assert!(!slot.admits(FLOW, Direction::ToClient, 7, 100));
        assert!(!slot.admits(FlowHandle { index: 3, generation: 2 }, Direction::ToBackend, 7, 100));
    }

    #[test]
    fn segments_are_equal_but_the_last_which_may_be_shorter() {
        let mut slot = queued(100, 1400);
        assert!(!slot.admits(FLOW, Direction::ToBackend, 7, 101), "larger than the segment size");
        assert!(!slot.admits(FLOW, Direction::ToBackend, 7, 0), "an empty datagram is no segment");
        slot.join(1, std::ptr::null(), 100);
        assert_eq!((slot.count, slot.header.msg_iovlen, slot.header.msg_controllen > 0), (2, 2, true));
        slot.join(2, std::ptr::null(), 40);
        assert!(!slot.admits(FLOW, Direction::ToBackend, 7, 40), "a shorter datagram was the last");
        assert_eq!((slot.count, slot.bytes, &slot.bids[..3]), (3, 240, &[0, 1, 2][..]));
    }

    #[test]
    fn a_prefixed_datagram_is_header_then_payload_and_nothing_joins_it() {
        let payload = [7u8; 100];
        let mut slot = queued(100, 1400);
        slot.iov[0].iov_base = payload.as_ptr().cast_mut().cast();
        let (client, vip) = ("10.0.0.1:5000".parse().unwrap(), "10.0.0.2:53".parse().unwrap());
        let proxy = ProxyHeader::encode(lb_core::ProxyProtocol::V2, lb_core::Protocol::Udp, client, vip)
            .expect("v2 has a UDP header");
        slot.prefix(proxy);
        assert_eq!((slot.header.msg_iovlen, slot.count, slot.bytes), (2, 1, 128));
        assert_eq!(
            slot.iov[0].iov_base.cast_const(),
            slot.proxy.as_ref().unwrap().as_bytes().as_ptr().cast()
        );
        assert_eq!(slot.iov[0].iov_len, 28);
        assert_eq!((slot.iov[1].iov_base.cast_const(), slot.iov[1].iov_len), (payload.as_ptr().cast(), 100));
        slot.open = true;
        assert!(!slot.admits(FLOW, Direction::ToBackend, 7, 100), "a segment would go without a header");
    }

    #[test]
    fn sends_stop_growing_at_the_segment_and_byte_limits_and_the_path_mtu() {
        assert!(!queued(1500, 1472).open, "a datagram larger than the path allows is sent alone");
        let mut slot = queued(64, 1400);
        for bid in 1..MAX_SEGMENTS as u16 {
            assert!(slot.admits(FLOW, Direction::ToBackend, 7, 64));
            slot.join(bid, std::ptr::null(), 64);
        }
        assert!(!slot.admits(FLOW, Direction::ToBackend, 7, 64), "{MAX_SEGMENTS} segments at most");
        let mut slot = queued(30_000, 65_000);
        slot.join(1, std::ptr::null(), 30_000);
        assert!(!slot.admits(FLOW, Direction::ToBackend, 7, 30_000), "{MAX_SEND_BYTES} bytes at most");
    }
}
