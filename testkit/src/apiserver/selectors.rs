//! Label and field selectors of list and watch requests, as the real server parses them: `a=b`,
//! `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)` for labels; `path=value` and
//! `path!=value` for the fields each type supports (others are a 400).

use serde_json::Value;

use super::resources::ResourceType;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector; the empty one matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::Absent(valid_key(key.trim())?)
            } else if let Some(found) = missing_set(part) {
                return Err(format!("unable to parse requirement: found '{found}' expected: '('"));
            } else if let Some((key, values)) = set_requirement(part, " notin ") {
                Requirement::NotIn(valid_key(&key)?, values)
            } else if let Some((key, values)) = set_requirement(part, " in ") {
                Requirement::In(valid_key(&key)?, values)
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(valid_key(key.trim())?, value.trim().to_owned())
            } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(valid_key(key.trim())?, value.trim().to_owned())
            } else {
                Requirement::Exists(valid_key(part)?)
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(key, value) => get(key) == Some(value.as_str()),
            Requirement::NotEquals(key, value) => get(key) != Some(value.as_str()),
            Requirement::Exists(key) => get(key).is_some(),
            Requirement::Absent(key) => get(key).is_none(),
            Requirement::In(key, values) => get(key).is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn(key, values) => get(key).is_none_or(|v| values.iter().all(|x| x != v)),
        })
    }
}

fn valid_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.len() <= 316
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && key.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(key.to_owned())
    } else {
        Err(format!("unable to parse requirement: invalid label key \"{key}\""))
    }
}

/// What follows `in`/`notin` where a `(` should, if it is missing (the real parser's words).
fn missing_set(part: &str) -> Option<String> {
    let mut words = part.split_whitespace();
    let _key = words.next()?;
    let operator = words.next()?;
    if operator != "in" && operator != "notin" {
        return None;
    }
    let rest: String = words.collect::<Vec<_>>().join(" ");
    (!rest.starts_with('(')).then(|| rest.chars().take_while(|c| !c.is_whitespace() && *c != ',').collect())
}

fn set_requirement(part: &str, operator: &str) -> Option<(String, Vec<String>)> {
    let (key, rest) = part.split_once(operator)?;
    let rest = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some((
        key.trim().to_owned(),
        rest.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect(),
    ))
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A parsed field selector over the fields a type supports.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `text` for objects of `type_`; an unsupported field is the real server's 400 (core
    /// types word it one way, the others another).
    pub fn parse(text: &str, type_: &ResourceType) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = match part.split_once("!=") {
                Some((field, value)) => (field, false, value),
                None => match part.split_once("==").or_else(|| part.split_once('=')) {
                    Some((field, value)) => (field, true, value),
                    None => return Err(format!("invalid selector: '{text}'; can't understand '{part}'")),
                },
            };
            let field = field.trim();
            if !known(type_.kind).contains(&field) {
                return Err(if type_.group.is_empty() || type_.kind == "Event" {
                    format!("field label not supported: {field}")
                } else {
                    format!(
                        "\"{field}\" is not a known field selector: only \"{}\"",
                        known(type_.kind).join("\", \"")
                    )
                });
            }
            // events.k8s.io Events are matched as the core Events they are stored as.
            let stored = match (type_.group, field.strip_prefix("regarding.")) {
                ("events.k8s.io", Some(rest)) => format!("involvedObject.{rest}"),
                ("events.k8s.io", None) if field == "reportingController" => "reportingComponent".to_owned(),
                _ => field.to_owned(),
            };
            terms.push((stored, equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field.split('.').fold(object, |v, part| &v[part]);
            let actual = actual.as_str().unwrap_or_default();
            (actual == value) == *equal
        })
    }
}

fn known(kind: &str) -> Vec<&'static str> {
    let mut fields = vec!["metadata.name", "metadata.namespace"];
    match kind {
        "Service" => fields.extend(["spec.clusterIP", "spec.type"]),
        "Event" => fields.extend([
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
            "regarding.kind",
            "regarding.name",
            "regarding.namespace",
            "regarding.uid",
            "reportingController",
        ]),
        "Namespace" => fields.push("status.phase"),
        _ => {}
    }
    fields
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::apiserver::resources::TYPES;

    #[test]
    fn label_selectors_parse_and_match_like_the_apiserver() {
        let object = json!({"metadata": {"labels": {"app": "web", "tier": "frontend"}}});
        for (text, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=frontend", true),
            ("app!=web", false),
            ("app", true),
            ("!app", false),
            ("tier in (frontend, backend)", true),
            ("tier notin (frontend)", false),
            ("env notin (prod)", true),
        ] {
            assert_eq!(LabelSelector::parse(text).expect(text).matches(&object), expected, "{text}");
        }
        assert!(LabelSelector::parse("=oops").is_err());
    }

    #[test]
    fn field_selectors_know_their_fields() {
        let object =
            json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"type": "LoadBalancer"}});
        assert!(FieldSelector::parse("metadata.name=web", &TYPES[0]).expect("parse").matches(&object));
        assert!(FieldSelector::parse("spec.type!=ClusterIP", &TYPES[0]).expect("parse").matches(&object));
        assert!(FieldSelector::parse("spec.ports", &TYPES[0]).is_err());
        assert!(
            FieldSelector::parse(
                "spec.type=x",
                &TYPES[super::super::resources::find("discovery.k8s.io", "v1", "endpointslices").unwrap()]
            )
            .is_err()
        );
    }
}
