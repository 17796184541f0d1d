//! Builder behaviour on hand-written objects (property tests live in `lb-core/tests/`).

use std::net::{IpAddr, SocketAddr};

use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort, ready_slice, simple_service};

use super::*;
use crate::model::Protocol;

fn key(addr: &str, port: u16, protocol: Protocol) -> VipKey {
    VipKey::new(addr.parse().expect("test address"), port, protocol)
}

fn tcp(addr: &str, port: u16) -> VipKey {
    key(addr, port, Protocol::Tcp)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test socket address")
}

fn run(services: &[Service], slices: &[EndpointSlice]) -> BuildReport {
    build(services, slices, &[], &BuildOptions::default(), None, 7)
}

/// The eligible backends' addresses of one entry.
fn eligible(report: &BuildReport, key: &VipKey) -> Vec<SocketAddr> {
    let entry = report.snapshot.get(key).unwrap_or_else(|| panic!("no entry {key}: {report}"));
    entry.eligible.iter().filter_map(|&i| entry.backend(i)).map(|b| b.addr()).collect()
}

#[test]
fn external_ip_service_serves_only_ready_endpoints() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let slice = SliceBuilder::new("default", "web-abc", "web")
        .port("", 8080, "TCP")
        .endpoint("127.0.0.3", Cond::not_ready())
        .endpoint("127.0.0.2", Cond::unset())
        .endpoint("127.0.0.1", Cond::ready())
        .endpoint("127.0.0.4", Cond::terminating())
        .build();
    let report = run(&[service], &[slice]);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.snapshot.version, 7);
    let entry = report.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry");
    let all: Vec<_> = entry.backends.iter().map(|b| b.addr()).collect();
    let expected: Vec<_> = (1..=4).map(|i| addr(&format!("127.0.0.{i}:8080"))).collect();
    assert_eq!(all, expected, "backends sorted by id, not-ready ones kept for display");
    assert_eq!(entry.eligible, vec![0, 1]);
    assert_eq!(entry.service, ObjectRef::service("default", "web"));
}

#[test]
fn slices_of_other_services_or_namespaces_are_not_joined() {
    let services = [
        simple_service("default", "web", "127.0.0.10", 80, 8080),
        simple_service("other", "web", "127.0.0.11", 80, 8080),
    ];
    let slices = [
        ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"]),
        ready_slice("other", "web-1", "web", 8080, &["127.0.0.2"]),
        ready_slice("default", "api-1", "api", 8080, &["127.0.0.3"]),
    ];
    let report = run(&services, &slices);
    assert_eq!(eligible(&report, &tcp("127.0.0.10", 80)), [addr("127.0.0.1:8080")]);
    assert_eq!(eligible(&report, &tcp("127.0.0.11", 80)), [addr("127.0.0.2:8080")]);
}

#[test]
fn named_target_port_resolves_per_slice() {
    let service = ServiceBuilder::new("default", "web")
        .external_ips(["127.0.0.10"])
        .port("http", 80, "TCP", TargetPort::String("web".into()))
        .build();
    let slices = [
        SliceBuilder::new("default", "web-a", "web")
            .port("http", 8080, "TCP")
            .endpoint("127.0.0.1", Cond::ready()),
        SliceBuilder::new("default", "web-b", "web")
            .port("http", 9090, "TCP")
            .endpoint("127.0.0.2", Cond::ready()),
        // Hand-written: named after the container port instead of the service port.
        SliceBuilder::new("default", "web-c", "web")
            .port("web", 7070, "TCP")
            .endpoint("127.0.0.3", Cond::ready()),
        // Lists ports, none of them ours: not a backend of this port.
        SliceBuilder::new("default", "web-d", "web")
            .port("metrics", 9100, "TCP")
            .endpoint("127.0.0.4", Cond::ready()),
    ]
    .map(SliceBuilder::build);
    let report = run(&[service], &slices);
    assert!(report.is_clean(), "{report}");
    let expected = ["127.0.0.1:8080", "127.0.0.2:9090", "127.0.0.3:7070"].map(addr);
    assert_eq!(eligible(&report, &tcp("127.0.0.10", 80)), expected);
}

