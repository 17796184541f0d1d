//! BGP from the cluster (`--bgp-from-cluster`): the sessions of this node's [`BgpPlan`] (MetalLB's
//! `BGPPeer`s, `BGPAdvertisement`s, `Community`s and `BFDProfile`s, resolved by
//! `lb_core::announcement::bgp`) rendered into the include file, each exporting exactly its own
//! routes of ringlb's static protocol of its family with their communities and `LOCAL_PREF`.
//!
//! Invariants:
//! - a session's protocol is named after its `BGPPeer` (`ringlb_` and the name, other characters
//!   as `_`), so a change to one peer restarts only that session, and a change of routes changes
//!   only export filters, which `birdc configure` applies without dropping a session;
//! - routes are grouped by attributes into prefix sets (`net ~ [ … ]`, a trie in BIRD), so a
//!   filter stays as short as there are distinct attribute sets, whatever the number of VIPs;
//! - a session carries its peer address's family only (an IPv6 route over an IPv4 session needs a
//!   next hop of the other family, which the node's BIRD configuration does not give).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use lb_core::Cidr;
use lb_core::announcement::bgp::{BgpCommunity, RouteAttributes, SessionRoutes};

use super::{PROTOCOL_V4, PROTOCOL_V6};
use lb_core::announcement::BgpPlan;

/// The protocols of `plan`, appended to `text`.
pub(super) fn render(plan: &BgpPlan, text: &mut String) {
    if plan.sessions.iter().any(|s| s.session.bfd.is_some()) {
        // Each session's timers are its own (`bfd { … }`); the protocol only runs the sessions.
        text.push_str("protocol bfd ringlb_bfd {\n}\n");
    }
    let mut names = BTreeSet::new();
    for routes in &plan.sessions {
        let mut name = protocol_name(&routes.session.name);
        // Two peers whose names differ only in characters BIRD does not take.
        while !names.insert(name.clone()) {
            name.push('_');
        }
        session(&name, routes, text);
    }
}

fn protocol_name(peer: &str) -> String {
    let cleaned: String = peer.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("ringlb_{cleaned}")
}

