//! Moving bytes of one relay direction: which operation to issue next and what a completion means.
//!
//! Two paths, chosen per engine by [`crate::RelayMode`]:
//! - [`copy`]: `recv` into a pooled buffer, `send` it on (partial sends resumed);
//! - [`splice`]: wait for readability (`POLL_ADD POLLIN`), then `splice` socket→pipe→socket with
//!   `SPLICE_F_NONBLOCK`. An io_uring splice from a socket is always punted to an io-wq worker; a
//!   blocking one would park an `iou-wrk` thread per idle connection, so we only splice once data is
//!   there and treat `EAGAIN` as "poll again".
//!
//! `Auto` resolves to copy. Bulk alone favours splice (this 2-core VM, kernel 6.18, one worker,
//! loopback, `examples/relay_throughput.rs`, Gbit/s: 1 stream copy 8.7–10.7 vs splice 10.7–11.7;
//! 8 streams 7.3–13.8 vs 16–16.6), but an io_uring splice on a socket is always executed by an io-wq
//! thread, so every small message pays two thread hand-offs. The interleaved A/B of
//! `bench/results/relay-ab/RESULTS.md` (3 rounds, quiet machine) measured copy at 2.2x splice's
//! requests/s on 64 B ping-pong over 32 connections, 1.4–1.5x on HTTP keep-alive and close and on
//! one-connection ping-pong, at about half the proxy CPU; splice kept 1.18x on one bulk stream. An L4
//! load balancer mostly carries request/response traffic, so copy is the default and `--relay
//! splice` stays for bulk-only VIPs. (Choosing per connection by observed message size is the next
//! step.)
//!
//! Invariant: a direction has at most one operation in flight, recorded in [`Direction::pending`].
//! This module never closes sockets or frees slots; it reports what happened and the worker acts.

pub(crate) mod copy;
pub(crate) mod splice;

use std::io;
use std::os::fd::RawFd;

use crate::connection::{Direction, Pending};
use crate::ring::Ring;

/// The relay path a worker uses for all its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    Copy,
    Splice,
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

/// Issues the next operation of a direction whose previous one completed.
pub(crate) fn advance(
    ring: &mut Ring,
    path: Path,
    direction: &mut Direction,
    source: RawFd,
    destination: RawFd,
    user_data: u64,
) -> io::Result<Advanced> {
    let has_bytes = match path {
        Path::Copy => direction.end > direction.start,
        Path::Splice => direction.pipe.as_ref().is_some_and(|p| p.buffered > 0),
    };
    if has_bytes {
        match path {
            Path::Copy => copy::send(ring, direction, destination, user_data)?,
            Path::Splice => splice::splice_out(ring, direction, destination, user_data)?,
        }
        return Ok(Advanced::Issued);
    }
    if direction.eof {
        // SAFETY-free libc call: shutdown on an fd the connection owns. ENOTCONN (the peer already
        // went away) changes nothing for us, so the result is ignored.
        shutdown_write(destination);
        direction.done = true;
        return Ok(Advanced::Finished);
    }
    match path {
        Path::Copy => copy::recv(ring, direction, source, user_data)?,
        Path::Splice => poll(ring, direction, source, libc::POLLIN, Pending::PollIn, user_data)?,
    }
    Ok(Advanced::Issued)
}

/// Reads from a source known to be readable.
pub(crate) fn read_now(
    ring: &mut Ring,
    path: Path,
    direction: &mut Direction,
    source: RawFd,
    user_data: u64,
) -> io::Result<()> {
    match path {
        Path::Copy => copy::recv(ring, direction, source, user_data),
        Path::Splice => splice::splice_in(ring, direction, source, user_data),
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

/// Interprets the completion of a direction's pending operation and updates its byte accounting.
pub(crate) fn complete(direction: &mut Direction, result: i32) -> Completed {
    let pending = std::mem::replace(&mut direction.pending, Pending::None);
    let idle = |next| Completed { next, written: 0, active: false, eof: false };
    if result == -libc::ECANCELED {
        return idle(Next::Cancelled);
    }
    match pending {
        Pending::Recv | Pending::SpliceIn => match result {
            n if n > 0 => {
                let n = n as usize;
                if pending == Pending::Recv {
                    direction.start = 0;
                    direction.end = n;
                    direction.drained = direction.buffer.as_ref().is_some_and(|b| n < b.len());
                } else if let Some(pipe) = direction.pipe.as_mut() {
                    pipe.buffered += n;
                }
                Completed { next: Next::Advance, written: 0, active: true, eof: false }
            }
            0 => {
                direction.eof = true;
                Completed { next: Next::Advance, written: 0, active: false, eof: true }
            }
            e if e == -libc::EAGAIN => idle(Next::PollIn),
            _ => idle(Next::Reset),
        },
        Pending::Send | Pending::SpliceOut => match result {
            n if n >= 0 => {
                let n = n as usize;
                if pending == Pending::Send {
                    direction.start = (direction.start + n).min(direction.end);
                } else if let Some(pipe) = direction.pipe.as_mut() {
                    pipe.buffered = pipe.buffered.saturating_sub(n);
                }
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
