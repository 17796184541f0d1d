//! Terse builders for Kubernetes `Service` and `EndpointSlice` objects in tests.
//!
//! They build exactly the objects `kubectl get -o yaml` would show, with nothing filled in behind the
//! caller's back: an unset field stays unset so tests can exercise Kubernetes' defaults. Empty strings
//! passed as a port name or protocol mean "unset". This module never depends on lb-core, so it can test
//! it from outside.
//!
//! ```
//! use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};
//! let service = ServiceBuilder::new("default", "web")
//!     .external_ips(["127.0.0.10"])
//!     .port("http", 80, "TCP", TargetPort::Int(8080))
//!     .build();
//! let slice = SliceBuilder::new("default", "web-abc", "web")
//!     .port("http", 8080, "TCP")
//!     .endpoint("127.0.0.1", Cond::ready())
//!     .build();
//! # let _ = (service, slice);
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ObjectReference, Service, ServicePort,
    ServiceSpec, ServiceStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

/// `targetPort` of a service port: `TargetPort::Int(8080)` or `TargetPort::String("web".into())`.
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString as TargetPort;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta { namespace: Some(namespace.to_owned()), name: Some(name.to_owned()), ..ObjectMeta::default() }
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// Builds a `v1/Service`. Without any call it is a ClusterIP Service with no ports.
#[derive(Debug, Clone)]
pub struct ServiceBuilder {
    service: Service,
}

/// Continues building from an existing Service (to derive an edited copy).
impl From<Service> for ServiceBuilder {
    fn from(service: Service) -> Self {
        ServiceBuilder { service }
    }
}

impl ServiceBuilder {
    pub fn new(namespace: &str, name: &str) -> Self {
        let service =
            Service { metadata: meta(namespace, name), spec: Some(ServiceSpec::default()), status: None };
        ServiceBuilder { service }
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.service.spec.get_or_insert_with(ServiceSpec::default)
    }

    /// `spec.type`: `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName` (or anything, for bad input).
    pub fn service_type(mut self, service_type: &str) -> Self {
        self.spec().type_ = Some(service_type.to_owned());
        self
    }

    /// `spec.clusterIP`; `"None"` makes the Service headless.
    pub fn cluster_ip(mut self, cluster_ip: &str) -> Self {
        self.spec().cluster_ip = Some(cluster_ip.to_owned());
        self
    }

    /// `spec.externalName` and `type: ExternalName`.
    pub fn external_name(mut self, external_name: &str) -> Self {
        self.spec().external_name = Some(external_name.to_owned());
        self.service_type("ExternalName")
    }

