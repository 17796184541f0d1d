//! The run harness shared by the load modes: the clock of a run (warm-up, measured window, end), the
//! per-thread tally merged at the end, the live counters behind the once-a-second progress line, and
//! `run_threads`, which spreads work over client threads and joins them.
//!
//! Client threads never share mutable state on the hot path: each keeps its own `Tally` and histogram
//! and only stores running totals into its own cache-line-padded `LiveCounters` for the progress line.
//! An operation counts when it completes inside the measured window `[measure_from, end)`.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::report::{ErrorCounts, Failure, new_latency_histogram};

/// The phases of one run, fixed when it starts.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub start: Instant,
    pub measure_from: Instant,
    pub end: Instant,
}

impl Clock {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let start = Instant::now();
        Self { start, measure_from: start + warmup, end: start + warmup + duration }
    }

    pub fn in_window(&self, now: Instant) -> bool {
        now >= self.measure_from && now < self.end
    }
}

/// Running totals of one client thread, read by the progress line. One writer, relaxed stores.
#[derive(Default)]
#[repr(align(128))]
pub struct LiveCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

/// What one client thread measured; merged over threads into the run's totals.
pub struct Tally {
    pub ops: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub errors: ErrorCounts,
    pub latency: Histogram<u64>,
    /// Whole-run totals (warm-up included) for the progress line.
    live_ops: u64,
    live_bytes: u64,
}

pub type Totals = Tally;

impl Default for Tally {
    fn default() -> Self {
        Self {
            ops: 0,
            bytes_sent: 0,
            bytes_received: 0,
            errors: ErrorCounts::default(),
            latency: new_latency_histogram(),
            live_ops: 0,
            live_bytes: 0,
        }
    }
}

impl Tally {
    /// An operation finished at `now` after `latency`; counted only inside the measured window.
    pub fn complete(&mut self, clock: &Clock, now: Instant, latency: Duration) {
        self.live_ops += 1;
        if clock.in_window(now) {
            self.ops += 1;
            self.latency.saturating_record(latency.as_nanos().min(u128::from(u64::MAX)) as u64);
        }
    }

    /// An operation without a latency (a stream write or read).
    pub fn count_op(&mut self, clock: &Clock, now: Instant) {
        self.live_ops += 1;
        if clock.in_window(now) {
            self.ops += 1;
        }
    }

    pub fn sent(&mut self, clock: &Clock, now: Instant, bytes: usize) -> bool {
        self.live_bytes += bytes as u64;
        let counted = clock.in_window(now);
        if counted {
            self.bytes_sent += bytes as u64;
        }
        counted
    }

    pub fn received(&mut self, clock: &Clock, now: Instant, bytes: usize) -> bool {
        self.live_bytes += bytes as u64;
        let counted = clock.in_window(now);
        if counted {
            self.bytes_received += bytes as u64;
        }
        counted
    }

    pub fn fail(&mut self, failure: Failure) {
        self.errors.record(failure);
    }

    pub fn publish(&self, live: &LiveCounters) {
        live.ops.store(self.live_ops, Ordering::Relaxed);
        live.bytes.store(self.live_bytes, Ordering::Relaxed);
        live.errors.store(self.errors.total(), Ordering::Relaxed);
    }

    pub fn merge(&mut self, other: &Tally) {
        self.ops += other.ops;
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.errors.merge(&other.errors);
        self.latency.add(&other.latency).expect("histograms share the same bounds");
        self.live_ops += other.live_ops;
        self.live_bytes += other.live_bytes;
    }
}

/// Prints one line per second on stderr: phase, elapsed, ops/s and Gbit/s over the last second, errors.
pub struct Progress<'a> {
    live: &'a [LiveCounters],
    enabled: bool,
    last_at: Instant,
    last_ops: u64,
    last_bytes: u64,
}

impl<'a> Progress<'a> {
    pub fn new(live: &'a [LiveCounters], enabled: bool) -> Self {
        Self { live, enabled, last_at: Instant::now(), last_ops: 0, last_bytes: 0 }
    }

    pub fn tick(&mut self, clock: &Clock) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let sum = |pick: fn(&LiveCounters) -> &AtomicU64| -> u64 {
            self.live.iter().map(|live| pick(live).load(Ordering::Relaxed)).sum()
        };
        let (ops, bytes, errors) = (sum(|l| &l.ops), sum(|l| &l.bytes), sum(|l| &l.errors));
        let seconds = now.duration_since(self.last_at).as_secs_f64().max(1e-9);
        let phase = if now < clock.measure_from { "warm-up" } else { "measure" };
        let _ = writeln!(
            std::io::stderr(),
            "[{:>6.1}s {phase}] {:>12.0} ops/s {:>9.3} Gbit/s  errors {errors}",
            now.duration_since(clock.start).as_secs_f64(),
            (ops - self.last_ops) as f64 / seconds,
            (bytes - self.last_bytes) as f64 * 8.0 / seconds / 1e9,
        );
        (self.last_at, self.last_ops, self.last_bytes) = (now, ops, bytes);
    }
}

/// Spreads `units` (connections, streams, flows) round-robin over `threads` client threads, runs
/// `work(thread_index, unit_indices, clock, live)` on each, shows progress, and merges the tallies.
/// Returns the merged totals and each thread's extra result, in thread order.
pub fn run_threads<E: Send>(
    threads: usize,
    units: usize,
    clock: Clock,
    show_progress: bool,
    work: impl Fn(usize, Vec<usize>, &Clock, &LiveCounters) -> anyhow::Result<(Tally, E)> + Sync,
) -> anyhow::Result<(Totals, Vec<E>)> {
    let threads = threads.clamp(1, units.max(1));
    let live: Vec<LiveCounters> = (0..threads).map(|_| LiveCounters::default()).collect();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let assigned: Vec<usize> = (thread..units).step_by(threads).collect();
                let (work, live, done_tx) = (&work, &live[thread], done_tx.clone());
                std::thread::Builder::new()
                    .name(format!("client-{thread}"))
                    .spawn_scoped(scope, move || {
                        let result = work(thread, assigned, &clock, live);
                        let _ = done_tx.send(());
                        result
                    })
                    .map_err(anyhow::Error::from)
            })
            .collect();
        drop(done_tx);
        let mut progress = Progress::new(&live, show_progress);
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        let mut finished = 0;
        while finished < threads {
            match done_rx.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(()) => finished += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    progress.tick(&clock);
                    next_tick += Duration::from_secs(1);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        handles
            .into_iter()
            .map(|handle| match handle?.join() {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("a client thread panicked")),
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let mut totals = Tally::default();
    let mut extras = Vec::with_capacity(results.len());
    for (tally, extra) in results {
        totals.merge(&tally);
        extras.push(extra);
    }
    Ok((totals, extras))
}

/// Client threads to use: the flag, else one per available core, never more than there are units.
pub fn client_threads(requested: Option<usize>, units: usize) -> usize {
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
    requested.unwrap_or(cores).clamp(1, units.max(1))
}

/// User and system CPU seconds used so far by this process (all threads).
pub fn process_cpu_seconds() -> (f64, f64) {
    // SAFETY: all-zero is a valid rusage; getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live, writable rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (seconds(usage.ru_utime), seconds(usage.ru_stime))
}
