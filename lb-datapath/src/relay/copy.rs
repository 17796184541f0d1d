//! Copy relay: `recv` into the direction's pooled buffer, `send` it on.
//!
//! Never issues a `recv` while received bytes are unsent (a direction has one operation in flight),
//! so the buffer is only ever written by the kernel while no send reads it.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types::Fd};

use crate::connection::{Direction, Pending};
use crate::ring::Ring;

/// `IORING_RECVSEND_POLL_FIRST` from `<linux/io_uring.h>` (the `io-uring` crate keeps its `sys` private).
const RECVSEND_POLL_FIRST: u16 = 1;

pub(crate) fn recv(
    ring: &mut Ring,
    direction: &mut Direction,
    source: RawFd,
    user_data: u64,
) -> io::Result<()> {
    let buffer = direction.buffer.as_mut().ok_or_else(|| io::Error::other("copy relay without a buffer"))?;
    let ioprio = if direction.drained && ring.features.recv_poll_first { RECVSEND_POLL_FIRST } else { 0 };
    let entry = opcode::Recv::new(Fd(source), buffer.as_mut_ptr(), buffer.len() as u32)
        .ioprio(ioprio)
        .build()
        .user_data(user_data);
    // SAFETY: the buffer is a heap allocation owned by the connection's slot; it is given back to the
    // pool only when the connection is released, which waits for this completion.
    unsafe { ring.push(&entry) }?;
    direction.pending = Pending::Recv;
    Ok(())
}

pub(crate) fn send(
    ring: &mut Ring,
    direction: &mut Direction,
    destination: RawFd,
    user_data: u64,
) -> io::Result<()> {
    let buffer = direction.buffer.as_ref().ok_or_else(|| io::Error::other("copy relay without a buffer"))?;
    let unsent = &buffer[direction.start..direction.end];
    let entry = opcode::Send::new(Fd(destination), unsent.as_ptr(), unsent.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data);
    // SAFETY: as in `recv`: the buffer outlives the operation.
    unsafe { ring.push(&entry) }?;
    direction.pending = Pending::Send;
    Ok(())
}
