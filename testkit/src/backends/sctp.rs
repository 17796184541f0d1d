//! Loopback SCTP peers for the SCTP datapath tests: a blocking one-to-one (`SOCK_STREAM`) socket
//! that sends and receives whole messages with their stream id, PPID and unordered flag
//! (`SCTP_SNDINFO` out, `SCTP_RCVINFO` in), and servers built on it (echo, named, abort-after-one,
//! close-after-one).
//!
//! std + libc only (testkit must not depend on lb-datapath, which dev-depends on it). Every socket
//! has send/receive timeouts, so a broken peer fails a test instead of hanging it. Where the kernel
//! has no SCTP every constructor returns the `EPROTONOSUPPORT` error.

use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

const IPPROTO_SCTP: i32 = 132;
const SOL_SCTP: i32 = 132;
const SCTP_INITMSG: i32 = 2;
const SCTP_RECVRCVINFO: i32 = 32;
const SCTP_SNDINFO: i32 = 2;
const SCTP_RCVINFO: i32 = 3;
const SCTP_UNORDERED: u16 = 1;
const MSG_NOTIFICATION: i32 = 0x8000;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[repr(C)]
struct SctpInitmsg {
    num_ostreams: u16,
    max_instreams: u16,
    max_attempts: u16,
    max_init_timeo: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SctpSndinfo {
    sid: u16,
    flags: u16,
    ppid: u32,
    context: u32,
    assoc_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SctpRcvinfo {
    sid: u16,
    ssn: u16,
    flags: u16,
    ppid: u32,
    tsn: u32,
    cumtsn: u32,
    context: u32,
    assoc_id: i32,
}

/// One SCTP message with the metadata a relay must preserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SctpMessage {
    pub payload: Vec<u8>,
    pub stream: u16,
    /// Payload protocol id as on the wire (tests use `n.to_be()`).
    pub ppid: u32,
    pub unordered: bool,
}

impl SctpMessage {
    pub fn new(payload: &[u8], stream: u16, ppid: u32, unordered: bool) -> SctpMessage {
        SctpMessage { payload: payload.to_vec(), stream, ppid, unordered }
    }
}

fn check(rc: i32) -> io::Result<()> {
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn set_option<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T and the length passed is exactly its size.
    check(unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as u32)
    })
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn v4(addr: SocketAddr) -> io::Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(addr) => Ok(addr),
        SocketAddr::V6(_) => Err(io::Error::new(io::ErrorKind::Unsupported, "SCTP test peers are IPv4 only")),
    }
}

/// A blocking one-to-one SCTP socket (IPv4).
pub struct SctpSocket {
    fd: OwnedFd,
}

impl SctpSocket {
    fn new() -> io::Result<SctpSocket> {
        // SAFETY: plain syscall; the result is checked before it is wrapped.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, IPPROTO_SCTP) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let socket = SctpSocket { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
        socket.set_timeout(IO_TIMEOUT)?;
        let init = SctpInitmsg { num_ostreams: 64, max_instreams: 64, max_attempts: 0, max_init_timeo: 0 };
        set_option(&socket.fd, SOL_SCTP, SCTP_INITMSG, &init)?;
        set_option(&socket.fd, SOL_SCTP, SCTP_RECVRCVINFO, &1i32)?;
        Ok(socket)
    }

    fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval { tv_sec: timeout.as_secs() as _, tv_usec: timeout.subsec_micros() as _ };
        set_option(&self.fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        set_option(&self.fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv)
    }

