//! A Service as ringlb keeps it ([`CompactService`]): every field that a build, the allocator or
//! the selection reads, and nothing else, in well under half the space of the decoded object.
//!
//! A large cluster's 10,000 Services are kept for as long as they exist. Decoded, each is a
//! `k8s_openapi` `Service` of 824 bytes before its strings, and every one-entry map in it (labels,
//! selector, annotations) is a 544-byte B-tree node: 2.3 KB for a one-port LoadBalancer Service,
//! 23 MB at that scale. Kept compact it is about 0.8 KB.
//!
//! Invariants: the conversion ([`CompactService::from`]) loses nothing that any reader of a
//! Service looks at (readers see the same values, absent ones as absent); two Services that differ
//! in a field kept here compare unequal, and a change of a field not kept (a `clusterIP`, a
//! condition, `managedFields`, kubectl's last-applied annotation) is no change at all. The selector is kept as whether there is one:
//! only that is read (a Service with a selector gets its endpoints from the EndpointSlice
//! controller, so its core/v1 Endpoints are not mirrored).

use std::collections::BTreeMap;

use crate::ObjectRef;
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::labels::Labels;

/// See the module doc.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompactService {
    pub metadata: Meta,
    pub spec: Spec,
    /// `status.loadBalancer.ingress`.
    pub ingress: Box<[Ingress]>,
}

/// What of `metadata` is read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub name: Option<Box<str>>,
    pub namespace: Option<Box<str>>,
    /// Events name it (`kubectl describe` finds a Service's Events by it).
    pub uid: Option<Box<str>>,
    /// The version the allocator writes a status over.
    pub resource_version: Option<Box<str>>,
    pub creation_timestamp: Option<Time>,
    /// `deletionTimestamp` is set: the Service is going away.
    pub deleting: bool,
    pub labels: Labels,
    pub annotations: Labels,
}

/// What of `spec` is read; field names as in `ServiceSpec`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spec {
    pub type_: Option<Box<str>>,
    /// `clusterIP: None`.
    pub headless: bool,
    /// A non-empty `selector`.
    pub selects: bool,
    pub ports: Box<[Port]>,
    pub external_ips: Box<[Box<str>]>,
    pub load_balancer_ip: Option<Box<str>>,
    pub load_balancer_class: Option<Box<str>>,
    pub ip_families: Box<[Box<str>]>,
    pub ip_family_policy: Option<Box<str>>,
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    pub session_affinity: Option<Box<str>>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub session_affinity_timeout: Option<i32>,
    pub external_traffic_policy: Option<Box<str>>,
    pub health_check_node_port: Option<i32>,
}

/// One `spec.ports[]` entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Port {
    pub name: Option<Box<str>>,
    pub protocol: Option<Box<str>>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
}

/// One `status.loadBalancer.ingress[]` entry (a hostname-only one keeps no `ip`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ingress {
    pub ip: Option<Box<str>>,
    pub ip_mode: Option<Box<str>>,
}

impl CompactService {
    /// `spec.type`, `ClusterIP` when unset.
    pub fn service_type(&self) -> &str {
        self.spec.type_.as_deref().unwrap_or("ClusterIP")
    }

    pub fn is_load_balancer(&self) -> bool {
        self.spec.type_.as_deref() == Some("LoadBalancer")
    }

    /// `spec.loadBalancerClass`, `None` when unset or empty.
    pub fn class(&self) -> Option<&str> {
        self.spec.load_balancer_class.as_deref().filter(|c| !c.is_empty())
    }

    /// Its name as ringlb keys it (namespace `default` when unset or empty); `None` without a name.
    pub fn object(&self) -> Option<ObjectRef> {
        let meta = &self.metadata;
        let name = meta.name.as_deref().filter(|name| !name.is_empty())?;
        let namespace = meta.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or("default");
        Some(ObjectRef::service(namespace, name))
    }

