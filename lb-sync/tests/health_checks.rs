//! Active health checks (`ringlb.io/health-check`) over real loopback sockets: a backend that fails
//! its probes stops being eligible in a published snapshot while Kubernetes still calls it ready,
//! comes back after `rise` successes, survives manifest reloads as a verdict, and never empties an
//! entry (panic mode). Every wait is bounded by a deadline; intervals are 50 ms.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use lb_core::Snapshot;
use support::{MUST_HAPPEN_WITHIN, ManifestDir, Running, eligible, events_only_source, slice_header, until};
use testkit::backends::Server;
use tokio::time::Instant;

const VIP: &str = "127.0.0.60:80";

/// A Service `shop/web` on [`VIP`] with `annotations` and one slice whose endpoints are `ips`
/// (all ready) on `port`.
fn manifest(check: &str, port: u16, ips: &[&str]) -> String {
    let endpoints: String =
        ips.iter().map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions:\n    ready: true\n")).collect();
    let slice = slice_header("shop", "web-abcde", "web").replace("port: 8080", &format!("port: {port}"));
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations:
    ringlb.io/health-check: \"{check}\"
    ringlb.io/health-interval: 50ms
    ringlb.io/health-timeout: 500ms
    ringlb.io/health-rise: \"2\"
    ringlb.io/health-fall: \"2\"
spec:
  externalIPs: [\"127.0.0.60\"]
  ports:
  - name: http
    port: 80
    targetPort: {port}
---
{slice}endpoints:
{endpoints}"
    )
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("test IPs are valid"), port)
}

/// A server on `addr` that accepts connections and closes them (enough for a TCP check).
fn accepting(addr: SocketAddr) -> Server {
    Server::spawn_on(addr, drop).expect("bind a test backend")
}

