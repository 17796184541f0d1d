//! Target `annotations`: arbitrary annotations on a fixed Service and its EndpointSlices, through the
//! builder.
//!
//! The input is text, one annotation a line: `key=value` annotates the Service, `slice:key=value`
//! both of its EndpointSlices (`ringlb.io/weight`); a line without `=` is a key with an empty value.
//! The Service serves TCP, UDP and SCTP ports on an IPv4 and an IPv6 address, with ready, not ready
//! and terminating endpoints, so every annotation has something to act on. Checks: what
//! `objects::check_build` checks, and that every rejected annotation is reported with the value it
//! was given, or with the item of a list at fault (`builder::read_annotation`'s promise: the object,
//! the annotation and the value).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::annotations::METALLB_DEPRECATED;
use lb_core::{BuildError, BuildOptions, build};
use serde_json::json;

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut on_service = BTreeMap::new();
    let mut on_slices = BTreeMap::new();
    for line in text.lines() {
        let (target, line) = match line.strip_prefix("slice:") {
            Some(line) => (&mut on_slices, line),
            None => (&mut on_service, line),
        };
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        target.insert(key.to_owned(), value.to_owned());
    }
    let service = service(&on_service);
    let slices = [
        slice("web-v4", "IPv4", &["10.0.0.1", "10.0.0.2", "10.0.0.3"], &on_slices),
        slice("web-v6", "IPv6", &["fd00::1", "fd00::2", "fd00::3"], &on_slices),
    ];
    let services = [service];
    super::objects::check_build(&services, &slices, &[]);

    let report = build(&services, &slices, &[], &BuildOptions::default(), None, 1);
    for error in &report.errors {
        if let BuildError::InvalidAnnotation { annotation, value, .. } = error {
            // MetalLB's annotations are also read under their deprecated names.
            let old = METALLB_DEPRECATED.iter().find(|(new, _)| new == annotation).map(|(_, old)| *old);
            let given = [Some(*annotation), old]
                .into_iter()
                .flatten()
                .flat_map(|key| [on_service.get(key), on_slices.get(key)])
                .flatten()
                // A list (source ranges, addresses) is reported one item at a time.
                .any(|given| given.contains(value.as_str()));
            assert!(given, "{error}: not a value given");
        }
    }
}

fn service(annotations: &BTreeMap<String, String>) -> Service {
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "namespace": "default",
            "name": "web",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "annotations": annotations,
        },
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": "web"},
            "ipFamilyPolicy": "PreferDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "externalIPs": ["192.0.2.10", "2001:db8::10"],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
                {"name": "sig", "port": 3868, "protocol": "SCTP", "targetPort": 3868},
            ],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}},
    });
    serde_json::from_value(service).expect("the fixed Service is valid")
}

fn slice(
    name: &str,
    family: &str,
    addresses: &[&str],
    annotations: &BTreeMap<String, String>,
) -> EndpointSlice {
    let conditions = [
        json!({"ready": true, "serving": true, "terminating": false}),
        json!({"ready": false, "serving": false, "terminating": false}),
        json!({"ready": false, "serving": true, "terminating": true}),
    ];
    let endpoints: Vec<_> = addresses
        .iter()
        .zip(conditions)
        .enumerate()
        .map(|(i, (address, conditions))| {
            json!({"addresses": [address], "conditions": conditions, "nodeName": format!("node-{i}")})
        })
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": {"kubernetes.io/service-name": "web"},
            "annotations": annotations,
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
            {"name": "sig", "port": 3868, "protocol": "SCTP"},
        ],
    });
    serde_json::from_value(slice).expect("the fixed EndpointSlice is valid")
}
