//! Multi-node networks for tests: hosts (network namespaces) joined to shared L2 segments
//! (bridges in a switch namespace of the lab's own), each segment a private /24 from
//! [`crate::netns`]. ringlb nodes, routers, clients and backends of one test each get a host;
//! nothing a test sends leaves the namespaces it created.
//!
//! Addresses: host `n`-th to join a segment gets `.n` (from 1, in join order) and the IPv6
//! `fd00:0:b:c::n` of the segment's `/64` (`b.c` from its /24); [`Segment::spare`] and
//! [`Segment::spare6`] give addresses from `.200` (`::200`) up that no host holds (VIPs
//! announced on the segment).
//!
//! A lab's Kubernetes API ([`Lab::api_server`]) is the emulator in a host of its own on a
//! segment: the hosts reach it at that host's address, the test process (kubectl) on loopback.
//!
//! Invariants: every namespace (switch and hosts) is deleted on drop, which deletes the veth
//! pairs; processes a test starts inside a host are the test's to stop (a namespace lives on
//! while a process is in it, until that process ends).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::apiserver::ApiServer;
use crate::netns::{Namespace, free_subnet, ip, link_name};

/// A lab: the switch namespace that holds the segments' bridges.
pub struct Lab {
    switch: Namespace,
    tag: u8,
    segments: AtomicU8,
    hosts: AtomicU8,
}

/// One L2 segment: a bridge and its /24.
pub struct Segment {
    bridge: String,
    index: u8,
    subnet: [u8; 3],
    next: AtomicU8,
}

/// One node of a lab: a network namespace with an interface on each segment it joined.
pub struct Host {
    namespace: Namespace,
}

impl Lab {
    pub fn create() -> io::Result<Lab> {
        let subnet = free_subnet()?;
        let tag = subnet[2];
        let switch = Namespace::create(&format!("lab{tag}-switch"))?;
        Ok(Lab { switch, tag, segments: AtomicU8::new(0), hosts: AtomicU8::new(0) })
    }

    /// A new segment (a bridge of the switch, up, forwarding at once).
    pub fn segment(&self) -> io::Result<Segment> {
        let index = self.segments.fetch_add(1, Ordering::Relaxed);
        let bridge = format!("br{index}");
        self.switch.ip(&["link", "add", &bridge, "type", "bridge", "forward_delay", "0"])?;
        self.switch.ip(&["link", "set", &bridge, "up"])?;
        Ok(Segment { bridge, index, subnet: free_subnet()?, next: AtomicU8::new(1) })
    }

    /// A new host with only its loopback; `role` names it in `ip netns list`.
    pub fn host(&self, role: &str) -> io::Result<Host> {
        let n = self.hosts.fetch_add(1, Ordering::Relaxed);
        Ok(Host { namespace: Namespace::create(&format!("lab{}-{n}-{role}", self.tag))? })
    }

