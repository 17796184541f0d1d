//! Validates EndpointSlices and groups them by the Service they belong to.
//!
//! A slice is parsed once, when it arrives ([`ParsedEndpointSlice::parse`]): what a store keeps and
//! the builder reads is the parsed form, about a third of the decoded object (a cluster of
//! 10,000 Services holds 100,000 endpoints), and a build only groups parsed slices. The parse keeps
//! what it found wrong or skipped, so every build reports it again.
//!
//! A slice belongs to the Service named by its `kubernetes.io/service-name` label in its own
//! namespace. Only `addressType` IPv4 and IPv6 are used (FQDN slices are skipped). A bad endpoint or
//! slice port is rejected on its own and the rest of the slice still counts; a bad `ringlb.io/weight`
//! leaves the slice at weight 1. Only an endpoint's first address is used: Kubernetes defines no
//! meaning for further ones and kube-proxy ignores them too.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::policy::parse_slice_weight;
use super::{Skipped, parse_ip, parse_port};
use crate::annotations::SERVICE_NAME_LABEL;
use crate::error::BuildError;
use crate::model::{EndpointConditions, ObjectRef, Placement, Protocol};

/// One valid `ports[]` entry of a slice.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SlicePort {
    /// `""` when unset, as for an unnamed service port.
    pub name: String,
    pub protocol: Protocol,
    /// `None`: the slice does not restrict the port (use the Service's integer targetPort).
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct ParsedEndpoint {
    pub addr: IpAddr,
    pub conditions: EndpointConditions,
    pub placement: Arc<Placement>,
}

#[derive(Debug, PartialEq)]
pub(super) struct ParsedSlice {
    /// The slice's name (its Service's list of slices is in name order).
    pub name: String,
    /// `addressType: IPv6` (every endpoint address is of the slice's family).
    pub ipv6: bool,
    /// Whether the slice lists any port at all (even invalid ones): only a slice that lists none falls
    /// back to the Service's targetPort.
    pub declares_ports: bool,
    pub ports: Vec<SlicePort>,
    pub weight: u32,
    pub endpoints: Vec<ParsedEndpoint>,
}

/// Slices keyed by (namespace, service name), each list sorted by slice name.
pub(super) type SlicesByService = BTreeMap<(String, String), Vec<Arc<ParsedSlice>>>;

/// What one slice contributes: its Service's key and its parsed form when it is used, and what
/// parsing it found wrong or skipped (kept whole so that every build reports it).
#[derive(Debug, PartialEq)]
pub(super) struct SliceOutcome {
    pub object: ObjectRef,
    pub used: Option<((String, String), Arc<ParsedSlice>)>,
    pub errors: Vec<BuildError>,
    pub skipped: Vec<Skipped>,
}

impl SliceOutcome {
    /// Whether parsing found anything to report.
    pub(super) fn is_noisy(&self) -> bool {
        !self.errors.is_empty() || !self.skipped.is_empty()
    }
}

/// An EndpointSlice as the builder reads it (see the module doc): parsed once, shared by every
/// build (a clone shares it). Equal when what the builder reads is equal, so a change of a field
/// it does not read (a label, a timestamp, the resourceVersion) changes nothing.
#[derive(Debug, Clone)]
pub struct ParsedEndpointSlice(pub(super) Arc<SliceOutcome>);

impl PartialEq for ParsedEndpointSlice {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl ParsedEndpointSlice {
    /// Parses `slice`; `names` shares node and zone names with the slices parsed before with it.
    /// Never panics: what is wrong becomes an error the builds report. A slice without a name is
    /// refused (nothing could name it again).
    pub fn parse(slice: &EndpointSlice, names: &mut SliceNames) -> Result<Self, BuildError> {
        let object = super::object_ref("EndpointSlice", &slice.metadata)?;
        Ok(ParsedEndpointSlice(Arc::new(parse_one(object, slice, names))))
    }