    /// Appends to `spec.externalIPs`.
    pub fn external_ips<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ips: I) -> Self {
        self.spec().external_ips.get_or_insert_with(Vec::new).extend(ips.into_iter().map(Into::into));
        self
    }

    /// The deprecated `spec.loadBalancerIP`.
    pub fn load_balancer_ip(mut self, ip: &str) -> Self {
        self.spec().load_balancer_ip = Some(ip.to_owned());
        self
    }

    /// Appends `status.loadBalancer.ingress[].ip` entries (what a LoadBalancer controller writes).
    pub fn ingress_ips<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ips: I) -> Self {
        let status = self.service.status.get_or_insert_with(ServiceStatus::default);
        let lb = status.load_balancer.get_or_insert_with(LoadBalancerStatus::default);
        let ingress = lb.ingress.get_or_insert_with(Vec::new);
        ingress.extend(
            ips.into_iter().map(|ip| LoadBalancerIngress { ip: Some(ip.into()), ..Default::default() }),
        );
        self
    }

    pub fn load_balancer_class(mut self, class: &str) -> Self {
        self.service.spec.get_or_insert_with(Default::default).load_balancer_class = Some(class.to_owned());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        let annotations = self.service.metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// `metadata.creationTimestamp` as seconds since the Unix epoch (out of range values are ignored).
    pub fn created_at(mut self, unix_seconds: i64) -> Self {
        if let Ok(ts) = k8s_openapi::jiff::Timestamp::from_second(unix_seconds) {
            self.service.metadata.creation_timestamp = Some(Time(ts));
        }
        self
    }

    /// Appends a service port. `name` and `protocol` may be `""` (unset).
    pub fn port(self, name: &str, port: i32, protocol: &str, target_port: TargetPort) -> Self {
        self.raw_port(ServicePort {
            name: non_empty(name),
            port,
            protocol: non_empty(protocol),
            target_port: Some(target_port),
            ..ServicePort::default()
        })
    }

    /// Appends a port with only `port` set (name, protocol and targetPort left to their defaults).
    pub fn bare_port(self, port: i32) -> Self {
        self.raw_port(ServicePort { port, ..ServicePort::default() })
    }

    /// Appends a port exactly as given (for tests of unusual or invalid input).
    pub fn raw_port(mut self, port: ServicePort) -> Self {
        self.spec().ports.get_or_insert_with(Vec::new).push(port);
        self
    }

    /// Appends to `spec.loadBalancerSourceRanges`.
    pub fn source_ranges<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ranges: I) -> Self {
        let list = self.spec().load_balancer_source_ranges.get_or_insert_with(Vec::new);
        list.extend(ranges.into_iter().map(Into::into));
        self
    }

    /// `spec.sessionAffinity` (`ClientIP`, `None` or anything, for bad input) and, when given,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub fn session_affinity(mut self, affinity: &str, timeout_seconds: Option<i32>) -> Self {
        let spec = self.spec();
        spec.session_affinity = Some(affinity.to_owned());
        if let Some(seconds) = timeout_seconds {
            spec.session_affinity_config = Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig { timeout_seconds: Some(seconds) }),
            });
        }
        self
    }

    /// `spec.externalTrafficPolicy`: `Cluster`, `Local` (or anything, for bad input).
    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.to_owned());
        self
    }

    /// `spec.healthCheckNodePort` (any number, for bad input).
    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    /// Direct access for anything the builder does not cover.
    pub fn with(mut self, edit: impl FnOnce(&mut Service)) -> Self {
        edit(&mut self.service);
        self
    }

    pub fn build(self) -> Service {
        self.service
    }
}

/// EndpointSlice endpoint conditions; `Cond::unset()` leaves `conditions` out entirely.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cond {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl Cond {
    /// No conditions at all (Kubernetes reads that as ready).
    pub fn unset() -> Self {
        Cond::default()
    }

    pub fn ready() -> Self {
        Cond { ready: Some(true), serving: Some(true), terminating: Some(false) }
    }

    pub fn not_ready() -> Self {
        Cond { ready: Some(false), serving: Some(false), terminating: Some(false) }
    }

    /// A Pod shutting down that still serves its established connections.
    pub fn terminating() -> Self {
        Cond { ready: Some(false), serving: Some(true), terminating: Some(true) }
    }

    fn to_k8s(self) -> Option<EndpointConditions> {
        (self != Cond::unset()).then_some(EndpointConditions {
            ready: self.ready,
            serving: self.serving,
            terminating: self.terminating,
        })
    }
}

/// Builds a `discovery.k8s.io/v1` EndpointSlice labelled for its Service.
///
/// `addressType` is `IPv6` when any endpoint address contains a `:` and `IPv4` otherwise, unless set
/// with [`SliceBuilder::address_type`].
#[derive(Debug, Clone)]
pub struct SliceBuilder {
    slice: EndpointSlice,
    address_type: Option<String>,
}

