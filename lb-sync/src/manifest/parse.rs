//! Turns the text of one manifest file into typed Service, EndpointSlice and (core/v1) Endpoints
//! objects.
//!
//! Each document is first read as a generic value so it can be dispatched on `apiVersion`/`kind`
//! (and `kind: List` / `ServiceList` / `EndpointSliceList` / `EndpointsList` unpacked), then converted to the
//! `k8s-openapi` type with the path of any offending field recorded. Other kinds are ignored (debug
//! log, and listed in [`Parsed::ignored`] so a load of nothing else can be refused); unknown API
//! versions of the kinds ringlb reads are errors, never silently skipped.
//! Never panics on any input; every problem becomes a [`ManifestError`] naming file, document, object.

use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use lb_core::ObjectRef;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{Location, ManifestError};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Kubernetes' namespace for objects that do not name one.
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// Shown for an object whose `metadata.name` is missing, so its error can still say what it was.
const NO_NAME: &str = "<no name>";

/// How a file's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Multi-document YAML (`---` separated), as `kubectl get -o yaml` writes it.
    Yaml,
    /// One or more concatenated JSON values, as `kubectl get -o json` writes it.
    Json,
}

impl Format {
    /// `*.json` is JSON; everything else (including a file named explicitly) is YAML.
    pub(crate) fn of(path: &Path) -> Format {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Yaml => "YAML",
            Format::Json => "JSON",
        }
    }
}

/// The objects found in one or more files, each with where it came from.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub(crate) services: Vec<(Location, ObjectRef, Service)>,
    pub(crate) slices: Vec<(Location, ObjectRef, EndpointSlice)>,
    pub(crate) endpoints: Vec<(Location, ObjectRef, Endpoints)>,
    /// Lists without items (`kubectl get` finding nothing): "nothing" said on purpose.
    pub(crate) empty_lists: usize,
    /// Objects of kinds ringlb does not read, with their kind.
    pub(crate) ignored: Vec<(Location, String)>,
}

impl Parsed {
    /// Objects of the kinds ringlb reads, and empty lists, found so far.
    pub(crate) fn read(&self) -> usize {
        self.services.len() + self.slices.len() + self.endpoints.len() + self.empty_lists
    }
}

/// Parses `text` (the content of `file`) into `out`, reporting problems into `errors`.
pub(crate) fn parse_file(file: &Path, text: &str, out: &mut Parsed, errors: &mut Vec<ManifestError>) {
    for (index, value) in documents(file, text, Format::of(file), errors) {
        let at = Location { file: file.to_path_buf(), document: index + 1, item: None };
        collect(value, at, None, out, errors);
    }
}

/// Splits `text` into documents. Stops at the first syntax error: what follows it cannot be trusted.
fn documents(
    file: &Path,
    text: &str,
    format: Format,
    errors: &mut Vec<ManifestError>,
) -> Vec<(usize, Value)> {
    let mut documents = Vec::new();
    let syntax_error =
        |index: usize, line: Option<usize>, column: Option<usize>, reason: String| ManifestError::Syntax {
            at: Location { file: file.to_path_buf(), document: index + 1, item: None },
            format: format.name(),
            line,
            column,
            reason,
        };
    match format {
        Format::Yaml => {
            for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
                match Value::deserialize(document) {
                    Ok(value) => documents.push((index, value)),
                    Err(error) => {
                        let location = error.location();
                        errors.push(syntax_error(
                            index,
                            location.as_ref().map(|l| l.line()),
                            location.as_ref().map(|l| l.column()),
                            error.to_string(),
                        ));
                        break;
                    }
                }
            }
        }
        Format::Json => {
            let stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
            for (index, value) in stream.enumerate() {
                match value {
                    Ok(value) => documents.push((index, value)),
                    Err(error) => {
                        let known = error.line() > 0;
                        errors.push(syntax_error(
                            index,
                            known.then(|| error.line()),
                            known.then(|| error.column()),
                            error.to_string(),
                        ));
                        break;
                    }
                }
            }
        }
    }
    documents
}

/// `apiVersion` and `kind` that items of a typed list (`ServiceList`) carry implicitly.
type Implied<'a> = Option<(&'a str, &'a str)>;

