//! Sends of the UDP datapath through io_uring: a datagram leaves straight from the receive buffer it
//! arrived in (no copy), that buffer goes back to the kernel when the send completes, and every send of
//! one completion batch reaches the kernel with the next `io_uring_enter` instead of one syscall each.
//!
//! A buffer is in at most one send, so there is one [`SendSlot`] per buffer id, allocated once: the
//! `msghdr`, `iovec` and client address a `sendmsg` needs live there, at a fixed address, until the
//! send completes. Never allocates; never blocks. Invariant: a send's buffer is recycled exactly once,
//! by its completion (or at once if the send could not be submitted).

use std::os::fd::AsRawFd;

use io_uring::opcode;
use io_uring::types::Fd;

use super::flow_table::FlowHandle;
use super::{FlowEnd, UdpFlow};
use crate::ring::{OpKind, UserData};
use crate::stats;
use crate::worker::Worker;

/// `UserData::generation` of a send towards the flow's backend (`Send` on the upstream socket).
const TO_BACKEND: u32 = 0;
/// `UserData::generation` of a send towards the client (`SendMsg` from the VIP socket).
const TO_CLIENT: u32 = 1;

/// What one in-flight send of buffer `bid` needs to stay put.
struct SendSlot {
    header: libc::msghdr,
    iov: libc::iovec,
    address: libc::sockaddr_storage,
    flow: FlowHandle,
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
                iov: libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 },
                // SAFETY: as above.
                address: unsafe { std::mem::zeroed() },
                flow: FlowHandle { index: 0, generation: 0 },
            })
            .collect();
        SendSlots { slots }
    }
}

impl Worker {
    /// Sends `len` bytes at `payload` (inside receive buffer `bid`) to a flow's backend. Returns true
    /// if the send now owns the buffer (the caller must not recycle it).
    pub(super) fn send_to_backend(
        &mut self,
        flow: FlowHandle,
        bid: u16,
        payload: *const u8,
        len: usize,
    ) -> bool {
        let Some(upstream) = self.udp.flows.get(flow).map(|f| f.upstream.as_raw_fd()) else { return false };
        let Some(slot) = self.udp.sends.slots.get_mut(usize::from(bid)) else { return false };
        slot.flow = flow;
        let entry = opcode::Send::new(Fd(upstream), payload, len as u32)
            .build()
            .user_data(UserData::new(OpKind::UdpSend, u32::from(bid), TO_BACKEND).encode());
        // SAFETY: the payload lies in receive buffer `bid`, which is not recycled before this send's
        // completion; the kernel holds the socket's file while the send is in flight.
        let pushed = unsafe { self.ring.push(&entry) };
        self.udp.flows.touch(flow, self.now, false);
        self.submitted(pushed)
    }

    /// Sends `len` bytes at `payload` (inside receive buffer `bid`) from the flow's VIP socket to its
    /// client. Returns true if the send now owns the buffer.
    pub(super) fn send_to_client(
        &mut self,
        flow: FlowHandle,
        bid: u16,
        payload: *const u8,
        len: usize,
    ) -> bool {
        let Some(UdpFlow { vip_slot, client, .. }) = self.udp.flows.get(flow) else { return false };
        let Some(vip) = self.udp.vips.get(*vip_slot as usize).and_then(|s| s.vip.as_ref()) else {
            return false;
        };
        let Some(slot) = self.udp.sends.slots.get_mut(usize::from(bid)) else { return false };
        let name_len = (client.len() as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: copies the client's socket address (`name_len` initialised bytes) into the slot's
        // storage, which is at least as large; the two never overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                client.as_ptr().cast::<u8>(),
                (&mut slot.address as *mut libc::sockaddr_storage).cast::<u8>(),
                name_len,
            );
        }
        slot.flow = flow;
        slot.iov = libc::iovec { iov_base: payload.cast_mut().cast(), iov_len: len };
        slot.header.msg_name = (&mut slot.address as *mut libc::sockaddr_storage).cast();
        slot.header.msg_namelen = name_len as libc::socklen_t;
        slot.header.msg_iov = &mut slot.iov;
        slot.header.msg_iovlen = 1;
        let entry = opcode::SendMsg::new(Fd(vip.socket.as_raw_fd()), &slot.header)
            .build()
            .user_data(UserData::new(OpKind::UdpSend, u32::from(bid), TO_CLIENT).encode());
        // SAFETY: header, iovec and address live in the boxed send slot of buffer `bid`, and the payload
        // in that buffer; neither is reused before this send's completion. The kernel holds the VIP
        // socket's file while the send is in flight.
        let pushed = unsafe { self.ring.push(&entry) };
        self.udp.flows.touch(flow, self.now, true);
        self.submitted(pushed)
    }

    fn submitted(&mut self, pushed: std::io::Result<()>) -> bool {
        match pushed {
            Ok(()) => {
                self.udp.in_flight += 1;
                true
            }
            Err(_) => {
                stats::add(&self.counters.udp_drops_send, 1);
                false
            }
        }
    }

    /// A send completed: count it, hand its buffer back, and end the flow if the backend's port is
    /// closed (an ICMP error reported on the connected upstream socket).
    pub(crate) fn on_udp_send(&mut self, data: UserData, result: i32) {
        self.udp.in_flight = self.udp.in_flight.saturating_sub(1);
        let bid = data.slot as u16;
        if let Some(buffers) = self.udp.buffers.as_mut() {
            buffers.recycle(bid);
        }
        let to_backend = data.generation == TO_BACKEND;
        if result >= 0 {
            let (datagrams, bytes) = if to_backend {
                (&self.counters.udp_datagrams_client_to_backend, &self.counters.udp_bytes_client_to_backend)
            } else {
                (&self.counters.udp_datagrams_backend_to_client, &self.counters.udp_bytes_backend_to_client)
            };
            stats::add(datagrams, 1);
            stats::add(bytes, result as u64);
            return;
        }
        stats::add(&self.counters.udp_drops_send, 1);
        if to_backend && result == -libc::ECONNREFUSED {
            let Some(flow) = self.udp.sends.slots.get(usize::from(bid)).map(|s| s.flow) else { return };
            self.end_flow(flow, FlowEnd::Failed);
            self.update_udp_gauges();
        }
    }
}
