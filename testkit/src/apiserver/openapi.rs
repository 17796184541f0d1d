//! A minimal OpenAPI v3 (`/openapi/v3`): the index of group-versions, and for each the paths of
//! its resources with the `fieldValidation` query parameter on their writes.
//!
//! That is what `kubectl` (1.32) looks for before it sends `fieldValidation=Strict` and leaves
//! validation to the server; without it `kubectl apply` refuses to run unless `--validate=false`.
//! There are no schemas: nothing ringlb or its tests do needs them.

use serde_json::{Map, Value, json};

use super::resources::{Installed, ResourceType};

/// The document at `/openapi/v3/{path}`: the index for `""`, a group-version's paths for
/// `api/v1` or `apis/{group}/{version}`, `None` for anything else.
pub(crate) fn document(installed: &Installed, path: &str) -> Option<Value> {
    if path.is_empty() {
        let mut paths = Map::new();
        for prefix in prefixes(installed) {
            paths.insert(
                prefix.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{prefix}?hash=ringlb-emulator")}),
            );
        }
        return Some(json!({"paths": paths}));
    }
    let types: Vec<&ResourceType> = installed.types().filter(|t| prefix(t) == path).collect();
    if types.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    for type_ in types {
        let gvk = json!({"group": type_.group, "version": type_.version, "kind": type_.kind});
        let writes = |verb: &str| {
            json!({
                "operationId": format!("{verb}{}", type_.kind),
                "x-kubernetes-action": verb,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": [
                    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                ],
                "responses": {},
            })
        };
        let reads = |verb: &str| json!({"operationId": format!("{verb}{}", type_.kind), "x-kubernetes-action": verb, "x-kubernetes-group-version-kind": gvk, "responses": {}});
        let collection = collection_path(type_);
        paths.insert(collection.clone(), json!({"get": reads("list"), "post": writes("post")}));
        let item = format!("{collection}/{{name}}");
        paths.insert(
            item.clone(),
            json!({"get": reads("get"), "put": writes("put"), "patch": writes("patch"), "delete": reads("delete")}),
        );
        if type_.status {
            paths.insert(
                format!("{item}/status"),
                json!({"get": reads("get"), "put": writes("put"), "patch": writes("patch")}),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.13"},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

/// `api/v1` or `apis/{group}/{version}`.
fn prefix(type_: &ResourceType) -> String {
    if type_.group.is_empty() {
        format!("api/{}", type_.version)
    } else {
        format!("apis/{}/{}", type_.group, type_.version)
    }
}

fn prefixes(installed: &Installed) -> Vec<String> {
    let mut prefixes: Vec<String> = installed.types().map(prefix).collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    prefixes
}

fn collection_path(type_: &ResourceType) -> String {
    if type_.namespaced {
        format!("/{}/namespaces/{{namespace}}/{}", prefix(type_), type_.plural)
    } else {
        format!("/{}/{}", prefix(type_), type_.plural)
    }
}
