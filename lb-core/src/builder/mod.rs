//! Builds a [`Snapshot`] from Kubernetes Service, EndpointSlice and (selector-less) Endpoints
//! objects.
//!
//! Pure and deterministic: the same objects, in any order, give the same snapshot (objects are sorted
//! by namespace/name first, and every tie is broken by identity). It never panics on any input: a bad
//! object or field becomes a [`BuildError`] in the [`BuildReport`] and the rest still builds.
//!
//! Steps: parse and validate every Service (`service`, `vips`, `policy`, `traffic`) and EndpointSlice
//! (`slices`), mirror the Endpoints of selector-less Services that have no slices (`mirror`); a
//! Service rejected now is built from its last good spec, kept in the previous snapshot, so it keeps
//! its policy and VIPs but follows its *current* endpoints (a bad edit must not pin new connections
//! to pods that have since rolled); resolve `VipKey` claims between Services (the previous owner,
//! then the older Service, then namespace/name order); join
//! each served port with its Service's slices of the VIP's address family (`endpoints`); count
//! the local endpoints behind each health-check node port (`health_check_node_ports`).

// Building runs once per object change, not per packet, and errors are the rare path: returning the
// full error by value keeps every site simple.
#![allow(clippy::result_large_err, reason = "cold path; errors carry the object and field by value")]

mod cache;
pub(crate) mod endpoints;
mod health_check_node_ports;
mod health_overlay;
mod health_policy;
mod mirror;
mod policy;
pub(crate) mod service;
mod slices;
mod traffic;
mod vips;

#[cfg(test)]
mod selection_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::compact::CompactService;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::error::BuildError;
use crate::health::HealthOverlay;
use crate::model::{EntryPolicy, ObjectRef, ServiceEntry, Snapshot, VipKey};
use crate::scheduler::{LoadRegistry, Scheduler, SchedulerKind};
use service::ParsedService;

pub use cache::{BuildCache, Revised};
pub use endpoints::BackendState;
pub use health_overlay::apply_health;
pub use slices::{ParsedEndpointSlice, SliceNames};

/// Global defaults that annotations override per Service, and what the builder must know about
/// where it runs and what health checks found.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub default_scheduler: SchedulerKind,
    pub default_policy: EntryPolicy,
    /// The Kubernetes node this ringlb runs on (e.g. from the `NODE_NAME` environment variable set
    /// through the downward API). When set, a Service with `externalTrafficPolicy: Local` gets only
    /// the endpoints whose `nodeName` is this node. `None` (appliance mode: ringlb runs outside the
    /// cluster's nodes) ignores the policy: every endpoint is remote anyway, and dropping them all
    /// would serve nothing.
    pub node_name: Option<String>,
    /// Backends found unhealthy by active checks or outlier detection; they get no new connections
    /// unless every candidate of an entry is unhealthy (panic mode, see [`crate::health`]).
    pub health: HealthOverlay,
    /// Which Services are ringlb's and where their addresses come from.
    pub selection: crate::ServiceSelection,
    /// Where each backend's shared connection counter comes from, so that successive builds give a
    /// backend the same one (see [`crate::LoadRegistry`]). Clones share it: keep one per source.
    pub load: LoadRegistry,
}

/// An object that is valid but not served, and why (logged once by the source). `service` is usually
/// a Service; it is an EndpointSlice for slices that cannot be used (FQDN, no service label).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub service: ObjectRef,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: not served: {}", self.service, self.reason)
    }
}

/// The outcome of one build: the snapshot plus everything rejected or skipped on the way.
#[derive(Debug, Serialize)]
pub struct BuildReport {
    pub snapshot: Snapshot,
    /// Rejections, sorted by object then message.
    pub errors: Vec<BuildError>,
    /// Objects not served on purpose, sorted by object.
    pub skipped: Vec<Skipped>,
    /// Services rejected in this build that are served from their last good spec (policy, ports and
    /// VIPs of `previous`) with their current endpoints.
    pub kept_previous: Vec<ObjectRef>,
}

impl BuildReport {
    /// True when nothing was rejected (skipped objects are fine: they are valid, just not served).
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for BuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "snapshot v{}: {} entries, {} errors, {} skipped",
            self.snapshot.version,
            self.snapshot.len(),
            self.errors.len(),
            self.skipped.len()
        )?;
        for error in &self.errors {
            write!(f, "\n  error: {error}")?;
        }
        for object in &self.kept_previous {
            write!(f, "\n  kept the last good spec of {object}, with its current endpoints")?;
        }
        for skipped in &self.skipped {
            write!(f, "\n  {skipped}")?;
        }
        Ok(())
    }
}

