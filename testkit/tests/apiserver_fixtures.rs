//! Holds the API server emulator to `kube-fixtures/`: every recorded exchange that is not a watch
//! is replayed against a fresh emulator, over HTTPS, with kube-rs's client, and the answer must
//! match the recording (status exactly; `Status` bodies exactly; objects after normalising what
//! differs from run to run). Watches are held to their fixtures in `apiserver_watch.rs`.
//!
//! A fixture refers to objects that earlier requests of the recording made. Before each replay the
//! objects it needs are seeded with their recorded state just before the fixture's time (the
//! resourceVersions of a run order its files): the object a write returns is preceded by its newest
//! earlier state in any fixture (responses, list items, watch events); a read is seeded with what
//! it returned. Fixtures the emulator does not claim to answer are listed in [`NOT_REPLAYED`] with
//! the reason.

mod fixtures;

use std::collections::{BTreeMap, BTreeSet};

use fixtures::{
    Answer, Fixture, client, collection, differ, ensure_namespace, fixtures, media, normalise, query_string,
    rv, seed, send, sort_causes, without_server_address,
};
use serde_json::{Value, json};
use testkit::apiserver::{ADMIN_TOKEN, ApiServer};

/// Fixtures (by name, or a `group/` prefix) that are not replayed, and why.
const NOT_REPLAYED: &[(&str, &str)] = &[
    (
        "discovery/api-aggregated-v2",
        "aggregated discovery is not served; clients fall back to the legacy documents",
    ),
    (
        "discovery/apis-aggregated-v2",
        "aggregated discovery is not served; clients fall back to the legacy documents",
    ),
    ("discovery/api-v1", "only the resources the emulator serves are listed"),
    ("discovery/apis", "only the groups the emulator serves are listed"),
    ("discovery/apis-after-crd", "only the groups the emulator serves are listed"),
    ("crd/crd-", "CustomResourceDefinitions are not served: IPAddressPool is built in"),
    ("auth/selfsubjectaccessreview", "SelfSubjectAccessReviews are not served"),
    (
        "auth/serviceaccount-create",
        "ServiceAccounts are not served; tokens are registered with ApiServer::add_token",
    ),
    (
        "auth/tokenrequest-create",
        "the TokenRequest API is not served; tokens are registered with ApiServer::add_token",
    ),
    (
        "namespaces/create-in-terminating-namespace-403",
        "a deleted namespace is finalised at once, as a cluster's namespace controller would",
    ),
    ("watch/", "watches are replayed by apiserver_semantics.rs"),
    ("crd/pool-watch", "watches are replayed by apiserver_semantics.rs"),
    ("auth/sa-watch-endpointslices-403", "watches are replayed by apiserver_semantics.rs"),
    (
        "gone/",
        "compaction is replayed by apiserver_semantics.rs, where recorded resourceVersions map to the emulator's",
    ),
    ("services/list-rv-exact", "names a recorded resourceVersion: replayed by apiserver_semantics.rs"),
    ("services/list-rv-notolderthan", "names a recorded resourceVersion: replayed by apiserver_semantics.rs"),
    (
        "services/apply-conflict-409",
        "field ownership is not tracked: server-side apply merges and never conflicts",
    ),
    (
        "status/apply-status-conflict-409",
        "field ownership is not tracked: server-side apply merges and never conflicts",
    ),
    (
        "namespaces/list",
        "shows a namespace stuck Terminating; the emulator finalises a deleted namespace at once",
    ),
];

/// Writes the recording shows changed nothing: their object is seeded as they answered it.
const NO_OPS: &[&str] = &[
    "endpointslices/noop-merge-patch",
    "status/spec-via-status-ignored",
    "status/status-via-main-resource-ignored",
    "status/apply-status-force-again-noop",
];

fn not_replayed(name: &str) -> Option<&'static str> {
    NOT_REPLAYED
        .iter()
        .find(|(prefix, _)| name == *prefix || (prefix.ends_with(['/', '-']) && name.starts_with(prefix)))
        .map(|(_, why)| *why)
}

fn is_main_run(fixture: &Fixture) -> bool {
    !fixture.description.starts_with("[Second server run")
        && !fixture.description.starts_with("[Third server run")
}

/// One object's recorded states, by resourceVersion: `(collection path, name)` → rv → object.
type History = BTreeMap<(String, String), BTreeMap<u64, Value>>;

