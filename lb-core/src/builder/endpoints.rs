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
use crate::model::{Backend, BackendId, BackendIdx, EndpointConditions};
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
