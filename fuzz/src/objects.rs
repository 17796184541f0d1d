//! Target `objects`: Kubernetes objects, decoded from JSON, through the snapshot builder.
//!
//! The input is one JSON object `{"services": [...], "slices": [...], "endpoints": [...]}` whose items
//! are Service, EndpointSlice and core/v1 Endpoints objects as the API server lists them (`kind` and
//! `apiVersion` may be left out, as in a list's items). An item that is not a valid object of its kind
//! is dropped, so one bad item does not waste the rest. [`check_build`] is shared with the
//! `manifest` and `annotations` targets: it builds and checks what `lb_core::build` promises.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use lb_core::duration::MAX_DURATION;
use lb_core::{
    BuildCache, BuildOptions, BuildReport, CompactService, ParsedEndpointSlice, PickContext, PickState,
    Revised, ServiceEntry, SliceNames, Snapshot, build, build_incremental,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Beyond this many eligible backends a pick is checked a few times, not exhausted (each pick
/// scans the exclusion list, so exhausting n backends costs n² steps).
const EXHAUSTIVE_PICKS: usize = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct World {
    services: Vec<Value>,
    slices: Vec<Value>,
    endpoints: Vec<Value>,
}

pub fn run(data: &[u8]) {
    let Ok(world) = serde_json::from_slice::<World>(data) else {
        return;
    };
    let services: Vec<Service> = typed_items(world.services);
    let slices: Vec<EndpointSlice> = typed_items(world.slices);
    let endpoints: Vec<Endpoints> = typed_items(world.endpoints);
    check_build(&services, &slices, &endpoints);
}

/// The items that are valid objects of kind `K`, one per namespace/name (the first): sources never
/// hand the builder two objects of one name (the store is keyed by it; a manifest with a duplicate
/// is rejected), and with duplicates "the same objects in any order" would not be one set.
fn typed_items<K>(items: Vec<Value>) -> Vec<K>
where
    K: Resource + Metadata<Ty = ObjectMeta> + DeserializeOwned,
{
    let mut seen = BTreeSet::new();
    let mut objects = Vec::new();
    for item in items {
        let Value::Object(mut map) = item else { continue };
        // Items of a typed list omit these; the k8s-openapi types insist on them.
        map.insert("apiVersion".to_owned(), Value::String(K::API_VERSION.to_owned()));
        map.insert("kind".to_owned(), Value::String(K::KIND.to_owned()));
        let Ok(object) = serde_json::from_value::<K>(Value::Object(map)) else { continue };
        if seen.insert(name_of(object.metadata())) {
            objects.push(object);
        }
    }
    objects
}

fn name_of(meta: &ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// Builds `services`, `slices` and `endpoints` with default options and checks the promises of
/// `lb_core::build`: no panic; every entry well formed (see [`check_entry`]); the same snapshot
/// for the objects in reverse order, when rebuilt on top of itself, and from `build_incremental`.
pub fn check_build(services: &[Service], slices: &[EndpointSlice], endpoints: &[Endpoints]) {
    let options = BuildOptions::default();
    let report = build(services, slices, endpoints, &options, None, 1);
    check_report(&report, services);

    let (r_services, r_slices, r_endpoints) = (reversed(services), reversed(slices), reversed(endpoints));
    let in_reverse = build(&r_services, &r_slices, &r_endpoints, &BuildOptions::default(), None, 1);
    assert_eq!(served(&report.snapshot), served(&in_reverse.snapshot), "input order changed the snapshot");
    assert_eq!(messages(&report), messages(&in_reverse), "input order changed the errors");

    // Rebuilding the same objects on top of their own snapshot changes nothing: the previous
    // snapshot only decides conflicts (already decided the same way) and keeps last good specs
    // (of Services that are still good).
    let rebuilt = build(services, slices, endpoints, &options, Some(&report.snapshot), 2);
    check_report(&rebuilt, services);
    assert_eq!(
        served(&report.snapshot),
        served(&rebuilt.snapshot),
        "a rebuild on itself changed the snapshot"
    );

    check_incremental(services, slices, endpoints);
}

fn reversed<T: Clone>(objects: &[T]) -> Vec<T> {
    objects.iter().rev().cloned().collect()
}

/// `build_incremental` from a fresh cache gives what `build` gives. A store parses each slice when
/// it arrives and never keeps one `ParsedEndpointSlice::parse` refuses (no name), so both builds
/// get the slices that parse.
fn check_incremental(services: &[Service], slices: &[EndpointSlice], endpoints: &[Endpoints]) {
    let mut names = SliceNames::default();
    let (parsed, kept): (Vec<ParsedEndpointSlice>, Vec<EndpointSlice>) = slices
        .iter()
        .filter_map(|slice| Some((ParsedEndpointSlice::parse(slice, &mut names).ok()?, slice.clone())))
        .unzip();
    let fresh = build(services, &kept, endpoints, &BuildOptions::default(), None, 1);
    let compact: Vec<CompactService> = services.iter().map(CompactService::from).collect();
    let revised_services: Vec<Revised<'_, CompactService>> =
        compact.iter().zip(1..).map(|(object, revision)| Revised { object, revision }).collect();
    let revised_slices: Vec<Revised<'_, ParsedEndpointSlice>> =
        parsed.iter().zip(1..).map(|(object, revision)| Revised { object, revision }).collect();
    let endpoints: Vec<&Endpoints> = endpoints.iter().collect();
    let mut cache = BuildCache::new();
    let options = BuildOptions::default();
    let cached =
        build_incremental(&revised_services, &revised_slices, &endpoints, &options, None, 1, &mut cache);
    assert_eq!(served(&fresh.snapshot), served(&cached.snapshot), "build_incremental differs from build");
    assert_eq!(messages(&fresh), messages(&cached), "build_incremental reports other errors");
}

/// What the datapath serves, as JSON: every entry and the health-check node ports (the version and
/// the bookkeeping for the next build are left out).
fn served(snapshot: &Snapshot) -> String {
    let entries: Vec<&ServiceEntry> = snapshot.entries().map(|entry| &**entry).collect();
    serde_json::to_string(&(entries, &**snapshot.health_check_node_ports())).expect("a snapshot serialises")
}

fn messages(report: &BuildReport) -> Vec<String> {
    report.errors.iter().map(ToString::to_string).collect()
}

/// Checks every entry of `report` and that its errors are sorted by object, as documented.
pub fn check_report(report: &BuildReport, services: &[Service]) {
    let _ = report.to_string();
    let known: BTreeSet<(String, String)> = services.iter().map(|s| name_of(&s.metadata)).collect();
    for entry in report.snapshot.entries() {
        let listed = report.snapshot.get(&entry.key).expect("an entry is found under its own key");
        assert!(std::ptr::eq(&**listed, &**entry), "{}: listed under another key", entry.key);
        check_entry(entry, &known);
    }
    let objects: Vec<_> = report.errors.iter().map(|error| error.object().clone()).collect();
    assert!(objects.is_sorted(), "errors are not sorted by object: {objects:?}");
}

/// An entry's backends are sorted and unique, its eligible indices ascending and in range, each
/// weight at least 1, durations within the cap, and its scheduler keeps its contract (see
/// [`check_picks`]).
pub fn check_entry(entry: &ServiceEntry, known: &BTreeSet<(String, String)>) {
    let key = entry.key;
    let service = (entry.service.namespace.clone(), entry.service.name.clone());
    // A Service stored without a namespace is served as `default`.
    let default = (String::new(), entry.service.name.clone());
    assert!(
        known.contains(&service) || known.contains(&default),
        "{key}: served for unknown {}",
        entry.service
    );
    let ids: Vec<_> = entry.backends.iter().map(|backend| backend.id).collect();
    assert!(ids.is_sorted_by(|a, b| a < b), "{key}: backends not sorted and unique: {ids:?}");
    assert!(entry.backends.iter().all(|backend| backend.weight >= 1), "{key}: a weight below 1");
    assert!(entry.eligible.is_sorted_by(|a, b| a < b), "{key}: eligible not ascending: {:?}", entry.eligible);
    if let Some(&last) = entry.eligible.last() {
        assert!((last as usize) < entry.backends.len(), "{key}: eligible index {last} out of range");
    }
    let policy = &entry.policy;
    for duration in [
        policy.connect_timeout,
        policy.idle_timeout,
        policy.drain_timeout,
        policy.udp_unreplied_timeout,
        policy.udp_replied_timeout,
    ] {
        assert!(duration <= MAX_DURATION, "{key}: a duration over the cap: {policy:?}");
    }
    if let Some(affinity) = entry.traffic.session_affinity {
        assert!(affinity <= MAX_DURATION, "{key}: session affinity over the cap: {affinity:?}");
    }
    check_picks(entry);
}

/// The scheduler's contract (`lb_core::scheduler`): a pick is an eligible index not excluded, and
/// `None` only once every eligible backend is excluded.
fn check_picks(entry: &ServiceEntry) {
    let key = entry.key;
    let client: SocketAddr = "192.0.2.1:40000".parse().expect("a literal address");
    let destination = SocketAddr::new(key.addr, key.port);
    let mut state = PickState::seeded(3, 7);
    let mut exclude = Vec::new();
    let rounds = entry.eligible.len().min(EXHAUSTIVE_PICKS);
    for round in 0..=rounds {
        let context = PickContext {
            client,
            destination: Some(destination),
            exclude: &exclude,
            random: round as u64 * 0x9e37,
        };
        match entry.scheduler.pick_with(&context, &mut state) {
            Some(idx) => {
                assert!(entry.is_eligible(idx), "{key}: picked {idx}, not eligible ({:?})", entry.eligible);
                assert!(!exclude.contains(&idx), "{key}: picked excluded {idx}");
                exclude.push(idx);
            }
            None => {
                assert_eq!(exclude.len(), entry.eligible.len(), "{key}: no pick though some are left");
                return;
            }
        }
    }
    assert!(
        entry.eligible.len() > EXHAUSTIVE_PICKS || exclude.len() == entry.eligible.len(),
        "{key}: picked more backends than are eligible"
    );
}
