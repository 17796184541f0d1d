//! BGP from the cluster (`--bgp-from-cluster`): two ringlb nodes of a `testkit::lab`, each with a
//! BIRD whose configuration is nothing but a router id and ringlb's include file, take their BGP
//! sessions and routes from MetalLB's `BGPPeer`, `BGPAdvertisement`, `Community` and `BFDProfile`
//! objects in the emulated cluster (written with kubectl, as an operator would). A router (BIRD,
//! iBGP, BFD, ECMP into its kernel) learns the VIPs with their communities and `LOCAL_PREF` and
//! reaches the backend through them.
//!
//! Shown: the peer's `nodeSelectors` decide which node has the session (and follow the Nodes'
//! labels); the BFD profile's timers run the session's BFD; a community is given as a value and
//! through a `Community` alias; a pool no advertisement selects is advertised nowhere, and the
//! pool whose advertisement is deleted is withdrawn. Times are printed (`--nocapture`).
//!
//! Needs `bird`/`birdc` (Debian's `bird2`) and root for the network namespaces.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use support::bgp::{Bird, bare_node_config};
use support::cluster::{CLASS, Cluster, load_balancer};
use support::{Ringlb, greeting, http_get, poll_until};
use testkit::backends::{Server, named_server_on};
use testkit::lab::{Host, Lab, LabApiServer, Segment};
use testkit::objects::{Cond, SliceBuilder};

/// One AS for the router and the nodes: iBGP, where `LOCAL_PREF` is carried.
const ASN: u32 = 64512;
const BACKEND_PORT: u16 = 8080;
const ADMIN: &str = "127.0.0.1:9901";
/// The pools: `lan` is advertised, `quiet` has no advertisement (TEST-NET-2 and -3, which no
/// segment uses, so the router reaches them only through BGP).
const LAN: &str = "198.51.100.0/30";
const QUIET: &str = "203.0.113.0/30";

struct Node {
    host: Host,
    address: IpAddr,
    bird: Bird,
    include: PathBuf,
    ringlb: Option<Ringlb>,
}

impl Node {
    fn include(&self) -> String {
        std::fs::read_to_string(&self.include).unwrap_or_default()
    }
}

struct Setup {
    nodes: Vec<Node>,
    router_bird: Bird,
    router: Host,
    cluster: Cluster,
    backend: Host,
    server: Option<Server>,
    _api_host: Host,
    _segment: Segment,
    _lab: Lab,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Processes go before the namespaces; the backend is stopped inside its host.
        for node in &mut self.nodes {
            node.ringlb.take();
        }
        if let Some(server) = self.server.take() {
            self.backend.enter(move || drop(server));
        }
    }
}

