//! End-to-end: `ringlb run` with `ringlb.io/health-check: http:/healthz` stops sending new
//! connections to a backend whose health endpoint fails while its EndpointSlice still says ready,
//! and sends them again once it passes. Backends are real HTTP servers on 127.0.0.x; probes go to
//! the same port as traffic. Every wait polls a real condition under a deadline.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use support::{Ringlb, http_get, loopback, poll_until, port_free_on, save};
use testkit::backends::Server;

/// A Service `web` on `vip` checked by `GET /healthz` every 50 ms, with ready endpoints `ips`.
fn manifest(vip: SocketAddr, port: u16, ips: &[IpAddr]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  annotations:\n    \
         ringlb.io/health-check: http:/healthz\n    ringlb.io/health-interval: 50ms\n    \
         ringlb.io/health-timeout: 1s\n    ringlb.io/health-fall: \"2\"\n    ringlb.io/health-rise: \"2\"\n\
         spec:\n  externalIPs: [\"{}\"]\n  ports:\n  - name: http\n    port: {}\n    targetPort: http\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc12\n  \
         namespace: shop\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n\
         - name: http\n  port: {port}\n  protocol: TCP\nendpoints:\n",
        vip.ip(),
        vip.port()
    );
    for ip in ips {
        text.push_str(&format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"));
    }
    text
}

/// An HTTP backend: `/healthz` answers the status in `health`; any other path answers 200 with
/// `name` as the body.
fn backend(addr: SocketAddr, name: &'static str, health: Arc<AtomicU16>) -> Server {
    Server::spawn_on(addr, move |mut stream: TcpStream| {
        let mut request = Vec::new();
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&chunk[..n]),
            }
        }
        let (status, body) = if request.starts_with(b"GET /healthz ") {
            (health.load(Ordering::Acquire), "")
        } else {
            (200, name)
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status} Test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    })
    .expect("bind a backend")
}

/// Makes `count` requests through `vip` and counts the answering backends by name.
fn spread(vip: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let (status, name) = http_get(vip, "/whoami").expect("a request through ringlb");
        assert_eq!(status, 200);
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

#[test]
fn a_ready_backend_failing_its_http_health_check_gets_no_new_connections_until_it_passes() {
    let ips: Vec<_> = (71..=73).map(loopback).collect();
    let port = port_free_on(&ips);
    let health: Vec<_> = (0..3).map(|_| Arc::new(AtomicU16::new(200))).collect();
    let _backends: Vec<_> = ips
        .iter()
        .zip(["web-1", "web-2", "web-3"])
        .zip(&health)
        .map(|((ip, name), health)| backend(SocketAddr::new(*ip, port), name, Arc::clone(health)))
        .collect();
    let vip = SocketAddr::new(loopback(70), port_free_on(&[loopback(70)]));
    let dir = tempfile::tempdir().expect("temp dir");
    save(&dir.path().join("web.yaml"), &manifest(vip, port, &ips));

    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    let seen = spread(vip, 30);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web-1", "web-2", "web-3"], "all healthy: {seen:?}");

    health[1].store(503, Ordering::Release);
    poll_until("web-2 to be ejected", || {
        let seen = spread(vip, 9);
        (!seen.contains_key("web-2")).then_some(())
    });
    let seen = spread(vip, 30);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web-1", "web-3"], "web-2 fails /healthz: {seen:?}");
    let status = ringlb.status();
    assert_eq!(status["health"]["unhealthy_backends"], 1, "{status}");
    assert_eq!(status["health"]["checked_backends"], 3, "{status}");
    assert!(status["health"]["probes_failed"].as_u64().is_some_and(|n| n >= 2), "{status}");

    health[1].store(200, Ordering::Release);
    poll_until("web-2 to be back", || spread(vip, 9).contains_key("web-2").then_some(()));
    poll_until("/status to show no unhealthy backend", || {
        (ringlb.status()["health"]["unhealthy_backends"] == 0).then_some(())
    });

    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits cleanly on SIGTERM: {status}");
}
