//! BGP mode end to end: ringlb nodes advertise their VIPs through real BIRD 2 daemons to a router
//! that runs BIRD too and spreads the client's connections over every node by ECMP (see
//! `support::bgp` for the fabric). Needs `bird` and `birdc` (Debian's `bird2`) and root for the
//! network namespaces. Failover times are printed (`--nocapture` shows them).

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use support::bgp::{Fabric, PORT, Sessions, service, v6_of, vip, vip6};
use support::{IO_TIMEOUT, greeting, poll_until};

fn ready(backends: &[IpAddr]) -> Vec<(IpAddr, bool)> {
    backends.iter().map(|ip| (*ip, true)).collect()
}

/// Connects from the client through the router and reads the backend's name.
fn through_router(fabric: &Fabric, vip: IpAddr) -> String {
    let (name, _) = fabric.client.enter(|| greeting(SocketAddr::new(vip, PORT))).expect("reach the VIP");
    name
}

#[test]
fn every_node_advertises_the_vip_and_the_client_reaches_it_through_each_of_them() {
    let fabric = Fabric::new(3, |backends| service("web", vip(0), &[], &ready(backends)));
    let settled = fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    eprintln!("the router has a next hop per node {settled:?} after the last node was ready");

    // The router hashes each connection's 5-tuple: new source ports land on every node in turn.
    let mut names = BTreeSet::new();
    poll_until("every node to carry a connection", || {
        names.insert(through_router(&fabric, vip(0)));
        fabric.nodes.iter().all(|node| node.accepted() > 0).then_some(())
    });
    for node in &fabric.nodes {
        let bgp = &node.status()["bgp"];
        assert_eq!((bgp["routes"].as_u64(), bgp["failing"].as_bool()), (Some(1), Some(false)), "{bgp}");
    }
    let accepted: Vec<u64> = fabric.nodes.iter().map(|node| node.accepted()).collect();
    eprintln!("connections per node: {accepted:?}; backends seen: {names:?}");
    assert!(names.iter().all(|name| name.starts_with("backend-")), "{names:?}");
}

#[test]
fn an_ipv6_vip_is_advertised_as_a_128_and_reached_through_every_node() {
    let fabric = Fabric::new(2, |backends| {
        let backends6: Vec<IpAddr> = backends.iter().map(|ip| v6_of(*ip)).collect();
        format!(
            "{}---\n{}",
            service("web", vip(0), &[], &ready(backends)),
            service("web6", vip6(0), &[], &ready(&backends6))
        )
    });
    fabric.wait_next_hops(vip6(0), &fabric.node_addresses6());
    fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    poll_until("every node to carry an IPv6 connection", || {
        assert!(through_router(&fabric, vip6(0)).starts_with("backend-"));
        fabric.nodes.iter().all(|node| node.accepted() > 0).then_some(())
    });
    let include = std::fs::read_to_string(&fabric.nodes[0].include).expect("the include file");
    assert!(include.contains(&format!("route {}/128 via", vip6(0))), "{include}");
}

/// Connects from `port` of the prober to `vip` and reads the backend's name; the close resets, so
/// the same source port is free again at once.
fn from_port(port: u16, vip: IpAddr) -> std::io::Result<String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    socket.connect_timeout(&SocketAddr::new(vip, PORT).into(), IO_TIMEOUT)?;
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line)?;
    Ok(line.trim_end().to_owned())
}

#[test]
fn with_maglev_every_node_picks_the_same_backend_for_a_client_address_and_port() {
    let maglev = [("ringlb.io/scheduler", "maglev"), ("ringlb.io/hash-key", "ip-port")];
    let fabric = Fabric::new(3, |backends| service("web", vip(0), &maglev, &ready(backends)));
    let ports: Vec<u16> = (41000..41024).collect();
    // Each node in turn: the prober's route to the VIP goes through that node only.
    let choices: Vec<Vec<String>> = fabric
        .nodes
        .iter()
        .map(|node| {
            let route = ["route", "replace", &format!("{}/32", vip(0)), "via", &node.address.to_string()];
            fabric.prober.ip(&route).expect("route the VIP through one node");
            let names = fabric.prober.enter(|| {
                ports.iter().map(|port| from_port(*port, vip(0)).expect("reach the VIP")).collect::<Vec<_>>()
            });
            let accepted = node.accepted();
            assert!(accepted >= ports.len() as u64, "{} carried the connections: {accepted}", node.peer);
            names
        })
        .collect();
    for (node, names) in fabric.nodes.iter().zip(&choices).skip(1) {
        assert_eq!(names, &choices[0], "{} picks as node1 does for every source port", node.peer);
    }
    let distinct: BTreeSet<&String> = choices[0].iter().collect();
    assert!(distinct.len() >= 2, "the ports spread over the backends: {distinct:?}");
}

