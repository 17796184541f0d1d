//! UDP sockets and receive memory: the per-worker VIP sockets (`SO_REUSEPORT`, `IP_FREEBIND`; on
//! the wildcard address also `IP_PKTINFO`/`IPV6_RECVPKTINFO`, so each datagram tells the VIP it
//! was sent to), the connected upstream socket of each flow, and the size of the provided buffers
//! ([`crate::bufring`]) every UDP receive of a worker draws from.
//!
//! The kernel picks a free buffer per datagram, so memory does not grow with the number of flows
//! (65 536 idle flows cost no receive memory). A buffer is handed back as soon as its completion is
//! handled, whether or not its flow still exists.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::transparent::{self, TransparentError};

/// Largest UDP payload (IPv6 without jumbograms: 65 535 − 8; IPv4 allows 65 507).
pub(crate) const MAX_DATAGRAM: usize = 65_527;
/// Control data room of every VIP receive: one `IP_PKTINFO` or `IPV6_PKTINFO` message (the
/// destination address on a wildcard socket; exact sockets do not ask for it, the room stays empty).
pub(crate) const CONTROL_SPACE: usize = 64;
/// Bytes the kernel puts before the payload of a multishot `recvmsg`: `io_uring_recvmsg_out`, a
/// name field sized like the template's `msg_namelen` and a control field of its `msg_controllen`.
pub(crate) const MULTISHOT_HEADER: usize = 16 + std::mem::size_of::<libc::sockaddr_storage>() + CONTROL_SPACE;
/// One receive buffer: header plus the largest datagram, rounded up to whole pages.
pub(crate) const BUFFER_SIZE: usize = (MULTISHOT_HEADER + MAX_DATAGRAM).next_multiple_of(4096);
/// Buffer group id of the worker's UDP buffer ring (one group per ring).
pub(crate) const BUFFER_GROUP: u16 = 0;

// A buffer holds the largest datagram after its header, and its length fits an `io_uring_buf`.
const _: () = assert!(BUFFER_SIZE - MULTISHOT_HEADER >= MAX_DATAGRAM && BUFFER_SIZE <= u32::MAX as usize);

/// Opens a non-blocking UDP socket bound to a VIP that shares the port with the other workers.
/// Bound to the exact VIP, so replies sent from it carry the VIP as source address.
pub(crate) fn bind_vip(addr: SocketAddr) -> io::Result<Socket> {
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking().cloexec(), Some(SockProtocol::UDP))?;
    crate::listener::share_vip_port(&socket, addr)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Opens a VIP socket like [`bind_vip`] on a wildcard address (`0.0.0.0:port`, `[::]:port`) that