#[test]
fn slice_without_ports_falls_back_to_integer_target_port_but_not_named() {
    let services = [
        simple_service("default", "web", "127.0.0.10", 80, 8080),
        ServiceBuilder::new("default", "named")
            .external_ips(["127.0.0.11"])
            .port("", 80, "", TargetPort::String("web".into()))
            .build(),
        ServiceBuilder::new("default", "bare").external_ips(["127.0.0.12"]).bare_port(81).build(),
    ];
    let slices = ["web", "named", "bare"].map(|s| {
        SliceBuilder::new("default", &format!("{s}-1"), s).endpoint("127.0.0.1", Cond::ready()).build()
    });
    let report = run(&services, &slices);
    assert_eq!(eligible(&report, &tcp("127.0.0.10", 80)), [addr("127.0.0.1:8080")]);
    assert_eq!(eligible(&report, &tcp("127.0.0.11", 80)), []);
    assert_eq!(
        eligible(&report, &tcp("127.0.0.12", 81)),
        [addr("127.0.0.1:81")],
        "targetPort defaults to port"
    );
}

#[test]
fn multi_port_service_with_udp_and_sctp_yields_one_entry_per_port() {
    let service = ServiceBuilder::new("default", "dns")
        .external_ips(["127.0.0.10", "::1", "127.0.0.10"])
        .port("dns-udp", 53, "UDP", TargetPort::Int(5353))
        .port("dns-tcp", 53, "TCP", TargetPort::Int(5353))
        .port("sig", 3868, "SCTP", TargetPort::Int(3868))
        .build();
    let v4 = SliceBuilder::new("default", "dns-v4", "dns")
        .port("dns-udp", 5353, "UDP")
        .port("dns-tcp", 5354, "TCP")
        .port("sig", 3868, "SCTP")
        .endpoint("127.0.0.1", Cond::ready())
        .build();
    let v6 = SliceBuilder::new("default", "dns-v6", "dns")
        .port("dns-udp", 5353, "UDP")
        .endpoint("::1", Cond::ready())
        .build();
    let report = run(&[service], &[v4, v6]);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.snapshot.len(), 6, "2 VIPs x 3 ports");
    let udp = key("::1", 53, Protocol::Udp);
    assert_eq!(eligible(&report, &udp), [addr("[::1]:5353")], "an IPv6 VIP gets only IPv6 endpoints");
    assert_eq!(eligible(&report, &key("127.0.0.10", 53, Protocol::Udp)), [addr("127.0.0.1:5353")]);
    assert_eq!(eligible(&report, &tcp("127.0.0.10", 53)), [addr("127.0.0.1:5354")]);
    assert!(eligible(&report, &tcp("::1", 53)).is_empty(), "no IPv6 endpoint serves TCP");
    assert_eq!(eligible(&report, &key("127.0.0.10", 3868, Protocol::Sctp)), [addr("127.0.0.1:3868")]);
    assert_eq!(report.snapshot.get(&udp).and_then(|e| e.port_name.clone()).as_deref(), Some("dns-udp"));
}

#[test]
fn a_dual_stack_service_has_one_entry_per_family_and_a_dual_stack_pod_counts_once_in_each() {
    let service = ServiceBuilder::new("default", "web")
        .service_type("LoadBalancer")
        .ingress_ips(["192.0.2.10", "2001:db8::10"])
        .port("http", 80, "TCP", TargetPort::Int(8080))
        .build();
    // Two pods with an address of each family, as the EndpointSlice controller writes them: one
    // slice per family.
    let v4 = SliceBuilder::new("default", "web-v4", "web")
        .port("http", 8080, "TCP")
        .endpoint("198.51.100.1", Cond::ready())
        .endpoint("198.51.100.2", Cond::ready())
        .build();
    let mut v6 = SliceBuilder::new("default", "web-v6", "web")
        .port("http", 8080, "TCP")
        .endpoint("2001:db8:1::1", Cond::ready())
        .endpoint("2001:db8:1::2", Cond::ready())
        .build();
    v6.address_type = "IPv6".to_owned();
    let report = run(&[service], &[v4, v6]);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.snapshot.len(), 2);
    let v4_entry = report.snapshot.get(&tcp("192.0.2.10", 80)).expect("IPv4 entry");
    let v6_entry = report.snapshot.get(&tcp("2001:db8::10", 80)).expect("IPv6 entry");
    assert_eq!(v4_entry.backends.len(), 2, "each pod once, not once per family");
    assert!(v4_entry.backends.iter().all(|b| b.addr().is_ipv4()), "{:?}", v4_entry.backends);
    assert_eq!(v6_entry.backends.len(), 2);
    assert!(v6_entry.backends.iter().all(|b| b.addr().is_ipv6()), "{:?}", v6_entry.backends);
}

