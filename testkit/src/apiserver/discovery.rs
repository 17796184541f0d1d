//! Discovery: `/version`, `/api`, `/apis`, and each group and group-version, listing only what
//! the emulator serves.

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::resources::Installed;

/// `/api`: the core group's versions, and the address clients are told to use.
pub(crate) fn versions(addr: SocketAddr) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}]})
}

pub(crate) fn version() -> Value {
    json!({"major": "1", "minor": "32", "gitVersion": "v1.32.13", "gitCommit": "63adf010aa20e104c0b7043b47f42f50c9f72b17", "gitTreeState": "clean", "buildDate": "2026-08-20T05:19:54Z", "goVersion": "go1.23.5", "compiler": "gc", "platform": "linux/amd64"})
}

fn groups(installed: &Installed) -> Vec<&'static str> {
    let mut groups: Vec<&'static str> =
        installed.types().map(|t| t.group).filter(|g| !g.is_empty()).collect();
    groups.dedup();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// A group and its versions, newest first (metallb.io serves `BGPPeer` as v1beta2 and the rest
/// as v1beta1; the newest is the preferred one, as the real server's priority order has it).
pub(crate) fn group_of(installed: &Installed, group: &str) -> Option<Value> {
    let mut versions: Vec<&str> = installed.types().filter(|t| t.group == group).map(|t| t.version).collect();
    versions.sort_unstable_by(|a, b| b.cmp(a));
    versions.dedup();
    let listed: Vec<Value> = versions
        .iter()
        .map(|version| json!({"groupVersion": format!("{group}/{version}"), "version": version}))
        .collect();
    let preferred = listed.first()?.clone();
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": listed, "preferredVersion": preferred}),
    )
}

pub(crate) fn api_groups(installed: &Installed) -> Value {
    let groups: Vec<Value> = groups(installed)
        .into_iter()
        .filter_map(|group| group_of(installed, group))
        .map(|mut g| {
            if let Some(o) = g.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            g
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub(crate) fn resource_list(installed: &Installed, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for type_ in installed.types().filter(|t| t.group == group && t.version == version) {
        let singular = type_.kind.to_lowercase();
        // A CRD's verbs come in the apiextensions server's order, the built-in ones sorted.
        let verbs = if type_.custom {
            json!(["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"])
        } else {
            json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"])
        };
        let mut resource = json!({"name": type_.plural, "singularName": singular, "namespaced": type_.namespaced, "kind": type_.kind, "verbs": verbs});
        if !type_.short_names.is_empty() {
            resource["shortNames"] = json!(type_.short_names);
        }
        if type_.kind == "Service" {
            resource["categories"] = json!(["all"]);
        }
        if !type_.storage_version_hash.is_empty() {
            resource["storageVersionHash"] = json!(type_.storage_version_hash);
        }
        resources.push(resource);
        if type_.status {
            resources.push(json!({"name": format!("{}/status", type_.plural), "singularName": "", "namespaced": type_.namespaced, "kind": type_.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}
