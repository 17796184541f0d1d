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
//! - **BGP** (governed only): the sessions and per-session routes of [`bgp`], asked per node
//!   with [`Announcements::bgp`].
//! - **Rejections**: an object that cannot mean what it says is left out, and why is in
//!   [`Announcements::problems`] (the control loop logs them when the objects change).
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

pub mod bgp;

use bgp::BgpRules;
pub use bgp::{BgpObjects, BgpPlan};

/// Node name → its labels, as `nodeSelectors` match them.
pub type NodeLabels = BTreeMap<Arc<str>, BTreeMap<String, String>>;

/// What the advertisement objects say (see the module doc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Announcements {
    governed: bool,
    /// The pools that parse, with their labels' selection already resolved into the rules.
    pools: Vec<Pool>,
    l2: Vec<L2Rule>,
    bgp: BgpRules,
    problems: Vec<String>,
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
                .filter(|(_, node_labels)| self.nodes.iter().any(|s| labels::matches(s, *node_labels)))
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

    /// What `advertisements` (L2) and `bgp` say about the IPs of `pools` (those that do not parse
    /// govern nothing: the allocator reports them), with `nodes` for their node selectors.
    pub fn governed(
        pools: &[&IpAddressPool],
        advertisements: &[&L2Advertisement],
        bgp: &BgpObjects<'_>,
        nodes: &NodeLabels,
    ) -> Self {
        let parsed: Vec<(&IpAddressPool, Pool)> =
            pools.iter().filter_map(|object| Some((*object, Pool::parse(object).ok()?))).collect();
        let selected = |selectors: &Selectors<'_>| -> Vec<usize> {
            parsed
                .iter()
                .enumerate()
                .filter(|(_, (object, _))| selectors.selects(object))
                .map(|(index, _)| index)
                .collect()
        };
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
                    pools: selected(&selectors),
                    nodes: selectors.nodes(nodes),
                    interfaces: spec.interfaces.clone(),
                }
            })
            .collect();
        let mut problems = Vec::new();
        let mut sessions = Vec::new();
        for peer in bgp.peers {
            match bgp::session(peer, bgp.bfd_profiles) {
                Ok(session) => {
                    let selectors =
                        Selectors { pools: &[], pool_selectors: &[], nodes: &peer.spec.node_selectors };
                    sessions.push((session, selectors.nodes(nodes)));
                }
                Err(reason) => {
                    problems.push(format!("BGPPeer {}: {reason}; left out", bgp::name_of(&peer.metadata)))
                }
            }
        }
        let mut rules = Vec::new();
        for advertisement in bgp.advertisements {
            let spec = &advertisement.spec;
            let selectors = Selectors {
                pools: &spec.ip_address_pools,
                pool_selectors: &spec.ip_address_pool_selectors,
                nodes: &spec.node_selectors,
            };
            match bgp::rule(advertisement, bgp.communities, selected(&selectors), selectors.nodes(nodes)) {
                Ok(rule) => rules.push(rule),
                Err(reason) => problems.push(format!(
                    "BGPAdvertisement {}: {reason}; left out",
                    bgp::name_of(&advertisement.metadata)
                )),
            }
        }
        Announcements {
            governed: true,
            pools: parsed.into_iter().map(|(_, pool)| pool).collect(),
            l2,
            bgp: BgpRules { sessions, advertisements: rules },
            problems,
        }
    }

    /// What `node` does in BGP for `vips` (the IPs it may advertise at all): its sessions and
    /// their routes. Ungoverned: no sessions (they are not read from objects).
    pub fn bgp(&self, node: &str, vips: &BTreeSet<IpAddr>) -> BgpPlan {
        self.bgp.plan(node, vips, |ip| self.pools_of(ip))
    }

    /// Why objects were left out (see the module doc).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// The pools (indices) that hold `ip`.
    fn pools_of(&self, ip: IpAddr) -> Vec<usize> {
        self.pools.iter().enumerate().filter(|(_, pool)| pool.contains(ip)).map(|(index, _)| index).collect()
    }

    /// The nodes that may announce `ip` with ARP/NDP on `interface` (`None`: ringlb announces on
    /// no interface of its own, the kernel answers where the address is); `None`: no node may.
    pub fn l2(&self, ip: IpAddr, interface: Option<&str>) -> Option<Candidates> {
        if !self.governed {
            return Some(Candidates::Any);
        }
        let pools = self.pools_of(ip);
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

    use std::time::Duration;

    use super::bgp::{Bfd, BgpCommunity, RouteAttributes};
    use super::*;
    use crate::Cidr;
    use crate::ipam::PoolSpec;
    use crate::metallb::{
        BfdProfile, BfdProfileSpec, BgpAdvertisement, BgpAdvertisementSpec, BgpPeer, BgpPeerSpec, Community,
        CommunityAlias, CommunitySpec, L2AdvertisementSpec,
    };

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
        let announcements =
            Announcements::governed(&[&lan, &wan], &[&only_lan], &BgpObjects::default(), &nodes());
        assert_eq!(announcements.l2(ip("192.0.2.7"), None), Some(Candidates::Any));
        assert_eq!(announcements.l2(ip("198.51.100.7"), None), None, "wan is not advertised");
        assert_eq!(announcements.l2(ip("203.0.113.7"), None), Some(Candidates::Any), "an externalIP");
        let none = Announcements::governed(&[&lan], &[], &BgpObjects::default(), &nodes());
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
        let announcements =
            Announcements::governed(&[&lan], &[&edge_nodes, &core_on_eth1], &BgpObjects::default(), &nodes());
        let vip = ip("192.0.2.9");
        assert_eq!(announcements.l2(vip, Some("eth0")), Some(named(&["edge-1", "edge-2"])));
        assert_eq!(announcements.l2(vip, Some("eth1")), Some(named(&["core-1", "edge-1", "edge-2"])));
        let nobody = advertisement(L2AdvertisementSpec {
            node_selectors: vec![selector("edge", "maybe")],
            ..Default::default()
        });
        assert_eq!(
            Announcements::governed(&[&lan], &[&nobody], &BgpObjects::default(), &nodes()).l2(vip, None),
            None
        );
        let elsewhere =
            advertisement(L2AdvertisementSpec { interfaces: vec!["eth9".into()], ..Default::default() });
        assert_eq!(
            Announcements::governed(&[&lan], &[&elsewhere], &BgpObjects::default(), &nodes())
                .l2(vip, Some("eth0")),
            None
        );
    }

    fn peer(name: &str, address: &str, node_selectors: Vec<LabelSelector>) -> BgpPeer {
        BgpPeer {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("metallb-system".into()),
                ..Default::default()
            },
            spec: BgpPeerSpec {
                my_asn: 64513,
                peer_asn: 64512,
                peer_address: address.into(),
                node_selectors,
                ..Default::default()
            },
        }
    }

    fn bgp_advertisement(name: &str, spec: BgpAdvertisementSpec) -> BgpAdvertisement {
        BgpAdvertisement {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("metallb-system".into()),
                ..Default::default()
            },
            spec,
        }
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("a CIDR")
    }

    fn routes(plan: &BgpPlan, session: &str) -> BTreeMap<Cidr, RouteAttributes> {
        plan.sessions.iter().find(|s| s.session.name == session).map(|s| s.routes.clone()).unwrap_or_default()
    }

    #[test]
    fn bgp_peers_are_sessions_of_the_nodes_they_select_with_their_bfd_timers_and_bad_ones_are_left_out() {
        let mut tor = peer("tor", "192.0.2.1", vec![selector("edge", "true")]);
        tor.spec.bfd_profile = Some("fast".into());
        tor.spec.hold_time = Some("9s".into());
        let everywhere = peer("spine", "2001:db8::1", vec![]);
        let mut unknown_bfd = peer("lost", "192.0.2.2", vec![]);
        unknown_bfd.spec.bfd_profile = Some("missing".into());
        let bad_address = peer("typo", "192.0.2.300", vec![]);
        let mut short_hold = peer("hasty", "192.0.2.3", vec![]);
        short_hold.spec.hold_time = Some("1s".into());
        tor.spec.connect_time = Some("10s".into());
        tor.spec.enable_graceful_restart = Some(true);
        let mut fractional_connect = peer("jittery", "192.0.2.4", vec![]);
        fractional_connect.spec.connect_time = Some("1500ms".into());
        let mut secret = peer("vault", "192.0.2.5", vec![]);
        secret.spec.password_secret =
            Some(serde_json::json!({"name": "bgp-auth", "namespace": "metallb-system"}));
        let mut in_vrf = peer("red", "192.0.2.6", vec![]);
        in_vrf.spec.vrf = Some("red".into());
        let fast = BfdProfile {
            metadata: ObjectMeta { name: Some("fast".into()), ..Default::default() },
            spec: BfdProfileSpec {
                receive_interval: Some(100),
                detect_multiplier: Some(4),
                ..Default::default()
            },
        };
        let peers = [
            &tor,
            &everywhere,
            &unknown_bfd,
            &bad_address,
            &short_hold,
            &fractional_connect,
            &secret,
            &in_vrf,
        ];
        let objects = BgpObjects { peers: &peers, bfd_profiles: &[&fast], ..Default::default() };
        let announcements = Announcements::governed(&[], &[], &objects, &nodes());
        let names = |node: &str| -> Vec<String> {
            announcements.bgp(node, &BTreeSet::new()).sessions.into_iter().map(|s| s.session.name).collect()
        };
        assert_eq!(names("edge-1"), ["tor", "spine"]);
        assert_eq!(names("core-1"), ["spine"]);
        let plan = announcements.bgp("edge-1", &BTreeSet::new());
        let session = &plan.sessions[0].session;
        assert_eq!(session.hold_time, Duration::from_secs(9));
        assert_eq!((session.connect_time, session.graceful_restart), (Some(Duration::from_secs(10)), true));
        assert_eq!(
            session.bfd,
            Some(Bfd {
                receive_interval_ms: 100,
                transmit_interval_ms: 300,
                detect_multiplier: 4,
                passive: false
            })
        );
        assert_eq!(plan.sessions[1].session.hold_time, Duration::from_secs(90), "MetalLB's default");
        let problems = announcements.problems().join("\n");
        for expected in [
            "metallb-system/lost",
            "\"missing\" names no BFDProfile",
            "metallb-system/typo",
            "under 3s",
            "metallb-system/jittery",
            "connectTime",
            "metallb-system/vault",
            "passwordSecret is not supported",
            "metallb-system/red",
            "vrf is not supported",
        ] {
            assert!(problems.contains(expected), "{expected} in {problems}");
        }
        assert_eq!(announcements.problems().len(), 6);
    }

    #[test]
    fn bgp_advertisements_choose_pools_nodes_peers_prefixes_and_attributes() {
        let (lan, wan, quiet) = (
            pool("lan", "192.0.2.0/24", &[]),
            pool("wan", "198.51.100.0/24", &[("tier", "wan")]),
            pool("quiet", "203.0.113.0/24", &[]),
        );
        let (tor, spine) = (peer("tor", "192.0.2.1", vec![]), peer("spine", "192.0.2.254", vec![]));
        let aliases = Community {
            metadata: ObjectMeta { name: Some("aliases".into()), ..Default::default() },
            spec: CommunitySpec {
                communities: vec![CommunityAlias { name: "no-export".into(), value: "65535:65281".into() }],
            },
        };
        let lan_to_tor = bgp_advertisement(
            "lan",
            BgpAdvertisementSpec {
                ip_address_pools: vec!["lan".into()],
                peers: vec!["tor".into()],
                communities: vec!["64512:100".into(), "no-export".into()],
                local_pref: Some(200),
                ..Default::default()
            },
        );
        let wan_aggregated = bgp_advertisement(
            "wan",
            BgpAdvertisementSpec {
                ip_address_pool_selectors: vec![selector("tier", "wan")],
                node_selectors: vec![selector("edge", "true")],
                aggregation_length: Some(24),
                communities: vec!["large:64512:1:2".into()],
                ..Default::default()
            },
        );
        let wan_hosts = bgp_advertisement(
            "wan-hosts",
            BgpAdvertisementSpec {
                ip_address_pools: vec!["wan".into()],
                local_pref: Some(50),
                ..Default::default()
            },
        );
        let broken = bgp_advertisement(
            "broken",
            BgpAdvertisementSpec { communities: vec!["no-such-alias".into()], ..Default::default() },
        );
        let too_long = bgp_advertisement(
            "long",
            BgpAdvertisementSpec { aggregation_length: Some(33), ..Default::default() },
        );
        let objects = BgpObjects {
            peers: &[&tor, &spine],
            advertisements: &[&lan_to_tor, &wan_aggregated, &wan_hosts, &broken, &too_long],
            communities: &[&aliases],
            ..Default::default()
        };
        let announcements = Announcements::governed(&[&lan, &wan, &quiet], &[], &objects, &nodes());
        let vips: BTreeSet<IpAddr> =
            ["192.0.2.7", "198.51.100.7", "198.51.100.8", "203.0.113.7", "10.9.9.9"].map(ip).into();
        let edge = announcements.bgp("edge-1", &vips);
        let lan_attributes = RouteAttributes {
            communities: [BgpCommunity::Standard(64512, 100), BgpCommunity::Standard(65535, 65281)].into(),
            local_pref: Some(200),
        };
        let wan_attributes =
            RouteAttributes { communities: [BgpCommunity::Large(64512, 1, 2)].into(), local_pref: None };
        let wan_host = RouteAttributes { local_pref: Some(50), ..Default::default() };
        assert_eq!(
            routes(&edge, "tor"),
            BTreeMap::from([
                (cidr("10.9.9.9/32"), RouteAttributes::default()),
                (cidr("192.0.2.7/32"), lan_attributes),
                (cidr("198.51.100.0/24"), wan_attributes.clone()),
                (cidr("198.51.100.7/32"), wan_host.clone()),
                (cidr("198.51.100.8/32"), wan_host.clone()),
            ]),
            "quiet has no advertisement; the externalIP goes as a bare host route"
        );
        assert_eq!(
            routes(&edge, "spine").keys().copied().collect::<Vec<_>>(),
            ["10.9.9.9/32", "198.51.100.0/24", "198.51.100.7/32", "198.51.100.8/32"].map(cidr),
            "lan goes only to tor"
        );
        let core = announcements.bgp("core-1", &vips);
        assert!(
            !routes(&core, "spine").contains_key(&cidr("198.51.100.0/24")),
            "the aggregate is for edge nodes"
        );
        assert_eq!(routes(&core, "spine").get(&cidr("198.51.100.7/32")), Some(&wan_host));
        let problems = announcements.problems().join("\n");
        assert!(
            problems.contains("metallb-system/broken") && problems.contains("no-such-alias"),
            "{problems}"
        );
        assert!(problems.contains("aggregationLength 33"), "{problems}");
        assert_eq!(BgpCommunity::parse("65536:1"), None);
        assert_eq!(BgpCommunity::parse("large:1:2"), None);
        assert_eq!(BgpCommunity::Large(1, 2, 3).to_string(), "large:1:2:3");
    }
}
