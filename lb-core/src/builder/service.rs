//! Validates one Service into what the builder serves: its VIPs, its ports and their target ports,
//! and its policy (annotations, source ranges, session affinity, traffic policy).
//!
//! Any bad field rejects the whole Service (it is listed in `ParsedServices::rejected` so the builder
//! can keep its previous entries). Services that are valid but not served (ExternalName, headless, no
//! VIP, no port) become a [`Skipped`] and are not validated further: nothing of them is used.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::policy::{self, ServicePolicy};
use super::vips::{self, Vip};
use super::{BuildOptions, Skipped, parse_port, traffic, unique_objects};
use crate::compact::{CompactService, Port};
use crate::error::BuildError;
use crate::model::{ObjectRef, Protocol};
use crate::selection::Ownership;

/// Where a service port's traffic goes on an endpoint, before the EndpointSlices are consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TargetSpec {
    /// An integer `targetPort` (or `port` when `targetPort` is unset).
    Number(u16),
    /// A named `targetPort`: a container port name, resolved per endpoint through the slices.
    Name(String),
}

/// One validated `spec.ports[]` entry.
#[derive(Debug, Clone)]
pub(crate) struct PortSpec {
    /// `name`, `""` when unset (Kubernetes allows that only for single-port Services).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetSpec,
}

/// A valid, served Service: everything of it the builder uses besides its endpoints. The snapshot
/// keeps it as the Service's last good spec (see `builder::build`).
#[derive(Debug)]
pub(crate) struct ParsedService {
    pub object: ObjectRef,
    pub created: Option<Time>,
    /// Deduplicated and sorted by address; never empty.
    pub vips: Vec<Vip>,
    /// Never empty; (port, protocol) and names unique.
    pub ports: Vec<PortSpec>,
    pub policy: ServicePolicy,
    /// `spec.healthCheckNodePort`, when this node answers it: a `LoadBalancer` Service ringlb serves
    /// as such, with `externalTrafficPolicy: Local` and a known node (see
    /// `builder::health_check_node_ports`).
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Default, Clone)]
pub(super) struct ParsedServices {
    /// Sorted by object.
    pub served: Arc<Vec<Arc<ParsedService>>>,
    /// Named Services rejected by a bad field; their previous entries may be kept.
    pub rejected: BTreeSet<ObjectRef>,
}

pub(super) fn parse_all(
    services: &[&CompactService],
    options: &BuildOptions,
    cache: &mut dyn super::cache::Memo<CompactService, Outcome>,
    errors: &mut Vec<BuildError>,
    skipped: &mut Vec<Skipped>,
) -> ParsedServices {
    let (unique, mut rejected) = unique_objects(services, errors);
    let mut served = Vec::new();
    for (object, svc) in unique {
        let outcome =
            cache.get_or_insert(&object, svc, &mut |object, svc| parse_one(object.clone(), svc, options));
        match &*outcome {
            Outcome::Served(parsed) => served.push(Arc::clone(parsed)),
            Outcome::Skipped(reason) => {
                skipped.push(Skipped { service: object, reason: (*reason).to_owned() })
            }
            Outcome::Ignored => {}
            Outcome::Rejected(errs) => {
                errors.extend(errs.iter().cloned());
                rejected.insert(object);
            }
        }
    }
    ParsedServices { served: Arc::new(served), rejected }
}

