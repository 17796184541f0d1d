//! The resource types the emulator serves, and what kube-apiserver does to each on a write: its
//! defaults and the validation rules ringlb's objects meet (as `kube-fixtures` recorded them).
//!
//! Only what ringlb and its tests use is modelled; a rule that is not here is not enforced. Every
//! rule that is here answers as the real server does: the same status, reason, field and message.

use std::net::IpAddr;

use serde_json::{Map, Value, json};

/// A served resource type.
#[derive(Debug)]
pub(crate) struct ResourceType {
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: writes to the main resource keep the old status, writes to
    /// `/status` keep the old everything else.
    pub status: bool,
    /// A custom resource: its list items carry `kind` and `apiVersion`.
    pub custom: bool,
    /// DELETE answers the deleted object (Services) rather than a `Status`.
    pub delete_returns_object: bool,
    /// `metadata.generation` is kept (bumped on spec changes).
    pub generation: bool,
    /// Discovery's `shortNames` (what `kubectl get svc` resolves).
    pub short_names: &'static [&'static str],
    /// Discovery's `storageVersionHash`, as the real server published it (`""`: left out).
    pub storage_version_hash: &'static str,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `services`, or `endpointslices.discovery.k8s.io`, as messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }
}

pub(crate) const TYPES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        status: true,
        custom: false,
        delete_returns_object: true,
        short_names: &["svc"],
        storage_version_hash: "0/CO1lhkEBI=",
        generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &["ep"],
        storage_version_hash: "fWeeMqaN/OA=",
        generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status: true,
        custom: false,
        delete_returns_object: true,
        short_names: &["ns"],
        storage_version_hash: "Q3oi5N2YM8M=",
        generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &["ev"],
        storage_version_hash: "r2yiGXH7wu8=",
        generation: false,
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "qgS0xkrxYAI=",
        generation: true,
    },
    ResourceType {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "gqkMMb/YqFM=",
        generation: false,
    },
    ResourceType {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &["ev"],
        storage_version_hash: "r2yiGXH7wu8=",
        generation: false,
    },
    ResourceType {
        group: "metallb.io",
        version: "v1beta1",
        plural: "ipaddresspools",
        kind: "IPAddressPool",
        namespaced: true,
        status: true,
        custom: true,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "DyQ+xOSRKRI=",
        generation: true,
    },
    ResourceType {
        group: "metallb.io",
        version: "v1beta1",
        plural: "l2advertisements",
        kind: "L2Advertisement",
        namespaced: true,
        status: false,
        custom: true,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: true,
    },
    ResourceType {
        group: "metallb.io",
        version: "v1beta1",
        plural: "bgpadvertisements",
        kind: "BGPAdvertisement",
        namespaced: true,
        status: false,
        custom: true,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: true,
    },
    ResourceType {
        group: "metallb.io",
        version: "v1beta2",
        plural: "bgppeers",
        kind: "BGPPeer",
        namespaced: true,
        status: false,
        custom: true,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: true,
    },
    ResourceType {
        group: "metallb.io",
        version: "v1beta1",
        plural: "communities",
        kind: "Community",
        namespaced: true,
        status: false,
        custom: true,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: true,
    },
    ResourceType {
        group: "metallb.io",
        version: "v1beta1",
        plural: "bfdprofiles",
        kind: "BFDProfile",
        namespaced: true,
        status: false,
        custom: true,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: true,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status: true,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: false,
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: true,
        short_names: &["sa"],
        storage_version_hash: "",
        generation: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        kind: "ClusterRole",
        namespaced: false,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        kind: "ClusterRoleBinding",
        namespaced: false,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        kind: "Role",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: false,
    },
    ResourceType {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        kind: "RoleBinding",
        namespaced: true,
        status: false,
        custom: false,
        delete_returns_object: false,
        short_names: &[],
        storage_version_hash: "",
        generation: false,
    },
];

/// Where objects of `TYPES[type_index]` are stored: events.k8s.io Events are core Events.
pub(crate) fn storage_index(type_index: usize) -> usize {
    let type_ = &TYPES[type_index];
    if type_.kind == "Event" {
        TYPES.iter().position(|t| t.kind == "Event").unwrap_or(type_index)
    } else {
        type_index
    }
}

/// The type named by a URL's group, version and plural.
pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    TYPES.iter().position(|t| t.group == group && t.version == version && t.plural == plural)
}