#[test]
fn a_node_that_dies_is_withdrawn_within_bfds_detection_time_and_the_survivors_carry_new_connections() {
    let mut fabric = Fabric::new(3, |backends| service("web", vip(0), &[], &ready(backends)));
    fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    let survivors: Vec<IpAddr> = fabric.nodes[1..].iter().map(|node| node.address).collect();
    let mut survivors_sorted = survivors.clone();
    survivors_sorted.sort();

    // A node that loses power says nothing: its link goes silent, then its processes are gone.
    let dead = &mut fabric.nodes[0];
    let interface = fabric.b.interface();
    let start = Instant::now();
    dead.host.ip(&["link", "set", &interface, "down"]).expect("cut the node's link");
    drop(dead.ringlb.take());
    dead.bird.kill();
    poll_until("the router to withdraw the dead node's next hop", || {
        (fabric.next_hops(vip(0)) == survivors_sorted).then_some(())
    });
    let withdrawn = start.elapsed();
    eprintln!("a dead node's next hop was withdrawn {withdrawn:?} after its link went silent");
    // BFD (100 ms × 3) detects it; the 3 s hold timer could not before 2 s.
    assert!(withdrawn < Duration::from_millis(1500), "withdrawn after {withdrawn:?}");

    let before: u64 = fabric.nodes[1..].iter().map(|node| node.accepted()).sum();
    for _ in 0..20 {
        through_router(&fabric, vip(0));
    }
    let after: u64 = fabric.nodes[1..].iter().map(|node| node.accepted()).sum();
    assert_eq!(after - before, 20, "the survivors carry every new connection");
}

#[test]
fn a_node_stopped_gracefully_withdraws_its_routes_at_once_and_its_bgp_session_stays_up() {
    let mut fabric = Fabric::new(2, |backends| service("web", vip(0), &[], &ready(backends)));
    fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    let survivor = vec![fabric.nodes[1].address];
    // A connection through the leaving node holds its drain open (`--shutdown-grace 1s`).
    let route = ["route", "replace", &format!("{}/32", vip(0)), "via", &fabric.nodes[0].address.to_string()];
    fabric.prober.ip(&route).expect("route the VIP through the leaving node");
    let (_, open) = fabric.prober.enter(|| greeting(SocketAddr::new(vip(0), PORT))).expect("reach the VIP");

    let mut leaving = fabric.nodes[0].ringlb.take().expect("running");
    let start = Instant::now();
    leaving.signal(libc::SIGTERM);
    poll_until("the router to withdraw the stopping node's next hop", || {
        (fabric.next_hops(vip(0)) == survivor).then_some(())
    });
    let withdrawn = start.elapsed();
    eprintln!("a node stopped by SIGTERM withdrew its next hop {withdrawn:?} after the signal");
    assert!(withdrawn < Duration::from_secs(1), "withdrawn after {withdrawn:?}");
    assert!(leaving.is_running(), "ringlb withdrew while it drained, not by exiting");
    let peer = &fabric.nodes[0].peer;
    assert!(fabric.router_bird.established(peer), "ringlb withdrew the route, BIRD kept the session");
    let include = std::fs::read_to_string(&fabric.nodes[0].include).expect("the include file");
    assert!(!include.contains("route "), "no route is left: {include}");
    drop(open);
    let status = leaving.wait();
    assert!(status.success(), "ringlb exits 0 on SIGTERM: {status}");
    for _ in 0..10 {
        through_router(&fabric, vip(0));
    }
}

#[test]
fn a_stopping_node_accepts_new_connections_until_bird_has_taken_its_routes_back() {
    let mut fabric = Fabric::new(1, |backends| service("web", vip(0), &[], &ready(backends)));
    fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    let route = ["route", "replace", &format!("{}/32", vip(0)), "via", &fabric.nodes[0].address.to_string()];
    fabric.prober.ip(&route).expect("route the VIP through the node");
    fabric.slow_down_birdc();

    let leaving = fabric.nodes[0].ringlb.take().expect("running");
    leaving.signal(libc::SIGTERM);
    let include = fabric.nodes[0].include.clone();
    poll_until("ringlb to write the empty set (its birdc now takes a second)", || {
        std::fs::read_to_string(&include).is_ok_and(|text| !text.contains("route ")).then_some(())
    });
    // The withdrawal is under way and the router still routes here: the listeners must be open.
    assert_eq!(fabric.next_hops(vip(0)), fabric.node_addresses(), "not withdrawn yet");
    let (name, _) = fabric.prober.enter(|| greeting(SocketAddr::new(vip(0), PORT))).expect("still accepted");
    assert!(name.starts_with("backend-"), "{name}");
    fabric.wait_next_hops(vip(0), &[]);
    let status = leaving.wait();
    assert!(status.success(), "ringlb exits 0 on SIGTERM: {status}");
}

