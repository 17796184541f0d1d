//! Connection limits end to end: `ringlb.io/max-connections` caps a VIP key's open connections
//! over both workers, `ringlb.io/max-backend-connections` passes full backends over and refuses a
//! client only when every backend is full, `ringlb.io/client-connection-rate` (with its burst)
//! caps one client's new connections; every refusal is a reset, counted by reason in `/metrics`,
//! and a freed slot serves again. Backends are echo servers on 127.0.0.x; every wait polls a real
//! condition under a deadline.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use support::{IO_TIMEOUT, Ringlb, loopback, poll_until, port_free_on, save, web_manifest};
use testkit::backends::Server;

fn echo_on(addr: SocketAddr) -> Server {
    Server::spawn_on(addr, |mut stream: TcpStream| {
        let mut reader = stream.try_clone().expect("clone");
        let _ = std::io::copy(&mut reader, &mut stream);
    })
    .expect("bind an echo backend")
}

/// `web_manifest` with `annotations` on the Service.
fn annotated(
    vip: SocketAddr,
    port: u16,
    endpoints: &[(IpAddr, bool)],
    annotations: &[(&str, &str)],
) -> String {
    let mut block = String::from("  annotations:\n");
    for (name, value) in annotations {
        block.push_str(&format!("    {name}: \"{value}\"\n"));
    }
    web_manifest(vip, port, endpoints).replacen(
        "  namespace: shop\nspec:",
        &format!("  namespace: shop\n{block}spec:"),
        1,
    )
}

/// A connection through ringlb and whether it is served: an echo comes back (`Some(stream)`,
/// held open), or ringlb reset it (`None`).
fn served(vip: SocketAddr) -> Option<TcpStream> {
    // A reset can already reach the client's connect (ringlb accepts and resets at once).
    let mut stream = match TcpStream::connect_timeout(&vip, IO_TIMEOUT) {
        Ok(stream) => stream,
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(error) => panic!("the VIP accepts: {error}"),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    if stream.write_all(b"ping").is_err() {
        return None;
    }
    let mut echo = [0u8; 4];
    match stream.read_exact(&mut echo) {
        Ok(()) => {
            assert_eq!(&echo, b"ping");
            Some(stream)
        }
        Err(error) => {
            assert!(
                matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ),
                "a refused client is reset, not left hanging: {error}"
            );
            None
        }
    }
}

fn start(manifest: &str) -> (Ringlb, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    save(&dir.path().join("web.yaml"), manifest);
    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    (ringlb, dir)
}

fn refused_line(vip: SocketAddr, reason: &str, count: u64) -> String {
    format!(
        "ringlb_refused_total{{namespace=\"shop\",service=\"web\",vip=\"{}\",port=\"{}\",protocol=\"tcp\",reason=\"{reason}\"}} {count}",
        vip.ip(),
        vip.port()
    )
}

#[test]
fn max_connections_caps_a_vip_over_every_worker_and_a_closed_one_frees_its_slot() {
    let ip = loopback(131);
    let port = port_free_on(&[ip]);
    let _backend = echo_on(SocketAddr::new(ip, port));
    let vip = SocketAddr::new(loopback(130), port_free_on(&[loopback(130)]));
    let (ringlb, _dir) = start(&annotated(vip, port, &[(ip, true)], &[("ringlb.io/max-connections", "3")]));

    // Five clients connect from different source ports: both workers take some of them.
    let held: Vec<_> = (0..5).filter_map(|_| served(vip)).collect();
    assert_eq!(held.len(), 3, "three open connections at most, whichever worker accepted them");
    ringlb.wait_metric(&refused_line(vip, "vip_limit", 2));
    drop(held);
    // Closed connections free their slots (ringlb sees the close a little later).
    poll_until("a freed slot to serve again", || served(vip));
}

#[test]
fn full_backends_are_passed_over_and_a_client_is_refused_only_when_all_are_full() {
    let ips = [loopback(133), loopback(134)];
    let port = port_free_on(&ips);
    let _backends: Vec<_> = ips.iter().map(|ip| echo_on(SocketAddr::new(*ip, port))).collect();
    let vip = SocketAddr::new(loopback(132), port_free_on(&[loopback(132)]));
    let manifest = annotated(
        vip,
        port,
        &[(ips[0], true), (ips[1], true)],
        &[("ringlb.io/max-backend-connections", "2"), ("ringlb.io/scheduler", "rr")],
    );
    let (ringlb, _dir) = start(&manifest);

    let held: Vec<_> = (0..4).map(|_| served(vip).expect("room on some backend")).collect();
    assert!(served(vip).is_none(), "every backend holds its two");
    ringlb.wait_metric(&refused_line(vip, "backend_limit", 1));
    let backends = support::http_get_response(ringlb.admin, "/backends").expect("GET /backends").json();
    let active: Vec<_> = backends["entries"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["active"].as_u64().unwrap_or(99))
        .collect();
    assert_eq!(active, [2, 2], "{backends}");
    drop(held);
    poll_until("a freed backend to serve again", || served(vip));
}

#[test]
fn a_client_over_its_connection_rate_is_refused_and_counted() {
    let ip = loopback(136);
    let port = port_free_on(&[ip]);
    let _backend = echo_on(SocketAddr::new(ip, port));
    let vip = SocketAddr::new(loopback(135), port_free_on(&[loopback(135)]));
    let manifest = annotated(
        vip,
        port,
        &[(ip, true)],
        &[("ringlb.io/client-connection-rate", "1"), ("ringlb.io/client-connection-burst", "3")],
    );
    let (ringlb, _dir) = start(&manifest);

    let started = std::time::Instant::now();
    let admitted = (0..10).filter(|_| served(vip).is_some()).count();
    let took = started.elapsed();
    // The burst of three, and one more token per second the loop took.
    let refills = took.as_secs() as usize;
    assert!((3..=3 + refills).contains(&admitted), "{admitted} admitted in {took:?}");
    ringlb.wait_metric(&refused_line(vip, "client_rate", (10 - admitted) as u64));
    // Its bucket refills (a refused attempt takes no token).
    poll_until("the bucket to refill", || served(vip));
}
