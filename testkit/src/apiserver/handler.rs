//! One HTTP request to the emulator: authentication, authorization, routing to discovery, reads
//! (`reads`) and writes (`writes`), and the answers every part shares (`Status` bodies, JSON
//! responses), worded as kube-apiserver v1.32 words them (see `kube-fixtures/README.md`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::discovery::{self, api_groups, group_of, resource_list};
use super::openapi;
use super::rbac::{self, Identity};
use super::reads::{get, list, watch};
use super::resources::{self, Cause, Installed, ResourceType, TYPES};
use super::store::{Key, Store};
use super::writes::{create, delete, delete_collection, patch, token_request, update};

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// State shared by every connection of one emulator.
pub(crate) struct Shared {
    pub store: Mutex<Store>,
    /// Where the server listens (what `/api` advertises).
    pub addr: SocketAddr,
    /// Bearer token → who it is.
    pub tokens: Mutex<HashMap<String, Identity>>,
    /// How long a watch without `timeoutSeconds` lasts.
    pub watch_timeout: Duration,
    /// How often a watch with `allowWatchBookmarks` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Every request's method and path with query, in order (for tests to see what a client did).
    pub requests: Mutex<Vec<String>>,
    /// The CRDs installed: which custom types are served.
    pub installed: Mutex<Installed>,
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    Anonymous,
    Known(Identity),
    /// A bearer token the server does not know.
    BadToken,
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    certificate: Option<Identity>,
    request: Request<Incoming>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parse_query(parts.uri.query().unwrap_or_default());
    shared.requests.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
        "{} {}",
        parts.method,
        parts.uri.path_and_query().map_or(path.as_str(), |p| p.as_str())
    ));
    let caller = authenticate(&shared, certificate, &parts.headers);
    if caller == Caller::BadToken {
        return status(401, "Unauthorized", "Unauthorized".to_owned(), None);
    }
    let content_type =
        parts.headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let accept =
        parts.headers.get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return status(400, "BadRequest", "the request body could not be read".to_owned(), None),
    };
    // Public to everyone, as system:public-info-viewer makes them.
    if path == "/version" {
        return json_response(200, &discovery::version());
    }
    if path == "/healthz" || path == "/livez" || path == "/readyz" {
        return text_response(200, "ok");
    }
    let installed = shared.installed.lock().expect("installed").clone();
    let route = route(&installed, &path);
    let identity = match caller {
        Caller::Known(identity) => identity,
        _ => return anonymous_refusal(&parts.method, route.as_ref(), &path, &query),
    };
    if let Some(rest) = path.strip_prefix("/openapi/v3") {
        return match openapi::document(&installed, rest.trim_start_matches('/')) {
            Some(document) => json_response(200, &document),
            None => text_response(404, "404 page not found\n"),
        };
    }
    let Some(route) = route else { return text_response(404, "404 page not found\n") };
    if content_type.starts_with("application/vnd.kubernetes.protobuf") {
        // The real server takes protobuf for built-in types; the emulator speaks JSON only, and says
        // so the way the real server does for a type it cannot decode.
        let message = "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml";
        return status(415, "UnsupportedMediaType", message.to_owned(), None);
    }
    match route {
        Route::Api => json_response(200, &discovery::versions(shared.addr)),
        Route::Apis => json_response(200, &api_groups(&installed)),
        Route::Group(group) => match group_of(&installed, &group) {
            Some(group) => json_response(200, &group),
            None => text_response(404, "404 page not found\n"),
        },
        Route::GroupVersion(group, version) => {
            json_response(200, &resource_list(&installed, &group, &version))
        }
        Route::UnknownResource => status(
            404,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
            Some(json!({})),
        ),
        Route::Resource { type_index, namespace, name, subresource } => {
            let target = Target { type_index, namespace, name, subresource };
            let attributes = target.attributes(verb(&parts.method, &target, &query));
            let allowed =
                rbac::allows(&shared.store.lock().unwrap_or_else(|e| e.into_inner()), &identity, &attributes);
            if !allowed {
                return forbidden(&identity.user, &target, &attributes);
            }
            let media = Media::of(&accept);
            dispatch(&shared, parts.method, &target, &query, &content_type, media, &body).await
        }
    }
}