/// reports each datagram's destination address (the VIP) in an `IP_PKTINFO`/`IPV6_PKTINFO` control
/// message; replies from it name their source address in one too (see `send`).
pub(crate) fn bind_wildcard(addr: SocketAddr) -> io::Result<Socket> {
    let socket = bind_vip(addr)?;
    let (level, name) = match addr {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    };
    let on: libc::c_int = 1;
    // SAFETY: passes a valid c_int option value and its size for an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// The destination address in the control data of a received datagram (its `IP_PKTINFO` or
/// `IPV6_PKTINFO` message), read without trusting the kernel's layout beyond the bytes given.
pub(crate) fn parse_destination(control: &[u8]) -> Option<IpAddr> {
    const HEADER: usize = std::mem::size_of::<libc::cmsghdr>();
    const ALIGN: usize = std::mem::size_of::<usize>();
    let mut offset = 0;
    while let Some(header) = control.get(offset..offset + HEADER) {
        let len = usize::from_ne_bytes(header[..ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(header[ALIGN..ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(header[ALIGN + 4..ALIGN + 8].try_into().ok()?);
        let data = control.get(offset + HEADER..offset + len)?;
        match (level, kind) {
            // in_pktinfo: interface index, local address, then the header's destination address.
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                let octets: [u8; 4] = data.get(8..12)?.try_into().ok()?;
                return Some(IpAddr::V4(Ipv4Addr::from(octets)));
            }
            // in6_pktinfo: the destination address, then the interface index.
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                let octets: [u8; 16] = data.get(0..16)?.try_into().ok()?;
                return Some(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            _ => {}
        }
        if len < HEADER {
            return None;
        }
        offset += len.next_multiple_of(ALIGN);
    }
    None
}

/// Sets a VIP socket's receive buffer to `bytes` (0: leave the kernel default): `SO_RCVBUFFORCE`,
/// which passes `net.core.rmem_max` (needs `CAP_NET_ADMIN`), else `SO_RCVBUF`, which the kernel caps
/// at `rmem_max`. The buffer absorbs bursts that arrive while the worker is not running.
pub(crate) fn set_receive_buffer(socket: &Socket, bytes: usize) -> io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    // The kernel doubles the value for its bookkeeping and takes an int.
    let value = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX / 2);
    // SAFETY: passes a valid c_int option value and its size for an open socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    socket.set_recv_buffer_size(bytes / 2)
}

/// A non-blocking UDP socket connected to `backend`: only that backend's datagrams reach it, and an
/// ICMP error about it (port unreachable) is reported on it alone. With `from_client` (a
/// transparent entry) it leaves from that client's IP (see `crate::transparent`).
pub(crate) fn connect_upstream(
    backend: SocketAddr,
    from_client: Option<SocketAddr>,
) -> Result<Socket, UpstreamError> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM.nonblocking().cloexec(),
        Some(SockProtocol::UDP),
    )?;
    if let Some(client) = from_client {
        transparent::bind_to_client(&socket, client, backend, false).map_err(UpstreamError::Transparent)?;
    }
    socket.connect(&backend.into())?;
    Ok(socket)
}

/// Why a flow's upstream socket could not be made.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The socket or its connect failed (a local shortage, or the backend unroutable).
    Io(io::Error),
    /// A transparent entry's socket could not be bound to the client's address.
    Transparent(TransparentError),
}

impl From<io::Error> for UpstreamError {
    fn from(error: io::Error) -> Self {
        UpstreamError::Io(error)
    }
}

/// Largest datagram sent to a client that may be a GSO segment: fits the minimum IPv6 MTU (1280)
/// and any IPv4 path of at least 1260 bytes with its headers, so grouping never turns a datagram that
/// would have been fragmented into an error. The VIP socket is not connected, so its path MTU to each
/// client is unknown; larger replies leave one by one.
pub(crate) const CLIENT_SEGMENT_LIMIT: u16 = 1232;

/// Largest datagram a connected upstream socket may send as a GSO segment: its path MTU less the IP
/// and UDP headers (the kernel refuses a segment that would need IP fragmentation). 0 (never group)
/// if the MTU cannot be read.
pub(crate) fn segment_limit(upstream: &Socket) -> u16 {
    let (level, name, headers) = match upstream.local_addr().ok().and_then(|a| a.as_socket()) {
        Some(SocketAddr::V4(_)) => (libc::IPPROTO_IP, libc::IP_MTU, 20 + 8),
        Some(SocketAddr::V6(_)) => (libc::IPPROTO_IPV6, libc::IPV6_MTU, 40 + 8),
        None => return 0,
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `mtu` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(upstream.as_raw_fd(), level, name, (&mut mtu as *mut libc::c_int).cast(), &mut len)
    };
    if rc != 0 {
        return 0;
    }
    let limit = usize::try_from(mtu).unwrap_or(0).saturating_sub(headers);
    limit.min(super::send::MAX_SEND_BYTES) as u16
}

/// Reads the `sockaddr_in`/`sockaddr_in6` the kernel wrote in a receive buffer's name field.
pub(crate) fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let octets: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), port))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
            let octets: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(octets), port, flow, scope)))
        }
        _ => None,
    }
}