/// What parsing one Service gave (kept whole so the build cache can replay it).
#[derive(Debug)]
pub(super) enum Outcome {
    Served(Arc<ParsedService>),
    Skipped(&'static str),
    /// Not ringlb's and nothing to say about it (a ClusterIP Service without external IPs).
    Ignored,
    Rejected(Vec<BuildError>),
}

fn parse_one(object: ObjectRef, svc: &CompactService, options: &BuildOptions) -> Outcome {
    let spec = &svc.spec;
    let mut errors = Vec::new();
    let service_type = svc.service_type();
    match service_type {
        "ExternalName" => return Outcome::Skipped("type ExternalName has no endpoints to balance"),
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        other => {
            return Outcome::Rejected(vec![BuildError::InvalidField {
                object,
                field: "spec.type".to_owned(),
                value: other.to_owned(),
                reason: "must be ClusterIP, NodePort, LoadBalancer or ExternalName".to_owned(),
            }]);
        }
    }
    if spec.headless {
        return Outcome::Skipped("headless (clusterIP: None): clients reach the endpoints directly");
    }
    let load_balancer = match options.selection.ownership(svc) {
        Ownership::LoadBalancer => true,
        Ownership::ExternalIpsOnly => false,
        // A Service with no address ringlb could serve is no concern of ringlb's: not listed.
        Ownership::NotOurs(_) if service_type != "LoadBalancer" && spec.external_ips.is_empty() => {
            return Outcome::Ignored;
        }
        Ownership::NotOurs(reason) => return Outcome::Skipped(reason),
    };
    let vips = vips::service_vips(svc, load_balancer, options.selection.vips, &object, &mut errors);
    let ports = parse_ports(&spec.ports, &object, &mut errors);
    let mut policy =
        policy::parse_service_policy(Some(&svc.metadata.annotations), &object, options, &mut errors);
    policy::check_proxy_protocol(
        &svc.metadata.annotations,
        ports.iter().map(|port| port.protocol),
        &object,
        &mut errors,
    );
    policy::check_transparent(
        &svc.metadata.annotations,
        ports.iter().map(|port| port.protocol),
        &object,
        &mut errors,
    );
    let traffic = traffic::parse_traffic(svc, &object, &mut errors);
    policy.traffic.source_ranges = traffic.source_ranges;
    policy.traffic.session_affinity = traffic.session_affinity;
    policy.traffic.node_local = traffic.external_local && options.node_name.is_some();
    let health_check_node_port =
        traffic.health_check_node_port.filter(|_| load_balancer && policy.traffic.node_local);
    if !errors.is_empty() {
        return Outcome::Rejected(errors);
    }
    if vips.is_empty() {
        return Outcome::Skipped(
            "no VIP: no spec.externalIPs, and no load-balancer IP (allocated into the status or, \
             standalone, requested by metallb.io/loadBalancerIPs or spec.loadBalancerIP)",
        );
    }
    if ports.is_empty() {
        return Outcome::Skipped("no ports in spec.ports");
    }
    let created = svc.metadata.creation_timestamp.clone();
    Outcome::Served(Arc::new(ParsedService { object, created, vips, ports, policy, health_check_node_port }))
}

fn parse_ports(ports: &[Port], object: &ObjectRef, errors: &mut Vec<BuildError>) -> Vec<PortSpec> {
    let mut parsed = Vec::new();
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = |name: &str| format!("spec.ports[{i}].{name}");
        let invalid = |name: &str, value: &str, reason: &str| BuildError::InvalidField {
            object: object.clone(),
            field: field(name),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let port = parse_port(p.port.into(), object, || field("port"));
        let protocol = Protocol::from_k8s(p.protocol.as_deref()).ok_or_else(|| BuildError::UnknownProtocol {
            object: object.clone(),
            field: field("protocol"),
            value: p.protocol.as_deref().unwrap_or_default().to_owned(),
        });
        let name = p.name.as_deref().unwrap_or_default().to_owned();
        if name.is_empty() && ports.len() > 1 {
            errors.push(invalid("name", "", "required when the Service has more than one port"));
        } else if !names.insert(name.clone()) {
            errors.push(invalid("name", &name, "duplicate port name"));
        }
        let (port, protocol) = match (port, protocol) {
            (Ok(port), Ok(protocol)) => (port, protocol),
            (port, protocol) => {
                errors.extend(port.err());
                errors.extend(protocol.err());
                continue;
            }
        };
        if !keys.insert((port, protocol)) {
            errors.push(invalid("port", &port.to_string(), "the same port and protocol appear twice"));
        }
        let target = match &p.target_port {
            None => Ok(TargetSpec::Number(port)),
            Some(IntOrString::Int(n)) => {
                parse_port((*n).into(), object, || field("targetPort")).map(TargetSpec::Number)
            }
            Some(IntOrString::String(s)) if s.is_empty() => Err(invalid("targetPort", s, "empty port name")),
            // YAML writers sometimes quote numbers; a name always contains a letter in Kubernetes.
            Some(IntOrString::String(s)) if s.bytes().all(|b| b.is_ascii_digit()) => {
                let value = s.parse::<i64>().unwrap_or(i64::MAX);
                parse_port(value, object, || field("targetPort")).map(TargetSpec::Number)
            }
            Some(IntOrString::String(s)) => Ok(TargetSpec::Name(s.clone())),
        };
        match target {
            Ok(target) => parsed.push(PortSpec { name, port, protocol, target }),
            Err(error) => errors.push(error),
        }
    }
    parsed
}
