//! Property tests of the builder over generated objects: entries only point at eligible endpoints of
//! their own Service, the result does not depend on input order, and garbage objects (arbitrary
//! strings and integers in every field) never panic and never take away what good objects serve.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_core::{BuildOptions, BuildReport, Snapshot, annotations, build};
use proptest::prelude::*;
use testkit::objects::{Cond, SERVICE_NAME_LABEL, ServiceBuilder, SliceBuilder, TargetPort};

const NAMESPACES: [&str; 2] = ["default", "team"];
const SERVICES: [&str; 3] = ["web", "api", "db"];
const VIPS: [&str; 3] = ["127.0.1.1", "127.0.1.2", "::1"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

fn cond() -> impl Strategy<Value = Cond> {
    let flag = || prop::option::of(any::<bool>());
    (flag(), flag(), flag()).prop_map(|(ready, serving, terminating)| Cond { ready, serving, terminating })
}

/// One valid Service and its slices; ports are always named, so every combination is valid.
fn good_service(
    namespace: &'static str,
    name: &'static str,
) -> impl Strategy<Value = (Service, Vec<EndpointSlice>)> {
    let ports = prop::collection::vec((0..3usize, any::<bool>()), 1..=3);
    let vips = prop::collection::btree_set(0..VIPS.len(), 1..=2);
    let slices = prop::collection::vec(
        (
            prop::collection::vec((0..3usize, 1000i32..1004, any::<bool>()), 0..=3),
            prop::collection::vec((0u8..6, cond()), 0..5),
            prop::option::of(1u32..5),
        ),
        0..=3,
    );
    (ports, vips, slices, prop::option::of(0i64..3)).prop_map(move |(ports, vips, slices, created)| {
        let mut service = ServiceBuilder::new(namespace, name).external_ips(vips.iter().map(|&v| VIPS[v]));
        if let Some(t) = created {
            service = service.created_at(t);
        }
        for (j, &(protocol, named_target)) in ports.iter().enumerate() {
            let target =
                if named_target { TargetPort::String(format!("t{j}")) } else { TargetPort::Int(2000) };
            service = service.port(&format!("p{j}"), 80 + j as i32, PROTOCOLS[protocol], target);
        }
        let slices = slices
            .into_iter()
            .enumerate()
            .map(|(k, (slice_ports, endpoints, weight))| {
                let mut slice = SliceBuilder::new(namespace, &format!("{name}-{k}"), name);
                for (j, port, by_target_name) in slice_ports {
                    let port_name = if by_target_name { format!("t{j}") } else { format!("p{j}") };
                    let protocol = ports.get(j).map_or("TCP", |p| PROTOCOLS[p.0]);
                    slice = slice.port(&port_name, port, protocol);
                }
                for (host, cond) in endpoints {
                    slice = slice.endpoint(&format!("127.2.0.{host}"), cond);
                }
                if let Some(weight) = weight {
                    slice = slice.annotation(annotations::WEIGHT, &weight.to_string());
                }
                slice.build()
            })
            .collect();
        (service.build(), slices)
    })
}

fn good_world() -> impl Strategy<Value = (Vec<Service>, Vec<EndpointSlice>)> {
    let all: Vec<_> =
        NAMESPACES.iter().flat_map(|&ns| SERVICES.iter().map(move |&name| good_service(ns, name))).collect();
    (all, prop::collection::vec(any::<bool>(), 6)).prop_map(|(world, keep)| {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for ((service, mut own), keep) in world.into_iter().zip(keep) {
            if keep {
                services.push(service);
                slices.append(&mut own);
            }
        }
        (services, slices)
    })
}

/// A string that is sometimes plausible and sometimes anything at all.
fn text(plausible: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(plausible).prop_map(str::to_owned),
        any::<String>(),
        "[0-9a-fA-F:.,=/ -]{0,20}",
    ]
}

fn garbage_annotations() -> impl Strategy<Value = Option<BTreeMap<String, String>>> {
    const KEYS: [&str; 8] = [
        annotations::SCHEDULER,
        annotations::CONNECT_TIMEOUT,
        annotations::IDLE_TIMEOUT,
        annotations::DRAIN_TIMEOUT,
        annotations::CONNECT_ATTEMPTS,
        annotations::BACKEND_WEIGHTS,
        annotations::WEIGHT,
        annotations::METALLB_LOAD_BALANCER_IPS,
    ];
    const VALUES: [&str; 10] =
        ["wrr", "rr", "5s", "0ms", "99999999h", "0", "17", "127.2.0.1=3", "127.0.1.1, ::1", ""];
    prop::option::of(prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(str::to_owned),
        text(&VALUES),
        0..4,
    ))
}