    /// Joins `host` to `segment` through a veth pair; returns its address there. Inside the host
    /// the interface is [`Segment::interface`].
    pub fn join(&self, host: &Host, segment: &Segment) -> io::Result<IpAddr> {
        let n = segment.next.fetch_add(1, Ordering::Relaxed);
        assert!(n < 200, "at most 199 hosts per segment");
        let (inside, outside) = (link_name('a', segment.subnet, n), link_name('b', segment.subnet, n));
        ip(&["link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
        ip(&["link", "set", &outside, "netns", &self.switch.name])?;
        self.switch.ip(&["link", "set", &outside, "master", &segment.bridge])?;
        self.switch.ip(&["link", "set", &outside, "up"])?;
        ip(&["link", "set", &inside, "netns", &host.namespace.name])?;
        let interface = segment.interface();
        host.namespace.ip(&["link", "set", &inside, "name", &interface])?;
        let address = segment.ip(n);
        host.namespace.ip(&["addr", "add", &format!("{address}/24"), "dev", &interface])?;
        let v6 = segment.ip6(u16::from(n));
        host.namespace.ip(&["addr", "add", &format!("{v6}/64"), "dev", &interface, "nodad"])?;
        host.namespace.ip(&["link", "set", &interface, "up"])?;
        Ok(address)
    }
}

/// The emulated API server of a lab (see [`Lab::api_server`]). The server stops before its host
/// goes.
pub struct LabApiServer {
    pub server: ApiServer,
    /// Where the lab's hosts reach it.
    pub addr: SocketAddr,
    pub host: Host,
}

impl LabApiServer {
    /// A kubeconfig for the administrator that reaches the server from the lab's hosts.
    pub fn write_kubeconfig(&self, path: &Path) -> PathBuf {
        self.server.write_kubeconfig_at(path, self.addr)
    }
}

impl Lab {
    /// The API server emulator, reachable from every host of `segment` (at the address of its own
    /// host, `apiserver`, which joins the segment) and from the test process on loopback.
    pub fn api_server(&self, segment: &Segment) -> io::Result<LabApiServer> {
        let host = self.host("apiserver")?;
        let ip = self.join(&host, segment)?;
        let listener = host.enter(|| TcpListener::bind(SocketAddr::new(ip, 0)))?;
        let addr = listener.local_addr()?;
        Ok(LabApiServer { server: ApiServer::start_also_on(listener), addr, host })
    }
}

impl Segment {
    /// The name of every host's interface on this segment.
    pub fn interface(&self) -> String {
        format!("lan{}", self.index)
    }

    /// The segment's `.n`.
    pub fn ip(&self, n: u8) -> IpAddr {
        let [a, b, c] = self.subnet;
        IpAddr::V4(Ipv4Addr::new(a, b, c, n))
    }

    /// The segment's IPv6 `::n`.
    pub fn ip6(&self, n: u16) -> IpAddr {
        let [_, b, c] = self.subnet;
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, u16::from(b), u16::from(c), 0, 0, 0, n))
    }

    /// An IPv6 address of the segment that no host holds (`::200 + n`, hexadecimal), for VIPs.
    pub fn spare6(&self, n: u16) -> IpAddr {
        assert!(n < 0x100, "spare IPv6 addresses are ::200 to ::2ff");
        self.ip6(0x200 + n)
    }

    /// An address of the segment that no host holds (`.200 + n`), for VIPs.
    pub fn spare(&self, n: u8) -> IpAddr {
        assert!(n < 55, "spare addresses are .200 to .254");
        self.ip(200 + n)
    }

    /// The segment as `a.b.c.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}/24", self.ip(0))
    }
}

impl Host {
    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub fn name(&self) -> &str {
        &self.namespace.name
    }

    /// `program` to be run inside the host.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name(), program]);
        command
    }

    /// `ip args…` inside the host.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        self.namespace.ip(args)
    }

    /// Sets a sysctl inside the host (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let output = self.command("sysctl").args(["-qw", &format!("{key}={value}")]).output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("sysctl {key}: {}", String::from_utf8_lossy(&output.stderr).trim())))
        }
    }

    /// The MAC address of `interface`.
    pub fn mac(&self, interface: &str) -> io::Result<String> {
        let output = self.command("cat").arg(format!("/sys/class/net/{interface}/address")).output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!("no interface {interface} in {}", self.name())));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The MAC this host's neighbour table holds for `ip` on `interface`, if any.
    pub fn neighbour(&self, ip: IpAddr, interface: &str) -> Option<String> {
        let output =
            self.command("ip").args(["neigh", "show", &ip.to_string(), "dev", interface]).output().ok()?;
        let shown = String::from_utf8_lossy(&output.stdout).into_owned();
        let mut words = shown.split_whitespace();
        words.find(|word| *word == "lladdr").and_then(|_| words.next()).map(str::to_owned)
    }

    /// Runs `f` on a thread inside the host (sockets it creates live there).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.namespace.enter(f)
    }
}
