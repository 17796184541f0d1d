//! How the real server decodes a request body into its Go types, for the built-in types served:
//! a JSON type that does not fit is a 400 worded as Go's `encoding/json` words it; an unknown field
//! is dropped with a `Warning` (or, with `fieldValidation=Strict`, a 400); a field a disabled
//! feature gate owns is dropped silently; `metav1.Time` is answered in whole seconds and
//! `metav1.MicroTime` must have exactly six fractional digits, both stored in UTC.
//!
//! The schemas name the fields of v1.32's types that the served objects have (Go struct names
//! are what error messages print).

use serde_json::{Map, Value};

/// The shape of a field.
#[derive(Clone, Copy)]
pub(crate) enum Schema {
    /// A Go struct: its name and fields.
    Struct(&'static str, &'static [(&'static str, Schema)]),
    /// `map[string]string`.
    Labels,
    List(&'static Schema),
    String,
    Int32,
    Int64,
    Bool,
    IntOrString,
    /// `metav1.Time`.
    Time,
    /// `metav1.MicroTime`.
    MicroTime,
    /// Anything (a raw extension, or a part the emulator does not model).
    Any,
    /// A field only an enabled feature gate keeps: dropped without a warning.
    Gated,
}

use Schema::*;

const OBJECT_META: Schema = Struct(
    "ObjectMeta",
    &[
        ("name", String),
        ("generateName", String),
        ("namespace", String),
        ("selfLink", String),
        ("uid", String),
        ("resourceVersion", String),
        ("generation", Int64),
        ("creationTimestamp", Time),
        ("deletionTimestamp", Time),
        ("deletionGracePeriodSeconds", Int64),
        ("labels", Labels),
        ("annotations", Labels),
        ("ownerReferences", List(&Any)),
        ("finalizers", List(&String)),
        ("managedFields", List(&Any)),
    ],
);

const OBJECT_REFERENCE: Schema = Struct(
    "ObjectReference",
    &[
        ("kind", String),
        ("namespace", String),
        ("name", String),
        ("uid", String),
        ("apiVersion", String),
        ("resourceVersion", String),
        ("fieldPath", String),
    ],
);

const SERVICE: Schema = Struct(
    "Service",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        (
            "spec",
            Struct(
                "ServiceSpec",
                &[
                    (
                        "ports",
                        List(&Struct(
                            "ServicePort",
                            &[
                                ("name", String),
                                ("protocol", String),
                                ("appProtocol", String),
                                ("port", Int32),
                                ("targetPort", IntOrString),
                                ("nodePort", Int32),
                            ],
                        )),
                    ),
                    ("selector", Labels),
                    ("clusterIP", String),
                    ("clusterIPs", List(&String)),
                    ("type", String),
                    ("externalIPs", List(&String)),
                    ("sessionAffinity", String),
                    ("loadBalancerIP", String),
                    ("loadBalancerSourceRanges", List(&String)),
                    ("externalName", String),
                    ("externalTrafficPolicy", String),
                    ("healthCheckNodePort", Int32),
                    ("publishNotReadyAddresses", Bool),
                    (
                        "sessionAffinityConfig",
                        Struct(
                            "SessionAffinityConfig",
                            &[("clientIP", Struct("ClientIPConfig", &[("timeoutSeconds", Int32)]))],
                        ),
                    ),
                    ("ipFamilies", List(&String)),
                    ("ipFamilyPolicy", String),
                    ("allocateLoadBalancerNodePorts", Bool),
                    ("loadBalancerClass", String),
                    ("internalTrafficPolicy", String),
                    ("trafficDistribution", String),
                ],
            ),
        ),
        (
            "status",
            Struct(
                "ServiceStatus",
                &[
                    (
                        "loadBalancer",
                        Struct(
                            "LoadBalancerStatus",
                            &[(
                                "ingress",
                                List(&Struct(
                                    "LoadBalancerIngress",
                                    &[
                                        ("ip", String),
                                        ("hostname", String),
                                        ("ipMode", String),
                                        (
                                            "ports",
                                            List(&Struct(
                                                "PortStatus",
                                                &[("port", Int32), ("protocol", String), ("error", String)],
                                            )),
                                        ),
                                    ],
                                )),
                            )],
                        ),
                    ),
                    ("conditions", List(&CONDITION)),
                ],
            ),
        ),
    ],
);

const CONDITION: Schema = Struct(
    "Condition",
    &[
        ("type", String),
        ("status", String),
        ("observedGeneration", Int64),
        ("lastTransitionTime", Time),
        ("reason", String),
        ("message", String),
    ],
);

const ENDPOINT_SLICE: Schema = Struct(
    "EndpointSlice",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        ("addressType", String),
        (
            "endpoints",
            List(&Struct(
                "Endpoint",
                &[
                    ("addresses", List(&String)),
                    (
                        "conditions",
                        Struct(
                            "EndpointConditions",
                            &[("ready", Bool), ("serving", Bool), ("terminating", Bool)],
                        ),
                    ),
                    ("hostname", String),
                    ("targetRef", OBJECT_REFERENCE),
                    ("deprecatedTopology", Labels),
                    ("nodeName", String),
                    ("zone", String),
                    ("hints", Any),
                ],
            )),
        ),
        (
            "ports",
            List(&Struct(
                "EndpointPort",
                &[("name", String), ("protocol", String), ("port", Int32), ("appProtocol", String)],
            )),
        ),
    ],
);

const ENDPOINT_ADDRESS: Schema = Struct(
    "EndpointAddress",
    &[("ip", String), ("hostname", String), ("nodeName", String), ("targetRef", OBJECT_REFERENCE)],
);

const ENDPOINTS: Schema = Struct(
    "Endpoints",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        (
            "subsets",
            List(&Struct(
                "EndpointSubset",
                &[
                    ("addresses", List(&ENDPOINT_ADDRESS)),
                    ("notReadyAddresses", List(&ENDPOINT_ADDRESS)),
                    (
                        "ports",
                        List(&Struct(
                            "EndpointPort",
                            &[
                                ("name", String),
                                ("port", Int32),
                                ("protocol", String),
                                ("appProtocol", String),
                            ],
                        )),
                    ),
                ],
            )),
        ),
    ],
);

const LEASE: Schema = Struct(
    "Lease",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        (
            "spec",
            Struct(
                "LeaseSpec",
                &[
                    ("holderIdentity", String),
                    ("leaseDurationSeconds", Int32),
                    ("acquireTime", MicroTime),
                    ("renewTime", MicroTime),
                    ("leaseTransitions", Int32),
                    // CoordinatedLeaderElection is off in v1.32.
                    ("strategy", Gated),
                    ("preferredHolder", Gated),
                ],
            ),
        ),
    ],
);

