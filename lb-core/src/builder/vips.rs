//! Which addresses a Service is served on (its VIPs).
//!
//! Every `spec.externalIPs` entry of a Service the selection serves them of. For ringlb's
//! `LoadBalancer` Services also the addresses the allocator assigned,
//! `status.loadBalancer.ingress[].ip`; standalone ([`VipSource::Requested`]: nothing allocates),
//! when that status holds no IP, the requested ones: MetalLB's `metallb.io/loadBalancerIPs`
//! annotation (or its deprecated `metallb.universe.tf/` spelling), else the deprecated
//! `spec.loadBalancerIP`. Only the source in use is validated. The result is sorted and deduplicated; each VIP says whether it is
//! a load-balancer IP, because only those are guarded by `loadBalancerSourceRanges` (kube-proxy
//! filters the load-balancer IPs and never `externalIPs`). An address that is both counts as a
//! load-balancer IP (kube-proxy's nftables mode filters it by destination).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::parse_ip;
use crate::annotations::{self, METALLB_LOAD_BALANCER_IPS};
use crate::compact::CompactService;
use crate::error::BuildError;
use crate::model::ObjectRef;
use crate::selection::VipSource;

/// One address a Service is served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Vip {
    pub addr: IpAddr,
    /// A load-balancer IP (status, annotation or `spec.loadBalancerIP`), not only an external IP.
    pub load_balancer: bool,
}

pub(super) fn service_vips(
    svc: &CompactService,
    load_balancer: bool,
    source: VipSource,
    object: &ObjectRef,
    errors: &mut Vec<BuildError>,
) -> Vec<Vip> {
    let mut external = BTreeSet::new();
    for (i, value) in svc.spec.external_ips.iter().enumerate() {
        push(&mut external, errors, parse_ip(value, object, || format!("spec.externalIPs[{i}]")));
    }
    let mut balanced = BTreeSet::new();
    if load_balancer {
        load_balancer_vips(svc, source, object, &mut balanced, errors);
    }
    let mut vips: BTreeMap<IpAddr, bool> = external.into_iter().map(|addr| (addr, false)).collect();
    vips.extend(balanced.into_iter().map(|addr| (addr, true)));
    vips.into_iter().map(|(addr, load_balancer)| Vip { addr, load_balancer }).collect()
}

fn load_balancer_vips(
    svc: &CompactService,
    source: VipSource,
    object: &ObjectRef,
    vips: &mut BTreeSet<IpAddr>,
    errors: &mut Vec<BuildError>,
) {
    let mut from_status = false;
    for (i, entry) in svc.ingress.iter().enumerate() {
        // A hostname-only ingress (cloud load balancers) names no address we could serve.
        if let Some(ip) = entry.ip.as_deref() {
            from_status = true;
            push(vips, errors, parse_ip(ip, object, || format!("status.loadBalancer.ingress[{i}].ip")));
        }
    }
    if from_status || source == VipSource::Allocated {
        return;
    }
    let annotation = annotations::metallb(&svc.metadata.annotations, METALLB_LOAD_BALANCER_IPS);
    let requested: Vec<&str> =
        annotation.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty()).collect();
    if !requested.is_empty() {
        for item in requested {
            let parsed = parse_ip(item, object, String::new).map_err(|_| BuildError::InvalidAnnotation {
                object: object.clone(),
                annotation: METALLB_LOAD_BALANCER_IPS,
                value: item.to_owned(),
                reason: "not a usable IPv4 or IPv6 address".to_owned(),
            });
            push(vips, errors, parsed);
        }
        return;
    }
    if let Some(ip) = svc.spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        push(vips, errors, parse_ip(ip, object, || "spec.loadBalancerIP".to_owned()));
    }
}

fn push(vips: &mut BTreeSet<IpAddr>, errors: &mut Vec<BuildError>, parsed: Result<IpAddr, BuildError>) {
    match parsed {
        Ok(ip) => {
            // `::ffff:a.b.c.d` and `a.b.c.d` are one address to the kernel: one VIP, not two.
            vips.insert(ip.to_canonical());
        }
        Err(error) => errors.push(error),
    }
}
