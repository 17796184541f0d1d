//! L2 cluster mode: three ringlb nodes of a `testkit::lab` serve a cluster (the API server
//! emulator in a lab host of its own) with `--l2-listen` and no configured peers. They find each
//! other through the member Lease (`ringlb-l2`, annotation `ringlb.io/l2-members`); each VIP,
//! allocated from a pool on the segment, is on exactly one node. A non-leader owner dies
//! (SIGKILL and its link down): its VIPs move to a survivor and the client's neighbour entry
//! follows, and the leader removes it from the list. Restarted, it joins the list again and
//! takes its share back, without a VIP ever on two nodes (`support::l2::Sampler`).
//!
//! A node whose heartbeats are cut off (the API still reachable) falls silent, is fenced by the
//! majority's leader and rejoins once healed; two of three stopping gracefully leave the third
//! going on.
//!
//! MetalLB's `L2Advertisement`s decide which nodes may announce: their node selectors (over the
//! Nodes' labels, followed as they change) and interfaces confine the VIPs, and without one the
//! pool is announced nowhere.
//!
//! Times are printed (`failover: … ms`, `removal: … ms`, `rejoin: … ms`).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use support::cluster::{CLASS, Cluster, load_balancer};
use support::l2::{LINK, Node, holder, sampler};
use support::{Ringlb, greeting, poll_until};
use testkit::backends::{Server, named_server_on};
use testkit::lab::{Host, Lab, LabApiServer, Segment};
use testkit::objects::{Cond, SliceBuilder};

const BACKEND_PORT: u16 = 8080;
const SERVICES: usize = 6;

struct Setup {
    cluster: Cluster,
    kubeconfig: PathBuf,
    client: Host,
    backend: Host,
    server: Option<Server>,
    _api_host: Host,
    segment: Segment,
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let lab = Lab::create().expect("a lab");
        let segment = lab.segment().expect("a segment");
        let LabApiServer { server, addr, host: api_host } = lab.api_server(&segment).expect("an API server");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = server.write_kubeconfig_at(&dir.path().join("kubeconfig"), addr);
        let cluster = Cluster::on(server);
        let client = lab.host("client").expect("a host");
        lab.join(&client, &segment).expect("join");
        let backend = lab.host("backend").expect("a host");
        let backend_ip = lab.join(&backend, &segment).expect("join");
        let server = backend
            .enter(|| named_server_on(SocketAddr::new(backend_ip, BACKEND_PORT), "backend"))
            .expect("a backend");
        let first = segment.spare(0);
        let last = segment.spare(SERVICES as u8 - 1);
        cluster.pool("lan", &[&format!("{first}-{last}")]);
        // As in MetalLB, a pool no L2Advertisement selects is announced nowhere.
        cluster.l2_advertisement("lan", serde_json::json!({"ipAddressPools": ["lan"]}));
        for n in 0..SERVICES {
            let name = format!("web-{n}");
            let service: Service = load_balancer(&name, Some(CLASS), &[("http", 80)]).build();
            cluster.apply_json(&service);
            let slice = SliceBuilder::new("shop", &format!("{name}-abcde"), &name)
                .port("http", BACKEND_PORT.into(), "TCP")
                .endpoint(&backend_ip.to_string(), Cond::ready());
            let slice: EndpointSlice = slice.build();
            cluster.apply_json(&slice);
        }
        Setup {
            cluster,
            kubeconfig,
            client,
            backend,
            server: Some(server),
            _api_host: api_host,
            segment,
            lab,
            _dir: dir,
        }
    }

    fn start(&self, node: &mut Node) {
        let kubeconfig = self.kubeconfig.to_str().expect("a UTF-8 path");
        let identity = node.name.clone();
        let source = ["--kubeconfig", kubeconfig, "--identity", &identity, "--lease-duration", "3s"];
        node.start(&self.segment.interface(), source);
    }

    /// Three nodes started, listed and holding every VIP between them; and the VIPs.
    fn three_serving(&self) -> (Vec<Node>, Vec<IpAddr>) {
        let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
            .iter()
            .map(|name| Node::join(&self.lab, &self.segment, name))
            .collect();
        for node in &mut nodes {
            self.start(node);
        }
        let everyone = names(&nodes.iter().collect::<Vec<_>>());
        poll_until("the three nodes to be listed", || {
            (self.members().keys().cloned().collect::<BTreeSet<_>>() == everyone).then_some(())
        });
        let vips = self.vips();
        poll_until("every VIP on one node", || {
            vips.iter().all(|vip| holder(&nodes, *vip).is_some()).then_some(())
        });
        (nodes, vips)
    }

    /// The member Lease's list: node → address.
    fn members(&self) -> BTreeMap<String, String> {
        let (ok, out, _) = self
            .cluster
            .kubectl
            .run(&["get", "lease", "-n", "ringlb-system", "ringlb-l2", "-o", "json"], None);
        let lease: serde_json::Value =
            if ok { serde_json::from_str(&out).unwrap_or_default() } else { return BTreeMap::new() };
        let text = lease["metadata"]["annotations"]["ringlb.io/l2-members"].as_str().unwrap_or("{}");
        serde_json::from_str(text).unwrap_or_default()
    }

    fn vips(&self) -> Vec<IpAddr> {
        (0..SERVICES).map(|n| self.cluster.wait_ingress(&format!("web-{n}"))).collect()
    }

    fn client_neighbour(&self, vip: IpAddr) -> Option<String> {
        self.client.neighbour(vip, &self.segment.interface())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // A server made in a namespace stops by connecting to itself: from inside.
        let server = self.server.take();
        self.backend.enter(move || drop(server));
    }
}

