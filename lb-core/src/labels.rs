//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as the API server matches
//! them: every term must hold; an empty selector matches everything; an unknown operator matches
//! nothing (a selector ringlb cannot read must not widen what it selects).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(key, value)| labels.get(key) == Some(value));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|expression| {
        let values = expression.values.as_deref().unwrap_or_default();
        let value = labels.get(&expression.key);
        match expression.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn selectors_match_as_the_api_server_does() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        assert!(matches(&LabelSelector::default(), &web));
        let by_labels =
            LabelSelector { match_labels: Some(labels(&[("app", "web")])), ..LabelSelector::default() };
        assert!(matches(&by_labels, &web) && !matches(&by_labels, &labels(&[("app", "api")])));
        for (op, values, expected) in [
            ("In", &["web", "api"][..], true),
            ("NotIn", &["web"][..], false),
            ("Exists", &[][..], true),
            ("DoesNotExist", &[][..], false),
            ("Bogus", &[][..], false),
        ] {
            let selector = LabelSelector {
                match_expressions: Some(vec![expression("app", op, values)]),
                ..LabelSelector::default()
            };
            assert_eq!(matches(&selector, &web), expected, "{op}");
        }
        let absent = LabelSelector {
            match_expressions: Some(vec![expression("zone", "NotIn", &["a"])]),
            ..LabelSelector::default()
        };
        assert!(matches(&absent, &web), "NotIn holds for an absent label");
    }
}