    /// A reference to it, as an Event's `regarding` (and kube's `Resource::object_ref`) names it.
    pub fn object_reference(&self) -> ObjectReference {
        let meta = &self.metadata;
        let owned = |text: &Option<Box<str>>| text.as_deref().map(str::to_owned);
        ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Service".to_owned()),
            name: owned(&meta.name),
            namespace: owned(&meta.namespace),
            uid: owned(&meta.uid),
            resource_version: owned(&meta.resource_version),
            field_path: None,
        }
    }

    /// Whether these two differ in nothing allocation reads but the status.
    pub fn same_but_status(&self, other: &CompactService) -> bool {
        let (a, b) = (&self.metadata, &other.metadata);
        self.spec == other.spec
            && (&a.name, &a.namespace, &a.labels, &a.annotations)
                == (&b.name, &b.namespace, &b.labels, &b.annotations)
            && (&a.creation_timestamp, a.deleting) == (&b.creation_timestamp, b.deleting)
    }
}

/// kubectl's copy of the whole object, in an annotation: kilobytes that nothing reads.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn text(value: &Option<String>) -> Option<Box<str>> {
    value.as_deref().map(Box::from)
}

fn texts(values: &Option<Vec<String>>) -> Box<[Box<str>]> {
    values.iter().flatten().map(|value| Box::from(value.as_str())).collect()
}

fn labels(map: &Option<BTreeMap<String, String>>, except: Option<&str>) -> Labels {
    let kept = map.iter().flatten().filter(|(key, _)| Some(key.as_str()) != except);
    Labels::from_sorted(
        kept.map(|(key, value)| (Box::from(key.as_str()), Box::from(value.as_str()))).collect(),
    )
}

/// Copies what is kept; the rest of `service` is not cloned.
impl From<&Service> for CompactService {
    fn from(service: &Service) -> Self {
        let (metadata, default) = (&service.metadata, ServiceSpec::default());
        let spec = service.spec.as_ref().unwrap_or(&default);
        let port = |p: &ServicePort| Port {
            name: text(&p.name),
            protocol: text(&p.protocol),
            port: p.port,
            target_port: p.target_port.clone(),
        };
        let status = service.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        let ingress = status.and_then(|lb| lb.ingress.as_ref()).into_iter().flatten();
        CompactService {
            metadata: Meta {
                name: text(&metadata.name),
                namespace: text(&metadata.namespace),
                uid: text(&metadata.uid),
                resource_version: text(&metadata.resource_version),
                creation_timestamp: metadata.creation_timestamp.clone(),
                deleting: metadata.deletion_timestamp.is_some(),
                labels: labels(&metadata.labels, None),
                annotations: labels(&metadata.annotations, Some(LAST_APPLIED)),
            },
            spec: Spec {
                type_: text(&spec.type_),
                headless: spec.cluster_ip.as_deref() == Some("None"),
                selects: spec.selector.as_ref().is_some_and(|s| !s.is_empty()),
                ports: spec.ports.iter().flatten().map(port).collect(),
                external_ips: texts(&spec.external_ips),
                load_balancer_ip: text(&spec.load_balancer_ip),
                load_balancer_class: text(&spec.load_balancer_class),
                ip_families: texts(&spec.ip_families),
                ip_family_policy: text(&spec.ip_family_policy),
                load_balancer_source_ranges: texts(&spec.load_balancer_source_ranges),
                session_affinity: text(&spec.session_affinity),
                session_affinity_timeout: spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds),
                external_traffic_policy: text(&spec.external_traffic_policy),
                health_check_node_port: spec.health_check_node_port,
            },
            ingress: ingress.map(|i| Ingress { ip: text(&i.ip), ip_mode: text(&i.ip_mode) }).collect(),
        }
    }
}