impl SliceBuilder {
    pub fn new(namespace: &str, name: &str, service: &str) -> Self {
        let mut metadata = meta(namespace, name);
        metadata.labels = Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())]));
        let slice = EndpointSlice { metadata, ..EndpointSlice::default() };
        SliceBuilder { slice, address_type: None }
    }

    pub fn address_type(mut self, address_type: &str) -> Self {
        self.address_type = Some(address_type.to_owned());
        self
    }

    /// Appends a port; `name` and `protocol` may be `""` (unset).
    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.slice.ports.get_or_insert_with(Vec::new).push(EndpointPort {
            name: non_empty(name),
            port: Some(port),
            protocol: non_empty(protocol),
            ..EndpointPort::default()
        });
        self
    }

    /// Appends an endpoint with one address.
    pub fn endpoint(self, address: &str, conditions: Cond) -> Self {
        self.raw_endpoint(Endpoint {
            addresses: vec![address.to_owned()],
            conditions: conditions.to_k8s(),
            ..Endpoint::default()
        })
    }

    /// Appends an endpoint on a node, with a Pod as target (as the EndpointSlice controller writes).
    pub fn pod_endpoint(self, address: &str, conditions: Cond, node: &str, pod: &str) -> Self {
        let namespace = self.slice.metadata.namespace.clone();
        self.raw_endpoint(Endpoint {
            addresses: vec![address.to_owned()],
            conditions: conditions.to_k8s(),
            node_name: Some(node.to_owned()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                namespace,
                name: Some(pod.to_owned()),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        })
    }

    /// Appends an endpoint exactly as given.
    pub fn raw_endpoint(mut self, endpoint: Endpoint) -> Self {
        self.slice.endpoints.get_or_insert_with(Vec::new).push(endpoint);
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        let annotations = self.slice.metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Direct access for anything the builder does not cover.
    pub fn with(mut self, edit: impl FnOnce(&mut EndpointSlice)) -> Self {
        edit(&mut self.slice);
        self
    }

    pub fn build(mut self) -> EndpointSlice {
        self.slice.address_type = self.address_type.unwrap_or_else(|| {
            let endpoints = self.slice.endpoints.iter().flatten();
            let v6 = endpoints.flat_map(|e| e.addresses.iter()).any(|a| a.contains(':'));
            if v6 { "IPv6" } else { "IPv4" }.to_owned()
        });
        self.slice
    }
}

/// A Service with one TCP port `port` → `target_port` on one external IP: the most common test case.
pub fn simple_service(namespace: &str, name: &str, vip: &str, port: i32, target_port: i32) -> Service {
    ServiceBuilder::new(namespace, name)
        .external_ips([vip])
        .port("", port, "TCP", TargetPort::Int(target_port))
        .build()
}

/// An EndpointSlice for [`simple_service`]: an unnamed TCP `port`, one ready endpoint per address.
pub fn ready_slice(
    namespace: &str,
    name: &str,
    service: &str,
    port: i32,
    addresses: &[&str],
) -> EndpointSlice {
    addresses
        .iter()
        .fold(SliceBuilder::new(namespace, name, service).port("", port, "TCP"), |b, a| {
            b.endpoint(a, Cond::ready())
        })
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_address_type_follows_addresses_unless_set() {
        assert_eq!(
            SliceBuilder::new("a", "s", "svc").endpoint("::1", Cond::ready()).build().address_type,
            "IPv6"
        );
        assert_eq!(ready_slice("a", "s", "svc", 80, &["127.0.0.1"]).address_type, "IPv4");
        let fqdn = SliceBuilder::new("a", "s", "svc").address_type("FQDN").build();
        assert_eq!(fqdn.address_type, "FQDN");
    }

    #[test]
    fn unset_conditions_leave_the_field_out() {
        let slice = SliceBuilder::new("a", "s", "svc").endpoint("127.0.0.1", Cond::unset()).build();
        assert_eq!(slice.endpoints.as_ref().map(|e| e[0].conditions.is_none()), Some(true));
    }

    #[test]
    fn empty_port_name_and_protocol_mean_unset() {
        let service = simple_service("a", "web", "127.0.0.10", 80, 8080);
        let port = &service.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default()[0];
        assert_eq!((port.name.as_deref(), port.protocol.as_deref()), (None, Some("TCP")));
    }
}