fn authenticate(shared: &Shared, certificate: Option<Identity>, headers: &hyper::HeaderMap) -> Caller {
    if let Some(value) = headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let Some(token) = value.strip_prefix("Bearer ") else { return Caller::BadToken };
        return match shared.tokens.lock().unwrap_or_else(|e| e.into_inner()).get(token.trim()) {
            Some(identity) => Caller::Known(identity.clone()),
            None => Caller::BadToken,
        };
    }
    match certificate {
        Some(identity) => Caller::Known(identity),
        None => Caller::Anonymous,
    }
}

/// The 403 of an unauthenticated request to anything but the public paths.
fn anonymous_refusal(
    method: &Method,
    route: Option<&Route>,
    path: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    match route {
        Some(Route::Resource { type_index, namespace, name, subresource }) => {
            let target = Target {
                type_index: *type_index,
                namespace: namespace.clone(),
                name: name.clone(),
                subresource: subresource.clone(),
            };
            let attributes = target.attributes(verb(method, &target, query));
            forbidden("system:anonymous", &target, &attributes)
        }
        _ => {
            let message = format!(
                "forbidden: User \"system:anonymous\" cannot {} path \"{path}\"",
                method.as_str().to_lowercase()
            );
            status(403, "Forbidden", message, Some(json!({})))
        }
    }
}

fn forbidden(user: &str, target: &Target, attributes: &rbac::Attributes<'_>) -> Response<Body> {
    let mut details = details(target.type_(), target.name.as_deref().unwrap_or_default());
    if target.name.is_none() {
        details.as_object_mut().map(|d| d.remove("name"));
    }
    status(403, "Forbidden", rbac::refusal(user, attributes), Some(details))
}

fn verb(method: &Method, target: &Target, query: &HashMap<String, String>) -> &'static str {
    match (method, &target.name) {
        (&Method::GET, None) if is_true(query.get("watch")) => "watch",
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => "use",
    }
}

enum Route {
    Api,
    Apis,
    Group(String),
    GroupVersion(String, String),
    UnknownResource,
    Resource {
        type_index: usize,
        namespace: Option<String>,
        name: Option<String>,
        subresource: Option<String>,
    },
}

/// What a resource request is about.
pub(crate) struct Target {
    pub type_index: usize,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

impl Target {
    pub fn type_(&self) -> &'static ResourceType {
        &TYPES[self.type_index]
    }

    /// Where objects of the type are stored: events.k8s.io Events are the core Events.
    pub fn storage_index(&self) -> usize {
        resources::storage_index(self.type_index)
    }

    pub fn key(&self, name: &str) -> Key {
        (self.storage_index(), self.namespace.clone().unwrap_or_default(), name.to_owned())
    }

    fn attributes(&self, verb: &'static str) -> rbac::Attributes<'_> {
        let type_ = self.type_();
        let resource = match &self.subresource {
            Some(sub) => format!("{}/{sub}", type_.plural),
            None => type_.plural.to_owned(),
        };
        rbac::Attributes {
            verb,
            group: type_.group,
            resource,
            namespace: self.namespace.as_deref(),
            name: self.name.as_deref(),
        }
    }
}

fn route(installed: &Installed, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api"] => return Some(Route::Api),
        ["apis"] => return Some(Route::Apis),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group] => return group_of(installed, group).map(|_| Route::Group((*group).to_owned())),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    if !installed.types().any(|t| t.group == group && t.version == version) {
        return None;
    }
    if rest.is_empty() {
        return Some(Route::GroupVersion(group.to_owned(), version.to_owned()));
    }
    let namespaced = rest.len() >= 3
        && rest[0] == "namespaces"
        && installed.find(group, version, rest[2]).is_some_and(|t| TYPES[t].namespaced);
    let (namespace, plural, name, subresource) = if namespaced {
        (Some(rest[1]), rest[2], rest.get(3).copied(), rest.get(4).copied())
    } else {
        (None, rest[0], rest.get(1).copied(), rest.get(2).copied())
    };
    let Some(type_index) = installed.find(group, version, plural) else {
        return Some(Route::UnknownResource);
    };
    Some(Route::Resource {
        type_index,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        subresource: subresource.map(str::to_owned),
    })
}