/// The CustomResourceDefinitions a server has installed, by kind: the built-in types are always
/// served, a custom one only while its CRD is in (a cluster without it answers 404 and leaves it
/// out of discovery).
#[derive(Debug, Clone)]
pub(crate) struct Installed(Vec<&'static str>);

impl Installed {
    /// Every custom kind the emulator knows.
    pub fn all() -> Installed {
        Installed(TYPES.iter().filter(|t| t.custom).map(|t| t.kind).collect())
    }

    /// Just these kinds (each one the emulator knows).
    pub fn only(kinds: &[&str]) -> Installed {
        let known: Vec<&'static str> = TYPES.iter().filter(|t| t.custom).map(|t| t.kind).collect();
        Installed(
            kinds
                .iter()
                .map(|kind| {
                    *known
                        .iter()
                        .find(|k| *k == kind)
                        .unwrap_or_else(|| panic!("{kind} is not a custom kind the emulator knows"))
                })
                .collect(),
        )
    }

    pub fn serves(&self, type_: &ResourceType) -> bool {
        !type_.custom || self.0.contains(&type_.kind)
    }

    /// The served types.
    pub fn types(&self) -> impl Iterator<Item = &'static ResourceType> + '_ {
        TYPES.iter().filter(|t| self.serves(t))
    }

    /// [`find`], among the served types.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        find(group, version, plural).filter(|index| self.serves(&TYPES[*index]))
    }
}

/// One validation error, as a `details.causes[]` entry.
#[derive(Debug, Clone)]
pub(crate) struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn invalid(field: impl Into<String>, value: &Value, detail: &str) -> Cause {
        let shown = match value {
            Value::String(s) => format!("\"{s}\""),
            other => other.to_string(),
        };
        Cause {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {shown}: {detail}"),
        }
    }

    pub fn forbidden(field: impl Into<String>, detail: &str) -> Cause {
        Cause { reason: "FieldValueForbidden", field: field.into(), message: format!("Forbidden: {detail}") }
    }

    pub fn required(field: impl Into<String>, detail: &str) -> Cause {
        let message =
            if detail.is_empty() { "Required value".to_owned() } else { format!("Required value: {detail}") };
        Cause { reason: "FieldValueRequired", field: field.into(), message }
    }

    pub fn duplicate(field: impl Into<String>, value: &Value) -> Cause {
        Cause::duplicate_shown(field, &value.to_string())
    }

    /// A duplicate whose value is shown as the server prints it (a Go struct, say).
    pub fn duplicate_shown(field: impl Into<String>, shown: &str) -> Cause {
        Cause {
            reason: "FieldValueDuplicate",
            field: field.into(),
            message: format!("Duplicate value: {shown}"),
        }
    }

    pub fn unsupported(field: impl Into<String>, value: &Value, supported: &[&str]) -> Cause {
        let list = supported.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        Cause {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!("Unsupported value: {value}: supported values: {list}"),
        }
    }
}

/// The server-side defaults of a new object of `kind` (clusterIP and nodePort allocation are done
/// by the store, which knows what is taken).
pub(crate) fn default_new(kind: &str, object: &mut Value) {
    match kind {
        "Service" => default_service(object),
        "Namespace" => {
            let name = object["metadata"]["name"].clone();
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
        }
        "EndpointSlice" => {
            for port in object.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                port.as_object_mut().map(|p| p.entry("protocol").or_insert(json!("TCP")));
                port.as_object_mut().map(|p| p.entry("name").or_insert(json!("")));
            }
            for endpoint in object.get_mut("endpoints").and_then(Value::as_array_mut).into_iter().flatten() {
                endpoint.as_object_mut().map(|e| e.entry("conditions").or_insert(json!({})));
            }
        }
        "Endpoints" => {
            for subset in object.get_mut("subsets").and_then(Value::as_array_mut).into_iter().flatten() {
                for port in subset.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                    port.as_object_mut().map(|p| p.entry("protocol").or_insert(json!("TCP")));
                }
            }
        }
        _ => {}
    }
}

