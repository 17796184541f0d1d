//! core/v1 `Endpoints` as Kubernetes' EndpointSliceMirroring controller turns them into
//! EndpointSlices, for the selector-less Service of the Kubernetes documentation ("Services without
//! selectors": a Service plus a hand-written `Endpoints` object of the same name).
//!
//! The rules, as the controller applies them:
//! 1. only the Endpoints of a Service *without* a selector are mirrored (with a selector, the
//!    EndpointSlice controller owns the slices); an Endpoints object labelled
//!    `endpointslice.kubernetes.io/skip-mirror: "true"` is not mirrored either;
//! 2. when any EndpointSlice of the Service exists, the slices win (they are what kube-proxy reads,
//!    and `kubectl get endpoints,endpointslices` of a cluster shows both, mirrored or not);
//! 3. each subset becomes one slice per address family, with the subset's ports (named or unnamed,
//!    protocol TCP when unset); `addresses[]` are ready endpoints and `notReadyAddresses[]` are not
//!    ready (nor serving); `nodeName` and `targetRef` are kept.
//!
//! A bad address or port is rejected on its own (naming `subsets[i].addresses[j].ip`), like a bad
//! endpoint of a slice; the rest still counts.

use std::collections::BTreeSet;
use std::collections::btree_map::Entry;

use k8s_openapi::api::core::v1::{EndpointAddress, Endpoints};

use super::slices::{
    ParsedEndpoint, ParsedSlice, SlicesByService, parse_family_ip, parse_slice_port, target_name,
};
use super::{Skipped, policy::parse_slice_weight, unique_objects};
use crate::error::BuildError;
use crate::model::{EndpointConditions, ObjectRef};

/// The label by which the EndpointSliceMirroring controller leaves an Endpoints object alone.
pub(super) const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";

/// Adds the mirrored slices of `endpoints` to `slices`, for Services (by namespace and name) that
/// are not in `with_selector` and have no EndpointSlice in `slices`.
pub(super) fn mirror_all(
    endpoints: &[&Endpoints],
    with_selector: &BTreeSet<(String, String)>,
    slices: &mut SlicesByService,
    errors: &mut Vec<BuildError>,
    skipped: &mut Vec<Skipped>,
) {
    let (unique, _) = unique_objects(endpoints, errors);
    for (object, endpoints) in unique {
        let key = (object.namespace.clone(), object.name.clone());
        let labels = endpoints.metadata.labels.as_ref();
        let reason = if labels.and_then(|l| l.get(SKIP_MIRROR_LABEL)).is_some_and(|v| v == "true") {
            "labelled endpointslice.kubernetes.io/skip-mirror: not mirrored"
        } else if with_selector.contains(&key) {
            "its Service has a selector, so its EndpointSlices are used (as kube-proxy does)"
        } else {
            match slices.entry(key) {
                Entry::Occupied(_) => {
                    "EndpointSlices of its Service exist; they win, as kube-proxy reads only those"
                }
                Entry::Vacant(vacant) => {
                    let mirrored = mirror_one(&object, endpoints, errors);
                    if !mirrored.is_empty() {
                        vacant.insert(mirrored.into_iter().map(std::sync::Arc::new).collect());
                    }
                    continue;
                }
            }
        };
        skipped.push(Skipped { service: object, reason: reason.to_owned() });
    }
}

