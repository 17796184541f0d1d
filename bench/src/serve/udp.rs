//! UDP servers, one blocking `recvmmsg` loop per thread: echo (returns each datagram to its sender with
//! `sendmmsg`) and sink (counts and discards; answers the udp-stream stats query).
//!
//! The batch buffers are allocated once per thread. A receive timeout bounds each wait so the thread
//! notices its stop deadline. Stats queries are answered with the sum over all sink threads and are
//! never counted themselves.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use socket2::Socket;

use super::{STOP_CHECK, ServerCounters, sum};
use crate::udp_stats::{SinkCounts, answer, is_query};

const BATCH: usize = 64;
const DATAGRAM_MAX: usize = 65_536;
/// Large receive buffers absorb bursts; the kernel caps the value at net.core.rmem_max.
const RECEIVE_BUFFER: usize = 8 << 20;

/// Reusable `recvmmsg`/`sendmmsg` batch: one buffer, iovec and source address per entry.
struct Batch {
    buffers: Vec<u8>,
    iovecs: Vec<libc::iovec>,
    addresses: Vec<libc::sockaddr_storage>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Box<Self> {
        // SAFETY: sockaddr_storage and mmsghdr are plain C structs; all-zero is a valid value.
        let zeroed_address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut batch = Box::new(Self {
            buffers: vec![0; BATCH * DATAGRAM_MAX],
            iovecs: Vec::with_capacity(BATCH),
            addresses: vec![zeroed_address; BATCH],
            headers: Vec::with_capacity(BATCH),
        });
        for index in 0..BATCH {
            let base = batch.buffers[index * DATAGRAM_MAX..].as_mut_ptr();
            batch.iovecs.push(libc::iovec { iov_base: base.cast(), iov_len: DATAGRAM_MAX });
        }
        for index in 0..BATCH {
            // SAFETY: as above, all-zero is a valid mmsghdr.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = &mut batch.iovecs[index];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_name = (&mut batch.addresses[index] as *mut libc::sockaddr_storage).cast();
            batch.headers.push(header);
        }
        batch
    }

    /// Receives up to BATCH datagrams, waiting at most the socket's receive timeout for the first.
    fn receive(&mut self, socket: &Socket) -> io::Result<usize> {
        for header in &mut self.headers {
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_len = 0;
        }
        // SAFETY: every header points at an iovec/address owned by `self`, which is boxed so the
        // pointers stay valid; lengths match the buffers they describe.
        let count = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if count < 0 { Err(io::Error::last_os_error()) } else { Ok(count as usize) }
    }

    fn datagram(&self, index: usize) -> &[u8] {
        let start = index * DATAGRAM_MAX;
        &self.buffers[start..start + self.headers[index].msg_len as usize]
    }

    /// Sends the first `count` received datagrams back to their senders.
    fn echo(&mut self, socket: &Socket, count: usize) {
        for index in 0..count {
            self.iovecs[index].iov_len = self.headers[index].msg_len as usize;
        }
        let mut done = 0;
        while done < count {
            // SAFETY: as in `receive`; the iovec lengths were just set to the received sizes.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.headers[done..].as_mut_ptr(),
                    (count - done) as u32,
                    0,
                )
            };
            if sent <= 0 {
                // A datagram the kernel refuses (e.g. a vanished sender) is dropped, like on a real network.
                done += 1;
            } else {
                done += sent as usize;
            }
        }
        for iovec in &mut self.iovecs[..count] {
            iovec.iov_len = DATAGRAM_MAX;
        }
    }
}

fn prepare(socket: &Socket) -> io::Result<()> {
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    let _ = socket.set_send_buffer_size(RECEIVE_BUFFER);
    socket.set_read_timeout(Some(STOP_CHECK))
}

fn receive_or_idle(batch: &mut Batch, socket: &Socket) -> io::Result<usize> {
    match batch.receive(socket) {
        Ok(count) => Ok(count),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) || error.raw_os_error() == Some(libc::ECONNREFUSED) =>
        {
            Ok(0)
        }
        Err(error) => Err(error),
    }
}

pub fn serve_echo(socket: Socket, stop_at: Option<Instant>, counters: &ServerCounters) -> io::Result<()> {
    prepare(&socket)?;
    let mut batch = Batch::new();
    while stop_at.is_none_or(|stop| Instant::now() < stop) {
        let count = receive_or_idle(&mut batch, &socket)?;
        if count == 0 {
            continue;
        }
        let bytes: usize = (0..count).map(|index| batch.headers[index].msg_len as usize).sum();
        counters.add(count as u64, bytes as u64);
        batch.echo(&socket, count);
    }
    Ok(())
}

pub fn serve_sink(
    socket: Socket,
    stop_at: Option<Instant>,
    counters: &ServerCounters,
    all: &[ServerCounters],
) -> io::Result<()> {
    prepare(&socket)?;
    let mut batch = Batch::new();
    while stop_at.is_none_or(|stop| Instant::now() < stop) {
        let count = receive_or_idle(&mut batch, &socket)?;
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        for index in 0..count {
            let datagram = batch.datagram(index);
            if is_query(datagram) {
                // Count what this batch received before the query, so the answer includes it.
                counters.add(datagrams, bytes);
                (datagrams, bytes) = (0, 0);
                let (total_datagrams, total_bytes) = sum(all);
                let reply = answer(datagram, SinkCounts { datagrams: total_datagrams, bytes: total_bytes });
                let header = &batch.headers[index].msg_hdr;
                // SAFETY: `reply` is a live buffer of its length; `msg_name`/`msg_namelen` describe the
                // sender address the kernel just wrote into this batch entry.
                unsafe {
                    libc::sendto(
                        socket.as_raw_fd(),
                        reply.as_ptr().cast(),
                        reply.len(),
                        0,
                        header.msg_name as *const libc::sockaddr,
                        header.msg_namelen,
                    );
                }
                continue;
            }
            datagrams += 1;
            bytes += datagram.len() as u64;
        }
        counters.add(datagrams, bytes);
    }
    Ok(())
}