fn default_service(object: &mut Value) {
    let spec = object.as_object_mut().map(|o| o.entry("spec").or_insert(json!({}))).expect("an object");
    let Some(spec) = spec.as_object_mut() else { return };
    let service_type =
        spec.entry("type").or_insert(json!("ClusterIP")).as_str().unwrap_or("ClusterIP").to_owned();
    spec.entry("sessionAffinity").or_insert(json!("None"));
    if service_type != "ExternalName" {
        spec.entry("internalTrafficPolicy").or_insert(json!("Cluster"));
        spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
        spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
    }
    let external = service_type == "LoadBalancer"
        || service_type == "NodePort"
        || spec.get("externalIPs").and_then(Value::as_array).is_some_and(|ips| !ips.is_empty());
    if external {
        spec.entry("externalTrafficPolicy").or_insert(json!("Cluster"));
    }
    if service_type == "LoadBalancer" {
        spec.entry("allocateLoadBalancerNodePorts").or_insert(json!(true));
    }
    if spec.get("sessionAffinity").is_some_and(|a| a == "ClientIP") {
        spec.entry("sessionAffinityConfig").or_insert(json!({"clientIP": {"timeoutSeconds": 10800}}));
    }
    for port in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
        let Some(port) = port.as_object_mut() else { continue };
        port.entry("protocol").or_insert(json!("TCP"));
        // targetPort 0 (or unset) means the port, defaulted before validation.
        let target_unset = port.get("targetPort").is_none_or(|t| t == &json!(0) || t == &json!(""));
        if target_unset {
            let number = port.get("port").cloned().unwrap_or(json!(0));
            port.insert("targetPort".to_owned(), number);
        }
    }
    let root = object.as_object_mut().expect("an object");
    root.entry("status").or_insert(json!({"loadBalancer": {}}));
}

/// Validation of a whole object of `type_` in its served shape (on create and update); `old` is
/// the stored object on an update.
pub(crate) fn validate(type_: &ResourceType, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    match (type_.kind, type_.group) {
        ("Service", _) => validate_service(object, old, &mut causes),
        ("EndpointSlice", _) => validate_slice(object, old, &mut causes),
        ("Endpoints", _) => validate_endpoints(object, &mut causes),
        ("Lease", _) if object["spec"]["leaseDurationSeconds"].as_i64().is_some_and(|s| s <= 0) => {
            let value = &object["spec"]["leaseDurationSeconds"];
            causes.push(Cause::invalid("spec.leaseDurationSeconds", value, "must be greater than 0"));
        }
        ("Event", "") => {
            let namespace = &object["involvedObject"]["namespace"];
            if namespace.as_str().is_some_and(|ns| !ns.is_empty())
                && *namespace != object["metadata"]["namespace"]
            {
                causes.push(Cause::invalid(
                    "involvedObject.namespace",
                    namespace,
                    "does not match event.namespace",
                ));
            }
        }
        ("Event", _) => validate_event(object, &mut causes),
        _ => {}
    }
    causes
}

/// events.k8s.io/v1 rules (worded, odd as they are, as the real server words them).
fn validate_event(object: &Value, causes: &mut Vec<Cause>) {
    if object.get("eventTime").is_none_or(Value::is_null) {
        causes.push(Cause::required("eventTime", ""));
    }
    if let Some(kind) = object["type"].as_str()
        && kind != "Normal"
        && kind != "Warning"
    {
        causes.push(Cause::invalid("type", &json!(""), &format!("has invalid value: {kind}")));
    }
    if object["note"].as_str().is_some_and(|note| note.len() > 1024) {
        causes.push(Cause::invalid("message", &json!(""), "can have at most 1024 characters"));
    }
}

/// The warnings a valid object of `kind` is stored with.
pub(crate) fn warnings(kind: &str, object: &Value) -> Vec<String> {
    match kind {
        "EndpointSlice" if object["addressType"] == "FQDN" => {
            vec!["spec.addressType: FQDN endpoints are deprecated".to_owned()]
        }
        _ => Vec::new(),
    }
}

