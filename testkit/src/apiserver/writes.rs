//! Writes: create, update (PUT), patch (merge, JSON, strategic, apply), delete, delete of a
//! collection, and the TokenRequest API. Every write decodes its result as the real server does
//! (`schema`, `crd`), then defaults and validates it (`resources`), then stores it.
//!
//! Server-side apply is answered as a merge patch: field ownership is not tracked, so an apply
//! never conflicts (ringlb does not apply; `apiserver_fixtures.rs` lists the fixtures this skips).

#![allow(clippy::result_large_err, reason = "the error is the answer a request gets, built once per request")]

use std::collections::HashMap;

use hyper::Response;
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::convert;
use super::crd;
use super::handler::{
    Body, Shared, Target, conflict, details, invalid, json_response, not_found, status, strip_type,
    with_warnings,
};
use super::rbac::Identity;
use super::reads::selectors;
use super::resources::{self, Cause, ResourceType, TYPES};
use super::schema::{self, Unknown};
use super::store::{Key, Store};
use super::strategic;

/// `POST serviceaccounts/NAME/token` (the TokenRequest API): a new bearer token for that
/// ServiceAccount, valid from now on.
pub(crate) fn token_request(shared: &Shared, target: &Target, body: &Bytes) -> Response<Body> {
    let (namespace, name) =
        (target.namespace.clone().unwrap_or_default(), target.name.clone().unwrap_or_default());
    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    if !store.objects.contains_key(&target.key(&name)) {
        return not_found(target.type_(), &name);
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(json!({}));
    let expiration = request["spec"]["expirationSeconds"].as_i64().unwrap_or(3600);
    let token = format!("emulated.{}.{}", name, store.name_suffix());
    drop(store);
    let user = format!("system:serviceaccount:{namespace}:{name}");
    shared.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone(), Identity::new(&user, &[]));
    let answer = json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": super::store::now_rfc3339()},
        "spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"], "expirationSeconds": expiration, "boundObjectRef": null},
        "status": {"token": token, "expirationTimestamp": super::store::rfc3339_in(expiration)},
    });
    json_response(201, &answer)
}

/// Parses a request body as a JSON object of the target's kind; the real server's 400s otherwise.
fn parse_object(target: &Target, body: &Bytes) -> Result<Value, Response<Body>> {
    let type_ = target.type_();
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => {
            let text = String::from_utf8_lossy(body);
            let snippet: String = text.chars().take(30).collect();
            let snippet = if text.chars().count() > 30 { format!("{snippet} ...") } else { snippet };
            let message = format!(
                "the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: {} ({snippet})",
                type_.kind,
                go_json_error(&error, body)
            );
            return Err(status(400, "BadRequest", message, None));
        }
    };
    if !value.is_object() {
        let message = format!(
            "the object provided is unrecognized (must be of type {}): couldn't get version/kind; json parse error: json: cannot unmarshal {} into Go value of type struct",
            type_.kind,
            if value.is_array() { "array" } else { "string" }
        );
        return Err(status(400, "BadRequest", message, None));
    }
    let (kind, api_version) =
        (value["kind"].as_str().unwrap_or(type_.kind), value["apiVersion"].as_str().unwrap_or_default());
    if kind != type_.kind && !type_.custom {
        let version = api_version.rsplit('/').next().unwrap_or_default();
        let internal =
            if type_.group.is_empty() { "core" } else { type_.group.split('.').next().unwrap_or_default() };
        let message = format!(
            "{kind} in version \"{version}\" cannot be handled as a {}: converting ({version}.{kind}) to ({internal}.{}): unknown conversion",
            type_.kind, type_.kind
        );
        return Err(status(400, "BadRequest", message, None));
    }
    if kind != type_.kind {
        let message =
            format!("the kind in the data ({kind}) does not match the expected kind ({})", type_.kind);
        return Err(status(400, "BadRequest", message, None));
    }
    if !api_version.is_empty() && api_version != type_.api_version() {
        let message = format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            type_.api_version()
        );
        // The real server has already pruned the body against the schema it took it for.
        let warnings: Vec<String> = value
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, _)| key)
            .filter(|key| type_.custom && !["apiVersion", "kind", "metadata"].contains(&key.as_str()))
            .map(|key| format!("unknown field \"{key}\""))
            .collect();
        return Err(with_warnings(status(400, "BadRequest", message, None), &warnings));
    }
    Ok(value)
}

/// Go's `encoding/json` wording of a syntax error.
fn go_json_error(error: &serde_json::Error, body: &[u8]) -> String {
    if error.is_eof() {
        return "unexpected end of JSON input".to_owned();
    }
    let at = body.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(0);
    format!(
        "invalid character {} looking for beginning of value",
        go_quote_byte(body.get(at).copied().unwrap_or(b' '))
    )
}

