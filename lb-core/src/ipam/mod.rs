//! Address allocation for ringlb's `LoadBalancer` Services, compatible with MetalLB's pools and
//! annotations so its users switch without touching their manifests.
//!
//! [`plan`] is a pure function of the Services (with their current statuses), the pools and the
//! namespaces' labels; the leader writes what it decides. Invariants:
//! - **Deterministic and stable**: Services are considered oldest first (then by namespace/name);
//!   every current status IP that is still valid for its Service is kept before anything new is
//!   allocated, so a restart, a resync or a new replica moves no IP; an address is freed when its
//!   Service is deleted, changes type or class, or no longer fits (pool gone, request changed).
//! - **Never two owners**: an address has several Services only when they share it (below).
//! - **Only pool addresses**: a requested IP (`metallb.io/loadBalancerIPs`, `spec.loadBalancerIP`)
//!   is assigned only if a pool that admits the Service holds it and nothing incompatible uses it;
//!   otherwise the Service gets no address and a [`Problem`] says why.
//! - **Sharing**: Services with the same `metallb.io/allow-shared-ip` key share an address when
//!   no (port, protocol) of theirs collides, whatever pods they select and whatever their
//!   `externalTrafficPolicy`: ringlb dispatches per port, so the refusals MetalLB needs (it routes
//!   whole IPs to nodes) do not apply. 53/TCP and 53/UDP on one address are two ports.
//! - **Families**: `spec.ipFamilies` and `ipFamilyPolicy` (SingleStack: the first family;
//!   PreferDualStack: both when pools allow, at least the first; RequireDualStack: both or none).

// Planning runs once per change, and a problem is what a Service's Event says: by value is simplest.
#![allow(clippy::result_large_err, reason = "cold path; a problem carries its objects by value")]

mod pool;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

pub use pool::{IpAddressPool, Pool, PoolError, PoolSpec, Range, ServiceAllocation};
use pool::{from_u128, to_u128};

use crate::annotations::{self, METALLB_ADDRESS_POOL, METALLB_ALLOW_SHARED_IP, METALLB_LOAD_BALANCER_IPS};
use crate::compact::CompactService;
use crate::labels::Labels;
use crate::model::{ObjectRef, Protocol};
use crate::selection::ServiceSelection;

/// The `ipMode` ringlb writes: it terminates connections, so kube-proxy must send traffic for the
/// address to it rather than short-circuit to the pods.
pub const IP_MODE: &str = "Proxy";

/// What allocation works from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub services: &'a [&'a CompactService],
    pub pools: &'a [&'a IpAddressPool],
    /// Namespace name → its labels (for `namespaceSelectors`).
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub selection: &'a ServiceSelection,
}

/// The addresses one Service should have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    /// In the order of the Service's `ipFamilies`; empty when nothing could be assigned.
    pub ips: Vec<IpAddr>,
    /// The pool of each address (same order).
    pub pools: Vec<String>,
}

