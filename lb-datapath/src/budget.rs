//! The descriptor budget, and what a worker does when the machine runs short of something.
//!
//! Every listener, client, backend and UDP upstream socket and every pipe is a file descriptor, and
//! the process has `RLIMIT_NOFILE` of them. Running out used to take everything down at once: the
//! listeners of ten thousand VIPs took every descriptor, accepts failed on every loop turn, the admin
//! listener spun. So the limit is split up front ([`DescriptorBudget`]): a reserve for the control
//! thread (admin, health probes, sources, logs), the rest in equal shares per worker. A worker
//! accounts what it holds (each component is lent the [`Room`] the others leave it) and, before
//! taking more, checks its share: a client it has no room for is reset at accept, a new UDP flow's
//! datagram is dropped, a relay direction stays on copy instead of taking a pipe, and listeners
//! stop short of the share so that connections always keep some room. Each refusal is counted (`budget_refusals`) and warned about
//! through the worker's throttle (`Ctx::refuse_for_budget`).
//!
//! A failure for lack of a local resource anyway (`EMFILE`, `ENOBUFS`, `EADDRNOTAVAIL`, see
//! `lb_core::LocalResource`) is the load balancer's trouble: it is counted apart (`local_*`), never
//! reported as a backend event (`Ctx::local_failure`), and an accept that hits it backs off until
//! the next housekeeping tick instead of being retried at once.

use std::io;

/// The smallest reserve of descriptors kept for the control thread.
const CONTROL_RESERVE_MIN: u64 = 64;

/// Descriptors a worker holds whatever it serves: its ring and its wake-up eventfd.
pub(crate) const WORKER_FIXED: usize = 2;

/// How the process's descriptors are shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The soft `RLIMIT_NOFILE` the budget was made for.
    pub limit: u64,
    /// Kept for the control thread.
    pub reserve: u64,
    /// What each worker may hold.
    pub per_worker: usize,
}

impl DescriptorBudget {
    /// The budget of `workers` workers under a limit of `limit` descriptors: a reserve of 1/16
    /// (at least 64), the rest shared equally.
    pub fn new(limit: u64, workers: usize) -> DescriptorBudget {
        let reserve = (limit / 16).max(CONTROL_RESERVE_MIN).min(limit);
        let share = (limit - reserve) / workers.max(1) as u64;
        DescriptorBudget { limit, reserve, per_worker: usize::try_from(share).unwrap_or(usize::MAX) }
    }

    /// The budget under the process's current soft limit.
    pub fn current(workers: usize) -> io::Result<DescriptorBudget> {
        Ok(DescriptorBudget::new(descriptor_limit()?.0, workers))
    }

    /// Client connections one worker can hold at most (each a client and a backend socket).
    pub fn max_connections(&self) -> usize {
        self.per_worker.saturating_sub(WORKER_FIXED) / 2
    }

    /// UDP flows one worker can hold at most (each an upstream socket).
    pub fn max_flows(&self) -> usize {
        self.per_worker.saturating_sub(WORKER_FIXED)
    }

    /// Listening sockets one worker binds at most: a quarter of its share (at least 16) is kept for
    /// connections, so that a flood of VIPs never leaves none.
    pub fn max_listeners(&self) -> usize {
        let room = (self.per_worker / 4).max(16);
        self.per_worker.saturating_sub(WORKER_FIXED + room)
    }

    /// The smallest descriptor limit under which each of `workers` workers may bind `listeners`
    /// listening sockets (what to tell an operator whose VIPs do not fit).
    pub fn limit_for_listeners(listeners: usize, workers: usize) -> u64 {
        let (mut low, mut high) = (0u64, 1u64 << 40);
        while low < high {
            let middle = low + (high - low) / 2;
            if DescriptorBudget::new(middle, workers).max_listeners() >= listeners {
                high = middle;
            } else {
                low = middle + 1;
            }
        }
        low
    }
}