/// A byte as Go's `%q` of a rune writes it: `'x'`, or `'\u009e'` for one that does not print.
pub(crate) fn go_quote_byte(byte: u8) -> String {
    if byte.is_ascii_graphic() || byte == b' ' {
        format!("'{}'", byte as char)
    } else {
        format!("'\\u{byte:04x}'")
    }
}

/// Decodes a written object (in the served shape of `target`) as the real server would: its
/// warnings, or the 400/422 answer.
fn decode(
    target: &Target,
    object: &mut Value,
    query: &HashMap<String, String>,
) -> Result<Vec<String>, Response<Body>> {
    let type_ = target.type_();
    let unknown = Unknown::of(query.get("fieldValidation"));
    let cannot = |error: String| {
        let version = type_.version;
        status(
            400,
            "BadRequest",
            format!("{} in version \"{version}\" cannot be handled as a {}: {error}", type_.kind, type_.kind),
            None,
        )
    };
    if type_.custom {
        return match crd::decode(type_.kind, object, unknown) {
            crd::Outcome::Valid(warnings) => Ok(warnings),
            crd::Outcome::Strict(error) => Err(cannot(error)),
            crd::Outcome::Invalid(causes, warnings) => {
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                Err(with_warnings(invalid(type_, &name, causes), &warnings))
            }
        };
    }
    match schema::of(type_.kind, type_.group) {
        Some(schema) => schema::decode(schema, object, unknown).map_err(cannot),
        None => Ok(Vec::new()),
    }
}

pub(crate) fn create(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Response<Body> {
    let type_ = target.type_();
    let mut object = match parse_object(target, body) {
        Ok(object) => object,
        Err(response) => return response,
    };
    let warnings = match decode(target, &mut object, query) {
        Ok(warnings) => warnings,
        Err(response) => return response,
    };
    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    if let (Some(path), Some(body)) = (&target.namespace, object["metadata"]["namespace"].as_str())
        && path != body
    {
        return status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request"
                .to_owned(),
            None,
        );
    }
    if let Some(namespace) = &target.namespace {
        object["metadata"]["namespace"] = json!(namespace);
        let namespaces = super::store::type_of("Namespace");
        if !store.objects.contains_key(&(namespaces, String::new(), namespace.clone())) {
            return status(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
                Some(json!({"name": namespace, "kind": "namespaces"})),
            );
        }
    }
    if object["metadata"]["name"].as_str().is_none_or(str::is_empty)
        && let Some(prefix) = object["metadata"]["generateName"].as_str().map(str::to_owned)
    {
        object["metadata"]["name"] = json!(format!("{prefix}{}", store.name_suffix()));
    }
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned).filter(|n| !n.is_empty()) else {
        return invalid(
            type_,
            "",
            vec![Cause::required("metadata.name", "name or generateName is required")],
        );
    };
    if let Some(cause) = name_cause(type_, &name) {
        return invalid(type_, &name, vec![cause]);
    }
    let key = target.key(&name);
    if store.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", type_.qualified()),
            Some(details(type_, &name)),
        );
    }
    strip_type(&mut object);
    resources::default_new(type_.kind, &mut object);
    let causes = resources::validate(type_, &object, None);
    if !causes.is_empty() {
        return invalid(type_, &name, causes);
    }
    if type_.kind == "Service" && store.node_ports_exhausted(&object) {
        return node_ports_full();
    }
    let warnings = [warnings, resources::warnings(type_.kind, &object)].concat();
    let object = convert::to_storage(type_, object);
    let stored = if query.get("dryRun").is_some_and(|d| d == "All") {
        store.dry_run(key.0, object)
    } else {
        store.insert_new(key.0, &key.1, object)
    };
    with_warnings(json_response(201, &convert::present(type_, &stored)), &warnings)
}

/// What the real server answers when a Service needs a node port and the range is full (it is
/// not a field error: the allocator failed).
fn node_ports_full() -> Response<Body> {
    let cause = "failed to allocate a nodePort: range is full";
    let details = serde_json::json!({"causes": [{"message": cause}]});
    status(500, "InternalError", format!("Internal error occurred: {cause}"), Some(details))
}

/// The real server's name rules: DNS-1035 labels for Services, DNS-1123 subdomains otherwise.
fn name_cause(type_: &ResourceType, name: &str) -> Option<Cause> {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if type_.kind == "Service" {
        let ok = label(name) && name.as_bytes()[0].is_ascii_lowercase();
        return (!ok).then(|| {
            Cause::invalid("metadata.name", &json!(name), "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")
        });
    }
    let ok = name.len() <= 253 && name.split('.').all(label);
    (!ok).then(|| Cause::invalid("metadata.name", &json!(name), "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"))
}

