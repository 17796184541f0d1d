//! Per-worker relay memory: the buffers of the copy relay and the pipes of the splice relay.
//!
//! Both are owned by one worker and never shared. Everything taken is given back on every path;
//! the `in_use` counts are exported as gauges so tests can check they return to zero.
//!
//! Copy buffers ([`RelayBuffers`]): a direction holds a buffer only while received bytes wait to be
//! sent ([`Held`]). A receive draws its buffer from the worker's provided-buffer ring
//! ([`crate::bufring`]) when data arrives, so an idle connection holds none. When the ring is
//! empty at that moment (`ENOBUFS`) the receive is repeated into a buffer of the fallback pool;
//! without a ring (a kernel before 5.19) every receive takes one from the pool, as it waits.
//!
//! Pipes ([`PipePool`]): a pipe is only reused when it is empty: one given back with bytes still
//! inside (an aborted transfer) is closed instead, so stale bytes never leak into another
//! connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types::Fd};

use crate::bufring::BufRing;

/// Idle fallback buffers kept for reuse beyond which returned ones are freed.
const MAX_IDLE: usize = 256;

/// Idle pipes kept for reuse. Fewer than buffers: only bulk directions (or `--relay splice`) take a
/// pipe, and each idle one holds two fds and its 1 MiB slot array (no data pages).
const MAX_IDLE_PIPES: usize = 256;

/// `IORING_RECVSEND_POLL_FIRST` from `<linux/io_uring.h>` (the `io-uring` crate keeps its `sys` private).
const RECVSEND_POLL_FIRST: u16 = 1;

/// Buffer group of the TCP copy relay's ring (UDP's is `udp::socket::BUFFER_GROUP`).
pub(crate) const RELAY_BUFFER_GROUP: u16 = 1;

/// The buffer a copy direction holds.
#[derive(Debug, Default)]
pub(crate) enum Held {
    /// None: nothing received waits to be sent.
    #[default]
    None,
    /// Buffer `bid` of the ring, picked by the kernel for the last receive.
    Lent(u16),
    /// A buffer of the fallback pool.
    Own(Box<[u8]>),
}

/// The copy relay's buffers: the provided-buffer ring and the fallback pool. See the module doc.
pub(crate) struct RelayBuffers {
    ring: Option<BufRing>,
    free: Vec<Box<[u8]>>,
    size: usize,
    /// Buffers held by directions (lent by the ring or taken from the pool).
    pub in_use: usize,
    /// Receives that found the ring empty (and were repeated into a pool buffer).
    pub exhausted: u64,
}

impl RelayBuffers {
    /// `ring`: `None` when the kernel refused one; every receive then takes a pool buffer of `size`.
    pub fn new(ring: Option<BufRing>, size: usize) -> Self {
        let size = ring.as_ref().map_or(size.max(4096), BufRing::size);
        RelayBuffers { ring, free: Vec::new(), size, in_use: 0, exhausted: 0 }
    }