/// The process's `RLIMIT_NOFILE`, soft and hard.
pub fn descriptor_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (what any process may do); returns the soft
/// limit before and after.
pub fn raise_descriptor_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = descriptor_limit()?;
    if soft < hard {
        let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads one rlimit; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((soft, descriptor_limit()?.0))
}

/// What one component may take of its worker's share (see [`crate::context::Ctx`]): the share, and
/// what the rest of the worker held (descriptors, listening sockets) when the component was called.
/// The component adds what it holds itself, so what it takes during the call is counted too.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Room {
    budget: DescriptorBudget,
    held_elsewhere: usize,
    listening_elsewhere: usize,
}

impl Room {
    #[inline]
    pub fn new(budget: DescriptorBudget, held_elsewhere: usize, listening_elsewhere: usize) -> Room {
        Room { budget, held_elsewhere, listening_elsewhere }
    }

    /// The descriptors the worker may hold.
    pub fn per_worker(&self) -> usize {
        self.budget.per_worker
    }

    /// Listening sockets the rest of the worker held when the component was called.
    pub fn listening_elsewhere(&self) -> usize {
        self.listening_elsewhere
    }

    /// Listening sockets a worker binds at most (see [`DescriptorBudget::max_listeners`]).
    pub fn max_listeners(&self) -> usize {
        self.budget.max_listeners()
    }

    /// Whether `more` descriptors fit, the caller holding `held_here`. A connection counts two from
    /// its accept on (its backend socket comes next), a pipe two, whether in use or pooled.
    #[inline]
    pub fn fits(&self, held_here: usize, more: usize) -> bool {
        self.held_elsewhere + held_here + more <= self.budget.per_worker
    }

    /// Whether one more listening socket may be bound (see [`DescriptorBudget::max_listeners`]), the
    /// caller holding `held_here` descriptors of which `listening_here` listen.
    pub fn may_listen(&self, held_here: usize, listening_here: usize) -> bool {
        self.listening_elsewhere + listening_here < self.budget.max_listeners() && self.fits(held_here, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_reserve_and_room_for_connections() {
        let budget = DescriptorBudget::new(20_000, 2);
        assert_eq!((budget.reserve, budget.per_worker), (1250, 9375));
        assert_eq!(budget.max_connections(), 4686);
        assert!(budget.max_listeners() < budget.per_worker - 2000, "a quarter stays for connections");
        let small = DescriptorBudget::new(256, 2);
        assert_eq!((small.reserve, small.per_worker), (64, 96));
        assert_eq!(small.max_listeners(), 96 - 2 - 24);
        let tiny = DescriptorBudget::new(40, 4);
        assert_eq!((tiny.reserve, tiny.per_worker, tiny.max_connections()), (40, 0, 0));
    }

    #[test]
    fn the_limit_named_for_listeners_that_do_not_fit_is_the_smallest_that_fits_them() {
        let limit = DescriptorBudget::limit_for_listeners(10_000, 2);
        assert!(DescriptorBudget::new(limit, 2).max_listeners() >= 10_000);
        assert!(DescriptorBudget::new(limit - 1, 2).max_listeners() < 10_000);
        assert!(limit > 20_000, "two workers with 10,000 listeners each do not fit this machine's limit");
        assert_eq!(DescriptorBudget::limit_for_listeners(0, 2), 0);
    }

    #[test]
    fn the_limit_is_raised_to_the_hard_limit() {
        let (_, hard) = descriptor_limit().expect("getrlimit");
        let (_, after) = raise_descriptor_limit().expect("setrlimit");
        assert_eq!(after, hard);
    }

    #[test]
    fn lb_cores_errno_values_are_this_platforms() {
        use lb_core::local::errno;
        assert_eq!(
            [errno::ENOMEM, errno::ENFILE, errno::EMFILE, errno::EADDRNOTAVAIL, errno::ENOBUFS],
            [libc::ENOMEM, libc::ENFILE, libc::EMFILE, libc::EADDRNOTAVAIL, libc::ENOBUFS]
        );
    }
}
