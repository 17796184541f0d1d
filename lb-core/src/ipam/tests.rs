use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use proptest::prelude::*;
use testkit::objects::{ServiceBuilder, TargetPort};

use super::*;
use crate::selection::{DEFAULT_CLASS, VipSource};

fn cluster() -> ServiceSelection {
    ServiceSelection { default_class: false, vips: VipSource::Allocated, ..ServiceSelection::default() }
}

fn pool(name: &str, addresses: &[&str]) -> IpAddressPool {
    IpAddressPool {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("metallb-system".to_owned()),
            ..ObjectMeta::default()
        },
        spec: PoolSpec {
            addresses: addresses.iter().map(|s| (*s).to_owned()).collect(),
            ..PoolSpec::default()
        },
    }
}

/// A LoadBalancer Service of ringlb's class, created at `created` (seconds), with TCP `ports`.
fn svc(name: &str, created: i64, ports: &[i32]) -> ServiceBuilder {
    let mut builder = ServiceBuilder::new("shop", name)
        .service_type("LoadBalancer")
        .load_balancer_class(DEFAULT_CLASS)
        .created_at(created);
    for (i, port) in ports.iter().enumerate() {
        builder = builder.port(&format!("p{i}"), *port, "TCP", TargetPort::Int(*port));
    }
    builder
}

fn with_status(mut service: Service, ips: &[&str]) -> Service {
    let ingress = ips
        .iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some((*ip).to_owned()),
            ip_mode: Some(IP_MODE.to_owned()),
            ..Default::default()
        })
        .collect();
    service.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus { ingress: Some(ingress) }),
        ..Default::default()
    });
    service
}

fn run(services: &[Service], pools: &[IpAddressPool]) -> Plan {
    let services: Vec<CompactService> = services.iter().map(CompactService::from).collect();
    let services: Vec<&CompactService> = services.iter().collect();
    let pools: Vec<&IpAddressPool> = pools.iter().collect();
    plan(Inputs {
        services: &services,
        pools: &pools,
        namespace_labels: &BTreeMap::new(),
        selection: &cluster(),
    })
}

fn ips(plan: &Plan, name: &str) -> Vec<String> {
    plan.assignments[&ObjectRef::service("shop", name)].ips.iter().map(ToString::to_string).collect()
}

#[test]
fn the_oldest_service_gets_the_lowest_free_address_and_others_follow() {
    let services = [svc("b", 20, &[80]).build(), svc("a", 10, &[80]).build(), svc("c", 30, &[80]).build()];
    let plan = run(&services, &[pool("default", &["192.0.2.10-192.0.2.11", "198.51.100.0/31"])]);
    assert_eq!(ips(&plan, "a"), ["192.0.2.10"]);
    assert_eq!(ips(&plan, "b"), ["192.0.2.11"]);
    assert_eq!(ips(&plan, "c"), ["198.51.100.0"]);
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
}

#[test]
fn current_statuses_are_kept_before_anything_is_allocated() {
    // "new" is older but has no status: it must not take the address "old" already holds.
    let services =
        [svc("new", 1, &[80]).build(), with_status(svc("old", 50, &[80]).build(), &["192.0.2.10"])];
    let plan = run(&services, &[pool("default", &["192.0.2.10-192.0.2.11"])]);
    assert_eq!(ips(&plan, "old"), ["192.0.2.10"]);
    assert_eq!(ips(&plan, "new"), ["192.0.2.11"]);
}

#[test]
fn an_exhausted_pool_leaves_the_service_without_address_and_says_so() {
    let services = [svc("a", 1, &[80]).build(), svc("b", 2, &[80]).build()];
    let plan = run(&services, &[pool("tiny", &["192.0.2.10/32"])]);
    assert_eq!(ips(&plan, "a"), ["192.0.2.10"]);
    assert!(ips(&plan, "b").is_empty());
    assert_eq!(plan.problems.len(), 1);
    assert_eq!(plan.problems[0].reason(), "AddressPoolExhausted");
    assert!(plan.problems[0].to_string().contains("tiny"), "{}", plan.problems[0]);
}