pub(crate) fn update(
    shared: &Shared,
    target: &Target,
    name: &str,
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Response<Body> {
    let type_ = target.type_();
    let mut incoming = match parse_object(target, body) {
        Ok(object) => object,
        Err(response) => return response,
    };
    let warnings = match decode(target, &mut incoming, query) {
        Ok(warnings) => warnings,
        Err(response) => return response,
    };
    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    let key = target.key(name);
    let Some(current) = store.objects.get(&key).cloned() else { return not_found(type_, name) };
    if let Some(asked) = incoming["metadata"]["resourceVersion"].as_str()
        && asked != current["metadata"]["resourceVersion"].as_str().unwrap_or_default()
    {
        return conflict(type_, name);
    }
    write(&mut store, target, &key, &current, incoming, warnings)
}

pub(crate) fn patch(
    shared: &Shared,
    target: &Target,
    name: &str,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &Bytes,
) -> Response<Body> {
    let type_ = target.type_();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let apply = media == "application/apply-patch+yaml";
    if ![
        "application/merge-patch+json",
        "application/apply-patch+yaml",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
    ]
    .contains(&media)
        || (media == "application/strategic-merge-patch+json" && type_.custom)
    {
        return status(
            415,
            "UnsupportedMediaType",
            "415: Unsupported Media Type".to_owned(),
            Some(json!({})),
        );
    }
    if apply && query.get("fieldManager").is_none_or(|m| m.is_empty()) {
        let message = "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch";
        return status(
            422,
            "Invalid",
            message.to_owned(),
            Some(
                json!({"group": "meta.k8s.io", "kind": "PatchOptions", "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]}),
            ),
        );
    }
    let patch: Value = match serde_json::from_slice(body) {
        Ok(patch) => patch,
        Err(error) => {
            return status(
                400,
                "BadRequest",
                format!("error decoding patch: {}", go_json_error(&error, body)),
                None,
            );
        }
    };
    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    let key = target.key(name);
    let Some(current) = store.objects.get(&key).cloned() else {
        if apply && target.subresource.is_none() {
            drop(store);
            return create(shared, target, query, body);
        }
        return not_found(type_, name);
    };
    let mut patched = convert::served(type_, &current);
    match media {
        "application/merge-patch+json" | "application/apply-patch+yaml" => {
            json_patch::merge(&mut patched, &patch)
        }
        "application/strategic-merge-patch+json" => strategic::apply(type_.kind, &mut patched, &patch),
        _ => {
            let operations: json_patch::Patch = match serde_json::from_value(patch.clone()) {
                Ok(operations) => operations,
                Err(error) => {
                    return status(400, "BadRequest", format!("error decoding patch: {error}"), None);
                }
            };
            if let Err(error) = json_patch::patch(&mut patched, &operations) {
                return status(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {error}"),
                    None,
                );
            }
        }
    }
    if let Some(asked) = patch["metadata"]["resourceVersion"].as_str()
        && asked != current["metadata"]["resourceVersion"].as_str().unwrap_or_default()
    {
        return conflict(type_, name);
    }
    let warnings = match decode(target, &mut patched, query) {
        Ok(warnings) => warnings,
        Err(response) => return response,
    };
    write(&mut store, target, &key, &current, patched, warnings)
}

/// What a write of `incoming` (served shape) over `current` (stored) keeps: identity fields, and
/// for a type with a status subresource, a main write keeps the old status while a status write
/// keeps all the rest.
fn merge_write(target: &Target, current: &Value, mut incoming: Value) -> Value {
    let type_ = target.type_();
    let current = convert::served(type_, current);
    strip_type(&mut incoming);
    if !incoming["metadata"].is_object() {
        incoming["metadata"] = json!({});
    }
    for field in [
        "uid",
        "creationTimestamp",
        "resourceVersion",
        "generation",
        "namespace",
        "name",
        "deletionTimestamp",
    ] {
        match current["metadata"].get(field) {
            Some(value) => incoming["metadata"][field] = value.clone(),
            None => {
                incoming["metadata"].as_object_mut().map(|m| m.remove(field));
            }
        }
    }
    if type_.status {
        if target.subresource.is_some() {
            let mut next = current.clone();
            strip_type(&mut next);
            next["status"] = incoming.get("status").cloned().unwrap_or(json!({}));
            return next;
        }
        match current.get("status") {
            Some(status) => incoming["status"] = status.clone(),
            None => {
                incoming.as_object_mut().map(|o| o.remove("status"));
            }
        }
    }
    incoming
}

/// Defaults, validates and stores `incoming` (served shape) over `current` (stored).
fn write(
    store: &mut Store,
    target: &Target,
    key: &Key,
    current: &Value,
    incoming: Value,
    warnings: Vec<String>,
) -> Response<Body> {
    let type_ = target.type_();
    let name = key.2.as_str();
    let mut next = merge_write(target, current, incoming);
    let old = convert::served(type_, current);
    let causes = if target.subresource.is_some() {
        resources::default_status(type_.kind, &mut next);
        if type_.kind == "Service" { resources::validate_service_status(&next) } else { Vec::new() }
    } else {
        resources::default_new(type_.kind, &mut next);
        resources::validate(type_, &next, Some(&old))
    };
    if !causes.is_empty() {
        return invalid(type_, name, causes);
    }
    if type_.kind == "Service" && target.subresource.is_none() && store.node_ports_exhausted(&next) {
        return node_ports_full();
    }
    let warnings = [warnings, resources::warnings(type_.kind, &next)].concat();
    let stored = store.replace(key, convert::to_storage(type_, next));
    with_warnings(json_response(200, &convert::present(type_, &stored)), &warnings)
}

pub(crate) fn delete(shared: &Shared, target: &Target, name: &str, body: &Bytes) -> Response<Body> {
    let type_ = target.type_();
    let options: Value = serde_json::from_slice(body).unwrap_or(json!({}));
    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    let key = target.key(name);
    let Some(current) = store.objects.get(&key) else { return not_found(type_, name) };
    let preconditions = &options["preconditions"];
    for (field, label, hint) in
        [("uid", "UID", "deleted and then recreated"), ("resourceVersion", "ResourceVersion", "modified")]
    {
        let (Some(wanted), Some(actual)) =
            (preconditions[field].as_str(), current["metadata"][field].as_str())
        else {
            continue;
        };
        if wanted != actual {
            let qualified = if type_.group.is_empty() {
                type_.kind.to_owned()
            } else {
                format!("{}.{}", type_.kind, type_.group)
            };
            let message = format!(
                "Operation cannot be fulfilled on {qualified} \"{name}\": the {label} in the precondition ({wanted}) does not match the {label} in record ({actual}). The object might have been {hint}"
            );
            let mut details = json!({"name": name, "kind": type_.kind});
            if !type_.group.is_empty() {
                details["group"] = json!(type_.group);
            }
            return status(409, "Conflict", message, Some(details));
        }
    }
    if type_.kind == "Namespace" {
        return delete_namespace(&mut store, &key);
    }
    let Some(deleted) = store.remove(&key) else { return not_found(type_, name) };
    if type_.delete_returns_object {
        return json_response(200, &convert::present(type_, &deleted));
    }
    let mut details = details(type_, name);
    details["uid"] = deleted["metadata"]["uid"].clone();
    json_response(
        200,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
    )
}

/// Deletes a namespace: answers it `Terminating` (as the real server does), then finalises it as a
/// cluster's namespace controller would, deleting everything in it (watchers see each DELETED) and
/// then the namespace.
fn delete_namespace(store: &mut Store, key: &Key) -> Response<Body> {
    let type_ = &TYPES[key.0];
    let Some(mut namespace) = store.objects.get(key).cloned() else { return not_found(type_, &key.2) };
    namespace["metadata"]["deletionTimestamp"] = json!(super::store::now_rfc3339());
    namespace["status"] = json!({"phase": "Terminating"});
    let terminating = store.replace(key, namespace);
    let contents: Vec<Key> =
        store.objects.keys().filter(|(t, ns, _)| TYPES[*t].namespaced && *ns == key.2).cloned().collect();
    for content in contents {
        store.remove(&content);
    }
    store.remove(key);
    json_response(200, &convert::present(type_, &terminating))
}

/// `DELETE` on a collection: every object the selectors match, answered as the list of them.
pub(crate) fn delete_collection(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (labels, fields) = match selectors(target, query) {
        Ok(selectors) => selectors,
        Err(response) => return response,
    };
    let type_ = target.type_();
    let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    let doomed: Vec<Key> = store
        .objects
        .iter()
        .filter(|(key, object)| {
            key.0 == target.storage_index()
                && target.namespace.as_ref().is_none_or(|ns| &key.1 == ns)
                && labels.matches(object)
                && fields.matches(object)
        })
        .map(|(key, _)| key.clone())
        .collect();
    let items: Vec<Value> = doomed
        .iter()
        .filter_map(|key| store.remove(key))
        .map(|object| convert::present(type_, &object))
        .collect();
    let revision = store.revision;
    json_response(
        200,
        &json!({"kind": format!("{}List", type_.kind), "apiVersion": type_.api_version(), "metadata": {"resourceVersion": revision.to_string()}, "items": items}),
    )
}