#[test]
fn load_balancer_vips_prefer_status_then_annotation_then_spec() {
    let lb = |name: &str| {
        ServiceBuilder::new("default", name)
            .service_type("LoadBalancer")
            .port("", 80, "", TargetPort::Int(80))
            .load_balancer_ip("127.0.0.30")
    };
    let services = [
        lb("status")
            .ingress_ips(["127.0.0.10"])
            .annotation(crate::annotations::METALLB_LOAD_BALANCER_IPS, "127.0.0.20"),
        lb("annotation").annotation(crate::annotations::METALLB_LOAD_BALANCER_IPS, "127.0.0.21, ::21"),
        lb("spec"),
        ServiceBuilder::new("default", "cluster").load_balancer_ip("127.0.0.40").bare_port(80),
    ]
    .map(ServiceBuilder::build);
    let report = run(&services, &[]);
    assert!(report.is_clean(), "{report}");
    let served: Vec<(String, IpAddr)> =
        report.snapshot.entries().map(|e| (e.service.name.clone(), e.key.addr)).collect();
    let expected = [
        ("status", "127.0.0.10"),
        ("annotation", "127.0.0.21"),
        ("spec", "127.0.0.30"),
        ("annotation", "::21"),
    ]
    .map(|(n, a)| (n.to_owned(), a.parse().expect("ip")));
    assert_eq!(served, expected);
    assert!(
        report.skipped.is_empty(),
        "a ClusterIP service's loadBalancerIP is no VIP, nor ringlb's concern: {report}"
    );
}

#[test]
fn headless_external_name_and_vip_less_services_are_skipped_with_reasons() {
    let services = [
        ServiceBuilder::new("default", "headless")
            .cluster_ip("None")
            .external_ips(["127.0.0.1"])
            .bare_port(80),
        ServiceBuilder::new("default", "ext").external_name("example.org").bare_port(80),
        ServiceBuilder::new("default", "plain").bare_port(80),
        ServiceBuilder::new("default", "nodeport").service_type("NodePort").bare_port(80),
        ServiceBuilder::new("default", "lb-pending").service_type("LoadBalancer").bare_port(80),
    ]
    .map(ServiceBuilder::build);
    let report = run(&services, &[]);
    assert!(report.is_clean() && report.snapshot.is_empty(), "{report}");
    let reasons: BTreeMap<_, _> =
        report.skipped.iter().map(|s| (s.service.name.as_str(), s.reason.as_str())).collect();
    assert!(reasons["headless"].contains("headless"));
    assert!(reasons["ext"].contains("ExternalName"));
    for name in ["plain", "nodeport"] {
        assert!(!reasons.contains_key(name), "{name}: no address ringlb could serve, so not listed");
    }
    assert!(reasons["lb-pending"].contains("no VIP"), "{}", reasons["lb-pending"]);
    assert!(report.skipped[0].to_string().contains("not served"));
}

#[test]
fn services_of_another_class_are_skipped_and_a_cluster_serves_only_allocated_ips() {
    let lb = |name: &str| ServiceBuilder::new("default", name).service_type("LoadBalancer");
    let requested = |name: &str, ip: &str| {
        lb(name).annotation(crate::annotations::METALLB_LOAD_BALANCER_IPS, ip).bare_port(80)
    };
    let services = [
        requested("ours", "127.0.0.30").load_balancer_class(crate::selection::DEFAULT_CLASS).build(),
        requested("other", "127.0.0.33")
            .load_balancer_class("other.io/lb")
            .external_ips(["127.0.0.31"])
            .build(),
        requested("classless", "127.0.0.34").build(),
        lb("allocated")
            .load_balancer_class(crate::selection::DEFAULT_CLASS)
            .ingress_ips(["127.0.0.32"])
            .bare_port(80)
            .build(),
    ];
    let standalone = run(&services, &[]);
    let served: BTreeSet<&str> = standalone.snapshot.entries().map(|e| e.service.name.as_str()).collect();
    assert_eq!(served, BTreeSet::from(["ours", "classless", "allocated"]), "{standalone}");
    let cluster = BuildOptions {
        selection: crate::ServiceSelection {
            default_class: false,
            vips: crate::VipSource::Allocated,
            ..Default::default()
        },
        ..BuildOptions::default()
    };
    let report = build(&services, &[], &[], &cluster, None, 1);
    let served: BTreeSet<&str> = report.snapshot.entries().map(|e| e.service.name.as_str()).collect();
    assert_eq!(served, BTreeSet::from(["allocated"]), "only the allocated IP is served: {report}");
    let reasons: BTreeMap<_, _> =
        report.skipped.iter().map(|s| (s.service.name.as_str(), s.reason.as_str())).collect();
    assert!(reasons["other"].contains("another implementation"), "{report}");
    assert!(reasons["classless"].contains("not the default class"), "{report}");
    assert!(
        reasons["ours"].contains("no VIP"),
        "a requested IP is not served before it is allocated: {report}"
    );
}