fn session(name: &str, routes: &SessionRoutes, text: &mut String) {
    let session = &routes.session;
    let _ = writeln!(text, "protocol bgp {name} {{");
    let _ = write!(text, "  local as {};\n  neighbor {}", session.my_asn, session.peer_address);
    if let Some(port) = session.peer_port {
        let _ = write!(text, " port {port}");
    }
    let _ = writeln!(text, " as {};", session.peer_asn);
    if let Some(source) = session.source_address {
        let _ = writeln!(text, "  source address {source};");
    }
    if let Some(id) = session.router_id {
        let _ = writeln!(text, "  router id {id};");
    }
    let _ = write!(text, "  hold time {};", session.hold_time.as_secs());
    if let Some(keepalive) = session.keepalive_time {
        let _ = write!(text, " keepalive time {};", keepalive.as_secs().max(1));
    }
    // BIRD waits 5 s before the first attempt and 120 s after a failed one.
    let retry = session.connect_time.map_or(5, |connect| connect.as_secs());
    let _ = writeln!(text, "\n  connect delay time 1;\n  connect retry time {retry};");
    if session.graceful_restart {
        text.push_str("  graceful restart on;\n");
    }
    if let Some(password) = &session.password {
        let _ = writeln!(text, "  password \"{password}\";");
    }
    let ibgp = session.my_asn == session.peer_asn;
    if session.ebgp_multihop {
        text.push_str("  multihop;\n");
    } else if ibgp {
        // BIRD takes an iBGP peer as multihop by default; one is direct unless the BGPPeer asks
        // for multihop, as an eBGP one is (and multihop BFD would need a sourceAddress).
        text.push_str("  direct;\n");
    }

    if let Some(bfd) = session.bfd {
        let _ = writeln!(
            text,
            "  bfd {{ min rx interval {} ms; min tx interval {} ms; multiplier {}; passive {}; }};",
            bfd.receive_interval_ms,
            bfd.transmit_interval_ms,
            bfd.detect_multiplier,
            if bfd.passive { "on" } else { "off" }
        );
    }
    let v4 = session.peer_address.is_ipv4();
    let (channel, protocol) = if v4 { ("ipv4", PROTOCOL_V4) } else { ("ipv6", PROTOCOL_V6) };
    let mut classes: BTreeMap<&RouteAttributes, Vec<Cidr>> = BTreeMap::new();
    for (prefix, attributes) in routes.routes.iter().filter(|(prefix, _)| prefix.network().is_ipv4() == v4) {
        classes.entry(attributes).or_default().push(*prefix);
    }
    // iBGP keeps a route's next hop; the VIPs' is this node, whatever link holds them.
    let next_hop = if ibgp { " next hop self;" } else { "" };
    if classes.is_empty() {
        let _ = writeln!(text, "  {channel} {{ import none;{next_hop} export none; }};\n}}");
        return;
    }
    let _ = writeln!(text, "  {channel} {{\n    import none;{next_hop}\n    export filter {{");
    let _ = writeln!(text, "      if proto != \"{protocol}\" then reject;");
    for (attributes, prefixes) in classes {
        let set: Vec<String> = prefixes.iter().map(Cidr::to_string).collect();
        let _ = write!(text, "      if net ~ [ {} ] then {{", set.join(", "));
        for community in &attributes.communities {
            match community {
                BgpCommunity::Standard(asn, value) => {
                    _ = write!(text, " bgp_community.add(({asn},{value}));")
                }
                BgpCommunity::Large(a, b, c) => _ = write!(text, " bgp_large_community.add(({a},{b},{c}));"),
            }
        }
        if let Some(local_pref) = attributes.local_pref {
            let _ = write!(text, " bgp_local_pref = {local_pref};");
        }
        text.push_str(" accept; }\n");
    }
    text.push_str("      reject;\n    };\n  };\n}\n");
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::Duration;

    use lb_core::announcement::bgp::{Bfd, Session};

    use super::*;

    fn session(name: &str, address: &str) -> Session {
        Session {
            name: name.to_owned(),
            my_asn: 64513,
            peer_asn: 64512,
            peer_address: address.parse().expect("an address"),
            peer_port: None,
            source_address: None,
            router_id: None,
            hold_time: Duration::from_secs(90),
            keepalive_time: None,
            password: None,
            bfd: None,
            ebgp_multihop: false,
            connect_time: None,
            graceful_restart: false,
        }
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("a CIDR")
    }

    #[test]
    fn each_session_exports_its_own_routes_with_their_attributes_grouped_in_prefix_sets() {
        let tagged = RouteAttributes {
            communities: [BgpCommunity::Standard(64512, 100), BgpCommunity::Large(64512, 1, 2)].into(),
            local_pref: Some(200),
        };
        let mut tor = session("tor.rack-1", "192.0.2.1");
        tor.peer_port = Some(1179);
        tor.source_address = Some("192.0.2.9".parse::<IpAddr>().expect("an address"));
        tor.hold_time = Duration::from_secs(9);
        tor.keepalive_time = Some(Duration::from_secs(3));
        tor.password = Some("s3cret".to_owned());
        tor.connect_time = Some(Duration::from_secs(10));
        tor.graceful_restart = true;
        tor.bfd = Some(Bfd {
            receive_interval_ms: 100,
            transmit_interval_ms: 150,
            detect_multiplier: 4,
            passive: true,
        });
        let plan = BgpPlan {
            sessions: vec![
                SessionRoutes {
                    session: tor,
                    routes: [
                        (cidr("192.0.2.7/32"), tagged.clone()),
                        (cidr("198.51.100.0/24"), tagged),
                        (cidr("10.9.9.9/32"), RouteAttributes::default()),
                        (cidr("2001:db8::7/128"), RouteAttributes::default()),
                    ]
                    .into(),
                },
                SessionRoutes { session: session("v6", "2001:db8::1"), routes: BTreeMap::new() },
            ],
        };
        let mut text = String::new();
        render(&plan, &mut text);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "protocol bfd ringlb_bfd {",
                "}",
                "protocol bgp ringlb_tor_rack_1 {",
                "  local as 64513;",
                "  neighbor 192.0.2.1 port 1179 as 64512;",
                "  source address 192.0.2.9;",
                "  hold time 9; keepalive time 3;",
                "  connect delay time 1;",
                "  connect retry time 10;",
                "  graceful restart on;",
                "  password \"s3cret\";",
                "  bfd { min rx interval 100 ms; min tx interval 150 ms; multiplier 4; passive on; };",
                "  ipv4 {",
                "    import none;",
                "    export filter {",
                "      if proto != \"ringlb_vips4\" then reject;",
                "      if net ~ [ 10.9.9.9/32 ] then { accept; }",
                "      if net ~ [ 192.0.2.7/32, 198.51.100.0/24 ] then { bgp_community.add((64512,100)); \
                 bgp_large_community.add((64512,1,2)); bgp_local_pref = 200; accept; }",
                "      reject;",
                "    };",
                "  };",
                "}",
                "protocol bgp ringlb_v6 {",
                "  local as 64513;",
                "  neighbor 2001:db8::1 as 64512;",
                "  hold time 90;",
                "  connect delay time 1;",
                "  connect retry time 5;",
                "  ipv6 { import none; export none; };",
                "}",
            ]
        );
    }

    #[test]
    fn peers_whose_names_clean_up_alike_get_protocols_of_their_own() {
        let plan = BgpPlan {
            sessions: ["a-b", "a.b"]
                .map(|name| SessionRoutes { session: session(name, "192.0.2.1"), routes: BTreeMap::new() })
                .into(),
        };
        let mut text = String::new();
        render(&plan, &mut text);
        assert!(
            text.contains("protocol bgp ringlb_a_b {") && text.contains("protocol bgp ringlb_a_b_ {"),
            "{text}"
        );
    }
}