    /// The receive a direction holding `held` issues on `fd`.
    ///
    /// Holding no buffer, it draws one from the ring when data arrives: a receive that finds
    /// nothing leaves the buffer in the ring while the kernel waits for readability, so a waiting
    /// direction holds none. A `drained` source (the last receive did not fill its buffer)
    /// probably has nothing yet, so the receive waits for readability first (`poll_first`, when
    /// the kernel has `IORING_RECVSEND_POLL_FIRST`) rather than try in vain. A direction holding a
    /// pool buffer (the ring was empty) receives into it; without a ring every receive takes a pool
    /// buffer, and holds it while it waits.
    pub fn recv(&mut self, held: &mut Held, fd: RawFd, drained: bool, poll_first: bool) -> squeue::Entry {
        let ioprio = if drained && poll_first { RECVSEND_POLL_FIRST } else { 0 };
        // A direction receives only with nothing left to send: a lent buffer is done with.
        if let Held::Lent(_) = held {
            self.release(held);
        }
        if let (Held::None, Some(ring)) = (&*held, &self.ring) {
            return opcode::Recv::new(Fd(fd), std::ptr::null_mut(), 0)
                .buf_group(ring.group())
                .ioprio(ioprio)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT);
        }
        if let Held::None = held {
            *held = Held::Own(self.take());
        }
        let buffer: &mut [u8] = match held {
            Held::Own(buffer) => buffer,
            Held::None | Held::Lent(_) => &mut [],
        };
        opcode::Recv::new(Fd(fd), buffer.as_mut_ptr(), buffer.len() as u32).ioprio(ioprio).build()
    }

    /// Accounts a receive's completion: the buffer the kernel picked becomes the direction's when
    /// it carries bytes, and goes straight back otherwise (end of stream, an error). An empty ring
    /// (`ENOBUFS` for a receive that held no buffer) gives the direction a pool buffer to repeat
    /// the receive into: returns true then.
    pub fn received(&mut self, held: &mut Held, result: i32, flags: u32) -> bool {
        if let (Some(bid), Some(ring)) = (cqueue::buffer_select(flags), self.ring.as_mut()) {
            if result > 0 && matches!(held, Held::None) {
                *held = Held::Lent(bid);
                self.in_use += 1;
            } else {
                ring.recycle(bid);
            }
            return false;
        }
        if result == -libc::ENOBUFS && self.ring.is_some() && matches!(held, Held::None) {
            self.exhausted += 1;
            *held = Held::Own(self.take());
            return true;
        }
        false
    }

    /// Bytes of a ring buffer, and of a pool buffer (what one receive can fill).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The capacity of the buffer a direction holds (what a receive into it could fill).
    pub fn capacity(&self, held: &Held) -> usize {
        match held {
            Held::Own(buffer) => buffer.len(),
            Held::Lent(_) | Held::None => self.size,
        }
    }

    /// The first `end` bytes of the buffer a direction holds.
    pub fn bytes<'a>(&'a self, held: &'a Held, end: usize) -> &'a [u8] {
        match (held, &self.ring) {
            (Held::Own(buffer), _) => &buffer[..end.min(buffer.len())],
            (Held::Lent(bid), Some(ring)) => ring.filled(*bid, end),
            _ => &[],
        }
    }

    /// Gives back the buffer a direction holds, if any.
    pub fn release(&mut self, held: &mut Held) {
        match std::mem::take(held) {
            Held::None => {}
            Held::Lent(bid) => {
                self.in_use -= 1;
                if let Some(ring) = self.ring.as_mut() {
                    ring.recycle(bid);
                }
            }
            Held::Own(buffer) => {
                self.in_use -= 1;
                if self.free.len() < MAX_IDLE {
                    self.free.push(buffer);
                }
            }
        }
    }

    /// Gives up the ring's memory without unmapping it: receives the kernel may still complete
    /// into it outlived the worker (see `Worker::finish_stop`).
    pub fn leak_ring(&mut self) {
        std::mem::forget(self.ring.take());
    }

    /// Makes a direction holding nothing hold a pool buffer that starts with `bytes` (cut to a
    /// buffer's size), as if they had been received; returns how many it holds.
    pub fn preload(&mut self, held: &mut Held, bytes: &[u8]) -> usize {
        self.release(held);
        let mut buffer = self.take();
        let len = bytes.len().min(buffer.len());
        buffer[..len].copy_from_slice(&bytes[..len]);
        *held = Held::Own(buffer);
        len
    }

    fn take(&mut self) -> Box<[u8]> {
        self.in_use += 1;
        self.free.pop().unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }
}

/// One pipe and how many bytes sit in it.
pub(crate) struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub buffered: usize,
    pub capacity: usize,
}

/// Pipes for the splice relay, each sized once with `F_SETPIPE_SZ`.
pub(crate) struct PipePool {
    free: Vec<Pipe>,
    size: usize,
    /// `fs.pipe-max-size`, read once the first time the wanted size is refused (never again: a
    /// connection's path must not read `/proc`).
    max_size: Option<Option<usize>>,
    pub in_use: usize,
}

impl PipePool {
    pub fn new(size: usize) -> Self {
        PipePool { free: Vec::new(), size, max_size: None, in_use: 0 }
    }

    pub fn take(&mut self) -> io::Result<Pipe> {
        let pipe = match self.free.pop() {
            Some(pipe) => pipe,
            None => new_pipe(self.size, &mut self.max_size)?,
        };
        self.in_use += 1;
        Ok(pipe)
    }

    /// Pipes kept open for reuse.
    #[inline]
    pub fn idle(&self) -> usize {
        self.free.len()
    }

    pub fn give(&mut self, pipe: Pipe) {
        self.in_use -= 1;
        if pipe.buffered == 0 && self.free.len() < MAX_IDLE_PIPES {
            self.free.push(pipe);
        }
    }
}

