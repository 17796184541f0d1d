//! BGP as MetalLB's `BGPPeer`, `BGPAdvertisement`, `Community` and `BFDProfile` say it, so that a
//! MetalLB user's BGP objects mean on ringlb what they meant there: which sessions a node has,
//! and which prefixes it advertises on each, with which attributes.
//!
//! - **Sessions**: a `BGPPeer` is a session of every node one of its `nodeSelectors` matches (none:
//!   every node), with its `bfdProfile`'s timers when it names one. A peer that cannot be rendered
//!   faithfully (no AS number, an address that does not parse, a `holdTime` under 3 s, a
//!   `keepaliveTime` above it, a `connectTime` that is not whole seconds from 1 to 65535, an
//!   unknown BFD profile, multihop BFD without a `sourceAddress`, a password BIRD cannot quote, a
//!   `passwordSecret` or a `vrf`, which ringlb does not do yet) is rejected with a reason and left
//!   out; the others stay. A session carries its peer address's family only, as MetalLB's
//!   `disableMP: true`.
//! - **Routes**: an IP of a pool is advertised by a node only where a `BGPAdvertisement` selects
//!   the pool (by name or labels; neither: every pool) and the node (`nodeSelectors`), to the
//!   sessions it names in `peers` (none: all of the node's), as the prefix of
//!   `aggregationLength`/`aggregationLengthV6` around it (default /32, /128), with its
//!   `communities` (values `ASN:VALUE`, `large:A:B:C`, or names a `Community` object gives) and
//!   `localPref`. A pool no advertisement selects is advertised nowhere, as in MetalLB. An IP in no
//!   pool (`spec.externalIPs`) goes to every session of the node as a host route without
//!   attributes. An advertisement with a community that does not parse or names no alias, or an
//!   aggregation length beyond the family's, is rejected and left out.
//! - **One prefix, one set of attributes per session**: where several advertisements put the same
//!   prefix on one session (two IPs of one /24, two advertisements of one pool), their communities
//!   add up and the highest `localPref` wins, as BGP can carry only one path per prefix and peer.
//!
//! Which IPs are offered at all (served, with an eligible endpoint) is the caller's: see
//! [`crate::advertised_vips`]. Pure: objects in, a [`BgpPlan`] per node out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::cidr::Cidr;
use crate::l2::Candidates;
use crate::metallb::{BfdProfile, BgpAdvertisement, BgpPeer, Community};

/// MetalLB's defaults where a `BGPPeer` or `BFDProfile` leaves a field out.
const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(90);
const DEFAULT_BFD_INTERVAL_MS: u32 = 300;
const DEFAULT_BFD_MULTIPLIER: u32 = 3;

/// The BGP objects of the pool namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct BgpObjects<'a> {
    pub peers: &'a [&'a BgpPeer],
    pub advertisements: &'a [&'a BgpAdvertisement],
    pub communities: &'a [&'a Community],
    pub bfd_profiles: &'a [&'a BfdProfile],
}

/// One BGP session, as a `BGPPeer` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The `BGPPeer`'s name (what `BGPAdvertisement.peers` lists).
    pub name: String,
    pub my_asn: u32,
    pub peer_asn: u32,
    pub peer_address: IpAddr,
    pub peer_port: Option<u16>,
    pub source_address: Option<IpAddr>,
    pub router_id: Option<Ipv4Addr>,
    pub hold_time: Duration,
    /// `None`: a third of the hold time, as BGP has it.
    pub keepalive_time: Option<Duration>,
    pub password: Option<String>,
    pub bfd: Option<Bfd>,
    pub ebgp_multihop: bool,
    /// Between attempts to connect; `None`: ringlb's default (5 s).
    pub connect_time: Option<Duration>,
    /// Ask the peer to keep this node's routes while its BGP restarts (RFC 4724).
    pub graceful_restart: bool,
}

/// A `BFDProfile`'s timers, with MetalLB's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bfd {
    pub receive_interval_ms: u32,
    pub transmit_interval_ms: u32,
    pub detect_multiplier: u32,
    pub passive: bool,
}

/// A BGP community: RFC 1997 (`ASN:VALUE`) or large, RFC 8092 (`large:A:B:C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BgpCommunity {
    Standard(u16, u16),
    Large(u32, u32, u32),
}

impl BgpCommunity {
    /// MetalLB's notation; `None` when `value` is not one.
    pub fn parse(value: &str) -> Option<BgpCommunity> {
        if let Some(large) = value.strip_prefix("large:") {
            let parts: Vec<u32> = large.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
            return match parts[..] {
                [a, b, c] => Some(BgpCommunity::Large(a, b, c)),
                _ => None,
            };
        }
        let (asn, value) = value.split_once(':')?;
        Some(BgpCommunity::Standard(asn.parse().ok()?, value.parse().ok()?))
    }
}

