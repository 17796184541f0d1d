//! Moving bytes of one relay direction: which operation to issue next and what a completion means.
//!
//! A direction moves its bytes one of two ways:
//! - [`copy`]: `recv` into a pooled buffer, `send` it on (partial sends resumed), both through
//!   io_uring;
//! - [`splice`]: wait for readiness with an io_uring poll, then [`splice::pump`] socket→pipe→socket
//!   with `splice(2)` inline (see that module for why not `IORING_OP_SPLICE`).
//!
//! [`Path`] says which a connection uses. `Adaptive` (`RelayMode::Auto`) starts every direction
//! with copy, which wins on request/response traffic (fewer calls per small message), and moves a
//! direction to splice once [`BULK_READS`] receives in a row filled the whole buffer: a bulk
//! stream, where splice saves the two copies of every byte through the proxy. It moves back to
//! copy, giving its pipe back, once a readiness turn found less than a copy buffer's worth before
//! the source ran dry ([`wants_copy`]): the stream went quiet or small, and a pipe held by an idle
//! connection would cost two descriptors for nothing. Switches happen only between operations
//! with nothing buffered, so no byte is reordered.
//!
//! Invariant: a direction has at most one operation in flight, recorded in [`Direction::pending`].
//! This module never closes sockets or frees slots; it reports what happened and the connection
//! ([`crate::tcp`]) acts.

pub(crate) mod copy;
pub(crate) mod splice;

use std::io;
use std::os::fd::RawFd;

use crate::pool::RelayBuffers;
use crate::ring::Ring;
use crate::tcp::connection::{Direction, Pending};

/// How a worker relays its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// Every direction copies.
    Copy,
    /// Every direction splices.
    Splice,
    /// Copy first; a direction that proves bulk moves to splice (see the module doc).
    Adaptive,
}

/// Receives in a row that filled the whole copy buffer after which an adaptive direction splices.
pub(crate) const BULK_READS: u8 = 2;

/// Bytes one splice [`splice::pump`] reads before yielding to the worker's other connections.
pub(crate) const SPLICE_BUDGET: usize = 1 << 20;

/// Whether an adaptive direction should move to splice now: it proved bulk and holds no bytes.
pub(crate) fn wants_splice(path: Path, direction: &Direction) -> bool {
    path == Path::Adaptive
        && !direction.spliced
        && !direction.eof
        && direction.full_reads >= BULK_READS
        && direction.end <= direction.start
}

/// Whether an adaptive splice direction should move back to copy after a [`splice::pump`] that
/// read `read` bytes and ended with `next`: the source ran dry (`PollIn` with an empty pipe; the
/// budget was not what ended the turn) before a copy buffer's worth (`copy_size`) had arrived.
pub(crate) fn wants_copy(
    path: Path,
    direction: &Direction,
    next: Next,
    read: usize,
    copy_size: usize,
) -> bool {
    path == Path::Adaptive
        && direction.spliced
        && !direction.eof
        && next == Next::PollIn
        && read < copy_size
        && direction.pipe.as_ref().is_some_and(|pipe| pipe.buffered == 0)
}

/// What [`advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Advanced {
    /// An operation is in flight.
    Issued,
    /// EOF was propagated (`SHUT_WR` on the destination); the direction is done.
    Finished,
}

/// What the completion of the pending operation asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Continue the direction ([`advance`]).
    Advance,
    /// The source is readable: read right away ([`read_now`]).
    ReadNow,
    /// Wait until the source is readable.
    PollIn,
    /// Wait until the destination is writable.
    PollOut,
    /// The peer reset or an error occurred: reset the connection.
    Reset,
    /// The operation was cancelled (the connection is closing).
    Cancelled,
}

/// The outcome of one completion: what next, how many bytes were delivered to the destination, and
/// whether any bytes moved (for the idle timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completed {
    pub next: Next,
    pub written: u64,
    pub active: bool,
    /// The source reported end of stream (a read returned 0); see [`source_was_reset`].
    pub eof: bool,
}

