//! String maps of Kubernetes objects (labels, annotations) and label selectors.
//!
//! Selectors (`matchLabels` and `matchExpressions`) match as the API server matches them: every
//! term must hold; an empty selector matches everything; an unknown operator matches nothing (a
//! selector ringlb cannot read must not widen what it selects).
//!
//! [`Labels`] is the compact form of a map an object keeps for as long as it exists: one sorted
//! slice, where a `BTreeMap` takes a 544-byte node for its first entry already.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// A map of labels or annotations, to read by key.
pub trait Lookup {
    fn lookup(&self, key: &str) -> Option<&str>;
}

impl Lookup for BTreeMap<String, String> {
    fn lookup(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// Labels or annotations, compact (see the module doc); sorted by key, keys unique.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        let found = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[found].1)
    }

    /// From pairs already sorted by key, keys unique (a `BTreeMap`'s order).
    pub fn from_sorted(pairs: Box<[(Box<str>, Box<str>)]>) -> Labels {
        debug_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0), "sorted, keys unique");
        Labels(pairs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl Lookup for Labels {
    fn lookup(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Labels(map.into_iter().map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str())).collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        Labels::from(BTreeMap::from(pairs))
    }
}

pub fn matches(selector: &LabelSelector, labels: &(impl Lookup + ?Sized)) -> bool {
    let labels_ok =
        selector.match_labels.iter().flatten().all(|(key, value)| labels.lookup(key) == Some(value.as_str()));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|expression| {
        let values = expression.values.as_deref().unwrap_or_default();
        let value = labels.lookup(&expression.key);
        let listed = |v: &str| values.iter().any(|listed| listed == v);
        match expression.operator.as_str() {
            "In" => value.is_some_and(listed),
            "NotIn" => value.is_none_or(|v| !listed(v)),
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
            assert_eq!(matches(&selector, &Labels::from(web.clone())), expected, "{op}, compact");
        }
        let absent = LabelSelector {
            match_expressions: Some(vec![expression("zone", "NotIn", &["a"])]),
            ..LabelSelector::default()
        };
        assert!(matches(&absent, &web), "NotIn holds for an absent label");
    }

    #[test]
    fn compact_labels_read_as_the_map_they_came_from() {
        let map = labels(&[("tier", "front"), ("app", "web"), ("", "empty key")]);
        let compact = Labels::from(map.clone());
        for key in ["tier", "app", "", "zone", "ap", "appx"] {
            assert_eq!(compact.get(key), map.get(key).map(String::as_str), "{key:?}");
        }
        let pairs: Vec<_> = compact.iter().collect();
        assert_eq!(pairs, [("", "empty key"), ("app", "web"), ("tier", "front")]);
        assert!(Labels::default().is_empty() && !compact.is_empty());
    }
}
