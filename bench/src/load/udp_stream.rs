//! udp-stream: blast datagrams at a `serve udp-sink` and learn from the sink how many arrived.
//!
//! Phases: warm-up blast → all senders pause → the sink's counters are read once they settle → measured
//! blast until the deadline → counters read again once settled. Received = the difference, so
//! datagrams still queued when blasting stops are counted and warm-up traffic is not. Sending uses
//! `sendmmsg` batches on connected sockets, paced per thread when `--rate` is given; with `--gso N`
//! every message of a batch carries N datagrams as one `UDP_SEGMENT` send (counted as N).

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::cli::UdpStreamArgs;
use crate::load::payload;
use crate::report::{DatagramSummary, Report, per_sec};
use crate::run::{Clock, LiveCounters, Progress, Tally, client_threads};
use crate::sockets::transfer_failure;
use crate::udp_stats::settled_query;

pub fn run(args: &UdpStreamArgs) -> anyhow::Result<Report> {
    let target = args.run.target;
    let flows = args.flows as usize;
    let threads = client_threads(args.run.threads, flows);
    let mut nonce = std::process::id() as u64 * 1_000_000;
    // Fail before loading anything if the target cannot report what it received.
    settled_query(target, &mut nonce).with_context(|| {
        format!("{target} did not answer the stats query; udp-stream needs `serve udp-sink`")
    })?;
    let live: Vec<LiveCounters> = (0..threads).map(|_| LiveCounters::default()).collect();
    let paused = Barrier::new(threads + 1);
    let resumed = Barrier::new(threads + 1);
    let measured = OnceLock::<Clock>::new();
    let warmup_clock = Clock::starting_now(args.run.warmup, Duration::ZERO);
    // Sockets are made here, not in the threads: a thread that failed before the barriers would
    // leave the others waiting forever.
    let senders = (0..threads)
        .map(|thread| Sender::new(args, (thread..flows).step_by(threads).count(), threads))
        .collect::<io::Result<Vec<_>>>()
        .context("cannot create the sending sockets")?;
    let (tallies, before) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let handles: Vec<_> = senders
            .into_iter()
            .zip(&live)
            .map(|(mut sender, live)| {
                let (paused, resumed, measured) = (&paused, &resumed, &measured);
                scope.spawn(move || -> Tally {
                    let mut tally = Tally::default();
                    sender.blast(&mut tally, &warmup_clock, warmup_clock.measure_from, live);
                    paused.wait();
                    resumed.wait();
                    let clock = *measured.get().expect("the main thread sets the clock before resuming");
                    let mut tally = Tally::default();
                    sender.blast(&mut tally, &clock, clock.end, live);
                    tally
                })
            })
            .collect();
        paused.wait();
        let before = settled_query(target, &mut nonce);
        let clock = Clock::starting_now(Duration::ZERO, args.run.duration);
        measured.set(clock).expect("the measured clock is set once");
        resumed.wait();
        let mut progress = Progress::new(&live, args.run.show_progress());
        let mut tick = clock.start + Duration::from_secs(1);
        while tick < clock.end {
            std::thread::sleep(tick.saturating_duration_since(Instant::now()));
            progress.tick(&clock);
            tick += Duration::from_secs(1);
        }
        let tallies = handles
            .into_iter()
            .map(|handle| handle.join().map_err(|_| anyhow::anyhow!("a sender thread panicked")))
            .collect::<anyhow::Result<Vec<Tally>>>()?;
        Ok((tallies, before))
    })?;
    let before = before.with_context(|| format!("{target} stopped answering the stats query"))?;
    let after = settled_query(target, &mut nonce)
        .with_context(|| format!("{target} stopped answering the stats query after the run"))?;
    let mut totals = Tally::default();
    for tally in &tallies {
        totals.merge(tally);
    }
    let seconds = args.run.duration.as_secs_f64();
    let sent = totals.ops;
    let received = after.datagrams.saturating_sub(before.datagrams);
    totals.bytes_received = after.bytes.saturating_sub(before.bytes);
    let datagrams = DatagramSummary {
        sent,
        received,
        lost: sent.saturating_sub(received),
        late: 0,
        sent_per_sec: per_sec(sent, seconds),
        received_per_sec: per_sec(received, seconds),
        loss_percent: if sent > 0 { sent.saturating_sub(received) as f64 * 100.0 / sent as f64 } else { 0.0 },
    };
    let params = json!({
        "flows": args.flows,
        "message_size": args.message_size,
        "rate": args.rate,
        "batch": args.batch,
        "gso": args.gso,
    });
    let mut report = Report::new("udp-stream", &args.run, params, threads, &totals);
    report.datagrams = Some(datagrams);
    Ok(report)
}

