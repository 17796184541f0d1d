//! Builder behaviour of issue 5's selection inputs: serving+terminating fallback,
//! `externalTrafficPolicy: Local`, source ranges, session affinity, health annotations and the health
//! overlay.

use std::net::SocketAddr;
use std::time::Duration;

use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort, ready_slice, simple_service};

use super::*;
use crate::annotations;
use crate::health::{HealthCheckConfig, ProbeKind};
use crate::model::{BackendId, Protocol};
use crate::scheduler::HashKey;

fn web_key() -> VipKey {
    VipKey::new("127.0.0.10".parse().expect("vip"), 80, Protocol::Tcp)
}

fn web() -> ServiceBuilder {
    ServiceBuilder::new("default", "web").external_ips(["127.0.0.10"]).port(
        "",
        80,
        "TCP",
        TargetPort::Int(8080),
    )
}

fn run_with(services: &[Service], slices: &[EndpointSlice], options: &BuildOptions) -> BuildReport {
    build(services, slices, &[], options, None, 1)
}

fn eligible(report: &BuildReport) -> Vec<SocketAddr> {
    let entry = report.snapshot.get(&web_key()).unwrap_or_else(|| panic!("no web entry: {report}"));
    entry.eligible.iter().filter_map(|&i| entry.backend(i)).map(|b| b.addr()).collect()
}

fn addrs(last_octets: &[u8]) -> Vec<SocketAddr> {
    last_octets.iter().map(|&i| SocketAddr::from(([127, 0, 0, i], 8080))).collect()
}

fn slice(endpoints: &[(&str, Cond)]) -> EndpointSlice {
    endpoints
        .iter()
        .fold(SliceBuilder::new("default", "web-1", "web").port("", 8080, "TCP"), |b, (a, c)| {
            b.endpoint(a, *c)
        })
        .build()
}

#[test]
fn no_ready_endpoint_falls_back_to_serving_terminating_ones() {
    let stopping = Cond { ready: Some(false), serving: Some(false), terminating: Some(true) };
    let slices = [slice(&[
        ("127.0.0.1", Cond::terminating()),
        ("127.0.0.2", Cond::not_ready()),
        ("127.0.0.3", stopping),
        ("127.0.0.4", Cond::terminating()),
    ])];
    let report = run_with(&[web().build()], &slices, &BuildOptions::default());
    assert!(report.is_clean(), "{report}");
    assert_eq!(eligible(&report), addrs(&[1, 4]), "serving+terminating only, not stopped or not ready");
}

#[test]
fn ready_endpoints_win_over_serving_terminating_ones() {
    let slices = [slice(&[("127.0.0.1", Cond::terminating()), ("127.0.0.2", Cond::ready())])];
    let report = run_with(&[web().build()], &slices, &BuildOptions::default());
    assert_eq!(eligible(&report), addrs(&[2]));
}

#[test]
fn nothing_ready_or_serving_leaves_the_entry_without_eligible_backends() {
    let slices = [slice(&[("127.0.0.1", Cond::not_ready())])];
    let report = run_with(&[web().build()], &slices, &BuildOptions::default());
    assert!(eligible(&report).is_empty());
    assert_eq!(report.snapshot.get(&web_key()).map(|e| e.backends.len()), Some(1), "kept for display");
}

fn node_slice() -> EndpointSlice {
    SliceBuilder::new("default", "web-1", "web")
        .port("", 8080, "TCP")
        .pod_endpoint("127.0.0.1", Cond::ready(), "node-a", "web-1")
        .pod_endpoint("127.0.0.2", Cond::ready(), "node-b", "web-2")
        .pod_endpoint("127.0.0.3", Cond::terminating(), "node-a", "web-3")
        .endpoint("127.0.0.4", Cond::ready())
        .build()
}

