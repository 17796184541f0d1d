//! Standalone BGP (`--bgp-asn`, `--bgp-peer`, `--bgp-bfd`): the BGP sessions themselves rendered by
//! ringlb into its include file, for nodes whose `bird.conf` holds nothing but a router id, the
//! device protocol and the include. Each peer exports exactly ringlb's static protocol of its
//! address family and imports nothing.
//!
//! BIRD's `configure` restarts only protocols whose text changed, so rewriting the file for a VIP
//! leaves every session up; on shutdown the routes go and the sessions stay (a withdrawal, not a
//! session loss, tells the peers at once).

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::str::FromStr;

use super::{PROTOCOL_V4, PROTOCOL_V6};

/// One BGP neighbour: `ADDRESS:ASN` (`[ADDRESS]:ASN` for IPv6 reads better, both parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: IpAddr,
    pub asn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{value:?} is not a BGP peer: {reason} (expected ADDRESS:ASN, e.g. 192.0.2.1:64512 or [2001:db8::1]:64512)"
)]
pub struct InvalidPeer {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for BgpPeer {
    type Err = InvalidPeer;

    fn from_str(value: &str) -> Result<BgpPeer, InvalidPeer> {
        let invalid = |reason| InvalidPeer { value: value.to_owned(), reason };
        let (address, asn) = value.rsplit_once(':').ok_or_else(|| invalid("no :ASN"))?;
        let address = address.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(address);
        let address = address.parse().map_err(|_| invalid("not an IP address"))?;
        let asn = asn.parse().ok().filter(|asn| *asn != 0).ok_or_else(|| invalid("not an AS number"))?;
        Ok(BgpPeer { address, asn })
    }
}

impl fmt::Display for BgpPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(address) => write!(f, "{address}:{}", self.asn),
            IpAddr::V6(address) => write!(f, "[{address}]:{}", self.asn),
        }
    }
}

/// This node's AS, its peers, and whether BFD guards the sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peering {
    pub local_asn: u32,
    pub peers: Vec<BgpPeer>,
    /// Renders a BFD protocol of ringlb's own (100 ms × 3) and `bfd on` for every peer: only where
    /// `bird.conf` has no BFD protocol (two would compete for its port).
    pub bfd: bool,
}

/// The protocols of `peering`, appended to `text`.
pub(super) fn render(peering: &Peering, text: &mut String) {
    if peering.bfd {
        text.push_str(
            "protocol bfd ringlb_bfd {\n  interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; \
             multiplier 3; };\n}\n",
        );
    }
    for (n, peer) in peering.peers.iter().enumerate() {
        let (channel, protocol) =
            if peer.address.is_ipv4() { ("ipv4", PROTOCOL_V4) } else { ("ipv6", PROTOCOL_V6) };
        let _ = writeln!(text, "protocol bgp ringlb_peer{} {{", n + 1);
        let _ =
            writeln!(text, "  local as {};\n  neighbor {} as {};", peering.local_asn, peer.address, peer.asn);
        // BIRD waits 5 s before the first attempt and 120 s after a failed one.
        text.push_str("  connect delay time 1;\n  connect retry time 5;\n");
        if peering.bfd {
            text.push_str("  bfd on;\n");
        }
        let _ = writeln!(text, "  {channel} {{ import none; export where proto = \"{protocol}\"; }};\n}}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_from_address_and_asn_and_bad_ones_say_why() {
        let v4: BgpPeer = "192.0.2.1:64512".parse().expect("a peer");
        assert_eq!(v4, BgpPeer { address: [192, 0, 2, 1].into(), asn: 64512 });
        let v6: BgpPeer = "[2001:db8::1]:4200000000".parse().expect("a peer");
        assert_eq!((v6.address, v6.asn), ("2001:db8::1".parse().expect("an address"), 4_200_000_000));
        assert_eq!("2001:db8::1:64512".parse::<BgpPeer>().expect("a peer").address, v6.address);
        assert_eq!(v6.to_string(), "[2001:db8::1]:4200000000");
        for (bad, reason) in [
            ("192.0.2.1", "no :ASN"),
            ("router:64512", "not an IP address"),
            ("192.0.2.1:0", "not an AS number"),
            ("192.0.2.1:4294967296", "not an AS number"),
        ] {
            let error = bad.parse::<BgpPeer>().expect_err(bad);
            assert_eq!(error.reason, reason, "{bad}");
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn each_peer_exports_only_ringlbs_protocol_of_its_family_with_bfd_when_asked() {
        let peering = Peering {
            local_asn: 64513,
            peers: vec![
                "192.0.2.1:64512".parse().expect("a peer"),
                "[2001:db8::1]:64512".parse().expect("a peer"),
            ],
            bfd: true,
        };
        let mut text = String::new();
        render(&peering, &mut text);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "protocol bfd ringlb_bfd {",
                "  interface \"*\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };",
                "}",
                "protocol bgp ringlb_peer1 {",
                "  local as 64513;",
                "  neighbor 192.0.2.1 as 64512;",
                "  connect delay time 1;",
                "  connect retry time 5;",
                "  bfd on;",
                "  ipv4 { import none; export where proto = \"ringlb_vips4\"; };",
                "}",
                "protocol bgp ringlb_peer2 {",
                "  local as 64513;",
                "  neighbor 2001:db8::1 as 64512;",
                "  connect delay time 1;",
                "  connect retry time 5;",
                "  bfd on;",
                "  ipv6 { import none; export where proto = \"ringlb_vips6\"; };",
                "}",
            ]
        );
        let mut plain = String::new();
        render(&Peering { bfd: false, ..peering }, &mut plain);
        assert!(!plain.contains("bfd"), "{plain}");
    }
}
