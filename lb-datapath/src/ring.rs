//! The io_uring ring of one worker: kernel feature probing, `user_data` encoding and submission.
//!
//! `user_data` packs an [`OpKind`], a slot index and the slot's generation, so a completion for a slot
//! that was freed and reused since the operation was submitted is recognised (generation mismatch)
//! and ignored. This module never interprets completions; the worker does.
//!
//! Invariant: every buffer, address or timespec an entry points to stays alive and unmoved until the
//! kernel has consumed it (callers of [`Ring::push`] promise this; see its safety contract).
//!
//! Completions: the completion queue is sized for what can be in flight ([`completion_entries`]),
//! so it does not overflow in normal operation; should it (a burst of multishot completions), the
//! kernel keeps the extra ones in its overflow list and sets a flag, which is counted
//! ([`RingCounters`]), and a submission it then refuses (`EBUSY`, or `EAGAIN` when it is short of
//! memory) is retried after moving the completions out of the way into a stash that [`Ring::reap`]
//! hands out first. A full submission queue means submit and retry, never a failed operation.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::squeue::{Entry, Flags};
use io_uring::types::{Fd, Timespec};
use io_uring::{IoUring, Probe, opcode};
use socket2::SockAddr;

use crate::dir::Dir;

/// What a completion belongs to. Stored in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpKind {
    /// The worker's eventfd read: a snapshot was published or the engine stops.
    Wake = 1,
    /// The coarse housekeeping timer.
    Tick = 2,
    /// An accept (multishot or single-shot) on a listener slot.
    Accept = 3,
    /// A backend connect of a connection slot.
    Connect = 4,
    /// The link timeout attached to a connect.
    ConnectTimeout = 5,
    /// The single outstanding operation of the client→backend direction.
    ClientToBackend = 6,
    /// The single outstanding operation of the backend→client direction.
    BackendToClient = 7,
    /// An `AsyncCancel` request; its completion carries no state.
    Cancel = 8,
    /// The receive armed on a UDP VIP socket (slot = the worker's UDP VIP slot).
    UdpVip = 9,
    /// The receive armed on a UDP flow's upstream socket (slot = flow table slot).
    UdpFlow = 10,
    /// A UDP send from a receive buffer (slot = buffer id, generation = [`Dir::index`]).
    UdpSend = 11,
    /// An accept on an SCTP listener slot.
    SctpAccept = 12,
    /// A backend connect of an SCTP association slot.
    SctpConnect = 13,
    /// The link timeout attached to an SCTP connect.
    SctpConnectTimeout = 14,
    /// The single outstanding receive or send of an SCTP association's client→backend direction.
    SctpClientToBackend = 15,
    /// The same for backend→client.
    SctpBackendToClient = 16,
}

impl OpKind {
    /// The kind of a TCP connection's relay operation in `dir`.
    #[inline]
    pub fn tcp_relay(dir: Dir) -> OpKind {
        match dir {
            Dir::ToBackend => OpKind::ClientToBackend,
            Dir::ToClient => OpKind::BackendToClient,
        }
    }

    /// The kind of an SCTP association's relay operation in `dir`.
    #[inline]
    pub fn sctp_relay(dir: Dir) -> OpKind {
        match dir {
            Dir::ToBackend => OpKind::SctpClientToBackend,
            Dir::ToClient => OpKind::SctpBackendToClient,
        }
    }

    fn from_u8(value: u8) -> Option<OpKind> {
        Some(match value {
            1 => OpKind::Wake,
            2 => OpKind::Tick,
            3 => OpKind::Accept,
            4 => OpKind::Connect,
            5 => OpKind::ConnectTimeout,
            6 => OpKind::ClientToBackend,
            7 => OpKind::BackendToClient,
            8 => OpKind::Cancel,
            9 => OpKind::UdpVip,
            10 => OpKind::UdpFlow,
            11 => OpKind::UdpSend,
            12 => OpKind::SctpAccept,
            13 => OpKind::SctpConnect,
            14 => OpKind::SctpConnectTimeout,
            15 => OpKind::SctpClientToBackend,
            16 => OpKind::SctpBackendToClient,
            _ => return None,
        })
    }
}