const EVENT_SOURCE: Schema = Struct("EventSource", &[("component", String), ("host", String)]);

const CORE_EVENT: Schema = Struct(
    "Event",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        ("involvedObject", OBJECT_REFERENCE),
        ("reason", String),
        ("message", String),
        ("source", EVENT_SOURCE),
        ("firstTimestamp", Time),
        ("lastTimestamp", Time),
        ("count", Int32),
        ("type", String),
        ("eventTime", MicroTime),
        ("series", Struct("EventSeries", &[("count", Int32), ("lastObservedTime", MicroTime)])),
        ("action", String),
        ("related", OBJECT_REFERENCE),
        ("reportingComponent", String),
        ("reportingInstance", String),
    ],
);

const EVENT: Schema = Struct(
    "Event",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        ("eventTime", MicroTime),
        ("series", Struct("EventSeries", &[("count", Int32), ("lastObservedTime", MicroTime)])),
        ("reportingController", String),
        ("reportingInstance", String),
        ("action", String),
        ("reason", String),
        ("regarding", OBJECT_REFERENCE),
        ("related", OBJECT_REFERENCE),
        ("note", String),
        ("type", String),
        ("deprecatedSource", EVENT_SOURCE),
        ("deprecatedFirstTimestamp", Time),
        ("deprecatedLastTimestamp", Time),
        ("deprecatedCount", Int32),
    ],
);

const NAMESPACE: Schema = Struct(
    "Namespace",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        ("spec", Struct("NamespaceSpec", &[("finalizers", List(&String))])),
        ("status", Struct("NamespaceStatus", &[("phase", String), ("conditions", List(&Any))])),
    ],
);

const SERVICE_ACCOUNT: Schema = Struct(
    "ServiceAccount",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        ("secrets", List(&Any)),
        ("imagePullSecrets", List(&Any)),
        ("automountServiceAccountToken", Bool),
    ],
);