/// The slices of one Endpoints object: per subset, one per address family that has addresses.
fn mirror_one(object: &ObjectRef, endpoints: &Endpoints, errors: &mut Vec<BuildError>) -> Vec<ParsedSlice> {
    let weight =
        parse_slice_weight(endpoints.metadata.annotations.as_ref(), object).unwrap_or_else(|error| {
            errors.push(error);
            1
        });
    let mut slices = Vec::new();
    for (i, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let ports: Vec<_> = subset
            .ports
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(j, p)| {
                let field = |name: &str| format!("subsets[{i}].ports[{j}].{name}");
                parse_slice_port(
                    p.name.as_deref(),
                    p.protocol.as_deref(),
                    Some(p.port),
                    object,
                    field,
                    errors,
                )
            })
            .collect();
        let declares_ports = subset.ports.as_ref().is_some_and(|p| !p.is_empty());
        let lists = [
            ("addresses", subset.addresses.as_deref(), true),
            ("notReadyAddresses", subset.not_ready_addresses.as_deref(), false),
        ];
        for ipv6 in [false, true] {
            let mut parsed = Vec::new();
            for (list, addresses, ready) in lists {
                for (j, address) in addresses.into_iter().flatten().enumerate() {
                    // The other family's addresses belong to the other slice of this subset.
                    if address.ip.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_ipv6() != ipv6) {
                        continue;
                    }
                    // Unparsable addresses are reported once, with the IPv4 slice.
                    if ipv6 && address.ip.parse::<std::net::IpAddr>().is_err() {
                        continue;
                    }
                    let field = || format!("subsets[{i}].{list}[{j}].ip");
                    match mirror_address(address, ready, ipv6, object, field) {
                        Ok(endpoint) => parsed.push(endpoint),
                        Err(error) => errors.push(error),
                    }
                }
            }
            if !parsed.is_empty() {
                let ports = ports.clone();
                let name = object.name.clone();
                slices.push(ParsedSlice { name, ipv6, declares_ports, ports, weight, endpoints: parsed });
            }
        }
    }
    slices
}

