//! A BGP fabric in network namespaces (`testkit::lab`) for the BGP mode's tests: a client, a router
//! running BIRD 2 with ECMP into its kernel, ringlb nodes each running BIRD and `ringlb run
//! --bird-include`, and named backends.
//!
//! ```text
//!  segment A               segment B
//!  client ── router ─┬── node 1 (BIRD + ringlb) ─┐
//!   .1       .2 | .1 ├── node 2 (BIRD + ringlb) ─┼── backend-1, backend-2, backend-3
//!                    ├── node …                  │
//!                    └── prober (routes chosen by a test: one node at a time)
//! ```
//!
//! The client's default route is the router, so it reaches the VIPs only through the router's BGP
//! routes (ECMP, L4 hash: `fib_multipath_hash_policy=1`); each node holds the VIPs on a link of its
//! own (`--vip-link`, a port-less bridge) so its kernel takes their traffic as local, and routes
//! them through a liveness link (`--bird-liveness-link`) that dies with it. Sessions: eBGP,
//! router AS [`ROUTER_ASN`] (passive), nodes AS [`NODE_ASN`], BFD at 100 ms × 3 on both sides and a
//! 3 s hold time. Everything is dual-stack: each host also has the IPv6 twin of its address
//! ([`v6_of`]), with an IPv6 session beside each IPv4 one. VIPs are from TEST-NET-2 and
//! 2001:db8::/32, ranges no segment uses, inside the namespaces only.
//!
//! Every process is killed and reaped on drop, before the namespaces go (field order), and
//! backends made inside a namespace are stopped inside it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::backends::{Server, named_server_on};
use testkit::lab::{Host, Lab, Segment};

use super::{Ringlb, http_get, poll_until, save};

pub const ROUTER_ASN: u32 = 64512;
pub const NODE_ASN: u32 = 64513;
/// The VIPs' port; backends listen on [`BACKEND_PORT`].
pub const PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// The TUN interface each node's ringlb routes its VIPs through (`--bird-liveness-link`).
pub const LIVENESS_LINK: &str = "ringlb-live";
/// ringlb's admin address inside each node.
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);

/// The IPv6 address of a host that has `v4` on a segment: `fd00::<segment's third octet>:<last
/// octet>` (the lab hands out IPv4 only; every host gets both, inside the namespaces).
pub fn v6_of(v4: IpAddr) -> IpAddr {
    let IpAddr::V4(v4) = v4 else { panic!("{v4} is not an IPv4 address of the lab") };
    let [_, _, c, d] = v4.octets();
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, u16::from(c), u16::from(d)))
}

/// A new host of `lab` whose links skip duplicate address detection, so that their IPv6
/// link-local addresses (which BIRD sends as next hops) exist as soon as the links are up.
fn host(lab: &Lab, role: &str) -> Host {
    let host = lab.host(role).expect("a host");
    host.sysctl("net.ipv6.conf.default.accept_dad", "0").expect("sysctl");
    host
}

/// Gives `host` the IPv6 twin ([`v6_of`]) of its address `v4` on `segment`'s interface.
fn join6(host: &Host, segment: &Segment, v4: IpAddr) -> IpAddr {
    let address = v6_of(v4);
    let (cidr, interface) = (format!("{address}/112"), segment.interface());
    host.ip(&["-6", "addr", "add", &cidr, "dev", &interface, "nodad"]).expect("an IPv6 address");
    address
}

/// The `n`-th IPv6 VIP (2001:db8:100::10 + n).
pub fn vip6(n: u8) -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10 + u16::from(n)))
}

/// The `n`-th VIP (198.51.100.10 + n).
pub fn vip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10 + n))
}

/// A BIRD process (`bird -f`, in a namespace); killed and reaped on drop.
pub struct Bird {
    child: Option<Child>,
    socket: PathBuf,
}