const POLICY_RULE: Schema = Struct(
    "PolicyRule",
    &[
        ("verbs", List(&String)),
        ("apiGroups", List(&String)),
        ("resources", List(&String)),
        ("resourceNames", List(&String)),
        ("nonResourceURLs", List(&String)),
    ],
);

const ROLE: Schema = Struct(
    "Role",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        ("rules", List(&POLICY_RULE)),
        ("aggregationRule", Any),
    ],
);

const BINDING: Schema = Struct(
    "RoleBinding",
    &[
        ("kind", String),
        ("apiVersion", String),
        ("metadata", OBJECT_META),
        (
            "subjects",
            List(&Struct(
                "Subject",
                &[("kind", String), ("apiGroup", String), ("name", String), ("namespace", String)],
            )),
        ),
        ("roleRef", Struct("RoleRef", &[("apiGroup", String), ("kind", String), ("name", String)])),
    ],
);

/// The schema of a built-in kind (`group` tells the two Events apart); `None` for custom types.
pub(crate) fn of(kind: &str, group: &str) -> Option<Schema> {
    Some(match (kind, group) {
        ("Service", _) => SERVICE,
        ("EndpointSlice", _) => ENDPOINT_SLICE,
        ("Endpoints", _) => ENDPOINTS,
        ("Lease", _) => LEASE,
        ("Event", "") => CORE_EVENT,
        ("Event", _) => EVENT,
        ("Namespace", _) => NAMESPACE,
        ("ServiceAccount", _) => SERVICE_ACCOUNT,
        ("Role" | "ClusterRole", _) => ROLE,
        ("RoleBinding" | "ClusterRoleBinding", _) => BINDING,
        _ => return None,
    })
}

/// How unknown fields are treated (`fieldValidation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    Ignore,
    Warn,
    Strict,
}

impl Unknown {
    pub fn of(query: Option<&std::string::String>) -> Unknown {
        match query.map(std::string::String::as_str) {
            Some("Strict") => Unknown::Strict,
            Some("Ignore") => Unknown::Ignore,
            _ => Unknown::Warn,
        }
    }
}

/// Decodes `value` against `schema` in place (unknown and gated fields removed, times
/// normalised); returns the warnings, or the decoding error (without the "cannot be handled as"
/// prefix the caller adds).
pub(crate) fn decode(
    schema: Schema,
    value: &mut Value,
    unknown: Unknown,
) -> Result<Vec<std::string::String>, std::string::String> {
    let mut unknowns = Vec::new();
    walk(schema, value, "", "", &mut unknowns)?;
    match unknown {
        Unknown::Strict if !unknowns.is_empty() => {
            let list: Vec<std::string::String> =
                unknowns.iter().map(|path| format!("unknown field \"{path}\"")).collect();
            Err(format!("strict decoding error: {}", list.join(", ")))
        }
        Unknown::Warn => Ok(unknowns.iter().map(|path| format!("unknown field \"{path}\"")).collect()),
        _ => Ok(Vec::new()),
    }
}