    /// Its kind, namespace and name.
    pub fn object(&self) -> &ObjectRef {
        &self.0.object
    }
}

/// Parses every named one of `slices` (an unnamed one is an error), names shared among them.
pub(super) fn parse_named(
    slices: &[&EndpointSlice],
    errors: &mut Vec<BuildError>,
) -> Vec<ParsedEndpointSlice> {
    let mut names = SliceNames::default();
    let mut parse = |slice: &&EndpointSlice| ParsedEndpointSlice::parse(slice, &mut names);
    slices.iter().filter_map(|slice| parse(slice).map_err(|error| errors.push(error)).ok()).collect()
}

/// `slices` one per name, in name order, as a build takes them: of copies of one name, equal ones
/// (in what the builder reads) collapse to one and differing ones are all rejected. Input already
/// in that order (a store's) is returned as it is, borrowed.
pub(super) fn unique<'s, 'a>(
    slices: &'s [&'a ParsedEndpointSlice],
    errors: &mut Vec<BuildError>,
) -> Cow<'s, [&'a ParsedEndpointSlice]> {
    if slices.windows(2).all(|pair| pair[0].object() < pair[1].object()) {
        return Cow::Borrowed(slices);
    }
    let mut sorted = slices.to_vec();
    sorted.sort_by(|a, b| a.object().cmp(b.object()));
    let mut kept = Vec::with_capacity(sorted.len());
    for copies in sorted.chunk_by(|a, b| a.object() == b.object()) {
        if copies[1..].iter().all(|copy| *copy == copies[0]) {
            kept.push(copies[0]);
        } else {
            errors.push(BuildError::DuplicateObject { object: copies[0].object().clone() });
        }
    }
    Cow::Owned(kept)
}

/// Groups `slices` (one per name, in name order) by Service, and reports what their parses found.
pub(super) fn group(
    slices: &[&ParsedEndpointSlice],
    errors: &mut Vec<BuildError>,
    skipped: &mut Vec<Skipped>,
) -> SlicesByService {
    let mut by_service = SlicesByService::new();
    for slice in slices {
        let outcome = &slice.0;
        errors.extend(outcome.errors.iter().cloned());
        skipped.extend(outcome.skipped.iter().cloned());
        if let Some((key, parsed)) = &outcome.used {
            // In name order, so each list stays sorted by slice name.
            by_service.entry(key.clone()).or_default().push(Arc::clone(parsed));
        }
    }
    by_service
}

/// Parses one slice; `names` shares node and zone names between slices.
fn parse_one(object: ObjectRef, slice: &EndpointSlice, names: &mut SliceNames) -> SliceOutcome {
    let mut outcome =
        SliceOutcome { object: object.clone(), used: None, errors: Vec::new(), skipped: Vec::new() };
    let labels = slice.metadata.labels.as_ref();
    let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)).filter(|s| !s.is_empty()) else {
        let reason = format!("no {SERVICE_NAME_LABEL} label: belongs to no Service");
        outcome.skipped.push(Skipped { service: object, reason });
        return outcome;
    };
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => {
            let reason = "addressType FQDN: only IP endpoints can be balanced".to_owned();
            outcome.skipped.push(Skipped { service: object, reason });
            return outcome;
        }
        other => {
            outcome.errors.push(BuildError::InvalidField {
                object,
                field: "addressType".to_owned(),
                value: other.to_owned(),
                reason: "must be IPv4, IPv6 or FQDN".to_owned(),
            });
            return outcome;
        }
    };
    let errors = &mut outcome.errors;
    let weight = parse_slice_weight(slice.metadata.annotations.as_ref(), &object).unwrap_or_else(|error| {
        errors.push(error);
        1
    });
    let mut ports = parse_ports(slice, &object, errors);
    let mut endpoints: Vec<ParsedEndpoint> = slice
        .endpoints
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, endpoint)| match parse_endpoint(i, endpoint, ipv6, &object, names) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                errors.push(error);
                None
            }
        })
        .collect();
    // Kept for the slice's life: a filtered collect leaves up to twice the room (10 endpoints
    // take 16 slots), 4 MB over a cluster's 100,000 endpoints.
    endpoints.shrink_to_fit();
    ports.shrink_to_fit();
    let declares_ports = slice.ports.as_ref().is_some_and(|p| !p.is_empty());
    let key = (object.namespace.clone(), service.clone());
    let parsed = ParsedSlice { name: object.name.clone(), ipv6, declares_ports, ports, weight, endpoints };
    outcome.used = Some((key, Arc::new(parsed)));
    outcome
}