/// Generations wrap at 24 bits; a completion 16 million reuses late would be misattributed, which the
/// in-flight accounting of a slot (it is only freed when nothing is in flight) makes impossible anyway.
pub(crate) const GENERATION_MASK: u32 = 0x00FF_FFFF;

/// The decoded `user_data` of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UserData {
    pub kind: OpKind,
    pub slot: u32,
    pub generation: u32,
}

impl UserData {
    pub fn new(kind: OpKind, slot: u32, generation: u32) -> Self {
        UserData { kind, slot, generation: generation & GENERATION_MASK }
    }

    pub fn encode(self) -> u64 {
        (self.kind as u64) << 56 | u64::from(self.generation & GENERATION_MASK) << 32 | u64::from(self.slot)
    }

    pub fn decode(raw: u64) -> Option<UserData> {
        let kind = OpKind::from_u8((raw >> 56) as u8)?;
        Some(UserData { kind, slot: raw as u32, generation: (raw >> 32) as u32 & GENERATION_MASK })
    }
}

/// What this kernel's io_uring can do, probed once per ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFeatures {
    /// `IORING_ACCEPT_MULTISHOT` (5.19). Not probeable as an opcode; inferred from `IORING_OP_SOCKET`
    /// (same release) and turned off at run time if an accept fails with `EINVAL`.
    pub multishot_accept: bool,
    /// Multishot `recvmsg` (`IORING_RECV_MULTISHOT`, 6.0). Not probeable as an opcode; inferred from
    /// `IORING_OP_SEND_ZC` (same release) and turned off at run time if a receive fails with `EINVAL`.
    pub multishot_recvmsg: bool,
    /// `IORING_RECVSEND_POLL_FIRST` (5.19): a receive waits for readability before its first try.
    /// Not probeable; inferred from `IORING_OP_SOCKET` (same release).
    pub recv_poll_first: bool,
}

/// Opcodes the worker cannot run without.
const REQUIRED: &[(u8, &str)] = &[
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Read::CODE, "READ"),
];

/// What the kernel reads when a backend connect is submitted: the address and the linked timeout.
/// It lives in the connection's boxed slot, so it stays put until the kernel has copied it.
pub(crate) struct ConnectTarget {
    addr: SockAddr,
    timeout: Timespec,
}

impl ConnectTarget {
    pub fn unset() -> ConnectTarget {
        ConnectTarget {
            addr: SockAddr::from(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
            timeout: Timespec::new(),
        }
    }
}

/// One worker's ring.
pub(crate) struct Ring {
    uring: IoUring,
    pub features: RingFeatures,
    /// Times queued entries were handed to the kernel (see [`Ring::submissions`]).
    submissions: u64,
    /// Completions moved out of the queue so a refused submission could be retried; reaped first.
    stash: Vec<(u64, i32, u32)>,
    pub counters: RingCounters,
}

/// What the ring saw of completion-queue pressure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RingCounters {
    /// Submissions found with the kernel's overflow flag set: completions waited in its overflow
    /// list because the queue was full (none were lost).
    pub overflowed: u64,
    /// The kernel's count of completions it had to drop (it could not even keep them): should stay
    /// 0; each one is an operation whose outcome the worker never learns.
    pub dropped: u64,
    /// Submissions the kernel refused for the moment (`EBUSY`, `EAGAIN`) and that were retried.
    pub retried: u64,
}

/// Submission retries before a refused submission counts as a ring failure.
const SUBMIT_RETRIES: u32 = 64;

/// Completion-queue entries for a ring whose worker holds at most `connections` TCP connections
/// (or SCTP associations) and `flows` UDP flows, with `buffers` UDP receive buffers: each
/// connection has at most four operations in flight (a connect and its timeout, or one per relay
/// direction, plus cancels in their place), each flow one receive, each buffer one receive or send
/// completion; at least twice the submission queue, at most what the kernel allows (the ring is
/// set up with `IORING_SETUP_CLAMP`).
pub(crate) fn completion_entries(sq_entries: u32, connections: usize, flows: usize, buffers: usize) -> u32 {
    let wanted = 4 * connections + flows + 2 * buffers + 64;
    let wanted = u32::try_from(wanted).unwrap_or(u32::MAX).max(2 * sq_entries);
    wanted.checked_next_power_of_two().unwrap_or(MAX_CQ_ENTRIES).min(MAX_CQ_ENTRIES)
}

