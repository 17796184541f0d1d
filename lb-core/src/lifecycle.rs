//! What happens to established connections and UDP flows when a new snapshot changes their backend:
//! the per-Service decisions the datapath only carries out.
//!
//! A connection (TCP, SCTP) or flow (UDP) keeps the backend it was given; a new snapshot may make
//! that backend not ready, unhealthy or gone. The rules, decided here per entry from its
//! [`EntryPolicy`](crate::EntryPolicy) (annotations, with the command line's defaults):
//! - a TCP/SCTP connection whose backend is still listed and still ready (or still eligible: the
//!   serving-and-terminating fallback) continues; a health verdict alone never cuts one (it only
//!   stops new connections);
//! - one whose backend turned not ready follows [`NotReadyConnections`]: `drain` (continue up to
//!   `drain-timeout`, the default), `keep` (continue while the endpoint is listed at all, as
//!   kube-proxy leaves conntrack entries of a not-ready pod alone) or `close` (at once);
//! - one whose backend left the Service drains for `drain-timeout`;
//! - a UDP flow continues while its backend is eligible, else follows [`StaleFlowPolicy`].
//!
//! Pure: the datapath passes the backend and acts on the returned [`Established`].

use std::time::Duration;

use serde::Serialize;

use crate::model::{BackendId, ServiceEntry};

/// What happens to established TCP and SCTP connections of a backend that turned not ready
/// (`ringlb.io/not-ready-connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotReadyConnections {
    /// They continue for at most the entry's `drain_timeout`, then are closed.
    #[default]
    Drain,
    /// They continue as long as the endpoint is listed (ready or not); only its removal starts
    /// the drain. kube-proxy's behaviour: it never cuts an established connection to a live pod.
    Keep,
    /// They are closed at once (a reset), for protocols that must fail over right away.
    Close,
}

impl NotReadyConnections {
    pub const NAMES: &'static str = "drain, keep, close";

    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "drain" => Ok(NotReadyConnections::Drain),
            "keep" => Ok(NotReadyConnections::Keep),
            "close" => Ok(NotReadyConnections::Close),
            other => Err(format!("unknown value {other:?} (known: {})", Self::NAMES)),
        }
    }
}

/// What happens to a UDP flow whose backend is no longer eligible (not ready, unhealthy or removed):
/// `ringlb.io/udp-stale-flows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StaleFlowPolicy {
    /// The flow's next client datagram ends it and opens a new flow to a freshly picked backend. No
    /// flow keeps feeding a backend that left — the kube-proxy complaint where stale conntrack
    /// entries pin UDP clients (e.g. DNS) to a deleted pod.
    #[default]
    Move,
    /// The flow keeps its backend for at most the entry's `drain_timeout` after its first datagram
    /// that found the backend ineligible (as TCP connections drain), then moves as above. For
    /// protocols that keep state per client in the backend.
    Drain,
}

impl StaleFlowPolicy {
    pub const NAMES: &'static str = "move, drain";

    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "move" => Ok(StaleFlowPolicy::Move),
            "drain" => Ok(StaleFlowPolicy::Drain),
            other => Err(format!("unknown value {other:?} (known: {})", Self::NAMES)),
        }
    }
}

/// The verdict on one established connection or flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Established {
    /// It goes on with no deadline (a deadline set earlier is lifted).
    Continue,
    /// It goes on for at most this long from when its backend first stopped qualifying (zero: end
    /// it now), then it is closed (TCP, SCTP) or moved to a new backend (UDP).
    Drain(Duration),
}

impl ServiceEntry {
    /// The verdict on an established TCP or SCTP connection of this entry to `backend`.
    pub fn established(&self, backend: BackendId) -> Established {
        let Some(idx) = self.index_of(backend) else { return Established::Drain(self.policy.drain_timeout) };
        let ready = self.backend(idx).is_some_and(|b| b.conditions.ready);
        if ready || self.is_eligible(idx) {
            return Established::Continue;
        }
        match self.policy.not_ready_connections {
            NotReadyConnections::Drain => Established::Drain(self.policy.drain_timeout),
            NotReadyConnections::Keep => Established::Continue,
            NotReadyConnections::Close => Established::Drain(Duration::ZERO),
        }
    }

