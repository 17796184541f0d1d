//! Custom resources as the apiextensions server treats them, against the structural schema of
//! their CustomResourceDefinition (`kube-fixtures/crd/ipaddresspool-crd.yaml` for IPAddressPool):
//! unknown fields pruned with a `Warning` (a 400 with `fieldValidation=Strict`), `default`s
//! applied, then a 422 listing every wrong type and missing required field.

use std::sync::OnceLock;

use serde_json::Value;

use super::resources::Cause;
use super::schema::Unknown;

const IPADDRESSPOOL_CRD: &str = include_str!("../../kube-fixtures/crd/ipaddresspool-crd.yaml");

/// The openAPIV3Schema of the served version of `kind`'s CRD.
fn schema_of(kind: &str) -> Option<&'static Value> {
    static POOL: OnceLock<Value> = OnceLock::new();
    match kind {
        "IPAddressPool" => Some(POOL.get_or_init(|| {
            let crd: Value =
                serde_yaml_ng::from_str(IPADDRESSPOOL_CRD).expect("the IPAddressPool CRD is YAML");
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
        })),
        _ => None,
    }
}

/// What decoding a custom resource found.
pub(crate) enum Outcome {
    /// Stored as it now is; these are the warnings.
    Valid(Vec<String>),
    /// A 400: strict decoding refused unknown fields (the message).
    Strict(String),
    /// A 422 with these causes (and the warnings).
    Invalid(Vec<Cause>, Vec<String>),
}

/// Prunes, defaults and validates `object` (of `kind`) in place.
pub(crate) fn decode(kind: &str, object: &mut Value, unknown: Unknown) -> Outcome {
    let Some(schema) = schema_of(kind) else { return Outcome::Valid(Vec::new()) };
    let mut unknowns = Vec::new();
    if let Some(map) = object.as_object_mut() {
        for (key, value) in map.iter_mut() {
            if key != "metadata" && key != "apiVersion" && key != "kind" {
                prune(&schema["properties"][key.as_str()], value, key, &mut unknowns);
            }
        }
        let top: Vec<String> =
            map.keys().filter(|k| schema["properties"].get(k.as_str()).is_none()).cloned().collect();
        for key in top {
            map.remove(&key);
            unknowns.push(key);
        }
    }
    let warnings: Vec<String> = unknowns.iter().map(|path| format!("unknown field \"{path}\"")).collect();
    if unknown == Unknown::Strict && !unknowns.is_empty() {
        return Outcome::Strict(format!("strict decoding error: {}", warnings.join(", ")));
    }
    let warnings = if unknown == Unknown::Warn { warnings } else { Vec::new() };
    let mut causes = Vec::new();
    for (key, value) in object.as_object().into_iter().flatten() {
        if key != "metadata" {
            validate(&schema["properties"][key.as_str()], value, key, &mut causes);
        }
    }
    if causes.is_empty() { Outcome::Valid(warnings) } else { Outcome::Invalid(causes, warnings) }
}

/// The fields of `object` at `path` that `schema` does not declare (recorded and removed), and
/// the schema's defaults for absent ones.
fn prune(schema: &Value, value: &mut Value, path: &str, unknowns: &mut Vec<String>) {
    match value {
        Value::Object(map) if schema["type"] == "object" => {
            if schema["x-kubernetes-preserve-unknown-fields"] == true {
                return;
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (key, child) in map.iter_mut() {
                    prune(additional, child, &format!("{path}.{key}"), unknowns);
                }
                return;
            }
            let properties = &schema["properties"];
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = format!("{path}.{key}");
                match properties.get(&key) {
                    Some(child_schema) => {
                        prune(child_schema, map.get_mut(&key).expect("a key"), &child_path, unknowns)
                    }
                    None => {
                        map.remove(&key);
                        unknowns.push(child_path);
                    }
                }
            }
            for (key, child_schema) in properties.as_object().into_iter().flatten() {
                if let Some(default) = child_schema.get("default")
                    && !map.contains_key(key)
                {
                    map.insert(key.clone(), default.clone());
                }
            }
        }
        Value::Array(items) if schema["type"] == "array" => {
            for item in items {
                prune(&schema["items"], item, path, unknowns);
            }
        }
        _ => {}
    }
}

fn validate(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let wanted = schema["type"].as_str().unwrap_or_default();
    let actual = match value {
        Value::String(_) => "string",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    };
    let fits = wanted.is_empty() || wanted == actual || (wanted == "number" && actual == "integer");
    if !fits {
        let message =
            format!("Invalid value: \"{actual}\": {path} in body must be of type {wanted}: \"{actual}\"");
        causes.push(Cause { reason: "FieldValueTypeInvalid", field: path.to_owned(), message });
        return;
    }
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if let Some(child_schema) = schema["properties"].get(key) {
                    validate(child_schema, child, &format!("{path}.{key}"), causes);
                } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object())
                {
                    validate(additional, child, &format!("{path}.{key}"), causes);
                }
            }
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(required) {
                    causes.push(Cause::required(format!("{path}.{required}"), ""));
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                validate(&schema["items"], item, &format!("{path}[{i}]"), causes);
            }
        }
        _ => {}
    }
}
