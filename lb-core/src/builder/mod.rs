//! Builds a [`Snapshot`] from Kubernetes Service and EndpointSlice objects.
//!
//! Pure and deterministic: the same objects, in any order, give the same snapshot (objects are sorted
//! by namespace/name first, and every tie is broken by identity). It never panics on any input: a bad
//! object or field becomes a [`BuildError`] in the [`BuildReport`] and the rest still builds.
//!
//! Steps: parse and validate every Service (`service`, `vips`, `policy`) and EndpointSlice (`slices`);
//! carry the previous entries of rejected Services over unchanged (last known good); resolve
//! `VipKey` claims between Services (the previous owner keeps a key, else the older Service, else
//! namespace/name order); join each served port with its Service's slices (`endpoints`).

// Building runs once per object change, not per packet, and errors are the rare path: returning the
// full error by value keeps every site simple.
#![allow(clippy::result_large_err, reason = "cold path; errors carry the object and field by value")]

mod endpoints;
mod health_overlay;
mod health_policy;
mod policy;
mod service;
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

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::error::BuildError;
use crate::health::HealthOverlay;
use crate::model::{EntryPolicy, ObjectRef, ServiceEntry, Snapshot, VipKey};
use crate::scheduler::{Scheduler, SchedulerKind};

pub use health_overlay::apply_health;

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
    /// Services rejected in this build whose entries from `previous` are served unchanged instead.
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
            write!(f, "\n  kept last known good entries of {object}")?;
        }
        for skipped in &self.skipped {
            write!(f, "\n  {skipped}")?;
        }
        Ok(())
    }
}

/// Builds snapshot `version` from `services` and `slices`. Never panics on any input.
///
/// `previous` is the snapshot currently served: a Service rejected now keeps the entries it had there
/// (last known good, listed in [`BuildReport::kept_previous`]), so a bad edit never costs a working
/// table; it also decides VIP conflicts in favour of the Service that already serves the key.
pub fn build(
    services: &[Service],
    slices: &[EndpointSlice],
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    version: u64,
) -> BuildReport {
    let mut errors = Vec::new();
    let mut skipped = Vec::new();
    let parsed = service::parse_all(services, options, &mut errors, &mut skipped);
    let slices_by_service = slices::parse_all(slices, &mut errors, &mut skipped);

    let (mut table, kept_previous) = keep_last_known_good(&parsed.rejected, previous);
    let resolved = resolve_ports(&parsed.served, &slices_by_service, options);
    assign_keys(&parsed.served, &resolved, previous, &mut table, &mut errors);

    errors.sort_by_cached_key(|e| (e.object().clone(), e.to_string()));
    errors.dedup();
    skipped.sort_by(|a, b| (&a.service, &a.reason).cmp(&(&b.service, &b.reason)));
    skipped.dedup();
    BuildReport { snapshot: Snapshot::from_shared(version, table), errors, skipped, kept_previous }
}

/// The previous entries of every Service rejected now, and which Services kept some.
fn keep_last_known_good(
    rejected: &BTreeSet<ObjectRef>,
    previous: Option<&Snapshot>,
) -> (BTreeMap<VipKey, Arc<ServiceEntry>>, Vec<ObjectRef>) {
    let mut table = BTreeMap::new();
    let mut kept_previous = Vec::new();
    let Some(previous) = previous else { return (table, kept_previous) };
    for object in rejected {
        let mut kept = false;
        for entry in previous.entries().filter(|e| &e.service == object) {
            table.insert(entry.key, Arc::clone(entry));
            kept = true;
        }
        if kept {
            kept_previous.push(object.clone());
        }
    }
    (table, kept_previous)
}

/// Every (service, port) pair's backends, computed once and shared by all of its VIPs;
/// `result[s][p]` belongs to `served[s].ports[p]`.
fn resolve_ports(
    served: &[service::ParsedService],
    slices_by_service: &slices::SlicesByService,
    options: &BuildOptions,
) -> Vec<Vec<endpoints::ResolvedPort>> {
    served
        .iter()
        .map(|svc| {
            let own = slices_by_service
                .get(&(svc.object.namespace.clone(), svc.object.name.clone()))
                .map_or(&[][..], Vec::as_slice);
            svc.ports.iter().map(|port| endpoints::resolve_port(port, own, svc, options)).collect()
        })
        .collect()
}