/// Dispatches one document (or list item) on its kind.
fn collect(
    value: Value,
    at: Location,
    implied: Implied<'_>,
    out: &mut Parsed,
    errors: &mut Vec<ManifestError>,
) {
    let mut map = match value {
        Value::Object(map) => map,
        // An empty document (`---` with nothing after it, or only comments) is not an error.
        Value::Null => return,
        other => {
            let reason = format!("expected a mapping with apiVersion and kind, found {}", type_name(&other));
            errors.push(ManifestError::NotAnObject { at, reason });
            return;
        }
    };
    let api_version = string_field(&map, "apiVersion").or(implied.map(|(api_version, _)| api_version));
    let Some(kind) = string_field(&map, "kind").or(implied.map(|(_, kind)| kind)) else {
        let reason = "field kind is missing or not a string".to_owned();
        errors.push(ManifestError::NotAnObject { at, reason });
        return;
    };
    let (api_version, kind) = (api_version.map(str::to_owned), kind.to_owned());

    if let Some(item_kind) = list_item_kind(&kind, &map) {
        collect_list(&mut map, at, api_version.as_deref(), item_kind, out, errors);
        return;
    }
    match kind.as_str() {
        "Service" => {
            if let Some((object, service)) = typed::<Service>(map, api_version, &at, errors) {
                out.services.push((at, object, service));
            }
        }
        "EndpointSlice" => {
            if let Some((object, slice)) = typed::<EndpointSlice>(map, api_version, &at, errors) {
                out.slices.push((at, object, slice));
            }
        }
        "Endpoints" => {
            if let Some((object, endpoints)) = typed::<Endpoints>(map, api_version, &at, errors) {
                out.endpoints.push((at, object, endpoints));
            }
        }
        _ => {
            tracing::debug!(
                file = %at.file.display(),
                document = at.document,
                kind,
                name = object_name(&map),
                "ignoring an object of a kind ringlb does not read"
            );
            out.ignored.push((at, kind));
        }
    }
}

/// For a list object, the kind its items have when they do not say: `Some(None)` for a generic
/// `List` (items carry their own kind), `Some(Some("Service"))` for a `ServiceList`.
fn list_item_kind<'k>(kind: &'k str, map: &Map<String, Value>) -> Option<Option<&'k str>> {
    if kind == "List" {
        return Some(None);
    }
    match kind.strip_suffix("List") {
        Some(item_kind) if !item_kind.is_empty() && map.get("items").is_some_and(Value::is_array) => {
            Some(Some(item_kind))
        }
        _ => None,
    }
}

fn collect_list(
    map: &mut Map<String, Value>,
    at: Location,
    api_version: Option<&str>,
    item_kind: Option<&str>,
    out: &mut Parsed,
    errors: &mut Vec<ManifestError>,
) {
    let items = match map.remove("items") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        // `kubectl get` prints `items: []` for nothing found; a missing list is the same.
        None | Some(Value::Null) | Some(Value::Array(_)) => {
            out.empty_lists += 1;
            return;
        }
        Some(other) => {
            let reason = format!("field items of a List must be a sequence, found {}", type_name(&other));
            errors.push(ManifestError::NotAnObject { at, reason });
            return;
        }
    };
    let implied = match (api_version, item_kind) {
        (Some(api_version), Some(kind)) => Some((api_version, kind)),
        _ => None,
    };
    for (index, item) in items.into_iter().enumerate() {
        let item_at = Location { item: Some(index), ..at.clone() };
        collect(item, item_at, implied, out, errors);
    }
}

/// Converts a generic object into `K`, checking its API version and normalising its metadata
/// (namespace defaults to `default`, a name is required).
fn typed<K>(
    mut map: Map<String, Value>,
    api_version: Option<String>,
    at: &Location,
    errors: &mut Vec<ManifestError>,
) -> Option<(ObjectRef, K)>
where
    K: Resource + Metadata<Ty = ObjectMeta> + DeserializeOwned,
{
    let object = ObjectRef {
        kind: K::KIND,
        namespace: object_namespace(&map).unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        name: object_name(&map).unwrap_or(NO_NAME).to_owned(),
    };
    let invalid = |field: &str, reason: String| ManifestError::InvalidObject {
        at: at.clone(),
        object: object.clone(),
        field: field.to_owned(),
        reason,
    };
    match api_version {
        None => {
            errors.push(invalid("apiVersion", format!("is missing (ringlb reads {:?})", K::API_VERSION)));
            return None;
        }
        Some(api_version) if api_version != K::API_VERSION => {
            errors.push(ManifestError::UnsupportedApiVersion {
                at: at.clone(),
                object,
                api_version,
                expected: K::API_VERSION,
            });
            return None;
        }
        Some(_) => {}
    }
    // Items of a typed list omit these; the k8s-openapi types insist on them.
    map.insert("apiVersion".to_owned(), Value::String(K::API_VERSION.to_owned()));
    map.insert("kind".to_owned(), Value::String(K::KIND.to_owned()));

    let mut value: K = match serde_path_to_error::deserialize(Value::Object(map)) {
        Ok(value) => value,
        Err(error) => {
            let field = error.path().to_string();
            errors.push(invalid(&field, error.into_inner().to_string()));
            return None;
        }
    };
    let metadata = value.metadata_mut();
    if metadata.name.as_deref().is_none_or(str::is_empty) {
        errors.push(invalid("metadata.name", "is missing; every object needs a name".to_owned()));
        return None;
    }
    if metadata.namespace.as_deref().is_none_or(str::is_empty) {
        metadata.namespace = Some(DEFAULT_NAMESPACE.to_owned());
    }
    Some((object, value))
}

fn string_field<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    map.get(field).and_then(Value::as_str)
}

fn metadata_field<'a>(map: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    map.get("metadata")?.get(field)?.as_str().filter(|s| !s.is_empty())
}

fn object_name(map: &Map<String, Value>) -> Option<&str> {
    metadata_field(map, "name")
}

fn object_namespace(map: &Map<String, Value>) -> Option<&str> {
    metadata_field(map, "namespace")
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}
