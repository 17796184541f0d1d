//! Proves the test VM speaks SCTP the way ringlb's relay needs it: a one-to-one (SOCK_STREAM) SCTP
//! association over 127.0.0.1 carries messages whose stream id, payload protocol id and unordered flag
//! arrive intact (SCTP_SNDINFO out, SCTP_RCVINFO in), both ways, and a close reaches the peer as EOF.
//!
//! Built by vm/smoke.sh with plain `rustc` (std only; the few syscalls are declared below), so it needs
//! no crates. Exit codes: 0 pass, 1 a check failed, 2 the kernel has no SCTP (the host case).
//! Every blocking call is bounded by SO_RCVTIMEO/SO_SNDTIMEO, so a broken kernel fails, never hangs.

use std::ffi::{c_int, c_void};
use std::io::Error;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::exit;

const AF_INET: c_int = 2;
const SOCK_STREAM: c_int = 1;
const IPPROTO_SCTP: c_int = 132;
const SOL_SOCKET: c_int = 1;
const SO_RCVTIMEO: c_int = 20;
const SO_SNDTIMEO: c_int = 21;
const SOL_SCTP: c_int = 132;
/// Socket options and cmsg types from <linux/sctp.h>.
const SCTP_INITMSG: c_int = 2;
const SCTP_RECVRCVINFO: c_int = 32;
const SCTP_SNDINFO: c_int = 2;
const SCTP_RCVINFO: c_int = 3;
const SCTP_UNORDERED: u16 = 1;
const MSG_EOR: c_int = 0x80;
const MSG_NOTIFICATION: c_int = 0x8000;
const EPROTONOSUPPORT: i32 = 93;

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

#[repr(C)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
struct Iovec {
    base: *mut c_void,
    len: usize,
}

#[repr(C)]
struct Msghdr {
    name: *mut c_void,
    namelen: u32,
    iov: *mut Iovec,
    iovlen: usize,
    control: *mut c_void,
    controllen: usize,
    flags: c_int,
}

#[repr(C)]
struct Cmsghdr {
    len: usize,
    level: c_int,
    kind: c_int,
}

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

extern "C" {
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int;
    fn bind(fd: c_int, addr: *const SockaddrIn, len: u32) -> c_int;
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const SockaddrIn, len: u32) -> c_int;
    fn accept(fd: c_int, addr: *mut c_void, len: *mut u32) -> c_int;
    fn getsockname(fd: c_int, addr: *mut SockaddrIn, len: *mut u32) -> c_int;
    fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, len: u32) -> c_int;
    fn sendmsg(fd: c_int, msg: *const Msghdr, flags: c_int) -> isize;
    fn recvmsg(fd: c_int, msg: *mut Msghdr, flags: c_int) -> isize;
}

/// One message as the application sees it: payload plus the SCTP metadata the relay must preserve.
#[derive(Debug, PartialEq)]
struct Message {
    payload: Vec<u8>,
    stream: u16,
    ppid: u32,
    unordered: bool,
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: {}", Error::last_os_error()))
    }
}

fn set_option<T>(fd: &OwnedFd, level: c_int, name: c_int, value: &T, what: &str) -> Result<(), String> {
    // SAFETY: value points to a live T and the length passed is exactly its size.
    let rc =
        unsafe { setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as u32) };
    check(rc == 0, what)
}

