//! Handing the VIP sockets over to a new ringlb process (hot upgrade), and taking them over.
//!
//! Every VIP socket a worker opens (TCP and SCTP listeners, UDP VIP sockets) is a [`VipSocket`]:
//! its descriptor is in the process's [`SocketRegistry`] for as long as it is open, and leaves it
//! before it is closed, under the registry's lock. So [`SocketRegistry::with_open`] sees every
//! open VIP socket and none that is closed or reused meanwhile; the upgrade sends those
//! descriptors (`SCM_RIGHTS`) to the new process, which then holds the same sockets, with their
//! queues of connections and datagrams not yet taken. A new engine started with [`Inherited`]
//! sockets takes one for each VIP socket it would bind (same address and protocol) instead of
//! binding: nothing is closed in between, so no client is refused. Once the sockets are shared,
//! the old process must never `shutdown(2)` one (that ends listening for both): its listeners
//! then close by dropping their descriptor only, and its UDP VIP sockets stop receiving but stay
//! open for the replies of its flows (see `Shared::handed_over`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use lb_core::Protocol;
use socket2::Socket;

/// The open VIP sockets of this process, by descriptor. See the module doc.
#[derive(Debug, Default)]
pub struct SocketRegistry(Mutex<BTreeMap<RawFd, ()>>);

impl SocketRegistry {
    /// Calls `send` with every open VIP socket's descriptor; none is closed until it returns
    /// (a worker closing one waits for the lock), so each stays the socket it was.
    pub fn with_open<R>(&self, send: impl FnOnce(&[RawFd]) -> R) -> R {
        let open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fds: Vec<RawFd> = open.keys().copied().collect();
        send(&fds)
    }

    /// VIP sockets open now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A VIP socket, registered while open. Dereferences to the socket.
#[derive(Debug)]
pub(crate) struct VipSocket {
    socket: Option<Socket>,
    registry: Arc<SocketRegistry>,
}

impl VipSocket {
    pub fn new(socket: Socket, registry: &Arc<SocketRegistry>) -> VipSocket {
        registry.0.lock().unwrap_or_else(|e| e.into_inner()).insert(socket.as_raw_fd(), ());
        VipSocket { socket: Some(socket), registry: Arc::clone(registry) }
    }
}

impl Deref for VipSocket {
    type Target = Socket;

    fn deref(&self) -> &Socket {
        // Only `drop` takes it.
        self.socket.as_ref().expect("a VipSocket holds its socket until dropped")
    }
}

impl Drop for VipSocket {
    fn drop(&mut self) {
        let mut open = self.registry.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(socket) = self.socket.take() {
            open.remove(&socket.as_raw_fd());
            // Closed under the lock: the number cannot be reused and sent before it left.
            drop(socket);
        }
    }
}

/// Sockets received from the process this one upgrades, by what they are bound to. See the
/// module doc.
#[derive(Debug, Default)]
pub struct Inherited(Mutex<HashMap<(SocketAddr, Protocol), Vec<Socket>>>);

impl Inherited {
    /// Classifies `fds` by local address and protocol; a descriptor that is no bound TCP
    /// listener, UDP or SCTP socket is closed (and counted in the returned number).
    pub fn new(fds: Vec<OwnedFd>) -> (Inherited, usize) {
        let mut sockets: HashMap<(SocketAddr, Protocol), Vec<Socket>> = HashMap::new();
        let mut rejected = 0;
        for fd in fds {
            let socket = Socket::from(fd);
            match classify(&socket) {
                Some(key) => sockets.entry(key).or_default().push(socket),
                None => rejected += 1,
            }
        }
        (Inherited(Mutex::new(sockets)), rejected)
    }

    /// One inherited socket bound to `addr` for `protocol`, if any is left.
    pub(crate) fn take(&self, addr: SocketAddr, protocol: Protocol) -> Option<Socket> {
        let mut sockets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let left = sockets.get_mut(&(addr, protocol))?;
        let socket = left.pop();
        if left.is_empty() {
            sockets.remove(&(addr, protocol));
        }
        socket
    }

