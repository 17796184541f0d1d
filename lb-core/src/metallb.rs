//! MetalLB's announcement CRDs as ringlb reads them, so that MetalLB users switch without touching
//! their manifests: `L2Advertisement`, `BGPAdvertisement`, `Community`, `BFDProfile`
//! (`metallb.io/v1beta1`) and `BGPPeer` (`metallb.io/v1beta2`, the served version; v1beta1 is
//! deprecated). The pools themselves are [`crate::ipam::IpAddressPool`].
//!
//! Like the pool, each type implements `k8s_openapi::Resource` and `Metadata` by hand (one macro
//! for all of them), so kube-rs watches them like built-in types while this crate stays free of
//! kube. Only MetalLB's documented fields are read; the others are ignored on decoding, so a
//! newer MetalLB's objects still parse. What each field means to ringlb is in
//! [`crate::announcement`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// Implements `Resource` and `Metadata` for a MetalLB CRD type with a `metadata` field.
macro_rules! metallb_resource {
    ($type:ty, $version:literal, $kind:literal, $plural:literal) => {
        impl k8s_openapi::Resource for $type {
            const API_VERSION: &'static str = concat!("metallb.io/", $version);
            const GROUP: &'static str = "metallb.io";
            const KIND: &'static str = $kind;
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $type {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use metallb_resource;

/// An `L2Advertisement`: which pools' IPs are announced with ARP/NDP, from which nodes, on which
/// interfaces. Empty lists select everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct L2Advertisement {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: L2AdvertisementSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools by name; with `ip_address_pool_selectors`, a pool either selects is selected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes by labels; a node any of them matches may announce.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Interface names; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

metallb_resource!(L2Advertisement, "v1beta1", "L2Advertisement", "l2advertisements");

/// A `BGPAdvertisement`: which pools' IPs are advertised over BGP, from which nodes, to which
/// peers, with which attributes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BgpAdvertisement {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BgpAdvertisementSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpAdvertisementSpec {
    /// The prefix length IPv4 addresses are advertised with (default 32: each IP on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation_length: Option<i32>,
    /// The same for IPv6 (default 128).
    #[serde(default, rename = "aggregationLengthV6", skip_serializing_if = "Option::is_none")]
    pub aggregation_length_v6: Option<i32>,
    /// BGP `LOCAL_PREF` (iBGP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    /// `ASN:VALUE`, `large:ASN:V1:V2`, or the name of a [`Community`] alias.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// [`BgpPeer`] names; empty: every peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

metallb_resource!(BgpAdvertisement, "v1beta1", "BGPAdvertisement", "bgpadvertisements");

/// A `BGPPeer`: a BGP neighbour of the nodes its selectors match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BgpPeer {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BgpPeerSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerSpec {
    #[serde(default, rename = "myASN")]
    pub my_asn: u32,
    #[serde(default, rename = "peerASN")]
    pub peer_asn: u32,
    #[serde(default)]
    pub peer_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// A Go duration (`90s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    #[serde(default, rename = "routerID", skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A [`BfdProfile`] name: BFD on this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebgp_multi_hop: Option<bool>,
    /// A Go duration of whole seconds: how long to wait between attempts to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_graceful_restart: Option<bool>,
    /// What ringlb cannot do yet; a peer that sets one is left out rather than half served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrf: Option<String>,
}

metallb_resource!(BgpPeer, "v1beta2", "BGPPeer", "bgppeers");

/// A `Community`: names for BGP community values, which [`BgpAdvertisementSpec::communities`]
/// may use instead of the values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Community {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CommunitySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommunitySpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<CommunityAlias>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommunityAlias {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

metallb_resource!(Community, "v1beta1", "Community", "communities");

/// A `BFDProfile`: the BFD timers of the sessions that name it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BfdProfile {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BfdProfileSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BfdProfileSpec {
    /// Milliseconds (MetalLB's default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmit_interval: Option<u32>,
    /// Missed packets before the session is down (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_multiplier: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_ttl: Option<u32>,
}

metallb_resource!(BfdProfile, "v1beta1", "BFDProfile", "bfdprofiles");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metallbs_documented_shapes_deserialise() {
        let l2: L2Advertisement = serde_json::from_value(serde_json::json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
            "metadata": {"name": "lan", "namespace": "metallb-system"},
            "spec": {"ipAddressPools": ["lan"], "nodeSelectors": [{"matchLabels": {"edge": "true"}}],
                     "interfaces": ["eth1"], "somethingNewer": 1}
        }))
        .expect("an L2Advertisement");
        assert_eq!((l2.spec.ip_address_pools.len(), l2.spec.interfaces[0].as_str()), (1, "eth1"));
        let peer: BgpPeer = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "tor"},
            "spec": {"myASN": 64513, "peerASN": 64512, "peerAddress": "192.0.2.1", "bfdProfile": "fast",
                     "holdTime": "9s"}
        }))
        .expect("a BGPPeer");
        assert_eq!(
            (peer.spec.my_asn, peer.spec.peer_asn, peer.spec.bfd_profile.as_deref()),
            (64513, 64512, Some("fast"))
        );
        let advertisement: BgpAdvertisement = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "all"},
            "spec": {"aggregationLength": 32, "aggregationLengthV6": 128, "localPref": 100,
                     "communities": ["65535:65282", "no-advertise"], "peers": ["tor"]}
        }))
        .expect("a BGPAdvertisement");
        assert_eq!((advertisement.spec.local_pref, advertisement.spec.communities.len()), (Some(100), 2));
        let community: Community = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "aliases"},
            "spec": {"communities": [{"name": "no-advertise", "value": "65535:65282"}]}
        }))
        .expect("a Community");
        assert_eq!(community.spec.communities[0].value, "65535:65282");
        let bfd: BfdProfile = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "fast"}, "spec": {"receiveInterval": 100, "detectMultiplier": 3}
        }))
        .expect("a BFDProfile");
        assert_eq!((bfd.spec.receive_interval, bfd.spec.transmit_interval), (Some(100), None));
        assert_eq!(<BgpPeer as k8s_openapi::Resource>::API_VERSION, "metallb.io/v1beta2");
    }
}
