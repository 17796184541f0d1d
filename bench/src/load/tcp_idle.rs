//! tcp-idle: many established connections that stay (mostly) idle, and what holding them costs the
//! proxy in between. Opens `--connections` through the target (each proves itself end to end with a
//! one-byte echo), samples the resident memory and CPU time of the `--watch-pid` processes before
//! and after opening and at the end of the hold, optionally sends `--ping-bytes` on every connection
//! every `--ping-every` meanwhile, and finally checks which connections are still alive.
//!
//! Sockets are blocking with timeouts (every wait is bounded by `--timeout` or the hold), one thread
//! per share of the connections: the opening is not timed as load, and a hold is mostly sleep.

use std::io::{self, Read as _, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use socket2::Socket;

use crate::cli::TcpIdleArgs;
use crate::report::{Failure, Report};
use crate::run::{Clock, LiveCounters, Tally, client_threads, run_threads};
use crate::sockets::{ConnectOptions, connect_blocking, connect_failure, loopback_source, transfer_failure};

/// What the hold cost the watched processes, and how the connections fared.
#[derive(Clone, Debug, Serialize)]
pub struct IdleSummary {
    pub requested: u64,
    /// Connections that connected and echoed their first byte.
    pub established: u64,
    /// Established connections that still echoed a byte after the hold.
    pub alive_at_end: u64,
    pub open_s: f64,
    /// Summed over the watched processes; `None` without `--watch-pid` (or when /proc could not
    /// be read: the processes are gone).
    pub proxy: Option<ProxyUsage>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProxyUsage {
    pub pids: Vec<u32>,
    pub rss_kib_before: u64,
    pub rss_kib_open: u64,
    pub rss_kib_end: u64,
    /// (RSS at the end of the hold − RSS before opening) / established connections.
    pub kib_per_connection: f64,
    /// CPU seconds the processes used during the hold, and that per second of hold.
    pub cpu_s_hold: f64,
    pub cores_busy_hold: f64,
}

pub fn run(args: &TcpIdleArgs) -> anyhow::Result<Report> {
    let connections = args.connections as usize;
    let threads = client_threads(args.run.threads, connections);
    let spread = args.source_ips > 0 && args.run.target.ip().is_loopback() && args.run.target.is_ipv4();
    let before = sample(&args.watch_pid);

    let opened = Instant::now();
    let mut tally = Tally::default();
    let shares: Vec<Mutex<Vec<Socket>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| scope.spawn(move || open_share(args, thread, threads, spread)))
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                let (sockets, share_tally) = handle.join().unwrap_or_default();
                tally.merge(&share_tally);
                Mutex::new(sockets)
            })
            .collect()
    });
    let open_s = opened.elapsed().as_secs_f64();
    let established: u64 = shares.iter().map(|share| share.lock().map_or(0, |s| s.len() as u64)).sum();
    let open = sample(&args.watch_pid);

    let clock = Clock::starting_now(args.run.warmup, args.run.duration);
    let (mut totals, alive) =
        run_threads(threads, threads, clock, args.run.show_progress(), |thread, _, clock, live| {
            let sockets = shares
                .get(thread)
                .map(|share| std::mem::take(&mut *share.lock().unwrap_or_else(|e| e.into_inner())));
            Ok(hold(args, sockets.unwrap_or_default(), clock, live))
        })?;
    let end = sample(&args.watch_pid);
    totals.merge(&tally);

    let alive_at_end: u64 = alive.iter().sum();
    let proxy = match (before, open, end) {
        (Some(before), Some(open), Some(end)) => Some(usage(args, &before, &open, &end, established)),
        _ => None,
    };
    let params = json!({
        "connections": args.connections,
        "source_ips": if spread { args.source_ips } else { 0 },
        "ping_every_ms": args.ping_every.map(|every| every.as_millis() as u64),
        "ping_bytes": args.ping_bytes,
        "timeout_ms": args.timeout.as_millis() as u64,
        "connect_timeout_ms": args.connect_timeout.as_millis() as u64,
    });
    let mut report = Report::new("tcp-idle", &args.run, params, threads, &totals);
    report.idle =
        Some(IdleSummary { requested: args.connections.into(), established, alive_at_end, open_s, proxy });
    Ok(report)
}

/// Opens this thread's share of the connections (every `threads`-th from `thread`); each is kept
/// only once it echoed its first byte.
fn open_share(args: &TcpIdleArgs, thread: usize, threads: usize, spread: bool) -> (Vec<Socket>, Tally) {
    let mut tally = Tally::default();
    let mut sockets = Vec::new();
    let mut buffers = Buffers::new(1);
    for index in (thread..args.connections as usize).step_by(threads) {
        let source = spread.then(|| loopback_source(index as u32 % args.source_ips));
        let options = ConnectOptions { nodelay: true, reset_on_close: false, source };
        let socket = match connect_blocking(args.run.target, args.connect_timeout, &options) {
            Ok(socket) => socket,
            Err(error) => {
                tally.fail(connect_failure(&error));
                continue;
            }
        };
        let ready = socket.set_nonblocking(false).and_then(|()| {
            socket.set_read_timeout(Some(args.timeout))?;
            socket.set_write_timeout(Some(args.timeout))
        });
        if let Err(error) = ready {
            tally.fail(transfer_failure(&error));
            continue;
        }
        match echo(&socket, &mut buffers, 1) {
            Ok(()) => sockets.push(socket),
            Err(failure) => tally.fail(failure),
        }
    }
    (sockets, tally)
}