#[test]
fn endpoint_in_two_slices_counts_once_and_ready_copy_wins() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let slices = [
        ready_slice("default", "web-a", "web", 8080, &["127.0.0.1", "127.0.0.2"]),
        SliceBuilder::new("default", "web-b", "web")
            .port("", 8080, "TCP")
            .endpoint("127.0.0.1", Cond::not_ready())
            .endpoint("127.0.0.2", Cond::ready())
            .build(),
    ];
    for order in [[0, 1], [1, 0]] {
        let report = run(std::slice::from_ref(&service), &order.map(|i| slices[i].clone()));
        let entry = report.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry");
        assert_eq!(entry.backends.len(), 2);
        assert_eq!(entry.eligible, [0, 1], "the ready copy of 127.0.0.1 wins");
    }
}

#[test]
fn copies_of_one_slice_collapse_when_equal_and_are_all_rejected_when_they_differ() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let slice = ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"]);
    let mut relabelled = slice.clone();
    relabelled.metadata.labels.get_or_insert_default().insert("app".into(), "web".into());
    let moved = ready_slice("default", "web-1", "web", 8080, &["127.0.0.2"]);
    let later = ready_slice("default", "web-2", "web", 8080, &["127.0.0.3"]);
    let mut names = SliceNames::default();
    let mut parse = |slice: &EndpointSlice| ParsedEndpointSlice::parse(slice, &mut names).expect("named");
    let (later_parsed, slice_parsed) = (parse(&later), parse(&slice));
    let (relabelled_parsed, moved_parsed) = (parse(&relabelled), parse(&moved));
    let web = tcp("127.0.0.10", 80);
    let compact = CompactService::from(&service);
    let incremental = |slices: &[&ParsedEndpointSlice]| {
        let services = [Revised { object: &compact, revision: 1 }];
        let revised: Vec<_> = slices
            .iter()
            .enumerate()
            .map(|(i, &object)| Revised { object, revision: i as u64 + 2 })
            .collect();
        let options = BuildOptions::default();
        build_incremental(&services, &revised, &[], &options, None, 1, &mut BuildCache::new())
    };

    // Copies that differ only in what no build reads (a label) are one slice.
    let report = run(std::slice::from_ref(&service), &[later.clone(), slice.clone(), relabelled]);
    assert!(report.is_clean(), "{report}");
    assert_eq!(eligible(&report, &web), [addr("127.0.0.1:8080"), addr("127.0.0.3:8080")]);
    let report = incremental(&[&later_parsed, &slice_parsed, &relabelled_parsed]);
    assert!(report.is_clean(), "{report}");
    assert_eq!(eligible(&report, &web), [addr("127.0.0.1:8080"), addr("127.0.0.3:8080")]);

    // Copies that differ in an endpoint: neither can be chosen without an order, both are refused.
    let duplicate = BuildError::DuplicateObject { object: ObjectRef::endpoint_slice("default", "web-1") };
    let report = run(std::slice::from_ref(&service), &[moved.clone(), later.clone(), slice.clone()]);
    assert_eq!(report.errors, std::slice::from_ref(&duplicate));
    assert_eq!(eligible(&report, &web), [addr("127.0.0.3:8080")]);
    let report = incremental(&[&moved_parsed, &later_parsed, &slice_parsed]);
    assert_eq!(report.errors, [duplicate]);
    assert_eq!(eligible(&report, &web), [addr("127.0.0.3:8080")]);
}

#[test]
fn slices_parsed_with_one_table_share_node_names_until_no_slice_holds_them() {
    let on = |name: &str, node: &str| {
        SliceBuilder::new("default", name, "web").port("", 8080, "TCP").pod_endpoint(
            "127.0.0.1",
            Cond::ready(),
            node,
            name,
        )
    };
    let mut names = SliceNames::default();
    let a = ParsedEndpointSlice::parse(&on("web-a", "node-a").build(), &mut names).expect("named");
    let b = ParsedEndpointSlice::parse(&on("web-b", "node-a").build(), &mut names).expect("named");
    let c = ParsedEndpointSlice::parse(&on("web-c", "node-c").build(), &mut names).expect("named");
    assert_eq!(names.len(), 2, "node-a once for two slices, node-c");
    drop((a, c));
    names.prune();
    assert_eq!(names.len(), 1, "node-a is still held by web-b");
    drop(b);
    names.prune();
    assert!(names.is_empty());
}

