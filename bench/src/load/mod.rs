//! The load modes. Each `run(args)` drives its client threads for warm-up plus duration and returns a
//! `Report`; none of them prints except the progress line on stderr.
//!
//! Invariants: every run ends by its deadline whatever the target does (all waits are bounded), no
//! allocation per operation in steady state (buffers are per thread and reused).

pub mod tcp_crr;
pub mod tcp_idle;
pub mod tcp_rr;
pub mod tcp_stream;
pub mod udp_rr;
pub mod udp_stream;

use std::time::{Duration, Instant};

use crate::poller::{Event, Poller};
use crate::report::Failure;
use crate::run::{Clock, LiveCounters, Tally};

/// How long a client thread blocks in epoll at most: short enough to notice the deadline and to scan
/// timeouts often, long enough not to spin.
pub const TICK: Duration = Duration::from_millis(5);

/// Time to wait in epoll: until the next tick or the end of the run, whichever comes first.
pub fn wait_budget(now: Instant, end: Instant) -> Duration {
    end.saturating_duration_since(now).min(TICK)
}

/// A buffer of `len` bytes with a recognisable, non-zero pattern.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A client thread whose sockets are driven by one epoll loop (tcp-rr, tcp-crr, udp-rr).
pub trait ClientLoop {
    fn poller(&mut self) -> &mut Poller;
    fn tally(&mut self) -> &mut Tally;
    /// Periodic work: timeouts, reconnects, sends that are due.
    fn scan(&mut self, clock: &Clock, now: Instant);
    fn on_event(&mut self, clock: &Clock, event: Event);
    /// Work before each wait; returns true when more is pending, so the wait must not block.
    fn before_wait(&mut self) -> bool {
        false
    }
}

/// Runs `state` until the end of the run: `scan` every `scan_every`, events as they come, live
/// counters published at each scan. Never blocks past the deadline.
pub fn drive(state: &mut impl ClientLoop, clock: &Clock, live: &LiveCounters, scan_every: Duration) {
    let mut ready: Vec<Event> = Vec::with_capacity(256);
    let mut next_scan = Instant::now();
    loop {
        let now = Instant::now();
        if now >= clock.end {
            break;
        }
        let pending = state.before_wait();
        if now >= next_scan {
            state.scan(clock, now);
            state.tally().publish(live);
            next_scan = now + scan_every;
        }
        ready.clear();
        let budget = if pending { Duration::ZERO } else { wait_budget(now, clock.end.min(next_scan)) };
        if let Err(error) = state.poller().wait(budget, |event| ready.push(event)) {
            // epoll itself failing is not a property of the target; stop rather than spin.
            eprintln!("epoll_wait failed: {error}");
            state.tally().fail(Failure::OtherIo);
            break;
        }
        for event in &ready {
            state.on_event(clock, *event);
        }
    }
    state.tally().publish(live);
}
