//! Reads: get, list (selectors, `limit`/`continue`, resourceVersion rules) and watch (initial
//! events, history replay, bookmarks, timeouts, `410 Gone`), each answered in the shape of the
//! type asked for (`convert::present`).

#![allow(clippy::result_large_err, reason = "the error is the answer a request gets, built once per request")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::Response;
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::convert;
use super::handler::{Body, Media, Shared, Target, is_true, json_response, not_found, status};
use super::resources::ResourceType;
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{Event, Key};

pub(crate) fn get(shared: &Shared, target: &Target, name: &str, media: Media) -> Response<Body> {
    let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    match store.objects.get(&target.key(name)) {
        Some(object) => json_response(200, &media.show(convert::present(target.type_(), object))),
        None => not_found(target.type_(), name),
    }
}

pub(crate) fn selectors(
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), Response<Body>> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(|message| status(400, "BadRequest", message, None))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str), target.type_())
        .map_err(|message| status(400, "BadRequest", message, None))?;
    Ok((labels, fields))
}

pub(crate) fn list(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
    media: Media,
) -> Response<Body> {
    let (labels, fields) = match selectors(target, query) {
        Ok(selectors) => selectors,
        Err(response) => return response,
    };
    if query.contains_key("resourceVersionMatch") && query.get("resourceVersion").is_none_or(String::is_empty)
    {
        let message = "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided";
        let cause = json!({"reason": "FieldValueForbidden", "message": "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided", "field": "resourceVersionMatch"});
        return status(
            422,
            "Invalid",
            message.to_owned(),
            Some(json!({"group": "meta.k8s.io", "kind": "ListOptions", "causes": [cause]})),
        );
    }
    let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    let revision = store.revision;
    if let Some(asked) = query.get("resourceVersion").and_then(|rv| rv.parse::<u64>().ok())
        && asked > revision
    {
        let message = format!("Timeout: Too large resource version: {asked}, current: {revision}");
        return status(
            504,
            "Timeout",
            message,
            Some(
                json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
            ),
        );
    }
    let asked = query.get("resourceVersion").and_then(|rv| rv.parse::<u64>().ok()).filter(|&rv| rv > 0);
    let exact =
        query.get("resourceVersionMatch").is_some_and(|m| m == "Exact") || query.contains_key("limit");
    if let Some(asked) = asked
        && exact
        && asked < store.compacted
    {
        // An exact (or paged) read at an old revision goes to etcd, which has compacted it away.
        return status(
            410,
            "Expired",
            "The resourceVersion for the provided list is too old.".to_owned(),
            None,
        );
    }
    let start = match query.get("continue") {
        None => None,
        Some(token) => match decode_continue(token) {
            Ok((token_revision, start)) if token_revision < 0 || token_revision as u64 >= store.compacted => {
                Some(start)
            }
            Ok((_, start)) => {
                let message = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";
                // With a fresh token that continues from the same key at the current state.
                let mut response = json!({"kind": "Status", "apiVersion": "v1", "metadata": {"continue": encode_continue(-1, &start)}, "status": "Failure", "message": message, "reason": "Expired", "code": 410});
                response.as_object_mut().map(|o| o.remove("details"));
                return json_response(410, &response);
            }
            Err(error) => {
                return status(
                    400,
                    "BadRequest",
                    format!("invalid continue token: continue key is not valid: {error}"),
                    None,
                );
            }
        },
    };
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|&l| l > 0);
    let type_ = target.type_();
    let matching: Vec<(&Key, &Value)> = store
        .objects
        .iter()
        .filter(|(key, _)| key.0 == target.storage_index())
        .filter(|(key, _)| target.namespace.as_ref().is_none_or(|ns| &key.1 == ns))
        .filter(|(key, _)| start.as_ref().is_none_or(|start| position(key) > *start))
        .filter(|(_, object)| labels.matches(object) && fields.matches(object))
        .collect();
    let page: Vec<&(&Key, &Value)> = matching.iter().take(limit.unwrap_or(usize::MAX)).collect();
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if type_.custom {
        // The apiextensions server always writes the key.
        metadata["continue"] = json!("");
    }
    if let Some(limit) = limit
        && matching.len() > limit
    {
        let last = page.last().map(|(key, _)| position(key)).unwrap_or_default();
        metadata["continue"] = json!(encode_continue(revision as i64, &last));
        metadata["remainingItemCount"] = json!(matching.len() - limit);
    }
    if media == Media::Metadata {
        let items: Vec<Value> =
            page.iter().map(|(_, object)| media.show(convert::present(type_, object))).collect();
        let list = json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "items": items});
        return json_response(200, &list);
    }
    let items: Vec<Value> = page
        .iter()
        .map(|(_, object)| {
            let mut item = convert::present(type_, object);
            // Items of built-in types carry no kind or apiVersion; custom resources' do.
            if !type_.custom {
                item.as_object_mut().map(|o| {
                    o.remove("kind");
                    o.remove("apiVersion")
                });
            }
            item
        })
        .collect();
    json_response(
        200,
        &json!({"kind": format!("{}List", type_.kind), "apiVersion": type_.api_version(), "metadata": metadata, "items": items}),
    )
}