/// What a read answers: whole objects, or only their metadata (`as=PartialObjectMetadata`, as
/// kube-rs's metadata watchers ask).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Media {
    Objects,
    Metadata,
}

impl Media {
    fn of(accept: &str) -> Media {
        if accept.split(',').next().is_some_and(|first| first.contains("as=PartialObjectMetadata")) {
            Media::Metadata
        } else {
            Media::Objects
        }
    }

    /// `object` (typed) as this media shows it.
    pub fn show(self, object: Value) -> Value {
        match self {
            Media::Objects => object,
            Media::Metadata => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
            }
        }
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    method: Method,
    target: &Target,
    query: &HashMap<String, String>,
    content_type: &str,
    media: Media,
    body: &Bytes,
) -> Response<Body> {
    if target.type_().kind == "ServiceAccount"
        && target.subresource.as_deref() == Some("token")
        && method == Method::POST
    {
        return token_request(shared, target, body);
    }
    if target.subresource.as_deref().is_some_and(|s| s != "status" || !target.type_().status) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
            Some(json!({})),
        );
    }
    match (&method, &target.name) {
        (&Method::GET, None) if is_true(query.get("watch")) => watch(shared, target, query, media),
        (&Method::GET, None) => list(shared, target, query, media),
        (&Method::GET, Some(name)) => get(shared, target, name, media),
        (&Method::POST, None) => create(shared, target, query, body),
        (&Method::PUT, Some(name)) => update(shared, target, name, query, body),
        (&Method::PATCH, Some(name)) => patch(shared, target, name, query, content_type, body),
        (&Method::DELETE, Some(name)) => delete(shared, target, name, body),
        (&Method::DELETE, None) => delete_collection(shared, target, query),
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_owned(),
            Some(json!({})),
        ),
    }
}

pub(crate) fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v == "true" || v == "1")
}

pub(crate) fn details(type_: &ResourceType, name: &str) -> Value {
    let mut details = json!({"name": name, "kind": type_.plural});
    if !type_.group.is_empty() {
        details["group"] = json!(type_.group);
    }
    details
}

pub(crate) fn not_found(type_: &ResourceType, name: &str) -> Response<Body> {
    status(404, "NotFound", format!("{} \"{name}\" not found", type_.qualified()), Some(details(type_, name)))
}

pub(crate) fn conflict(type_: &ResourceType, name: &str) -> Response<Body> {
    let message = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
        type_.qualified()
    );
    status(409, "Conflict", message, Some(details(type_, name)))
}

pub(crate) fn invalid(type_: &ResourceType, name: &str, causes: Vec<Cause>) -> Response<Body> {
    // Events of either group are validated as the core type they are stored as.
    // By name, not address: a `const` table has no one address (codegen units may each hold a copy).
    let index = TYPES
        .iter()
        .position(|t| (t.group, t.version, t.plural) == (type_.group, type_.version, type_.plural));
    let type_ = index.map_or(type_, |index| &TYPES[resources::storage_index(index)]);
    let listed: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
    let joined = if listed.len() == 1 { listed[0].clone() } else { format!("[{}]", listed.join(", ")) };
    let qualified = if type_.group.is_empty() {
        type_.kind.to_owned()
    } else {
        format!("{}.{}", type_.kind, type_.group)
    };
    let message = format!("{qualified} \"{name}\" is invalid: {joined}");
    let mut details = json!({"name": name, "kind": type_.kind, "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>()});
    if !type_.group.is_empty() {
        details["group"] = json!(type_.group);
    }
    status(422, "Invalid", message, Some(details))
}

/// `response` with a `Warning` header for each of `warnings` (as the real server sends them).
pub(crate) fn with_warnings(mut response: Response<Body>, warnings: &[String]) -> Response<Body> {
    for warning in warnings {
        let escaped = warning.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = format!("299 - \"{escaped}\"").parse() {
            response.headers_mut().append("Warning", value);
        }
    }
    response
}

pub(crate) fn strip_type(object: &mut Value) {
    if let Some(map) = object.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
}

pub(crate) fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Response<Body> {
    let mut body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    if let Some(details) = details {
        body["details"] = details;
    }
    json_response(code, &body)
}

pub(crate) fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("a header"));
    response
}

pub(crate) fn text_response(code: u16, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("a header"));
    response
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