fn names(nodes: &[&Node]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.name.clone()).collect()
}

#[test]
fn the_api_lists_the_members_fences_a_dead_one_and_lets_it_back_without_two_owners() {
    let setup = Setup::new();
    let interface = setup.segment.interface();
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|name| Node::join(&setup.lab, &setup.segment, name))
        .collect();
    for node in &mut nodes {
        setup.start(node);
    }
    let everyone = names(&nodes.iter().collect::<Vec<_>>());
    poll_until("the three nodes to be listed", || {
        (setup.members().keys().cloned().collect::<BTreeSet<_>>() == everyone).then_some(())
    });
    for node in &nodes {
        assert_eq!(setup.members()[&node.name], node.heartbeats().to_string());
    }
    let vips = setup.vips();
    poll_until("every VIP on one node", || {
        vips.iter().all(|vip| holder(&nodes, *vip).is_some()).then_some(())
    });
    for vip in &vips {
        let (name, _) = setup.client.enter(|| greeting(SocketAddr::new(*vip, 80))).expect("the VIP answers");
        assert_eq!(name, "backend");
    }

    // A non-leader that owns VIPs dies: ringlb killed (no goodbye) and its link down.
    let leading = |node: &Node| node.status().is_some_and(|status| status["leader"] == true);
    let leader = poll_until("one leader", || nodes.iter().position(leading));
    let victim = (0..nodes.len())
        .find(|&i| i != leader && !nodes[i].held().is_empty())
        .expect("an owner that does not lead");
    let taken = nodes[victim].held();
    let survivors: Vec<usize> = (0..nodes.len()).filter(|&i| i != victim).collect();
    let sampling = sampler(&survivors.iter().map(|&i| &nodes[i]).collect::<Vec<_>>());
    let killed = Instant::now();
    nodes[victim].ringlb.take().expect("running").signal(libc::SIGKILL);
    nodes[victim].host.ip(&["link", "set", &interface, "down"]).expect("the dead node's link down");
    let mut removed = None;
    for vip in &taken {
        poll_until("a survivor to hold the dead node's VIP and the client to follow", || {
            if removed.is_none() && !setup.members().contains_key(&nodes[victim].name) {
                removed = Some(killed.elapsed());
            }
            let survivor = survivors.iter().copied().find(|&i| nodes[i].held().contains(vip))?;
            let mac = nodes[survivor].mac(&interface);
            (setup.client_neighbour(*vip).as_deref() == Some(mac.as_str())).then_some(())
        });
    }
    let failover = killed.elapsed();
    eprintln!(
        "failover: {} ms (SIGKILL of a non-leader owner to the client's neighbour entries)",
        failover.as_millis()
    );
    poll_until("the leader to remove the dead node", || {
        (!setup.members().contains_key(&nodes[victim].name)).then_some(())
    });
    let removal = removed.unwrap_or_else(|| killed.elapsed());
    eprintln!("removal: {} ms (SIGKILL to the member list without it)", removal.as_millis());
    for vip in &vips {
        let (name, _) = poll_until("every VIP to answer from a survivor", || {
            setup.client.enter(|| greeting(SocketAddr::new(*vip, 80))).ok()
        });
        assert_eq!(name, "backend");
    }
    let overlaps = sampling.finish();
    assert!(overlaps.is_empty(), "a VIP was on two survivors at once: {overlaps:?}");

    // The node comes back as after a reboot (its VIP link gone, its link up) and joins again.
    nodes[victim].host.ip(&["link", "del", LINK]).expect("the stale VIP link removed");
    nodes[victim].host.ip(&["link", "set", &interface, "up"]).expect("the link up");
    let sampling = sampler(&nodes.iter().collect::<Vec<_>>());
    let restarted = Instant::now();
    let mut node = nodes.remove(victim);
    setup.start(&mut node);
    nodes.insert(victim, node);
    poll_until("the restarted node to be listed again", || {
        (setup.members().keys().cloned().collect::<BTreeSet<_>>() == everyone).then_some(())
    });
    poll_until("the restarted node to take its share back", || (nodes[victim].held() == taken).then_some(()));
    eprintln!("rejoin: {} ms (ringlb started to its VIPs back on it)", restarted.elapsed().as_millis());
    let mac = nodes[victim].mac(&interface);
    for vip in &taken {
        poll_until("the client to follow the rejoined node", || {
            (setup.client_neighbour(*vip).as_deref() == Some(mac.as_str())).then_some(())
        });
    }
    for vip in &vips {
        assert!(holder(&nodes, *vip).is_some(), "{vip} has an owner");
    }
    let overlaps = sampling.finish();
    assert!(overlaps.is_empty(), "a VIP was on two nodes at once: {overlaps:?}");
    let status = nodes[victim].status().expect("/status");
    assert_eq!(status["l2"]["source"], "leased");
    assert_eq!(status["l2"]["listed"], true);
    assert_eq!(status["l2"]["owned"], taken.len());
}