#[test]
fn a_requested_address_is_assigned_only_from_a_pool_and_when_free() {
    let request = |name: &str, created, ip: &str| {
        svc(name, created, &[80]).annotation("metallb.io/loadBalancerIPs", ip).build()
    };
    let services = [
        request("first", 1, "192.0.2.12"),
        request("second", 2, "192.0.2.12"),
        request("outside", 3, "203.0.113.1"),
        svc("legacy", 4, &[80]).load_balancer_ip("192.0.2.13").build(),
        svc("old-spelling", 5, &[80]).annotation("metallb.universe.tf/loadBalancerIPs", "192.0.2.14").build(),
    ];
    let plan = run(&services, &[pool("default", &["192.0.2.10-192.0.2.20"])]);
    assert_eq!(ips(&plan, "first"), ["192.0.2.12"]);
    assert!(ips(&plan, "second").is_empty() && ips(&plan, "outside").is_empty());
    assert_eq!(ips(&plan, "legacy"), ["192.0.2.13"]);
    assert_eq!(ips(&plan, "old-spelling"), ["192.0.2.14"]);
    let reasons: Vec<(&str, &str)> =
        plan.problems.iter().map(|p| (p.service().name.as_str(), p.reason())).collect();
    assert_eq!(reasons, [("outside", "RequestedIPNotInPool"), ("second", "RequestedIPTaken")]);
}

#[test]
fn services_with_one_key_share_an_address_unless_their_ports_collide() {
    let shared = |name: &str, created, ports: &[i32]| {
        svc(name, created, ports).annotation("metallb.io/allow-shared-ip", "k")
    };
    let dns_tcp = shared("dns-tcp", 1, &[]).port("dns", 53, "TCP", TargetPort::Int(53)).build();
    let dns_udp = shared("dns-udp", 2, &[]).port("dns", 53, "UDP", TargetPort::Int(53)).build();
    let web = shared("web", 3, &[80]).external_traffic_policy("Local").build();
    let clash = shared("clash", 4, &[80]).build();
    let other_key = svc("other", 5, &[443]).annotation("metallb.io/allow-shared-ip", "z").build();
    let plan =
        run(&[dns_tcp, dns_udp, web, clash, other_key], &[pool("default", &["192.0.2.10-192.0.2.20"])]);
    for name in ["dns-tcp", "dns-udp", "web"] {
        assert_eq!(
            ips(&plan, name),
            ["192.0.2.10"],
            "{name} shares (53/TCP and 53/UDP are two ports; Local is fine)"
        );
    }
    assert_eq!(ips(&plan, "clash"), ["192.0.2.11"], "a port collision gets an address of its own");
    assert_eq!(ips(&plan, "other"), ["192.0.2.12"]);
    // A requested shared address with a colliding port is refused, with the reason.
    let asks = shared("asks", 6, &[80]).annotation("metallb.io/loadBalancerIPs", "192.0.2.10").build();
    let mut services = vec![asks];
    services.extend([shared("dns-tcp", 1, &[53]).build(), shared("web", 3, &[80]).build()]);
    let plan = run(&services, &[pool("default", &["192.0.2.10-192.0.2.20"])]);
    let refused = plan.problems.iter().find(|p| p.service().name == "asks").expect("refused");
    assert_eq!(refused.reason(), "RequestedIPTaken");
    assert!(refused.to_string().contains("port 80/TCP"), "{refused}");
}

