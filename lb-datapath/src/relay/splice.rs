//! Splice relay: socket→pipe→socket with `SPLICE_F_NONBLOCK`, only after a poll said "readable".
//!
//! Never splices into a pipe that still holds bytes (a direction has one operation in flight and
//! drains the pipe before reading again), so `Pipe::buffered` is exact.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types::Fd};

use crate::connection::{Direction, Pending};
use crate::ring::Ring;

const FLAGS: u32 = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

pub(crate) fn splice_in(
    ring: &mut Ring,
    direction: &mut Direction,
    source: RawFd,
    user_data: u64,
) -> io::Result<()> {
    let pipe = direction.pipe.as_ref().ok_or_else(|| io::Error::other("splice relay without a pipe"))?;
    let room = pipe.capacity.saturating_sub(pipe.buffered).max(1);
    let entry = opcode::Splice::new(Fd(source), -1, Fd(pipe.write.as_raw_fd()), -1, room as u32)
        .flags(FLAGS)
        .build()
        .user_data(user_data);
    // SAFETY: splice reads no user memory; the pipe and socket fds belong to the connection, which is
    // released (and the pipe returned) only after this completion.
    unsafe { ring.push(&entry) }?;
    direction.pending = Pending::SpliceIn;
    Ok(())
}

pub(crate) fn splice_out(
    ring: &mut Ring,
    direction: &mut Direction,
    destination: RawFd,
    user_data: u64,
) -> io::Result<()> {
    let pipe = direction.pipe.as_ref().ok_or_else(|| io::Error::other("splice relay without a pipe"))?;
    let entry = opcode::Splice::new(Fd(pipe.read.as_raw_fd()), -1, Fd(destination), -1, pipe.buffered as u32)
        .flags(FLAGS)
        .build()
        .user_data(user_data);
    // SAFETY: as in `splice_in`.
    unsafe { ring.push(&entry) }?;
    direction.pending = Pending::SpliceOut;
    Ok(())
}