fn mirror_address(
    address: &EndpointAddress,
    ready: bool,
    ipv6: bool,
    object: &ObjectRef,
    field: impl Fn() -> String,
) -> Result<ParsedEndpoint, BuildError> {
    Ok(ParsedEndpoint {
        addr: parse_family_ip(&address.ip, ipv6, object, field)?,
        // The controller sets only `ready`; unset `serving` reads as `ready`.
        conditions: EndpointConditions { ready, serving: ready, terminating: false },
        placement: std::sync::Arc::new(crate::model::Placement {
            node_name: address.node_name.as_deref().map(std::sync::Arc::from),
            zone: None,
            target: address.target_ref.as_ref().map(|t| std::sync::Arc::from(target_name(t, object))),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use k8s_openapi::api::core::v1::Service;
    use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};

    use super::*;
    use crate::builder::{BuildOptions, BuildReport, build};
    use crate::model::{Protocol, VipKey};

    /// The selector-less Service and the Endpoints object recorded from kube-apiserver v1.32
    /// (`kube-fixtures/endpoints/create-subsets.json`: three subsets, one port without protocol, a
    /// not-ready address, hostname/nodeName/targetRef), with an external IP added to serve it.
    fn legacy() -> (Service, Endpoints) {
        let service = ServiceBuilder::new("ringlb-fx", "legacy")
            .external_ips(["192.0.2.100"])
            .port("http", 80, "TCP", TargetPort::Int(8080))
            .port("metrics", 9100, "TCP", TargetPort::Int(9100))
            .build();
        let endpoints = serde_json::from_str(
            r#"{"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "legacy", "namespace": "ringlb-fx",
            "labels": {"app": "legacy"}}, "subsets": [{"addresses": [{"ip": "192.0.2.22", "nodeName": "node-b",
            "targetRef": {"kind": "Pod", "namespace": "ringlb-fx", "name": "legacy-1"}}, {"ip": "192.0.2.21",
            "hostname": "legacy-0", "nodeName": "node-a"}], "notReadyAddresses": [{"ip": "198.51.100.23"}],
            "ports": [{"name": "metrics", "port": 9100}, {"name": "http", "port": 8080, "protocol": "TCP"}]},
            {"addresses": [{"ip": "192.0.2.20"}], "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "metrics", "port": 9100, "protocol": "TCP"}]}, {"addresses": [{"ip": "198.51.100.30"}],
            "ports": [{"name": "http", "port": 8081, "protocol": "TCP"}]}]}"#,
        )
        .expect("the recorded Endpoints object");
        (service, endpoints)
    }

    fn run(
        services: &[Service],
        slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
        endpoints: &[Endpoints],
    ) -> BuildReport {
        build(services, slices, endpoints, &BuildOptions::default(), None, 1)
    }

    fn backends(report: &BuildReport, port: u16) -> Vec<(SocketAddr, bool)> {
        let key = VipKey::new("192.0.2.100".parse().expect("vip"), port, Protocol::Tcp);
        let entry = report.snapshot.get(&key).unwrap_or_else(|| panic!("no entry {key}: {report}"));
        entry.backends.iter().enumerate().map(|(i, b)| (b.addr(), entry.is_eligible(i as u32))).collect()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn endpoints_of_a_selector_less_service_are_mirrored_port_by_name() {
        let (service, endpoints) = legacy();
        let report = run(&[service], &[], &[endpoints]);
        assert!(report.is_clean(), "{report}");
        assert_eq!(
            backends(&report, 80),
            [
                (addr("192.0.2.20:8080"), true),
                (addr("192.0.2.21:8080"), true),
                (addr("192.0.2.22:8080"), true),
                (addr("198.51.100.23:8080"), false),
                (addr("198.51.100.30:8081"), true),
            ],
            "addresses are ready, notReadyAddresses are not, each subset maps the name to its port"
        );
        assert_eq!(backends(&report, 9100).len(), 4, "the third subset has no metrics port");
        let key = VipKey::new("192.0.2.100".parse().expect("vip"), 80, Protocol::Tcp);
        let entry = report.snapshot.get(&key).expect("entry");
        let pod = entry.backends.iter().find(|b| b.addr() == addr("192.0.2.22:8080")).expect("pod");
        assert_eq!(
            (pod.node_name(), pod.placement.target.as_deref()),
            (Some("node-b"), Some("Pod ringlb-fx/legacy-1"))
        );
    }

    #[test]
    fn unnamed_ports_and_bad_addresses_are_handled_like_slices() {
        let service =
            ServiceBuilder::new("default", "db").external_ips(["192.0.2.100"]).bare_port(5432).build();
        let endpoints: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "bogus"}, {"ip": "2001:db8::1"}], "ports": [{"port": 5433}]}]
        }))
        .expect("endpoints");
        let report = run(&[service], &[], &[endpoints]);
        assert_eq!(backends(&report, 5432), [(addr("10.0.0.1:5433"), true)], "{report}");
        assert_eq!(report.errors.len(), 1, "{report}");
        assert_eq!(
            report.errors[0].object(),
            &ObjectRef { kind: "Endpoints", namespace: "default".into(), name: "db".into() }
        );
        assert_eq!(report.errors[0].field(), "subsets[0].addresses[1].ip");
        let v6 = VipKey::new("192.0.2.100".parse().expect("vip"), 5432, Protocol::Tcp);
        assert!(report.snapshot.get(&v6).is_some_and(|e| e.backends.iter().all(|b| b.addr().is_ipv4())));
    }

    #[test]
    fn slices_win_and_selector_services_and_skip_mirror_are_not_mirrored() {
        let (service, endpoints) = legacy();
        let slice = SliceBuilder::new("ringlb-fx", "legacy-abc", "legacy")
            .port("http", 8080, "TCP")
            .endpoint("192.0.2.50", Cond::ready())
            .build();
        let report = run(std::slice::from_ref(&service), &[slice], std::slice::from_ref(&endpoints));
        assert_eq!(backends(&report, 80), [(addr("192.0.2.50:8080"), true)], "the slice wins");
        assert!(
            report.skipped.iter().any(|s| s.service.kind == "Endpoints" && s.reason.contains("win")),
            "{report}"
        );

        let selected = ServiceBuilder::from(service.clone())
            .with(|s| {
                s.spec.as_mut().expect("spec").selector = Some([("app".into(), "legacy".into())].into())
            })
            .build();
        let report = run(&[selected], &[], std::slice::from_ref(&endpoints));
        assert!(backends(&report, 80).is_empty(), "{report}");
        assert!(report.skipped.iter().any(|s| s.reason.contains("selector")), "{report}");

        let mut skipping = endpoints;
        skipping.metadata.labels.get_or_insert_default().insert(SKIP_MIRROR_LABEL.into(), "true".into());
        let report = run(&[service], &[], &[skipping]);
        assert!(backends(&report, 80).is_empty(), "{report}");
        assert!(report.skipped.iter().any(|s| s.reason.contains("skip-mirror")), "{report}");
    }
}