/// Why a Service did not get (all) the addresses it wants. Reported as a Warning Event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem")]
pub enum Problem {
    /// No pool admits the Service (namespace, selectors, `autoAssign`) for a family.
    NoPool { service: ObjectRef, family: &'static str },
    /// Every admitting pool is full.
    PoolExhausted { service: ObjectRef, family: &'static str, pools: Vec<String> },
    /// `metallb.io/address-pool` names a pool that does not exist (or is unusable).
    UnknownPool { service: ObjectRef, pool: String },
    /// A requested address is held by a Service it cannot be shared with.
    RequestedIpTaken { service: ObjectRef, ip: IpAddr, owner: ObjectRef, reason: String },
    /// A requested address lies in no pool that admits the Service.
    RequestedIpNotInPool { service: ObjectRef, ip: IpAddr },
    /// A request that cannot be read.
    InvalidRequest { service: ObjectRef, value: String, reason: String },
}

impl Problem {
    pub fn service(&self) -> &ObjectRef {
        match self {
            Problem::NoPool { service, .. }
            | Problem::PoolExhausted { service, .. }
            | Problem::UnknownPool { service, .. }
            | Problem::RequestedIpTaken { service, .. }
            | Problem::RequestedIpNotInPool { service, .. }
            | Problem::InvalidRequest { service, .. } => service,
        }
    }

    /// The Event reason (CamelCase, as Kubernetes Events name them).
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::NoPool { .. } => "NoAddressPool",
            Problem::PoolExhausted { .. } => "AddressPoolExhausted",
            Problem::UnknownPool { .. } => "UnknownAddressPool",
            Problem::RequestedIpTaken { .. } => "RequestedIPTaken",
            Problem::RequestedIpNotInPool { .. } => "RequestedIPNotInPool",
            Problem::InvalidRequest { .. } => "InvalidIPRequest",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoPool { family, .. } => write!(f, "no address pool admits this Service for {family}"),
            Problem::PoolExhausted { family, pools, .. } => {
                write!(f, "no free {family} address in pool(s) {}", pools.join(", "))
            }
            Problem::UnknownPool { pool, .. } => {
                write!(f, "address pool {pool:?} does not exist or is unusable")
            }
            Problem::RequestedIpTaken { ip, owner, reason, .. } => {
                write!(f, "requested address {ip} is used by {owner} and cannot be shared: {reason}")
            }
            Problem::RequestedIpNotInPool { ip, .. } => {
                write!(f, "requested address {ip} is in no address pool that admits this Service")
            }
            Problem::InvalidRequest { value, reason, .. } => {
                write!(f, "requested address {value:?}: {reason}")
            }
        }
    }
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Every Service ringlb allocates for, with what its status should hold.
    pub assignments: BTreeMap<ObjectRef, Assignment>,
    /// Services that are no longer ringlb's but still carry a status ringlb wrote: remove it.
    pub releases: Vec<ObjectRef>,
    pub problems: Vec<Problem>,
    /// Pools that cannot be used, and why.
    pub pool_errors: Vec<PoolError>,
    /// Of every usable pool, by name: its size and how many of its addresses are assigned.
    pub usage: Vec<PoolUsage>,
}

/// How full one pool is, as the plan leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolUsage {
    pub pool: String,
    /// Addresses in its ranges (an IPv6 range can hold more than `u64`: saturates).
    pub total: u64,
    /// Distinct addresses assigned from it (a shared address counts once).
    pub in_use: u64,
}

/// One Service's claim on an address.
#[derive(Debug, Clone)]
struct User {
    service: ObjectRef,
    key: Option<String>,
    ports: BTreeSet<(u16, Protocol)>,
}

/// What allocation needs to know of one Service.
#[derive(Debug)]
struct Claimant {
    object: ObjectRef,
    namespace: String,
    labels: Labels,
    key: Option<String>,
    ports: BTreeSet<(u16, Protocol)>,
    /// `false` for IPv4, `true` for IPv6, in preference order.
    families: Vec<bool>,
    /// Whether every family in `families` is required (RequireDualStack).
    all_required: bool,
    requested: Vec<IpAddr>,
    pool: Option<String>,
    current: Vec<IpAddr>,
}

