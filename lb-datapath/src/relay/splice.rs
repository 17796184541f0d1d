//! Splice relay: socket→pipe→socket with `splice(2)` called inline by the worker, driven by
//! io_uring polls (`POLL_ADD`) for readiness.
//!
//! Why inline and not `IORING_OP_SPLICE`: io_uring cannot splice from a socket without handing the
//! operation to an io-wq thread, so every splice costs two thread hand-offs (measured as 30–41 % of
//! the machine on small messages, `bench/results/analysis.md`). With `SPLICE_F_NONBLOCK` on a
//! non-blocking socket the system call never blocks, so the worker moves the bytes itself once a
//! poll said "readable" (or "writable") and only goes back to the ring to wait.
//!
//! Invariants: bytes are only read into an empty pipe (a direction drains its pipe before reading
//! again), so `Pipe::buffered` is exact; one [`pump`] moves at most its budget before yielding, so
//! one bulk connection cannot starve the others of a worker.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::{Completed, Next};
use crate::connection::{Direction, Pending};

const FLAGS: libc::c_uint = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// What one [`pump`] did: the usual [`Completed`] plus, on failure, which side failed and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pumped {
    pub completed: Completed,
    /// `Some((Pending::Recv, -errno))` when reading the source failed, `Some((Pending::Send,
    /// -errno))` when writing the destination failed: the shape `proxy::backend_failed` takes.
    pub failure: Option<(Pending, i32)>,
}

/// Moves bytes of a splice direction from `source` to `destination` until the source has nothing
/// more (→ `PollIn`), the destination is full (→ `PollOut`), the source ended (→ `Advance` with
/// `eof`, the caller propagates it), an error (→ `Reset`), or `budget` bytes were read (→ `PollIn`,
/// which fires at once if more is waiting, so other connections get their turn in between).
pub(crate) fn pump(direction: &mut Direction, source: RawFd, destination: RawFd, budget: usize) -> Pumped {
    let mut written = 0u64;
    let mut read = 0usize;
    let done = |next, written: u64, read: usize, failure| Pumped {
        completed: Completed { next, written, active: written > 0 || read > 0, eof: false },
        failure,
    };
    let Some(pipe) = direction.pipe.as_mut() else {
        return done(Next::Reset, 0, 0, None);
    };
    loop {
        if pipe.buffered > 0 {
            match splice(pipe.read.as_raw_fd(), destination, pipe.buffered) {
                // A socket that takes nothing is as full as one that says EAGAIN.
                Ok(0) => return done(Next::PollOut, written, read, None),
                Ok(n) => {
                    pipe.buffered = pipe.buffered.saturating_sub(n);
                    written += n as u64;
                    continue;
                }
                Err(errno) if errno == libc::EAGAIN => return done(Next::PollOut, written, read, None),
                Err(errno) => return done(Next::Reset, written, read, Some((Pending::Send, -errno))),
            }
        }
        if read >= budget {
            return done(Next::PollIn, written, read, None);
        }
        match splice(source, pipe.write.as_raw_fd(), pipe.capacity) {
            Ok(0) => {
                direction.eof = true;
                let mut pumped = done(Next::Advance, written, read, None);
                pumped.completed.eof = true;
                return pumped;
            }
            Ok(n) => {
                pipe.buffered += n;
                read += n;
            }
            Err(errno) if errno == libc::EAGAIN => return done(Next::PollIn, written, read, None),
            Err(errno) => return done(Next::Reset, written, read, Some((Pending::Recv, -errno))),
        }
    }
}

/// One non-blocking `splice(2)` of up to `len` bytes; `Err(errno)` on failure (`EINTR` retried).
fn splice(from: RawFd, to: RawFd, len: usize) -> Result<usize, i32> {
    loop {
        // SAFETY: null offsets (both ends are a socket or a pipe); the fds belong to the connection,
        // which is only released by the worker that is running this call.
        let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, FLAGS) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}