/// The `msghdr` every multishot `recvmsg` of a worker points to: only its name and control lengths
/// are read (they fix the layout of each buffer), so one template serves every socket (the control
/// field stays empty on sockets that do not ask for the destination address).
pub(crate) fn recvmsg_template() -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    header.msg_controllen = CONTROL_SPACE;
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_sockets_share_a_port_and_bind_a_non_local_vip() {
        let first = bind_vip("127.0.0.1:0".parse().expect("literal")).expect("bind");
        let addr = first.local_addr().expect("bound").as_socket().expect("inet");
        assert!(bind_vip(addr).is_ok(), "SO_REUSEPORT lets a second worker bind {addr}");
        assert!(bind_vip("192.0.2.77:0".parse().expect("literal")).is_ok(), "IP_FREEBIND");
        assert!(bind_vip("[::1]:0".parse().expect("literal")).is_ok());
    }

    #[test]
    fn segment_limit_is_the_path_mtu_less_headers() {
        let upstream = connect_upstream("127.0.0.1:9".parse().expect("literal"), None).expect("connect");
        // Loopback's MTU is 65 536: the limit is then the largest send.
        assert_eq!(usize::from(segment_limit(&upstream)), crate::udp::send::MAX_SEND_BYTES);
        let unconnected = bind_vip("127.0.0.1:0".parse().expect("literal")).expect("bind");
        assert_eq!(segment_limit(&unconnected), 0, "no path, no grouping");
    }

    #[test]
    fn vip_receive_buffer_grows_past_the_default() {
        let socket = bind_vip("127.0.0.1:0".parse().expect("literal")).expect("bind");
        let before = socket.recv_buffer_size().expect("SO_RCVBUF");
        set_receive_buffer(&socket, 4 << 20).expect("set");
        let after = socket.recv_buffer_size().expect("SO_RCVBUF");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(after, 4 << 20, "SO_RCVBUFFORCE is not capped at rmem_max");
        } else {
            assert!(after >= before, "SO_RCVBUF, capped at rmem_max, never shrinks it");
        }
        set_receive_buffer(&socket, 0).expect("0 leaves it");
        assert_eq!(socket.recv_buffer_size().expect("SO_RCVBUF"), after);
    }

    #[test]
    fn a_wildcard_socket_reports_the_destination_address_of_each_datagram() {
        for (any, to) in [("0.0.0.0:0", "127.0.0.53"), ("[::]:0", "::1")] {
            let socket = bind_wildcard(any.parse().expect("literal")).expect("bind");
            let port = socket.local_addr().expect("bound").as_socket().expect("inet").port();
            let destination: IpAddr = to.parse().expect("literal");
            let client = std::net::UdpSocket::bind(SocketAddr::new(destination, 0)).expect("client");
            client.send_to(b"x", SocketAddr::new(destination, port)).expect("send");
            let mut payload = [0u8; 16];
            let mut control = [0u64; CONTROL_SPACE / 8];
            let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
            // SAFETY: msghdr is plain data; all-zero is valid.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = &mut iov;
            header.msg_iovlen = 1;
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = CONTROL_SPACE;
            socket.set_nonblocking(false).expect("blocking");
            // SAFETY: the header points at live buffers of the lengths it gives.
            let received = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, 0) };
            assert_eq!(received, 1);
            // SAFETY: the kernel wrote `msg_controllen` bytes of control data into `control`.
            let bytes =
                unsafe { std::slice::from_raw_parts(control.as_ptr().cast::<u8>(), header.msg_controllen) };
            assert_eq!(parse_destination(bytes), Some(destination), "{any}");
        }
        assert_eq!(parse_destination(&[]), None);
        assert_eq!(parse_destination(&[0u8; 40]), None, "a zero-length message ends the walk");
    }

    #[test]
    fn kernel_socket_addresses_parse_back() {
        for text in ["127.0.0.9:4242", "[::1]:53", "[fe80::1%3]:8080"] {
            let addr: SocketAddr = text.parse().expect("literal");
            let raw = socket2::SockAddr::from(addr);
            // SAFETY: `as_ptr` points to `len` initialised bytes of the socket address.
            let bytes = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len() as usize) };
            assert_eq!(parse_sockaddr(bytes), Some(addr));
        }
        assert_eq!(parse_sockaddr(&[0u8; 3]), None);
    }
}
