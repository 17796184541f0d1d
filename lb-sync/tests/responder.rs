//! Answers where the kernel gives none: in a lab, a host holds two VIPs (IPv4 and IPv6) on a
//! port-less bridge and ignores ARP requests for addresses of other links (`arp_ignore=1`, as
//! kube-proxy's IPVS mode sets it); Linux never answers a neighbour solicitation for an address
//! of another link. A neighbour on the segment first cannot reach either VIP, then reaches both
//! once the responder answers for them, at the host's MAC, and no longer once they are released.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lb_sync::announce::Announcer;
use lb_sync::announce::responder::{self, Responder};
use testkit::lab::{Host, Lab};

/// Long enough for address resolution to finish when anyone answers (milliseconds here), short
/// enough for the unanswered cases.
const CONNECT: Duration = Duration::from_millis(1500);

/// The multicast groups `interface` of `host` is in (`ip -6 maddr`).
fn groups(host: &Host, interface: &str) -> String {
    let output = host.command("ip").args(["-6", "maddr", "show", "dev", interface]).output().expect("run ip");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The solicited-node group of `vip`, as `ip maddr` prints it.
fn solicited_node_group(vip: IpAddr) -> String {
    let IpAddr::V6(vip) = vip else { unreachable!("an IPv6 VIP") };
    format!("inet6 {}\n", responder::solicited_node(vip))
}

/// Polls `condition` every 10 ms for at most 10 s.
fn poll_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10)); // the polling interval, not synchronisation
    }
}

fn connects(from: &Host, to: SocketAddr) -> bool {
    from.enter(|| TcpStream::connect_timeout(&to, CONNECT).is_ok())
}

#[test]
fn held_vips_are_answered_for_when_the_kernel_would_not_and_released_ones_are_not() {
    let lab = Lab::create().expect("a lab");
    let segment = lab.segment().expect("a segment");
    let (holder, asker) = (lab.host("holder").expect("a host"), lab.host("asker").expect("a host"));
    lab.join(&holder, &segment).expect("join");
    lab.join(&asker, &segment).expect("join");
    let interface = segment.interface();
    let (v4, v6) = (segment.spare(0), segment.spare6(0));
    holder.ip(&["link", "add", "vips", "type", "bridge"]).expect("a VIP link");
    holder.ip(&["link", "set", "vips", "up"]).expect("up");
    holder.ip(&["addr", "add", &format!("{v4}/32"), "dev", "vips"]).expect("the IPv4 VIP");
    holder.ip(&["addr", "add", &format!("{v6}/128"), "dev", "vips", "nodad"]).expect("the IPv6 VIP");
    for scope in ["all", interface.as_str()] {
        holder.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1").expect("arp_ignore");
    }
    let listeners: Vec<TcpListener> = holder
        .enter(|| [v4, v6].map(|vip| TcpListener::bind(SocketAddr::new(vip, 80)).expect("bind")).into());
    let (v4, v6) = (SocketAddr::new(v4, 80), SocketAddr::new(v6, 80));
    assert!(!connects(&asker, v4), "the kernel answers no ARP request for {v4} under arp_ignore=1");
    assert!(!connects(&asker, v6), "the kernel answers no solicitation for {v6} on another link");

    let mac = holder.mac(&interface).expect("a MAC");
    let group = solicited_node_group(v6.ip());
    let (held, watched) = tokio::sync::watch::channel(BTreeSet::from([v4.ip(), v6.ip()]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (started, counters) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let (interface, holder) = (interface.as_str(), &holder);
        scope.spawn(move || {
            holder.enter(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                runtime.block_on(async move {
                    let announcer = Arc::new(Announcer::new(interface).expect("an announcer"));
                    let responder = Responder::new(announcer).expect("a responder");
                    started.send(responder.counters()).expect("the test waits");
                    responder.run(watched, stopped).await;
                });
            })
        });
        let counters = counters.recv().expect("the responder started");
        // The responder takes the held set in before it waits: its solicited-node group shows it.
        poll_until("the responder to join the VIP's solicited-node group", || {
            groups(holder, interface).contains(&group)
        });
        // Forget the failed resolutions of the first attempts, which would still be retrying.
        asker.ip(&["neigh", "flush", "dev", interface]).expect("flush the asker's neighbours");
        for vip in [v4, v6] {
            assert!(connects(&asker, vip), "{vip} answers once the responder does");
            assert_eq!(asker.neighbour(vip.ip(), interface), Some(mac.clone()), "{vip} at the holder's MAC");
        }
        assert!(counters.arp_replies.load(Ordering::Relaxed) >= 1);
        assert!(counters.neighbour_advertisements.load(Ordering::Relaxed) >= 1);

        held.send_replace(BTreeSet::new());
        poll_until("the responder to leave the group", || !groups(holder, interface).contains(&group));
        asker.ip(&["neigh", "flush", "dev", interface]).expect("flush the asker's neighbours");
        for vip in [v4, v6] {
            assert!(!connects(&asker, vip), "{vip} is no longer answered for once released");
        }
        stop.send(()).expect("the responder runs");
    });
    drop(listeners);
}