impl Setup {
    fn new() -> Setup {
        let lab = Lab::create().expect("a lab");
        let segment = lab.segment().expect("a segment");
        let LabApiServer { server, addr, host: api_host } = lab.api_server(&segment).expect("an API server");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = server.write_kubeconfig_at(&dir.path().join("kubeconfig"), addr);
        let cluster = Cluster::on(server);
        let router = lab.host("router").expect("a host");
        let router_address = lab.join(&router, &segment).expect("join");
        let backend = lab.host("backend").expect("a host");
        let backend_ip = lab.join(&backend, &segment).expect("join");
        let server = backend
            .enter(|| named_server_on(SocketAddr::new(backend_ip, BACKEND_PORT), "backend"))
            .expect("a backend");
        let hosts: Vec<(String, Host, IpAddr)> = ["node1", "node2"]
            .into_iter()
            .map(|name| {
                let host = lab.host(name).expect("a host");
                let address = lab.join(&host, &segment).expect("join");
                (name.to_owned(), host, address)
            })
            .collect();
        let router_dir = dir.path().join("router");
        std::fs::create_dir(&router_dir).expect("mkdir");
        let addresses: Vec<IpAddr> = hosts.iter().map(|(_, _, address)| *address).collect();
        let router_bird = Bird::start(&router, &router_dir, &router_config(router_address, &addresses));

        // The operator's objects, as a MetalLB user has them.
        cluster.node("node1", &[("bgp", "yes")]);
        cluster.node("node2", &[]);
        cluster.pool("lan", &[LAN]);
        cluster.pool("quiet", &[QUIET]);
        cluster.kubectl.apply(&format!(
            "apiVersion: metallb.io/v1beta1\nkind: BFDProfile\nmetadata: {{name: fast, namespace: metallb-system}}\n\
             spec: {{receiveInterval: 100, transmitInterval: 100, detectMultiplier: 3}}\n\
             ---\napiVersion: metallb.io/v1beta1\nkind: Community\nmetadata: {{name: aliases, namespace: metallb-system}}\n\
             spec:\n  communities: [{{name: no-export, value: \"65535:65281\"}}]\n\
             ---\napiVersion: metallb.io/v1beta2\nkind: BGPPeer\nmetadata: {{name: tor, namespace: metallb-system}}\n\
             spec:\n  myASN: {ASN}\n  peerASN: {ASN}\n  peerAddress: \"{router_address}\"\n  holdTime: 9s\n  \
             connectTime: 2s\n  enableGracefulRestart: true\n  bfdProfile: fast\n  nodeSelectors: [{{matchLabels: {{bgp: \"yes\"}}}}]\n\
             ---\napiVersion: metallb.io/v1beta1\nkind: BGPAdvertisement\nmetadata: {{name: lan, namespace: metallb-system}}\n\
             spec:\n  ipAddressPools: [lan]\n  communities: [\"64512:100\", no-export]\n  localPref: 150\n"
        ));
        for (name, pool) in [("hidden", "quiet"), ("web", "lan")] {
            let service: Service = load_balancer(name, Some(CLASS), &[("http", 80)])
                .annotation("metallb.io/address-pool", pool)
                .build();
            cluster.apply_json(&service);
            let slice = SliceBuilder::new("shop", &format!("{name}-abcde"), name)
                .port("http", BACKEND_PORT.into(), "TCP")
                .endpoint(&backend_ip.to_string(), Cond::ready());
            let slice: EndpointSlice = slice.build();
            cluster.apply_json(&slice);
        }

        let nodes = hosts
            .into_iter()
            .map(|(name, host, address)| {
                let node_dir = dir.path().join(&name);
                std::fs::create_dir(&node_dir).expect("mkdir");
                let include = node_dir.join("ringlb.conf");
                std::fs::write(&include, "").expect("an empty include file");
                let bird = Bird::start(&host, &node_dir, &bare_node_config(address, &include));
                let mut command = host.command(env!("CARGO_BIN_EXE_ringlb"));
                command.arg("run").arg("--kubeconfig").arg(&kubeconfig);
                command.args(["--identity", &name, "--node-name", &name, "--lease-duration", "3s"]);
                command.arg("--bgp-from-cluster").arg("--bird-include").arg(&include);
                command.arg("--bird-socket").arg(bird.socket());
                command.args(["--bird-liveness-link", "ringlb-live"]);
                command.args(["--vip-link", "ringlb-vips", "--vip-link-kind", "bridge"]);
                command.args(["--admin", ADMIN, "--workers", "1", "--no-pin"]);
                command.args(["--shutdown-grace", "1s", "--log-level", "warn"]);
                let mut ringlb = Ringlb::spawn(command, ADMIN.parse().expect("literal"));
                let admin: SocketAddr = ADMIN.parse().expect("literal");
                poll_until("ringlb to answer /readyz with 200", || {
                    assert!(ringlb.is_running(), "ringlb on {name} exited before it was ready");
                    host.enter(|| http_get(admin, "/readyz")).ok().filter(|(status, _)| *status == 200)
                });
                Node { host, address, bird, include, ringlb: Some(ringlb) }
            })
            .collect();
        Setup {
            nodes,
            router_bird,
            router,
            cluster,
            backend,
            server: Some(server),
            _api_host: api_host,
            _segment: segment,
            _lab: lab,
            _dir: dir,
        }
    }

    /// `birdc show route all for VIP/32` on the router: empty when it has no route.
    fn router_route(&self, vip: IpAddr) -> String {
        let shown = self.router_bird.birdc(&["show", "route", &format!("{vip}/32"), "all"]);
        if shown.contains("BGP.") { shown } else { String::new() }
    }

    /// The next hops of the router's kernel route to `vip` (empty: no route).
    fn next_hops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let output = self
            .router
            .command("ip")
            .args(["-4", "route", "show", "to", "exact", &format!("{vip}/32")])
            .output()
            .expect("run ip");
        let shown = String::from_utf8_lossy(&output.stdout).into_owned();
        let words: Vec<&str> = shown.split_whitespace().collect();
        let mut hops: Vec<IpAddr> = words
            .windows(2)
            .filter(|pair| pair[0] == "via")
            .filter_map(|pair| pair[1].parse().ok())
            .collect();
        hops.sort();
        hops
    }

    fn wait_next_hops(&self, vip: IpAddr, expected: &[IpAddr]) -> std::time::Duration {
        let start = Instant::now();
        poll_until(&format!("the router's next hops to {vip} to be {expected:?}"), || {
            (self.next_hops(vip) == expected).then_some(())
        });
        start.elapsed()
    }
}