/// `ns/name` as continue tokens order objects (the real server's key order).
fn position(key: &Key) -> String {
    if key.1.is_empty() { key.2.clone() } else { format!("{}/{}", key.1, key.2) }
}

fn encode_continue(revision: i64, start: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": revision, "start": format!("{start}\u{0}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

/// The revision and start key of a continue token, or Go's decoding error.
fn decode_continue(token: &str) -> Result<(i64, String), String> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(token.trim_end_matches('='))
        .map_err(|error| format!("illegal base64 data: {error}"))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| {
        let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace()).unwrap_or(b' ');
        format!("invalid character {} looking for beginning of value", go_rune(first))
    })?;
    let start = value["start"].as_str().ok_or("no start key")?.trim_end_matches('\u{0}').to_owned();
    Ok((value["rv"].as_i64().ok_or("no resourceVersion")?, start))
}

/// A byte as Go's `%q` writes the rune: `'x'`, or `'\u009e'` for one that does not print.
fn go_rune(byte: u8) -> String {
    if byte.is_ascii_graphic() { format!("'{}'", byte as char) } else { format!("'\\u{byte:04x}'") }
}

pub(crate) fn watch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    media: Media,
) -> Response<Body> {
    let (labels, fields) = match selectors(target, query) {
        Ok(selectors) => selectors,
        Err(response) => return response,
    };
    if query.contains_key("sendInitialEvents") {
        let message = "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled";
        return status(
            422,
            "Invalid",
            message.to_owned(),
            Some(
                json!({"kind": "ListOptions", "group": "meta.k8s.io", "causes": [{"reason": "FieldValueForbidden", "message": "Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled", "field": "sendInitialEvents"}]}),
            ),
        );
    }
    let timeout = match query.get("timeoutSeconds").and_then(|t| t.parse::<i64>().ok()) {
        Some(seconds) if seconds < 0 => Duration::ZERO,
        Some(0) | None => shared.watch_timeout,
        Some(seconds) => Duration::from_secs(seconds.unsigned_abs()),
    };
    let bookmarks = is_true(query.get("allowWatchBookmarks"));
    let type_ = target.type_();
    let filter = Filter {
        type_,
        storage: target.storage_index(),
        namespace: target.namespace.clone(),
        labels,
        fields,
        media,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    let live = store.feed.subscribe();
    let cut = store.cut.subscribe();
    let from = query.get("resourceVersion").map(String::as_str).unwrap_or("");
    let mut initial: Vec<Value> = Vec::new();
    let mut gone = false;
    match from.parse::<u64>() {
        // Unset or 0: a synthetic ADDED for everything there is, then what comes.
        Err(_) | Ok(0) => {
            for (key, object) in &store.objects {
                if filter.matches_key(key) && filter.matches(object) {
                    initial.push(
                        json!({"type": "ADDED", "object": media.show(convert::present(type_, object))}),
                    );
                }
            }
        }
        Ok(revision) => match store.since(revision) {
            Some(events) => {
                initial.extend(events.iter().filter_map(|e| filter.line(e)));
            }
            None => {
                gone = true;
                let message = format!("too old resource version: {revision} ({})", store.compacted + 1);
                initial.push(json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": "Expired", "code": 410}}));
            }
        },
    }
    let seen = store.revision;
    drop(store);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        for line in initial {
            if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                return;
            }
        }
        if !gone {
            stream_events(&shared, tx, live, cut, filter, seen, timeout, bookmarks).await;
        }
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("a header"));
    response
}

