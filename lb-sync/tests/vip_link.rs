//! The VIP link through real netlink, inside a network namespace of the test's own: addresses
//! appear and go as the wanted set changes (a socket binds them without `IP_FREEBIND` exactly
//! while they are there), an address ringlb did not add is never touched, a restart adopts what
//! the previous run left (told apart by their `IFA_PROTO` tag, which Debian 12's iproute2 cannot
//! show), and closing removes ringlb's addresses and the link it created.
//! Acquired VIPs of both families are announced, and the host's neighbour entries follow.
//! Bridges stand in for dummy links: this machine's kernel has no dummy driver.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::process::Command;

use lb_sync::announce::Announcer;
use lb_sync::vip_link::{self, LinkKind, VipLink, VipLinkConfig};
use testkit::pods::PodNetwork;

const LINK: &str = "ringlb-vips";

fn config() -> VipLinkConfig {
    VipLinkConfig { name: LINK.to_owned(), kind: LinkKind::Bridge }
}

fn vip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn set(addresses: &[IpAddr]) -> BTreeSet<IpAddr> {
    addresses.iter().copied().collect()
}

/// Whether a socket can bind `address` (only a local address can be bound without freebind).
fn bindable(address: IpAddr) -> bool {
    TcpListener::bind(SocketAddr::new(address, 0)).is_ok()
}

/// `ip` inside the current thread's namespace (a child inherits it).
fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(output.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn link_exists() -> bool {
    Command::new("ip").args(["link", "show", "dev", LINK]).output().expect("run ip").status.success()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

#[test]
fn vips_come_and_go_with_the_wanted_set_and_close_leaves_nothing_of_ringlbs() {
    let network = PodNetwork::create().expect("a network namespace");
    network.enter(|| {
        runtime().block_on(async {
            assert!(!link_exists());
            let mut link = VipLink::open(&config()).await.expect("open the VIP link");
            assert!(link_exists(), "the link is created");
            let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7));
            assert!(!bindable(vip(1)) && !bindable(v6));

            link.set(&set(&[vip(1), vip(2), v6])).await.expect("add three VIPs");
            assert!(bindable(vip(1)) && bindable(vip(2)), "IPv4 VIPs are local addresses now");
            assert!(bindable(v6), "an IPv6 VIP is usable at once (no duplicate address detection)");
            let shown = ip(&["address", "show", "dev", LINK]);
            assert!(shown.contains("192.0.2.1/32") && shown.contains("2001:db8::7/128"), "{shown}");

            link.set(&set(&[vip(2)])).await.expect("drop two VIPs");
            assert!(!bindable(vip(1)) && !bindable(v6) && bindable(vip(2)));
            assert_eq!(link.addresses(), &set(&[vip(2)]));

            link.close().await.expect("close");
            assert!(!bindable(vip(2)), "closing removes the VIPs");
            assert!(!link_exists(), "the link ringlb created is deleted");
        })
    });
}

#[test]
fn an_address_ringlb_did_not_add_is_never_touched_and_a_restart_adopts_its_own() {
    let network = PodNetwork::create().expect("a network namespace");
    network.enter(|| {
        runtime().block_on(async {
            // The operator made the link and put an address on it, one that is also a VIP.
            ip(&["link", "add", LINK, "type", "bridge"]);
            ip(&["address", "add", "192.0.2.9/32", "dev", LINK]);
            let mut link = VipLink::open(&config()).await.expect("open the operator's link");
            link.set(&set(&[vip(9), vip(3)])).await.expect("serve two VIPs");
            assert_eq!(link.addresses(), &set(&[vip(3)]), "192.0.2.9 stays the operator's");
            link.set(&BTreeSet::new()).await.expect("serve none");
            assert!(bindable(vip(9)), "the operator's address is still there");

            // A run that ended without closing (a crash) left 192.0.2.4 behind.
            link.set(&set(&[vip(4)])).await.expect("serve one");
            drop(link);
            let mut restarted = VipLink::open(&config()).await.expect("open again");
            assert_eq!(restarted.addresses(), &set(&[vip(4)]), "the tag tells ringlb's addresses apart");
            restarted.set(&set(&[vip(5)])).await.expect("serve another");
            assert!(!bindable(vip(4)) && bindable(vip(5)));

            restarted.close().await.expect("close");
            assert!(link_exists(), "a link ringlb did not create stays");
            assert!(bindable(vip(9)) && !bindable(vip(5)));
        })
    });
}

