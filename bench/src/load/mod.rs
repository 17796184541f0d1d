//! The load modes. Each `run(args)` drives its client threads for warm-up plus duration and returns a
//! `Report`; none of them prints except the progress line on stderr.
//!
//! Invariants: every run ends by its deadline whatever the target does (all waits are bounded), no
//! allocation per operation in steady state (buffers are per thread and reused).

pub mod tcp_crr;
pub mod tcp_rr;
pub mod tcp_stream;
pub mod udp_rr;
pub mod udp_stream;

use std::time::{Duration, Instant};

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