/// Every object state the main run recorded.
fn history(fixtures: &[Fixture]) -> History {
    let mut history = History::new();
    let mut note = |object: &Value| {
        if let (Some(collection), Some(name)) = (collection(object), object["metadata"]["name"].as_str()) {
            history.entry((collection, name.to_owned())).or_default().insert(rv(object), object.clone());
        }
    };
    for fixture in fixtures.iter().filter(|f| is_main_run(f)) {
        for object in objects_of(&fixture.response) {
            note(&object);
        }
    }
    history
}

/// The objects a response shows: its body (or list items, typed), or its watch events' objects.
fn objects_of(response: &Value) -> Vec<Value> {
    let mut objects = Vec::new();
    let body = &response["body"];
    if let Some(items) = body["items"].as_array() {
        let kind = body["kind"].as_str().unwrap_or_default().trim_end_matches("List");
        for item in items {
            let mut item = item.clone();
            if item["kind"].is_null() {
                item["kind"] = json!(kind);
                item["apiVersion"] = body["apiVersion"].clone();
            }
            if collection(&item).is_some() {
                objects.push(item);
            }
        }
    } else if collection(body).is_some() {
        objects.push(body.clone());
    }
    for event in response["events"].as_array().into_iter().flatten() {
        if event["type"] != "BOOKMARK" && event["type"] != "ERROR" {
            objects.push(event["object"].clone());
        }
    }
    objects
}

/// The `(collection, name)` a request path names, if it names one object.
fn named(path: &str) -> Option<(String, String)> {
    let path = path.strip_suffix("/status").unwrap_or(path);
    let (collection, name) = path.rsplit_once('/')?;
    let plural = collection.rsplit('/').next()?;
    ["services", "endpoints", "namespaces", "events", "endpointslices", "leases", "ipaddresspools"]
        .contains(&plural)
        .then(|| (collection.to_owned(), name.to_owned()))
}

/// What to seed before `fixture`: objects in their recorded state.
fn seeds(fixture: &Fixture, all: &[Fixture], history: &History) -> Vec<Value> {
    let request = &fixture.request;
    let method = request["method"].as_str().unwrap_or_default();
    let status = fixture.response["status"].as_u64().unwrap_or(0);
    let body = &fixture.response["body"];
    let mut seeds = Vec::new();
    if NO_OPS.contains(&fixture.name.as_str()) {
        seeds.extend(objects_of(&fixture.response));
    } else if method == "GET" {
        seeds.extend(objects_of(&fixture.response));
        // A page of a list: the other pages' objects exist too.
        if body["metadata"].get("remainingItemCount").is_some()
            || fixture.request["query"].get("continue").is_some()
        {
            for other in
                all.iter().filter(|f| f.request["path"] == fixture.request["path"] && f.name != fixture.name)
            {
                if other.response["body"]["metadata"]["resourceVersion"]
                    == body["metadata"]["resourceVersion"]
                {
                    seeds.extend(objects_of(&other.response));
                }
            }
        }
        // Metadata-only answers are seeded with the whole objects recorded at their versions.
        let partial = std::iter::once(body).chain(body["items"].as_array().into_iter().flatten());
        for item in partial.filter(|item| item["kind"] == "PartialObjectMetadata") {
            let path = request["path"].as_str().unwrap_or_default();
            let collection =
                if named(path).is_some() { path.rsplit_once('/').map_or(path, |(c, _)| c) } else { path };
            let key =
                (collection.to_owned(), item["metadata"]["name"].as_str().unwrap_or_default().to_owned());
            if let Some(object) = history.get(&key).and_then(|states| states.get(&rv(item))) {
                seeds.push(object.clone());
            }
        }
        if let Some(key) = named(request["path"].as_str().unwrap_or_default())
            && seeds.is_empty()
            && status != 404
            && let Some(latest) = history.get(&key).and_then(|states| states.values().next_back())
        {
            seeds.push(latest.clone());
        }
    } else if method == "POST" && status == 409 {
        seeds.push(request["body"].clone());
    } else if method != "POST"
        && let Some(key) = named(request["path"].as_str().unwrap_or_default())
        && status != 404
        && status != 201
    {
        let states = history.get(&key);
        // The write's time: the object it answered, or the resourceVersion it was sent with.
        let at = if body["kind"].is_string() && body["kind"] != "Status" {
            Some(rv(body))
        } else {
            request["body"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v + 1)
        };
        let before = states.and_then(|states| match at {
            Some(at) => {
                states.range(..at).next_back().or_else(|| states.iter().next()).map(|(_, o)| o.clone())
            }
            None => states.values().next_back().cloned(),
        });
        if let Some(object) = before {
            seeds.push(object);
        }
    }
    seeds
}