    /// Closes the inherited sockets no worker took (the old process had more workers, or served
    /// VIPs this one does not): a TCP listener's queued connections go with it. How many.
    pub fn close_unclaimed(&self) -> usize {
        let mut sockets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = sockets.values().map(Vec::len).sum();
        sockets.clear();
        count
    }
}

/// The VIP socket a worker needs on `addr` for `protocol`: an inherited one if there is one left,
/// else a fresh one from `bind`; registered either way.
pub(crate) fn open_vip_socket(
    shared: &crate::shared::Shared,
    addr: SocketAddr,
    protocol: Protocol,
    bind: impl FnOnce(SocketAddr) -> std::io::Result<Socket>,
) -> std::io::Result<VipSocket> {
    let inherited = shared.inherited.as_ref().and_then(|inherited| inherited.take(addr, protocol));
    let socket = match inherited {
        Some(socket) => socket,
        None => bind(addr)?,
    };
    Ok(VipSocket::new(socket, &shared.sockets))
}

/// What a received socket is bound to: TCP only when it listens.
fn classify(socket: &Socket) -> Option<(SocketAddr, Protocol)> {
    let addr = socket.local_addr().ok()?.as_socket()?;
    let protocol = match socket.protocol().ok().flatten()? {
        p if p == socket2::Protocol::TCP => {
            if !socket_flag(socket.as_raw_fd(), libc::SO_ACCEPTCONN) {
                return None;
            }
            Protocol::Tcp
        }
        p if p == socket2::Protocol::UDP => Protocol::Udp,
        p if i32::from(p) == libc::IPPROTO_SCTP => Protocol::Sctp,
        _ => return None,
    };
    // The worker sockets are non-blocking; the sender's were too, but do not rely on it.
    socket.set_nonblocking(true).ok()?;
    Some((addr, protocol))
}

fn socket_flag(fd: RawFd, option: libc::c_int) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a c_int we own.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    rc == 0 && value != 0
}

/// Takes ownership of descriptors received over a unix socket.
///
/// # Safety
/// Each fd must be open and owned by nobody else (as `SCM_RIGHTS` delivers them).
pub unsafe fn owned(fds: &[RawFd]) -> Vec<OwnedFd> {
    // SAFETY: the caller guarantees each fd is open and unowned.
    fds.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, UdpSocket};
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn received_sockets_are_classified_and_taken_once_and_other_descriptors_are_refused() {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let (tcp_addr, udp_addr) = (tcp.local_addr().expect("addr"), udp.local_addr().expect("addr"));
        let unconnected =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        let fds = [tcp.into_raw_fd(), udp.into_raw_fd(), unconnected.into_raw_fd()];
        // SAFETY: the fds were just released by their owners.
        let (inherited, rejected) = Inherited::new(unsafe { owned(&fds) });
        assert_eq!(rejected, 1, "a TCP socket that does not listen is no VIP socket");
        assert!(inherited.take(tcp_addr, Protocol::Udp).is_none());
        let listener = inherited.take(tcp_addr, Protocol::Tcp).expect("the listener");
        assert_eq!(listener.local_addr().expect("addr").as_socket(), Some(tcp_addr));
        assert!(inherited.take(tcp_addr, Protocol::Tcp).is_none(), "taken once");
        assert_eq!(inherited.close_unclaimed(), 1, "the UDP socket nobody took");
        assert!(inherited.take(udp_addr, Protocol::Udp).is_none());
    }

    #[test]
    fn the_registry_holds_exactly_the_open_vip_sockets() {
        let registry = Arc::new(SocketRegistry::default());
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
        let fd = socket.as_raw_fd();
        let vip = VipSocket::new(socket, &registry);
        assert_eq!(registry.with_open(<[RawFd]>::to_vec), [fd]);
        assert_eq!(vip.as_raw_fd(), fd);
        drop(vip);
        assert!(registry.is_empty());
    }
}
