//! `ringlb run --vip-link`: ringlb in a network namespace of the test's own holds its VIPs as
//! addresses of a link it creates, so the namespace's kernel answers ARP for them and a client
//! on the host reaches the VIP across the veth pair; the addresses follow the manifest, and a
//! graceful stop removes them with the link. With `--announce-interface`, the host's neighbour
//! entry for a VIP, planted with a stranger's MAC, follows ringlb's gratuitous ARP before any
//! traffic. A port-less bridge stands in for a dummy link (this machine's kernel has no dummy
//! driver). A TUN VIP link (`--vip-link-kind tun`) goes with its VIPs when ringlb is SIGKILLed.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Output};

use support::{Ringlb, greeting, poll_until, save};
use testkit::backends::named_server_on;
use testkit::pods::PodNetwork;

const LINK: &str = "ringlb-vips";

/// An address of the pod network's /24 that no pod uses (pods take .10 to .210).
fn vip_in(network: &PodNetwork, last: u8) -> IpAddr {
    let IpAddr::V4(host) = network.host_ip() else { unreachable!("the pod network is IPv4") };
    let [a, b, c, _] = host.octets();
    IpAddr::V4(Ipv4Addr::new(a, b, c, last))
}

fn ip_in(network: &PodNetwork, args: &[&str]) -> Output {
    Command::new("ip").args(["-n", network.name()]).args(args).output().expect("run ip")
}

