//! Holds the emulator's watches and resourceVersion rules to the recordings: the writes a watch
//! fixture's timeline describes are made again and each event must match the recorded one (type
//! and object, normalised); the rules the fixtures README states (bookmarks, timeouts, 410 Gone
//! after compaction and restart, lists at old versions) are checked as rules, never by time.
//!
//! Left out: the second and third recorded runs (WatchList on, watch cache off): the emulator is
//! the first run's server.

mod fixtures;

use std::time::Duration;

use fixtures::{Fixture, client, fixture, normalise, seed, send};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use testkit::apiserver::{ADMIN_TOKEN, ApiServer};

/// An open watch: its events as they arrive, `None` once the server ends the stream.
struct Watch {
    body: kube::client::Body,
    buffer: Vec<u8>,
}

impl Watch {
    async fn open(client: &kube::Client, path_and_query: &str) -> Watch {
        let request =
            http::Request::get(path_and_query).body(kube::client::Body::empty()).expect("a request");
        let response = client.send(request).await.expect("the watch is answered");
        assert_eq!(response.status(), 200, "a watch is HTTP 200 whatever it then says");
        Watch { body: response.into_body(), buffer: Vec::new() }
    }

    /// The next event; `None` when the stream ended. A stream that neither sends nor ends within
    /// `limit` is a failure (every watch here has a timeoutSeconds well inside it).
    async fn next(&mut self, limit: Duration) -> Option<Value> {
        loop {
            if let Some(at) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=at).collect();
                return Some(serde_json::from_slice(&line).expect("each line is a JSON event"));
            }
            let frame = tokio::time::timeout(limit, self.body.frame())
                .await
                .expect("the watch sends or ends in time");
            match frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buffer.extend_from_slice(data);
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Every remaining event up to the end of the stream.
    async fn rest(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        while let Some(event) = self.next(Duration::from_secs(20)).await {
            events.push(event);
        }
        events
    }
}

async fn admin(server: &ApiServer) -> kube::Client {
    client(server, Some(ADMIN_TOKEN)).await
}

fn recorded_events(fixture: &Fixture) -> Vec<Value> {
    fixture.response["events"].as_array().cloned().expect("a watch fixture has events")
}

/// `got` and `want` as equal as two runs can make them.
fn assert_same_object(got: &Value, want: &Value, what: &str) {
    let (mut got, mut want) = (got.clone(), want.clone());
    normalise(&mut got, true);
    normalise(&mut want, true);
    assert_eq!(got, want, "{what}");
}

async fn write(client: &kube::Client, method: &str, path: &str, content_type: &str, body: &Value) -> Value {
    let answer = send(client, method, path, &[("Content-Type", content_type)], Some(body)).await;
    assert!(answer.status < 300, "{method} {path}: {} {}", answer.status, answer.body);
    answer.body
}

