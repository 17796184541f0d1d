//! Strategic merge patch (`application/strategic-merge-patch+json`), as `kubectl apply` and
//! `kubectl patch` send it for built-in types: a JSON merge patch, except that lists with a merge
//! key merge element by element, and the directives `$patch` (`replace`, `delete`, `merge`),
//! `$setElementOrder/<list>`, `$retainKeys` and `$deleteFromPrimitiveList/<list>` are honoured.
//!
//! The merge keys are the real types' `patchMergeKey`s for the lists of the served objects; every
//! other list is replaced whole, which is what the real server does with a list without one.

use serde_json::{Map, Value};

/// The merge key of the list at `path` (dotted field names from the object's root) of `kind`.
fn merge_key(kind: &str, path: &str) -> Option<&'static str> {
    match (kind, path) {
        // The real server keys Service ports by port number alone (53/UDP and 53/TCP are one).
        ("Service", "spec.ports") => Some("port"),
        ("Service", "status.conditions") => Some("type"),
        (_, "metadata.ownerReferences") => Some("uid"),
        _ => None,
    }
}

/// The list at `path` merges its primitive elements as a set (`patchStrategy: merge` without a key).
fn is_primitive_set(path: &str) -> bool {
    path == "metadata.finalizers"
}

/// Applies `patch` to `target` (an object of `kind`).
pub(crate) fn apply(kind: &str, target: &mut Value, patch: &Value) {
    merge_object(kind, "", target, patch);
}

fn merge_object(kind: &str, path: &str, target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = Value::Object(without_directives(patch));
            return;
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let mut orders: Vec<(&str, &Value)> = Vec::new();
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list, value));
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = value.as_array().cloned().unwrap_or_default();
            if let Some(items) = target.get_mut(list).and_then(Value::as_array_mut) {
                items.retain(|item| !gone.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        let field = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        let map = target.as_object_mut().expect("made an object above");
        match value {
            Value::Null => {
                map.remove(key);
            }
            Value::Object(_) => {
                merge_object(kind, &field, map.entry(key.clone()).or_insert(Value::Null), value)
            }
            Value::Array(items) => {
                let slot = map.entry(key.clone()).or_insert(Value::Array(Vec::new()));
                merge_list(kind, &field, slot, items);
            }
            other => {
                map.insert(key.clone(), other.clone());
            }
        }
    }
    for (list, order) in orders {
        let field = if path.is_empty() { list.to_owned() } else { format!("{path}.{list}") };
        if let (Some(items), Some(order)) =
            (target.get_mut(list).and_then(Value::as_array_mut), order.as_array())
        {
            reorder(merge_key(kind, &field), items, order);
        }
    }
    if let Some(Value::Array(retained)) = patch.get("$retainKeys")
        && let Some(map) = target.as_object_mut()
    {
        map.retain(|key, _| retained.iter().any(|r| r.as_str() == Some(key)));
    }
}

fn merge_list(kind: &str, path: &str, target: &mut Value, patch: &[Value]) {
    if is_primitive_set(path) {
        let items = ensure_array(target);
        for item in patch {
            if !items.contains(item) {
                items.push(item.clone());
            }
        }
        return;
    }
    let Some(key) = merge_key(kind, path) else {
        *target = Value::Array(patch.to_vec());
        return;
    };
    if patch.iter().any(|item| item.get("$patch").and_then(Value::as_str) == Some("replace")) {
        let kept = patch.iter().filter(|item| item.get("$patch").is_none()).cloned().collect();
        *target = Value::Array(kept);
        return;
    }
    let items = ensure_array(target);
    for item in patch {
        let position = items.iter().position(|existing| existing.get(key) == item.get(key));
        match (item.get("$patch").and_then(Value::as_str), position) {
            (Some("delete"), Some(at)) => {
                items.remove(at);
            }
            (Some("delete"), None) => {}
            (_, Some(at)) => merge_object(kind, path, &mut items[at], item),
            (_, None) => {
                items.push(Value::Object(item.as_object().map(without_directives).unwrap_or_default()))
            }
        }
    }
}

/// Orders `items` as `order` lists them (by merge key, or by value for primitives); items `order`
/// does not name keep their relative order after the named ones.
fn reorder(key: Option<&str>, items: &mut [Value], order: &[Value]) {
    let rank = |item: &Value| {
        order
            .iter()
            .position(|o| match key {
                Some(key) => o.get(key) == item.get(key),
                None => o == item,
            })
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(rank);
}

fn ensure_array(value: &mut Value) -> &mut Vec<Value> {
    if !value.is_array() {
        *value = Value::Array(Vec::new());
    }
    value.as_array_mut().expect("made an array above")
}

fn without_directives(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter().filter(|(key, _)| !key.starts_with('$')).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::apply;

    #[test]
    fn kubectl_apply_replaces_a_port_by_merge_key_and_keeps_server_fields() {
        let mut service = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080, "nodePort": 31000, "protocol": "TCP"}], "type": "LoadBalancer"}});
        let patch = json!({"spec": {"$setElementOrder/ports": [{"port": 81}], "ports": [{"port": 81, "targetPort": 8080}, {"$patch": "delete", "port": 80}]}});
        apply("Service", &mut service, &patch);
        assert_eq!(
            service,
            json!({"spec": {"ports": [{"port": 81, "targetPort": 8080}], "type": "LoadBalancer"}})
        );
    }

    #[test]
    fn merged_elements_keep_fields_the_patch_does_not_name_and_follow_the_element_order() {
        let mut service =
            json!({"spec": {"ports": [{"port": 80, "nodePort": 31000}, {"port": 443, "nodePort": 31001}]}});
        let patch = json!({"spec": {"$setElementOrder/ports": [{"port": 443}, {"port": 80}], "ports": [{"port": 80, "name": "http"}]}});
        apply("Service", &mut service, &patch);
        assert_eq!(
            service["spec"]["ports"],
            json!([{"port": 443, "nodePort": 31001}, {"port": 80, "nodePort": 31000, "name": "http"}])
        );
    }

    #[test]
    fn lists_without_a_merge_key_are_replaced_and_null_removes_a_field() {
        let mut slice = json!({"endpoints": [{"addresses": ["192.0.2.1"]}], "metadata": {"labels": {"a": "1", "b": "2"}}});
        let patch = json!({"endpoints": [{"addresses": ["192.0.2.2"]}], "metadata": {"labels": {"a": null}}});
        apply("EndpointSlice", &mut slice, &patch);
        assert_eq!(
            slice,
            json!({"endpoints": [{"addresses": ["192.0.2.2"]}], "metadata": {"labels": {"b": "2"}}})
        );
    }

    #[test]
    fn patch_replace_and_retain_keys_directives() {
        let mut service = json!({"spec": {"selector": {"app": "web", "tier": "a"}, "type": "ClusterIP", "clusterIP": "10.0.0.1"}});
        let patch = json!({"spec": {"selector": {"$patch": "replace", "app": "api"}, "$retainKeys": ["selector", "type"], "type": "NodePort"}});
        apply("Service", &mut service, &patch);
        assert_eq!(service, json!({"spec": {"selector": {"app": "api"}, "type": "NodePort"}}));
    }
}
