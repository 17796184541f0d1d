//! Reaching a backend, as TCP connections and SCTP associations both do: the attempts of one client
//! (the entry's pick among the backends not tried yet, within its `connect-attempts`), why no connect
//! could be started, and when an established one must drain after a snapshot change.
//!
//! A local shortage (no descriptor, no memory, no source port) or a transparent socket the host
//! does not allow is never the backend's fault: it is counted apart and never reported as a
//! backend event.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lb_core::{Backend, BackendIdx, LocalResource, ServiceEntry, Snapshot, VipKey};

use crate::context::Ctx;
use crate::selection::Selection;
use crate::stats::{self, WorkerCounters};
use crate::traffic::Refusal;
use crate::transparent::TransparentError;
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
    /// The entry is transparent and the backend socket could not be bound to the client's
    /// address: every backend would fail alike, and none must be reached from another address.
    Transparent(VipKey, TransparentError),
}

/// The backends one client connection (or SCTP association) was sent to, or passed over because
/// they were full (`max-backend-connections`), so far; none of them is picked again.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tried {
    backends: [BackendIdx; MAX_ATTEMPTS],
    len: usize,
    /// Of those, passed over as full (no connect was made to them).
    full: usize,
}

impl Tried {
    /// Connects made so far.
    pub fn connects(&self) -> usize {
        self.len - self.full
    }

    /// The backend connected to last.
    pub fn last(&self) -> Option<BackendIdx> {
        self.len.checked_sub(1).map(|i| self.backends[i])
    }

    fn push(&mut self, idx: BackendIdx) {
        self.backends[self.len] = idx;
        self.len += 1;
    }
}

/// One client's next backend.
pub(crate) struct Attempt<'a> {
    pub client: SocketAddr,
    pub tried: &'a mut Tried,
}

impl Attempt<'_> {
    /// The next backend to try: the entry's pick among those not tried yet and not full, within
    /// its `connect-attempts`; recorded as tried. Counts retries, and clients no backend was left
    /// for (or only full ones).
    pub fn next<'e>(
        self,
        selection: &mut Selection,
        counters: &WorkerCounters,
        now: Instant,
        entry: &'e ServiceEntry,
    ) -> Result<&'e Backend, Failure> {
        let attempts = (entry.policy.connect_attempts.max(1) as usize).min(MAX_ATTEMPTS);
        let limit = entry.policy.max_backend_connections;
        let tried = self.tried;
        while tried.connects() < attempts && tried.len < MAX_ATTEMPTS {
            let exclude = &tried.backends[..tried.len];
            let Some(picked) = selection.pick(now, entry, self.client, exclude) else { break };
            let backend = entry.backend(picked).ok_or(Failure::Exhausted)?;
            tried.push(picked);
            if limit > 0 && backend.load.active() >= limit {
                tried.full += 1;
                continue;
            }
            if tried.connects() > 1 {
                stats::add(&counters.retries, 1);
            }
            return Ok(backend);
        }
        if tried.connects() == 0 {
            let why = if tried.full > 0 { Refusal::BackendLimit } else { Refusal::NoBackend };
            if why == Refusal::NoBackend {
                stats::add(&counters.no_backend, 1);
            }
            selection.refuse(entry.key, why);
        }
        Err(Failure::Exhausted)
    }
}

/// Whether a new client of `entry` from `client` may be served at all under the entry's limits: its
/// per-client rate, then its VIP key's `max-connections`. `Ok` carries the client's count on the
/// key's open connections when the key has a limit (closed when the connection is released);
/// `Err` the refusal, counted. Entries without limits take no lock and touch no shared counter.
pub(crate) fn admit(
    ctx: &mut Ctx<'_>,
    entry: &ServiceEntry,
    client: IpAddr,
) -> Result<Option<lb_core::BackendLoad>, Refusal> {
    let policy = &entry.policy;
    let refused = if let Some(rate) = policy.client_rate
        && !ctx.shared.rates.admit(ctx.now, entry.key, client, rate)
    {
        Some(Refusal::ClientRate)
    } else if policy.max_connections > 0 {
        let load = ctx.selection.vip_load(entry.key, &ctx.shared.vip_loads);
        if load.active() < policy.max_connections {
            load.open();
            return Ok(Some(load));
        }
        Some(Refusal::VipLimit)
    } else {
        None
    };
    match refused {
        Some(why) => {
            ctx.selection.refuse(entry.key, why);
            Err(why)
        }
        None => Ok(None),
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
            Failure::Transparent(key, error) => ctx.transparent_failure(key, error),
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