/// Waits until `node` holds every one of `vips`; the time it took from `since`.
fn wait_all_on(node: &Node, vips: &[IpAddr], since: Instant, what: &str) -> u128 {
    let all: BTreeSet<IpAddr> = vips.iter().copied().collect();
    poll_until(what, || (node.held() == all).then_some(()));
    since.elapsed().as_millis()
}

#[test]
fn in_a_pair_the_leader_goes_on_alone_and_a_lone_follower_waits_for_the_lease() {
    let setup = Setup::new();
    let interface = setup.segment.interface();
    let mut nodes: Vec<Node> =
        ["node-a", "node-b"].iter().map(|name| Node::join(&setup.lab, &setup.segment, name)).collect();
    for node in &mut nodes {
        setup.start(node);
    }
    let everyone = names(&nodes.iter().collect::<Vec<_>>());
    poll_until("both nodes to be listed", || {
        (setup.members().keys().cloned().collect::<BTreeSet<_>>() == everyone).then_some(())
    });
    let vips = setup.vips();
    poll_until("every VIP on one node", || {
        vips.iter().all(|vip| holder(&nodes, *vip).is_some()).then_some(())
    });
    let leading = |node: &Node| node.status().is_some_and(|status| status["leader"] == true);
    let leader = poll_until("one leader", || nodes.iter().position(leading));
    let follower = 1 - leader;

    // The follower dies: the leader hears half of the pair, but leads it, so it goes on and
    // takes the follower's VIPs after the heartbeat timeout; then it fences it.
    let killed = Instant::now();
    nodes[follower].ringlb.take().expect("running").signal(libc::SIGKILL);
    nodes[follower].host.ip(&["link", "set", &interface, "down"]).expect("link down");
    let failover = wait_all_on(&nodes[leader], &vips, killed, "the leader to hold every VIP");
    eprintln!("failover: {failover} ms (pair, SIGKILL of the follower to every VIP on the leader)");
    poll_until("the leader to remove the follower", || {
        (!setup.members().contains_key(&nodes[follower].name)).then_some(())
    });

    // The follower comes back and joins; then the leader dies. The survivor, hearing half of
    // the pair without leading it, falls silent until the election Lease (3 s) makes it the
    // leader; then it goes on alone.
    nodes[follower].host.ip(&["link", "del", LINK]).expect("the stale VIP link removed");
    nodes[follower].host.ip(&["link", "set", &interface, "up"]).expect("link up");
    setup.start(&mut nodes[follower]);
    poll_until("the follower to be listed again", || {
        (setup.members().keys().cloned().collect::<BTreeSet<_>>() == everyone).then_some(())
    });
    poll_until("the follower to hold its share", || (!nodes[follower].held().is_empty()).then_some(()));
    let killed = Instant::now();
    nodes[leader].ringlb.take().expect("running").signal(libc::SIGKILL);
    nodes[leader].host.ip(&["link", "set", &interface, "down"]).expect("link down");
    let silent = Instant::now();
    poll_until("the lone follower to fall silent", || nodes[follower].held().is_empty().then_some(()));
    eprintln!(
        "silent: {} ms (pair, SIGKILL of the leader to the follower holding nothing)",
        silent.elapsed().as_millis()
    );
    let failover = wait_all_on(&nodes[follower], &vips, killed, "the new leader to hold every VIP");
    eprintln!(
        "failover: {failover} ms (pair, SIGKILL of the leader to every VIP on the follower; --lease-duration 3s)"
    );
    assert!(leading(&nodes[follower]), "it took over as the leader");
    poll_until("the new leader to remove the old one", || {
        (!setup.members().contains_key(&nodes[leader].name)).then_some(())
    });
}