#[test]
fn bad_fields_reject_the_service_and_name_the_field() {
    let cases: [(Service, &str); 6] = [
        (
            ServiceBuilder::new("default", "a").external_ips(["127.0.0.300"]).bare_port(80).build(),
            "spec.externalIPs[0]",
        ),
        (
            ServiceBuilder::new("default", "b").external_ips(["127.0.0.1"]).bare_port(0).build(),
            "spec.ports[0].port",
        ),
        (
            ServiceBuilder::new("default", "c")
                .external_ips(["127.0.0.1"])
                .port("", 80, "QUIC", TargetPort::Int(1))
                .build(),
            "spec.ports[0].protocol",
        ),
        (
            ServiceBuilder::new("default", "d")
                .external_ips(["127.0.0.1"])
                .port("", 80, "", TargetPort::Int(70000))
                .build(),
            "spec.ports[0].targetPort",
        ),
        (
            ServiceBuilder::new("default", "e")
                .external_ips(["127.0.0.1"])
                .bare_port(80)
                .annotation(crate::annotations::CONNECT_TIMEOUT, "soon")
                .build(),
            "ringlb.io/connect-timeout",
        ),
        (
            ServiceBuilder::new("default", "").external_ips(["127.0.0.1"]).bare_port(80).build(),
            "metadata.name",
        ),
    ];
    for (service, field) in cases {
        let report = run(std::slice::from_ref(&service), &[]);
        assert!(report.snapshot.is_empty(), "{report}");
        assert_eq!(report.errors.len(), 1, "{report}");
        assert!(report.errors[0].field().contains(field), "{} should name {field}", report.errors[0]);
    }
}

#[test]
fn errors_and_skips_read_well_in_a_log() {
    let services = [
        ServiceBuilder::new("shop", "web").external_ips(["127.0.0.1"]).bare_port(80).bare_port(0).build(),
        ServiceBuilder::new("shop", "db").external_name("db.example.org").build(),
    ];
    let report = run(&services, &[]);
    let lines: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert!(
        lines.contains(
            &"Service shop/web: field spec.ports[1].port: invalid port 0 (must be 1..=65535)".to_owned()
        ),
        "{lines:?}"
    );
    assert_eq!(
        report.skipped[0].to_string(),
        "Service shop/db: not served: type ExternalName has no endpoints to balance"
    );
    let json = serde_json::to_value(&report).expect("report serialises");
    assert_eq!(json["errors"][0]["object"]["name"], "web");
    assert_eq!(json["errors"][0]["kind"], "invalid-field", "unnamed ports in a multi-port Service: {json}");
}