/// Largest UDP payload one GSO send may carry (IPv4).
const MAX_GSO_BYTES: usize = 65_507;

/// One thread's flows and its reusable `sendmmsg` batch (all entries point at the same payload).
struct Sender {
    sockets: Vec<UdpSocket>,
    /// `segments` copies of the datagram, back to back (one copy without GSO).
    payload: Vec<u8>,
    /// Datagrams per message (`--gso`); each is `payload.len() / segments` bytes.
    segments: usize,
    iovecs: Vec<libc::iovec>,
    /// One `UDP_SEGMENT` control message per header when `segments > 1`.
    controls: Vec<[u64; 4]>,
    headers: Vec<libc::mmsghdr>,
    /// Datagrams per second for this thread, if paced.
    rate: Option<f64>,
}

// SAFETY: the raw pointers in `iovecs`/`headers` point into `payload` and `iovecs`, which the Sender
// owns and never reallocates after construction; the Sender is used by one thread at a time.
unsafe impl Send for Sender {}

impl Sender {
    fn new(args: &UdpStreamArgs, flows: usize, threads: usize) -> io::Result<Self> {
        let target = args.run.target;
        let bind = crate::sockets::any_port_like(target);
        let segments = args.gso as usize;
        if segments > 1 && args.message_size as usize * segments > MAX_GSO_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "--gso {segments} × --message-size {} exceeds {MAX_GSO_BYTES} bytes",
                    args.message_size
                ),
            ));
        }
        let sockets = (0..flows)
            .map(|_| {
                let socket = UdpSocket::bind(bind)?;
                socket.connect(target)?;
                Ok(socket)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let batch = args.batch as usize;
        let segments = args.gso as usize;
        let mut payload = payload(args.message_size as usize).repeat(segments);
        let iovecs: Vec<libc::iovec> = (0..batch)
            .map(|_| libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() })
            .collect();
        let mut sender = Self {
            sockets,
            payload,
            segments,
            iovecs,
            controls: vec![[0u64; 4]; if segments > 1 { batch } else { 0 }],
            headers: Vec::with_capacity(batch),
            rate: args.rate.map(|rate| rate as f64 / threads as f64),
        };
        for index in 0..batch {
            // SAFETY: mmsghdr is a plain C struct for which all-zero is a valid (empty) value.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = &mut sender.iovecs[index];
            header.msg_hdr.msg_iovlen = 1;
            if segments > 1 {
                let control = &mut sender.controls[index];
                header.msg_hdr.msg_control = control.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE only computes a size.
                header.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
                // SAFETY: the header points at `control` (32 bytes, 8-aligned), which holds one
                // control message with a 2-byte payload (CMSG_SPACE(2) = 24 on Linux).
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
                    libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(args.message_size as u16);
                }
            }
            sender.headers.push(header);
        }
        Ok(sender)
    }

    /// Sends until `until`, counting datagrams sent inside the clock's window as ops.
    fn blast(&mut self, tally: &mut Tally, clock: &Clock, until: Instant, live: &LiveCounters) {
        if self.sockets.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut sent_here: u64 = 0;
        // Paced runs send smaller batches so that one batch spans about 100 us.
        let batch = match self.rate {
            Some(rate) => ((rate * 100e-6) as usize / self.segments).clamp(1, self.headers.len()),
            None => self.headers.len(),
        };
        let datagram = self.payload.len() / self.segments;
        let mut flow = 0;
        let mut next_publish = started;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            if let Some(rate) = self.rate {
                let due = started + Duration::from_secs_f64(sent_here as f64 / rate);
                if due > now {
                    std::thread::sleep((due - now).min(until - now));
                    continue;
                }
            }
            if now >= next_publish {
                tally.publish(live);
                next_publish = now + crate::load::TICK;
            }
            let socket = &self.sockets[flow];
            flow = (flow + 1) % self.sockets.len();
            // SAFETY: `headers[..batch]` point at live iovecs over `payload`; the kernel only reads them.
            let result =
                unsafe { libc::sendmmsg(socket.as_raw_fd(), self.headers.as_mut_ptr(), batch as u32, 0) };
            if result < 0 {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => {}
                    _ => tally.fail(transfer_failure(&error)),
                }
                continue;
            }
            // Stamped with the time before the call: every datagram sent before `until` is counted.
            for _ in 0..result as usize * self.segments {
                tally.count_op(clock, now);
                tally.sent(clock, now, datagram);
            }
            sent_here += (result as usize * self.segments) as u64;
        }
        tally.publish(live);
    }
}