/// Issues the next operation of a direction whose previous one completed. A splice direction only
/// waits here (its bytes move in [`splice::pump`] once a poll fires).
pub(crate) fn advance(
    ring: &mut Ring,
    direction: &mut Direction,
    buffers: &mut RelayBuffers,
    source: RawFd,
    destination: RawFd,
    user_data: u64,
) -> io::Result<Advanced> {
    let has_bytes = if direction.spliced {
        direction.pipe.as_ref().is_some_and(|p| p.buffered > 0)
    } else {
        direction.end > direction.start
    };
    if has_bytes {
        if direction.spliced {
            poll(ring, direction, destination, libc::POLLOUT, Pending::PollOut, user_data)?;
        } else {
            copy::send(ring, direction, buffers, destination, user_data)?;
        }
        return Ok(Advanced::Issued);
    }
    // Everything received was sent: the buffer goes back before the direction waits again.
    buffers.release(&mut direction.held);
    if direction.eof {
        // ENOTCONN (the peer already went away) changes nothing for us, so the result is ignored.
        shutdown_write(destination);
        direction.done = true;
        return Ok(Advanced::Finished);
    }
    if direction.spliced {
        poll(ring, direction, source, libc::POLLIN, Pending::PollIn, user_data)?;
    } else {
        copy::recv(ring, direction, buffers, source, user_data)?;
    }
    Ok(Advanced::Issued)
}

/// Puts `bytes` in a direction that has nothing in flight or buffered, as if received from its
/// source: its next [`advance`] sends them (resuming short sends, by copy or splice alike) before
/// it reads the source at all. How a PROXY protocol header goes first to a backend.
pub(crate) fn preload(direction: &mut Direction, buffers: &mut RelayBuffers, bytes: &[u8]) -> io::Result<()> {
    if direction.pending != Pending::None || direction.end > direction.start {
        return Err(io::Error::other("preload into a busy direction"));
    }
    if direction.spliced {
        return splice::preload(direction, bytes);
    }
    direction.start = 0;
    direction.end = buffers.preload(&mut direction.held, bytes);
    Ok(())
}

/// Reads from a copy direction's source known to be readable (a splice direction pumps instead and
/// only waits here).
pub(crate) fn read_now(
    ring: &mut Ring,
    direction: &mut Direction,
    buffers: &mut RelayBuffers,
    source: RawFd,
    user_data: u64,
) -> io::Result<()> {
    if direction.spliced {
        poll(ring, direction, source, libc::POLLIN, Pending::PollIn, user_data)
    } else {
        copy::recv(ring, direction, buffers, source, user_data)
    }
}

/// Arms a one-shot poll for `events` on `fd`.
pub(crate) fn poll(
    ring: &mut Ring,
    direction: &mut Direction,
    fd: RawFd,
    events: libc::c_short,
    pending: Pending,
    user_data: u64,
) -> io::Result<()> {
    let entry =
        io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), events as u32).build().user_data(user_data);
    // SAFETY: a poll reads no user memory; `fd` belongs to the connection, which is only released
    // after this operation's completion was reaped.
    unsafe { ring.push(&entry) }?;
    direction.pending = pending;
    Ok(())
}