/// The kernel's `IORING_MAX_CQ_ENTRIES`.
const MAX_CQ_ENTRIES: u32 = 65_536;

impl Ring {
    /// Sets up a ring of `entries` submission slots and `completions` completion slots (see
    /// [`completion_entries`]) and probes its features.
    pub fn new(entries: u32, completions: u32) -> io::Result<Ring> {
        // Single-issuer (6.0) and coop-taskrun (5.19) are optimisations; older kernels refuse them.
        // Defer-taskrun (6.1) was measured too (bench/compare, interleaved A/B on tcp-rr, tcp-crr,
        // HTTP and bulk): no gain within the noise and a worse tcp-crr tail, so it is not used.
        let uring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(completions)
            .setup_clamp()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(completions).setup_clamp().build(entries))?;
        let mut probe = Probe::new();
        uring.submitter().register_probe(&mut probe)?;
        if let Some((_, name)) = REQUIRED.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("kernel io_uring lacks IORING_OP_{name}"),
            ));
        }
        let features = RingFeatures {
            multishot_accept: probe.is_supported(opcode::Socket::CODE),
            multishot_recvmsg: probe.is_supported(opcode::SendZc::CODE),
            recv_poll_first: probe.is_supported(opcode::Socket::CODE),
        };
        Ok(Ring { uring, features, submissions: 0, stash: Vec::new(), counters: RingCounters::default() })
    }

    /// The completion-queue size the kernel granted.
    pub fn completion_capacity(&self) -> u32 {
        self.uring.params().cq_entries()
    }

    /// How many times queued entries were handed to the kernel so far. The ring has no SQPOLL thread,
    /// so the kernel reads a queued entry (and, for `sendmsg`, copies the `msghdr` and iovecs it points
    /// to) only when submitted: while this count is unchanged since an entry was pushed, the memory it
    /// points to may still be changed (the UDP datapath grows a queued GSO send this way).
    pub fn submissions(&self) -> u64 {
        self.submissions
    }

    /// Hands every queued entry to the kernel now, without waiting. For callers about to close an fd
    /// that a queued entry names: the kernel resolves fds at submission and then holds their files.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.submit_with(0)
    }

    /// Submits, waiting for `want` completions; a submission the kernel refuses for the moment
    /// (`EBUSY`: its completion queue overflowed; `EAGAIN`: it is short of memory) is retried after
    /// moving the completions into the stash, up to [`SUBMIT_RETRIES`] times.
    fn submit_with(&mut self, want: usize) -> io::Result<usize> {
        let mut retries = 0;
        loop {
            self.submissions += 1;
            self.watch_overflow();
            let result = if want == 0 { self.uring.submit() } else { self.uring.submit_and_wait(want) };
            match result {
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => return Ok(0),
                Err(err)
                    if matches!(err.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN))
                        && retries < SUBMIT_RETRIES =>
                {
                    retries += 1;
                    self.counters.retried += 1;
                    let before = self.stash.len();
                    self.stash_completions();
                    if want > 0 && self.stash.len() > before {
                        // Waiting is satisfied: there are completions to dispatch.
                        return Ok(0);
                    }
                }
                other => return other,
            }
        }
    }

    /// Moves every completion the queue holds into the stash (making room for the kernel's
    /// overflow list to drain into the queue).
    fn stash_completions(&mut self) {
        for cqe in self.uring.completion() {
            self.stash.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }

    fn watch_overflow(&mut self) {
        if self.uring.submission().cq_overflow() {
            self.counters.overflowed += 1;
        }
        self.counters.dropped = u64::from(self.uring.completion().overflow());
    }

    /// Queues `entry`, submitting first if the submission queue is full.
    ///
    /// # Safety
    /// Every pointer in `entry` (buffers, addresses, timespecs, the `u64` of an eventfd read) must stay
    /// valid and unmoved until its completion has been reaped (or, for addresses and timespecs, until
    /// the next submit, which is when the kernel copies them), and the fds must stay open until then.
    pub unsafe fn push(&mut self, entry: &Entry) -> io::Result<()> {
        for _ in 0..=SUBMIT_RETRIES {
            // SAFETY: forwarded to the caller (see this function's contract).
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
        Err(io::Error::new(io::ErrorKind::WouldBlock, "the kernel takes no submissions"))
    }

    /// Asks the kernel to cancel the operation of `target`; the cancel's own completion is
    /// [`OpKind::Cancel`] and carries no state.
    pub fn push_cancel(&mut self, target: UserData) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(UserData::new(OpKind::Cancel, 0, 0).encode());
        // SAFETY: a cancel request references no memory.
        unsafe { self.push(&entry) }
    }

    /// Makes room for `n` entries that must reach the kernel in the same submission (a linked
    /// chain: a chain cut at a submission boundary loses its link, e.g. a connect its timeout).
    pub fn reserve(&mut self, n: usize) -> io::Result<()> {
        let free = {
            let queue = self.uring.submission();
            queue.capacity() - queue.len()
        };
        if free < n {
            self.submit()?;
        }
        Ok(())
    }

    /// Submits a connect of `fd` to `addr` linked with a `timeout`, both in the same submission (a
    /// chain cut at a submission boundary would lose the timeout). TCP and SCTP connect alike.
    ///
    /// # Safety
    /// `target` must stay valid and unmoved until the next submit (the kernel copies it then), and
    /// `fd` must stay open until both completions have been reaped.
    pub unsafe fn push_connect(
        &mut self,
        fd: RawFd,
        target: &mut ConnectTarget,
        addr: SocketAddr,
        timeout: Duration,
        connect_user_data: u64,
        timeout_user_data: u64,
    ) -> io::Result<()> {
        target.addr = SockAddr::from(addr);
        target.timeout = Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos());
        let connect = opcode::Connect::new(Fd(fd), target.addr.as_ptr().cast(), target.addr.len())
            .build()
            .flags(Flags::IO_LINK)
            .user_data(connect_user_data);
        let link_timeout = opcode::LinkTimeout::new(&target.timeout).build().user_data(timeout_user_data);
        self.reserve(2)?;
        // SAFETY: forwarded to the caller (see this function's contract).
        unsafe {
            self.push(&connect)?;
            self.push(&link_timeout)
        }
    }

    /// Registers a provided-buffer ring (5.19+) as buffer group `group`.
    ///
    /// # Safety
    /// `entries_addr` must point to a page-aligned array of `entries` `io_uring_buf` entries that stays
    /// mapped (with the buffers it names) for as long as this ring exists.
    pub unsafe fn register_buf_ring(&self, entries_addr: u64, entries: u16, group: u16) -> io::Result<()> {
        // SAFETY: forwarded to the caller (see this function's contract).
        unsafe { self.uring.submitter().register_buf_ring_with_flags(entries_addr, entries, group, 0) }
    }

    /// Submits queued entries and waits for at least `want` completions (returns early when
    /// completions were stashed meanwhile).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        if !self.stash.is_empty() {
            return self.submit_with(0);
        }
        self.submit_with(want)
    }

    /// Moves every completion (the stash's first, in the order they came) into `out` as
    /// `(user_data, result, flags)`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32, u32)>) {
        out.clear();
        out.append(&mut self.stash);
        for cqe in self.uring.completion() {
            out.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_and_masks_generation() {
        let data = UserData::new(OpKind::BackendToClient, 0xDEAD_BEEF, 0x1234_5678);
        let decoded = UserData::decode(data.encode()).expect("valid kind");
        assert_eq!(decoded.kind, OpKind::BackendToClient);
        assert_eq!(decoded.slot, 0xDEAD_BEEF);
        assert_eq!(decoded.generation, 0x34_5678);
    }

    #[test]
    fn the_completion_queue_is_sized_for_what_can_be_in_flight() {
        assert_eq!(completion_entries(4096, 4686, 9373, 128), 32_768, "the default budget of this machine");
        assert_eq!(completion_entries(4096, 0, 0, 0), 8192, "at least twice the submission queue");
        assert_eq!(completion_entries(4096, 65_536, 65_536, 128), 65_536, "at most the kernel's maximum");
        let ring = Ring::new(8, completion_entries(8, 100, 0, 0)).expect("a ring");
        assert_eq!(ring.completion_capacity(), 512);
    }

    #[test]
    fn unknown_kind_is_rejected() {
        assert_eq!(UserData::decode(0), None);
        assert_eq!(UserData::decode(0xFF << 56), None);
    }
}