#[test]
fn conflicting_vip_goes_to_the_older_service_then_to_name_order() {
    let service = |name: &str, created: Option<i64>| {
        let b = ServiceBuilder::new("default", name).external_ips(["127.0.0.10"]).bare_port(80);
        match created {
            Some(t) => b.created_at(t),
            None => b,
        }
        .build()
    };
    let report = run(&[service("b", Some(100)), service("a", Some(200)), service("0", None)], &[]);
    let owner = &report.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry").service;
    assert_eq!(owner.name, "b");
    assert_eq!(report.errors.len(), 2, "{report}");
    for error in &report.errors {
        assert!(matches!(error, BuildError::ConflictingVip { owner, .. } if owner.name == "b"), "{error}");
    }
    let report = run(&[service("b", None), service("a", None)], &[]);
    assert_eq!(report.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry").service.name, "a");
}

#[test]
fn previous_owner_keeps_a_conflicting_vip() {
    let young =
        ServiceBuilder::new("default", "young").external_ips(["127.0.0.10"]).bare_port(80).created_at(200);
    let old =
        ServiceBuilder::new("default", "old").external_ips(["127.0.0.10"]).bare_port(80).created_at(100);
    let first = run(&[young.clone().build()], &[]);
    let second =
        build(&[old.build(), young.build()], &[], &[], &BuildOptions::default(), Some(&first.snapshot), 2);
    assert_eq!(second.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry").service.name, "young");
    assert!(
        matches!(&second.errors[..], [BuildError::ConflictingVip { object, .. }] if object.name == "old")
    );
}

#[test]
fn rejected_service_keeps_its_last_good_policy_and_follows_its_current_endpoints() {
    use crate::annotations::{CONNECT_TIMEOUT, SCHEDULER};
    let good = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let good =
        ServiceBuilder::from(good).annotation(SCHEDULER, "maglev").annotation(CONNECT_TIMEOUT, "2s").build();
    let before = [ready_slice("default", "web-1", "web", 8080, &["192.0.2.1", "192.0.2.2"])];
    let first = run(std::slice::from_ref(&good), &before);
    assert!(first.is_clean(), "{first}");
    // A bad edit (an invalid scheduler), then the pods roll to new addresses.
    let broken = ServiceBuilder::from(good.clone()).annotation(SCHEDULER, "fastest").build();
    let after = [ready_slice("default", "web-1", "web", 8080, &["192.0.2.7", "192.0.2.8"])];
    let options = BuildOptions::default();
    let second = build(std::slice::from_ref(&broken), &after, &[], &options, Some(&first.snapshot), 2);
    assert_eq!(second.kept_previous, [ObjectRef::service("default", "web")]);
    assert_eq!(second.errors.len(), 1, "{second}");
    let key = tcp("127.0.0.10", 80);
    assert_eq!(eligible(&second, &key), [addr("192.0.2.7:8080"), addr("192.0.2.8:8080")], "current pods");
    let kept = second.snapshot.get(&key).expect("kept entry");
    assert_eq!(kept.scheduler.kind(), SchedulerKind::Maglev, "the last good policy");
    assert_eq!(kept.policy.connect_timeout, std::time::Duration::from_secs(2));
    assert!(second.to_string().contains("kept the last good spec"), "{second}");

    // Still broken in the next build, and the pods roll again: the last good spec is kept on.
    let again = [ready_slice("default", "web-1", "web", 8080, &["192.0.2.9"])];
    let third = build(std::slice::from_ref(&broken), &again, &[], &options, Some(&second.snapshot), 3);
    assert_eq!(eligible(&third, &key), [addr("192.0.2.9:8080")]);
    assert_eq!(third.snapshot.get(&key).expect("entry").scheduler.kind(), SchedulerKind::Maglev);

    // A deleted Service is not carried over, rejected or not.
    let gone = build(&[], &again, &[], &options, Some(&third.snapshot), 4);
    assert!(gone.snapshot.is_empty() && gone.kept_previous.is_empty(), "{gone}");
}

#[test]
fn a_service_rejected_from_its_first_sight_is_not_served() {
    let broken = ServiceBuilder::new("default", "web").external_ips(["127.0.0.10"]).bare_port(99999).build();
    let slices = [ready_slice("default", "web-1", "web", 8080, &["192.0.2.1"])];
    let report = build(&[broken], &slices, &[], &BuildOptions::default(), Some(&Snapshot::empty()), 2);
    assert!(report.snapshot.is_empty() && report.kept_previous.is_empty(), "{report}");
}

#[test]
fn bad_endpoint_is_rejected_and_the_rest_of_the_slice_counts() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let slice = SliceBuilder::new("default", "web-1", "web")
        .port("", 8080, "TCP")
        .endpoint("127.0.0.1", Cond::ready())
        .endpoint("not-an-ip", Cond::ready())
        .endpoint("::1", Cond::ready())
        .address_type("IPv4")
        .build();
    let report = run(&[service], &[slice]);
    assert_eq!(eligible(&report, &tcp("127.0.0.10", 80)), [addr("127.0.0.1:8080")]);
    let fields: Vec<_> = report.errors.iter().map(|e| (e.object().name.clone(), e.field())).collect();
    assert_eq!(
        fields,
        [
            ("web-1".to_owned(), "endpoints[1].addresses[0]".to_owned()),
            ("web-1".into(), "endpoints[2].addresses[0]".into())
        ]
    );
}

#[test]
fn fqdn_slices_are_skipped() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let slice = SliceBuilder::new("default", "web-1", "web")
        .address_type("FQDN")
        .endpoint("example.org", Cond::ready());
    let report = run(&[service], &[slice.build()]);
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].service, ObjectRef::endpoint_slice("default", "web-1"));
}