fn garbage_service() -> impl Strategy<Value = Service> {
    let meta =
        (prop::option::of(text(&SERVICES)), prop::option::of(text(&NAMESPACES)), garbage_annotations());
    let port = (
        prop::option::of(text(&["p0", "p1", ""])),
        prop_oneof![any::<i32>(), 0i32..100],
        prop::option::of(text(&PROTOCOLS)),
        prop::option::of(prop_oneof![
            any::<i32>().prop_map(TargetPort::Int),
            text(&["t0", "80", ""]).prop_map(TargetPort::String)
        ]),
    );
    let spec = (
        prop::option::of(text(&["LoadBalancer", "ClusterIP", "NodePort", "ExternalName"])),
        prop::option::of(text(&["None", ""])),
        prop::option::of(prop::collection::vec(text(&VIPS), 0..3)),
        prop::collection::vec(port, 0..3),
        prop::option::of(text(&VIPS)),
    );
    let ingress = prop::option::of(prop::collection::vec(prop::option::of(text(&VIPS)), 0..2));
    (meta, spec, ingress).prop_map(|((name, namespace, annotations), spec, ingress)| {
        let (type_, cluster_ip, external_ips, ports, load_balancer_ip) = spec;
        let ports = ports
            .into_iter()
            .map(|(name, port, protocol, target_port)| ServicePort {
                name,
                port,
                protocol,
                target_port,
                ..Default::default()
            })
            .collect();
        Service {
            metadata: ObjectMeta { name, namespace, annotations, ..Default::default() },
            spec: Some(ServiceSpec {
                type_,
                cluster_ip,
                external_ips,
                ports: Some(ports),
                load_balancer_ip,
                ..Default::default()
            }),
            status: ingress.map(|ips| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        ips.into_iter().map(|ip| LoadBalancerIngress { ip, ..Default::default() }).collect(),
                    ),
                }),
                ..Default::default()
            }),
        }
    })
}

/// Garbage slices never share a name with a good one (that would be a duplicate object, rejecting
/// both by design) but may well claim a good Service through their label.
fn garbage_slice() -> impl Strategy<Value = EndpointSlice> {
    let endpoint = (
        prop::collection::vec(text(&["127.2.0.1", "::1", "127.2.0.300"]), 0..2),
        prop::option::of((any::<Option<bool>>(), any::<Option<bool>>(), any::<Option<bool>>())),
    )
        .prop_map(|(addresses, conditions)| Endpoint {
            addresses,
            conditions: conditions.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..Default::default()
        });
    let port =
        (prop::option::of(text(&["p0", "t0", ""])), any::<Option<i32>>(), prop::option::of(text(&PROTOCOLS)))
            .prop_map(|(name, port, protocol)| EndpointPort { name, port, protocol, ..Default::default() });
    (
        any::<String>(),
        prop::option::of(text(&NAMESPACES)),
        prop::option::of(text(&SERVICES)),
        text(&["IPv4", "IPv6", "FQDN"]),
        prop::option::of(prop::collection::vec(port, 0..3)),
        prop::option::of(prop::collection::vec(endpoint, 0..4)),
        garbage_annotations(),
    )
        .prop_map(|(name, namespace, service, address_type, ports, endpoints, annotations)| {
            EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("garbage-{name}")),
                    namespace,
                    annotations,
                    labels: service.map(|s| BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), s)])),
                    ..Default::default()
                },
                address_type,
                ports,
                endpoints,
            }
        })
}

fn run(services: &[Service], slices: &[EndpointSlice], previous: Option<&Snapshot>) -> BuildReport {
    build(services, slices, &[], &BuildOptions::default(), previous, 1)
}

