//! Socket construction shared by the load modes and the servers: connects (blocking with a timeout or
//! non-blocking), `SO_REUSEPORT` listener groups, and the mapping from OS errors to reported failures.
//!
//! Never hides an error: every failure maps to exactly one `Failure` kind that the report counts.
//! Sockets are close-on-exec; client TCP sockets for request/response get `TCP_NODELAY`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::report::Failure;

/// How client TCP sockets are set up before connecting.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub nodelay: bool,
    /// `SO_LINGER` 0: close sends a reset and leaves no TIME_WAIT on the client.
    pub reset_on_close: bool,
    /// Local address to bind before connecting (port chosen at connect time).
    pub source: Option<IpAddr>,
}

fn client_socket(target: SocketAddr, options: &ConnectOptions, nonblocking: bool) -> io::Result<Socket> {
    let kind = if nonblocking { Type::STREAM.nonblocking() } else { Type::STREAM };
    let socket = Socket::new(Domain::for_address(target), kind.cloexec(), Some(Protocol::TCP))?;
    if options.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    if options.reset_on_close {
        socket.set_linger(Some(Duration::ZERO))?;
    }
    if let Some(source) = options.source {
        // Defers the ephemeral port choice to connect(), so the port only has to be unique per
        // (source, destination) pair instead of per source address: many more concurrent connections.
        if source.is_ipv4() {
            set_int_option(&socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        }
        socket.bind(&SockAddr::from(SocketAddr::new(source, 0)))?;
    }
    Ok(socket)
}

/// Source address number `host` of a spread over loopback: 127.0.0.1 + `host`, carrying into the
/// higher octets of 127/8 (every one of them is local on Linux).
pub fn loopback_source(host: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + host))
}

/// Connects, blocking at most `timeout`, then switches the socket to non-blocking mode.
pub fn connect_blocking(
    target: SocketAddr,
    timeout: Duration,
    options: &ConnectOptions,
) -> io::Result<Socket> {
    let socket = client_socket(target, options, false)?;
    socket.connect_timeout(&SockAddr::from(target), timeout)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Starts a non-blocking connect; completion is signalled by writability, then `finish_connect`.
pub fn start_connect(target: SocketAddr, options: &ConnectOptions) -> io::Result<Socket> {
    let socket = client_socket(target, options, true)?;
    match socket.connect(&SockAddr::from(target)) {
        Ok(()) => Ok(socket),
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(error) => Err(error),
    }
}

/// The outcome of a non-blocking connect once the socket reported writable or broken.
pub fn finish_connect(socket: &Socket) -> io::Result<()> {
    match socket.take_error()? {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the pointer and length describe `value`, a live c_int, for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Binds `count` sockets to the same address with `SO_REUSEPORT` so that each server thread owns one
/// and the kernel spreads flows over them. Port 0 is resolved by the first bind and reused by the rest.
pub fn reuseport_group(listen: SocketAddr, udp: bool, count: usize) -> io::Result<Vec<Socket>> {
    let mut address = listen;
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let (kind, protocol) = if udp { (Type::DGRAM, Protocol::UDP) } else { (Type::STREAM, Protocol::TCP) };
        let socket = Socket::new(Domain::for_address(address), kind.cloexec(), Some(protocol))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&SockAddr::from(address))?;
        if !udp {
            socket.listen(4096)?;
        }
        if address.port() == 0 {
            address = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

/// The wildcard address with port 0 in the family of `target`, for binding a client UDP socket.
pub fn any_port_like(target: SocketAddr) -> SocketAddr {
    let any: IpAddr =
        if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    SocketAddr::new(any, 0)
}

/// Classifies an error of a connect attempt.
pub fn connect_failure(error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Failure::ConnectRefused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::ConnectTimeout,
        _ => Failure::ConnectOther,
    }
}

/// Classifies an error of a read or write on an established connection.
pub fn transfer_failure(error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
            Failure::Reset
        }
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        _ => Failure::OtherIo,
    }
}

/// True for the errors that only mean "try again later" on a non-blocking socket.
pub fn would_block(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}
