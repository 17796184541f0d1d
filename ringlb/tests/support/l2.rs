//! Shared pieces of the L2 tests (`tests/l2.rs`, `tests/l2_cluster.rs`): ringlb nodes in hosts
//! of a `testkit::lab`, what each holds on its VIP link, and a sampler that catches a VIP on two
//! nodes at once.
//!
//! The sampler lists every node's VIP addresses one after the other the whole time; a VIP listed
//! on node X, then on another node, then on X again was on both at once (X never gives a VIP
//! back and retakes it within a round of the sampler in these tests).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use testkit::lab::{Host, Lab, Segment};

use super::{Ringlb, http_get, poll_until};

pub const LINK: &str = "ringlb-vips";
pub const HEARTBEATS: u16 = 7946;
pub const ADMIN: &str = "127.0.0.1:9901";

/// A ringlb node: a lab host on a segment, and ringlb in it once started.
pub struct Node {
    pub name: String,
    pub host: Host,
    pub ip: IpAddr,
    pub ringlb: Option<Ringlb>,
    /// `--vip-link-kind`: `bridge` (stands in for `dummy`) unless [`Node::on_tun`].
    link_kind: &'static str,
}

impl Node {
    /// A node named `name`, joined to `segment` (not started).
    pub fn join(lab: &Lab, segment: &Segment, name: &str) -> Node {
        let host = lab.host(name).expect("a host");
        let ip = lab.join(&host, segment).expect("join");
        Node { name: name.to_owned(), host, ip, ringlb: None, link_kind: "bridge" }
    }

    /// This node with its VIPs on a TUN link, which goes with them when ringlb dies.
    pub fn on_tun(mut self) -> Node {
        self.link_kind = "tun";
        self
    }

    pub fn heartbeats(&self) -> SocketAddr {
        SocketAddr::new(self.ip, HEARTBEATS)
    }

    /// Starts `ringlb run <source…>` on this node in L2 mode (VIP link, announcements on
    /// `interface`, heartbeats on [`HEARTBEATS`]), and waits until it serves.
    pub fn start<S: AsRef<OsStr>>(&mut self, interface: &str, source: impl IntoIterator<Item = S>) {
        let mut command = self.host.command(env!("CARGO_BIN_EXE_ringlb"));
        command.arg("run").args(source);
        command.args([
            "--vip-link",
            LINK,
            "--vip-link-kind",
            self.link_kind,
            "--announce-interface",
            interface,
        ]);
        command.args(["--l2-listen", &self.heartbeats().to_string(), "--node-name", &self.name]);
        command.args(["--admin", ADMIN, "--workers", "1", "--shutdown-grace", "1s", "--log-level", "warn"]);
        // bench/l2-failover.sh measures other timings through these.
        for (variable, flag) in
            [("RINGLB_L2_INTERVAL", "--l2-interval"), ("RINGLB_L2_TIMEOUT", "--l2-timeout")]
        {
            if let Ok(value) = std::env::var(variable) {
                command.args([flag, &value]);
            }
        }
        // `ip netns exec` execs ringlb itself, so signals reach it. The admin address is inside
        // the namespace: asked from a thread there.
        let mut ringlb = Ringlb::spawn(command, ADMIN.parse().expect("literal"));
        let admin: SocketAddr = ADMIN.parse().expect("literal");
        poll_until("ringlb to answer /readyz with 200", || {
            assert!(ringlb.is_running(), "ringlb on {} exited before it was ready", self.name);
            self.host.enter(|| http_get(admin, "/readyz")).ok().filter(|(status, _)| *status == 200)
        });
        self.ringlb = Some(ringlb);
    }

    /// The admin `/status` document (asked from inside the node).
    pub fn status(&self) -> Option<serde_json::Value> {
        let admin: SocketAddr = ADMIN.parse().expect("literal");
        let (code, body) = self.host.enter(|| http_get(admin, "/status")).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// The VIPs on this node's link now.
    pub fn held(&self) -> BTreeSet<IpAddr> {
        held_in(self.host.name())
    }

    pub fn mac(&self, interface: &str) -> String {
        self.host.mac(interface).expect("a MAC")
    }
}

pub fn held_in(namespace: &str) -> BTreeSet<IpAddr> {
    let output = Command::new("ip").args(["-n", namespace, "-o", "-4", "addr", "show", "dev", LINK]).output();
    let Ok(output) = output else { return BTreeSet::new() };
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    shown
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet").and_then(|_| words.next())?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Lists every node's VIPs in turn until dropped, and remembers any VIP seen on two nodes at once.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    overlaps: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(namespaces: Vec<(String, String)>) -> Sampler {
        let (stop, overlaps) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
        let (stopping, found) = (Arc::clone(&stop), Arc::clone(&overlaps));
        let thread = std::thread::spawn(move || {
            // The last sample of each node, and the samples of the others since.
            let mut history: Vec<(usize, BTreeSet<IpAddr>)> = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                for (index, (_, namespace)) in namespaces.iter().enumerate() {
                    let now = held_in(namespace);
                    // Held by this node at its previous sample and now: held throughout, so
                    // every other node's sample in between that lists it is an overlap.
                    if let Some(previous) = history.iter().rposition(|(node, _)| *node == index) {
                        for vip in now.intersection(&history[previous].1) {
                            for (other, seen) in &history[previous + 1..] {
                                if seen.contains(vip) {
                                    let (a, b) = (&namespaces[index].0, &namespaces[*other].0);
                                    found.lock().expect("not poisoned").push(format!("{vip} on {a} and {b}"));
                                }
                            }
                        }
                    }
                    history.push((index, now));
                    if history.len() > 4 * namespaces.len() {
                        history.drain(..namespaces.len());
                    }
                }
            }
        });
        Sampler { stop, overlaps, thread: Some(thread) }
    }

    /// Stops sampling; the overlaps seen.
    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the sampler panicked");
        }
        self.overlaps.lock().expect("not poisoned").clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The one node holding `vip` (panics if two do), if any. The nodes are listed one after the
/// other, so a VIP seen on two may have moved in between: two hold it at once only if the first
/// still does after the second was seen.
pub fn holder(nodes: &[Node], vip: IpAddr) -> Option<usize> {
    loop {
        let holding: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].held().contains(&vip)).collect();
        let (last, earlier) = holding.split_last()?;
        let still: Vec<&str> = earlier
            .iter()
            .filter(|&&i| nodes[i].held().contains(&vip))
            .map(|&i| nodes[i].name.as_str())
            .collect();
        assert!(still.is_empty(), "{vip} is on {still:?} and {}", nodes[*last].name);
        if earlier.is_empty() {
            return Some(*last);
        }
    }
}

/// A sampler over `nodes`.
pub fn sampler(nodes: &[&Node]) -> Sampler {
    Sampler::start(nodes.iter().map(|n| (n.name.clone(), n.host.name().to_owned())).collect())
}
