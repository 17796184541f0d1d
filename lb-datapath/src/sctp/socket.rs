//! SCTP sockets and their control messages: the one place that knows the `<linux/sctp.h>` numbers
//! and layouts (`libc` does not carry them), one-to-one (`SOCK_STREAM`) socket setup for listeners
//! and backend connects, and the per-direction message buffer whose `msghdr` io_uring's
//! `RecvMsg`/`SendMsg` use (`SCTP_RCVINFO` in, `SCTP_SNDINFO` out).
//!
//! Never panics on a kernel without SCTP: socket creation returns `EPROTONOSUPPORT` to the caller.
//! Invariant: a [`MsgBuf`] is boxed and never moved while an operation using its `msghdr` is in
//! flight; its `msghdr` always points into the same box.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

pub(crate) const IPPROTO_SCTP: i32 = 132;
const SOL_SCTP: i32 = 132;
const SCTP_INITMSG: i32 = 2;
const SCTP_RECVRCVINFO: i32 = 32;
/// cmsg types (`enum sctp_cmsg_type`).
const SCTP_SNDINFO: i32 = 2;
const SCTP_RCVINFO: i32 = 3;
/// `sinfo_flags`/`rcv_flags` bit for unordered delivery.
pub(crate) const SCTP_UNORDERED: u16 = 1;
/// `msg_flags` bit of a notification (none is subscribed; skipped if one arrives anyway).
pub(crate) const MSG_NOTIFICATION: i32 = 0x8000;

/// Streams asked for in each direction of every association (`SCTP_INITMSG`). A stream id at or
/// past the count negotiated with the backend cannot be relayed (the send fails and the association
/// is aborted). Linux preallocates per outgoing stream, so this is not 65535.
pub(crate) const STREAMS: u16 = 1024;

/// Largest message relayed: pieces of a message (partial delivery, no `MSG_EOR`) are gathered in
/// one buffer of this size and sent as one message. Linux has no `SCTP_EXPLICIT_EOR`, so a message
/// cannot be forwarded piecewise; a larger one aborts its association.
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

const BACKLOG: i32 = 1024;

#[repr(C)]
struct SctpInitmsg {
    num_ostreams: u16,
    max_instreams: u16,
    max_attempts: u16,
    max_init_timeo: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SctpSndinfo {
    sid: u16,
    flags: u16,
    ppid: u32,
    context: u32,
    assoc_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
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

/// What the relay preserves per message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MessageInfo {
    pub stream: u16,
    /// Payload protocol id, passed through as the kernel gave it (network byte order by convention).
    pub ppid: u32,
    pub unordered: bool,
}

fn set_option<T>(socket: &Socket, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T and the length passed is exactly its size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A non-blocking one-to-one SCTP socket with the stream counts and `SCTP_RECVRCVINFO` set.
/// Fails with `EPROTONOSUPPORT` where the kernel has no SCTP.
pub(crate) fn sctp_socket(domain: Domain) -> io::Result<Socket> {
    let socket =
        Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::from(IPPROTO_SCTP)))?;
    let init =
        SctpInitmsg { num_ostreams: STREAMS, max_instreams: STREAMS, max_attempts: 0, max_init_timeo: 0 };
    set_option(&socket, SOL_SCTP, SCTP_INITMSG, &init)?;
    enable_rcvinfo(&socket)?;
    Ok(socket)
}

/// Asks for an `SCTP_RCVINFO` control message with every received message.
pub(crate) fn enable_rcvinfo(socket: &Socket) -> io::Result<()> {
    set_option(socket, SOL_SCTP, SCTP_RECVRCVINFO, &1i32)
}

