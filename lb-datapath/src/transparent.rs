//! Transparent backend sockets: for an entry whose policy says `transparent`, the backend TCP
//! connect and the UDP upstream socket leave from the client's own IP address, so the backend sees
//! the client as the source, as if there were no proxy in between.
//!
//! The socket gets `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), which lets it bind an address that is not
//! local (and needs `CAP_NET_ADMIN` or `CAP_NET_RAW`), and is bound to the client's IP with port 0:
//! the kernel picks the port. The client's own port would keep the whole 4-tuple but collides as
//! soon as one client reaches one backend twice (through two VIPs, or two ports of one Service, or
//! through the load balancer and directly past it), and the TIME_WAIT of a connection the load
//! balancer closed first would block the client's next connection from that port. For TCP,
//! `IP_BIND_ADDRESS_NO_PORT` defers the port to the connect, which then only needs its 4-tuple to
//! be free (as for any connect), not a port free on that address for every destination.
//!
//! Invariants: a transparent entry never falls back to the load balancer's address (its backends
//! would silently see the wrong client); every failure here is the host's (privilege, a client
//! address that cannot be used), never the backend's: counted apart, never a backend event.
//! Getting the backend's replies, addressed to the client, to this socket is the host's policy
//! routing (README "Transparent mode"), not this module's.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::Socket;

/// Why a backend socket could not be bound to its client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransparentError {
    /// `IP_TRANSPARENT` was refused: the process lacks `CAP_NET_ADMIN` and `CAP_NET_RAW`.
    Denied,
    /// The client's address is unknown (it left before the accept was served) or of another
    /// family than the backend's.
    NoClientAddress,
    /// The bind to the client's address failed (the errno says why).
    Bind(i32),
}

impl TransparentError {
    /// The errno to log with it.
    pub fn errno(self) -> i32 {
        match self {
            TransparentError::Denied => libc::EPERM,
            TransparentError::NoClientAddress => libc::EAFNOSUPPORT,
            TransparentError::Bind(errno) => errno,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            TransparentError::Denied => {
                "IP_TRANSPARENT refused: ringlb needs CAP_NET_ADMIN or CAP_NET_RAW for transparent Services"
            }
            TransparentError::NoClientAddress => "the client's address is unknown or of another family",
            TransparentError::Bind(_) => "cannot bind the backend socket to the client's address",
        }
    }
}

/// Makes `socket` (fresh, unbound, of `backend`'s family) leave from `client`'s IP: see the
/// module doc. `stream`: a TCP socket, whose port is then chosen at the connect.
pub(crate) fn bind_to_client(
    socket: &Socket,
    client: SocketAddr,
    backend: SocketAddr,
    stream: bool,
) -> Result<(), TransparentError> {
    let client = SocketAddr::new(client.ip().to_canonical(), 0);
    if client.ip().is_unspecified() || client.is_ipv4() != backend.is_ipv4() {
        return Err(TransparentError::NoClientAddress);
    }
    let transparent = if client.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    };
    transparent.map_err(|error| match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TransparentError::Denied,
        errno => TransparentError::Bind(errno.unwrap_or(libc::EINVAL)),
    })?;
    if stream {
        // Without it the bind would take a port free on the client's address for every
        // destination; refused only by kernels before 4.2, which then do just that.
        let _ = set_bind_address_no_port(socket);
    }
    socket.bind(&client.into()).map_err(|error| TransparentError::Bind(error.raw_os_error().unwrap_or(0)))
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` outlives the call, which only reads `size_of::<c_int>()` bytes of it; the
    // descriptor is owned by `socket`. IPPROTO_IP options apply to IPv6 sockets too.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Type};

    fn stream(domain: Domain) -> Socket {
        Socket::new(domain, Type::STREAM, None).expect("socket")
    }

    #[test]
    fn an_unknown_client_or_one_of_another_family_is_refused_before_any_socket_option() {
        let backend: SocketAddr = "192.0.2.10:80".parse().expect("literal");
        let socket = stream(Domain::IPV4);
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        assert_eq!(bind_to_client(&socket, unknown, backend, true), Err(TransparentError::NoClientAddress));
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().expect("literal");
        assert_eq!(bind_to_client(&socket, v6, backend, true), Err(TransparentError::NoClientAddress));
        assert!(socket.local_addr().expect("local").as_socket().is_some_and(|a| a.port() == 0), "unbound");
    }

    #[test]
    fn without_cap_net_admin_and_cap_net_raw_the_socket_is_denied_not_bound() {
        let denied = testkit::capabilities::without_network_admin(|| {
            let socket = stream(Domain::IPV4);
            let (client, backend) = ("198.51.100.7:40000".parse().unwrap(), "192.0.2.10:80".parse().unwrap());
            let result = bind_to_client(&socket, client, backend, true);
            (result, socket.local_addr().ok().and_then(|a| a.as_socket()))
        });
        assert_eq!(denied.0, Err(TransparentError::Denied));
        assert!(denied.1.is_some_and(|local| local.ip().is_unspecified()), "left unbound: {:?}", denied.1);
    }

    #[test]
    fn with_the_privilege_the_socket_is_bound_to_the_client_ip_and_a_kernel_chosen_port() {
        // The tests run as root (CAP_NET_ADMIN): a non-local address binds. A v4-mapped client
        // of an IPv4 backend is the IPv4 client.
        let backend: SocketAddr = "192.0.2.10:80".parse().expect("literal");
        let client: SocketAddr = "[::ffff:198.51.100.7]:40000".parse().expect("literal");
        let socket = stream(Domain::IPV4);
        assert_eq!(bind_to_client(&socket, client, backend, true), Ok(()));
        let local = socket.local_addr().expect("local").as_socket().expect("inet");
        assert_eq!(local.ip().to_string(), "198.51.100.7");
        assert_eq!(local.port(), 0, "IP_BIND_ADDRESS_NO_PORT: the port is the connect's to choose");
        let udp = Socket::new(Domain::IPV6, Type::DGRAM, None).expect("socket");
        let (client, backend) =
            ("[2001:db8::7]:4000".parse().unwrap(), "[2001:db8:1::10]:53".parse().unwrap());
        assert_eq!(bind_to_client(&udp, client, backend, false), Ok(()));
        let local = udp.local_addr().expect("local").as_socket().expect("inet");
        assert_eq!(local.ip().to_string(), "2001:db8::7");
        assert_ne!(local.port(), 0, "a UDP bind takes its port at once, the kernel's choice");
    }
}