/// The nodes that hold at least one VIP, by name.
fn holding(nodes: &[Node]) -> BTreeSet<String> {
    nodes.iter().filter(|node| !node.held().is_empty()).map(|node| node.name.clone()).collect()
}

#[test]
fn l2_advertisements_confine_the_vips_to_the_selected_nodes_and_interfaces_and_follow_node_labels() {
    let setup = Setup::new();
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|name| Node::join(&setup.lab, &setup.segment, name))
        .collect();
    for (name, edge) in [("node-a", "true"), ("node-b", "true"), ("node-c", "false")] {
        setup.cluster.node(name, &[("edge", edge)]);
    }
    setup.cluster.l2_advertisement(
        "lan",
        serde_json::json!({"ipAddressPools": ["lan"], "nodeSelectors": [{"matchLabels": {"edge": "true"}}]}),
    );
    for node in &mut nodes {
        setup.start(node);
    }
    let vips = setup.vips();
    let every_vip_held_within = |allowed: &[&str]| {
        let allowed: BTreeSet<String> = allowed.iter().map(|n| (*n).to_owned()).collect();
        vips.iter().all(|vip| holder(&nodes, *vip).is_some()) && holding(&nodes).is_subset(&allowed)
    };
    poll_until("every VIP on the edge nodes only", || {
        every_vip_held_within(&["node-a", "node-b"]).then_some(())
    });
    for vip in &vips {
        let (name, _) = setup.client.enter(|| greeting(SocketAddr::new(*vip, 80))).expect("the VIP answers");
        assert_eq!(name, "backend");
    }

    // The labels move: node-c becomes an edge node, node-a stops being one.
    let sampling = sampler(&nodes.iter().collect::<Vec<_>>());
    setup.cluster.node("node-a", &[("edge", "false")]);
    setup.cluster.node("node-c", &[("edge", "true")]);
    poll_until("every VIP on node-b and node-c only", || {
        every_vip_held_within(&["node-b", "node-c"]).then_some(())
    });
    let overlaps = sampling.finish();
    assert!(overlaps.is_empty(), "a VIP was on two nodes at once: {overlaps:?}");

    // Interfaces: one ringlb does not announce on takes every VIP off; its own brings them back.
    setup
        .cluster
        .l2_advertisement("lan", serde_json::json!({"ipAddressPools": ["lan"], "interfaces": ["eth9"]}));
    poll_until("no VIP announced on an interface no advertisement lists", || {
        holding(&nodes).is_empty().then_some(())
    });
    let interface = setup.segment.interface();
    setup
        .cluster
        .l2_advertisement("lan", serde_json::json!({"ipAddressPools": ["lan"], "interfaces": [interface]}));
    poll_until("every VIP announced again, from any node", || {
        vips.iter().all(|vip| holder(&nodes, *vip).is_some()).then_some(())
    });

    // Without an L2Advertisement the pool is announced nowhere; the Services keep their IPs.
    setup.cluster.kubectl.ok(&["delete", "l2advertisement", "-n", "metallb-system", "lan"], None);
    poll_until("no VIP announced once no advertisement selects the pool", || {
        holding(&nodes).is_empty().then_some(())
    });
    assert_eq!(setup.vips(), vips, "the allocation stays");
}