/// Decides every address; see the module doc.
pub fn plan(inputs: Inputs<'_>) -> Plan {
    let mut result = Plan::default();
    let mut pools: Vec<Pool> = Vec::new();
    for object in inputs.pools {
        match Pool::parse(object) {
            Ok(pool) => pools.push(pool),
            Err(error) => result.pool_errors.push(error),
        }
    }
    pools.sort_by(|a, b| a.rank().cmp(&b.rank()));
    let mut claimants = Vec::new();
    for svc in inputs.services {
        let Some(object) = svc.object() else { continue };
        if svc.metadata.deleting {
            continue;
        }
        if inputs.selection.allocates_for(svc) {
            match claimant(object, svc) {
                Ok(claimant) => claimants.push((svc.metadata.creation_timestamp.clone(), claimant)),
                Err(problem) => {
                    result
                        .assignments
                        .insert(problem.service().clone(), Assignment { ips: Vec::new(), pools: Vec::new() });
                    result.problems.push(problem);
                }
            }
        } else if carries_our_status(svc, inputs.selection, &pools) {
            result.releases.push(object);
        }
    }
    // Oldest first; a Service without a creation time counts as newest.
    claimants.sort_by(|(a, x), (b, y)| (a.is_none(), a, &x.object).cmp(&(b.is_none(), b, &y.object)));
    let mut usage: BTreeMap<IpAddr, Vec<User>> = BTreeMap::new();
    let empty = BTreeMap::new();
    // Pass one keeps every valid current address, pass two allocates what is missing.
    let mut kept: BTreeMap<ObjectRef, Vec<(IpAddr, String)>> = BTreeMap::new();
    for (_, claimant) in &claimants {
        let labels = inputs.namespace_labels.get(&claimant.namespace).unwrap_or(&empty);
        let mut mine = Vec::new();
        for &ip in &claimant.current {
            let family_wanted = claimant.families.contains(&ip.is_ipv6());
            let family_free = !mine.iter().any(|(held, _): &(IpAddr, String)| held.is_ipv6() == ip.is_ipv6());
            let requested_ok = claimant.requested.is_empty() || claimant.requested.contains(&ip);
            if !(family_wanted && family_free && requested_ok) {
                continue;
            }
            let Some(pool) = admitting(&pools, claimant, labels, false).find(|p| p.contains(ip)) else {
                continue;
            };
            if compatible(&usage, ip, claimant).is_ok() {
                use_ip(&mut usage, ip, claimant);
                mine.push((ip, pool.name.clone()));
            }
        }
        kept.insert(claimant.object.clone(), mine);
    }
    for (_, claimant) in &claimants {
        let labels = inputs.namespace_labels.get(&claimant.namespace).unwrap_or(&empty);
        let mut held = kept.remove(&claimant.object).unwrap_or_default();
        let mut problems = Vec::new();
        let mut added = Vec::new();
        if let Some(name) = &claimant.pool
            && !pools.iter().any(|p| &p.name == name)
        {
            problems.push(Problem::UnknownPool { service: claimant.object.clone(), pool: name.clone() });
        } else {
            for &ipv6 in &claimant.families {
                if held.iter().chain(&added).any(|(ip, _): &(IpAddr, String)| ip.is_ipv6() == ipv6) {
                    continue;
                }
                match allocate(&pools, &usage, claimant, labels, ipv6) {
                    Ok(Some(found)) => added.push(found),
                    Ok(None) => {}
                    Err(problem) => problems.push(problem),
                }
            }
        }
        let complete =
            claimant.families.iter().all(|v6| held.iter().chain(&added).any(|(ip, _)| ip.is_ipv6() == *v6));
        if claimant.all_required && !complete {
            // RequireDualStack: both families or nothing; what pass one kept is freed too.
            for (ip, _) in held.drain(..) {
                unuse_ip(&mut usage, ip, &claimant.object);
            }
            added.clear();
        } else if !held.is_empty() || !added.is_empty() {
            // PreferDualStack's second family is optional: its absence is no problem.
            let first = family_name(claimant.families[0]);
            problems.retain(|p| match p {
                Problem::NoPool { family, .. } | Problem::PoolExhausted { family, .. } => *family == first,
                _ => true,
            });
        }
        for (ip, _) in &added {
            use_ip(&mut usage, *ip, claimant);
        }
        held.extend(added);
        // In the order of the Service's families.
        held.sort_by_key(|(ip, _)| claimant.families.iter().position(|v6| *v6 == ip.is_ipv6()));
        let (ips, pools_of) = held.into_iter().unzip();
        result.assignments.insert(claimant.object.clone(), Assignment { ips, pools: pools_of });
        result.problems.extend(problems);
    }
    result
        .problems
        .sort_by(|a, b| a.service().cmp(b.service()).then_with(|| a.to_string().cmp(&b.to_string())));
    result.releases.sort();
    result.usage = pool_usage(&pools, &result.assignments);
    result
}

fn pool_usage(pools: &[Pool], assignments: &BTreeMap<ObjectRef, Assignment>) -> Vec<PoolUsage> {
    let mut used: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    for assignment in assignments.values() {
        for (ip, pool) in assignment.ips.iter().zip(&assignment.pools) {
            used.entry(pool.as_str()).or_default().insert(*ip);
        }
    }
    let mut usage: Vec<PoolUsage> = pools
        .iter()
        .map(|pool| {
            let total = pool.ranges.iter().fold(0u64, |sum, range| {
                let size = (to_u128(range.last) - to_u128(range.first)).saturating_add(1);
                sum.saturating_add(u64::try_from(size).unwrap_or(u64::MAX))
            });
            let in_use = used.get(pool.name.as_str()).map_or(0, |ips| ips.len() as u64);
            PoolUsage { pool: pool.name.clone(), total, in_use }
        })
        .collect();
    usage.sort_by(|a, b| a.pool.cmp(&b.pool));
    usage
}