fn sctp_socket() -> Result<OwnedFd, String> {
    // SAFETY: plain syscall; the result is checked before it is wrapped.
    let fd = unsafe { socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) };
    if fd < 0 {
        let error = Error::last_os_error();
        if error.raw_os_error() == Some(EPROTONOSUPPORT) {
            eprintln!(
                "sctp_smoke: this kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): {error})"
            );
            exit(2);
        }
        return Err(format!("socket: {error}"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = Timeval { sec: 5, usec: 0 };
    set_option(&fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, "SO_RCVTIMEO")?;
    set_option(&fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, "SO_SNDTIMEO")?;
    let init = SctpInitmsg { num_ostreams: 8, max_instreams: 8, max_attempts: 0, max_init_timeo: 0 };
    set_option(&fd, SOL_SCTP, SCTP_INITMSG, &init, "SCTP_INITMSG")?;
    Ok(fd)
}

fn loopback(port: u16) -> SockaddrIn {
    SockaddrIn {
        family: AF_INET as u16,
        port_be: port.to_be(),
        addr_be: 0x7f00_0001u32.to_be(),
        zero: [0; 8],
    }
}

fn send(fd: &OwnedFd, message: &Message) -> Result<(), String> {
    let info = SctpSndinfo {
        sid: message.stream,
        flags: if message.unordered { SCTP_UNORDERED } else { 0 },
        ppid: message.ppid,
        context: 0,
        assoc_id: 0,
    };
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    let header =
        Cmsghdr { len: size_of::<Cmsghdr>() + size_of::<SctpSndinfo>(), level: SOL_SCTP, kind: SCTP_SNDINFO };
    let control_len = size_of::<Cmsghdr>() + size_of::<SctpSndinfo>().next_multiple_of(8);
    // SAFETY: the control buffer is 64 bytes, aligned to 8, and header plus info take 32 of them.
    unsafe {
        let base = control.as_mut_ptr().cast::<u8>();
        base.cast::<Cmsghdr>().write(header);
        base.add(size_of::<Cmsghdr>()).cast::<SctpSndinfo>().write_unaligned(info);
    }
    let mut iov = Iovec { base: message.payload.as_ptr() as *mut c_void, len: message.payload.len() };
    let msg = Msghdr {
        name: std::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: control.as_mut_ptr().cast(),
        controllen: control_len,
        flags: 0,
    };
    // SAFETY: msg points at the live iovec and control buffer above for the duration of the call.
    let sent = unsafe { sendmsg(fd.as_raw_fd(), &msg, 0) };
    check(sent == message.payload.len() as isize, "sendmsg")
}

/// Receives one whole message; Ok(None) means the peer closed the association (EOF).
fn receive(fd: &OwnedFd) -> Result<Option<Message>, String> {
    let mut payload = vec![0u8; 4096];
    let mut control = [0u64; 16];
    let mut iov = Iovec { base: payload.as_mut_ptr().cast(), len: payload.len() };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths); fields are set below.
    let mut msg: Msghdr = unsafe { zeroed() };
    msg.iov = &mut iov;
    msg.iovlen = 1;
    msg.control = control.as_mut_ptr().cast();
    msg.controllen = size_of::<[u64; 16]>();
    // SAFETY: msg points at the live iovec and control buffer above for the duration of the call.
    let received = unsafe { recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    check(received >= 0, "recvmsg")?;
    if received == 0 {
        return Ok(None);
    }
    if msg.flags & MSG_NOTIFICATION != 0 {
        return Err("recvmsg returned a notification although none was subscribed".into());
    }
    if msg.flags & MSG_EOR == 0 {
        return Err(format!("recvmsg returned a partial message ({received} bytes, no MSG_EOR)"));
    }
    payload.truncate(received as usize);
    let mut info: Option<SctpRcvinfo> = None;
    let mut offset = 0;
    let base = control.as_ptr().cast::<u8>();
    while offset + size_of::<Cmsghdr>() <= msg.controllen {
        // SAFETY: offset + header size is within controllen, which the kernel keeps within the buffer.
        let header = unsafe { base.add(offset).cast::<Cmsghdr>().read_unaligned() };
        if header.len < size_of::<Cmsghdr>() || offset + header.len > msg.controllen {
            return Err(format!("malformed cmsg at offset {offset}: len {}", header.len));
        }
        if header.level == SOL_SCTP
            && header.kind == SCTP_RCVINFO
            && header.len >= size_of::<Cmsghdr>() + size_of::<SctpRcvinfo>()
        {
            // SAFETY: the length check above guarantees a whole sctp_rcvinfo follows the header.
            info = Some(unsafe {
                base.add(offset + size_of::<Cmsghdr>()).cast::<SctpRcvinfo>().read_unaligned()
            });
        }
        offset += header.len.next_multiple_of(8);
    }
    let info = info.ok_or("recvmsg carried no SCTP_RCVINFO control message")?;
    Ok(Some(Message {
        payload,
        stream: info.sid,
        ppid: info.ppid,
        unordered: info.flags & SCTP_UNORDERED != 0,
    }))
}

fn expect_messages(fd: &OwnedFd, expected: &[&Message], side: &str) -> Result<(), String> {
    // Messages on different streams may overtake each other, so match by stream id.
    let mut pending: Vec<&Message> = expected.to_vec();
    while !pending.is_empty() {
        let got =
            receive(fd)?.ok_or_else(|| format!("{side}: EOF while {} messages pending", pending.len()))?;
        let index = pending
            .iter()
            .position(|want| **want == got)
            .ok_or_else(|| format!("{side}: unexpected message {got:?}; still expecting {pending:?}"))?;
        println!(
            "sctp_smoke: {side} received stream {} ppid {} unordered {}",
            got.stream,
            u32::from_be(got.ppid),
            got.unordered
        );
        pending.remove(index);
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let listener = sctp_socket()?;
    let any_port = loopback(0);
    // SAFETY: the address is a live sockaddr_in of the size passed.
    check(unsafe { bind(listener.as_raw_fd(), &any_port, size_of::<SockaddrIn>() as u32) } == 0, "bind")?;
    // SAFETY: plain syscall on a descriptor we own.
    check(unsafe { listen(listener.as_raw_fd(), 4) } == 0, "listen")?;
    let mut bound = loopback(0);
    let mut bound_len = size_of::<SockaddrIn>() as u32;
    // SAFETY: bound and bound_len are live and describe a buffer of that size.
    check(unsafe { getsockname(listener.as_raw_fd(), &mut bound, &mut bound_len) } == 0, "getsockname")?;
    let port = u16::from_be(bound.port_be);

    let client = sctp_socket()?;
    let target = loopback(port);
    // SAFETY: the address is a live sockaddr_in of the size passed; SO_SNDTIMEO bounds the handshake.
    check(unsafe { connect(client.as_raw_fd(), &target, size_of::<SockaddrIn>() as u32) } == 0, "connect")?;
    // SAFETY: null address arguments are allowed; SO_RCVTIMEO on the listener bounds the wait.
    let accepted = unsafe { accept(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
    check(accepted >= 0, "accept")?;
    // SAFETY: accepted is a fresh descriptor that nothing else owns.
    let server = unsafe { OwnedFd::from_raw_fd(accepted) };
    let on: c_int = 1;
    set_option(&server, SOL_SCTP, SCTP_RECVRCVINFO, &on, "SCTP_RECVRCVINFO (server)")?;
    set_option(&client, SOL_SCTP, SCTP_RECVRCVINFO, &on, "SCTP_RECVRCVINFO (client)")?;
    println!("sctp_smoke: association up on 127.0.0.1:{port}");

    // PPIDs travel in network byte order by convention; the kernel must pass them through untouched.
    let ordered =
        Message { payload: b"hello on stream 3".to_vec(), stream: 3, ppid: 42u32.to_be(), unordered: false };
    let unordered = Message {
        payload: b"unordered on stream 5".to_vec(),
        stream: 5,
        ppid: 7u32.to_be(),
        unordered: true,
    };
    send(&client, &ordered)?;
    send(&client, &unordered)?;
    expect_messages(&server, &[&ordered, &unordered], "server")?;

    let reply =
        Message { payload: b"reply on stream 3".to_vec(), stream: 3, ppid: 42u32.to_be(), unordered: false };
    send(&server, &reply)?;
    expect_messages(&client, &[&reply], "client")?;

    // Graceful close (SHUTDOWN chunk) must reach the peer as end of stream.
    drop(server);
    match receive(&client)? {
        None => println!("sctp_smoke: client saw the server's shutdown as EOF"),
        Some(message) => return Err(format!("expected EOF after the server closed, got {message:?}")),
    }
    Ok(())
}

fn main() {
    match run() {
        Ok(()) => println!("sctp_smoke: PASS"),
        Err(error) => {
            eprintln!("sctp_smoke: FAIL: {error}");
            exit(1);
        }
    }
}