    /// Connects to `addr` (bounded by the socket's send timeout).
    pub fn connect(addr: SocketAddr) -> io::Result<SctpSocket> {
        let socket = SctpSocket::new()?;
        let target = sockaddr(v4(addr)?);
        // SAFETY: target is a live sockaddr_in of the size passed.
        check(unsafe {
            libc::connect(
                socket.fd.as_raw_fd(),
                (&target as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        })?;
        Ok(socket)
    }

    /// Sends one whole message with its stream id, PPID and unordered flag.
    pub fn send(&self, message: &SctpMessage) -> io::Result<()> {
        let info = SctpSndinfo {
            sid: message.stream,
            flags: if message.unordered { SCTP_UNORDERED } else { 0 },
            ppid: message.ppid,
            context: 0,
            assoc_id: 0,
        };
        let mut control = [0u64; 8];
        let header_len = size_of::<libc::cmsghdr>();
        // SAFETY: control is 64 bytes aligned to 8; header plus info take 32 of them.
        unsafe {
            let base = control.as_mut_ptr().cast::<u8>();
            let mut header: libc::cmsghdr = std::mem::zeroed();
            header.cmsg_len = (header_len + size_of::<SctpSndinfo>()) as _;
            header.cmsg_level = SOL_SCTP;
            header.cmsg_type = SCTP_SNDINFO;
            base.cast::<libc::cmsghdr>().write(header);
            base.add(header_len).cast::<SctpSndinfo>().write_unaligned(info);
        }
        let mut iov = libc::iovec {
            iov_base: message.payload.as_ptr() as *mut libc::c_void,
            iov_len: message.payload.len(),
        };
        // SAFETY: all-zero msghdr is valid; fields set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = (header_len + size_of::<SctpSndinfo>().next_multiple_of(8)) as _;
        // SAFETY: msg points at the live iovec and control buffer for the duration of the call.
        let sent = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if sent as usize != message.payload.len() {
            return Err(io::Error::other(format!("short SCTP send: {sent} of {}", message.payload.len())));
        }
        Ok(())
    }

    /// Receives one whole message (up to 256 KiB); `Ok(None)` is EOF (the peer shut down).
    /// An aborted association is `Err` with `ECONNRESET`.
    pub fn recv(&self) -> io::Result<Option<SctpMessage>> {
        let mut payload = Vec::new();
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let mut control = [0u64; 16];
            let mut iov = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
            // SAFETY: all-zero msghdr is valid; fields set below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = size_of::<[u64; 16]>() as _;
            // SAFETY: msg points at the live iovec and control buffer for the duration of the call.
            let received = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
            if received < 0 {
                return Err(io::Error::last_os_error());
            }
            if received == 0 && payload.is_empty() {
                return Ok(None);
            }
            if msg.msg_flags & MSG_NOTIFICATION != 0 {
                continue;
            }
            payload.extend_from_slice(&chunk[..received as usize]);
            if msg.msg_flags & libc::MSG_EOR == 0 {
                continue;
            }
            let info = rcvinfo(&control, msg.msg_controllen as usize)
                .ok_or_else(|| io::Error::other("message without SCTP_RCVINFO"))?;
            return Ok(Some(SctpMessage {
                payload,
                stream: info.sid,
                ppid: info.ppid,
                unordered: info.flags & SCTP_UNORDERED != 0,
            }));
        }
    }

    /// Graceful end: SCTP SHUTDOWN (no half-close in SCTP: the peer may not send after it either).
    pub fn shutdown(&self) -> io::Result<()> {
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) })
    }

    /// Ends the association with ABORT (`SO_LINGER {on, 0}` + close).
    pub fn abort(self) {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        let _ = set_option(&self.fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        // SAFETY: zeroed sockaddr_in is valid; getsockname fills it up to len.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_in>() as u32;
        // SAFETY: addr and len are live and describe a buffer of that size.
        check(unsafe {
            libc::getsockname(self.fd.as_raw_fd(), (&mut addr as *mut libc::sockaddr_in).cast(), &mut len)
        })?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            u32::from_be(addr.sin_addr.s_addr).into(),
            u16::from_be(addr.sin_port),
        )))
    }
}