/// A request body as it was sent, where the file abbreviates it (1001 endpoints, a 1025-letter
/// note).
fn expand(mut body: Value) -> Value {
    if let Some(endpoints) = body.get_mut("endpoints").and_then(Value::as_array_mut)
        && let Some(at) = endpoints.iter().position(|e| e.get("...").is_some())
    {
        let more: Vec<Value> = (0..998)
            .map(|i| json!({"addresses": [format!("203.0.{}.{}", 113 + i / 250, i % 250 + 1)], "conditions": {"ready": true}}))
            .collect();
        endpoints.splice(at..=at, more);
    }
    if body["note"] == "<1025 times the letter x>" {
        body["note"] = json!("x".repeat(1025));
    }
    body
}

/// An events.k8s.io Event that was made as a core/v1 Event (it has no eventTime) is seeded
/// through core/v1, as its recorded core state.
fn as_created(object: Value, history: &History) -> Value {
    if object["kind"] != "Event"
        || object["apiVersion"] != "events.k8s.io/v1"
        || !object["eventTime"].is_null()
    {
        return object;
    }
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let key = (
        format!("/api/v1/namespaces/{namespace}/events"),
        object["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
    );
    history.get(&key).and_then(|states| states.get(&rv(&object))).cloned().unwrap_or(object)
}

/// The token a fixture's request used, as the replay sends it.
fn token_of(fixture: &Fixture) -> Option<&'static str> {
    match fixture.request["headers"]["Authorization"].as_str() {
        None if fixture.name.starts_with("auth/anonymous") => None,
        None => Some(ADMIN_TOKEN),
        Some(value) if value.contains("ServiceAccount") => Some(SERVICE_ACCOUNT_TOKEN),
        Some(value) => Some(value.trim_start_matches("Bearer ").to_owned().leak()),
    }
}

const SERVICE_ACCOUNT_TOKEN: &str = "ringlb-fx-ringlb-token";

/// The recorded ServiceAccount `ringlb-fx/ringlb`; after `auth/rolebinding-create` it holds the
/// recorded ClusterRole in namespace `ringlb-fx`.
async fn authorise_service_account(
    server: &ApiServer,
    admin: &kube::Client,
    fixture: &Fixture,
    all: &[Fixture],
) {
    server.add_token(SERVICE_ACCOUNT_TOKEN, "system:serviceaccount:ringlb-fx:ringlb");
    let bound = ["auth/sa-list-services-namespaced-200", "auth/sa-list-services-cluster-still-403"]
        .contains(&fixture.name.as_str());
    if !bound {
        return;
    }
    for name in ["auth/clusterrole-create", "auth/rolebinding-create"] {
        let recorded = all.iter().find(|f| f.name == name).expect("recorded");
        let answer = send(
            admin,
            "POST",
            recorded.request["path"].as_str().unwrap_or_default(),
            &[("Content-Type", "application/json")],
            Some(&recorded.request["body"]),
        )
        .await;
        assert_eq!(answer.status, 201, "{name}: {}", answer.body);
    }
}

/// The CRDs the recording cluster had when `fixture` was recorded: none before the
/// IPAddressPool CRD was created, that one only after (the other MetalLB kinds were never in).
fn crds_when_recorded(fixture: &Fixture) -> &'static [&'static str] {
    if fixture.name == "discovery/apis-unknown-group-404" { &[] } else { &["IPAddressPool"] }
}

