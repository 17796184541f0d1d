//! Where tests put their pods: the one place that chooses endpoint addresses.
//!
//! A Kubernetes API server refuses loopback addresses in EndpointSlices and Endpoints (HTTP 422;
//! the emulator keeps that rule), so a test whose endpoints go through an API server cannot run
//! its backends on 127.0.0.1. [`PodNetwork`] gives each test a network namespace of its own,
//! joined to the host by a veth pair on a private /24 (`10.<200+pid%50>.<n>.0/24`): the host end
//! holds `.1`, and every pod address ([`PodNetwork::pod_ip`]) is an address of the namespace end,
//! so traffic to a pod goes only into a namespace the test created. Backends are bound inside the
//! namespace by [`PodNetwork::enter`]; a socket keeps the namespace it was created in, so the
//! servers then run from any thread. The addresses are valid against a real cluster too.
//!
//! Invariants: the namespace (and with it the veth pair) is deleted on drop; namespaces left by
//! test processes that died are deleted by the next [`PodNetwork::create`]; a /24 that any host
//! interface already uses is never chosen.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use crate::netns::{Namespace, free_subnet, ip};

/// A test's pod network: a network namespace behind a veth pair; deleted on drop.
pub struct PodNetwork {
    namespace: Namespace,
    subnet: [u8; 3],
    added: Mutex<Vec<u8>>,
}

impl PodNetwork {
    /// Creates the namespace, the veth pair and the /24 between them.
    pub fn create() -> io::Result<PodNetwork> {
        let subnet = free_subnet()?;
        let namespace = Namespace::create(&subnet[2].to_string())?;
        let network = PodNetwork { namespace, subnet, added: Mutex::new(Vec::new()) };
        let (host_link, pod_link) = (network.host_link(), network.pod_link());
        ip(&["link", "add", &host_link, "type", "veth", "peer", "name", &pod_link])?;
        ip(&["link", "set", &pod_link, "netns", network.name()])?;
        ip(&["addr", "add", &format!("{}/24", network.host_ip()), "dev", &host_link])?;
        ip(&["link", "set", &host_link, "up"])?;
        let [a, b, c] = subnet;
        network.namespace.ip(&["addr", "add", &format!("{a}.{b}.{c}.2/24"), "dev", &pod_link])?;
        network.namespace.ip(&["link", "set", &pod_link, "up"])?;
        Ok(network)
    }

    /// The host's address on the pod network (the source of ringlb's connections to pods).
    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1))
    }

    /// The address of pod `n` (0..=200), added to the namespace on first use.
    pub fn pod_ip(&self, n: u8) -> IpAddr {
        assert!(n <= 200, "pod {n}: at most 201 pods per network");
        let last = 10 + n;
        let mut added = self.added.lock().expect("not poisoned");
        if !added.contains(&last) {
            let address = format!("{}.{}.{}.{last}/32", self.subnet[0], self.subnet[1], self.subnet[2]);
            let pod_link = self.pod_link();
            self.namespace.ip(&["addr", "add", &address, "dev", &pod_link]).expect("add a pod address");
            added.push(last);
        }
        IpAddr::V4(Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last))
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates live there) and returns what
    /// it returns.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.namespace.enter(f)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.namespace.name
    }

    /// The namespace end of the veth pair (in the namespace).
    pub fn pod_link(&self) -> String {
        self.link('p')
    }

    /// The host end of the veth pair.
    pub fn host_link(&self) -> String {
        self.link('h')
    }

    fn link(&self, end: char) -> String {
        let pid = std::process::id() % 100_000;
        format!("rlt{pid}{end}{}", self.subnet[2])
    }
}
