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

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

const PREFIX: &str = "ringlb-test-";
const NETNS_DIR: &str = "/run/netns";

/// A test's pod network: a network namespace behind a veth pair; deleted on drop.
pub struct PodNetwork {
    name: String,
    subnet: [u8; 3],
    added: Mutex<Vec<u8>>,
}

impl PodNetwork {
    /// Creates the namespace, the veth pair and the /24 between them.
    pub fn create() -> io::Result<PodNetwork> {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        remove_stale();
        let pid = std::process::id();
        let second = 200 + (pid % 50) as u8;
        for _ in 0..=u8::MAX {
            let third = NEXT.fetch_add(1, Ordering::Relaxed);
            let subnet = [10, second, third];
            if subnet_in_use(subnet)? {
                continue;
            }
            let name = format!("{PREFIX}{pid}-{third}");
            let network = PodNetwork { name, subnet, added: Mutex::new(Vec::new()) };
            let (host_link, pod_link) = (network.host_link(), network.pod_link());
            ip(&["netns", "add", &network.name])?;
            ip(&["link", "add", &host_link, "type", "veth", "peer", "name", &pod_link])?;
            ip(&["link", "set", &pod_link, "netns", &network.name])?;
            ip(&["addr", "add", &format!("{}/24", network.host_ip()), "dev", &host_link])?;
            ip(&["link", "set", &host_link, "up"])?;
            ip(&[
                "-n",
                &network.name,
                "addr",
                "add",
                &format!("{}.{}.{}.2/24", 10, second, third),
                "dev",
                &pod_link,
            ])?;
            ip(&["-n", &network.name, "link", "set", &pod_link, "up"])?;
            ip(&["-n", &network.name, "link", "set", "lo", "up"])?;
            return Ok(network);
        }
        Err(io::Error::other("every 10.x.y.0/24 of this process is in use"))
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
            ip(&["-n", &self.name, "addr", "add", &address, "dev", &pod_link]).expect("add a pod address");
            added.push(last);
        }
        IpAddr::V4(Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last))
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates live there) and returns what
    /// it returns.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_DIR}/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let namespace = File::open(&path).expect("open the namespace");
                    // SAFETY: setns(2) on a descriptor we own; it changes only this thread's
                    // network namespace, and the thread ends with the scope.
                    let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "setns: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the namespace thread panicked")
        })
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
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
        let (pid, third) = self.name[PREFIX.len()..].split_once('-').expect("named by create");
        format!("rlt{}{end}{third}", pid.parse::<u32>().expect("a pid") % 100_000)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip").args(args).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn subnet_in_use(subnet: [u8; 3]) -> io::Result<bool> {
    let prefix = format!("{}.{}.{}.0/24", subnet[0], subnet[1], subnet[2]);
    let output = Command::new("ip").args(["-4", "-o", "addr", "show", "to", &prefix]).output()?;
    Ok(!output.stdout.is_empty())
}

/// Deletes the namespaces of test processes that no longer exist.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix(PREFIX).and_then(|rest| rest.split_once('-')).map(|(pid, _)| pid.to_owned())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
