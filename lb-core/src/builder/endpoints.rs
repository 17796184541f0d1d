//! Joins one service port with its Service's EndpointSlices of one address family into a sorted
//! backend set: an IPv4 VIP gets the IPv4 endpoints and an IPv6 VIP the IPv6 ones (kube-proxy
//! programs each family on its own), so a dual-stack pod is one backend per family, never two in one.
//!
//! Port resolution, per slice (so per endpoint: slices may map one name to different numbers), as
//! kube-proxy does it: the EndpointSlice controller names each slice port after the *service* port
//! (`spec.ports[].name`, `""` when unnamed) and sets its `port` to the resolved target port, so
//! 1. a slice port with the service port's name and protocol gives the backend port (an unset `port`
//!    there means "unrestricted": the integer targetPort is used);
//! 2. else, for a named `targetPort`, a slice port carrying that name (hand-written manifests);
//! 3. else, when the slice lists no ports at all (hand-written manifests), the integer targetPort;
//! 4. else the slice's endpoints are not backends of this port.
//!
//! An endpoint address+port in several slices counts once; if its conditions differ, the most
//! serviceable copy wins (eligible, then ready, then serving), ties going to the first slice by name.
//! Eligible (kube-proxy's rules, then ringlb's health): of the candidates (every backend, or under
//! `externalTrafficPolicy: Local` with a known node, those whose `nodeName` is that node), the ready
//! ones (ready and not terminating); if there is none, the `serving` and `terminating` ones, so a
//! rolling update with long drains keeps serving; else none. Backends the health overlay marks
//! unhealthy are then left out, unless that leaves nothing at all: then the same rule runs without
//! the overlay (panic mode, see `crate::health`). Weight: `ringlb.io/backend-weights` of the Service
//! by IP, else the slice's `ringlb.io/weight`, else 1.

use std::net::SocketAddr;
use std::sync::Arc;

use super::BuildOptions;
use super::service::{ParsedService, PortSpec, TargetSpec};
use super::slices::ParsedSlice;
use crate::health::HealthOverlay;
use crate::model::{Backend, BackendId, BackendIdx, EndpointConditions, ServiceEntry};
use crate::scheduler::Scheduler;

/// Everything the entries of one (service, port) share, whatever their VIP.
#[derive(Debug)]
pub(super) struct ResolvedPort {
    pub port_name: Option<String>,
    pub backends: Arc<[Backend]>,
    pub eligible: Vec<BackendIdx>,
    pub scheduler: Scheduler,
}

/// The backends of `port` among the `ipv6` (or IPv4) slices of `svc`.
pub(super) fn resolve_port(
    port: &PortSpec,
    slices: &[Arc<ParsedSlice>],
    ipv6: bool,
    svc: &ParsedService,
    options: &BuildOptions,
) -> ResolvedPort {
    let policy = &svc.policy;
    // Candidates in slice order, sorted by address (stable: among copies of one address the first
    // slice's comes first), then one per address: the best ranked, the first on a tie. A sort of
    // one vector rather than a map: a full build resolves 100,000 backends.
    let mut candidates: Vec<(BackendId, &super::slices::ParsedEndpoint, u32)> = Vec::new();
    for slice in slices.iter().filter(|slice| slice.ipv6 == ipv6) {
        let Some(target) = target_port(port, slice) else { continue };
        candidates.extend(slice.endpoints.iter().map(|endpoint| {
            let weight = policy.backend_weights.get(&endpoint.addr).copied().unwrap_or(slice.weight).max(1);
            (BackendId(SocketAddr::new(endpoint.addr, target)), endpoint, weight)
        }));
    }
    candidates.sort_by_key(|(id, _, _)| *id);
    candidates.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same && rank(&later.1.conditions) > rank(&kept.1.conditions) {
            std::mem::swap(later, kept);
        }
        same
    });
    let loads = options.load.counters(candidates.iter().map(|(id, _, _)| *id));
    // One allocation: a zip of two vectors' iterators has an exact length.
    let backends: Arc<[Backend]> = candidates
        .into_iter()
        .zip(loads)
        .map(|((id, endpoint, weight), load)| Backend {
            id,
            conditions: endpoint.conditions,
            weight,
            placement: Arc::clone(&endpoint.placement),
            load,
        })
        .collect();
    let node = options.node_name.as_deref().filter(|_| policy.traffic.node_local);
    let eligible = eligible_of(&backends, node, |b| options.health.is_unhealthy(&svc.object, b.id));
    let scheduler = Scheduler::build_with(&policy.scheduler, &backends, &eligible);
    let port_name = (!port.name.is_empty()).then(|| port.name.clone());
    ResolvedPort { port_name, backends, eligible, scheduler }
}

/// The eligible indices of `backends` (see the module doc): on `node` only when given; the ready
/// tier, else the serving+terminating tier; the first tier with a healthy backend gives its healthy
/// backends, else (panic mode) the first non-empty tier whole; else nothing.
pub(super) fn eligible_of(
    backends: &[Backend],
    node: Option<&str>,
    unhealthy: impl Fn(&Backend) -> bool,
) -> Vec<BackendIdx> {
    let tier = |wanted: fn(&EndpointConditions) -> bool| -> Vec<BackendIdx> {
        backends
            .iter()
            .enumerate()
            .filter(|(_, b)| node.is_none_or(|node| b.node_name() == Some(node)))
            .filter(|(_, b)| wanted(&b.conditions))
            .filter_map(|(i, _)| BackendIdx::try_from(i).ok())
            .collect()
    };
    let tiers = [tier(is_ready), tier(is_serving_terminating)];
    for tier in &tiers {
        let healthy: Vec<BackendIdx> =
            tier.iter().copied().filter(|&idx| !unhealthy(&backends[idx as usize])).collect();
        if !healthy.is_empty() {
            return healthy;
        }
    }
    tiers.into_iter().find(|tier| !tier.is_empty()).unwrap_or_default()
}

