//! L2 mode with several ringlb replicas on one segment (`--l2-listen`, `--l2-peer`): a lab of
//! network namespaces holds a client, a backend host and three ringlb nodes on one bridge. Each
//! VIP is held (as an address of the node's VIP link, announced by gratuitous ARP) by exactly one
//! node; two Services sharing an IP are on the same node; killing the owner moves its VIPs to a
//! survivor, and the client's neighbour entry follows the survivor's announcement; a node that
//! joins takes its share only after the owner let go; an `externalTrafficPolicy: Local` VIP is
//! held only by a node with a ready local endpoint and follows it.
//!
//! A sampler (`support::l2`) catches any VIP on two nodes at once.
//!
//! Failover times are printed (`failover: … ms`); `bench/l2-failover.sh` collects them (and
//! sets other heartbeat timings through `RINGLB_L2_INTERVAL` and `RINGLB_L2_TIMEOUT`).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use support::l2::{Node, holder};
use support::{greeting, poll_until, save};
use testkit::backends::{Server, named_server_on};
use testkit::lab::{Host, Lab, Segment};

const BACKEND_PORT: u16 = 8080;

/// A Service with external IP `vip`:`port` and one endpoint at `backend` (on `node`, if given).
fn service(name: &str, vip: IpAddr, port: u16, backend: IpAddr, node: Option<&str>, local: bool) -> String {
    let policy = if local { "\n  externalTrafficPolicy: Local" } else { "" };
    let node = node.map(|node| format!("\n  nodeName: {node}")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  \
         externalIPs: [\"{vip}\"]{policy}\n  ports:\n  - name: http\n    port: {port}\n    targetPort: \
         {BACKEND_PORT}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \
         {name}-1\n  namespace: shop\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: \
         IPv4\nports:\n- name: http\n  port: {BACKEND_PORT}\n  protocol: TCP\nendpoints:\n- addresses: \
         [\"{backend}\"]\n  conditions: {{ready: true}}{node}\n---\n"
    )
}

/// The lab: a segment with a client, a backend host (its server answers `backend`) and room for
/// ringlb nodes.
struct Setup {
    lab: Lab,
    segment: Segment,
    client: Host,
    backend: Host,
    backend_ip: IpAddr,
    server: Option<Server>,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let lab = Lab::create().expect("a lab");
        let segment = lab.segment().expect("a segment");
        let client = lab.host("client").expect("a host");
        lab.join(&client, &segment).expect("join");
        let backend = lab.host("backend").expect("a host");
        let backend_ip = lab.join(&backend, &segment).expect("join");
        let server = backend
            .enter(|| named_server_on(SocketAddr::new(backend_ip, BACKEND_PORT), "backend"))
            .expect("a backend");
        let dir = tempfile::tempdir().expect("a temporary directory");
        Setup { lab, segment, client, backend, backend_ip, server: Some(server), dir }
    }

    fn manifest(&self) -> PathBuf {
        self.dir.path().join("services.yaml")
    }

    /// A ringlb node named `name`, joined to the segment (not started).
    fn node(&self, name: &str) -> Node {
        Node::join(&self.lab, &self.segment, name)
    }

    /// Connects from the client to `vip` and returns the backend's greeting.
    fn reach(&self, vip: SocketAddr) -> std::io::Result<String> {
        self.client.enter(|| greeting(vip)).map(|(name, _)| name)
    }

    /// The MAC the client's neighbour table holds for `vip`.
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

fn peers_of(nodes: &[Node], me: usize) -> Vec<SocketAddr> {
    (0..nodes.len()).filter(|&i| i != me).map(|i| nodes[i].heartbeats()).collect()
}

fn sampler(nodes: &[Node]) -> support::l2::Sampler {
    support::l2::sampler(&nodes.iter().collect::<Vec<_>>())
}

/// Starts `node` on the manifest, with `peers` as the other replicas.
fn start(node: &mut Node, manifest: &Path, interface: &str, peers: &[SocketAddr]) {
    let mut source = vec!["--manifests".into(), manifest.as_os_str().to_owned()];
    for peer in peers {
        source.extend(["--l2-peer".into(), peer.to_string().into()]);
    }
    node.start::<std::ffi::OsString>(interface, source);
}

#[test]
fn each_vip_has_one_owner_and_moves_to_a_survivor_when_its_owner_is_killed() {
    let setup = Setup::new();
    let (shared, other, third) = (setup.segment.spare(0), setup.segment.spare(1), setup.segment.spare(2));
    let backend = setup.backend_ip;
    let text = [
        service("dns-tcp", shared, 80, backend, None, false),
        service("dns-udp", shared, 81, backend, None, false),
        service("web", other, 80, backend, None, false),
        service("api", third, 80, backend, None, false),
    ]
    .concat();
    save(&setup.manifest(), &text);
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"].iter().map(|name| setup.node(name)).collect();
    let interface = setup.segment.interface();
    let sampling = sampler(&nodes);
    for i in 0..nodes.len() {
        let peers = peers_of(&nodes, i);
        start(&mut nodes[i], &setup.manifest(), &interface, &peers);
    }
    let vips = [shared, other, third];
    poll_until("every VIP to have an owner", || {
        vips.iter().all(|vip| holder(&nodes, *vip).is_some()).then_some(())
    });
    for vip in vips {
        assert_eq!(setup.reach(SocketAddr::new(vip, 80)).expect("the VIP answers"), "backend");
    }
    assert_eq!(setup.reach(SocketAddr::new(shared, 81)).expect("the shared VIP's second port"), "backend");
    let owner = holder(&nodes, shared).expect("owned");
    assert_eq!(setup.client_neighbour(shared), Some(nodes[owner].mac(&interface)));

    // The owner of the shared IP dies: ringlb killed outright (no goodbye, its heartbeats just
    // stop) and the node's link down, as with a node that lost power.
    let killed = Instant::now();
    nodes[owner].ringlb.take().expect("running").signal(libc::SIGKILL);
    nodes[owner].host.ip(&["link", "set", &interface, "down"]).expect("the dead node's link down");
    let (survivor, mac) = poll_until("a survivor to hold the shared VIP and the client to follow", || {
        let survivor = (0..nodes.len()).find(|&i| i != owner && nodes[i].held().contains(&shared))?;
        let mac = nodes[survivor].mac(&interface);
        (setup.client_neighbour(shared).as_deref() == Some(mac.as_str())).then_some((survivor, mac))
    });
    let failover = killed.elapsed();
    eprintln!("failover: {} ms (SIGKILL of the owner to the client's neighbour entry)", failover.as_millis());
    assert_ne!(survivor, owner);
    assert_eq!(setup.client_neighbour(shared), Some(mac));
    let (name, _) = poll_until("the survivor to carry new connections", || {
        setup.client.enter(|| greeting(SocketAddr::new(shared, 81))).ok()
    });
    assert_eq!(name, "backend");
    // The dead node's VIP link still holds what it had (nobody removed it), so it is left out.
    let survivors: Vec<usize> = (0..nodes.len()).filter(|&i| i != owner).collect();
    for vip in vips {
        let holding = survivors.iter().filter(|&&i| nodes[i].held().contains(&vip)).count();
        assert!(holding <= 1, "{vip} on {holding} survivors");
    }
    let overlaps = sampling.finish();
    // Once killed, the owner's addresses stay on its link without anyone answering for the
    // namespace's ringlb: only overlaps among live nodes count.
    let dead = &nodes[owner].name;
    let live_overlaps: Vec<&String> = overlaps.iter().filter(|o| !o.contains(dead.as_str())).collect();
    assert!(live_overlaps.is_empty(), "a VIP was on two live nodes at once: {live_overlaps:?}");
}

#[test]
fn a_joining_node_takes_its_share_only_after_the_owner_let_go_and_a_stopped_one_hands_over() {
    let setup = Setup::new();
    let vips: Vec<IpAddr> = (0..12).map(|n| setup.segment.spare(n)).collect();
    let text: String = vips
        .iter()
        .enumerate()
        .map(|(n, vip)| service(&format!("web-{n}"), *vip, 80, setup.backend_ip, None, false))
        .collect();
    save(&setup.manifest(), &text);
    let mut nodes: Vec<Node> = ["node-a", "node-b"].iter().map(|name| setup.node(name)).collect();
    let interface = setup.segment.interface();
    let sampling = sampler(&nodes);
    let peers = peers_of(&nodes, 0);
    start(&mut nodes[0], &setup.manifest(), &interface, &peers);
    poll_until("node-a alone to hold every VIP", || (nodes[0].held().len() == vips.len()).then_some(()));

    let peers = peers_of(&nodes, 1);
    start(&mut nodes[1], &setup.manifest(), &interface, &peers);
    poll_until("node-b to take its share", || {
        let (a, b) = (nodes[0].held(), nodes[1].held());
        (!b.is_empty() && a.len() + b.len() == vips.len() && a.is_disjoint(&b)).then_some(())
    });
    for vip in &vips {
        assert_eq!(setup.reach(SocketAddr::new(*vip, 80)).expect("every VIP answers"), "backend");
    }

    // A graceful stop hands node-b's VIPs back to node-a without waiting for the timeout.
    let taken_back = nodes[1].held();
    let stopped = Instant::now();
    let status = nodes[1].ringlb.take().expect("running").terminate();
    assert!(status.success(), "ringlb exits 0 on SIGTERM: {status}");
    poll_until("node-a to hold every VIP again", || (nodes[0].held().len() == vips.len()).then_some(()));
    eprintln!("handover: {} ms (SIGTERM of a node to its VIPs on the other)", stopped.elapsed().as_millis());
    for vip in &taken_back {
        let mac = nodes[0].mac(&interface);
        poll_until("the client to follow node-a's announcement", || {
            (setup.client_neighbour(*vip).as_deref() == Some(mac.as_str())).then_some(())
        });
    }
    assert!(nodes[1].held().is_empty(), "the stopped node left nothing on its link");
    let overlaps = sampling.finish();
    assert!(overlaps.is_empty(), "a VIP was on two nodes at once: {overlaps:?}");
}

#[test]
fn a_local_traffic_vip_is_held_where_its_endpoint_is_and_follows_it() {
    let setup = Setup::new();
    let vip = setup.segment.spare(0);
    let on = |node: &str| service("local", vip, 80, setup.backend_ip, Some(node), true);
    save(&setup.manifest(), &on("node-b"));
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"].iter().map(|name| setup.node(name)).collect();
    let interface = setup.segment.interface();
    for i in 0..nodes.len() {
        let peers = peers_of(&nodes, i);
        start(&mut nodes[i], &setup.manifest(), &interface, &peers);
    }
    poll_until("node-b to hold the Local VIP", || (holder(&nodes, vip) == Some(1)).then_some(()));
    assert_eq!(setup.reach(SocketAddr::new(vip, 80)).expect("the VIP answers"), "backend");
    save(&setup.manifest(), &on("node-c"));
    poll_until("the VIP to follow its endpoint to node-c", || (holder(&nodes, vip) == Some(2)).then_some(()));
    let mac = nodes[2].mac(&interface);
    poll_until("the client to follow", || {
        (setup.client_neighbour(vip).as_deref() == Some(mac.as_str())).then_some(())
    });
    assert_eq!(setup.reach(SocketAddr::new(vip, 80)).expect("the VIP answers from node-c"), "backend");
}

#[test]
fn a_ringlb_that_crashes_on_a_live_node_leaves_no_vip_there_on_a_tun_link() {
    let setup = Setup::new();
    let vip = setup.segment.spare(0);
    save(&setup.manifest(), &service("web", vip, 80, setup.backend_ip, None, false));
    let mut nodes: Vec<Node> = ["node-a", "node-b"].iter().map(|name| setup.node(name).on_tun()).collect();
    let interface = setup.segment.interface();
    for i in 0..nodes.len() {
        let peers = peers_of(&nodes, i);
        start(&mut nodes[i], &setup.manifest(), &interface, &peers);
    }
    let owner = poll_until("the VIP to have an owner", || holder(&nodes, vip));
    let survivor = 1 - owner;
    let sampling = sampler(&nodes);

    // Only ringlb dies; the node, its link and its kernel live on. Its VIPs go with the process,
    // so its kernel cannot answer ARP for a VIP the survivor now holds.
    nodes[owner].ringlb.take().expect("running").signal(libc::SIGKILL);
    poll_until("the dead ringlb's VIP link to be gone", || nodes[owner].held().is_empty().then_some(()));
    poll_until("the survivor to hold the VIP", || nodes[survivor].held().contains(&vip).then_some(()));
    // The client asks anew: only the survivor may answer.
    setup.client.ip(&["neigh", "flush", "dev", &interface]).expect("flush the client's neighbours");
    assert_eq!(setup.reach(SocketAddr::new(vip, 80)).expect("the VIP answers"), "backend");
    assert_eq!(setup.client_neighbour(vip), Some(nodes[survivor].mac(&interface)));
    let overlaps = sampling.finish();
    assert!(overlaps.is_empty(), "the VIP was on both nodes at once: {overlaps:?}");
}