#[test]
fn weights_come_from_the_service_annotation_then_the_slice() {
    let service = ServiceBuilder::new("default", "web")
        .external_ips(["127.0.0.10"])
        .bare_port(80)
        .annotation(crate::annotations::SCHEDULER, "wrr")
        .annotation(crate::annotations::BACKEND_WEIGHTS, "127.0.0.1=5")
        .annotation(crate::annotations::CONNECT_ATTEMPTS, "2")
        .build();
    let slice = SliceBuilder::new("default", "web-1", "web")
        .annotation(crate::annotations::WEIGHT, "3")
        .endpoint("127.0.0.1", Cond::ready())
        .endpoint("127.0.0.2", Cond::ready())
        .build();
    let report = run(&[service], &[slice]);
    let entry = report.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry");
    assert_eq!(entry.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [5, 3]);
    assert_eq!(entry.scheduler.kind(), SchedulerKind::WeightedRoundRobin);
    assert_eq!(entry.policy.connect_attempts, 2);
}

#[test]
fn invalid_slice_weight_is_reported_and_the_slice_keeps_weight_one() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let slice = SliceBuilder::new("default", "web-1", "web")
        .annotation(crate::annotations::WEIGHT, "heavy")
        .endpoint("127.0.0.1", Cond::ready())
        .build();
    let report = run(&[service], &[slice]);
    assert!(
        matches!(&report.errors[..], [BuildError::InvalidAnnotation { annotation, .. }] if *annotation == crate::annotations::WEIGHT)
    );
    let entry = report.snapshot.get(&tcp("127.0.0.10", 80)).expect("entry");
    assert_eq!(entry.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [1]);
}

#[test]
fn invalid_metallb_annotation_rejects_the_service_and_mapped_ipv6_vips_collapse() {
    let lb = |name: &str, ips: &str| {
        ServiceBuilder::new("default", name)
            .service_type("LoadBalancer")
            .annotation(crate::annotations::METALLB_LOAD_BALANCER_IPS, ips)
            .bare_port(80)
            .build()
    };
    let report = run(&[lb("bad", "127.0.0.1,nope"), lb("mapped", "127.0.0.2, ::ffff:127.0.0.2")], &[]);
    let keys: Vec<_> = report.snapshot.keys().copied().collect();
    assert_eq!(keys, [tcp("127.0.0.2", 80)]);
    assert!(
        matches!(&report.errors[..], [BuildError::InvalidAnnotation { object, value, .. }] if object.name == "bad" && value == "nope"),
        "{report}"
    );
}

#[test]
fn successive_builds_give_a_backend_the_same_load_counter() {
    let service = simple_service("default", "web", "127.0.0.10", 80, 8080);
    let options = BuildOptions::default();
    let before = [ready_slice("default", "web-1", "web", 8080, &["192.0.2.1"])];
    let first = build(std::slice::from_ref(&service), &before, &[], &options, None, 1);
    let after = [ready_slice("default", "web-1", "web", 8080, &["192.0.2.1", "192.0.2.2"])];
    let second = build(std::slice::from_ref(&service), &after, &[], &options, Some(&first.snapshot), 2);
    let key = tcp("127.0.0.10", 80);
    let (old, new) = (first.snapshot.get(&key).expect("entry"), second.snapshot.get(&key).expect("entry"));
    old.backends[0].load.open();
    assert!(new.backends[0].load.same_as(&old.backends[0].load), "connections survive the swap");
    assert_eq!(new.backends[0].load.active(), 1);
    assert_eq!(new.backends[1].load.active(), 0);
    assert_eq!(options.load.len(), 2);
}