#[test]
fn a_ringlb_killed_while_its_bird_runs_on_has_its_routes_withdrawn_through_the_liveness_link() {
    let mut fabric = Fabric::new(2, |backends| service("web", vip(0), &[], &ready(backends)));
    fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    let survivor = vec![fabric.nodes[1].address];

    let killed = fabric.nodes[0].ringlb.take().expect("running");
    let start = Instant::now();
    // SIGKILL: ringlb withdraws nothing itself; its TUN link goes with its descriptors.
    drop(killed);
    poll_until("the router to withdraw the killed ringlb's next hop", || {
        (fabric.next_hops(vip(0)) == survivor).then_some(())
    });
    let withdrawn = start.elapsed();
    eprintln!("a SIGKILLed ringlb's next hop was withdrawn {withdrawn:?} after the kill");
    assert!(withdrawn < Duration::from_secs(1), "withdrawn after {withdrawn:?}");
    let include = std::fs::read_to_string(&fabric.nodes[0].include).expect("the include file");
    assert!(include.contains(&format!("route {}/32", vip(0))), "the file still names the route: {include}");
    assert!(fabric.router_bird.established(&fabric.nodes[0].peer), "only the route went, not the session");
    for _ in 0..10 {
        through_router(&fabric, vip(0));
    }
}

#[test]
fn a_vip_whose_service_loses_every_eligible_endpoint_is_withdrawn_and_comes_back() {
    let backends = std::cell::RefCell::new(Vec::new());
    let manifest = |backends: &[IpAddr], web_ready: bool| {
        let web: Vec<(IpAddr, bool)> = backends.iter().map(|ip| (*ip, web_ready)).collect();
        format!("{}---\n{}", service("web", vip(0), &[], &web), service("api", vip(1), &[], &ready(backends)))
    };
    let fabric = Fabric::new(2, |ips| {
        backends.replace(ips.to_vec());
        manifest(ips, true)
    });
    let backends = backends.into_inner();
    let everyone = fabric.node_addresses();
    fabric.wait_next_hops(vip(0), &everyone);
    fabric.wait_next_hops(vip(1), &everyone);

    fabric.save_manifest(&manifest(&backends, false));
    let withdrawn = fabric.wait_next_hops(vip(0), &[]);
    eprintln!("a VIP without eligible endpoints was withdrawn {withdrawn:?} after the manifest changed");
    assert_eq!(fabric.next_hops(vip(1)), everyone, "the other Service's VIP stays");

    fabric.save_manifest(&manifest(&backends, true));
    fabric.wait_next_hops(vip(0), &everyone);
    assert!(through_router(&fabric, vip(0)).starts_with("backend-"));
}

#[test]
fn ringlb_renders_the_bgp_session_itself_when_given_peers_and_a_stop_withdraws_only_the_routes() {
    let fabric =
        Fabric::with(2, Sessions::RenderedByRinglb, |backends| service("web", vip(0), &[], &ready(backends)));
    fabric.wait_next_hops(vip(0), &fabric.node_addresses());
    assert!(through_router(&fabric, vip(0)).starts_with("backend-"));
    for node in &fabric.nodes {
        poll_until(&format!("the router's BFD session to {} to be up", node.peer), || {
            let bfd = fabric.router_bird.birdc(&["show", "bfd", "sessions"]);
            bfd.lines()
                .any(|line| line.starts_with(&node.address.to_string()) && line.contains(" Up "))
                .then_some(())
        });
    }

    let mut fabric = fabric;
    let leaving = fabric.nodes[0].ringlb.take().expect("running");
    let status = leaving.terminate();
    assert!(status.success(), "ringlb exits 0 on SIGTERM: {status}");
    fabric.wait_next_hops(vip(0), &[fabric.nodes[1].address]);
    let include = std::fs::read_to_string(&fabric.nodes[0].include).expect("the include file");
    assert!(!include.contains("route ") && include.contains("protocol bgp ringlb_peer1"), "{include}");
    assert!(fabric.router_bird.established(&fabric.nodes[0].peer), "the session outlives the routes");
}