fn claimant(object: ObjectRef, svc: &CompactService) -> Result<Claimant, Problem> {
    let spec = &svc.spec;
    let notes = &svc.metadata.annotations;
    let mut requested = Vec::new();
    let raw = annotations::metallb(notes, METALLB_LOAD_BALANCER_IPS)
        .or_else(|| spec.load_balancer_ip.as_deref().filter(|ip| !ip.trim().is_empty()));
    for item in raw.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let invalid = |reason: &str| Problem::InvalidRequest {
            service: object.clone(),
            value: item.to_owned(),
            reason: reason.to_owned(),
        };
        let ip: IpAddr = item.parse().map_err(|_| invalid("not an IPv4 or IPv6 address"))?;
        let ip = ip.to_canonical();
        if requested.iter().any(|r: &IpAddr| r.is_ipv6() == ip.is_ipv6()) {
            return Err(invalid("at most one address per family may be requested"));
        }
        requested.push(ip);
    }
    let ports = spec
        .ports
        .iter()
        .filter_map(|p| Some((u16::try_from(p.port).ok()?, Protocol::from_k8s(p.protocol.as_deref())?)))
        .collect();
    let declared: Vec<bool> = spec.ip_families.iter().map(|f| &**f == "IPv6").collect();
    let first = declared.first().copied().unwrap_or(false);
    let (families, all_required) = match spec.ip_family_policy.as_deref() {
        Some("RequireDualStack") => (vec![first, !first], true),
        Some("PreferDualStack") => (vec![first, !first], false),
        _ => (vec![first], false),
    };
    if !requested.is_empty() && !requested.iter().any(|ip| families.contains(&ip.is_ipv6())) {
        let value = requested.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let reason = "no requested address is of the Service's ipFamilies".to_owned();
        return Err(Problem::InvalidRequest { service: object, value, reason });
    }
    let current = svc
        .ingress
        .iter()
        .filter_map(|i| i.ip.as_deref()?.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    Ok(Claimant {
        namespace: object.namespace.clone(),
        object,
        labels: svc.metadata.labels.clone(),
        key: annotations::metallb(notes, METALLB_ALLOW_SHARED_IP).map(str::to_owned),
        ports,
        families,
        all_required,
        requested,
        pool: annotations::metallb(notes, METALLB_ADDRESS_POOL).map(str::to_owned),
        current,
    })
}

/// Whether `svc`, which ringlb does not allocate for, holds a status ringlb wrote: a classless
/// `LoadBalancer` (another class is never touched) with a `Proxy` ingress address from a pool.
fn carries_our_status(svc: &CompactService, selection: &ServiceSelection, pools: &[Pool]) -> bool {
    let classless = svc.class().is_none();
    let load_balancer = svc.is_load_balancer();
    let ours = svc.ingress.iter().any(|i| {
        i.ip_mode.as_deref() == Some(IP_MODE)
            && i.ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .is_some_and(|ip| pools.iter().any(|p| p.contains(ip)))
    });
    classless && ours && (load_balancer || !selection.allocates_for(svc))
}

/// The pools `claimant` may take addresses from, best first: the one it names (whatever its
/// `autoAssign`), else every admitting pool that assigns automatically (or, for a check of a
/// requested or current address, any admitting pool: `autoAssign: false` pools hand out only on
/// request).
fn admitting<'p>(
    pools: &'p [Pool],
    claimant: &'p Claimant,
    namespace_labels: &'p BTreeMap<String, String>,
    automatic: bool,
) -> impl Iterator<Item = &'p Pool> + 'p {
    pools.iter().filter(move |pool| match &claimant.pool {
        Some(name) => &pool.name == name,
        None => {
            (!automatic || pool.auto_assign)
                && pool.admits(&claimant.namespace, namespace_labels, &claimant.labels)
        }
    })
}

/// Whether `claimant` may use `ip` alongside its current users; the first user in the way, and why.
fn compatible<'u>(
    usage: &'u BTreeMap<IpAddr, Vec<User>>,
    ip: IpAddr,
    claimant: &Claimant,
) -> Result<(), (&'u User, String)> {
    for user in usage.get(&ip).into_iter().flatten() {
        if user.service == claimant.object {
            continue;
        }
        match (&user.key, &claimant.key) {
            (Some(a), Some(b)) if a == b => {}
            (None, _) | (_, None) => {
                return Err((
                    user,
                    "only Services with the same metallb.io/allow-shared-ip key share an address".to_owned(),
                ));
            }
            (Some(a), Some(_)) => return Err((user, format!("it has sharing key {a:?}"))),
        }
        if let Some((port, protocol)) = user.ports.intersection(&claimant.ports).next() {
            return Err((user, format!("both use port {port}/{protocol}")));
        }
    }
    Ok(())
}