#[test]
fn local_traffic_policy_keeps_only_this_nodes_endpoints() {
    let service = web().external_traffic_policy("Local").build();
    let on_a = BuildOptions { node_name: Some("node-a".to_owned()), ..BuildOptions::default() };
    let report = run_with(std::slice::from_ref(&service), &[node_slice()], &on_a);
    assert!(report.is_clean(), "{report}");
    assert_eq!(eligible(&report), addrs(&[1]));
    assert!(report.snapshot.get(&web_key()).is_some_and(|e| e.traffic.node_local));

    let on_c = BuildOptions { node_name: Some("node-c".to_owned()), ..BuildOptions::default() };
    assert!(eligible(&run_with(std::slice::from_ref(&service), &[node_slice()], &on_c)).is_empty());
}

#[test]
fn local_traffic_policy_falls_back_to_this_nodes_terminating_endpoints() {
    let service = web().external_traffic_policy("Local").build();
    let slices = [SliceBuilder::new("default", "web-1", "web")
        .port("", 8080, "TCP")
        .pod_endpoint("127.0.0.2", Cond::ready(), "node-b", "web-2")
        .pod_endpoint("127.0.0.3", Cond::terminating(), "node-a", "web-3")
        .build()];
    let on_a = BuildOptions { node_name: Some("node-a".to_owned()), ..BuildOptions::default() };
    assert_eq!(eligible(&run_with(&[service], &slices, &on_a)), addrs(&[3]));
}

#[test]
fn appliance_mode_and_cluster_policy_ignore_nodes() {
    let local = web().external_traffic_policy("Local").build();
    let report = run_with(std::slice::from_ref(&local), &[node_slice()], &BuildOptions::default());
    assert_eq!(eligible(&report), addrs(&[1, 2, 4]), "no node name: the policy is ignored");
    assert!(report.snapshot.get(&web_key()).is_some_and(|e| !e.traffic.node_local));

    let cluster = web().external_traffic_policy("Cluster").build();
    let on_a = BuildOptions { node_name: Some("node-a".to_owned()), ..BuildOptions::default() };
    assert_eq!(eligible(&run_with(&[cluster], &[node_slice()], &on_a)), addrs(&[1, 2, 4]));
}

/// `web` as a LoadBalancer Service whose load-balancer IP is the VIP of [`web_key`].
fn balanced_web() -> ServiceBuilder {
    ServiceBuilder::new("default", "web").service_type("LoadBalancer").ingress_ips(["127.0.0.10"]).port(
        "",
        80,
        "TCP",
        TargetPort::Int(8080),
    )
}

