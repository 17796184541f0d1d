//! Which nodes may announce an IP to the network, as MetalLB's advertisement CRDs say
//! ([`crate::metallb`]), so that a MetalLB user's `L2Advertisement`s mean what they meant there.
//!
//! - **Ungoverned** ([`Announcements::ungoverned`], the default): no advertisement objects are
//!   read (manifests, the appliance), and every IP may be announced by every node.
//! - **Governed** ([`Announcements::governed`], a cluster whose pools ringlb reads): an IP inside
//!   a pool is announced in L2 only when an `L2Advertisement` selects that pool (by name in
//!   `ipAddressPools` or by labels in `ipAddressPoolSelectors`; neither: every pool), as in
//!   MetalLB, where a pool no advertisement selects is allocated from but announced nowhere. Of
//!   the nodes, only those one of its `nodeSelectors` matches (none: every node) may announce it,
//!   and only when its `interfaces` (none: any) list the interface ringlb announces on. Several
//!   advertisements selecting one pool add up. An IP in no pool (`spec.externalIPs`, which no
//!   pool governs) is announced as when ungoverned.
//! - **Same answer everywhere**: every replica computes this from the same watched objects. The
//!   interface is each replica's `--announce-interface`, the same on every node of a DaemonSet;
//!   a replica given another one computes other candidates, and L2's digest comparison says so.
//!
//! Pure: objects in, a value the snapshot carries out; L2 ([`crate::l2::candidates`]) asks it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::ipam::{IpAddressPool, Pool};
use crate::l2::Candidates;
use crate::labels;
use crate::metallb::L2Advertisement;

/// Node name → its labels, as `nodeSelectors` match them.
pub type NodeLabels = BTreeMap<Arc<str>, BTreeMap<String, String>>;

/// What the advertisement objects say (see the module doc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Announcements {
    governed: bool,
    /// The pools that parse, with their labels' selection already resolved into the rules.
    pools: Vec<Pool>,
    l2: Vec<L2Rule>,
}

/// One `L2Advertisement`, resolved against the pools and nodes.
#[derive(Debug, Clone, PartialEq)]
struct L2Rule {
    /// Indices into [`Announcements::pools`].
    pools: Vec<usize>,
    nodes: Candidates,
    interfaces: Vec<String>,
}

/// The pools and nodes an advertisement selects.
struct Selectors<'a> {
    pools: &'a [String],
    pool_selectors: &'a [LabelSelector],
    nodes: &'a [LabelSelector],
}

impl Selectors<'_> {
    fn selects(&self, pool: &IpAddressPool) -> bool {
        let name = pool.metadata.name.as_deref().unwrap_or_default();
        let no_labels = BTreeMap::new();
        let pool_labels = pool.metadata.labels.as_ref().unwrap_or(&no_labels);
        (self.pools.is_empty() && self.pool_selectors.is_empty())
            || self.pools.iter().any(|selected| selected == name)
            || self.pool_selectors.iter().any(|selector| labels::matches(selector, pool_labels))
    }

    fn nodes(&self, nodes: &NodeLabels) -> Candidates {
        if self.nodes.is_empty() {
            return Candidates::Any;
        }
        Candidates::Nodes(
            nodes
                .iter()
                .filter(|(_, node_labels)| self.nodes.iter().any(|s| labels::matches(s, node_labels)))
                .map(|(name, _)| Arc::clone(name))
                .collect(),
        )
    }
}

impl Announcements {
    /// Every IP by every node: nothing is read that could say otherwise.
    pub fn ungoverned() -> Self {
        Announcements::default()
    }

    /// What `advertisements` say about the IPs of `pools` (those that do not parse govern nothing:
    /// the allocator reports them), with `nodes` for their node selectors.
    pub fn governed(
        pools: &[&IpAddressPool],
        advertisements: &[&L2Advertisement],
        nodes: &NodeLabels,
    ) -> Self {
        let parsed: Vec<(&IpAddressPool, Pool)> =
            pools.iter().filter_map(|object| Some((*object, Pool::parse(object).ok()?))).collect();
        let l2 = advertisements
            .iter()
            .map(|advertisement| {
                let spec = &advertisement.spec;
                let selectors = Selectors {
                    pools: &spec.ip_address_pools,
                    pool_selectors: &spec.ip_address_pool_selectors,
                    nodes: &spec.node_selectors,
                };
                L2Rule {
                    pools: parsed
                        .iter()
                        .enumerate()
                        .filter(|(_, (object, _))| selectors.selects(object))
                        .map(|(index, _)| index)
                        .collect(),
                    nodes: selectors.nodes(nodes),
                    interfaces: spec.interfaces.clone(),
                }
            })
            .collect();
        Announcements { governed: true, pools: parsed.into_iter().map(|(_, pool)| pool).collect(), l2 }
    }

