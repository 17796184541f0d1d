//! Reaching a backend, as TCP connections and SCTP associations both do: the attempts of one client
//! (the entry's pick among the backends not tried yet, within its `connect-attempts`), why no connect
//! could be started, and when an established one must drain after a snapshot change.
//!
//! A local shortage (no descriptor, no memory, no source port) is never the backend's fault: it is
//! counted apart and never reported as a backend event.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_core::{Backend, BackendIdx, LocalResource, ServiceEntry, Snapshot, VipKey};

use crate::context::Ctx;
use crate::selection::Selection;
use crate::stats::{self, WorkerCounters};
use crate::traffic::Refusal;
use crate::warnings::{Warning, warn_limited};

/// Backends one connection may try at most, whatever `policy.connect_attempts` says.
pub(crate) const MAX_ATTEMPTS: usize = 16;

/// Why no backend connect could be started for a client (TCP or SCTP).
pub(crate) enum Failure {
    /// Every eligible backend was tried, or none is left.
    Exhausted,
    /// The backend socket could not be made for lack of a local resource.
    Local(LocalResource, i32),
    /// The ring refused the connect.
    Submit(std::io::Error),
}

/// The backends one client connection (or SCTP association) has tried so far.
pub(crate) struct Attempt<'a> {
    pub client: SocketAddr,
    pub tried: &'a mut [BackendIdx; MAX_ATTEMPTS],
    pub tried_len: &'a mut usize,
}

impl Attempt<'_> {
    /// The next backend to try: the entry's pick among those not tried yet, within its
    /// `connect-attempts`; recorded as tried. Counts retries, and clients no backend was left for.
    pub fn next<'e>(
        self,
        selection: &mut Selection,
        counters: &WorkerCounters,
        now: Instant,
        entry: &'e ServiceEntry,
    ) -> Result<&'e Backend, Failure> {
        let attempts = (entry.policy.connect_attempts.max(1) as usize).min(MAX_ATTEMPTS);
        if *self.tried_len >= attempts {
            return Err(Failure::Exhausted);
        }
        let exclude = &self.tried[..*self.tried_len];
        let Some(picked) = selection.pick(now, entry, self.client, exclude) else {
            if *self.tried_len == 0 {
                stats::add(&counters.no_backend, 1);
                selection.refuse(entry.key, Refusal::NoBackend);
            }
            return Err(Failure::Exhausted);
        };
        let backend = entry.backend(picked).ok_or(Failure::Exhausted)?;
        self.tried[*self.tried_len] = picked;
        *self.tried_len += 1;
        if *self.tried_len > 1 {
            stats::add(&counters.retries, 1);
        }
        Ok(backend)
    }
}

impl Failure {
    /// A socket that could not be made: a local shortage whatever the error (memory, say, when the
    /// errno is not one of them), never the backend's fault.
    pub fn local(error: std::io::Error) -> Failure {
        let errno = error.raw_os_error().unwrap_or(libc::ENOMEM);
        Failure::Local(LocalResource::of_errno(errno).unwrap_or(LocalResource::Memory), errno)
    }

    /// Counts and warns about why no connect could be started for want of a `socket`.
    pub fn report(self, ctx: &mut Ctx<'_>, socket: &'static str) {
        match self {
            Failure::Local(resource, errno) => ctx.local_failure(resource, socket, errno),
            Failure::Submit(error) => {
                warn_limited!(ctx, Warning::Submit, %error, "cannot submit a backend connect")
            }
            Failure::Exhausted => {}
        }
    }
}

/// The drain deadline of an established TCP or SCTP connection after a snapshot change: none while
/// the entry lets it continue (see `lb_core::ServiceEntry::established`), else the one it already
/// has or `now` plus what the entry allows; a removed VIP drains by the connection's own policy.
pub(crate) fn drain_deadline(
    snapshot: &Snapshot,
    key: VipKey,
    backend: Option<lb_core::BackendId>,
    current: Option<Instant>,
    now: Instant,
    own_drain: Duration,
) -> Option<Instant> {
    let verdict = match (snapshot.get(&key), backend) {
        (None, _) => lb_core::Established::Drain(own_drain),
        // Still connecting: the connect's outcome decides, not the table.
        (Some(_), None) => lb_core::Established::Continue,
        (Some(entry), Some(id)) => entry.established(id),
    };
    match verdict {
        lb_core::Established::Continue => None,
        lb_core::Established::Drain(limit) => current.or(Some(now + limit)),
    }
}