fn walk(
    schema: Schema,
    value: &mut Value,
    path: &str,
    owner: &str,
    unknowns: &mut Vec<std::string::String>,
) -> Result<(), std::string::String> {
    if value.is_null() {
        return Ok(());
    }
    let mismatch = |go_type: &str, value: &Value| {
        let json_type = match value {
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Bool(_) => "bool",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
            Value::Null => "null",
        };
        if owner.is_empty() {
            format!("json: cannot unmarshal {json_type} into Go value of type {go_type}")
        } else {
            format!(
                "json: cannot unmarshal {json_type} into Go struct field {owner}.{path} of type {go_type}"
            )
        }
    };
    match schema {
        Struct(name, fields) => {
            let Some(map) = value.as_object_mut() else { return Err(mismatch(&format!("v1.{name}"), value)) };
            let keys: Vec<std::string::String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                match fields.iter().find(|(field, _)| *field == key) {
                    Some((_, Gated)) => {
                        map.remove(&key);
                    }
                    Some((_, field)) => {
                        walk(*field, map.get_mut(&key).expect("a key"), &child_path, name, unknowns)?;
                        // Go's `omitempty` drops an empty map (labels, annotations, selectors).
                        if matches!(field, Labels)
                            && map.get(&key).is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()))
                        {
                            map.remove(&key);
                        }
                    }
                    None => {
                        map.remove(&key);
                        unknowns.push(child_path);
                    }
                }
            }
        }
        Labels => {
            let Some(map) = value.as_object() else { return Err(mismatch("map[string]string", value)) };
            if let Some((key, bad)) = map.iter().find(|(_, v)| !v.is_string() && !v.is_null()) {
                let path = format!("{path}.{key}");
                return Err(walk_scalar_error(owner, &path, bad, "string"));
            }
        }
        List(item) => {
            let Some(items) = value.as_array_mut() else { return Err(mismatch(&go_list_type(*item), value)) };
            for element in items {
                walk(*item, element, path, owner, unknowns)?;
            }
        }
        String if !value.is_string() => return Err(mismatch("string", value)),
        Int32 | Int64 if !value.is_i64() && !value.is_u64() => {
            return Err(mismatch(if matches!(schema, Int32) { "int32" } else { "int64" }, value));
        }
        Bool if !value.is_boolean() => return Err(mismatch("bool", value)),
        IntOrString if !value.is_string() && !value.is_i64() => {
            return Err(mismatch("intstr.IntOrString", value));
        }
        Time => {
            let text = value.as_str().ok_or_else(|| mismatch("v1.Time", value))?;
            *value = Value::String(parse_time(text, false)?);
        }
        MicroTime => {
            let text = value.as_str().ok_or_else(|| mismatch("v1.MicroTime", value))?;
            *value = Value::String(parse_time(text, true)?);
        }
        _ => {}
    }
    Ok(())
}

fn walk_scalar_error(owner: &str, path: &str, value: &Value, go_type: &str) -> std::string::String {
    let json_type = if value.is_number() {
        "number"
    } else if value.is_boolean() {
        "bool"
    } else {
        "object"
    };
    format!("json: cannot unmarshal {json_type} into Go struct field {owner}.{path} of type {go_type}")
}

fn go_list_type(item: Schema) -> std::string::String {
    match item {
        Struct(name, _) => format!("[]v1.{name}"),
        String => "[]string".to_owned(),
        _ => "[]interface {}".to_owned(),
    }
}

/// Parses an RFC 3339 time as the server does: `metav1.Time` (Go's RFC 3339, any fraction) or
/// `metav1.MicroTime` (exactly six fractional digits); answers it in UTC (whole seconds for Time).
pub(crate) fn parse_time(text: &str, micro: bool) -> Result<std::string::String, std::string::String> {
    let layout = if micro { "2006-01-02T15:04:05.000000Z07:00" } else { "2006-01-02T15:04:05Z07:00" };
    let fail = |rest: &str, element: &str| {
        Err(format!("parsing time \"{text}\" as \"{layout}\": cannot parse \"{rest}\" as \"{element}\""))
    };
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut numbers = [0i64; 6];
    let elements: [(&str, usize); 6] = [("2006", 4), ("01", 2), ("02", 2), ("15", 2), ("04", 2), ("05", 2)];
    let separators = ["-", "-", "T", ":", ":", ""];
    for (i, (element, width)) in elements.iter().enumerate() {
        let digits = bytes.get(at..at + width).filter(|d| d.iter().all(u8::is_ascii_digit));
        let Some(digits) = digits else { return fail(&text[at.min(text.len())..], element) };
        numbers[i] = std::str::from_utf8(digits).unwrap_or("0").parse().unwrap_or(0);
        at += width;
        let separator = separators[i];
        if !separator.is_empty() {
            if !text[at..].starts_with(separator) {
                return fail(&text[at..], separator);
            }
            at += separator.len();
        }
    }
    let mut fraction = std::string::String::new();
    if micro {
        let digits = bytes.get(at + 1..at + 7).filter(|d| d.iter().all(u8::is_ascii_digit));
        if bytes.get(at) != Some(&b'.') || digits.is_none() {
            return fail(&text[at..], ".000000");
        }
        fraction = text[at..at + 7].to_owned();
        at += 7;
    } else if bytes.get(at) == Some(&b'.') {
        at += 1;
        while bytes.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
    }
    let offset_seconds = match &text[at..] {
        "Z" => 0,
        zone if zone.len() == 6 && (zone.starts_with('+') || zone.starts_with('-')) && &zone[3..4] == ":" => {
            let (Ok(hours), Ok(minutes)) = (zone[1..3].parse::<i64>(), zone[4..6].parse::<i64>()) else {
                return fail(zone, "Z07:00");
            };
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (hours * 3600 + minutes * 60)
        }
        rest => return fail(rest, "Z07:00"),
    };
    let [year, month, day, hour, minute, second] = numbers;
    let days = days_from_civil(year, month, day);
    let total = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    let (days, rest) = (total.div_euclid(86_400), total.rem_euclid(86_400));
    let (year, month, day) = super::store::civil_from_days(days);
    Ok(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    ))
}

