//! The warnings a worker can hit once per connection, accept, datagram or key, each kind behind one
//! `lb_core::LogThrottle`: at most one line per kind per interval, the lines held back counted in
//! the next one, and a summary from housekeeping when a burst stopped. So no fault (descriptors
//! running out, a ring refusing operations, ten thousand VIPs failing to bind) can flood the log;
//! the counters in `/status` carry the exact numbers.

use std::time::Instant;

use lb_core::LogThrottle;

/// A kind of warning that may repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Warning {
    /// An accept, a socket, a pipe or a UDP upstream socket failed for lack of a local resource.
    Resources,
    /// The descriptor budget is reached: a connection was refused, a flow dropped, a listener left
    /// unbound.
    Budget,
    /// A VIP socket could not be bound or listen (retried every tick).
    Bind,
    /// An operation could not be queued on the ring.
    Submit,
    /// A backend socket of a transparent entry could not be bound to its client's address.
    Transparent,
}

impl Warning {
    const ALL: [Warning; 5] =
        [Warning::Resources, Warning::Budget, Warning::Bind, Warning::Submit, Warning::Transparent];

    fn index(self) -> usize {
        self as usize
    }

    /// What a summary line says the held-back lines were about.
    fn topic(self) -> &'static str {
        match self {
            Warning::Resources => "local resource shortages (see local_* in /status)",
            Warning::Budget => "the descriptor budget being reached (see budget_refusals in /status)",
            Warning::Bind => "VIP sockets that could not be bound (see bind_failures in /status)",
            Warning::Submit => "operations the ring refused",
            Warning::Transparent => "transparent backend sockets (see local_transparent_failed in /status)",
        }
    }
}

/// One worker's throttles, one per [`Warning`].
pub(crate) struct Warnings {
    worker: usize,
    gates: [LogThrottle; Warning::ALL.len()],
}

impl Warnings {
    pub fn new(worker: usize) -> Warnings {
        Warnings { worker, gates: std::array::from_fn(|_| LogThrottle::default()) }
    }

    /// The index of the worker these throttles belong to.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// An occurrence of `warning` at `now`: `Some(held_back)` when it is to be logged (see
    /// [`warn_limited`]).
    pub fn admit(&mut self, warning: Warning, now: Instant) -> Option<u64> {
        self.gates[warning.index()].admit(now)
    }

    /// Logs one summary line per kind whose held-back lines were not reported yet (housekeeping).
    pub fn flush(&mut self, now: Instant) {
        for warning in Warning::ALL {
            if let Some(held_back) = self.gates[warning.index()].poll_summary(now) {
                tracing::warn!(worker = self.worker, held_back, "more warnings about {}", warning.topic());
            }
        }
    }
}

/// `tracing::warn!` through the worker's throttle for `$warning`: logs with a `held_back` count, or
/// counts the line and logs nothing. `$on` is anything with the worker's `warnings` and its clock
/// `now` (the worker, or a component's [`crate::context::Ctx`]).
macro_rules! warn_limited {
    ($on:expr, $warning:expr, $($rest:tt)+) => {
        if let Some(held_back) = $on.warnings.admit($warning, $on.now) {
            tracing::warn!(worker = $on.warnings.worker(), held_back, $($rest)+);
        }
    };
}

pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_throttled_apart() {
        let now = Instant::now();
        let mut warnings = Warnings::new(0);
        assert_eq!(warnings.admit(Warning::Resources, now), Some(0));
        assert_eq!(warnings.admit(Warning::Resources, now), None);
        assert_eq!(warnings.admit(Warning::Submit, now), Some(0), "another kind has its own gate");
        assert!(Warning::ALL.iter().enumerate().all(|(i, w)| w.index() == i));
    }
}