#[test]
fn pools_admit_by_namespace_and_service_selectors_and_are_tried_by_priority() {
    let mut private = pool("private", &["10.1.0.0/30"]);
    private.spec.service_allocation = Some(ServiceAllocation {
        priority: Some(1),
        namespace_selectors: vec![LabelSelector {
            match_labels: Some(BTreeMap::from([("tier".to_owned(), "internal".to_owned())])),
            ..Default::default()
        }],
        ..Default::default()
    });
    let mut web_only = pool("web-only", &["10.2.0.0/30"]);
    web_only.spec.service_allocation = Some(ServiceAllocation {
        priority: Some(5),
        service_selectors: vec![LabelSelector {
            match_labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
            ..Default::default()
        }],
        ..Default::default()
    });
    let mut manual = pool("manual", &["10.3.0.0/30"]);
    manual.spec.auto_assign = Some(false);
    let public = pool("public", &["192.0.2.0/30"]);
    let web = svc("web", 1, &[80])
        .with(|s| s.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])))
        .build();
    let plain = svc("plain", 2, &[80]).build();
    let pinned = svc("pinned", 3, &[80]).annotation("metallb.io/address-pool", "manual").build();
    let lost = svc("lost", 4, &[80]).annotation("metallb.io/address-pool", "nope").build();
    let pools = [&public, &manual, &web_only, &private];
    let services = [&web, &plain, &pinned, &lost].map(CompactService::from);
    let services: Vec<&CompactService> = services.iter().collect();
    let internal =
        BTreeMap::from([("shop".to_owned(), BTreeMap::from([("tier".to_owned(), "internal".to_owned())]))]);
    let plan = plan(Inputs {
        services: &services,
        pools: &pools,
        namespace_labels: &internal,
        selection: &cluster(),
    });
    assert_eq!(ips(&plan, "web"), ["10.1.0.0"], "the namespace is internal: priority 1 wins");
    assert_eq!(ips(&plan, "plain"), ["10.1.0.1"]);
    assert_eq!(ips(&plan, "pinned"), ["10.3.0.0"], "a named pool is used even without autoAssign");
    assert!(ips(&plan, "lost").is_empty());
    assert_eq!(plan.problems[0].reason(), "UnknownAddressPool");
    let none = BTreeMap::new();
    let plan = super::plan(Inputs {
        services: &services,
        pools: &pools,
        namespace_labels: &none,
        selection: &cluster(),
    });
    assert_eq!(ips(&plan, "web"), ["10.2.0.0"], "without the label, the web-only pool is next");
    assert_eq!(ips(&plan, "plain"), ["192.0.2.0"], "autoAssign false pools are skipped");
}

#[test]
fn families_follow_ip_family_policy() {
    let pools = [pool("v4", &["192.0.2.0/30"]), pool("v6", &["2001:db8::/126"])];
    let family = |name: &str, created: i64, families: &[&str], policy: &str| {
        let families: Vec<String> = families.iter().map(|f| (*f).to_owned()).collect();
        let policy = policy.to_owned();
        svc(name, created, &[80])
            .with(move |s| {
                let spec = s.spec.as_mut().unwrap();
                spec.ip_families = Some(families);
                spec.ip_family_policy = Some(policy);
            })
            .build()
    };
    let services = [
        family("single6", 1, &["IPv6"], "SingleStack"),
        family("prefer", 2, &["IPv6", "IPv4"], "PreferDualStack"),
        family("require", 3, &["IPv4", "IPv6"], "RequireDualStack"),
    ];
    let plan = run(&services, &pools);
    assert_eq!(ips(&plan, "single6"), ["2001:db8::"]);
    assert_eq!(ips(&plan, "prefer"), ["2001:db8::1", "192.0.2.0"], "in ipFamilies order");
    assert_eq!(ips(&plan, "require"), ["192.0.2.1", "2001:db8::2"]);
    let only_v4 = run(&services, &pools[..1]);
    assert!(ips(&only_v4, "single6").is_empty());
    assert_eq!(ips(&only_v4, "prefer"), ["192.0.2.0"], "PreferDualStack settles for one family");
    assert!(ips(&only_v4, "require").is_empty(), "RequireDualStack gets both or none");
    let reasons: Vec<&str> = only_v4.problems.iter().map(Problem::reason).collect();
    // prefer's first family is IPv6: that it got only its second is worth saying.
    assert_eq!(reasons, ["NoAddressPool"; 3], "{:?}", only_v4.problems);
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut buggy = pool("buggy", &["192.0.2.255-192.0.3.1"]);
    buggy.spec.avoid_buggy_ips = Some(true);
    let plan = run(&[svc("a", 1, &[80]).build(), svc("b", 2, &[80]).build()], &[buggy]);
    assert_eq!(ips(&plan, "a"), ["192.0.3.1"]);
    assert!(ips(&plan, "b").is_empty());
}

#[test]
fn services_that_are_not_ours_get_nothing_and_a_status_we_wrote_is_released() {
    let other = svc("other", 1, &[80]).load_balancer_class("other.io/lb").build();
    let other = with_status(other, &["192.0.2.10"]);
    let classless = with_status(
        ServiceBuilder::new("shop", "classless").service_type("LoadBalancer").bare_port(80).build(),
        &["192.0.2.11"],
    );
    let plan = run(&[other, classless], &[pool("default", &["192.0.2.10/31"])]);
    assert!(plan.assignments.is_empty());
    assert_eq!(plan.releases, [ObjectRef::service("shop", "classless")], "another class is never touched");
}