/// Builds snapshot `version` from `services`, `slices` and `endpoints` (core/v1, mirrored for
/// selector-less Services, see `mirror`). Never panics on any input.
///
/// `previous` is the snapshot currently served: a Service rejected now is built from the last good
/// spec it keeps (listed in [`BuildReport::kept_previous`]), so a bad edit never costs a working
/// Service yet its endpoints stay current; it also decides VIP conflicts in favour of the Service
/// that already serves the key.
pub fn build(
    services: &[Service],
    slices: &[EndpointSlice],
    endpoints: &[Endpoints],
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    version: u64,
) -> BuildReport {
    let compact: Vec<CompactService> = services.iter().map(CompactService::from).collect();
    let services: Vec<&CompactService> = compact.iter().collect();
    let slices: Vec<&EndpointSlice> = slices.iter().collect();
    let endpoints: Vec<&Endpoints> = endpoints.iter().collect();
    let mut errors = Vec::new();
    let parsed = slices::parse_named(&slices, &mut errors);
    let slices: Vec<&ParsedEndpointSlice> = parsed.iter().collect();
    build_inner(&services, &slices, &endpoints, options, previous, version, None, errors)
}

/// [`build`] from Services kept compact ([`CompactService`]) and slices parsed when they arrived
/// ([`ParsedEndpointSlice::parse`]), reusing what
/// earlier builds with `cache` computed for objects of the same revision (see [`BuildCache`]); the
/// result is the one [`build`] gives for the same objects.
pub fn build_incremental(
    services: &[Revised<'_, CompactService>],
    slices: &[Revised<'_, ParsedEndpointSlice>],
    endpoints: &[&Endpoints],
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    version: u64,
    cache: &mut BuildCache,
) -> BuildReport {
    let revisions = (cache::Revisions::of(services), cache::Revisions::of(slices));
    let services: Vec<&CompactService> = services.iter().map(|r| r.object).collect();
    let slices: Vec<&ParsedEndpointSlice> = slices.iter().map(|r| r.object).collect();
    cache.begin(options);
    let report = build_inner(
        &services,
        &slices,
        endpoints,
        options,
        previous,
        version,
        Some((cache, &revisions)),
        Vec::new(),
    );
    cache.end();
    report
}

type CacheInput<'c> = Option<(
    &'c mut BuildCache,
    &'c (cache::Revisions<CompactService>, cache::Revisions<ParsedEndpointSlice>),
)>;

#[allow(clippy::too_many_arguments, reason = "the one build behind the three public entry points")]
fn build_inner(
    services: &[&CompactService],
    slices: &[&ParsedEndpointSlice],
    endpoints: &[&Endpoints],
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    version: u64,
    mut cache: CacheInput<'_>,
    mut errors: Vec<BuildError>,
) -> BuildReport {
    let mut skipped = Vec::new();
    if cache.as_ref().is_none_or(|(cache, _)| cache.prune_due()) {
        options.load.prune();
    }
    let (parsed, with_selector) = match cache.as_mut() {
        Some((cache, (revisions, _))) => {
            cache.services_pass(services, options, revisions, &mut errors, &mut skipped)
        }
        None => {
            let parsed = service::parse_all(services, options, &mut cache::Fresh, &mut errors, &mut skipped);
            (parsed, Arc::new(services_with_selector(services)))
        }
    };
    // The cache keeps the slices pass unmirrored: with Endpoints to mirror, it is not used.
    let keep_slices = cache.is_some() && endpoints.is_empty();
    let mut slices_by_service = match cache.as_mut() {
        Some((cache, (_, revisions))) if keep_slices => {
            cache.slices_pass(slices, revisions, &mut errors, &mut skipped)
        }
        _ => slices::group(&slices::unique(slices, &mut errors), &mut errors, &mut skipped),
    };
    mirror::mirror_all(endpoints, &with_selector, &mut slices_by_service, &mut errors, &mut skipped);

    let (candidates, kept_previous) = with_last_good(parsed, previous);
    let mut cache = cache.map(|(cache, _)| cache);
    let table =
        assign_keys(&candidates, &slices_by_service, options, previous, cache.as_deref_mut(), &mut errors);
    let health_check_node_ports = health_check_node_ports::health_check_node_ports(
        &candidates,
        &table,
        options.node_name.as_deref(),
        previous,
        &mut errors,
    );
    if keep_slices && let Some(cache) = cache {
        cache.keep_slices_by_service(slices_by_service);
    }
    let last_good = match previous.map(Snapshot::last_good) {
        // The same specs as before: share the previous map instead of copying every name.
        Some(known)
            if known.len() == candidates.len()
                && known.values().zip(candidates.iter()).all(|(a, b)| Arc::ptr_eq(a, b)) =>
        {
            Arc::clone(known)
        }
        _ => Arc::new(candidates.iter().map(|spec| (spec.object.clone(), Arc::clone(spec))).collect()),
    };

    errors.sort_by_cached_key(|e| (e.object().clone(), e.to_string()));
    errors.dedup();
    skipped.sort_by(|a, b| (&a.service, &a.reason).cmp(&(&b.service, &b.reason)));
    skipped.dedup();
    let snapshot =
        Snapshot::from_parts(version, table, last_good).with_health_check_node_ports(health_check_node_ports);
    BuildReport { snapshot, errors, skipped, kept_previous }
}

/// The Services the table is built from: the valid ones, plus the last good spec (from `previous`) of
/// every Service rejected now, in object order; and which Services were carried over.
fn with_last_good(
    parsed: service::ParsedServices,
    previous: Option<&Snapshot>,
) -> (Arc<Vec<Arc<ParsedService>>>, Vec<ObjectRef>) {
    let mut kept = Vec::new();
    let mut kept_previous = Vec::new();
    if let Some(previous) = previous {
        for object in &parsed.rejected {
            if let Some(spec) = previous.last_good().get(object) {
                kept.push(Arc::clone(spec));
                kept_previous.push(object.clone());
            }
        }
    }
    // `served` is in object order (see `service::parse_all`): without carried-over specs it is the
    // list itself, shared (the build cache then recognises it in O(1)).
    if kept.is_empty() {
        return (parsed.served, kept_previous);
    }
    let mut candidates: Vec<Arc<ParsedService>> = parsed.served.iter().cloned().chain(kept).collect();
    candidates.sort_by(|a, b| a.object.cmp(&b.object));
    (Arc::new(candidates), kept_previous)
}

/// (namespace, name) of every Service with a non-empty `spec.selector`: their Endpoints objects are
/// not mirrored (see `mirror`).
pub(super) fn services_with_selector(services: &[&CompactService]) -> BTreeSet<(String, String)> {
    services
        .iter()
        .filter(|svc| svc.spec.selects)
        .filter_map(|svc| svc.named().ok())
        .map(|object| (object.namespace, object.name))
        .collect()
}

/// Gives each claimed [`VipKey`] one owner, then builds its entry from the owner's port resolved on
/// the key's address family. Owner: the Service that owned the key in `previous` (so a carried-over
/// Service keeps the keys it served before its rejected edit), then the oldest
/// `creationTimestamp` (a Service without one counts as newest), then namespace/name order. Every
/// other claimant gets a `ConflictingVip`. Each (service, port, family) is resolved once and shared
/// by all of its VIPs of that family.
fn assign_keys(
    candidates: &Arc<Vec<Arc<ParsedService>>>,
    slices_by_service: &slices::SlicesByService,
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    mut cache: Option<&mut BuildCache>,
    errors: &mut Vec<BuildError>,
) -> BTreeMap<VipKey, Arc<ServiceEntry>> {
    let winners = match cache.as_deref_mut() {
        Some(cache) => match cache.owners(candidates) {
            Some(winners) => winners,
            None => {
                let (winners, contested) = owners(candidates, previous, errors);
                let winners = Arc::new(winners);
                // The cached owners are always the last build's, or none: a table started from
                // the last one must have been built with the same owners.
                if contested {
                    cache.forget_owners();
                } else {
                    cache.keep_owners(candidates, &winners);
                }
                winners
            }
        },
        None => Arc::new(owners(candidates, previous, errors).0),
    };
    let start = cache.as_deref_mut().and_then(|cache| cache.start_from_last_table(candidates));
    let (mut table, redo) = match start {
        Some((table, redo)) => (table, redo),
        None => (BTreeMap::new(), (0..winners.len()).collect()),
    };
    let mut resolved: BTreeMap<(usize, usize, bool), Arc<endpoints::ResolvedPort>> = BTreeMap::new();
    // One key buffer for the slice lookups (no allocation per Service).
    let mut scratch = (String::new(), String::new());
    for &(key, s, p, vip) in redo.iter().map(|&i| &winners[i]) {
        let svc = &candidates[s];
        let ipv6 = key.addr.is_ipv6();
        let port = resolved.entry((s, p, ipv6)).or_insert_with(|| {
            scratch.0.clone_from(&svc.object.namespace);
            scratch.1.clone_from(&svc.object.name);
            let own = slices_by_service.get(&scratch).map_or(&[][..], Vec::as_slice);
            let resolve = || endpoints::resolve_port(&svc.ports[p], own, ipv6, svc, options);
            match cache.as_deref_mut() {
                Some(cache) => cache.resolved(svc, p, ipv6, own, resolve),
                None => Arc::new(resolve()),
            }
        });
        let entry = match cache.as_deref_mut() {
            Some(cache) => cache.entry(key, svc, port, vip, || port.entry(key, svc, vip)),
            None => Arc::new(port.entry(key, svc, vip)),
        };
        table.insert(key, entry);
    }
    if let Some(cache) = cache {
        cache.keep_table(&table);
    }
    table
}

/// The owner of every claimed key, in key order, as (key, candidate, port index, VIP); and whether
/// any key was contested (then every other claimant got a `ConflictingVip`).
fn owners(
    candidates: &[Arc<ParsedService>],
    previous: Option<&Snapshot>,
    errors: &mut Vec<BuildError>,
) -> (Vec<(VipKey, usize, usize, vips::Vip)>, bool) {
    let mut claims: BTreeMap<VipKey, Vec<(usize, usize, vips::Vip)>> = BTreeMap::new();
    for (s, candidate) in candidates.iter().enumerate() {
        for &vip in &candidate.vips {
            for (p, port) in candidate.ports.iter().enumerate() {
                claims.entry(VipKey::new(vip.addr, port.port, port.protocol)).or_default().push((s, p, vip));
            }
        }
    }
    let mut winners = Vec::with_capacity(claims.len());
    let mut contested = false;
    for (key, claimants) in claims {
        let previous_owner = previous.and_then(|p| p.get(&key)).map(|e| &e.service);
        let rank = |s: usize| {
            let svc = &candidates[s];
            (previous_owner != Some(&svc.object), svc.created.is_none(), &svc.created, &svc.object)
        };
        let Some(&(s, p, vip)) = claimants.iter().min_by(|a, b| rank(a.0).cmp(&rank(b.0))) else { continue };
        winners.push((key, s, p, vip));
        let owner = &candidates[s].object;
        for &(other, _, _) in &claimants {
            let object = &candidates[other].object;
            if object != owner {
                contested = true;
                errors.push(BuildError::ConflictingVip { object: object.clone(), owner: owner.clone(), key });
            }
        }
    }
    (winners, contested)
}

/// The namespace Kubernetes assumes when a manifest leaves it out.
const DEFAULT_NAMESPACE: &str = "default";

/// Names an object from its metadata; a missing or empty name is an error (the object is ignored).
fn object_ref(kind: &'static str, meta: &ObjectMeta) -> Result<ObjectRef, BuildError> {
    name_of(kind, meta.namespace.as_deref(), meta.name.as_deref())
}

fn name_of(kind: &'static str, namespace: Option<&str>, name: Option<&str>) -> Result<ObjectRef, BuildError> {
    let namespace = namespace.filter(|n| !n.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    let object = |name: &str| ObjectRef { kind, namespace: namespace.to_owned(), name: name.to_owned() };
    match name {
        Some(name) if !name.is_empty() => Ok(object(name)),
        _ => Err(BuildError::MissingName { object: object("<unnamed>"), field: "metadata.name".to_owned() }),
    }
}

/// An object a build names (see [`object_ref`]).
pub(super) trait Named {
    fn named(&self) -> Result<ObjectRef, BuildError>;
}

impl<T: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta>> Named for T {
    fn named(&self) -> Result<ObjectRef, BuildError> {
        object_ref(T::KIND, self.metadata())
    }
}

impl Named for CompactService {
    fn named(&self) -> Result<ObjectRef, BuildError> {
        name_of("Service", self.metadata.namespace.as_deref(), self.metadata.name.as_deref())
    }
}

/// Names every object of one kind (one without a name is an error and left out) and keeps one copy
/// of each name; copies that differ are all rejected (no order-independent choice exists, they are
/// returned as rejected), identical copies are harmless and collapse to one. In name order.
/// Objects already named, one per name and in name order (a store's), are returned as they come.
fn unique_objects<'a, T>(
    objects: &[&'a T],
    errors: &mut Vec<BuildError>,
) -> (Vec<(ObjectRef, &'a T)>, BTreeSet<ObjectRef>)
where
    T: PartialEq + Named,
{
    let named: Vec<(ObjectRef, &'a T)> =
        objects.iter().map_while(|&value| Some((value.named().ok()?, value))).collect();
    if named.len() == objects.len() && named.windows(2).all(|pair| pair[0].0 < pair[1].0) {
        return (named, BTreeSet::new());
    }
    let mut by_name: BTreeMap<ObjectRef, Vec<&'a T>> = BTreeMap::new();
    for &value in objects {
        match value.named() {
            Ok(object) => by_name.entry(object).or_default().push(value),
            Err(error) => errors.push(error),
        }
    }
    let mut unique = Vec::new();
    let mut rejected = BTreeSet::new();
    for (object, copies) in by_name {
        if copies[1..].iter().all(|c| *c == copies[0]) {
            unique.push((object, copies[0]));
        } else {
            errors.push(BuildError::DuplicateObject { object: object.clone() });
            rejected.insert(object);
        }
    }
    (unique, rejected)
}

/// Parses an IP that will receive or carry traffic: unspecified and multicast addresses are refused.
/// Hands the trimmed value of `annotation` to `apply`, if the object has it; a value `apply`
/// refuses becomes an [`BuildError::InvalidAnnotation`] naming the object, and the rest goes on.
/// Every `ringlb.io/*` annotation is read through here.
fn read_annotation(
    annotations: &crate::Labels,
    object: &ObjectRef,
    errors: &mut Vec<BuildError>,
    annotation: &'static str,
    apply: &mut dyn FnMut(&str) -> Result<(), String>,
) {
    let Some(value) = annotations.get(annotation) else { return };
    if let Err(reason) = apply(value.trim()) {
        errors.push(BuildError::InvalidAnnotation {
            object: object.clone(),
            annotation,
            value: value.to_owned(),
            reason,
        });
    }
}

fn parse_ip(value: &str, object: &ObjectRef, field: impl FnOnce() -> String) -> Result<IpAddr, BuildError> {
    let invalid = |reason| BuildError::InvalidIp {
        object: object.clone(),
        field: field(),
        value: value.to_owned(),
        reason,
    };
    match value.trim().parse::<IpAddr>() {
        Err(_) => Err(invalid("not an IPv4 or IPv6 address")),
        Ok(ip) if ip.is_unspecified() => Err(invalid("unspecified address")),
        Ok(ip) if ip.is_multicast() => Err(invalid("multicast address")),
        Ok(IpAddr::V4(v4)) if v4.is_broadcast() => Err(invalid("broadcast address")),
        Ok(ip) => Ok(ip),
    }
}

fn parse_port(value: i64, object: &ObjectRef, field: impl FnOnce() -> String) -> Result<u16, BuildError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(BuildError::InvalidPort { object: object.clone(), field: field(), value }),
    }
}

impl endpoints::ResolvedPort {
    /// The entry of this (service, port) on one VIP. `loadBalancerSourceRanges` guard only the
    /// load-balancer IPs, as kube-proxy's do: an entry of an external IP admits every client.
    fn entry(&self, key: VipKey, svc: &ParsedService, vip: vips::Vip) -> ServiceEntry {
        let mut traffic = svc.policy.traffic.clone();
        if !vip.load_balancer {
            traffic.source_ranges.clear();
        }
        ServiceEntry {
            key,
            service: svc.object.clone(),
            port_name: self.port_name.clone(),
            backends: self.backends.clone(),
            eligible: self.eligible.clone(),
            scheduler: Scheduler::clone(&self.scheduler),
            policy: EntryPolicy {
                proxy_protocol: svc.policy.entry.proxy_protocol.for_protocol(key.protocol),
                transparent: svc.policy.entry.transparent && policy::transparent_serves(key.protocol),
                ..svc.policy.entry
            },
            traffic,
        }
    }
}