/// Interprets the completion (`result`, CQE `flags`) of a direction's pending operation and updates
/// its byte accounting and the buffer it holds.
pub(crate) fn complete(
    direction: &mut Direction,
    buffers: &mut RelayBuffers,
    result: i32,
    flags: u32,
) -> Completed {
    let pending = std::mem::replace(&mut direction.pending, Pending::None);
    let idle = |next| Completed { next, written: 0, active: false, eof: false };
    if pending == Pending::Recv && buffers.received(&mut direction.held, result, flags) {
        // The ring was empty when data arrived: the bytes wait, read them into a pool buffer.
        return idle(Next::ReadNow);
    }
    if result == -libc::ECANCELED {
        return idle(Next::Cancelled);
    }
    match pending {
        Pending::Recv => match result {
            n if n > 0 => {
                let n = n as usize;
                direction.start = 0;
                direction.end = n;
                direction.drained = n < buffers.capacity(&direction.held);
                direction.full_reads =
                    if direction.drained { 0 } else { direction.full_reads.saturating_add(1) };
                Completed { next: Next::Advance, written: 0, active: true, eof: false }
            }
            0 => {
                direction.eof = true;
                Completed { next: Next::Advance, written: 0, active: false, eof: true }
            }
            e if e == -libc::EAGAIN => {
                // Nothing to read after all: wait for it without the buffer.
                buffers.release(&mut direction.held);
                idle(Next::PollIn)
            }
            _ => idle(Next::Reset),
        },
        Pending::Send => match result {
            n if n >= 0 => {
                let n = n as usize;
                direction.start = (direction.start + n).min(direction.end);
                Completed { next: Next::Advance, written: n as u64, active: n > 0, eof: false }
            }
            e if e == -libc::EAGAIN => idle(Next::PollOut),
            _ => idle(Next::Reset),
        },
        Pending::PollIn if result >= 0 => idle(Next::ReadNow),
        Pending::PollOut if result >= 0 => idle(Next::Advance),
        Pending::PollIn | Pending::PollOut => idle(Next::Reset),
        // A completion for a direction with nothing pending cannot come from this worker's own
        // submissions; treat it as fatal for the connection rather than guessing.
        Pending::None => idle(Next::Reset),
    }
}