fn validate_service(object: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let spec = &object["spec"];
    let service_type = spec["type"].as_str().unwrap_or("ClusterIP");
    let ports = spec["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
    if ports.is_empty() && service_type != "ExternalName" && spec["clusterIP"] != json!("None") {
        causes.push(Cause::required("spec.ports", ""));
    }
    let mut seen = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let in_range = |v: &Value| v.as_i64().is_some_and(|n| (1..=65535).contains(&n));
        if !in_range(&port["port"]) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &port["port"],
                "must be between 1 and 65535, inclusive",
            ));
        }
        if port["targetPort"].is_number() && !in_range(&port["targetPort"]) {
            let detail = "must be between 1 and 65535, inclusive";
            causes.push(Cause::invalid(format!("spec.ports[{i}].targetPort"), &port["targetPort"], detail));
        }
        if ports.len() > 1 && port["name"].as_str().is_none_or(str::is_empty) {
            causes.push(Cause::required(format!("spec.ports[{i}].name"), ""));
        }
        let key = (port["port"].clone(), port["protocol"].clone());
        if seen.contains(&key) {
            // The server prints a Go struct holding only the port and protocol it compared.
            let shown = format!(
                "core.ServicePort{{Name:\"\", Protocol:{}, AppProtocol:(*string)(nil), Port:{}, TargetPort:intstr.IntOrString{{Type:0, IntVal:0, StrVal:\"\"}}, NodePort:0}}",
                key.1, key.0
            );
            causes.push(Cause::duplicate_shown(format!("spec.ports[{i}]"), &shown));
        }
        seen.push(key);
    }
    if spec.get("loadBalancerClass").is_some_and(|c| !c.is_null()) && service_type != "LoadBalancer" {
        causes.push(Cause::forbidden(
            "spec.loadBalancerClass",
            "may only be used when `type` is 'LoadBalancer'",
        ));
    }
    if let Some(old) = old {
        let (before, after) = (&old["spec"]["loadBalancerClass"], &spec["loadBalancerClass"]);
        if !before.is_null() && before != after {
            causes.push(Cause::invalid("spec.loadBalancerClass", after, "may not change once set"));
        }
    }
    for (i, ip) in spec["externalIPs"].as_array().into_iter().flatten().enumerate() {
        match ip.as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
            None => causes.push(Cause::invalid(
                format!("spec.externalIPs[{i}]"),
                ip,
                "must be a valid IP address",
            )),
            Some(addr) if addr.is_loopback() => causes.push(Cause::invalid(
                format!("spec.externalIPs[{i}]"),
                ip,
                "may not be in the loopback range (127.0.0.0/8, ::1/128)",
            )),
            Some(_) => {}
        }
    }
    for (i, range) in spec["loadBalancerSourceRanges"].as_array().into_iter().flatten().enumerate() {
        if !range.as_str().is_some_and(is_cidr) {
            // Sic: the real server names the Go field here.
            let detail = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
            causes.push(Cause::invalid(format!("spec.LoadBalancerSourceRanges[{i}]"), range, detail));
        }
    }
}

fn is_cidr(value: &str) -> bool {
    let Some((ip, prefix)) = value.split_once('/') else { return false };
    let Ok(ip) = ip.parse::<IpAddr>() else { return false };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().is_ok_and(|p| p <= max)
}

