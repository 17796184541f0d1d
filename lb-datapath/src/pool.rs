//! Per-worker pools of relay buffers (copy relay) and pipes (splice relay).
//!
//! A pool is owned by one worker and never shared. Everything taken is given back on every path;
//! the `in_use` counts are exported as gauges so tests can check they return to zero. A pipe is only
//! reused when it is empty: one given back with bytes still inside (an aborted transfer) is closed
//! instead, so stale bytes never leak into another connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Idle buffers kept for reuse beyond which returned ones are freed.
const MAX_IDLE: usize = 4096;

/// Idle pipes kept for reuse. Fewer than buffers: only bulk directions (or `--relay splice`) take a
/// pipe, and each idle one holds two fds and its 1 MiB slot array (no data pages).
const MAX_IDLE_PIPES: usize = 256;

/// Fixed-size byte buffers for the copy relay.
pub(crate) struct BufferPool {
    free: Vec<Box<[u8]>>,
    size: usize,
    pub in_use: usize,
}

impl BufferPool {
    pub fn new(size: usize) -> Self {
        BufferPool { free: Vec::new(), size: size.max(4096), in_use: 0 }
    }

    pub fn take(&mut self) -> Box<[u8]> {
        self.in_use += 1;
        self.free.pop().unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    pub fn give(&mut self, buffer: Box<[u8]>) {
        self.in_use -= 1;
        if self.free.len() < MAX_IDLE {
            self.free.push(buffer);
        }
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
    fn buffers_are_reused_and_counted() {
        let mut pool = BufferPool::new(8192);
        let a = pool.take();
        let ptr = a.as_ptr();
        assert_eq!(pool.in_use, 1);
        pool.give(a);
        assert_eq!(pool.in_use, 0);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr);
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