/// `fs.pipe-max-size`, the largest size an unprivileged process may set.
fn pipe_max_size() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size").ok().and_then(|text| text.trim().parse().ok())
}

fn new_pipe(size: usize, max_size: &mut Option<Option<usize>>) -> io::Result<Pipe> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: plain fcntl on an fd we own. Above fs.pipe-max-size an unprivileged process is
    // refused (EPERM): it then gets the largest size it may have. Any refusal only costs throughput.
    let mut set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    if set <= 0
        && let Some(max) = max_size.get_or_insert_with(pipe_max_size).filter(|&max| max < size)
    {
        // SAFETY: as above.
        set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, max as libc::c_int) };
    }
    let capacity = if set > 0 {
        set
    } else {
        // SAFETY: plain fcntl on an fd we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }
    };
    let capacity = usize::try_from(capacity).unwrap_or(0);
    Ok(Pipe { read, write, buffered: 0, capacity: capacity.max(4096) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_ring_a_receive_takes_a_pool_buffer_that_is_reused_and_counted() {
        let mut buffers = RelayBuffers::new(None, 8192);
        let mut held = Held::None;
        let _ = buffers.recv(&mut held, 0, true, true);
        let Held::Own(buffer) = &held else { panic!("a pool buffer: {held:?}") };
        let ptr = buffer.as_ptr();
        assert_eq!((buffers.in_use, buffers.capacity(&held)), (1, 8192));
        buffers.release(&mut held);
        assert!(matches!(held, Held::None));
        assert_eq!(buffers.in_use, 0);
        let _ = buffers.recv(&mut held, 0, false, true);
        let Held::Own(again) = &held else { panic!("a pool buffer: {held:?}") };
        assert_eq!(again.as_ptr(), ptr);
        buffers.release(&mut held);
    }

    /// Submits `entries` (user data = index into `held`) and waits for one completion of each.
    fn complete_all(ring: &mut crate::ring::Ring, entries: Vec<squeue::Entry>) -> Vec<(u64, i32, u32)> {
        let want = entries.len();
        for entry in entries {
            // SAFETY: every buffer these receives may write is owned by the test's `RelayBuffers`
            // or `Held` values, which outlive the ring's completions reaped below.
            unsafe { ring.push(&entry) }.expect("push");
        }
        let mut all = Vec::new();
        let mut batch = Vec::new();
        while all.len() < want {
            ring.submit_and_wait(1).expect("submit");
            ring.reap(&mut batch);
            all.append(&mut batch);
        }
        all
    }

    #[test]
    fn waiting_receives_hold_no_buffer_and_an_empty_ring_falls_back_to_the_pool() {
        use std::io::Write;
        use std::os::unix::net::UnixStream;

        let mut ring = crate::ring::Ring::new(16, 32).expect("io_uring");
        let provided = BufRing::register(&ring, 2, 4096, RELAY_BUFFER_GROUP).expect("a buffer ring (5.19+)");
        let mut buffers = RelayBuffers::new(Some(provided), 64 * 1024);
        assert_eq!(buffers.capacity(&Held::None), 4096, "the ring's buffers set the size");
        let pairs: Vec<(UnixStream, UnixStream)> = (0..3)
            .map(|_| {
                let (ours, theirs) = UnixStream::pair().expect("socketpair");
                ours.set_nonblocking(true).expect("nonblocking");
                (ours, theirs)
            })
            .collect();
        let mut held = [Held::None, Held::None, Held::None];
        let receives =
            |buffers: &mut RelayBuffers, held: &mut [Held; 3], drained: bool| -> Vec<squeue::Entry> {
                pairs
                    .iter()
                    .zip(held.iter_mut())
                    .enumerate()
                    .map(|(i, ((ours, _), held))| {
                        buffers.recv(held, ours.as_raw_fd(), drained, true).user_data(i as u64)
                    })
                    .collect()
            };
        // Three drained directions wait for data: none of them holds a buffer.
        let entries = receives(&mut buffers, &mut held, true);
        assert_eq!(buffers.in_use, 0);
        assert!(held.iter().all(|h| matches!(h, Held::None)), "{held:?}");
        for (i, (_, theirs)) in pairs.iter().enumerate() {
            (&*theirs).write_all(format!("message {i}").as_bytes()).expect("write");
        }
        // Data arrives on all three: two receives take the ring's two buffers, the third finds it
        // empty and gets a pool buffer to read into.
        let mut retried = Vec::new();
        for (index, result, flags) in complete_all(&mut ring, entries) {
            let i = index as usize;
            if buffers.received(&mut held[i], result, flags) {
                assert_eq!(result, -libc::ENOBUFS);
                assert!(matches!(held[i], Held::Own(_)), "{:?}", held[i]);
                retried.push(i);
            } else {
                assert!(matches!(held[i], Held::Lent(_)), "{:?}", held[i]);
                assert_eq!(buffers.bytes(&held[i], result as usize), format!("message {i}").as_bytes());
            }
        }
        assert_eq!((retried.len(), buffers.exhausted, buffers.in_use), (1, 1, 3));
        // The repeated receive reads the waiting bytes into its pool buffer.
        let i = retried[0];
        let entry = buffers.recv(&mut held[i], pairs[i].0.as_raw_fd(), false, true).user_data(i as u64);
        let (_, result, flags) = complete_all(&mut ring, vec![entry])[0];
        assert!(!buffers.received(&mut held[i], result, flags));
        assert_eq!(buffers.bytes(&held[i], result as usize), format!("message {i}").as_bytes());
        for h in &mut held {
            buffers.release(h);
        }
        assert_eq!(buffers.in_use, 0);
        // A receive that tries at once (not drained) and finds nothing waits in the kernel without
        // taking a ring buffer: two other receives still get both.
        let waiting = buffers.recv(&mut held[0], pairs[0].0.as_raw_fd(), false, true).user_data(0);
        // SAFETY: as in `complete_all`.
        unsafe { ring.push(&waiting) }.expect("push");
        ring.submit_and_wait(0).expect("submit");
        let entries: Vec<_> = receives(&mut buffers, &mut held, false).into_iter().skip(1).collect();
        for (_, theirs) in &pairs[1..] {
            (&*theirs).write_all(b"while one waits").expect("write");
        }
        for (index, result, flags) in complete_all(&mut ring, entries) {
            let i = index as usize;
            assert!(!buffers.received(&mut held[i], result, flags), "the ring had both buffers");
            assert_eq!(buffers.bytes(&held[i], result as usize), b"while one waits");
            buffers.release(&mut held[i]);
        }
        (&pairs[0].1).write_all(b"at last").expect("write");
        let mut batch = Vec::new();
        while batch.is_empty() {
            ring.submit_and_wait(1).expect("submit");
            ring.reap(&mut batch);
        }
        let (_, result, flags) = batch[0];
        assert!(!buffers.received(&mut held[0], result, flags));
        assert_eq!(buffers.bytes(&held[0], result as usize), b"at last");
        buffers.release(&mut held[0]);
        // An end of stream may take a ring buffer with it: it goes straight back.
        let entry = buffers.recv(&mut held[2], pairs[2].0.as_raw_fd(), true, true).user_data(2);
        pairs[2].1.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let (_, result, flags) = complete_all(&mut ring, vec![entry])[0];
        assert_eq!(result, 0, "end of stream");
        assert!(!buffers.received(&mut held[2], result, flags));
        assert!(matches!(held[2], Held::None), "no buffer kept for an end of stream: {:?}", held[2]);
        // Both ring buffers came back: two new messages take them without falling back.
        let entries: Vec<_> = receives(&mut buffers, &mut held, true).into_iter().take(2).collect();
        for (_, theirs) in &pairs[..2] {
            (&*theirs).write_all(b"again").expect("write");
        }
        for (index, result, flags) in complete_all(&mut ring, entries) {
            let i = index as usize;
            assert!(!buffers.received(&mut held[i], result, flags));
            assert_eq!(buffers.bytes(&held[i], result as usize), b"again");
        }
        assert_eq!((buffers.exhausted, buffers.in_use), (1, 2));
        for h in &mut held {
            buffers.release(h);
        }
        assert_eq!(buffers.in_use, 0);
    }

    #[test]
    fn non_empty_pipe_is_not_reused() {
        let mut pool = PipePool::new(256 * 1024);
        let mut pipe = pool.take().expect("pipe2 works");
        assert!(pipe.capacity >= 4096);
        pipe.buffered = 10;
        pool.give(pipe);
        assert_eq!(pool.in_use, 0);
        assert!(pool.free.is_empty());
        let pipe = pool.take().expect("pipe2 works");
        pool.give(pipe);
        assert_eq!(pool.free.len(), 1);
    }
}