/// The real server's rules for an endpoint address of a slice of family `ipv6` (`None`: any):
/// the family first, then that it is an IP at all, then not loopback, not link-local.
fn validate_address(field: String, value: &Value, ipv6: Option<bool>, causes: &mut Vec<Cause>) {
    let ip = value.as_str().and_then(|s| s.parse::<IpAddr>().ok());
    if let Some(v6) = ipv6
        && ip.is_none_or(|ip| ip.is_ipv6() != v6)
    {
        let family = if v6 { "IPv6" } else { "IPv4" };
        causes.push(Cause::invalid(field.clone(), value, &format!("must be a valid {family} address")));
        if ip.is_some() {
            return;
        }
    }
    let Some(ip) = ip else {
        causes.push(Cause::invalid(field, value, "must be a valid IP address"));
        return;
    };
    if ip.is_loopback() {
        causes.push(Cause::invalid(field, value, "may not be in the loopback range (127.0.0.0/8, ::1/128)"));
    } else if is_link_local(ip) {
        causes.push(Cause::invalid(
            field,
            value,
            "may not be in the link-local range (169.254.0.0/16, fe80::/10)",
        ));
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn validate_slice(object: &Value, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let address_type = object["addressType"].as_str().unwrap_or_default();
    if !["IPv4", "IPv6", "FQDN"].contains(&address_type) {
        causes.push(Cause::unsupported("addressType", &object["addressType"], &["FQDN", "IPv4", "IPv6"]));
    }
    let endpoints = object["endpoints"].as_array().map(Vec::as_slice).unwrap_or_default();
    if endpoints.len() > 1000 {
        // The list's length is checked before its items, and alone.
        let message = format!("Too many: {}: must have at most 1000 items", endpoints.len());
        causes.push(Cause { reason: "FieldValueTooMany", field: "endpoints".to_owned(), message });
        return;
    }
    let ipv6 = match address_type {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        _ => None,
    };
    for (i, endpoint) in endpoints.iter().enumerate() {
        let addresses = endpoint["addresses"].as_array().map(Vec::as_slice).unwrap_or_default();
        if addresses.is_empty() {
            causes.push(Cause::required(
                format!("endpoints[{i}].addresses"),
                "must contain at least 1 address",
            ));
        }
        if ipv6.is_some() {
            for (j, address) in addresses.iter().enumerate() {
                validate_address(format!("endpoints[{i}].addresses[{j}]"), address, ipv6, causes);
            }
        }
    }
    let ports = object["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut names = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let name = port["name"].as_str().unwrap_or_default().to_owned();
        if names.contains(&name) {
            causes.push(Cause::duplicate(format!("ports[{i}].name"), &json!(name)));
        }
        if let Some(protocol) = port["protocol"].as_str()
            && !["SCTP", "TCP", "UDP"].contains(&protocol)
        {
            causes.push(Cause::unsupported(
                format!("ports[{i}].protocol"),
                &port["protocol"],
                &["SCTP", "TCP", "UDP"],
            ));
        }
        if !name.is_empty() && !is_label(&name) {
            causes.push(Cause::invalid(format!("ports[{i}].name"), &json!(name), "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"));
        }
        names.push(name);
    }
    if let Some(old) = old
        && old["addressType"] != object["addressType"]
    {
        causes.push(Cause::invalid("addressType", &object["addressType"], "field is immutable"));
    }
}

fn validate_endpoints(object: &Value, causes: &mut Vec<Cause>) {
    for (i, subset) in object["subsets"].as_array().into_iter().flatten().enumerate() {
        for list in ["addresses", "notReadyAddresses"] {
            for (j, address) in subset[list].as_array().into_iter().flatten().enumerate() {
                validate_address(format!("subsets[{i}].{list}[{j}].ip"), &address["ip"], None, causes);
            }
        }
    }
}

/// Validation of a Service's status (writes to `services/status`).
pub(crate) fn validate_service_status(object: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let ingress =
        object["status"]["loadBalancer"]["ingress"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !ingress.is_empty() && object["spec"]["type"] != json!("LoadBalancer") {
        causes.push(Cause::forbidden(
            "status.loadBalancer.ingress",
            "may only be used when `spec.type` is 'LoadBalancer'",
        ));
        return causes;
    }
    for (i, entry) in ingress.iter().enumerate() {
        let field = |name: &str| format!("status.loadBalancer.ingress[{i}].{name}");
        if let Some(ip) = entry.get("ip")
            && ip.as_str().and_then(|s| s.parse::<IpAddr>().ok()).is_none()
        {
            causes.push(Cause::invalid(
                field("ip"),
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ));
        }
        match entry.get("ipMode") {
            None => {}
            Some(_) if entry.get("ip").is_none() => {
                causes.push(Cause::forbidden(field("ipMode"), "may not be specified when `ip` is not set"))
            }
            Some(mode) if mode != &json!("VIP") && mode != &json!("Proxy") => {
                causes.push(Cause::unsupported(field("ipMode"), mode, &["Proxy", "VIP"]))
            }
            Some(_) => {}
        }
    }
    causes
}

/// Status defaults: `ipMode` is `VIP` where an ingress has an `ip` and names none.
pub(crate) fn default_status(kind: &str, object: &mut Value) {
    if kind != "Service" {
        return;
    }
    let ingress = object.pointer_mut("/status/loadBalancer/ingress").and_then(Value::as_array_mut);
    for entry in ingress.into_iter().flatten() {
        if entry.get("ip").is_some()
            && let Some(entry) = entry.as_object_mut()
        {
            entry.entry("ipMode").or_insert(json!("VIP"));
        }
    }
}

/// The spec (everything but metadata and status) of `object`, to tell a spec change.
pub(crate) fn spec_of(object: &Value) -> Map<String, Value> {
    let mut map = object.as_object().cloned().unwrap_or_default();
    map.remove("metadata");
    map.remove("status");
    map.remove("kind");
    map.remove("apiVersion");
    map
}