#[allow(clippy::too_many_arguments, reason = "one watch's whole state, handed over once")]
async fn stream_events(
    shared: &Shared,
    tx: mpsc::Sender<Bytes>,
    mut live: broadcast::Receiver<Arc<Event>>,
    mut cut: tokio::sync::watch::Receiver<u64>,
    filter: Filter,
    seen: u64,
    timeout: Duration,
    bookmarks: bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bookmark = tokio::time::interval_at(
        tokio::time::Instant::now() + shared.bookmark_interval,
        shared.bookmark_interval,
    );
    // The real cache sends one about 2 s before the deadline too (none for a watch of 2 s or less).
    let mut last_call = (timeout > Duration::from_secs(2)).then(|| deadline - Duration::from_secs(2));
    let type_ = filter.type_;
    loop {
        let line = tokio::select! {
            event = live.recv() => match event {
                Ok(event) if event.revision > seen => match filter.line(&event) {
                    Some(line) => line,
                    None => continue,
                },
                Ok(_) => continue,
                // A watcher that fell too far behind is cut, as the real server does; it resumes.
                Err(_) => return,
            },
            () = tokio::time::sleep_until(deadline) => return,
            () = tokio::time::sleep_until(last_call.unwrap_or(deadline)), if bookmarks && last_call.is_some() => {
                last_call = None;
                let revision = shared.store.lock().unwrap_or_else(|e| e.into_inner()).revision;
                bookmark_line(type_, revision)
            }
            _ = bookmark.tick(), if bookmarks => {
                let revision = shared.store.lock().unwrap_or_else(|e| e.into_inner()).revision;
                bookmark_line(type_, revision)
            }
            _ = cut.changed() => return,
        };
        if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
            return;
        }
    }
}

struct Filter {
    /// The type watched (what events are shown as).
    type_: &'static ResourceType,
    /// Where its objects are stored.
    storage: usize,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    media: Media,
}

impl Filter {
    fn matches_key(&self, key: &Key) -> bool {
        key.0 == self.storage && self.namespace.as_ref().is_none_or(|ns| &key.1 == ns)
    }

    fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The line a watch with this filter shows for `event`, if any: a change that makes an
    /// object start matching is ADDED, one that makes it stop is DELETED carrying the last
    /// matching content with the new resourceVersion.
    fn line(&self, event: &Event) -> Option<Value> {
        if event.type_index != self.storage
            || self.namespace.as_ref().is_some_and(|ns| &event.namespace != ns)
        {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.previous.as_ref().map(|previous| self.matches(previous));
        let (kind, object) = match (event.kind, before, now) {
            ("MODIFIED", Some(false), true) => ("ADDED", event.object.clone()),
            ("MODIFIED", Some(true), false) => {
                let mut last = event.previous.clone().unwrap_or_default();
                last["metadata"]["resourceVersion"] = event.object["metadata"]["resourceVersion"].clone();
                ("DELETED", last)
            }
            (_, _, true) => (event.kind, event.object.clone()),
            _ => return None,
        };
        Some(json!({"type": kind, "object": self.media.show(convert::present(self.type_, &object))}))
    }
}

/// A BOOKMARK: an empty object of the kind (as Go writes an empty one) with the revision.
fn bookmark_line(type_: &ResourceType, revision: u64) -> Value {
    let mut object = json!({"kind": type_.kind, "apiVersion": type_.api_version(), "metadata": {"resourceVersion": revision.to_string()}});
    if !type_.custom {
        object["metadata"]["creationTimestamp"] = Value::Null;
    }
    match type_.kind {
        "Service" => {
            object["spec"] = json!({});
            object["status"] = json!({"loadBalancer": {}});
        }
        "EndpointSlice" => {
            object["addressType"] = json!("");
            object["endpoints"] = Value::Null;
            object["ports"] = Value::Null;
        }
        "Lease" | "Namespace" => object["spec"] = json!({}),
        _ => {}
    }
    if type_.kind == "Namespace" {
        object["status"] = json!({});
    }
    json!({"type": "BOOKMARK", "object": object})
}

/// A response body fed by a channel: the watch stream.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|bytes| bytes.map(|b| Ok(Frame::data(b))))
    }
}