async fn replay(fixture: &Fixture, all: &[Fixture], history: &History) -> Result<(), String> {
    let server = ApiServer::start();
    server.install_only(crds_when_recorded(fixture));
    let admin = client(&server, Some(ADMIN_TOKEN)).await;
    let mut made = BTreeSet::new();
    let request = &fixture.request;
    let path = request["path"].as_str().unwrap_or_default();
    if let Some(namespace) = path.split('/').skip_while(|s| *s != "namespaces").nth(1)
        && path.split('/').filter(|s| !s.is_empty()).count() > 4
        && fixture.response["status"] != 404
    {
        ensure_namespace(&admin, namespace, &mut made).await?;
    }
    if fixture.name.starts_with("auth/") {
        ensure_namespace(&admin, "ringlb-fx", &mut made).await?;
        authorise_service_account(&server, &admin, fixture, all).await;
    }
    let mut seeded_generations = Vec::new();
    for object in seeds(fixture, all, history).into_iter().map(|o| as_created(o, history)) {
        seeded_generations.push(object["metadata"]["generation"].as_i64().unwrap_or(1));
        seed(&admin, &object, &mut made).await?;
    }
    let mut body = expand(request["body"].clone());
    let expected_status = fixture.response["status"].as_u64().unwrap_or(0) as u16;
    if let Some(recorded_rv) = body["metadata"]["resourceVersion"].as_str().map(str::to_owned)
        && let Some((collection, name)) = named(path)
    {
        // The precondition means "as it is now" unless the recording shows it stale.
        let current = send(&admin, "GET", &format!("{collection}/{name}"), &[], None).await;
        body["metadata"]["resourceVersion"] = if expected_status == 409 {
            json!("1")
        } else {
            current.body["metadata"]["resourceVersion"].clone()
        };
        let _ = recorded_rv;
    }
    let headers: Vec<(&str, &str)> = request["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| name.as_str() != "Authorization")
        .map(|(name, value)| (name.as_str(), value.as_str().unwrap_or_default()))
        .collect();
    let client = match token_of(fixture) {
        Some(token) if token == ADMIN_TOKEN => admin.clone(),
        token => self::client(&server, token).await,
    };
    let body = (!body.is_null()).then_some(&body);
    let answer = send(
        &client,
        request["method"].as_str().unwrap_or("GET"),
        &format!("{path}{}", query_string(&request["query"])),
        &headers,
        body,
    )
    .await;
    let volatile_generation = seeded_generations.iter().any(|g| *g > 1);
    compare(fixture, answer, server.addr().port(), volatile_generation)
}

fn compare(fixture: &Fixture, answer: Answer, port: u16, volatile_generation: bool) -> Result<(), String> {
    let expected = &fixture.response;
    let mut problems = Vec::new();
    if u64::from(answer.status) != expected["status"].as_u64().unwrap_or(0) {
        problems.push(format!("status {} (recorded {})", answer.status, expected["status"]));
    }
    let recorded_type = expected["headers"]["Content-Type"].as_str().unwrap_or_default();
    if media(&answer.content_type) != media(recorded_type) {
        problems.push(format!("Content-Type {:?} (recorded {recorded_type:?})", answer.content_type));
    }
    let recorded_warning = expected["headers"]["Warning"].as_str().map(str::to_owned);
    if answer.warning != recorded_warning {
        problems.push(format!("Warning {:?} (recorded {recorded_warning:?})", answer.warning));
    }
    let allocated = fixture.request["method"] == "POST" || fixture.request["method"] == "PATCH";
    let (mut got, mut want) = (answer.body, expected["body"].clone());
    for value in [&mut got, &mut want] {
        normalise(value, allocated);
        without_server_address(value, port);
        if fixture.request["path"].as_str().is_some_and(|p| p.starts_with("/apis/metallb.io")) {
            sort_causes(value);
        }
        if volatile_generation {
            // A seed cannot recreate a generation above 1.
            if let Some(meta) = value["metadata"].as_object_mut() {
                meta.remove("generation");
            }
        }
    }
    if got != want {
        let mut differences = Vec::new();
        differ("", &got, &want, &mut differences);
        problems.push(format!("body differs at {}", differences.join("; ")));
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n    ")) }
}

#[tokio::test(flavor = "current_thread")]
async fn the_emulator_answers_every_recorded_exchange_as_the_real_server_did() {
    let all = fixtures();
    assert!(all.len() > 200, "the fixtures are there: {}", all.len());
    let history = history(&all);
    let mut failures = Vec::new();
    let mut replayed = 0;
    let only = std::env::var("FIXTURE").ok();
    for fixture in all.iter().filter(|f| is_main_run(f) && not_replayed(&f.name).is_none()) {
        if only.as_ref().is_some_and(|only| !fixture.name.starts_with(only.as_str())) {
            continue;
        }
        replayed += 1;
        if let Err(problem) = replay(fixture, &all, &history).await {
            failures.push(format!("{}: {}\n    {problem}", fixture.name, fixture.description));
        }
    }
    assert!(only.is_some() || replayed > 150, "most fixtures are replayed: {replayed}");
    assert!(
        failures.is_empty(),
        "{} of {replayed} fixtures answered differently:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_fixture_left_out_is_left_out_for_a_stated_reason_that_still_applies() {
    let all = fixtures();
    for (prefix, why) in NOT_REPLAYED {
        assert!(!why.is_empty());
        assert!(
            all.iter().any(|f| f.name == *prefix || f.name.starts_with(prefix)),
            "NOT_REPLAYED names {prefix}, which no fixture matches"
        );
    }
}
