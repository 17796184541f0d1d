//! MetalLB's `IPAddressPool` (`metallb.io/v1beta1`), as ringlb reads it, and its parsed form.
//!
//! The type implements `k8s_openapi::Resource` and `Metadata` by hand (as MetalLB's other CRDs
//! in [`crate::metallb`] do), so kube-rs watches it like a built-in type while this crate stays
//! free of kube. Only MetalLB's documented fields are read:
//! `addresses` (CIDRs and `first-last` ranges), `autoAssign` (default true), `avoidBuggyIPs`
//! (default false: skip `.0` and `.255` addresses) and `serviceAllocation` (`priority`, lower is
//! preferred; `namespaces` and `namespaceSelectors`, either admitting a namespace; and
//! `serviceSelectors`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::labels;

/// An `IPAddressPool` object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpAddressPool {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PoolSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    #[serde(default, rename = "avoidBuggyIPs", skip_serializing_if = "Option::is_none")]
    pub avoid_buggy_ips: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

crate::metallb::metallb_resource!(IpAddressPool, "v1beta1", "IPAddressPool", "ipaddresspools");

/// A contiguous run of addresses of one family, as integers (`first <= last`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.first.is_ipv4()
            && to_u128(ip) >= to_u128(self.first)
            && to_u128(ip) <= to_u128(self.last)
    }
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub(crate) fn from_u128(value: u128, ipv4: bool) -> IpAddr {
    if ipv4 { IpAddr::V4((value as u32).into()) } else { IpAddr::V6(value.into()) }
}

/// A pool ready to allocate from.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub ranges: Vec<Range>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    /// `None` sorts after every priority.
    pub priority: Option<i32>,
    namespaces: Vec<String>,
    namespace_selectors: Vec<LabelSelector>,
    service_selectors: Vec<LabelSelector>,
}

/// Why a pool cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolError {
    pub pool: String,
    pub reason: String,
}

impl Pool {
    /// Parses a pool object; a bad address entry makes the whole pool unusable (an allocation from
    /// a pool the operator did not mean is worse than none).
    pub fn parse(object: &IpAddressPool) -> Result<Pool, PoolError> {
        let name = object.metadata.name.clone().unwrap_or_default();
        let error = |reason: String| PoolError { pool: name.clone(), reason };
        let mut ranges = Vec::new();
        for entry in &object.spec.addresses {
            ranges.push(
                parse_range(entry.trim()).map_err(|reason| error(format!("address {entry:?}: {reason}")))?,
            );
        }
        if ranges.is_empty() {
            return Err(error("spec.addresses is empty".to_owned()));
        }
        ranges.sort();
        let allocation = object.spec.service_allocation.clone().unwrap_or_default();
        Ok(Pool {
            name: name.clone(),
            ranges,
            auto_assign: object.spec.auto_assign.unwrap_or(true),
            avoid_buggy_ips: object.spec.avoid_buggy_ips.unwrap_or(false),
            priority: allocation.priority,
            namespaces: allocation.namespaces,
            namespace_selectors: allocation.namespace_selectors,
            service_selectors: allocation.service_selectors,
        })
    }