/// Whether `slice` lists `ip` as ready (or, for the `fallback` tier, as serving and terminating),
/// with Kubernetes' defaults for unset conditions.
fn eligible_in(slice: &EndpointSlice, ip: std::net::IpAddr, fallback: bool) -> bool {
    slice.endpoints.iter().flatten().any(|e| {
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        let serving = e.conditions.as_ref().and_then(|c| c.serving).unwrap_or(ready);
        let terminating = e.conditions.as_ref().and_then(|c| c.terminating).unwrap_or(false);
        let wanted = if fallback { serving && terminating } else { ready && !terminating };
        e.addresses.first().and_then(|a| a.parse().ok()) == Some(ip) && wanted
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn entries_point_only_at_eligible_endpoints_of_their_own_service((services, slices) in good_world()) {
        let report = run(&services, &slices, None);
        prop_assert!(report.errors.iter().all(|e| matches!(e, lb_core::BuildError::ConflictingVip { .. })), "{}", report);
        for entry in report.snapshot.entries() {
            let own: Vec<&EndpointSlice> = slices
                .iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(entry.service.namespace.as_str()))
                .filter(|s| s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) == Some(&entry.service.name))
                .collect();
            let ids: Vec<_> = entry.backends.iter().map(|b| b.id).collect();
            prop_assert!(ids.windows(2).all(|w| w[0] < w[1]), "backends sorted and unique: {:?}", ids);
            prop_assert!(entry.eligible.windows(2).all(|w| w[0] < w[1]));
            // Ready backends if there are any, else kube-proxy's serving+terminating fallback.
            let fallback = !entry.backends.iter().any(|b| b.conditions.ready && !b.conditions.terminating);
            for &idx in &entry.eligible {
                let backend = entry.backend(idx).expect("eligible index points into backends");
                let c = backend.conditions;
                if fallback {
                    prop_assert!(c.serving && c.terminating, "{:?}", c);
                } else {
                    prop_assert!(c.ready && !c.terminating, "{:?}", c);
                }
                prop_assert!(own.iter().any(|s| eligible_in(s, backend.addr().ip(), fallback)), "{} not eligible in {}", backend.id, entry.service);
            }
            let expected = entry.backends.iter().filter(|b| {
                let c = b.conditions;
                if fallback { c.serving && c.terminating } else { c.ready && !c.terminating }
            });
            prop_assert_eq!(expected.count(), entry.eligible.len(), "every backend of the tier is eligible");
        }
    }

    #[test]
    fn input_order_does_not_change_the_snapshot(
        (services, slices) in good_world(),
        garbage in prop::collection::vec(garbage_service(), 0..3),
        seed in any::<u64>(),
    ) {
        let mut all_services = services.clone();
        all_services.extend(garbage);
        let first = run(&all_services, &slices, None);
        let (mut shuffled_services, mut shuffled_slices) = (all_services.clone(), slices.clone());
        // A deterministic shuffle from the seed (rotations and a reversal are enough to reorder).
        let len = shuffled_services.len().max(1);
        shuffled_services.rotate_left(seed as usize % len);
        shuffled_slices.reverse();
        let second = run(&shuffled_services, &shuffled_slices, None);
        let json = |r: &BuildReport| serde_json::to_string(r).expect("report serialises");
        prop_assert_eq!(json(&first), json(&second));
    }

    #[test]
    fn garbage_never_panics_and_never_removes_good_entries(
        (services, slices) in good_world(),
        garbage_services in prop::collection::vec(garbage_service(), 0..6),
        garbage_slices in prop::collection::vec(garbage_slice(), 0..6),
    ) {
        let good = run(&services, &slices, None);
        let mut all_services = services.clone();
        all_services.extend(garbage_services.iter().cloned());
        let mut all_slices = slices.clone();
        all_slices.extend(garbage_slices.iter().cloned());
        let mixed = run(&all_services, &all_slices, Some(&good.snapshot));
        for entry in good.snapshot.entries() {
            let Some(now) = mixed.snapshot.get(&entry.key) else {
                return Err(TestCaseError::fail(format!("{} lost: {}", entry.key, mixed)));
            };
            prop_assert_eq!(&now.service, &entry.service);
            let eligible = |e: &lb_core::ServiceEntry| -> BTreeSet<_> {
                e.eligible.iter().filter_map(|&i| e.backend(i)).map(|b| b.id).collect()
            };
            prop_assert!(eligible(entry).is_subset(&eligible(now)), "{} lost backends: {}", entry.key, mixed);
        }
        // Garbage alone, without a previous snapshot, must not panic either.
        let _ = run(&garbage_services, &garbage_slices, None);
    }
}

/// Objects by (namespace, name): which of several worlds each name takes its object from.
fn pick<T: Clone>(worlds: &[Vec<T>], name: impl Fn(&T) -> (String, String), choice: u64) -> Vec<T> {
    let mut by_name: BTreeMap<(String, String), Vec<Option<T>>> = BTreeMap::new();
    for (w, world) in worlds.iter().enumerate() {
        for object in world {
            let slots = by_name.entry(name(object)).or_insert_with(|| vec![None; worlds.len()]);
            slots[w].get_or_insert_with(|| object.clone());
        }
    }
    by_name
        .into_values()
        .enumerate()
        .filter_map(|(i, slots)| slots[(choice >> (i % 32 * 2)) as usize % slots.len()].clone())
        .collect()
}