#[test]
fn source_ranges_are_parsed_into_the_entry() {
    let service = balanced_web().source_ranges(["10.0.0.0/8", "2001:db8::/32", " 192.0.2.7/32"]).build();
    let report = run_with(
        &[service],
        &[ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"])],
        &BuildOptions::default(),
    );
    assert!(report.is_clean(), "{report}");
    let entry = report.snapshot.get(&web_key()).expect("entry");
    let ranges: Vec<String> = entry.traffic.source_ranges.iter().map(ToString::to_string).collect();
    assert_eq!(ranges, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    assert!(entry.allows("10.1.2.3".parse().expect("ip")));
    assert!(entry.allows("2001:db8::5".parse().expect("ip")));
    assert!(!entry.allows("192.0.2.8".parse().expect("ip")));
    assert!(!entry.allows("::1".parse().expect("ip")));
}

#[test]
fn no_source_ranges_allow_everyone_and_the_annotation_is_the_fallback() {
    let slices = [ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"])];
    let report = run_with(&[web().build()], &slices, &BuildOptions::default());
    assert!(report.snapshot.get(&web_key()).is_some_and(|e| e.allows("203.0.113.9".parse().expect("ip"))));

    let annotated = balanced_web()
        .annotation(annotations::LOAD_BALANCER_SOURCE_RANGES, "10.0.0.0/8, 172.16.0.0/12")
        .build();
    let report = run_with(&[annotated], &slices, &BuildOptions::default());
    let entry = report.snapshot.get(&web_key()).expect("entry");
    assert_eq!(entry.traffic.source_ranges.len(), 2);
    assert!(!entry.allows("203.0.113.9".parse().expect("ip")));
}

#[test]
fn source_ranges_guard_the_load_balancer_ips_and_never_the_external_ips() {
    let slices = [ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"])];
    let outsider: std::net::IpAddr = "203.0.113.9".parse().expect("ip");
    for ranged in [
        balanced_web().external_ips(["127.0.0.20"]).source_ranges(["10.0.0.0/8"]),
        balanced_web()
            .external_ips(["127.0.0.20"])
            .annotation(annotations::LOAD_BALANCER_SOURCE_RANGES, "10.0.0.0/8"),
    ] {
        let report = run_with(&[ranged.build()], &slices, &BuildOptions::default());
        assert!(report.is_clean(), "{report}");
        let balanced = report.snapshot.get(&web_key()).expect("load-balancer entry");
        assert!(!balanced.allows(outsider), "the load-balancer IP is guarded");
        let external = VipKey::new("127.0.0.20".parse().expect("vip"), 80, Protocol::Tcp);
        let external = report.snapshot.get(&external).expect("external IP entry");
        assert!(
            external.traffic.source_ranges.is_empty() && external.allows(outsider),
            "externalIPs are not"
        );
        assert!(!external.needs_client_address());
    }
    // An address that is both an external IP and the load-balancer IP is guarded.
    let both = balanced_web().external_ips(["127.0.0.10"]).source_ranges(["10.0.0.0/8"]).build();
    let report = run_with(&[both], &slices, &BuildOptions::default());
    assert!(!report.snapshot.get(&web_key()).expect("entry").allows(outsider));
}

#[test]
fn an_invalid_source_range_rejects_the_service_naming_its_index() {
    let service = web().source_ranges(["10.0.0.0/8", "10.0.0.0/33"]).build();
    let report = run_with(&[service], &[], &BuildOptions::default());
    assert!(report.snapshot.get(&web_key()).is_none(), "{report}");
    assert_eq!(report.errors.len(), 1, "{report}");
    assert_eq!(report.errors[0].field(), "spec.loadBalancerSourceRanges[1]");
    assert_eq!(report.errors[0].object(), &ObjectRef::service("default", "web"));
}

#[test]
fn client_ip_affinity_is_parsed_with_kubernetes_default_timeout() {
    let slices = [ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"])];
    let affinity = |service: ServiceBuilder| {
        let report = run_with(&[service.build()], &slices, &BuildOptions::default());
        assert!(report.is_clean(), "{report}");
        report.snapshot.get(&web_key()).and_then(|e| e.traffic.session_affinity)
    };
    assert_eq!(affinity(web()), None);
    assert_eq!(affinity(web().session_affinity("None", None)), None);
    assert_eq!(affinity(web().session_affinity("ClientIP", None)), Some(Duration::from_secs(10_800)));
    assert_eq!(affinity(web().session_affinity("ClientIP", Some(60))), Some(Duration::from_secs(60)));
}

#[test]
fn invalid_affinity_or_traffic_policy_rejects_the_service() {
    for (service, field) in [
        (web().session_affinity("ClientIP", Some(0)), "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
        (
            web().session_affinity("ClientIP", Some(86_401)),
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        ),
        (web().session_affinity("Cookie", None), "spec.sessionAffinity"),
        (web().external_traffic_policy("Nearest"), "spec.externalTrafficPolicy"),
    ] {
        let report = run_with(&[service.build()], &[], &BuildOptions::default());
        assert_eq!(report.errors.iter().map(|e| e.field()).collect::<Vec<_>>(), [field], "{report}");
        assert!(report.snapshot.is_empty());
    }
}

#[test]
fn scheduler_and_health_annotations_reach_the_entry() {
    let service = web()
        .annotation(annotations::SCHEDULER, "maglev")
        .annotation(annotations::MAGLEV_TABLE_SIZE, "251")
        .annotation(annotations::HASH_KEY, "ip-port")
        .annotation(annotations::HEALTH_CHECK, "http:/ready")
        .annotation(annotations::HEALTH_FALL, "2")
        .annotation(annotations::MAX_EJECTION_PERCENT, "30")
        .build();
    let slices = [ready_slice("default", "web-1", "web", 8080, &["127.0.0.1", "127.0.0.2"])];
    let report = run_with(&[service], &slices, &BuildOptions::default());
    assert!(report.is_clean(), "{report}");
    let entry = report.snapshot.get(&web_key()).expect("entry");
    let crate::scheduler::Scheduler::Maglev(maglev) = &entry.scheduler else {
        panic!("not maglev: {:?}", entry.scheduler.kind());
    };
    assert_eq!((maglev.table_size, maglev.hash_key, maglev.table().len()), (251, HashKey::IpPort, 251));
    let check = HealthCheckConfig {
        fall: 2,
        ..HealthCheckConfig::new(ProbeKind::Http { path: "/ready".to_owned(), expected_status: 200 })
    };
    assert_eq!(entry.traffic.health_check, Some(check));
    assert_eq!(entry.traffic.outlier.max_ejection_percent, 30);
}

fn id(last: u8) -> BackendId {
    BackendId(SocketAddr::from(([127, 0, 0, last], 8080)))
}

#[test]
fn unhealthy_backends_of_the_overlay_are_not_eligible() {
    let slices = [ready_slice("default", "web-1", "web", 8080, &["127.0.0.1", "127.0.0.2", "127.0.0.3"])];
    let mut options = BuildOptions::default();
    options.health.mark(&ObjectRef::service("default", "web"), id(2));
    options.health.mark(&ObjectRef::service("default", "other"), id(3));
    assert_eq!(eligible(&run_with(&[web().build()], &slices, &options)), addrs(&[1, 3]));
    options.health.mark_global(id(1));
    assert_eq!(eligible(&run_with(&[web().build()], &slices, &options)), addrs(&[3]));
}

#[test]
fn unhealthy_ready_backends_give_way_to_healthy_terminating_ones_then_panic_mode() {
    let slices = [slice(&[("127.0.0.1", Cond::ready()), ("127.0.0.2", Cond::terminating())])];
    let mut options = BuildOptions::default();
    options.health.mark_global(id(1));
    assert_eq!(eligible(&run_with(&[web().build()], &slices, &options)), addrs(&[2]));
    options.health.mark_global(id(2));
    assert_eq!(
        eligible(&run_with(&[web().build()], &slices, &options)),
        addrs(&[1]),
        "all unhealthy: panic mode serves the ready ones rather than nothing"
    );
}

#[test]
fn every_scheduler_name_builds_an_entry_of_that_kind() {
    let slices = [ready_slice("default", "web-1", "web", 8080, &["127.0.0.1", "127.0.0.2"])];
    for &kind in crate::SchedulerKind::ALL {
        let service = web().annotation(annotations::SCHEDULER, kind.name()).build();
        let report = run_with(&[service], &slices, &BuildOptions::default());
        assert!(report.is_clean(), "{kind}: {report}");
        let entry = report.snapshot.get(&web_key()).expect("entry");
        assert_eq!(entry.scheduler.kind(), kind);
        let context = crate::PickContext::new("198.51.100.1:4000".parse().expect("client"), &[]);
        let picked = entry.scheduler.pick_with(&context, &mut crate::PickState::default());
        assert!(picked.is_some_and(|idx| entry.is_eligible(idx)), "{kind} picked {picked:?}");
    }
}

#[test]
fn simple_services_stay_unaffected() {
    let report = run_with(
        &[simple_service("default", "web", "127.0.0.10", 80, 8080)],
        &[ready_slice("default", "web-1", "web", 8080, &["127.0.0.1"])],
        &BuildOptions::default(),
    );
    let entry = report.snapshot.get(&web_key()).expect("entry");
    assert_eq!(entry.traffic, crate::TrafficPolicy::default());
}