fn use_ip(usage: &mut BTreeMap<IpAddr, Vec<User>>, ip: IpAddr, claimant: &Claimant) {
    let users = usage.entry(ip).or_default();
    if !users.iter().any(|u| u.service == claimant.object) {
        users.push(User {
            service: claimant.object.clone(),
            key: claimant.key.clone(),
            ports: claimant.ports.clone(),
        });
    }
}

fn unuse_ip(usage: &mut BTreeMap<IpAddr, Vec<User>>, ip: IpAddr, service: &ObjectRef) {
    if let Some(users) = usage.get_mut(&ip) {
        users.retain(|u| &u.service != service);
        if users.is_empty() {
            usage.remove(&ip);
        }
    }
}

fn family_name(ipv6: bool) -> &'static str {
    if ipv6 { "IPv6" } else { "IPv4" }
}

/// An address of family `ipv6` for `claimant`: its request, else a shareable one, else the lowest
/// free one, from the best pool that has one. `Ok(None)`: nothing is wanted of this family.
fn allocate(
    pools: &[Pool],
    usage: &BTreeMap<IpAddr, Vec<User>>,
    claimant: &Claimant,
    labels: &BTreeMap<String, String>,
    ipv6: bool,
) -> Result<Option<(IpAddr, String)>, Problem> {
    let service = claimant.object.clone();
    if !claimant.requested.is_empty() {
        let Some(&ip) = claimant.requested.iter().find(|ip| ip.is_ipv6() == ipv6) else { return Ok(None) };
        let Some(pool) = admitting(pools, claimant, labels, false).find(|p| p.contains(ip)) else {
            return Err(Problem::RequestedIpNotInPool { service, ip });
        };
        return match compatible(usage, ip, claimant) {
            Ok(()) => Ok(Some((ip, pool.name.clone()))),
            Err((owner, reason)) => {
                Err(Problem::RequestedIpTaken { service, ip, owner: owner.service.clone(), reason })
            }
        };
    }
    let candidates: Vec<&Pool> = admitting(pools, claimant, labels, true)
        .filter(|p| p.ranges.iter().any(|r| r.first.is_ipv6() == ipv6))
        .collect();
    if candidates.is_empty() {
        return Err(Problem::NoPool { service, family: family_name(ipv6) });
    }
    for pool in &candidates {
        if claimant.key.is_some() {
            let shared = usage.keys().copied().find(|&ip| {
                ip.is_ipv6() == ipv6
                    && pool.contains(ip)
                    && pool.usable(ip)
                    && compatible(usage, ip, claimant).is_ok()
            });
            if let Some(ip) = shared {
                return Ok(Some((ip, pool.name.clone())));
            }
        }
        if let Some(ip) = lowest_free(pool, usage, ipv6) {
            return Ok(Some((ip, pool.name.clone())));
        }
    }
    Err(Problem::PoolExhausted {
        service,
        family: family_name(ipv6),
        pools: candidates.iter().map(|p| p.name.clone()).collect(),
    })
}

/// The lowest usable address of `pool` of family `ipv6` that nothing uses.
fn lowest_free(pool: &Pool, usage: &BTreeMap<IpAddr, Vec<User>>, ipv6: bool) -> Option<IpAddr> {
    for range in pool.ranges.iter().filter(|r| r.first.is_ipv6() == ipv6) {
        let (first, last) = (to_u128(range.first), to_u128(range.last));
        let mut candidate = first;
        // Walk the used addresses of the range in order: the first gap is the answer.
        let used = usage.range(range.first..=range.last).map(|(ip, _)| to_u128(*ip));
        for taken in used.chain(std::iter::once(u128::MAX)) {
            while candidate < taken.min(last.saturating_add(1)) {
                let ip = from_u128(candidate, !ipv6);
                if pool.usable(ip) {
                    return Some(ip);
                }
                candidate += 1;
            }
            if candidate > last {
                break;
            }
            candidate = taken.saturating_add(1);
        }
    }
    None
}