/// An HTTP server on `addr` answering every request with the status held in `status`.
fn http_server(addr: SocketAddr, status: Arc<AtomicU16>) -> Server {
    Server::spawn_on(addr, move |mut stream: TcpStream| {
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let code = status.load(Ordering::Acquire);
        let _ = write!(stream, "HTTP/1.1 {code} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    })
    .expect("bind a test HTTP backend")
}

/// A port on 127.0.0.2 that is free on 127.0.0.3 as well, so the same port serves a live backend
/// on .2 and a closed one on .3 (pods behind one EndpointSlice port).
fn live_and_closed() -> (Server, u16) {
    for _ in 0..20 {
        let live = accepting(addr("127.0.0.2", 0));
        let port = live.addr().port();
        if TcpListener::bind(addr("127.0.0.3", port)).is_ok() {
            return (live, port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Receives snapshots until one has exactly `expected` eligible on [`VIP`]; checks versions only
/// increase and that no snapshot on the way left the entry without an eligible backend.
async fn until_eligible(running: &mut Running, expected: &[SocketAddr]) -> Arc<Snapshot> {
    let deadline = Instant::now() + MUST_HAPPEN_WITHIN;
    let mut version = 0;
    loop {
        assert!(Instant::now() < deadline, "no snapshot with eligible {expected:?} in time");
        let snapshot = running.next_snapshot().await;
        assert!(snapshot.version > version, "versions must increase");
        version = snapshot.version;
        let now = eligible(&snapshot, VIP);
        assert!(!now.is_empty(), "snapshot v{version} left {VIP} without a backend");
        if now == expected {
            return snapshot;
        }
    }
}

#[tokio::test]
async fn a_closed_port_is_ejected_by_tcp_checks_and_returns_when_it_listens() {
    let (live, port) = live_and_closed();
    let manifests = ManifestDir::with_file(&manifest("tcp", port, &["127.0.0.2", "127.0.0.3"]));
    let source = events_only_source(&manifests.file());
    let mut running = Running::start(source);
    let status = running.health.clone();
    let (up, down) = (live.addr(), addr("127.0.0.3", port));

    let first = running.next_snapshot().await;
    assert_eq!(eligible(&first, VIP), vec![up, down], "Kubernetes says both are ready");
    let ejected = until_eligible(&mut running, &[up]).await;
    assert!(ejected.version > first.version);
    assert_eq!(status.unhealthy_backends(), 1);
    assert!(status.probes_failed() >= 2, "fall is 2");

    let _revived = accepting(down);
    until_eligible(&mut running, &[up, down]).await;
    until(&status, "no backend unhealthy", |s| s.unhealthy_backends() == 0).await;
    running.stop().await;
}

#[tokio::test]
async fn http_checks_eject_a_backend_answering_503_and_take_it_back_on_200() {
    let healthy = Arc::new(AtomicU16::new(200));
    let failing = Arc::new(AtomicU16::new(503));
    let (first_backend, port) = {
        let (probe, port) = live_and_closed();
        drop(probe);
        (http_server(addr("127.0.0.2", port), Arc::clone(&healthy)), port)
    };
    let _second = http_server(addr("127.0.0.3", port), Arc::clone(&failing));
    let (up, down) = (first_backend.addr(), addr("127.0.0.3", port));
    let manifests = ManifestDir::with_file(&manifest("http:/healthz", port, &["127.0.0.2", "127.0.0.3"]));
    let mut running = Running::start(events_only_source(&manifests.file()));

    assert_eq!(eligible(&*running.next_snapshot().await, VIP), vec![up, down]);
    until_eligible(&mut running, &[up]).await;
    failing.store(200, Ordering::Release);
    until_eligible(&mut running, &[up, down]).await;
    running.stop().await;
}

#[tokio::test]
async fn a_manifest_reload_keeps_the_verdicts_of_the_health_checks() {
    let (live, port) = live_and_closed();
    let other = accepting(addr("127.0.0.4", port));
    let manifests = ManifestDir::with_file(&manifest("tcp", port, &["127.0.0.2", "127.0.0.3"]));
    let mut running = Running::start(events_only_source(&manifests.file()));
    let up = live.addr();
    until_eligible(&mut running, &[up]).await;

    std::fs::write(manifests.file(), manifest("tcp", port, &["127.0.0.2", "127.0.0.3", "127.0.0.4"]))
        .expect("add an endpoint");
    let reloaded = running.next_snapshot().await;
    assert_eq!(eligible(&reloaded, VIP), vec![up, other.addr()], "the rebuild applies the overlay");
    running.stop().await;
}

#[tokio::test]
async fn when_every_backend_fails_its_checks_panic_mode_keeps_them_all_eligible() {
    let (live, port) = live_and_closed();
    drop(live);
    let closed = [addr("127.0.0.2", port), addr("127.0.0.3", port)];
    let manifests = ManifestDir::with_file(&manifest("tcp", port, &["127.0.0.2", "127.0.0.3"]));
    let source = events_only_source(&manifests.file());
    let mut running = Running::start(source);
    let status = running.health.clone();
    assert_eq!(eligible(&*running.next_snapshot().await, VIP), closed);

    until(&status, "both backends unhealthy", |s| s.unhealthy_backends() == 2).await;
    // Whatever was published meanwhile (one ejection may have preceded the other) must end with
    // both eligible again, never with none.
    let mut last = closed.to_vec();
    while let Ok(snapshot) = running.snapshots.try_recv() {
        last = eligible(&snapshot, VIP);
        assert!(!last.is_empty(), "snapshot v{} emptied {VIP}", snapshot.version);
    }
    if last != closed {
        until_eligible(&mut running, &closed).await;
    }
    running.stop().await;
}

#[tokio::test]
async fn an_http_backend_that_accepts_but_never_answers_is_ejected_by_probe_timeouts() {
    let (live, port) = live_and_closed();
    // Holds every connection open without a word until the prober gives up and closes it.
    let _silent = Server::spawn_on(addr("127.0.0.3", port), |mut stream: TcpStream| {
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    })
    .expect("bind a silent backend");
    drop(live);
    let answering = http_server(addr("127.0.0.2", port), Arc::new(AtomicU16::new(200)));
    let text = manifest("http:/healthz", port, &["127.0.0.2", "127.0.0.3"]).replace("500ms", "100ms");
    let manifests = ManifestDir::with_file(&text);
    let source = events_only_source(&manifests.file());
    let mut running = Running::start(source);
    let status = running.health.clone();

    until_eligible(&mut running, &[answering.addr()]).await;
    assert_eq!(status.unhealthy_backends(), 1);
    running.stop().await;
}