/// Where a backend of an entry stands for new connections, and if left out, why (`/backends`,
/// `/metrics`). Follows [`eligible_of`]'s rules; the health verdicts are told apart by why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Gets new connections.
    Eligible,
    /// `externalTrafficPolicy: Local` and it runs on another node.
    OtherNode,
    /// Terminating (and ready or serving backends are preferred to it).
    Terminating,
    /// Not ready (and, if serving, not terminating: only terminating ones may serve).
    NotReady,
    /// Failing its Service's active health checks.
    FailingChecks,
    /// Ejected by passive outlier detection.
    Ejected,
}

impl BackendState {
    /// Of backend `idx` of `entry` (an unknown index is not ready), with `node` this node when
    /// ringlb knows it, and the verdicts that keep backends out: failing checks, ejections.
    pub fn of(
        entry: &ServiceEntry,
        idx: BackendIdx,
        node: Option<&str>,
        failing_checks: &HealthOverlay,
        ejected: &HealthOverlay,
    ) -> BackendState {
        let Some(backend) = entry.backend(idx) else { return BackendState::NotReady };
        if entry.is_eligible(idx) {
            return BackendState::Eligible;
        }
        let node = node.filter(|_| entry.traffic.node_local);
        if node.is_some_and(|node| backend.node_name() != Some(node)) {
            return BackendState::OtherNode;
        }
        let conditions = &backend.conditions;
        if failing_checks.is_unhealthy(&entry.service, backend.id) {
            return BackendState::FailingChecks;
        }
        if ejected.is_unhealthy(&entry.service, backend.id) {
            return BackendState::Ejected;
        }
        if conditions.terminating {
            return BackendState::Terminating;
        }
        BackendState::NotReady
    }

    pub fn name(self) -> &'static str {
        match self {
            BackendState::Eligible => "eligible",
            BackendState::OtherNode => "other_node",
            BackendState::Terminating => "terminating",
            BackendState::NotReady => "not_ready",
            BackendState::FailingChecks => "failing_checks",
            BackendState::Ejected => "ejected",
        }
    }
}

/// First choice for new connections: ready and not terminating.
pub(crate) fn is_ready(conditions: &EndpointConditions) -> bool {
    conditions.ready && !conditions.terminating
}

/// Fallback when no endpoint is ready: still serving while terminating (kube-proxy's rule).
pub(crate) fn is_serving_terminating(conditions: &EndpointConditions) -> bool {
    conditions.serving && conditions.terminating
}

fn rank(c: &EndpointConditions) -> (bool, bool, bool) {
    (is_ready(c), c.ready, c.serving)
}

/// The backend port of `port` on the endpoints of `slice`; see the module doc for the rules.
fn target_port(port: &PortSpec, slice: &ParsedSlice) -> Option<u16> {
    let number = match &port.target {
        TargetSpec::Number(n) => Some(*n),
        TargetSpec::Name(_) => None,
    };
    let named = |name: &str| slice.ports.iter().find(|p| p.name == name && p.protocol == port.protocol);
    if let Some(slice_port) = named(&port.name) {
        return slice_port.port.or(number);
    }
    if let TargetSpec::Name(target_name) = &port.target {
        return named(target_name).and_then(|p| p.port);
    }
    if slice.declares_ports { None } else { number }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::{ObjectRef, Placement, Protocol, TrafficPolicy, VipKey};
    use crate::scheduler::SchedulerKind;

    fn backend(port: u16, conditions: EndpointConditions, node: &str) -> Backend {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), port);
        let placement = Placement { node_name: Some(node.into()), ..Placement::default() };
        Backend { placement: Arc::new(placement), ..Backend::ready(addr).with_conditions(conditions) }
    }

    #[test]
    fn each_left_out_backend_is_told_why() {
        let ready = EndpointConditions::default();
        let not_ready = EndpointConditions { ready: false, serving: false, terminating: false };
        let terminating = EndpointConditions { ready: false, serving: true, terminating: true };
        let backends = vec![
            backend(1, ready, "here"),
            backend(2, not_ready, "here"),
            backend(3, terminating, "here"),
            backend(4, ready, "there"),
            backend(5, ready, "here"),
            backend(6, ready, "here"),
        ];
        let service = ObjectRef::service("default", "web");
        let (mut failing, mut ejected) = (HealthOverlay::new(), HealthOverlay::new());
        failing.mark(&service, backends[4].id);
        ejected.mark(&service, backends[5].id);
        let unhealthy =
            |b: &Backend| failing.is_unhealthy(&service, b.id) || ejected.is_unhealthy(&service, b.id);
        let eligible = eligible_of(&backends, Some("here"), unhealthy);
        let scheduler = Scheduler::build(SchedulerKind::RoundRobin, &backends, &eligible);
        let entry = ServiceEntry {
            key: VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80, Protocol::Tcp),
            service: service.clone(),
            port_name: None,
            backends: backends.into(),
            eligible,
            scheduler,
            policy: Default::default(),
            traffic: TrafficPolicy { node_local: true, ..TrafficPolicy::default() },
        };
        let states: Vec<_> = (0..6)
            .map(|idx| BackendState::of(&entry, idx, Some("here"), &failing, &ejected).name())
            .collect();
        assert_eq!(
            states,
            ["eligible", "not_ready", "terminating", "other_node", "failing_checks", "ejected"]
        );
        assert_eq!(BackendState::of(&entry, 99, None, &failing, &ejected), BackendState::NotReady);
    }
}