fn rcvinfo(control: &[u64; 16], len: usize) -> Option<SctpRcvinfo> {
    let len = len.min(size_of::<[u64; 16]>());
    let header_len = size_of::<libc::cmsghdr>();
    let base = control.as_ptr().cast::<u8>();
    let mut offset = 0;
    while offset + header_len <= len {
        // SAFETY: offset + header size is within len, within the buffer.
        let header = unsafe { base.add(offset).cast::<libc::cmsghdr>().read_unaligned() };
        let cmsg_len = header.cmsg_len;
        if cmsg_len < header_len || offset + cmsg_len > len {
            return None;
        }
        if header.cmsg_level == SOL_SCTP
            && header.cmsg_type == SCTP_RCVINFO
            && cmsg_len >= header_len + size_of::<SctpRcvinfo>()
        {
            // SAFETY: a whole sctp_rcvinfo follows the header (length checked).
            return Some(unsafe { base.add(offset + header_len).cast::<SctpRcvinfo>().read_unaligned() });
        }
        offset += cmsg_len.next_multiple_of(8);
    }
    None
}

/// A running loopback SCTP server on 127.0.0.1; stops on drop.
pub struct SctpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl SctpServer {
    /// Listens on 127.0.0.1:0 and runs `handle` on a thread per accepted association.
    pub fn spawn<F>(handle: F) -> io::Result<SctpServer>
    where
        F: Fn(SctpSocket) + Send + Sync + 'static,
    {
        let listener = SctpSocket::new()?;
        let any = sockaddr(SocketAddrV4::new([127, 0, 0, 1].into(), 0));
        // SAFETY: any is a live sockaddr_in of the size passed.
        check(unsafe {
            libc::bind(
                listener.fd.as_raw_fd(),
                (&any as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        })?;
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe { libc::listen(listener.fd.as_raw_fd(), 64) })?;
        // A blocking accept that wakes every so often to look at the stop flag.
        listener.set_timeout(Duration::from_millis(200))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let handle = Arc::new(handle);
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::Builder::new().name(format!("sctp-backend-{}", addr.port())).spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    // SAFETY: null address arguments are allowed.
                    let fd = unsafe {
                        libc::accept4(
                            listener.fd.as_raw_fd(),
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        continue;
                    }
                    // SAFETY: fd is a fresh descriptor that nothing else owns.
                    let socket = SctpSocket { fd: unsafe { OwnedFd::from_raw_fd(fd) } };
                    if socket.set_timeout(IO_TIMEOUT).is_err()
                        || set_option(&socket.fd, SOL_SCTP, SCTP_RECVRCVINFO, &1i32).is_err()
                    {
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::AcqRel);
                    let handle = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name("sctp-backend-assoc".into())
                        .spawn(move || handle(socket));
                }
            })?
        };
        Ok(SctpServer { addr, stop, accepted, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Associations accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Drop for SctpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Echoes every message with its stream id, PPID and unordered flag; answers EOF with shutdown.
pub fn sctp_echo_server() -> io::Result<SctpServer> {
    SctpServer::spawn(|socket| {
        while let Ok(Some(message)) = socket.recv() {
            if socket.send(&message).is_err() {
                return;
            }
        }
        let _ = socket.shutdown();
    })
}

/// Answers every message with `name:` + its payload, same stream id, PPID and flag.
pub fn sctp_named_server(name: &str) -> io::Result<SctpServer> {
    let prefix = format!("{name}:").into_bytes();
    SctpServer::spawn(move |socket| {
        while let Ok(Some(mut message)) = socket.recv() {
            let mut payload = prefix.clone();
            payload.append(&mut message.payload);
            message.payload = payload;
            if socket.send(&message).is_err() {
                return;
            }
        }
        let _ = socket.shutdown();
    })
}

/// Receives one message, then aborts the association (ABORT chunk).
pub fn sctp_abort_server() -> io::Result<SctpServer> {
    SctpServer::spawn(|socket| {
        if let Ok(Some(_)) = socket.recv() {
            socket.abort();
        }
    })
}

/// Echoes one message, then shuts the association down gracefully.
pub fn sctp_close_server() -> io::Result<SctpServer> {
    SctpServer::spawn(|socket| {
        if let Ok(Some(message)) = socket.recv()
            && socket.send(&message).is_ok()
        {
            let _ = socket.shutdown();
            // Keep the socket until the peer completed the shutdown (EOF), bounded by the timeout.
            while let Ok(Some(_)) = socket.recv() {}
        }
    })
}