fn parse_ports(slice: &EndpointSlice, object: &ObjectRef, errors: &mut Vec<BuildError>) -> Vec<SlicePort> {
    let ports = slice.ports.iter().flatten().enumerate();
    ports
        .filter_map(|(i, p)| {
            let field = |name: &str| format!("ports[{i}].{name}");
            parse_slice_port(p.name.as_deref(), p.protocol.as_deref(), p.port, object, field, errors)
        })
        .collect()
}

/// One slice port (`name`, `protocol`, `port`) as the EndpointSlice or core/v1 Endpoints spells it;
/// `None` (and an error naming `field(..)`) when the protocol or port is invalid.
pub(super) fn parse_slice_port(
    name: Option<&str>,
    protocol: Option<&str>,
    port: Option<i32>,
    object: &ObjectRef,
    field: impl Fn(&str) -> String,
    errors: &mut Vec<BuildError>,
) -> Option<SlicePort> {
    let Some(protocol_value) = Protocol::from_k8s(protocol) else {
        errors.push(BuildError::UnknownProtocol {
            object: object.clone(),
            field: field("protocol"),
            value: protocol.unwrap_or_default().to_owned(),
        });
        return None;
    };
    let port = match port.map(|n| parse_port(n.into(), object, || field("port"))) {
        None => None,
        Some(Ok(port)) => Some(port),
        Some(Err(error)) => {
            errors.push(error);
            return None;
        }
    };
    Some(SlicePort { name: name.unwrap_or_default().to_owned(), protocol: protocol_value, port })
}

/// One allocation per distinct node or zone name among the slices parsed with it: a cluster's
/// 100,000 endpoints name a few hundred nodes and a few zones. Keep one per source of slices.
#[derive(Debug, Default)]
pub struct SliceNames(foldhash::HashSet<Arc<str>>);

impl SliceNames {
    /// Forgets the names no parsed slice holds any more (nodes and zones that went away); the
    /// cost is one look at each name.
    pub fn prune(&mut self) {
        self.0.retain(|name| Arc::strong_count(name) > 1);
    }

    /// How many names it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn get(&mut self, name: Option<&str>) -> Option<Arc<str>> {
        let name = name?;
        if let Some(known) = self.0.get(name) {
            return Some(Arc::clone(known));
        }
        let fresh: Arc<str> = Arc::from(name);
        self.0.insert(Arc::clone(&fresh));
        Some(fresh)
    }
}

fn parse_endpoint(
    i: usize,
    endpoint: &Endpoint,
    ipv6: bool,
    object: &ObjectRef,
    names: &mut SliceNames,
) -> Result<ParsedEndpoint, BuildError> {
    let Some(address) = endpoint.addresses.first() else {
        return Err(BuildError::InvalidField {
            object: object.clone(),
            field: format!("endpoints[{i}].addresses"),
            value: String::new(),
            reason: "an endpoint needs at least one address".to_owned(),
        });
    };
    let addr = parse_family_ip(address, ipv6, object, || format!("endpoints[{i}].addresses[0]"))?;
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let conditions = EndpointConditions {
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
    };
    Ok(ParsedEndpoint {
        addr,
        conditions,
        placement: Arc::new(Placement {
            node_name: names.get(endpoint.node_name.as_deref()),
            zone: names.get(endpoint.zone.as_deref()),
            target: endpoint.target_ref.as_ref().map(|t| Arc::from(target_name(t, object))),
        }),
    })
}

/// An endpoint address that must be of one family (`ipv6` or not), as a slice's `addressType` says.
pub(super) fn parse_family_ip(
    address: &str,
    ipv6: bool,
    object: &ObjectRef,
    field: impl Fn() -> String,
) -> Result<IpAddr, BuildError> {
    let addr = parse_ip(address, object, &field)?;
    if addr.is_ipv6() != ipv6 {
        let reason = if ipv6 { "IPv4 address in an IPv6 slice" } else { "IPv6 address in an IPv4 slice" };
        return Err(BuildError::InvalidIp {
            object: object.clone(),
            field: field(),
            value: address.to_owned(),
            reason,
        });
    }
    Ok(addr)
}

/// `Pod ns/name` of an endpoint's `targetRef`, for display.
pub(super) fn target_name(target: &ObjectReference, object: &ObjectRef) -> String {
    let kind = target.kind.as_deref().unwrap_or("Object");
    let namespace = target.namespace.as_deref().unwrap_or(&object.namespace);
    format!("{kind} {namespace}/{}", target.name.as_deref().unwrap_or("?"))
}
