//! One stored object, several served shapes: core/v1 Events and events.k8s.io/v1 Events are the
//! same objects (stored in the core shape, as the real server stores them), and every answer is
//! written as Go's encoder writes the type (its zero-valued fields included).

use serde_json::{Map, Value, json};

use super::resources::ResourceType;
use super::schema;

/// The events.k8s.io/v1 field for each core/v1 Event field that is renamed.
const EVENT_RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

fn is_events_v1(type_: &ResourceType) -> bool {
    type_.kind == "Event" && type_.group == "events.k8s.io"
}

/// `stored` as `type_` serves it: converted, typed, with Go's zero values.
pub(crate) fn present(type_: &ResourceType, stored: &Value) -> Value {
    let mut object = served(type_, stored);
    schema::go_zero_values(type_.kind, type_.group, &mut object);
    object
}

/// `stored` converted to `type_`'s shape and typed, without the zero values (what a patch is
/// applied to).
pub(crate) fn served(type_: &ResourceType, stored: &Value) -> Value {
    let mut object = stored.clone();
    if is_events_v1(type_) {
        object = rename(object, |core| EVENT_RENAMES.iter().find(|(c, _)| *c == core).map(|(_, v1)| *v1));
        // Go omits an empty reportingController in this shape (`omitempty`), not in the core one.
        if object.get("reportingController").is_some_and(|c| c == "") {
            object.as_object_mut().map(|o| o.remove("reportingController"));
        }
        if object.get("reportingInstance").is_some_and(|c| c == "") {
            object.as_object_mut().map(|o| o.remove("reportingInstance"));
        }
    }
    object["kind"] = json!(type_.kind);
    object["apiVersion"] = json!(type_.api_version());
    object
}

/// An object written through `type_` in the shape it is stored in.
pub(crate) fn to_storage(type_: &ResourceType, written: Value) -> Value {
    if is_events_v1(type_) {
        return rename(written, |v1| EVENT_RENAMES.iter().find(|(_, v)| *v == v1).map(|(c, _)| *c));
    }
    written
}

fn rename(object: Value, to: impl Fn(&str) -> Option<&'static str>) -> Value {
    let Value::Object(map) = object else { return object };
    let renamed: Map<String, Value> =
        map.into_iter().map(|(key, value)| (to(&key).map_or(key, str::to_owned), value)).collect();
    Value::Object(renamed)
}