#[test]
fn proxy_protocol_reaches_the_entries_it_has_a_header_for_and_v1_beside_udp_keeps_the_last_good() {
    use crate::annotations::PROXY_PROTOCOL;
    use crate::proxy_protocol::ProxyProtocol;
    let dns = |annotation: Option<&str>| {
        let service = ServiceBuilder::new("default", "dns")
            .external_ips(["127.0.0.10"])
            .port("dns-udp", 53, "UDP", TargetPort::Int(5353))
            .port("dns-tcp", 53, "TCP", TargetPort::Int(5353));
        match annotation {
            Some(value) => service.annotation(PROXY_PROTOCOL, value).build(),
            None => service.build(),
        }
    };
    let slices = [SliceBuilder::new("default", "dns-1", "dns")
        .port("dns-udp", 5353, "UDP")
        .port("dns-tcp", 5353, "TCP")
        .endpoint("127.0.0.1", Cond::ready())
        .build()];
    let (udp, tcp53) = (key("127.0.0.10", 53, Protocol::Udp), tcp("127.0.0.10", 53));
    let versions = |report: &BuildReport| {
        let of = |key: &VipKey| report.snapshot.get(key).map(|e| e.policy.proxy_protocol);
        (of(&tcp53), of(&udp))
    };

    // A global v1 applies where v1 has a header: the TCP port only.
    let global_v1 = BuildOptions {
        default_policy: EntryPolicy { proxy_protocol: ProxyProtocol::V1, ..EntryPolicy::default() },
        ..BuildOptions::default()
    };
    let report = build(&[dns(None)], &slices, &[], &global_v1, None, 1);
    assert!(report.is_clean(), "{report}");
    assert_eq!(versions(&report), (Some(ProxyProtocol::V1), Some(ProxyProtocol::None)));
    // `none` on the Service overrides the global default.
    let report = build(&[dns(Some("none"))], &slices, &[], &global_v1, None, 1);
    assert_eq!(versions(&report), (Some(ProxyProtocol::None), Some(ProxyProtocol::None)));

    let first = run(&[dns(Some("v2"))], &slices);
    assert!(first.is_clean(), "{first}");
    assert_eq!(versions(&first), (Some(ProxyProtocol::V2), Some(ProxyProtocol::V2)));

    // v1 on a Service with a UDP port is refused: the Service keeps v2, its last good policy.
    let options = BuildOptions::default();
    let second = build(&[dns(Some("v1"))], &slices, &[], &options, Some(&first.snapshot), 2);
    assert_eq!(second.errors.len(), 1, "{second}");
    assert!(second.errors[0].to_string().contains(PROXY_PROTOCOL), "{second}");
    assert_eq!(second.kept_previous, [ObjectRef::service("default", "dns")]);
    assert_eq!(versions(&second), (Some(ProxyProtocol::V2), Some(ProxyProtocol::V2)));
}

#[test]
fn transparent_reaches_tcp_and_udp_entries_and_true_beside_sctp_keeps_the_last_good() {
    use crate::annotations::TRANSPARENT;
    let service = |annotation: Option<&str>, sctp: bool| {
        let mut service = ServiceBuilder::new("default", "sip")
            .external_ips(["127.0.0.10"])
            .port("sip-udp", 5060, "UDP", TargetPort::Int(5060))
            .port("sip-tcp", 5060, "TCP", TargetPort::Int(5060));
        if sctp {
            service = service.port("sip-sctp", 5060, "SCTP", TargetPort::Int(5060));
        }
        match annotation {
            Some(value) => service.annotation(TRANSPARENT, value).build(),
            None => service.build(),
        }
    };
    let slices = [SliceBuilder::new("default", "sip-1", "sip")
        .port("sip-udp", 5060, "UDP")
        .port("sip-tcp", 5060, "TCP")
        .port("sip-sctp", 5060, "SCTP")
        .endpoint("127.0.0.1", Cond::ready())
        .build()];
    let keys = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|p| key("127.0.0.10", 5060, p));
    let transparent =
        |report: &BuildReport| keys.map(|k| report.snapshot.get(&k).map(|e| e.policy.transparent));

    // The global flag applies to the ports that can be transparent: not to SCTP, and not refused.
    let global = BuildOptions {
        default_policy: EntryPolicy { transparent: true, ..EntryPolicy::default() },
        ..BuildOptions::default()
    };
    let report = build(&[service(None, true)], &slices, &[], &global, None, 1);
    assert!(report.is_clean(), "{report}");
    assert_eq!(transparent(&report), [Some(true), Some(true), Some(false)]);
    let report = build(&[service(Some("false"), true)], &slices, &[], &global, None, 1);
    assert_eq!(transparent(&report), [Some(false), Some(false), Some(false)], "the annotation wins");

    let first = run(&[service(Some("true"), false)], &slices);
    assert!(first.is_clean(), "{first}");
    assert_eq!(transparent(&first), [Some(true), Some(true), None]);

    // An SCTP port added beside `true` is refused: the Service keeps its last good spec.
    let options = BuildOptions::default();
    let second = build(&[service(Some("true"), true)], &slices, &[], &options, Some(&first.snapshot), 2);
    assert_eq!(second.errors.len(), 1, "{second}");
    assert!(second.errors[0].to_string().contains(TRANSPARENT), "{second}");
    assert_eq!(second.kept_previous, [ObjectRef::service("default", "sip")]);
    assert_eq!(transparent(&second), [Some(true), Some(true), None]);
    // So does a value that is no boolean.
    let third = build(&[service(Some("yes"), false)], &slices, &[], &options, Some(&first.snapshot), 3);
    assert_eq!(third.errors.len(), 1, "{third}");
    assert_eq!(transparent(&third), [Some(true), Some(true), None]);
}