async fn list_version(client: &kube::Client, path: &str) -> String {
    let answer = send(client, "GET", path, &[], None).await;
    answer.body["metadata"]["resourceVersion"].as_str().expect("a list resourceVersion").to_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn a_watch_from_a_list_version_sees_each_write_then_a_bookmark_and_ends_cleanly() {
    let recorded = fixture("watch/services-added-modified-deleted-bookmark");
    let server = ApiServer::start();
    let client = admin(&server).await;
    seed(
        &client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ringlb-fx"}}),
        &mut Default::default(),
    )
    .await
    .expect("namespace");
    let from = list_version(&client, "/api/v1/namespaces/ringlb-fx/services").await;
    let mut watch = Watch::open(
        &client,
        &format!("/api/v1/namespaces/ringlb-fx/services?watch=true&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds=5"),
    )
    .await;
    let expected = recorded_events(&recorded);
    let writes = [
        "services/create-for-watch",
        "services/patch-merge-labels",
        "services/patch-strategic-ports",
        "services/patch-json-patch",
        "services/delete",
    ];
    for (i, name) in writes.iter().enumerate() {
        let step = fixture(name);
        let request = &step.request;
        let content_type = request["headers"]["Content-Type"].as_str().unwrap_or("application/json");
        let answer = write(
            &client,
            request["method"].as_str().unwrap(),
            request["path"].as_str().unwrap(),
            content_type,
            &request["body"],
        )
        .await;
        let event = watch.next(Duration::from_secs(10)).await.expect("an event for each write");
        assert_eq!(event["type"], expected[i]["type"], "after {name}");
        assert_same_object(&event["object"], &expected[i]["object"], name);
        assert_eq!(
            event["object"]["metadata"]["resourceVersion"], answer["metadata"]["resourceVersion"],
            "the event carries the write's version"
        );
    }
    let rest = watch.rest().await;
    assert!(
        !rest.is_empty() && rest.iter().all(|e| e["type"] == "BOOKMARK"),
        "then bookmarks only, and the end: {rest:?}"
    );
    let mut bookmark = rest[0]["object"].clone();
    let mut want = expected.last().unwrap()["object"].clone();
    for object in [&mut bookmark, &mut want] {
        object["metadata"]["resourceVersion"] = json!("<rv>");
    }
    assert_eq!(bookmark, want, "a bookmark is an empty Service holding the version");
}

#[tokio::test(flavor = "current_thread")]
async fn a_label_selector_watch_turns_entering_and_leaving_into_added_and_deleted() {
    let recorded = fixture("watch/services-label-selector-enter-leave");
    let expected = recorded_events(&recorded);
    let server = ApiServer::start();
    let client = admin(&server).await;
    // `ext` before the timeline: as its last matching state, but labelled app=ext and unannotated.
    let mut ext = expected[2]["object"].clone();
    ext["metadata"]["labels"]["app"] = json!("ext");
    ext["metadata"].as_object_mut().unwrap().remove("annotations");
    let headless = fixture("services/create-headless").request["body"].clone();
    let mut made = Default::default();
    seed(&client, &ext, &mut made).await.expect("seed ext");
    seed(&client, &headless, &mut made).await.expect("seed headless");
    let from = list_version(&client, "/api/v1/namespaces/ringlb-fx/services").await;
    let mut watch = Watch::open(
        &client,
        &format!("/api/v1/namespaces/ringlb-fx/services?watch=true&resourceVersion={from}&labelSelector=app%3Dweb&allowWatchBookmarks=true&timeoutSeconds=4"),
    )
    .await;
    let path = "/api/v1/namespaces/ringlb-fx/services/ext";
    let merge = "application/merge-patch+json";
    let patches = [
        json!({"metadata": {"labels": {"app": "web"}}}),
        json!({"metadata": {"annotations": {"note": "x"}}}),
        json!({"metadata": {"labels": {"app": "ext"}}}),
    ];
    for (i, patch) in patches.iter().enumerate() {
        let answer = write(&client, "PATCH", path, merge, patch).await;
        let event = watch.next(Duration::from_secs(10)).await.expect("an event");
        assert_eq!(event["type"], expected[i]["type"]);
        assert_same_object(&event["object"], &expected[i]["object"], &format!("event {i}"));
        assert_eq!(event["object"]["metadata"]["resourceVersion"], answer["metadata"]["resourceVersion"]);
    }
    let deleted = &expected[2]["object"];
    assert_eq!(
        deleted["metadata"]["labels"]["app"], "web",
        "the recorded DELETED carries the last matching content"
    );
    // A write to a Service that never matches sends nothing: only bookmarks follow, then the end.
    write(
        &client,
        "PATCH",
        "/api/v1/namespaces/ringlb-fx/services/headless",
        merge,
        &json!({"metadata": {"labels": {"tier": "db"}}}),
    )
    .await;
    let rest = watch.rest().await;
    assert!(rest.iter().all(|e| e["type"] == "BOOKMARK"), "{rest:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_watch_from_version_zero_or_none_starts_with_one_added_per_object_in_key_order() {
    let recorded = fixture("watch/services-rv-0-initial-added");
    let expected = recorded_events(&recorded);
    let server = ApiServer::start();
    let client = admin(&server).await;
    let mut made = Default::default();
    // Seeded in reverse, so key order is the server's doing.
    for event in expected.iter().rev() {
        seed(&client, &event["object"], &mut made).await.expect("seed");
    }
    for query in ["resourceVersion=0&", ""] {
        let mut watch = Watch::open(&client, &format!("/api/v1/namespaces/ringlb-fx/services?watch=true&{query}allowWatchBookmarks=true&timeoutSeconds=2")).await;
        let events = watch.rest().await;
        assert_eq!(
            events.len(),
            expected.len(),
            "{query}: one ADDED per object, and no bookmark in a 2 s watch: {events:?}"
        );
        for (event, want) in events.iter().zip(&expected) {
            assert_eq!(event["type"], "ADDED");
            assert_same_object(&event["object"], &want["object"], "initial ADDED");
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn bookmarks_come_only_when_asked_for_and_a_negative_timeout_ends_at_once() {
    let server = ApiServer::start();
    let client = admin(&server).await;
    let from = list_version(&client, "/api/v1/namespaces/default/services").await;
    let recorded = fixture("watch/services-no-bookmarks-param");
    assert!(recorded_events_or_empty(&recorded).is_empty());
    let mut quiet = Watch::open(
        &client,
        &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={from}&timeoutSeconds=3"),
    )
    .await;
    assert_eq!(quiet.rest().await, Vec::<Value>::new(), "no events, no bookmarks, then the end");
    let mut asked = Watch::open(&client, &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds=3")).await;
    let events = asked.rest().await;
    assert!(!events.is_empty() && events.iter().all(|e| e["type"] == "BOOKMARK"), "{events:?}");
    assert_eq!(
        events[0]["object"]["metadata"]["resourceVersion"],
        json!(from),
        "a bookmark carries the newest version"
    );
    let negative = fixture("watch/services-timeoutseconds-negative");
    assert!(recorded_events_or_empty(&negative).is_empty());
    let mut gone = Watch::open(
        &client,
        &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={from}&timeoutSeconds=-1"),
    )
    .await;
    assert_eq!(
        gone.next(Duration::from_secs(5)).await,
        None,
        "a negative timeout ends the response with no events"
    );
}

fn recorded_events_or_empty(fixture: &Fixture) -> Vec<Value> {
    fixture.response["events"].as_array().cloned().unwrap_or_default()
}

/// The recorded ERROR event of a too-old watch, numbers normalised.
fn expired(event: &Value) -> Value {
    let mut event = event.clone();
    normalise(&mut event, false);
    event["object"]["message"] =
        json!(event["object"]["message"].as_str().unwrap_or_default().split(':').next().unwrap_or_default());
    event
}

#[tokio::test(flavor = "current_thread")]
async fn a_compacted_version_is_one_error_event_and_a_restart_needs_a_relist() {
    let recorded = recorded_events(&fixture("gone/watch-too-old-rv-error-event"));
    let after_restart = recorded_events(&fixture("watch/services-resume-after-restart"));
    let mut server = ApiServer::start();
    let client = admin(&server).await;
    let old = list_version(&client, "/api/v1/namespaces/default/services").await;
    let patch = json!({"metadata": {"labels": {"touched": "yes"}}});
    write(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/services/kubernetes",
        "application/merge-patch+json",
        &patch,
    )
    .await;
    server.compact();
    let path = format!(
        "/api/v1/namespaces/default/services?watch=true&resourceVersion={old}&allowWatchBookmarks=true&timeoutSeconds=5"
    );
    let events = Watch::open(&client, &path).await.rest().await;
    assert_eq!(events.len(), 1, "one ERROR, then the end at once: {events:?}");
    assert_eq!(expired(&events[0]), expired(&recorded[0]));

    let current = list_version(&client, "/api/v1/namespaces/default/services").await;
    let mut open = Watch::open(
        &client,
        &format!(
            "/api/v1/namespaces/default/services?watch=true&resourceVersion={current}&timeoutSeconds=30"
        ),
    )
    .await;
    server.restart();
    assert_eq!(open.next(Duration::from_secs(10)).await, None, "a restart ends open watches");
    let client = admin(&server).await;
    let resumed = Watch::open(
        &client,
        &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={current}&timeoutSeconds=5"),
    )
    .await
    .rest()
    .await;
    assert_eq!(resumed.len(), 1);
    assert_eq!(expired(&resumed[0]), expired(&after_restart[0]), "resuming from before the restart is gone");
    let fresh = list_version(&client, "/api/v1/namespaces/default/services").await;
    let mut watch = Watch::open(
        &client,
        &format!("/api/v1/namespaces/default/services?watch=true&resourceVersion={fresh}&timeoutSeconds=5"),
    )
    .await;
    let patch = json!({"metadata": {"labels": {"touched": "again"}}});
    write(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/services/kubernetes",
        "application/merge-patch+json",
        &patch,
    )
    .await;
    assert_eq!(
        watch.next(Duration::from_secs(10)).await.expect("an event")["type"],
        "MODIFIED",
        "a watch from a fresh list works"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn lists_at_old_versions_after_compaction_answer_as_etcd_and_the_watch_cache_do() {
    let server = ApiServer::start();
    let client = admin(&server).await;
    let mut made = Default::default();
    for name in ["a", "b", "c"] {
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ringlb-fx"}, "spec": {"ports": [{"port": 80}]}});
        seed(&client, &service, &mut made).await.expect("seed");
    }
    let first_page = send(&client, "GET", "/api/v1/services?limit=2", &[], None).await;
    let token = first_page.body["metadata"]["continue"].as_str().expect("a continue token").to_owned();
    let old = first_page.body["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
    write(
        &client,
        "PATCH",
        "/api/v1/namespaces/ringlb-fx/services/a",
        "application/merge-patch+json",
        &json!({"metadata": {"labels": {"x": "y"}}}),
    )
    .await;
    server.compact();
    for (query, name) in [
        (
            format!("resourceVersion={old}&resourceVersionMatch=Exact"),
            "gone/list-exact-rv-after-compaction-410",
        ),
        (format!("resourceVersion={old}&limit=2"), "gone/list-rv-limit-after-compaction-410"),
    ] {
        let answer = send(&client, "GET", &format!("/api/v1/services?{query}"), &[], None).await;
        assert_eq!((answer.status, &answer.body), (410, &fixture(name).response["body"]), "{query}");
    }
    let current = send(
        &client,
        "GET",
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=NotOlderThan"),
        &[],
        None,
    )
    .await;
    assert_eq!(current.status, 200, "NotOlderThan never expires");
    assert_ne!(current.body["metadata"]["resourceVersion"], json!(old), "and answers the current version");
    assert_eq!(
        send(&client, "GET", "/api/v1/services?limit=2", &[], None).await.status,
        200,
        "a fresh list is fine"
    );
    let single = send(
        &client,
        "GET",
        &format!("/api/v1/namespaces/ringlb-fx/services/a?resourceVersion={old}"),
        &[],
        None,
    )
    .await;
    assert_eq!(single.status, 200, "a GET at an old version means not older than it");

    let stale = send(&client, "GET", &format!("/api/v1/services?limit=2&continue={token}"), &[], None).await;
    let recorded = fixture("gone/list-continue-after-compaction-410").response["body"].clone();
    assert_eq!(stale.status, 410);
    assert_eq!((&stale.body["reason"], &stale.body["message"]), (&recorded["reason"], &recorded["message"]));
    let fresh = stale.body["metadata"]["continue"].as_str().expect("a fresh token").to_owned();
    let rest = send(&client, "GET", &format!("/api/v1/services?limit=2&continue={fresh}"), &[], None).await;
    assert_eq!(rest.status, 200, "the fresh token continues: {}", rest.body);
    let names: Vec<&str> = rest.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b", "c"], "from the same key on");
}

#[tokio::test(flavor = "current_thread")]
async fn streaming_lists_are_refused_while_the_watch_list_gate_is_off() {
    let server = ApiServer::start();
    let client = admin(&server).await;
    for name in
        ["watch/services-sendinitialevents-gate-off-422", "watch/services-sendinitialevents-rv0-gate-off-422"]
    {
        let recorded = fixture(name);
        let query: Vec<String> = recorded.request["query"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        let answer = send(
            &client,
            "GET",
            &format!("/api/v1/namespaces/default/services?{}", query.join("&")),
            &[],
            None,
        )
        .await;
        assert_eq!((answer.status, &answer.body), (422, &recorded.response["body"]), "{name}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_watch_without_permission_is_refused_before_any_stream() {
    let recorded = fixture("auth/sa-watch-endpointslices-403");
    let server = ApiServer::start();
    server.add_token("sa-token", "system:serviceaccount:ringlb-fx:ringlb");
    let client = client(&server, Some("sa-token")).await;
    let answer = send(
        &client,
        "GET",
        "/apis/discovery.k8s.io/v1/endpointslices?watch=true&allowWatchBookmarks=true&timeoutSeconds=5",
        &[],
        None,
    )
    .await;
    assert_eq!((answer.status, &answer.body), (403, &recorded.response["body"]));
}

/// A Service that needs a node port when the range (30000-32767) is full is refused as the real
/// server refuses it (the allocator's internal error), and one that asks for none is still created.
#[tokio::test(flavor = "current_thread")]
async fn a_full_node_port_range_refuses_services_that_need_one() {
    let server = ApiServer::start();
    let client = admin(&server).await;
    let service = |name: &str, ports: std::ops::Range<i64>, node_ports: bool| {
        let ports: Vec<Value> = ports.map(|p| json!({"name": format!("p{p}"), "port": p})).collect();
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "LoadBalancer", "ports": ports, "allocateLoadBalancerNodePorts": node_ports},
        })
    };
    let path = "/api/v1/namespaces/default/services";
    // 2768 node ports in 27 Services of 100 ports and one of 68.
    for i in 0..28i64 {
        let ports = if i < 27 { 1000 + i * 100..1100 + i * 100 } else { 4000..4068 };
        write(&client, "POST", path, "application/json", &service(&format!("s{i}"), ports, true)).await;
    }
    let refused = send(
        &client,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        Some(&service("one-more", 80..81, true)),
    )
    .await;
    assert_eq!(refused.status, 500, "{}", refused.body);
    assert_eq!(refused.body["reason"], "InternalError");
    assert_eq!(
        refused.body["message"],
        "Internal error occurred: failed to allocate a nodePort: range is full"
    );
    // Without node ports (as a load balancer that proxies needs none), it is created.
    write(&client, "POST", path, "application/json", &service("no-node-ports", 80..81, false)).await;
}