impl Bird {
    /// Writes `config` to `dir/bird.conf` and starts BIRD on it inside `host`, its control socket
    /// in `dir`; waits until the socket answers.
    pub fn start(host: &Host, dir: &Path, config: &str) -> Bird {
        let (conf, socket, pid) = (dir.join("bird.conf"), dir.join("bird.ctl"), dir.join("bird.pid"));
        std::fs::write(&conf, config).expect("write bird.conf");
        let mut command = host.command("bird");
        command.arg("-f").arg("-c").arg(&conf).arg("-s").arg(&socket).arg("-P").arg(&pid);
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let child = command.spawn().expect("spawn bird (apt-get install bird2)");
        let mut bird = Bird { child: Some(child), socket };
        poll_until("BIRD to answer on its control socket", || {
            if let Some(Ok(Some(status))) = bird.child.as_mut().map(Child::try_wait) {
                panic!("bird exited at start: {status} (config: {})", conf.display());
            }
            bird.birdc(&["show", "status"]).contains("Daemon is up").then_some(())
        });
        bird
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `birdc -s SOCKET args…`: what it printed.
    pub fn birdc(&self, args: &[&str]) -> String {
        let output =
            Command::new("birdc").arg("-s").arg(&self.socket).args(args).output().expect("run birdc");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Whether the BGP protocol `name` is Established.
    pub fn established(&self, name: &str) -> bool {
        self.birdc(&["show", "protocols", name]).lines().any(|line| {
            line.split_whitespace().next() == Some(name)
                && line.split_whitespace().any(|word| word == "Established")
        })
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One ringlb node: its host, BIRD and ringlb.
pub struct Node {
    pub ringlb: Option<Ringlb>,
    pub bird: Bird,
    pub host: Host,
    pub address: IpAddr,
    pub address6: IpAddr,
    /// The include file ringlb writes.
    pub include: PathBuf,
    /// The name of the router's BGP protocol for this node.
    pub peer: String,
}

impl Node {
    /// Client connections this node's ringlb accepted (summed over its workers).
    pub fn accepted(&self) -> u64 {
        let status = self.status();
        status["workers"]
            .as_array()
            .expect("/status has workers")
            .iter()
            .map(|worker| worker["accepted"].as_u64().expect("a counter"))
            .sum()
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.host.enter(|| http_get(ADMIN, "/status")).expect("GET /status");
        assert_eq!(code, 200, "/status answers: {body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    fn wait_ready(&mut self) {
        let ringlb = self.ringlb.as_mut().expect("running");
        poll_until("ringlb to answer /readyz with 200", || {
            assert!(ringlb.is_running(), "ringlb exited before it was ready");
            self.host.enter(|| http_get(ADMIN, "/readyz")).ok().filter(|(status, _)| *status == 200)
        });
    }
}

/// A backend made inside its host, stopped there too (it stops by connecting to itself).
struct Backend {
    servers: Vec<Server>,
    host: Host,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let servers = std::mem::take(&mut self.servers);
        self.host.enter(move || drop(servers));
    }
}

/// See the module doc.
pub struct Fabric {
    pub nodes: Vec<Node>,
    pub router_bird: Bird,
    backends: Vec<Backend>,
    pub client: Host,
    pub router: Host,
    pub prober: Host,
    pub a: Segment,
    pub b: Segment,
    _lab: Lab,
    pub manifest: PathBuf,
    _dir: tempfile::TempDir,
}

/// Who configures a node's BGP session to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sessions {
    /// The node's bird.conf (the deploy/bird/node.conf way).
    InBirdConf,
    /// ringlb renders it into its include file (`--bgp-asn`, `--bgp-peer`, `--bgp-bfd`).
    RenderedByRinglb,
}

impl Fabric {
    /// A fabric of `nodes` ringlb nodes and three backends (`backend-1` …), serving what
    /// `manifest(backend addresses)` says; returns once every node is ready.
    pub fn new(nodes: usize, manifest: impl Fn(&[IpAddr]) -> String) -> Fabric {
        Fabric::with(nodes, Sessions::InBirdConf, manifest)
    }

    /// [`Fabric::new`] with the nodes' BGP sessions configured as `sessions` says.
    pub fn with(nodes: usize, sessions: Sessions, manifest: impl Fn(&[IpAddr]) -> String) -> Fabric {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let lab = Lab::create().expect("a lab");
        let (a, b) = (lab.segment().expect("segment A"), lab.segment().expect("segment B"));
        let (client, router) = (host(&lab, "client"), host(&lab, "router"));
        let client_a = lab.join(&client, &a).expect("join");
        let router_a = lab.join(&router, &a).expect("join");
        let router_b = lab.join(&router, &b).expect("join");
        join6(&client, &a, client_a);
        let router6_a = join6(&router, &a, router_a);
        let router6_b = join6(&router, &b, router_b);
        client.ip(&["route", "add", "default", "via", &router_a.to_string()]).expect("client route");
        client.ip(&["-6", "route", "add", "default", "via", &router6_a.to_string()]).expect("client route");
        router.sysctl("net.ipv4.ip_forward", "1").expect("sysctl");
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1").expect("sysctl");
        router.sysctl("net.ipv6.conf.all.forwarding", "1").expect("sysctl");
        router.sysctl("net.ipv6.fib_multipath_hash_policy", "1").expect("sysctl");
        let a6 = format!("{}/112", v6_of(a.ip(0)));
        let hosts: Vec<(Host, IpAddr, IpAddr)> = (1..=nodes)
            .map(|n| {
                let host = host(&lab, &format!("node{n}"));
                let address = lab.join(&host, &b).expect("join");
                let address6 = join6(&host, &b, address);
                host.ip(&["route", "add", &a.cidr(), "via", &router_b.to_string()]).expect("node route");
                host.ip(&["-6", "route", "add", &a6, "via", &router6_b.to_string()]).expect("node route");
                (host, address, address6)
            })
            .collect();
        let prober = host(&lab, "prober");
        let prober_b = lab.join(&prober, &b).expect("join");
        join6(&prober, &b, prober_b);
        let backends: Vec<Backend> = (1..=3)
            .map(|n| {
                let host = host(&lab, &format!("backend{n}"));
                let address = lab.join(&host, &b).expect("join");
                let address6 = join6(&host, &b, address);
                let name = format!("backend-{n}");
                let servers = host.enter(|| {
                    [address, address6].map(|ip| {
                        named_server_on(SocketAddr::new(ip, BACKEND_PORT), &name).expect("a backend")
                    })
                });
                Backend { servers: servers.into(), host }
            })
            .collect();
        let backend_ips: Vec<IpAddr> =
            backends.iter().map(|backend| backend.servers[0].addr().ip()).collect();
        // Every node's ringlb runs birdc through this, which waits a second first while
        // `slow-birdc` exists (see [`Fabric::slow_down_birdc`]).
        let birdc = dir.path().join("birdc");
        let marker = dir.path().join("slow-birdc");
        let script = format!("#!/bin/sh\n[ -e '{}' ] && sleep 1\nexec birdc \"$@\"\n", marker.display());
        std::fs::write(&birdc, script).expect("write the birdc wrapper");
        std::fs::set_permissions(&birdc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let manifest_path = dir.path().join("services.yaml");
        save(&manifest_path, &manifest(&backend_ips));

        let router_dir = dir.path().join("router");
        std::fs::create_dir(&router_dir).expect("mkdir");
        let peers: Vec<(String, IpAddr, IpAddr)> = hosts
            .iter()
            .enumerate()
            .map(|(i, (_, address, address6))| (format!("node{}", i + 1), *address, *address6))
            .collect();
        let router_bird = Bird::start(&router, &router_dir, &router_config(router_b, router6_b, &peers));

        let nodes = hosts
            .into_iter()
            .zip(peers)
            .map(|((host, address, address6), (peer, _, _))| {
                let node_dir = dir.path().join(&peer);
                std::fs::create_dir(&node_dir).expect("mkdir");
                // The operator's part: the include file exists before BIRD first reads it.
                let include = node_dir.join("ringlb.conf");
                std::fs::write(&include, "").expect("an empty include file");
                let config = match sessions {
                    Sessions::InBirdConf => node_config((address, address6), (router_b, router6_b), &include),
                    Sessions::RenderedByRinglb => bare_node_config(address, &include),
                };
                let bird = Bird::start(&host, &node_dir, &config);
                let mut command = host.command(env!("CARGO_BIN_EXE_ringlb"));
                command.arg("run").arg("--manifests").arg(&manifest_path);
                command.arg("--bird-include").arg(&include).arg("--bird-socket").arg(bird.socket());
                command.arg("--birdc").arg(&birdc);
                command.args(["--bird-liveness-link", LIVENESS_LINK]);
                if sessions == Sessions::RenderedByRinglb {
                    command.args(["--bgp-asn", &NODE_ASN.to_string(), "--bgp-bfd"]);
                    command.args(["--bgp-peer", &format!("{router_b}:{ROUTER_ASN}")]);
                    command.args(["--bgp-peer", &format!("[{router6_b}]:{ROUTER_ASN}")]);
                }
                command.args(["--vip-link", "ringlb-vips", "--vip-link-kind", "bridge"]);
                command.args(["--admin", &ADMIN.to_string(), "--workers", "1", "--no-pin"]);
                command.args(["--shutdown-grace", "1s", "--log-level", "warn"]);
                let ringlb = Ringlb::spawn(command, ADMIN);
                let mut node = Node { ringlb: Some(ringlb), bird, host, address, address6, include, peer };
                node.wait_ready();
                node
            })
            .collect();
        Fabric {
            nodes,
            router_bird,
            backends,
            client,
            router,
            prober,
            a,
            b,
            _lab: lab,
            manifest: manifest_path,
            _dir: dir,
        }
    }

    /// The next hops of the router's kernel route to `vip` (empty: no route).
    pub fn next_hops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let (family, prefix) = if vip.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
        let output = self
            .router
            .command("ip")
            .args([family, "route", "show", "to", "exact", &format!("{vip}/{prefix}")])
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

    /// The node addresses, sorted (what [`Fabric::next_hops`] shows with every node up).
    pub fn node_addresses(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self.nodes.iter().map(|node| node.address).collect();
        addresses.sort();
        addresses
    }

    /// The nodes' IPv6 addresses, sorted (the next hops of an IPv6 VIP).
    pub fn node_addresses6(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self.nodes.iter().map(|node| node.address6).collect();
        addresses.sort();
        addresses
    }

    /// Polls until the router's next hops to `vip` are `expected`; returns how long that took.
    pub fn wait_next_hops(&self, vip: IpAddr, expected: &[IpAddr]) -> Duration {
        let start = Instant::now();
        poll_until(&format!("the router's next hops to {vip} to be {expected:?}"), || {
            (self.next_hops(vip) == expected).then_some(())
        });
        start.elapsed()
    }

    /// From now on every node's `birdc configure` takes a second more.
    pub fn slow_down_birdc(&self) {
        std::fs::write(self._dir.path().join("slow-birdc"), "").expect("write the marker");
    }

    /// Rewrites the manifest every node serves.
    pub fn save_manifest(&self, text: &str) {
        save(&self.manifest, text);
    }
}

fn router_config(router: IpAddr, router6: IpAddr, peers: &[(String, IpAddr, IpAddr)]) -> String {
    let mut text = format!(
        "log stderr {{ warning, error, fatal, bug }};\n\
         router id {router};\n\
         protocol device {{ }}\n\
         # ECMP: BGP routes of equal merit become one multipath route in the kernel.\n\
         protocol kernel {{\n  merge paths on;\n  ipv4 {{ import none; export all; }};\n}}\n\
         protocol kernel {{\n  merge paths on;\n  ipv6 {{ import none; export all; }};\n}}\n\
         protocol bfd {{\n  interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};\n}}\n\
         template bgp ringlb_node {{\n  local {router} as {ROUTER_ASN};\n  passive on;\n  hold time 3;\n  \
         bfd on;\n  ipv4 {{ import all; export none; }};\n}}\n\
         template bgp ringlb_node6 {{\n  local {router6} as {ROUTER_ASN};\n  passive on;\n  hold time 3;\n  \
         bfd on;\n  ipv6 {{ import all; export none; }};\n}}\n"
    );
    for (name, address, address6) in peers {
        let _ =
            writeln!(text, "protocol bgp {name} from ringlb_node {{ neighbor {address} as {NODE_ASN}; }}");
        let _ = writeln!(
            text,
            "protocol bgp {name}_v6 from ringlb_node6 {{ neighbor {address6} as {NODE_ASN}; }}"
        );
    }
    text
}

/// A node's bird.conf with its sessions to the router (IPv4 and IPv6), as deploy/bird/node.conf.
fn node_config(
    (node, node6): (IpAddr, IpAddr),
    (router, router6): (IpAddr, IpAddr),
    include: &Path,
) -> String {
    let session = |name: &str, local: IpAddr, neighbor: IpAddr, channel: &str, protocol: &str| {
        format!(
            "protocol bgp {name} {{\n  local {local} as {NODE_ASN};\n  neighbor {neighbor} as {ROUTER_ASN};\n  \
             hold time 3;\n  connect delay time 1;\n  connect retry time 1;\n  error wait time 1, 5;\n  bfd on;\n  \
             {channel} {{ import none; export where proto = \"{protocol}\"; }};\n}}\n"
        )
    };
    format!(
        "log stderr {{ warning, error, fatal, bug }};\n\
         router id {node};\n\
         protocol device {{ }}\n\
         include \"{include}\";\n\
         protocol bfd {{\n  interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};\n}}\n\
         {v4}{v6}",
        include = include.display(),
        v4 = session("tor", node, router, "ipv4", "ringlb_vips4"),
        v6 = session("tor6", node6, router6, "ipv6", "ringlb_vips6"),
    )
}

/// A node's bird.conf when ringlb renders the session: nothing but the include.
pub fn bare_node_config(node: IpAddr, include: &Path) -> String {
    format!(
        "log stderr {{ warning, error, fatal, bug }};\nrouter id {node};\nprotocol device {{ }}\ninclude \"{}\";\n",
        include.display()
    )
}

/// A Service `shop/<name>` with external IP `vip` on [`PORT`], `annotations` (`key: value` lines)
/// and one slice of `(ip, ready)` endpoints on [`BACKEND_PORT`].
pub fn service(
    name: &str,
    vip: IpAddr,
    annotations: &[(&str, &str)],
    endpoints: &[(IpAddr, bool)],
) -> String {
    let mut text = format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n");
    if !annotations.is_empty() {
        text.push_str("  annotations:\n");
        for (key, value) in annotations {
            let _ = writeln!(text, "    {key}: \"{value}\"");
        }
    }
    let _ = write!(
        text,
        "spec:\n  externalIPs: [\"{vip}\"]\n  ports:\n  - name: http\n    port: {PORT}\n    targetPort: http\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abc12\n  \
         namespace: shop\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: {family}\n\
         ports:\n- name: http\n  port: {BACKEND_PORT}\n  protocol: TCP\nendpoints:\n",
        family = if vip.is_ipv4() { "IPv4" } else { "IPv6" },
    );
    for (ip, ready) in endpoints {
        let _ = writeln!(text, "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}");
    }
    text
}