#[test]
fn a_deleted_service_frees_its_address() {
    let mut gone = with_status(svc("gone", 1, &[80]).build(), &["192.0.2.10"]);
    gone.metadata.deletion_timestamp = Some(Time(Default::default()));
    let plan = run(&[gone, svc("next", 2, &[80]).build()], &[pool("default", &["192.0.2.10/32"])]);
    assert_eq!(ips(&plan, "next"), ["192.0.2.10"]);
}

#[test]
fn unusable_pools_are_reported() {
    let plan = run(&[svc("a", 1, &[80]).build()], &[pool("bad", &["nope"]), pool("good", &["192.0.2.1/32"])]);
    assert_eq!(ips(&plan, "a"), ["192.0.2.1"]);
    assert_eq!(plan.pool_errors.len(), 1);
    assert_eq!(plan.pool_errors[0].pool, "bad");
}

/// Writes a plan's assignments into the Services' statuses (what the leader does).
fn applied(services: &[Service], plan: &Plan) -> Vec<Service> {
    services
        .iter()
        .map(|s| {
            let object = ObjectRef::service("shop", s.metadata.name.as_deref().unwrap());
            match plan.assignments.get(&object) {
                Some(assignment) => {
                    let ips: Vec<String> = assignment.ips.iter().map(ToString::to_string).collect();
                    with_status(s.clone(), &ips.iter().map(String::as_str).collect::<Vec<_>>())
                }
                None => s.clone(),
            }
        })
        .collect()
}

fn arbitrary_services() -> impl Strategy<Value = Vec<Service>> {
    prop::collection::vec(
        (
            0..6i64,
            prop::sample::select(vec![vec![53], vec![80], vec![443], vec![53, 80], vec![80, 443]]),
            prop::option::of(0..2u8),
            prop::option::of(0..8u8),
        ),
        1..12,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (created, ports, key, request))| {
                let mut builder = svc(&format!("s{i}"), created, ports.as_slice());
                if let Some(key) = key {
                    builder = builder.annotation("metallb.io/allow-shared-ip", &format!("k{key}"));
                }
                if let Some(last) = request {
                    builder = builder.annotation("metallb.io/loadBalancerIPs", &format!("192.0.2.{last}"));
                }
                builder.build()
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn plans_are_order_independent_never_double_book_and_are_a_fixpoint(services in arbitrary_services(), seed in any::<u64>()) {
        let pools = [pool("default", &["192.0.2.0/29"])];
        let first = run(&services, &pools);
        let mut shuffled = services.clone();
        let n = shuffled.len();
        for i in 0..n {
            shuffled.swap(i, (seed as usize).wrapping_add(i * 7) % n);
        }
        prop_assert_eq!(&run(&shuffled, &pools), &first, "input order does not matter");
        // No address has two users unless they share a key and no port.
        let mut users: BTreeMap<IpAddr, Vec<&Service>> = BTreeMap::new();
        for s in &services {
            let object = ObjectRef::service("shop", s.metadata.name.as_deref().unwrap());
            for ip in &first.assignments[&object].ips {
                prop_assert!(pools[0].spec.addresses.iter().any(|_| ip.to_string().starts_with("192.0.2.")));
                users.entry(*ip).or_default().push(s);
            }
        }
        for (ip, sharing) in &users {
            if sharing.len() > 1 {
                let keys: BTreeSet<Option<&String>> = sharing.iter().map(|s| s.metadata.annotations.as_ref().and_then(|a| a.get("metallb.io/allow-shared-ip"))).collect();
                prop_assert!(keys.len() == 1 && !keys.contains(&None), "{ip} shared without one key");
                let mut seen = BTreeSet::new();
                for s in sharing {
                    for p in s.spec.as_ref().unwrap().ports.iter().flatten() {
                        prop_assert!(seen.insert(p.port), "{ip}: port {} twice", p.port);
                    }
                }
            }
        }
        // Writing the plan and planning again changes nothing: a restart moves no address.
        let written = applied(&services, &first);
        let again = run(&written, &pools);
        prop_assert_eq!(&again.assignments, &first.assignments);
    }
}