/// Whether a socket that just reported end of stream was in fact reset.
///
/// A reset stores one pending error on the socket, and whichever operation touches it first consumes
/// it: when the other direction's send took the `ECONNRESET`, a concurrent read sees plain EOF. A
/// reset socket is in `TCP_CLOSE`, a FIN-closed one that has not sent its own FIN is in `CLOSE_WAIT`,
/// so the state tells them apart and the reset is propagated as a reset rather than a FIN. Only ask
/// before our own FIN went out on `fd`: a socket that sent FIN and then received one is moved to
/// TIME_WAIT, which leaves the full socket in `TCP_CLOSE` as well.
pub(crate) fn source_was_reset(fd: RawFd) -> bool {
    const TCP_CLOSE: u8 = 7;
    // `tcpi_state` is the first byte of `struct tcp_info`; the kernel copies only `len` bytes.
    let mut state: u8 = 0;
    let mut len = 1 as libc::socklen_t;
    // SAFETY: `state` is a live 1-byte buffer and `len` says so.
    let ok = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut state as *mut u8).cast(), &mut len)
    } == 0;
    ok && len >= 1 && state == TCP_CLOSE
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown(2) only takes an fd and a constant; a stale fd would fail with EBADF, not UB.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Held;

    fn copy_direction(buffer: usize) -> Direction {
        Direction { held: Held::Own(vec![0u8; buffer].into_boxed_slice()), ..Direction::new() }
    }

    fn receive(direction: &mut Direction, n: i32) -> Completed {
        direction.pending = Pending::Recv;
        complete(direction, &mut RelayBuffers::new(None, 4096), n, 0)
    }

    fn send_all(direction: &mut Direction) {
        direction.pending = Pending::Send;
        let unsent = (direction.end - direction.start) as i32;
        assert_eq!(complete(direction, &mut RelayBuffers::new(None, 4096), unsent, 0).written, unsent as u64);
    }

    #[test]
    fn a_preloaded_header_waits_as_received_bytes_and_a_short_send_resumes_after_its_part() {
        let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 40000 443\r\n";
        let mut buffers = RelayBuffers::new(None, 4096);
        let mut direction = Direction::new();
        preload(&mut direction, &mut buffers, header).expect("an idle direction takes a preload");
        assert_eq!(buffers.bytes(&direction.held, direction.end), &header[..]);
        assert!(!wants_splice(Path::Adaptive, &direction), "never with bytes unsent");
        direction.pending = Pending::Send;
        let short = complete(&mut direction, &mut buffers, 5, 0);
        assert_eq!((short.next, short.written), (Next::Advance, 5));
        assert_eq!(&buffers.bytes(&direction.held, direction.end)[direction.start..], &header[5..]);
        assert!(preload(&mut direction, &mut buffers, b"again").is_err(), "bytes still wait");
        direction.pending = Pending::Send;
        let rest = (header.len() - 5) as i32;
        assert_eq!(complete(&mut direction, &mut buffers, rest, 0).written, rest as u64);
        buffers.release(&mut direction.held);
        assert_eq!(buffers.in_use, 0, "the preload's buffer went back");
    }

    #[test]
    fn a_direction_wants_splice_after_full_reads_in_a_row_and_only_when_adaptive() {
        let mut direction = copy_direction(1024);
        receive(&mut direction, 1024);
        send_all(&mut direction);
        assert!(!wants_splice(Path::Adaptive, &direction), "one full read is not bulk yet");
        receive(&mut direction, 1024);
        assert!(!wants_splice(Path::Adaptive, &direction), "never with bytes still unsent");
        send_all(&mut direction);
        assert!(wants_splice(Path::Adaptive, &direction));
        assert!(!wants_splice(Path::Copy, &direction));
        assert!(!direction.drained, "a full read leaves the socket possibly readable");
    }

    #[test]
    fn a_short_read_resets_the_bulk_count_and_marks_the_source_drained() {
        let mut direction = copy_direction(1024);
        receive(&mut direction, 1024);
        send_all(&mut direction);
        receive(&mut direction, 100);
        send_all(&mut direction);
        assert!(direction.drained);
        receive(&mut direction, 1024);
        send_all(&mut direction);
        assert!(!wants_splice(Path::Adaptive, &direction), "the count restarted after the short read");
    }

    #[test]
    fn a_spliced_direction_goes_back_to_copy_only_when_its_source_ran_dry_early() {
        let mut pipes = crate::pool::PipePool::new(64 * 1024);
        let mut direction =
            Direction { spliced: true, pipe: Some(pipes.take().expect("pipe")), ..Direction::new() };
        let copy = 64 * 1024;
        assert!(wants_copy(Path::Adaptive, &direction, Next::PollIn, 100, copy));
        assert!(!wants_copy(Path::Splice, &direction, Next::PollIn, 100, copy), "forced splice stays");
        assert!(!wants_copy(Path::Adaptive, &direction, Next::PollIn, copy, copy), "a buffer's worth: bulk");
        assert!(!wants_copy(Path::Adaptive, &direction, Next::PollOut, 100, copy), "waits to send");
        direction.pipe.as_mut().expect("pipe").buffered = 1;
        assert!(!wants_copy(Path::Adaptive, &direction, Next::PollIn, 100, copy), "bytes in the pipe");
        direction.pipe.as_mut().expect("pipe").buffered = 0;
        direction.eof = true;
        assert!(!wants_copy(Path::Adaptive, &direction, Next::PollIn, 100, copy));
        if let Some(pipe) = direction.pipe.take() {
            pipes.give(pipe);
        }
    }

    #[test]
    fn end_of_stream_never_switches_and_a_spliced_direction_stays() {
        let mut direction = copy_direction(1024);
        for _ in 0..BULK_READS {
            receive(&mut direction, 1024);
            send_all(&mut direction);
        }
        let eof = receive(&mut direction, 0);
        assert!(eof.eof && direction.eof);
        assert!(!wants_splice(Path::Adaptive, &direction), "nothing more to move");
        let mut spliced = Direction { spliced: true, full_reads: BULK_READS, ..Direction::new() };
        assert!(!wants_splice(Path::Adaptive, &spliced));
        spliced.pending = Pending::PollIn;
        let mut buffers = RelayBuffers::new(None, 4096);
        assert_eq!(complete(&mut spliced, &mut buffers, libc::POLLIN as i32, 0).next, Next::ReadNow);
    }
}