/// Howard Hinnant's civil-to-days algorithm (the inverse of `store::civil_from_days`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Adds the fields Go's encoder writes even when unset (no `omitempty`, or a struct), as the
/// real server answers them.
pub(crate) fn go_zero_values(kind: &str, group: &str, object: &mut Value) {
    let Some(map) = object.as_object_mut() else { return };
    let ensure = |map: &mut Map<std::string::String, Value>, key: &str, zero: Value| {
        map.entry(key.to_owned()).or_insert(zero);
    };
    match (kind, group) {
        ("EndpointSlice", _) => {
            ensure(map, "ports", Value::Null);
            ensure(map, "endpoints", Value::Null);
        }
        ("Event", "") => {
            ensure(map, "involvedObject", Value::Object(Map::new()));
            ensure(map, "source", Value::Object(Map::new()));
            ensure(map, "firstTimestamp", Value::Null);
            ensure(map, "lastTimestamp", Value::Null);
            ensure(map, "eventTime", Value::Null);
            ensure(map, "reportingComponent", Value::String(std::string::String::new()));
            ensure(map, "reportingInstance", Value::String(std::string::String::new()));
        }
        ("Event", _) => {
            ensure(map, "eventTime", Value::Null);
            ensure(map, "regarding", Value::Object(Map::new()));
            ensure(map, "deprecatedSource", Value::Object(Map::new()));
            ensure(map, "deprecatedFirstTimestamp", Value::Null);
            ensure(map, "deprecatedLastTimestamp", Value::Null);
        }
        ("Service", _) => {
            let conditions =
                map.get_mut("status").and_then(|s| s.get_mut("conditions")).and_then(Value::as_array_mut);
            for condition in conditions.into_iter().flatten().filter_map(Value::as_object_mut) {
                ensure(condition, "lastTransitionTime", Value::Null);
                ensure(condition, "reason", Value::String(std::string::String::new()));
                ensure(condition, "message", Value::String(std::string::String::new()));
            }
            let ingress = map
                .get_mut("status")
                .and_then(|s| s.get_mut("loadBalancer"))
                .and_then(|l| l.get_mut("ingress"))
                .and_then(Value::as_array_mut);
            for entry in ingress.into_iter().flatten() {
                for port in entry
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object_mut)
                {
                    ensure(port, "protocol", Value::String(std::string::String::new()));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_parse_and_fail_as_go_parses_them() {
        assert_eq!(
            parse_time("2026-12-01T10:01:02.123456+01:00", true).unwrap(),
            "2026-12-01T09:01:02.123456Z"
        );
        assert_eq!(parse_time("2026-12-01T09:00:56.869407Z", false).unwrap(), "2026-12-01T09:00:56Z");
        let layout = "\"2006-01-02T15:04:05.000000Z07:00\"";
        assert_eq!(
            parse_time("2026-12-01T09:01:02.123Z", true).unwrap_err(),
            format!(
                "parsing time \"2026-12-01T09:01:02.123Z\" as {layout}: cannot parse \".123Z\" as \".000000\""
            )
        );
        assert!(
            parse_time("2026-12-01T09:01:02.123456789Z", true)
                .unwrap_err()
                .ends_with("cannot parse \"789Z\" as \"Z07:00\"")
        );
        assert!(
            parse_time("2026-12-01T09:01:02Z", true)
                .unwrap_err()
                .ends_with("cannot parse \"Z\" as \".000000\"")
        );
        assert!(
            parse_time("2026-12-01 09:01:02.123456Z", true)
                .unwrap_err()
                .ends_with("cannot parse \" 09:01:02.123456Z\" as \"T\"")
        );
        assert_eq!(parse_time("2026-01-01T00:30:00+01:00", false).unwrap(), "2025-12-31T23:30:00Z");
    }
}