fn link_addresses(network: &PodNetwork) -> String {
    let output = ip_in(network, &["address", "show", "dev", LINK]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A neighbour entry on the host for `vip` at a MAC nobody has.
fn plant_stranger(network: &PodNetwork, vip: IpAddr) {
    let (vip, link) = (vip.to_string(), network.host_link());
    let args = ["neigh", "replace", &vip, "lladdr", STRANGER, "dev", &link, "nud", "stale"];
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

const STRANGER: &str = "02:00:00:00:00:99";

/// The MAC the host's neighbour table holds for `vip`, if any.
fn neighbour(network: &PodNetwork, vip: IpAddr) -> Option<String> {
    let output = Command::new("ip")
        .args(["neigh", "show", &vip.to_string(), "dev", &network.host_link()])
        .output()
        .expect("run ip");
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut words = shown.split_whitespace();
    words.find(|word| *word == "lladdr").and_then(|_| words.next()).map(str::to_owned)
}

/// The MAC of the namespace end of the veth pair.
fn mac_of(network: &PodNetwork) -> String {
    let output = ip_in(network, &["link", "show", "dev", &network.pod_link()]);
    let shown = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut words = shown.split_whitespace();
    words.find(|word| *word == "link/ether").and_then(|_| words.next()).expect("a MAC").to_owned()
}

#[test]
fn the_vips_of_a_ringlb_in_a_namespace_are_reachable_from_the_host_and_go_away_with_it() {
    let network = PodNetwork::create().expect("a network namespace");
    // The backend listens on the namespace's loopback (a manifest may name loopback endpoints).
    let backend =
        network.enter(|| named_server_on(SocketAddr::from(([127, 0, 0, 1], 0)), "pod-a")).expect("a backend");
    let stopped_in_namespace = InNamespace { network: &network, server: Some(backend) };
    let backend = stopped_in_namespace.server.as_ref().expect("just made");
    let (first, second) = (vip_in(&network, 250), vip_in(&network, 251));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let manifest = dir.path().join("services.yaml");
    let web = |vip: IpAddr| {
        support::web_manifest(SocketAddr::new(vip, 80), backend.addr().port(), &[(backend.addr().ip(), true)])
    };
    save(&manifest, &web(first));
    // The host believes the VIPs live at a stranger's MAC; a stale entry changes only when told.
    plant_stranger(&network, first);
    plant_stranger(&network, second);
    let ours = mac_of(&network);

    let mut command = Command::new("ip");
    command.args(["netns", "exec", network.name(), env!("CARGO_BIN_EXE_ringlb"), "run"]);
    command.args(["--manifests".as_ref(), manifest.as_os_str()]);
    command.args(["--vip-link", LINK, "--vip-link-kind", "bridge", "--admin", "off"]);
    command.args(["--announce-interface", &network.pod_link()]);
    command.args(["--workers", "1", "--shutdown-grace", "1s", "--log-level", "warn"]);
    // `ip netns exec` execs ringlb itself, so signals reach it; the admin address is unused.
    let ringlb = Ringlb::spawn(command, SocketAddr::from(([127, 0, 0, 1], 0)));

    poll_until("the host's entry for the VIP to follow the gratuitous ARP", || {
        (neighbour(&network, first).as_deref() == Some(ours.as_str())).then_some(())
    });
    // From the host, across the veth: only a local address of the namespace answers ARP.
    let (name, _) =
        poll_until("the VIP to answer from the host", || greeting(SocketAddr::new(first, 80)).ok());
    assert_eq!(name, "pod-a");
    assert!(link_addresses(&network).contains(&format!("{first}/32")));

    save(&manifest, &web(second));
    poll_until("the link to follow the manifest", || {
        let shown = link_addresses(&network);
        (shown.contains(&format!("{second}/32")) && !shown.contains(&format!("{first}/32"))).then_some(())
    });
    poll_until("the entry for the new VIP to follow", || {
        (neighbour(&network, second).as_deref() == Some(ours.as_str())).then_some(())
    });
    let (name, _) = poll_until("the new VIP to answer", || greeting(SocketAddr::new(second, 80)).ok());
    assert_eq!(name, "pod-a");

    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits 0 on SIGTERM: {status}");
    let gone = ip_in(&network, &["link", "show", "dev", LINK]);
    assert!(
        !gone.status.success(),
        "the link ringlb created is deleted: {}",
        String::from_utf8_lossy(&gone.stdout)
    );
}

#[test]
fn on_a_tun_vip_link_the_vips_of_a_sigkilled_ringlb_go_with_it() {
    let network = PodNetwork::create().expect("a network namespace");
    let backend =
        network.enter(|| named_server_on(SocketAddr::from(([127, 0, 0, 1], 0)), "pod-a")).expect("a backend");
    let stopped_in_namespace = InNamespace { network: &network, server: Some(backend) };
    let backend = stopped_in_namespace.server.as_ref().expect("just made");
    let vip = vip_in(&network, 252);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let manifest = dir.path().join("services.yaml");
    let web = support::web_manifest(
        SocketAddr::new(vip, 80),
        backend.addr().port(),
        &[(backend.addr().ip(), true)],
    );
    save(&manifest, &web);
    let mut command = Command::new("ip");
    command.args(["netns", "exec", network.name(), env!("CARGO_BIN_EXE_ringlb"), "run"]);
    command.args(["--manifests".as_ref(), manifest.as_os_str()]);
    command.args(["--vip-link", LINK, "--vip-link-kind", "tun", "--admin", "off"]);
    command.args(["--workers", "1", "--shutdown-grace", "1s", "--log-level", "warn"]);
    let ringlb = Ringlb::spawn(command, SocketAddr::from(([127, 0, 0, 1], 0)));
    // The namespace's kernel takes the VIP as local on the TUN link and answers ARP for it.
    let (name, _) = poll_until("the VIP on the TUN link to answer from the host", || {
        greeting(SocketAddr::new(vip, 80)).ok()
    });
    assert_eq!(name, "pod-a");
    let shown = link_addresses(&network);
    assert!(shown.contains(&format!("{vip}/32")), "{shown}");
    let link =
        String::from_utf8_lossy(&ip_in(&network, &["-d", "link", "show", "dev", LINK]).stdout).into_owned();
    assert!(link.contains("tun"), "a TUN interface: {link}");

    // No goodbye: the kernel closes the descriptor, and the link goes with every VIP on it.
    ringlb.signal(libc::SIGKILL);
    let status = ringlb.wait();
    assert!(!status.success(), "killed: {status}");
    let gone = ip_in(&network, &["link", "show", "dev", LINK]);
    assert!(!gone.status.success(), "the link is gone: {}", String::from_utf8_lossy(&gone.stdout));
    let local = ip_in(&network, &["route", "show", "table", "local", &vip.to_string()]);
    assert_eq!(String::from_utf8_lossy(&local.stdout).trim(), "", "no local route is left for the VIP");
}

/// A server made inside the namespace, stopped there too (it stops by connecting to itself), also
/// when the test fails.
struct InNamespace<'n> {
    network: &'n PodNetwork,
    server: Option<testkit::backends::Server>,
}

impl Drop for InNamespace<'_> {
    fn drop(&mut self) {
        let server = self.server.take();
        self.network.enter(move || drop(server));
    }
}
