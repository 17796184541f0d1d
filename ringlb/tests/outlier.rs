//! End-to-end passive outlier detection: `ringlb run` ejects a backend whose EndpointSlice says ready
//! but whose port refuses connections, after `ringlb.io/outlier-consecutive-failures` failed
//! connects seen by the datapath; new connections then no longer even try it until the back-off
//! ends; and never more than `ringlb.io/max-ejection-percent` of the backends are ejected at once.
//! Backends are real servers on 127.0.0.x sharing one port (a refusing backend is an address where
//! nothing listens on it). Every wait polls a real condition under a deadline.

mod support;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};

use support::{Ringlb, greeting, loopback, poll_until, port_free_on, save};
use testkit::backends::Server;

/// A Service `web` on `vip` with ready endpoints `ips` on `port`, ejecting after 2 consecutive
/// failures for `ejection` (no doubling beyond it), at most `percent` % of backends at once.
fn manifest(vip: SocketAddr, port: u16, ips: &[IpAddr], ejection: &str, percent: u8) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  annotations:\n    \
         ringlb.io/outlier-consecutive-failures: \"2\"\n    ringlb.io/outlier-base-ejection: {ejection}\n    \
         ringlb.io/outlier-max-ejection: {ejection}\n    ringlb.io/max-ejection-percent: \"{percent}\"\n\
         spec:\n  externalIPs: [\"{}\"]\n  ports:\n  - name: app\n    port: {}\n    targetPort: app\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc12\n  \
         namespace: shop\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n\
         - name: app\n  port: {port}\n  protocol: TCP\nendpoints:\n",
        vip.ip(),
        vip.port()
    );
    for ip in ips {
        text.push_str(&format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"));
    }
    text
}

/// A backend greeting every client with its name on one line.
fn backend(addr: SocketAddr, name: &'static str) -> Server {
    Server::spawn_on(addr, move |mut stream: TcpStream| {
        let _ = writeln!(stream, "{name}");
    })
    .expect("bind a backend")
}

/// Makes `count` connections through `vip`; each must be served by a listening backend.
fn connect_many(vip: SocketAddr, count: usize) {
    for _ in 0..count {
        let (name, _) = greeting(vip).expect("a connection through ringlb");
        assert!(name.starts_with("web-"), "served by a listening backend: {name:?}");
    }
}

fn connect_failures(ringlb: &Ringlb) -> u64 {
    let status = ringlb.status();
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    workers.iter().filter_map(|w| w["connect_failures"].as_u64()).sum()
}

fn ejected(ringlb: &Ringlb) -> u64 {
    ringlb.status()["health"]["ejected_backends"].as_u64().expect("/status shows ejected_backends")
}

#[test]
fn a_ready_backend_refusing_connections_is_ejected_then_tried_again_after_the_back_off() {
    let ips: Vec<_> = (81..=84).map(loopback).collect();
    let port = port_free_on(&ips);
    // 127.0.0.84 has nothing listening on `port`: connects to it are refused.
    let _backends: Vec<_> = ips[..3]
        .iter()
        .zip(["web-1", "web-2", "web-3"])
        .map(|(ip, name)| backend(SocketAddr::new(*ip, port), name))
        .collect();
    let vip = SocketAddr::new(loopback(80), port_free_on(&[loopback(80)]));
    let dir = tempfile::tempdir().expect("temp dir");
    save(&dir.path().join("web.yaml"), &manifest(vip, port, &ips, "5s", 50));

    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    assert_eq!(ejected(&ringlb), 0);
    let first_version = ringlb.status()["snapshot"]["version"].as_u64().expect("snapshot version");

    poll_until("the refusing backend to be ejected", || {
        connect_many(vip, 4);
        (ejected(&ringlb) == 1).then_some(())
    });
    // The verdict is counted before the snapshot carrying it is published: wait for the publish.
    poll_until("the snapshot without the ejected backend", || {
        (ringlb.status()["snapshot"]["version"].as_u64() > Some(first_version)).then_some(())
    });
    let status = ringlb.status();
    assert!(status["health"]["ejections"].as_u64().is_some_and(|n| n >= 1), "{status}");
    assert!(status["health"]["backend_events"].as_u64().is_some_and(|n| n >= 2), "{status}");
    // While ejected (5 s, far longer than these connections take), it is not even tried.
    let failures = connect_failures(&ringlb);
    connect_many(vip, 12);
    assert_eq!(connect_failures(&ringlb), failures, "an ejected backend got connect attempts");
    assert_eq!(ejected(&ringlb), 1, "still ejected while the check ran");

    // After the back-off it is tried again (and fails again).
    poll_until("the ejection to end", || (ejected(&ringlb) == 0).then_some(()));
    poll_until("the backend to be tried again", || {
        connect_many(vip, 4);
        (connect_failures(&ringlb) > failures).then_some(())
    });

    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits cleanly on SIGTERM: {status}");
}

#[test]
fn outlier_detection_never_ejects_more_than_max_ejection_percent_of_the_backends() {
    let ips: Vec<_> = (86..=89).map(loopback).collect();
    let port = port_free_on(&ips);
    // Two of four refuse; 25 % allows one ejection at a time.
    let _backends: Vec<_> = ips[..2]
        .iter()
        .zip(["web-1", "web-2"])
        .map(|(ip, name)| backend(SocketAddr::new(*ip, port), name))
        .collect();
    let vip = SocketAddr::new(loopback(85), port_free_on(&[loopback(85)]));
    let dir = tempfile::tempdir().expect("temp dir");
    save(&dir.path().join("web.yaml"), &manifest(vip, port, &ips, "30s", 25));

    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    poll_until("one refusing backend to be ejected", || {
        connect_many(vip, 4);
        (ejected(&ringlb) == 1).then_some(())
    });
    // The other refusing backend keeps failing well past the threshold, yet stays in.
    let failures = connect_failures(&ringlb);
    poll_until("the other refusing backend to fail repeatedly", || {
        connect_many(vip, 4);
        assert!(ejected(&ringlb) <= 1, "more than 25 % of the backends ejected");
        (connect_failures(&ringlb) >= failures + 4).then_some(())
    });
    let status = ringlb.status();
    assert_eq!(status["health"]["ejected_backends"], 1, "{status}");
    assert_eq!(status["health"]["ejections"], 1, "{status}");

    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits cleanly on SIGTERM: {status}");
}