/// A listening SCTP socket for `addr`, shared with the other workers through `SO_REUSEPORT`
/// (supported for SCTP since Linux 5.0; one-to-one sockets spread associations like TCP).
pub(crate) fn bind_sctp_listener(addr: SocketAddr) -> io::Result<Socket> {
    let socket = sctp_socket(Domain::for_address(addr))?;
    crate::listener::share_vip_port(&socket, addr)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

const CMSG_HEADER: usize = size_of::<libc::cmsghdr>();

/// One direction's message buffer and the `msghdr` its receive or send uses (one at a time).
pub(crate) struct MsgBuf {
    header: libc::msghdr,
    iov: libc::iovec,
    /// u64 elements keep the control buffer aligned for `cmsghdr`.
    control: [u64; 8],
    data: Box<[u8]>,
    /// Bytes of the current message gathered so far.
    pub filled: usize,
    /// Metadata of the current message (from its first piece).
    pub info: MessageInfo,
}

impl MsgBuf {
    pub fn new() -> Box<MsgBuf> {
        Box::new(MsgBuf {
            // SAFETY: msghdr and iovec are plain data; all-zero is valid (null pointers, zero lengths).
            header: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            iov: unsafe { std::mem::zeroed() },
            control: [0; 8],
            data: vec![0u8; MAX_MESSAGE].into_boxed_slice(),
            filled: 0,
            info: MessageInfo::default(),
        })
    }

    /// Whether the buffer is full (a message that still has no `MSG_EOR` is too large).
    pub fn is_full(&self) -> bool {
        self.filled >= self.data.len()
    }

    /// Prepares a receive of the next piece into the free part of the buffer.
    pub fn prepare_recv(&mut self) -> *mut libc::msghdr {
        let filled = self.filled.min(self.data.len());
        self.iov = libc::iovec {
            iov_base: self.data[filled..].as_mut_ptr().cast(),
            iov_len: self.data.len() - filled,
        };
        self.control = [0; 8];
        self.header.msg_name = std::ptr::null_mut();
        self.header.msg_namelen = 0;
        self.header.msg_iov = &mut self.iov;
        self.header.msg_iovlen = 1;
        self.header.msg_control = self.control.as_mut_ptr().cast();
        self.header.msg_controllen = size_of::<[u64; 8]>();
        self.header.msg_flags = 0;
        &mut self.header
    }

    /// The `msg_flags` the kernel wrote back for the last receive.
    pub fn received_flags(&self) -> i32 {
        self.header.msg_flags
    }

    /// The `SCTP_RCVINFO` of the last receive, if it carried one.
    pub fn received_info(&self) -> Option<MessageInfo> {
        let len = self.header.msg_controllen.min(size_of::<[u64; 8]>());
        let base = self.control.as_ptr().cast::<u8>();
        let mut offset = 0;
        while offset + CMSG_HEADER <= len {
            // SAFETY: offset + header size is within len, which is within the control buffer.
            let header = unsafe { base.add(offset).cast::<libc::cmsghdr>().read_unaligned() };
            #[allow(clippy::unnecessary_cast)] // cmsg_len is u32 on some libcs
            let cmsg_len = header.cmsg_len as usize;
            if cmsg_len < CMSG_HEADER || offset + cmsg_len > len {
                return None;
            }
            if header.cmsg_level == SOL_SCTP
                && header.cmsg_type == SCTP_RCVINFO
                && cmsg_len >= CMSG_HEADER + size_of::<SctpRcvinfo>()
            {
                // SAFETY: the length check above guarantees a whole sctp_rcvinfo follows the header.
                let info = unsafe { base.add(offset + CMSG_HEADER).cast::<SctpRcvinfo>().read_unaligned() };
                return Some(MessageInfo {
                    stream: info.sid,
                    ppid: info.ppid,
                    unordered: info.flags & SCTP_UNORDERED != 0,
                });
            }
            offset += cmsg_len.next_multiple_of(size_of::<u64>());
        }
        None
    }

    /// Prepares a send of the gathered message with its `SCTP_SNDINFO`.
    pub fn prepare_send(&mut self) -> *const libc::msghdr {
        let info = SctpSndinfo {
            sid: self.info.stream,
            flags: if self.info.unordered { SCTP_UNORDERED } else { 0 },
            ppid: self.info.ppid,
            context: 0,
            assoc_id: 0,
        };
        let header = libc::cmsghdr {
            cmsg_len: (CMSG_HEADER + size_of::<SctpSndinfo>()) as _,
            cmsg_level: SOL_SCTP,
            cmsg_type: SCTP_SNDINFO,
        };
        self.control = [0; 8];
        let base = self.control.as_mut_ptr().cast::<u8>();
        // SAFETY: the control buffer is 64 bytes, aligned to 8; header plus info take 32 of them.
        unsafe {
            base.cast::<libc::cmsghdr>().write(header);
            base.add(CMSG_HEADER).cast::<SctpSndinfo>().write_unaligned(info);
        }
        let filled = self.filled.min(self.data.len());
        self.iov = libc::iovec { iov_base: self.data.as_mut_ptr().cast(), iov_len: filled };
        self.header.msg_name = std::ptr::null_mut();
        self.header.msg_namelen = 0;
        self.header.msg_iov = &mut self.iov;
        self.header.msg_iovlen = 1;
        self.header.msg_control = self.control.as_mut_ptr().cast();
        self.header.msg_controllen = CMSG_HEADER + size_of::<SctpSndinfo>().next_multiple_of(8);
        self.header.msg_flags = 0;
        &self.header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sndinfo_written_for_a_send_reads_back_as_rcvinfo_layout_independent_fields() {
        let mut buf = MsgBuf::new();
        buf.filled = 3;
        buf.info = MessageInfo { stream: 7, ppid: 42u32.to_be(), unordered: true };
        let header = buf.prepare_send();
        // SAFETY: header points into the live box.
        let header = unsafe { &*header };
        assert_eq!(header.msg_iovlen, 1);
        assert_eq!(header.msg_controllen, 32);
        let cmsg = unsafe { (header.msg_control as *const libc::cmsghdr).read() };
        assert_eq!((cmsg.cmsg_level, cmsg.cmsg_type), (SOL_SCTP, SCTP_SNDINFO));
        assert_eq!(cmsg.cmsg_len, CMSG_HEADER + 16);
        // A receive without control data yields no info instead of garbage.
        buf.prepare_recv();
        buf.header.msg_controllen = 0;
        assert_eq!(buf.received_info(), None);
    }
}