    /// The verdict on a UDP flow of this entry to `backend`, at one of its client datagrams.
    pub fn flow(&self, backend: BackendId) -> Established {
        if self.index_of(backend).is_some_and(|idx| self.is_eligible(idx)) {
            return Established::Continue;
        }
        match self.policy.udp_stale_flows {
            StaleFlowPolicy::Move => Established::Drain(Duration::ZERO),
            StaleFlowPolicy::Drain => Established::Drain(self.policy.drain_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointConditions, TrafficPolicy};
    use crate::testing::entry;

    fn with(mut entry: ServiceEntry, edit: impl FnOnce(&mut crate::EntryPolicy)) -> ServiceEntry {
        edit(&mut entry.policy);
        entry
    }

    fn not_ready() -> EndpointConditions {
        EndpointConditions { ready: false, serving: false, terminating: false }
    }

    #[test]
    fn established_connections_follow_the_not_ready_policy() {
        // Backend 0 ready, backend 1 not ready; a third backend was removed.
        let mut base = entry(&[true, true], TrafficPolicy::default());
        let mut backends = base.backends.to_vec();
        backends[1].conditions = not_ready();
        base.backends = backends.into();
        base.eligible = vec![0];
        let (ready, stale) = (base.backends[0].id, base.backends[1].id);
        let gone = BackendId("192.0.2.99:80".parse().expect("addr"));
        let drain = base.policy.drain_timeout;
        assert_eq!(base.established(ready), Established::Continue);
        assert_eq!(base.established(stale), Established::Drain(drain), "drain is the default");
        assert_eq!(base.established(gone), Established::Drain(drain));
        let keep = with(base, |p| p.not_ready_connections = NotReadyConnections::Keep);
        assert_eq!(keep.established(stale), Established::Continue);
        assert_eq!(keep.established(gone), Established::Drain(drain), "removal drains even under keep");
        let close = with(keep, |p| p.not_ready_connections = NotReadyConnections::Close);
        assert_eq!(close.established(stale), Established::Drain(Duration::ZERO));
        assert_eq!(close.established(ready), Established::Continue);
    }

    #[test]
    fn a_ready_backend_out_only_by_health_keeps_its_connections() {
        let mut unhealthy = entry(&[true, true], TrafficPolicy::default());
        unhealthy.eligible = vec![0];
        let close = with(unhealthy, |p| p.not_ready_connections = NotReadyConnections::Close);
        assert_eq!(close.established(close.backends[1].id), Established::Continue);
    }

    #[test]
    fn stale_flows_move_or_drain_per_entry() {
        let mut base = entry(&[true, true], TrafficPolicy::default());
        base.eligible = vec![0];
        let (eligible, stale) = (base.backends[0].id, base.backends[1].id);
        assert_eq!(base.flow(eligible), Established::Continue);
        assert_eq!(base.flow(stale), Established::Drain(Duration::ZERO), "move is the default");
        let drain = with(base, |p| p.udp_stale_flows = StaleFlowPolicy::Drain);
        assert_eq!(drain.flow(stale), Established::Drain(drain.policy.drain_timeout));
    }

    #[test]
    fn names_parse() {
        assert_eq!(NotReadyConnections::parse("keep"), Ok(NotReadyConnections::Keep));
        assert!(NotReadyConnections::parse("forever").is_err());
        assert_eq!(StaleFlowPolicy::parse("drain"), Ok(StaleFlowPolicy::Drain));
        assert!(StaleFlowPolicy::parse("stick").unwrap_err().contains("move, drain"));
    }
}