/// Gives each claimed [`VipKey`] one owner: a carried-over entry keeps its key; otherwise the
/// Service that owned the key in `previous`, then the oldest `creationTimestamp` (a Service without
/// one counts as newest), then namespace/name order. Every other claimant gets a `ConflictingVip`.
fn assign_keys(
    served: &[service::ParsedService],
    resolved: &[Vec<endpoints::ResolvedPort>],
    previous: Option<&Snapshot>,
    table: &mut BTreeMap<VipKey, Arc<ServiceEntry>>,
    errors: &mut Vec<BuildError>,
) {
    let mut claims: BTreeMap<VipKey, Vec<(usize, usize)>> = BTreeMap::new();
    for (s, svc) in served.iter().enumerate() {
        for &addr in &svc.vips {
            for (p, port) in svc.ports.iter().enumerate() {
                claims.entry(VipKey::new(addr, port.port, port.protocol)).or_default().push((s, p));
            }
        }
    }
    for (key, claimants) in claims {
        let owner = match table.get(&key) {
            Some(carried) => carried.service.clone(),
            None => {
                let previous_owner = previous.and_then(|p| p.get(&key)).map(|e| &e.service);
                let rank = |s: usize| {
                    let svc = &served[s];
                    (previous_owner != Some(&svc.object), svc.created.is_none(), &svc.created, &svc.object)
                };
                let Some(&(s, p)) = claimants.iter().min_by(|a, b| rank(a.0).cmp(&rank(b.0))) else {
                    continue;
                };
                table.insert(key, Arc::new(resolved[s][p].entry(key, &served[s])));
                served[s].object.clone()
            }
        };
        for &(s, _) in &claimants {
            let object = &served[s].object;
            if *object != owner {
                errors.push(BuildError::ConflictingVip { object: object.clone(), owner: owner.clone(), key });
            }
        }
    }
}

/// The namespace Kubernetes assumes when a manifest leaves it out.
const DEFAULT_NAMESPACE: &str = "default";

/// Names an object from its metadata; a missing or empty name is an error (the object is ignored).
fn object_ref(kind: &'static str, meta: &ObjectMeta) -> Result<ObjectRef, BuildError> {
    let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    let object = |name: &str| ObjectRef { kind, namespace: namespace.to_owned(), name: name.to_owned() };
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok(object(name)),
        _ => Err(BuildError::MissingName { object: object("<unnamed>"), field: "metadata.name".to_owned() }),
    }
}

/// Keeps one copy of each object name; copies that differ are all rejected (no order-independent
/// choice exists), identical copies are harmless and collapse to one.
fn unique_by_name<'a, T: PartialEq>(
    objects: impl IntoIterator<Item = (ObjectRef, &'a T)>,
    errors: &mut Vec<BuildError>,
) -> (Vec<(ObjectRef, &'a T)>, BTreeSet<ObjectRef>) {
    let mut by_name: BTreeMap<ObjectRef, Vec<&'a T>> = BTreeMap::new();
    for (object, value) in objects {
        by_name.entry(object).or_default().push(value);
    }
    let mut unique = Vec::new();
    let mut rejected = BTreeSet::new();
    for (object, copies) in by_name {
        if copies.iter().all(|c| *c == copies[0]) {
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
    annotations: &BTreeMap<String, String>,
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
            value: value.clone(),
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
    /// The entry of this (service, port) on one VIP.
    fn entry(&self, key: VipKey, svc: &service::ParsedService) -> ServiceEntry {
        ServiceEntry {
            key,
            service: svc.object.clone(),
            port_name: self.port_name.clone(),
            backends: self.backends.clone(),
            eligible: self.eligible.clone(),
            scheduler: Scheduler::clone(&self.scheduler),
            policy: svc.policy.entry,
            traffic: svc.policy.traffic.clone(),
        }
    }
}
