//! What a protocol component (TCP connections, UDP flows, SCTP associations) may use of its worker
//! while it handles a completion, a tick or a snapshot: [`Ctx`].
//!
//! The worker owns the ring and the pieces every protocol shares (counters, the pick state, the
//! backend events, the warning throttles, the descriptor budget, the snapshot store); a component
//! owns its own table and is lent a `Ctx` for one call. So a component never reaches into another
//! one, nor into the worker, and never imports `crate::worker`. Building a `Ctx` is a handful of
//! pointer copies per completion: no allocation, no dynamic dispatch.

use std::io;
use std::time::Instant;

use lb_core::health::BackendEvent;
use lb_core::{LocalResource, VipKey};

use crate::budget::Room;
use crate::events::EventBuffer;
use crate::ring::{Ring, UserData};
use crate::selection::Selection;
use crate::shared::Shared;
use crate::stats::{self, WorkerCounters};
use crate::traffic::Refusal;
use crate::transparent::TransparentError;
use crate::warnings::{Warning, Warnings, warn_limited};

/// The worker's shared pieces, lent to one component for one call. See the module doc.
pub(crate) struct Ctx<'a> {
    pub ring: &'a mut Ring,
    /// The time of the completion batch being handled.
    pub now: Instant,
    /// The worker's index (for log lines).
    pub worker: usize,
    pub counters: &'a WorkerCounters,
    /// The snapshot store, and whether anyone collects backend events.
    pub shared: &'a Shared,
    /// Pick states, load counts and affinity of the worker (every protocol alike).
    pub selection: &'a mut Selection,
    pub events: &'a mut EventBuffer,
    pub warnings: &'a mut Warnings,
    /// What the rest of the worker leaves of the descriptor budget.
    pub room: Room,
    /// Graceful shutdown began: nothing new is bound or created.
    pub draining: bool,
    /// The worker stops: nothing new is accepted.
    pub stopping: bool,
}

impl Ctx<'_> {
    /// Counts and warns about `what` being refused for the descriptor budget.
    pub fn refuse_for_budget(&mut self, what: &'static str) {
        stats::add(&self.counters.budget_refusals, 1);
        let budget = self.room.per_worker();
        warn_limited!(self, Warning::Budget, budget, "descriptor budget reached: {what}");
    }

    /// Counts a failure of `what` for lack of a local resource (never a backend's failure) and
    /// warns, throttled.
    pub fn local_failure(&mut self, resource: LocalResource, what: &'static str, errno: i32) {
        let counter = match resource {
            LocalResource::SourcePorts => &self.counters.local_no_source_port,
            LocalResource::Descriptors => &self.counters.local_no_descriptors,
            LocalResource::Memory => &self.counters.local_no_memory,
        };
        stats::add(counter, 1);
        let error = io::Error::from_raw_os_error(errno);
        warn_limited!(self, Warning::Resources, %error, "{what} failed: no {} left here", resource.name());
    }

    /// Counts a client of `key` that could not be served because its backend socket could not be
    /// bound to its address (a transparent entry; never the backend's failure) and warns,
    /// throttled: the client is refused rather than shown to the backend as the load balancer.
    pub fn transparent_failure(&mut self, key: VipKey, error: TransparentError) {
        stats::add(&self.counters.local_transparent_failed, 1);
        self.selection.refuse(key, Refusal::Transparent);
        let (errno, why) = (io::Error::from_raw_os_error(error.errno()), error.describe());
        warn_limited!(self, Warning::Transparent, %errno, %key, "a transparent backend socket failed: {why}");
    }

    /// Buffers a backend event for passive outlier detection (see [`crate::events`]).
    pub fn report(&mut self, event: BackendEvent) {
        self.events.record(self.shared, self.counters, event);
    }

    /// Asks the kernel to cancel the operation of `target`; warns (throttled) if the ring refuses.
    pub fn cancel(&mut self, target: UserData) {
        if let Err(error) = self.ring.push_cancel(target) {
            warn_limited!(self, Warning::Submit, %error, "cannot submit a cancel");
        }
    }
}
