//! Keeps a fault from flooding the log: a [`LogThrottle`] lets one line through per interval and
//! counts the occurrences it held back, so the next line (or a summary) can say how many there were.
//!
//! Sans-IO: the caller passes `now` and writes the line. Call order: [`LogThrottle::admit`] at each
//! occurrence (log when it returns `Some`, with the count it carries), [`LogThrottle::poll_summary`]
//! from a periodic tick (log a summary when it returns `Some`), so a burst that stops is still
//! accounted for.

use std::time::{Duration, Instant};

/// How often each kind of repeated warning may be logged, unless a caller chooses otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of warning's gate. See the module doc.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    interval: Duration,
    /// Until when lines are held back (after one was let through).
    closed_until: Option<Instant>,
    held: u64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        LogThrottle::new(DEFAULT_INTERVAL)
    }
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> Self {
        LogThrottle { interval, closed_until: None, held: 0 }
    }

    /// An occurrence at `now`: `Some(held)` when it is to be logged, `held` being how many were held
    /// back since the last line; `None` when it is held back (and counted).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.closed_until.is_some_and(|until| now < until) {
            self.held += 1;
            return None;
        }
        self.closed_until = now.checked_add(self.interval);
        Some(std::mem::take(&mut self.held))
    }

    /// Occurrences held back for a whole interval, to log as one summary line at `now`; `None` when
    /// there are none yet or the interval is still running.
    pub fn poll_summary(&mut self, now: Instant) -> Option<u64> {
        if self.held == 0 || self.closed_until.is_some_and(|until| now < until) {
            return None;
        }
        self.closed_until = now.checked_add(self.interval);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, origin};

    #[test]
    fn one_line_per_interval_and_the_held_back_ones_are_counted() {
        let start = origin();
        let mut gate = LogThrottle::new(Duration::from_secs(10));
        assert_eq!(gate.admit(start), Some(0));
        for second in 1..10 {
            assert_eq!(gate.admit(at(start, second)), None);
        }
        assert_eq!(gate.poll_summary(at(start, 9)), None, "the interval still runs");
        assert_eq!(gate.admit(at(start, 10)), Some(9), "the next line says 9 were held back");
        assert_eq!(gate.admit(at(start, 11)), None);
        assert_eq!(gate.poll_summary(at(start, 20)), Some(1), "a burst that stopped is summarised");
        assert_eq!(gate.poll_summary(at(start, 40)), None, "nothing more to say");
        assert_eq!(gate.admit(at(start, 40)), Some(0));
    }
}