impl fmt::Display for BgpCommunity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BgpCommunity::Standard(asn, value) => write!(f, "{asn}:{value}"),
            BgpCommunity::Large(a, b, c) => write!(f, "large:{a}:{b}:{c}"),
        }
    }
}

/// What a prefix carries on one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttributes {
    pub communities: BTreeSet<BgpCommunity>,
    pub local_pref: Option<u32>,
}

impl RouteAttributes {
    fn merge(&mut self, other: &RouteAttributes) {
        self.communities.extend(other.communities.iter().copied());
        self.local_pref = self.local_pref.max(other.local_pref);
    }
}

/// One session of a node and what it advertises there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRoutes {
    pub session: Session,
    pub routes: BTreeMap<Cidr, RouteAttributes>,
}

/// What one node does in BGP: its sessions (by name), each with its routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpPlan {
    pub sessions: Vec<SessionRoutes>,
}

impl BgpPlan {
    /// Every prefix some session advertises.
    pub fn prefixes(&self) -> BTreeSet<Cidr> {
        self.sessions.iter().flat_map(|s| s.routes.keys().copied()).collect()
    }
}

/// The BGP objects, resolved against the pools and nodes (held by the announcements).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct BgpRules {
    /// Each session with the nodes it is on.
    pub sessions: Vec<(Session, Candidates)>,
    pub advertisements: Vec<BgpRule>,
}

/// One `BGPAdvertisement`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct BgpRule {
    /// Indices into the announcements' pools.
    pools: Vec<usize>,
    nodes: Candidates,
    /// Session names; empty: all.
    peers: Vec<String>,
    length_v4: u8,
    length_v6: u8,
    attributes: RouteAttributes,
}

impl BgpRules {
    /// What `node` advertises of `vips`; `pools_of(ip)` names the pools (indices) that hold `ip`.
    pub(super) fn plan(
        &self,
        node: &str,
        vips: &BTreeSet<IpAddr>,
        pools_of: impl Fn(IpAddr) -> Vec<usize>,
    ) -> BgpPlan {
        let mut sessions: Vec<SessionRoutes> = self
            .sessions
            .iter()
            .filter(|(_, nodes)| nodes.admits(node))
            .map(|(session, _)| SessionRoutes { session: session.clone(), routes: BTreeMap::new() })
            .collect();
        let rules: Vec<&BgpRule> =
            self.advertisements.iter().filter(|rule| rule.nodes.admits(node)).collect();
        for &vip in vips {
            let pools = pools_of(vip);
            if pools.is_empty() {
                let host = host_route(vip);
                for session in &mut sessions {
                    session.routes.entry(host).or_default();
                }
                continue;
            }
            for rule in rules.iter().filter(|rule| rule.pools.iter().any(|pool| pools.contains(pool))) {
                let length = if vip.is_ipv4() { rule.length_v4 } else { rule.length_v6 };
                let Ok(prefix) = Cidr::new(vip, length) else { continue };
                for session in sessions
                    .iter_mut()
                    .filter(|s| rule.peers.is_empty() || rule.peers.contains(&s.session.name))
                {
                    session.routes.entry(prefix).or_default().merge(&rule.attributes);
                }
            }
        }
        BgpPlan { sessions }
    }
}

fn host_route(ip: IpAddr) -> Cidr {
    let length = if ip.is_ipv4() { 32 } else { 128 };
    Cidr::new(ip, length).expect("a host prefix is valid")
}

/// `namespace/name`, as a rejection names an object.
pub(super) fn name_of(metadata: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or_default(),
        metadata.name.as_deref().unwrap_or_default()
    )
}