    /// The nodes that may announce `ip` with ARP/NDP on `interface` (`None`: ringlb announces on
    /// no interface of its own, the kernel answers where the address is); `None`: no node may.
    pub fn l2(&self, ip: IpAddr, interface: Option<&str>) -> Option<Candidates> {
        if !self.governed {
            return Some(Candidates::Any);
        }
        let pools: Vec<usize> = self
            .pools
            .iter()
            .enumerate()
            .filter(|(_, pool)| pool.contains(ip))
            .map(|(index, _)| index)
            .collect();
        if pools.is_empty() {
            return Some(Candidates::Any);
        }
        let mut admitted: Option<BTreeSet<Arc<str>>> = None;
        for rule in &self.l2 {
            let on_interface = rule.interfaces.is_empty()
                || interface.is_none_or(|interface| rule.interfaces.iter().any(|listed| listed == interface));
            if !on_interface || !rule.pools.iter().any(|pool| pools.contains(pool)) {
                continue;
            }
            match &rule.nodes {
                Candidates::Any => return Some(Candidates::Any),
                Candidates::Nodes(nodes) => admitted.get_or_insert_default().extend(nodes.iter().cloned()),
            }
        }
        admitted.filter(|nodes| !nodes.is_empty()).map(Candidates::Nodes)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::ipam::PoolSpec;
    use crate::metallb::L2AdvertisementSpec;

    fn pool(name: &str, addresses: &str, labels: &[(&str, &str)]) -> IpAddressPool {
        IpAddressPool {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
                ..ObjectMeta::default()
            },
            spec: PoolSpec { addresses: vec![addresses.to_owned()], ..PoolSpec::default() },
        }
    }

    fn selector(key: &str, value: &str) -> LabelSelector {
        LabelSelector {
            match_labels: Some([(key.to_owned(), value.to_owned())].into()),
            ..LabelSelector::default()
        }
    }

    fn advertisement(spec: L2AdvertisementSpec) -> L2Advertisement {
        L2Advertisement { metadata: ObjectMeta::default(), spec }
    }

    fn nodes() -> NodeLabels {
        [("edge-1", "true"), ("edge-2", "true"), ("core-1", "false")]
            .into_iter()
            .map(|(name, edge)| (Arc::from(name), [("edge".to_owned(), edge.to_owned())].into()))
            .collect()
    }

    fn named(names: &[&str]) -> Candidates {
        Candidates::Nodes(names.iter().map(|n| Arc::from(*n)).collect())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP")
    }

    #[test]
    fn ungoverned_every_node_announces_every_ip() {
        assert_eq!(Announcements::ungoverned().l2(ip("192.0.2.1"), Some("eth0")), Some(Candidates::Any));
    }

    #[test]
    fn a_pool_no_advertisement_selects_is_announced_nowhere_and_an_ip_outside_the_pools_everywhere() {
        let (lan, wan) = (pool("lan", "192.0.2.0/24", &[]), pool("wan", "198.51.100.0/24", &[]));
        let only_lan =
            advertisement(L2AdvertisementSpec { ip_address_pools: vec!["lan".into()], ..Default::default() });
        let announcements = Announcements::governed(&[&lan, &wan], &[&only_lan], &nodes());
        assert_eq!(announcements.l2(ip("192.0.2.7"), None), Some(Candidates::Any));
        assert_eq!(announcements.l2(ip("198.51.100.7"), None), None, "wan is not advertised");
        assert_eq!(announcements.l2(ip("203.0.113.7"), None), Some(Candidates::Any), "an externalIP");
        let none = Announcements::governed(&[&lan], &[], &nodes());
        assert_eq!(none.l2(ip("192.0.2.7"), None), None, "no L2Advertisement at all: as MetalLB");
    }

    #[test]
    fn pool_label_selectors_node_selectors_and_interfaces_narrow_and_advertisements_add_up() {
        let lan = pool("lan", "192.0.2.0/24", &[("tier", "edge")]);
        let edge_nodes = advertisement(L2AdvertisementSpec {
            ip_address_pool_selectors: vec![selector("tier", "edge")],
            node_selectors: vec![selector("edge", "true")],
            ..Default::default()
        });
        let core_on_eth1 = advertisement(L2AdvertisementSpec {
            ip_address_pools: vec!["lan".into()],
            node_selectors: vec![selector("edge", "false")],
            interfaces: vec!["eth1".into()],
            ..Default::default()
        });
        let announcements = Announcements::governed(&[&lan], &[&edge_nodes, &core_on_eth1], &nodes());
        let vip = ip("192.0.2.9");
        assert_eq!(announcements.l2(vip, Some("eth0")), Some(named(&["edge-1", "edge-2"])));
        assert_eq!(announcements.l2(vip, Some("eth1")), Some(named(&["core-1", "edge-1", "edge-2"])));
        let nobody = advertisement(L2AdvertisementSpec {
            node_selectors: vec![selector("edge", "maybe")],
            ..Default::default()
        });
        assert_eq!(Announcements::governed(&[&lan], &[&nobody], &nodes()).l2(vip, None), None);
        let elsewhere =
            advertisement(L2AdvertisementSpec { interfaces: vec!["eth9".into()], ..Default::default() });
        assert_eq!(Announcements::governed(&[&lan], &[&elsewhere], &nodes()).l2(vip, Some("eth0")), None);
    }
}