#[test]
fn two_of_three_stopping_gracefully_at_once_leave_the_list_and_the_third_goes_on_alone() {
    let setup = Setup::new();
    let (mut nodes, vips) = setup.three_serving();

    // Two stop together (a rolling maintenance gone fast): the third then hears one of three,
    // a minority, unless the two took themselves off the list.
    let stopping: Vec<Ringlb> =
        nodes[..2].iter_mut().map(|node| node.ringlb.take().expect("running")).collect();
    for ringlb in &stopping {
        ringlb.signal(libc::SIGTERM);
    }
    for ringlb in stopping {
        assert!(ringlb.wait().success(), "a graceful stop exits 0");
    }
    let survivor = &nodes[2];
    poll_until("the list to hold the survivor only", || {
        (setup.members().keys().cloned().collect::<Vec<_>>() == [survivor.name.clone()]).then_some(())
    });
    wait_all_on(survivor, &vips, Instant::now(), "the survivor to hold every VIP");
    for vip in &vips {
        let (name, _) = poll_until("every VIP to answer from the survivor", || {
            setup.client.enter(|| greeting(SocketAddr::new(*vip, 80))).ok()
        });
        assert_eq!(name, "backend");
    }
}

/// Cuts (or heals) the heartbeats between `a` and `b` both ways, by blackhole routes to each
/// other's address; the API server and the client stay reachable.
fn cut(a: &Node, b: &Node, heal: bool) {
    let verb = if heal { "del" } else { "add" };
    for (from, to) in [(a, b), (b, a)] {
        from.host.ip(&["route", verb, "blackhole", &format!("{}/32", to.ip)]).expect("a blackhole route");
    }
}

#[test]
fn a_node_cut_off_from_its_peers_falls_silent_the_majority_fences_it_and_it_rejoins_when_healed() {
    let setup = Setup::new();
    let (nodes, vips) = setup.three_serving();
    let everyone = names(&nodes.iter().collect::<Vec<_>>());
    let leading = |node: &Node| node.status().is_some_and(|status| status["leader"] == true);
    let leader = poll_until("one leader", || nodes.iter().position(leading));
    let isolated = (0..nodes.len())
        .find(|&i| i != leader && !nodes[i].held().is_empty())
        .expect("an owner that does not lead");
    let share = nodes[isolated].held();
    let others: Vec<usize> = (0..nodes.len()).filter(|&i| i != isolated).collect();
    let sampling = sampler(&nodes.iter().collect::<Vec<_>>());

    // Heartbeats between the follower and the rest stop; everyone still reaches the API.
    for &i in &others {
        cut(&nodes[isolated], &nodes[i], false);
    }
    poll_until("the cut-off node to fall silent", || nodes[isolated].held().is_empty().then_some(()));
    poll_until("the majority to hold every VIP", || {
        vips.iter().all(|vip| others.iter().any(|&i| nodes[i].held().contains(vip))).then_some(())
    });
    poll_until("the leader to fence the cut-off node", || {
        (!setup.members().contains_key(&nodes[isolated].name)).then_some(())
    });
    // Cut off, it does not push itself back in (it hears no listed member).
    assert!(!setup.members().contains_key(&nodes[isolated].name), "still out");
    assert!(nodes[isolated].held().is_empty(), "still silent");

    for &i in &others {
        cut(&nodes[isolated], &nodes[i], true);
    }
    poll_until("the healed node to be listed again", || {
        (setup.members().keys().cloned().collect::<BTreeSet<_>>() == everyone).then_some(())
    });
    poll_until("the healed node to take its share back", || (nodes[isolated].held() == share).then_some(()));
    poll_until("every VIP on one node", || {
        vips.iter().all(|vip| holder(&nodes, *vip).is_some()).then_some(())
    });
    let overlaps = sampling.finish();
    assert!(overlaps.is_empty(), "a VIP was on two nodes at once: {overlaps:?}");
}