impl From<Service> for CompactService {
    fn from(service: Service) -> Self {
        CompactService::from(&service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(json: serde_json::Value) -> Service {
        serde_json::from_value(json).expect("a Service")
    }

    #[test]
    fn every_field_read_survives_and_what_is_not_read_is_gone() {
        let service = decoded(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "shop", "resourceVersion": "42", "uid": "u-1",
                "creationTimestamp": "2026-01-01T00:00:00Z", "deletionTimestamp": "2026-01-02T00:00:00Z",
                "labels": {"app": "web", "tier": "front"},
                "annotations": {
                    "metallb.io/address-pool": "blue",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                },
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "None", "selector": {"app": "web"},
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": "web"}],
                "externalIPs": ["192.0.2.1"], "loadBalancerIP": "192.0.2.2",
                "loadBalancerClass": "ringlb.io/lb", "ipFamilies": ["IPv6", "IPv4"],
                "ipFamilyPolicy": "PreferDualStack", "loadBalancerSourceRanges": ["10.0.0.0/8"],
                "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 30001,
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.3", "ipMode": "Proxy"}, {"hostname": "lb.example"},
            ]}},
        }));
        let compact = CompactService::from(&service);
        let meta = &compact.metadata;
        assert_eq!((meta.name.as_deref(), meta.namespace.as_deref()), (Some("web"), Some("shop")));
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert_eq!(meta.creation_timestamp, service.metadata.creation_timestamp);
        assert!(meta.deleting);
        assert_eq!(meta.labels.get("tier"), Some("front"));
        assert_eq!(meta.labels.get("app"), Some("web"));
        assert_eq!(meta.annotations.iter().collect::<Vec<_>>(), [("metallb.io/address-pool", "blue")]);
        let spec = &compact.spec;
        assert_eq!(compact.service_type(), "LoadBalancer");
        assert!(spec.headless && spec.selects);
        assert_eq!(
            &*spec.ports,
            [Port {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: 80,
                target_port: Some(IntOrString::String("web".into())),
            }]
        );
        assert_eq!(&*spec.external_ips, [Box::from("192.0.2.1")]);
        assert_eq!(spec.load_balancer_ip.as_deref(), Some("192.0.2.2"));
        assert_eq!(compact.class(), Some("ringlb.io/lb"));
        assert_eq!(&*spec.ip_families, [Box::from("IPv6"), Box::from("IPv4")]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("PreferDualStack"));
        assert_eq!(&*spec.load_balancer_source_ranges, [Box::from("10.0.0.0/8")]);
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(spec.session_affinity_timeout, Some(60));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.health_check_node_port, Some(30001));
        let ingress: Vec<_> =
            compact.ingress.iter().map(|i| (i.ip.as_deref(), i.ip_mode.as_deref())).collect();
        assert_eq!(ingress, [(Some("192.0.2.3"), Some("Proxy")), (None, None)]);

        assert_eq!(compact.object(), Some(ObjectRef::service("shop", "web")));
        let reference = compact.object_reference();
        assert_eq!(reference, kube_like_reference(&service));

        // What is not kept changes nothing; what is kept does.
        let mut other = service.clone();
        other.metadata.generation = Some(2);
        other.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        assert_eq!(CompactService::from(other), compact);
        let mut other = service.clone();
        other.spec.as_mut().unwrap().selector = Some(BTreeMap::new());
        assert_ne!(CompactService::from(other), compact, "an empty selector selects nothing");
    }

    /// What kube's `Resource::object_ref` gives for a Service.
    fn kube_like_reference(service: &Service) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: service.metadata.name.clone(),
            namespace: service.metadata.namespace.clone(),
            uid: service.metadata.uid.clone(),
            resource_version: service.metadata.resource_version.clone(),
            field_path: None,
        }
    }

    #[test]
    fn an_empty_service_converts_to_the_default() {
        assert_eq!(CompactService::from(Service::default()), CompactService::default());
        assert_eq!(CompactService::default().service_type(), "ClusterIP");
        assert_eq!(CompactService::default().class(), None);
        assert_eq!(CompactService::default().object(), None, "no name, no object");
        let unspaced =
            CompactService::from(decoded(serde_json::json!({"metadata": {"name": "a", "namespace": ""}})));
        assert_eq!(unspaced.object(), Some(ObjectRef::service("default", "a")));
    }

    #[test]
    fn only_the_status_differs() {
        let mut a = CompactService::from(decoded(serde_json::json!({"metadata": {"name": "a"}})));
        let mut b = a.clone();
        b.ingress = Box::new([Ingress { ip: Some("192.0.2.1".into()), ip_mode: None }]);
        b.metadata.resource_version = Some("7".into());
        assert!(a.same_but_status(&b));
        a.metadata.labels = Labels::from(BTreeMap::from([("k".to_owned(), "v".to_owned())]));
        assert!(!a.same_but_status(&b));
    }
}