#[test]
fn the_run_loop_follows_the_wanted_set_and_releases_on_stop() {
    let network = PodNetwork::create().expect("a network namespace");
    network.enter(|| {
        runtime().block_on(async {
            let link = VipLink::open(&config()).await.expect("open the VIP link");
            let (wanted, watched) = tokio::sync::watch::channel(set(&[vip(6)]));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(vip_link::run(link, None, watched, BTreeSet::clone, stopped));
            until(|shown| shown.contains("192.0.2.6/32")).await;
            wanted.send_replace(set(&[vip(7)]));
            until(|shown| shown.contains("192.0.2.7/32") && !shown.contains("192.0.2.6/32")).await;
            stop.send(()).expect("the loop runs");
            task.await.expect("the loop ends");
            assert!(!link_exists(), "stopping releases the link");
        })
    });
}

/// Polls the link's addresses until `condition` holds; fails the test after 10 s.
async fn until(condition: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let shown = ip(&["address", "show", "dev", LINK]);
        if condition(&shown) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the link never got there: {shown}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[test]
fn acquired_vips_of_both_families_are_announced_and_the_hosts_neighbour_entries_follow() {
    let network = PodNetwork::create().expect("a network namespace");
    let (pod_link, host_link) = (network.pod_link(), network.host_link());
    let IpAddr::V4(host) = network.host_ip() else { unreachable!("the pod network is IPv4") };
    let [a, b, c, _] = host.octets();
    let v4 = IpAddr::V4(Ipv4Addr::new(a, b, c, 250));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, u16::from(b), u16::from(c), 0, 0, 0, 0x250));
    // The host believes both live at a stranger's MAC; a stale entry changes only when told.
    for vip in [v4, v6] {
        ip(&["neigh", "replace", &vip.to_string(), "lladdr", STRANGER, "dev", &host_link, "nud", "stale"]);
    }
    // An advertisement's source is the link-local address, usable once duplicate detection is over.
    let namespace = network.name().to_owned();
    let link_local_ready = || {
        let shown = ip(&["-n", &namespace, "-6", "address", "show", "dev", &pod_link]);
        shown.contains("fe80") && !shown.contains("tentative")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !link_local_ready() {
        assert!(std::time::Instant::now() < deadline, "the link-local address never left DAD");
        std::thread::sleep(std::time::Duration::from_millis(20)); // the polling interval
    }
    let ours = {
        let shown = ip(&["-n", &namespace, "link", "show", "dev", &pod_link]);
        let mut words = shown.split_whitespace();
        words.find(|word| *word == "link/ether").and_then(|_| words.next()).expect("a MAC").to_owned()
    };

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let path = format!("/run/netns/{namespace}");
    let announcing = std::thread::spawn(move || {
        let namespace = std::fs::File::open(path).expect("open the namespace");
        // SAFETY: setns(2) on a descriptor we own; it changes only this thread's namespace.
        let entered = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&namespace), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        runtime().block_on(async {
            let link = VipLink::open(&config()).await.expect("open the VIP link");
            let announcer = Announcer::new(&pod_link).expect("an announcer on the pod link");
            let (_wanted, watched) = tokio::sync::watch::channel(set(&[v4, v6]));
            vip_link::run(link, Some(std::sync::Arc::new(announcer)), watched, BTreeSet::clone, stopped)
                .await;
        });
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for vip in [v4, v6] {
        loop {
            let shown = ip(&["neigh", "show", &vip.to_string(), "dev", &host_link]);
            if shown.contains(&ours) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the host's entry for {vip} stayed: {shown}");
            std::thread::sleep(std::time::Duration::from_millis(20)); // the polling interval
        }
    }
    stop.send(()).expect("the loop runs");
    announcing.join().expect("the announcing thread");
}

const STRANGER: &str = "02:00:00:00:00:99";