fn name_of(meta: &ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Revisions as a store gives them: a name keeps its revision while its content stays equal.
struct Revisions<T> {
    known: BTreeMap<(String, String), (T, u64)>,
    next: u64,
}

impl<T: Clone + PartialEq> Revisions<T> {
    fn new() -> Self {
        Revisions { known: BTreeMap::new(), next: 1 }
    }

    fn of(&mut self, objects: &[T], name: impl Fn(&T) -> (String, String)) -> Vec<u64> {
        objects
            .iter()
            .map(|object| {
                let key = name(object);
                match self.known.get(&key) {
                    Some((known, revision)) if known == object => *revision,
                    _ => {
                        self.next += 1;
                        self.known.insert(key, (object.clone(), self.next));
                        self.next
                    }
                }
            })
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    /// Building with a cache through a sequence of changes gives, at every step, exactly what
    /// building from scratch gives.
    #[test]
    fn an_incremental_build_is_a_fresh_build(
        worlds in prop::collection::vec(
            (good_world(), prop::collection::vec(garbage_service(), 0..2), prop::collection::vec(garbage_slice(), 0..2)),
            2..=3,
        ),
        choices in prop::collection::vec(any::<u64>(), 1..6),
    ) {
        let service_worlds: Vec<Vec<Service>> =
            worlds.iter().map(|((s, _), g, _)| s.iter().chain(g).cloned().collect()).collect();
        let slice_worlds: Vec<Vec<EndpointSlice>> =
            worlds.iter().map(|((_, s), _, g)| s.iter().chain(g).cloned().collect()).collect();
        let options = BuildOptions::default();
        let mut cache = lb_core::BuildCache::new();
        let mut names = lb_core::SliceNames::default();
        let (mut service_revisions, mut slice_revisions) = (Revisions::new(), Revisions::new());
        let (mut fresh_previous, mut cached_previous): (Option<Snapshot>, Option<Snapshot>) = (None, None);
        // The Services change every other step, the slices every step: a build also sees only its
        // slices change, as a watch event of one EndpointSlice does.
        for step in 0..choices.len() * 2 {
            let service_choice = choices[step / 2];
            let slice_choice = choices[step.div_ceil(2) % choices.len()].rotate_left(17);
            let services = pick(&service_worlds, |s: &Service| name_of(&s.metadata), service_choice);
            let mut slices = pick(&slice_worlds, |s: &EndpointSlice| name_of(&s.metadata), slice_choice);
            // Odd steps edit some slices in place (the same names, as a readiness change does).
            if step % 2 == 1 {
                for (i, slice) in slices.iter_mut().enumerate() {
                    let flip = (service_choice >> (i % 64)) & 1 == 1;
                    if let Some(endpoint) = slice.endpoints.as_mut().and_then(|e| e.first_mut()).filter(|_| flip) {
                        let conditions = endpoint.conditions.get_or_insert_with(Default::default);
                        conditions.ready = Some(!conditions.ready.unwrap_or(true));
                    }
                }
            }
            let version = step as u64 + 1;
            let fresh = build(&services, &slices, &[], &options, fresh_previous.as_ref(), version);
            // As a store keeps them: compact.
            let compact: Vec<lb_core::CompactService> = services.iter().map(lb_core::CompactService::from).collect();
            let revised_services: Vec<lb_core::Revised<'_, lb_core::CompactService>> = compact
                .iter()
                .zip(service_revisions.of(&services, |s: &Service| name_of(&s.metadata)))
                .map(|(object, revision)| lb_core::Revised { object, revision })
                .collect();
            // As a store keeps them: parsed when they arrive, names shared across steps.
            let parsed: Vec<lb_core::ParsedEndpointSlice> =
                slices.iter().filter_map(|s| lb_core::ParsedEndpointSlice::parse(s, &mut names).ok()).collect();
            prop_assert_eq!(parsed.len(), slices.len(), "every slice is named");
            let revised_slices: Vec<lb_core::Revised<'_, lb_core::ParsedEndpointSlice>> = parsed
                .iter()
                .zip(slice_revisions.of(&slices, |s: &EndpointSlice| name_of(&s.metadata)))
                .map(|(object, revision)| lb_core::Revised { object, revision })
                .collect();
            let cached = lb_core::build_incremental(
                &revised_services, &revised_slices, &[], &options, cached_previous.as_ref(), version, &mut cache,
            );
            let json = |r: &BuildReport| serde_json::to_string(r).expect("report serialises");
            prop_assert_eq!(json(&fresh), json(&cached), "step {}", step);
            fresh_previous = Some(fresh.snapshot);
            cached_previous = Some(cached.snapshot);
        }
    }
}
