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
use crate::tcp::connection::{Direction, Pending};

const FLAGS: libc::c_uint = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// What one [`pump`] did: the usual [`Completed`] plus, on failure, which side failed and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pumped {
    pub completed: Completed,
    /// Bytes read from the source in this turn.
    pub read: usize,
    /// `Some((Pending::Recv, -errno))` when reading the source failed, `Some((Pending::Send,
    /// -errno))` when writing the destination failed: the shape `tcp::backend_failed` takes.
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
        read,
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

/// Writes `bytes` into the empty pipe of a splice direction, as if spliced from its source: the
/// next [`pump`] sends them first. Writes of at most `PIPE_BUF` bytes to a pipe are atomic, so with
/// an empty pipe this is all or nothing, never a short write; longer ones are refused.
pub(crate) fn preload(direction: &mut Direction, bytes: &[u8]) -> io::Result<()> {
    let pipe = direction.pipe.as_mut().ok_or_else(|| io::Error::other("splice direction without a pipe"))?;
    if pipe.buffered > 0 || bytes.len() > libc::PIPE_BUF {
        return Err(io::Error::other("preload needs an empty pipe and at most PIPE_BUF bytes"));
    }
    // SAFETY: writes `bytes.len()` initialised bytes from a live slice to a pipe the direction owns.
    let n = unsafe { libc::write(pipe.write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::other("short write into an empty pipe"));
    }
    pipe.buffered = bytes.len();
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;
    use crate::pool::PipePool;

    /// A connected loopback pair: (the end the test writes or reads, the end the relay uses).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let outer = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (inner, _) = listener.accept().expect("accept");
        inner.set_nonblocking(true).expect("non-blocking");
        outer.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        (outer, inner)
    }

    fn spliced(pipes: &mut PipePool) -> Direction {
        Direction { pipe: Some(pipes.take().expect("pipe")), spliced: true, ..Direction::new() }
    }

    #[test]
    fn pump_moves_bytes_in_budgeted_turns_and_reports_end_of_stream() {
        let mut pipes = PipePool::new(64 * 1024);
        let (mut writer, source) = pair();
        let (mut reader, destination) = pair();
        let mut direction = spliced(&mut pipes);
        let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer_thread = std::thread::spawn(move || {
            writer.write_all(&sent)?;
            writer.shutdown(std::net::Shutdown::Write)
        });
        let reader_thread = std::thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).map(|_| received)
        });
        let mut written = 0u64;
        let mut turns = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            turns += 1;
            assert!(std::time::Instant::now() < deadline, "pump never reached the end of the stream");
            let pumped = pump(&mut direction, source.as_raw_fd(), destination.as_raw_fd(), 16 * 1024);
            assert_eq!(pumped.failure, None);
            written += pumped.completed.written;
            match pumped.completed.next {
                Next::Advance => {
                    assert!(pumped.completed.eof && direction.eof);
                    break;
                }
                // The budget or an empty socket ends a turn; try again (the test has no poll).
                Next::PollIn | Next::PollOut => std::thread::yield_now(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(turns > 1, "a 16 KiB budget cannot move 256 KiB in one turn");
        writer_thread.join().expect("writer").expect("write and FIN");
        assert_eq!(direction.pipe.as_ref().map(|p| p.buffered), Some(0));
        assert_eq!(written, payload.len() as u64);
        drop(destination);
        assert_eq!(reader_thread.join().expect("reader").expect("read"), payload);
    }

    #[test]
    fn a_preloaded_pipe_sends_its_bytes_before_any_of_the_source() {
        let mut pipes = PipePool::new(64 * 1024);
        let (mut writer, source) = pair();
        let (mut reader, destination) = pair();
        let mut direction = spliced(&mut pipes);
        writer.write_all(b"client bytes").expect("the source has bytes already");
        preload(&mut direction, b"HEADER").expect("an empty pipe takes a preload");
        assert_eq!(direction.pipe.as_ref().map(|p| p.buffered), Some(6));
        assert!(preload(&mut direction, b"again").is_err(), "only into an empty pipe");
        let (mut received, mut written) = (Vec::new(), 0u64);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while received.len() < 18 {
            assert!(std::time::Instant::now() < deadline, "the bytes never arrived: {received:?}");
            let pumped = pump(&mut direction, source.as_raw_fd(), destination.as_raw_fd(), 1 << 20);
            assert_eq!(pumped.failure, None);
            written += pumped.completed.written;
            // Reads only what was written, so the blocking read never waits for bytes not sent.
            while (received.len() as u64) < written {
                let mut chunk = [0u8; 64];
                let n = reader.read(&mut chunk).expect("read the destination");
                received.extend_from_slice(&chunk[..n]);
            }
        }
        assert_eq!(received, b"HEADERclient bytes");
        if let Some(pipe) = direction.pipe.take() {
            pipes.give(pipe);
        }
    }

    #[test]
    fn pump_waits_for_a_full_destination_and_reports_a_reset_source() {
        let mut pipes = PipePool::new(1024 * 1024);
        let (mut writer, source) = pair();
        let (_reader, destination) = pair();
        let mut direction = spliced(&mut pipes);
        // Nobody reads the destination: once its buffers fill, the pump must wait for POLLOUT.
        let chunk = vec![7u8; 1024 * 1024];
        let mut next = Next::PollIn;
        for _ in 0..64 {
            writer.set_nonblocking(true).expect("non-blocking writer");
            let _ = writer.write(&chunk);
            next = pump(&mut direction, source.as_raw_fd(), destination.as_raw_fd(), 1 << 20).completed.next;
            if next == Next::PollOut {
                break;
            }
        }
        assert_eq!(next, Next::PollOut, "a destination nobody reads fills up");
        assert!(direction.pipe.as_ref().is_some_and(|p| p.buffered > 0), "the unsent bytes stay in the pipe");

        // A source that resets is an error on the read side, not an end of stream.
        let (peer, source) = pair();
        socket2::SockRef::from(&peer).set_linger(Some(Duration::ZERO)).expect("linger");
        drop(peer);
        let mut direction = spliced(&mut pipes);
        let mut pumped = pump(&mut direction, source.as_raw_fd(), destination.as_raw_fd(), 1 << 20);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pumped.completed.next == Next::PollIn && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            pumped = pump(&mut direction, source.as_raw_fd(), destination.as_raw_fd(), 1 << 20);
        }
        assert_eq!(pumped.completed.next, Next::Reset);
        assert_eq!(pumped.failure, Some((Pending::Recv, -libc::ECONNRESET)));
    }
}