fn router_config(router: IpAddr, nodes: &[IpAddr]) -> String {
    let mut text = format!(
        "log stderr {{ warning, error, fatal, bug }};\nrouter id {router};\nprotocol device {{ }}\n\
         protocol kernel {{\n  merge paths on;\n  ipv4 {{ import none; export all; }};\n}}\n\
         protocol bfd {{\n  interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};\n}}\n\
         template bgp ringlb_node {{\n  local {router} as {ASN};\n  direct;\n  passive on;\n  hold time 9;\n  bfd on;\n  \
         ipv4 {{ import all; export none; gateway direct; }};\n}}\n"
    );
    for (n, address) in nodes.iter().enumerate() {
        text.push_str(&format!(
            "protocol bgp node{} from ringlb_node {{ neighbor {address} as {ASN}; }}\n",
            n + 1
        ));
    }
    text
}

#[test]
fn sessions_and_routes_follow_metallbs_bgp_objects() {
    let setup = Setup::new();
    let hidden = setup.cluster.wait_ingress("hidden");
    let web = setup.cluster.wait_ingress("web");
    let within = |pool: &str, ip: IpAddr| pool.parse::<lb_core::Cidr>().expect("a CIDR").contains(ip);
    assert!(within(LAN, web) && within(QUIET, hidden), "{web} from lan, {hidden} from quiet");
    let [node1, node2] = &setup.nodes[..] else { panic!("two nodes") };

    // node1's labels match the BGPPeer's selector: its session carries web with the
    // advertisement's attributes (the alias resolved), and the router reaches the backend.
    let started = Instant::now();
    let route = poll_until("the router to learn web's route with its attributes", || {
        let route = setup.router_route(web);
        (!route.is_empty()).then_some(route)
    });
    eprintln!("router learned web's route {:?} after both nodes were ready", started.elapsed());
    assert!(route.contains(&format!("via {}", node1.address)), "{route}");
    assert!(route.contains("BGP.community: (64512,100) (65535,65281)"), "{route}");
    assert!(route.contains("BGP.local_pref: 150"), "{route}");
    setup.wait_next_hops(web, &[node1.address]);
    let (name, _) = setup.router.enter(|| greeting(SocketAddr::new(web, 80))).expect("reach web through BGP");
    assert_eq!(name, "backend");

    // BFD runs with the profile's timers.
    let bfd = poll_until("the router's BFD session with node1 to be up", || {
        let sessions = setup.router_bird.birdc(&["show", "bfd", "sessions"]);
        sessions
            .lines()
            .any(|line| line.starts_with(&node1.address.to_string()) && line.contains("Up"))
            .then_some(sessions)
    });
    assert!(bfd.contains("0.100"), "100 ms intervals: {bfd}");

    // hidden's pool has no BGPAdvertisement: served (node1 answers on it), advertised nowhere.
    let (name, _) = node1.host.enter(|| greeting(SocketAddr::new(hidden, 80))).expect("hidden is served");
    assert_eq!(name, "backend");
    let include = node1.include();
    assert!(include.contains(&format!("route {web}/32 via")), "{include}");
    // The BGPPeer's connectTime and enableGracefulRestart, in the session BIRD runs.
    assert!(
        include.contains("connect retry time 2;") && include.contains("graceful restart on;"),
        "{include}"
    );
    assert!(!include.contains(&hidden.to_string()), "hidden is in no export: {include}");
    let exported = node1.bird.birdc(&["show", "route", "export", "ringlb_tor"]);
    assert!(exported.contains(&web.to_string()) && !exported.contains(&hidden.to_string()), "{exported}");
    assert!(setup.router_route(hidden).is_empty(), "the router has no route to hidden");

    // node2 matches no BGPPeer: no session at all.
    poll_until("node2's ringlb to have written its include file", || {
        node2.include().contains("protocol static ringlb_vips4").then_some(())
    });
    assert!(!node2.include().contains("protocol bgp"), "{}", node2.include());

    // Labels move: node2 gains the session, then node1 loses it, and the route follows.
    setup.cluster.kubectl.ok(&["label", "node", "node2", "bgp=yes"], None);
    let mut both = vec![node1.address, node2.address];
    both.sort();
    let joined = setup.wait_next_hops(web, &both);
    eprintln!("node2 labelled → router has both next hops after {joined:?}");
    setup.cluster.kubectl.ok(&["label", "node", "node1", "bgp-"], None);
    let left = setup.wait_next_hops(web, &[node2.address]);
    eprintln!("node1 unlabelled → its route withdrawn after {left:?}");
    assert!(!node1.include().contains("protocol bgp"), "{}", node1.include());

    // The advertisement goes: so does the route.
    setup
        .cluster
        .kubectl
        .ok(&["delete", "bgpadvertisements.metallb.io", "-n", "metallb-system", "lan"], None);
    let withdrawn = setup.wait_next_hops(web, &[]);
    eprintln!("BGPAdvertisement deleted → route withdrawn after {withdrawn:?}");
}
