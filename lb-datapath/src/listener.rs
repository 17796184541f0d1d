//! Listening sockets: setup of one `SO_REUSEPORT` socket per worker and VIP key, and the worker's
//! table of them (a [`crate::slots::KeyedSlots`]).
//!
//! Every worker binds its own socket for every TCP key, so the kernel spreads new connections over
//! workers. A socket is bound with `IP_FREEBIND`/`IPV6_FREEBIND` so VIPs that are not (yet) local
//! addresses bind in appliance mode, and with `TCP_NODELAY`, which accepted sockets inherit.
//! Never panics on a bind failure: the caller logs it and retries at the next housekeeping tick.
//! Invariant: a listener slot is freed only once its accept operation has completed for the last
//! time (no `IORING_CQE_F_MORE`), so the kernel never accepts on a closed fd number.

use std::io;
use std::net::SocketAddr;

use io_uring::squeue::Entry;
use lb_core::VipKey;
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::ring::Ring;

/// Pending-connection queue length asked for (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Prepares a socket to bind a VIP `addr` of any protocol: the port is shared with the other
/// workers' sockets (`SO_REUSEPORT`), a VIP that is not a local address binds anyway (`FREEBIND`),
/// and an IPv6 VIP never takes the IPv4 space. TCP, UDP and SCTP VIP sockets all start here.
pub(crate) fn share_vip_port(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true),
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)
        }
    }
}

/// Opens a non-blocking listening socket for `addr` that shares the port with the other workers.
pub(crate) fn bind_listener(addr: SocketAddr) -> io::Result<Socket> {
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(SockProtocol::TCP))?;
    share_vip_port(&socket, addr)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// One worker's listening socket for one key.
pub(crate) struct Listener {
    pub key: VipKey,
    pub socket: Socket,
    /// An accept operation is in the kernel for this listener.
    pub armed: bool,
    /// The armed accept is multishot (keeps producing completions).
    pub multishot: bool,
    /// The key left the snapshot: no new accept is armed; the slot is freed once `armed` is false.
    pub closing: bool,
    /// The last accept failed with a resource error (e.g. `EMFILE`); re-arm at the next tick.
    pub rearm_at_tick: bool,
}

impl Listener {
    /// A listener for `key` on a freshly bound `socket`, not armed yet.
    pub fn new(key: VipKey, socket: Socket) -> Listener {
        Listener { key, socket, armed: false, multishot: false, closing: false, rearm_at_tick: false }
    }

    /// Queues `accept` and records it as armed; if the ring refuses it, the listener is left to be
    /// re-armed at the next housekeeping tick. Shared by the TCP and SCTP listeners.
    ///
    /// # Safety
    /// `accept` must be an accept on this listener's socket that passes no user memory, and the
    /// socket must stay open until the accept's final completion has been reaped.
    pub unsafe fn arm(&mut self, ring: &mut Ring, accept: &Entry, multishot: bool, worker: usize) {
        self.armed = true;
        self.multishot = multishot;
        self.rearm_at_tick = false;
        // SAFETY: forwarded to the caller (see this function's contract).
        if let Err(err) = unsafe { ring.push(accept) } {
            self.armed = false;
            self.rearm_at_tick = true;
            tracing::warn!(worker, key = %self.key, protocol = %self.key.protocol, error = %err, "cannot arm accept");
        }
    }
}

/// A worker's listening sockets (TCP or SCTP) by slot and key.
pub(crate) type ListenerTable = crate::slots::KeyedSlots<Listener>;

impl ListenerTable {
    /// Marks the listener in `index` closing (no accept is armed again, and its key is free to be
    /// bound anew); the slot is freed once its accept has completed for the last time.
    pub fn close(&mut self, index: u32) -> Option<&mut Listener> {
        self.retire(index);
        let generation = self.generation(index);
        let listener = self.get_mut(index, generation)?;
        listener.closing = true;
        Some(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_listeners_share_a_port_and_a_non_local_vip_binds() {
        let first = bind_listener("127.0.0.1:0".parse().expect("literal")).expect("bind");
        let addr = first.local_addr().expect("bound").as_socket().expect("inet");
        let second = bind_listener(addr);
        assert!(second.is_ok(), "SO_REUSEPORT must let a second worker bind {addr}: {second:?}");
        // 192.0.2.0/24 (TEST-NET-1) is never local; IP_FREEBIND makes the bind succeed anyway.
        let foreign = bind_listener("192.0.2.77:0".parse().expect("literal"));
        assert!(foreign.is_ok(), "IP_FREEBIND bind failed: {foreign:?}");
    }
}
