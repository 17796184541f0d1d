//! Parses the Service fields that decide who may connect and how clients stick to backends:
//! `spec.loadBalancerSourceRanges` (or, when empty, the `service.beta.kubernetes.io/
//! load-balancer-source-ranges` annotation), `spec.sessionAffinity` with
//! `spec.sessionAffinityConfig.clientIP.timeoutSeconds`, `spec.externalTrafficPolicy`, and with it
//! `spec.healthCheckNodePort` (read only where kube-proxy reads it: a `LoadBalancer` Service with
//! `externalTrafficPolicy: Local`; elsewhere the API server refuses it and ringlb ignores it).
//!
//! An invalid value rejects the Service with an error naming the field (`spec.loadBalancerSourceRanges[2]`).
//! `externalTrafficPolicy` is honoured whatever the Service type (ringlb serves external IPs the way
//! it serves load-balancer IPs); it only has an effect when ringlb knows its node
//! ([`super::BuildOptions::node_name`]).

use std::time::Duration;

use crate::affinity::{DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::annotations::LOAD_BALANCER_SOURCE_RANGES;
use crate::cidr::Cidr;
use crate::compact::CompactService;
use crate::error::BuildError;
use crate::model::ObjectRef;

/// What the spec decides about traffic, before the node is known.
#[derive(Debug, Clone, Default)]
pub(super) struct SpecTraffic {
    pub source_ranges: Vec<Cidr>,
    pub session_affinity: Option<Duration>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `spec.healthCheckNodePort` of a `LoadBalancer` Service with `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<u16>,
}

pub(super) fn parse_traffic(
    svc: &CompactService,
    object: &ObjectRef,
    errors: &mut Vec<BuildError>,
) -> SpecTraffic {
    let spec = &svc.spec;
    let invalid = |field: String, value: &str, reason: String| BuildError::InvalidField {
        object: object.clone(),
        field,
        value: value.to_owned(),
        reason,
    };
    let mut traffic = SpecTraffic::default();

    let ranges = &spec.load_balancer_source_ranges;
    if ranges.is_empty() {
        let annotation = svc.metadata.annotations.get(LOAD_BALANCER_SOURCE_RANGES);
        for item in annotation.into_iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty())
        {
            match item.parse::<Cidr>() {
                Ok(cidr) => traffic.source_ranges.push(cidr),
                Err(e) => errors.push(BuildError::InvalidAnnotation {
                    object: object.clone(),
                    annotation: LOAD_BALANCER_SOURCE_RANGES,
                    value: item.to_owned(),
                    reason: e.to_string(),
                }),
            }
        }
    }
    for (i, value) in ranges.iter().enumerate() {
        match value.parse::<Cidr>() {
            Ok(cidr) => traffic.source_ranges.push(cidr),
            Err(e) => {
                errors.push(invalid(format!("spec.loadBalancerSourceRanges[{i}]"), value, e.to_string()))
            }
        }
    }
    traffic.source_ranges.sort();
    traffic.source_ranges.dedup();

    match spec.session_affinity.as_deref() {
        None | Some("None") => {}
        Some("ClientIP") => {
            let timeout = match spec.session_affinity_timeout {
                None => Some(DEFAULT_TIMEOUT),
                Some(s) if s >= 1 && u64::try_from(s).is_ok_and(|s| s <= MAX_TIMEOUT.as_secs()) => {
                    Some(Duration::from_secs(s.unsigned_abs().into()))
                }
                Some(s) => {
                    errors.push(invalid(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".to_owned(),
                        &s.to_string(),
                        format!("must be 1..={}", MAX_TIMEOUT.as_secs()),
                    ));
                    None
                }
            };
            traffic.session_affinity = timeout;
        }
        Some(other) => errors.push(invalid(
            "spec.sessionAffinity".to_owned(),
            other,
            "must be None or ClientIP".to_owned(),
        )),
    }

    match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => {}
        Some("Local") => traffic.external_local = true,
        Some(other) => errors.push(invalid(
            "spec.externalTrafficPolicy".to_owned(),
            other,
            "must be Cluster or Local".to_owned(),
        )),
    }

    if traffic.external_local && svc.is_load_balancer() {
        // Unset (or 0, "not allocated yet") means there is nothing to answer on.
        match spec.health_check_node_port.filter(|&port| port != 0) {
            None => {}
            Some(port) => {
                match super::parse_port(port.into(), object, || "spec.healthCheckNodePort".to_owned()) {
                    Ok(port) => traffic.health_check_node_port = Some(port),
                    Err(error) => errors.push(error),
                }
            }
        }
    }
    traffic
}
