//! Copy relay: `recv` into a buffer, `send` it on.
//!
//! Never issues a `recv` while received bytes are unsent (a direction has one operation in flight),
//! so a buffer is only ever written by the kernel while no send reads it. A `recv` that waits for
//! data holds no buffer where the worker has a buffer ring: the kernel picks one when data arrives
//! (see `crate::pool::RelayBuffers::recv`).

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types::Fd};

use crate::pool::RelayBuffers;
use crate::ring::Ring;
use crate::tcp::connection::{Direction, Pending};

pub(crate) fn recv(
    ring: &mut Ring,
    direction: &mut Direction,
    buffers: &mut RelayBuffers,
    source: RawFd,
    user_data: u64,
) -> io::Result<()> {
    let poll_first = ring.features.recv_poll_first;
    let entry = buffers.recv(&mut direction.held, source, direction.drained, poll_first).user_data(user_data);
    // SAFETY: a buffer the direction holds is owned by it until the connection is released, which
    // waits for this completion; a ring buffer stays mapped for as long as the ring exists.
    unsafe { ring.push(&entry) }?;
    direction.pending = Pending::Recv;
    Ok(())
}

pub(crate) fn send(
    ring: &mut Ring,
    direction: &mut Direction,
    buffers: &RelayBuffers,
    destination: RawFd,
    user_data: u64,
) -> io::Result<()> {
    let received = buffers.bytes(&direction.held, direction.end);
    let unsent = received
        .get(direction.start..)
        .filter(|unsent| !unsent.is_empty())
        .ok_or_else(|| io::Error::other("copy relay without received bytes"))?;
    let entry = opcode::Send::new(Fd(destination), unsent.as_ptr(), unsent.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data);
    // SAFETY: as in `recv`: the buffer outlives the operation and is given back only after it.
    unsafe { ring.push(&entry) }?;
    direction.pending = Pending::Send;
    Ok(())
}
