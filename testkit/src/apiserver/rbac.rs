//! Who may do what: kube-apiserver's RBAC authorizer over the Roles, ClusterRoles and their
//! bindings the emulator stores, so a test can apply ringlb's own RBAC manifest and run ringlb as
//! its ServiceAccount, and a permission the manifest lacks is a 403 here as in a cluster.
//!
//! `system:masters` may do anything (as the real server's superuser group); every authenticated
//! user may read discovery, `/version` and the health endpoints; anyone may read `/version`.

use serde_json::Value;

use super::resources::TYPES;
use super::store::{Store, type_of};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub user: String,
    pub groups: Vec<String>,
}

impl Identity {
    /// `user` with the groups the real authenticators give it: a ServiceAccount's
    /// (`system:serviceaccounts`, `system:serviceaccounts:<namespace>`) and `system:authenticated`.
    pub fn new(user: &str, extra_groups: &[&str]) -> Identity {
        let mut groups: Vec<String> = extra_groups.iter().map(|g| (*g).to_owned()).collect();
        if let Some(namespace) = service_account(user).map(|(namespace, _)| namespace) {
            groups.push("system:serviceaccounts".to_owned());
            groups.push(format!("system:serviceaccounts:{namespace}"));
        }
        groups.push("system:authenticated".to_owned());
        Identity { user: user.to_owned(), groups }
    }

    fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// `(namespace, name)` of a ServiceAccount user name (`system:serviceaccount:<ns>:<name>`).
fn service_account(user: &str) -> Option<(&str, &str)> {
    user.strip_prefix("system:serviceaccount:")?.split_once(':')
}

/// What a resource request asks to do.
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `services`, or `services/status` for a subresource.
    pub resource: String,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// Whether `identity` may do what `attributes` ask, given the stored RBAC objects.
pub(crate) fn allows(store: &Store, identity: &Identity, attributes: &Attributes<'_>) -> bool {
    if identity.is_master() {
        return true;
    }
    let cluster_role_bindings = type_of("ClusterRoleBinding");
    let role_bindings = type_of("RoleBinding");
    for ((type_index, namespace, _), binding) in &store.objects {
        let applies = if *type_index == cluster_role_bindings {
            true
        } else if *type_index == role_bindings {
            attributes.namespace == Some(namespace.as_str())
        } else {
            false
        };
        if !applies || !binds(binding, identity) {
            continue;
        }
        let role = &binding["roleRef"];
        let role_key = match role["kind"].as_str() {
            Some("ClusterRole") => (type_of("ClusterRole"), String::new()),
            Some("Role") if *type_index == role_bindings => (type_of("Role"), namespace.clone()),
            _ => continue,
        };
        let Some(role) = store.objects.get(&(
            role_key.0,
            role_key.1,
            role["name"].as_str().unwrap_or_default().to_owned(),
        )) else {
            continue;
        };
        if role["rules"].as_array().into_iter().flatten().any(|rule| rule_allows(rule, attributes)) {
            return true;
        }
    }
    false
}

fn binds(binding: &Value, identity: &Identity) -> bool {
    binding["subjects"].as_array().into_iter().flatten().any(|subject| {
        let name = subject["name"].as_str().unwrap_or_default();
        match subject["kind"].as_str() {
            Some("User") => name == identity.user,
            Some("Group") => identity.groups.iter().any(|g| g == name),
            Some("ServiceAccount") => {
                service_account(&identity.user)
                    == Some((subject["namespace"].as_str().unwrap_or_default(), name))
            }
            _ => false,
        }
    })
}

fn rule_allows(rule: &Value, attributes: &Attributes<'_>) -> bool {
    let has = |field: &str, wanted: &str| {
        rule[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|v| v == "*" || v == wanted)
    };
    let names: Vec<&str> =
        rule["resourceNames"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let name_ok = names.is_empty() || attributes.name.is_some_and(|name| names.contains(&name));
    has("verbs", attributes.verb)
        && has("apiGroups", attributes.group)
        && has("resources", &attributes.resource)
        && name_ok
}

/// The 403 message of a refused resource request, worded as the real server words it.
pub(crate) fn refusal(user: &str, attributes: &Attributes<'_>) -> String {
    let type_ = TYPES
        .iter()
        .find(|t| t.group == attributes.group && attributes.resource.split('/').next() == Some(t.plural));
    let qualified = type_.map_or_else(|| attributes.resource.clone(), |t| t.qualified());
    let subject = match attributes.name {
        Some(name) => format!("{qualified} \"{name}\""),
        None => qualified,
    };
    let scope = match attributes.namespace {
        Some(namespace) => format!("in the namespace \"{namespace}\""),
        None => "at the cluster scope".to_owned(),
    };
    format!(
        "{subject} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        attributes.verb, attributes.resource, attributes.group
    )
}