    /// Whether the pool serves a Service in `namespace` (with `namespace_labels`) labelled
    /// `service_labels`.
    pub fn admits(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        service_labels: &(impl labels::Lookup + ?Sized),
    ) -> bool {
        let namespace_ok = (self.namespaces.is_empty() && self.namespace_selectors.is_empty())
            || self.namespaces.iter().any(|n| n == namespace)
            || self.namespace_selectors.iter().any(|s| labels::matches(s, namespace_labels));
        let service_ok = self.service_selectors.is_empty()
            || self.service_selectors.iter().any(|s| labels::matches(s, service_labels));
        namespace_ok && service_ok
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Whether `ip` may be handed out (`avoidBuggyIPs` skips addresses ending in `.0` or `.255`).
    pub fn usable(&self, ip: IpAddr) -> bool {
        !(self.avoid_buggy_ips && matches!(ip, IpAddr::V4(v4) if matches!(v4.octets()[3], 0 | 255)))
    }

    /// The order pools are tried in: priority (lower first, unset last), then name.
    pub fn rank(&self) -> (bool, i32, &str) {
        (self.priority.is_none(), self.priority.unwrap_or(0), &self.name)
    }
}

fn parse_range(entry: &str) -> Result<Range, String> {
    if let Some((first, last)) = entry.split_once('-') {
        let first: IpAddr =
            first.trim().parse().map_err(|_| format!("{:?} is not an IP address", first.trim()))?;
        let last: IpAddr =
            last.trim().parse().map_err(|_| format!("{:?} is not an IP address", last.trim()))?;
        if first.is_ipv4() != last.is_ipv4() {
            return Err("the two ends are of different families".to_owned());
        }
        if to_u128(first) > to_u128(last) {
            return Err("the first address is after the last".to_owned());
        }
        return Ok(Range { first, last });
    }
    let cidr: Cidr = entry.parse().map_err(|e| format!("not a CIDR or a first-last range ({e})"))?;
    let (first, last) = cidr.bounds();
    Ok(Range { first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(addresses: &[&str]) -> IpAddressPool {
        IpAddressPool {
            metadata: ObjectMeta { name: Some("p".to_owned()), ..ObjectMeta::default() },
            spec: PoolSpec {
                addresses: addresses.iter().map(|s| (*s).to_owned()).collect(),
                ..PoolSpec::default()
            },
        }
    }

    #[test]
    fn addresses_are_cidrs_and_ranges_of_either_family() {
        let parsed = Pool::parse(&pool(&["198.51.100.0/30", "192.0.2.10-192.0.2.12", "2001:db8::/126"]))
            .expect("valid");
        assert!(
            parsed.contains("198.51.100.3".parse().unwrap())
                && !parsed.contains("198.51.100.4".parse().unwrap())
        );
        assert!(
            parsed.contains("192.0.2.11".parse().unwrap()) && !parsed.contains("192.0.2.13".parse().unwrap())
        );
        assert!(parsed.contains("2001:db8::3".parse().unwrap()));
        assert!(parsed.auto_assign && !parsed.avoid_buggy_ips);
    }

    #[test]
    fn a_bad_entry_makes_the_pool_unusable_with_a_reason() {
        for (addresses, needle) in [
            (&["192.0.2.300/32"][..], "not a CIDR"),
            (&["192.0.2.9-192.0.2.1"][..], "after the last"),
            (&["192.0.2.1-2001:db8::1"][..], "different families"),
            (&[][..], "empty"),
        ] {
            let error = Pool::parse(&pool(addresses)).expect_err("invalid");
            assert!(error.reason.contains(needle), "{addresses:?}: {}", error.reason);
        }
    }

    #[test]
    fn the_crd_shape_deserialises() {
        let value = serde_json::json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
            "metadata": {"name": "default", "namespace": "metallb-system"},
            "spec": {"addresses": ["192.0.2.0/24"], "autoAssign": false, "avoidBuggyIPs": true,
                     "serviceAllocation": {"priority": 10, "namespaces": ["shop"], "serviceSelectors": [{"matchLabels": {"app": "web"}}]}}
        });
        let object: IpAddressPool = serde_json::from_value(value).expect("deserialises");
        let parsed = Pool::parse(&object).expect("valid");
        assert!(!parsed.auto_assign && parsed.avoid_buggy_ips && parsed.priority == Some(10));
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        assert!(parsed.admits("shop", &BTreeMap::new(), &labels));
        assert!(!parsed.admits("other", &BTreeMap::new(), &labels));
        assert!(!parsed.admits("shop", &BTreeMap::new(), &BTreeMap::new()));
        assert!(!parsed.usable("192.0.2.0".parse().unwrap()) && parsed.usable("192.0.2.1".parse().unwrap()));
    }
}