/// The session `peer` describes, or why it cannot be one.
pub(super) fn session(peer: &BgpPeer, profiles: &[&BfdProfile]) -> Result<Session, String> {
    let spec = &peer.spec;
    if spec.my_asn == 0 || spec.peer_asn == 0 {
        return Err("myASN and peerASN must both be set".to_owned());
    }
    let address = |field: &str, value: &str| {
        value.parse::<IpAddr>().map_err(|_| format!("{field} {value:?} is not an IP address"))
    };
    let peer_address = address("peerAddress", &spec.peer_address)?;
    let source_address = spec.source_address.as_deref().map(|a| address("sourceAddress", a)).transpose()?;
    let router_id = spec
        .router_id
        .as_deref()
        .map(|id| id.parse::<Ipv4Addr>().map_err(|_| format!("routerID {id:?} is not an IPv4 address")))
        .transpose()?;
    let duration = |field: &str, value: &str| {
        crate::parse_duration(value).map_err(|reason| format!("{field} {value:?}: {reason}"))
    };
    let hold_time = spec.hold_time.as_deref().map(|h| duration("holdTime", h)).transpose()?;
    let hold_time = hold_time.unwrap_or(DEFAULT_HOLD_TIME);
    if hold_time < Duration::from_secs(3) {
        return Err(format!("holdTime {hold_time:?} is under 3s"));
    }
    let keepalive_time = spec.keepalive_time.as_deref().map(|k| duration("keepaliveTime", k)).transpose()?;
    if keepalive_time.is_some_and(|keepalive| keepalive > hold_time) {
        return Err("keepaliveTime is longer than holdTime".to_owned());
    }
    if let Some(password) = &spec.password
        && password.chars().any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(
            "the password has a quote, a backslash or a control character, which BIRD cannot take".to_owned()
        );
    }
    let connect_time = spec.connect_time.as_deref().map(|c| duration("connectTime", c)).transpose()?;
    if let Some(connect) = connect_time
        && (connect.subsec_nanos() != 0 || !(1..=65535).contains(&connect.as_secs()))
    {
        return Err(format!("connectTime {connect:?} is not a whole number of seconds from 1 to 65535"));
    }
    if spec.password_secret.is_some() {
        return Err("passwordSecret is not supported yet (set password)".to_owned());
    }
    if spec.vrf.as_deref().is_some_and(|vrf| !vrf.is_empty()) {
        return Err("vrf is not supported yet".to_owned());
    }
    if spec.ebgp_multi_hop == Some(true) && spec.bfd_profile.is_some() && source_address.is_none() {
        return Err(
            "ebgpMultiHop with a bfdProfile needs a sourceAddress (multihop BFD binds to it)".to_owned()
        );
    }
    let bfd = match &spec.bfd_profile {
        None => None,
        Some(name) => {
            let profile = profiles
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                .ok_or_else(|| format!("bfdProfile {name:?} names no BFDProfile"))?;
            let spec = &profile.spec;
            Some(Bfd {
                receive_interval_ms: spec.receive_interval.unwrap_or(DEFAULT_BFD_INTERVAL_MS),
                transmit_interval_ms: spec.transmit_interval.unwrap_or(DEFAULT_BFD_INTERVAL_MS),
                detect_multiplier: spec.detect_multiplier.unwrap_or(DEFAULT_BFD_MULTIPLIER),
                passive: spec.passive_mode.unwrap_or(false),
            })
        }
    };
    Ok(Session {
        name: peer.metadata.name.clone().unwrap_or_default(),
        my_asn: spec.my_asn,
        peer_asn: spec.peer_asn,
        peer_address,
        peer_port: spec.peer_port,
        source_address,
        router_id,
        hold_time,
        keepalive_time,
        password: spec.password.clone(),
        bfd,
        ebgp_multihop: spec.ebgp_multi_hop.unwrap_or(false),
        connect_time,
        graceful_restart: spec.enable_graceful_restart.unwrap_or(false),
    })
}

/// The rule of `advertisement`, which selects `pools` and `nodes`, or why it is rejected.
pub(super) fn rule(
    advertisement: &BgpAdvertisement,
    communities: &[&Community],
    pools: Vec<usize>,
    nodes: Candidates,
) -> Result<BgpRule, String> {
    let spec = &advertisement.spec;
    let length = |value: Option<i32>, max: u8, field: &str| match value {
        None => Ok(max),
        Some(length) => u8::try_from(length)
            .ok()
            .filter(|length| *length <= max)
            .ok_or_else(|| format!("{field} {length} is not in 0..={max}")),
    };
    let length_v4 = length(spec.aggregation_length, 32, "aggregationLength")?;
    let length_v6 = length(spec.aggregation_length_v6, 128, "aggregationLengthV6")?;
    let mut attributes = RouteAttributes { local_pref: spec.local_pref, ..RouteAttributes::default() };
    for community in &spec.communities {
        let value = BgpCommunity::parse(community)
            .or_else(|| {
                communities
                    .iter()
                    .flat_map(|object| &object.spec.communities)
                    .find(|alias| alias.name == *community)
                    .and_then(|alias| BgpCommunity::parse(&alias.value))
            })
            .ok_or_else(|| {
                format!("community {community:?} is neither ASN:VALUE, large:A:B:C nor a Community alias")
            })?;
        attributes.communities.insert(value);
    }
    Ok(BgpRule { pools, nodes, peers: spec.peers.clone(), length_v4, length_v6, attributes })
}