/// Holds `sockets` until the end of the run, pinging each every `--ping-every`; then counts those
/// that still echo.
fn hold(args: &TcpIdleArgs, sockets: Vec<Socket>, clock: &Clock, live: &LiveCounters) -> (Tally, u64) {
    let mut tally = Tally::default();
    let size = args.ping_bytes as usize;
    let mut buffers = Buffers::new(size);
    let mut alive = vec![true; sockets.len()];
    let mut next_ping = args.ping_every.map(|every| Instant::now() + every);
    loop {
        let now = Instant::now();
        if now >= clock.end {
            break;
        }
        if let (Some(at), Some(every)) = (next_ping, args.ping_every)
            && now >= at
        {
            for (socket, alive) in sockets.iter().zip(alive.iter_mut()).filter(|(_, alive)| **alive) {
                let sent = Instant::now();
                match echo(socket, &mut buffers, size) {
                    Ok(()) => {
                        let done = Instant::now();
                        tally.sent(clock, done, size);
                        tally.received(clock, done, size);
                        tally.complete(clock, done, done - sent);
                    }
                    Err(failure) => {
                        tally.fail(failure);
                        *alive = false;
                    }
                }
            }
            tally.publish(live);
            next_ping = Some(at + every);
        }
        // Pacing of the generator, not synchronisation: wake for the next ping or the end.
        let wake = next_ping.unwrap_or(clock.end).min(clock.end);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)));
    }
    let mut still = 0;
    for (socket, alive) in sockets.iter().zip(&alive) {
        if !alive {
            continue;
        }
        match echo(socket, &mut buffers, 1) {
            Ok(()) => still += 1,
            Err(failure) => tally.fail(failure),
        }
    }
    tally.publish(live);
    (tally, still)
}

/// A thread's payload and read buffer, reused for every echo (no allocation per operation).
struct Buffers {
    payload: Vec<u8>,
    back: Vec<u8>,
}

impl Buffers {
    fn new(size: usize) -> Self {
        Buffers { payload: crate::load::payload(size), back: vec![0; size] }
    }
}

/// Writes `size` bytes (at most the buffers' size) and reads them back (the target is an echo
/// server, through the proxy).
fn echo(mut socket: &Socket, buffers: &mut Buffers, size: usize) -> Result<(), Failure> {
    let size = size.min(buffers.payload.len());
    socket.write_all(&buffers.payload[..size]).map_err(|error| failure_of(&error))?;
    let back = &mut buffers.back[..size];
    let mut read = 0;
    while read < size {
        match socket.read(&mut back[read..]) {
            Ok(0) => return Err(Failure::UnexpectedEof),
            Ok(n) => read += n,
            Err(error) => return Err(failure_of(&error)),
        }
    }
    Ok(())
}

fn failure_of(error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Failure::ResponseTimeout,
        _ => transfer_failure(error),
    }
}

/// Resident memory (KiB) and CPU seconds of the watched processes, summed, and when.
#[derive(Clone, Debug)]
struct Sample {
    rss_kib: u64,
    cpu_s: f64,
    at: Instant,
}

/// A [`Sample`] of `pids`; `None` when there is nothing to watch or a process cannot be read.
fn sample(pids: &[u32]) -> Option<Sample> {
    if pids.is_empty() {
        return None;
    }
    let ticks = clock_ticks();
    let mut sample = Sample { rss_kib: 0, cpu_s: 0.0, at: Instant::now() };
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
        sample.rss_kib += rss.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command may contain spaces: fields are counted after its closing parenthesis.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (utime, stime): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
        sample.cpu_s += (utime + stime) as f64 / ticks;
    }
    Some(sample)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn usage(args: &TcpIdleArgs, before: &Sample, open: &Sample, end: &Sample, established: u64) -> ProxyUsage {
    let hold_s = end.at.duration_since(open.at).as_secs_f64();
    let cpu_s_hold = (end.cpu_s - open.cpu_s).max(0.0);
    ProxyUsage {
        pids: args.watch_pid.clone(),
        rss_kib_before: before.rss_kib,
        rss_kib_open: open.rss_kib,
        rss_kib_end: end.rss_kib,
        kib_per_connection: if established > 0 {
            (end.rss_kib as f64 - before.rss_kib as f64) / established as f64
        } else {
            0.0
        },
        cpu_s_hold,
        cores_busy_hold: if hold_s > 0.0 { cpu_s_hold / hold_s } else { 0.0 },
    }
}
