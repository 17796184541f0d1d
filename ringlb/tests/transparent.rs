//! Transparent mode (`ringlb.io/transparent`) end to end, in a lab of network namespaces: a client
//! on one segment, a backend host on another, and ringlb (the binary) in the router between them,
//! its VIP on the router's loopback. The backend's default route is the router, and the router
//! applies the README's policy routing ("Transparent mode"): replies addressed to the client that
//! belong to a transparent socket are marked by nftables and routed to the local host.
//!
//! Shown: through a transparent Service the backend sees the client's own IP (TCP and UDP), through
//! a normal one the router's address, and bytes relay both ways; without the `ip rule` the connect
//! times out within the Service's connect timeout and the client is reset (counted as a connect
//! failure, as the README says); without CAP_NET_ADMIN and CAP_NET_RAW a transparent Service's
//! clients are reset at once, counted as `local_transparent_failed` and never as a backend failure,
//! while its normal neighbour keeps serving. Every wait polls a real condition with a deadline.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{IO_TIMEOUT, Ringlb, poll_until, save, start_in, status_in, worker_sum};
use testkit::backends::{Server, UdpServer, peer_server_on};
use testkit::lab::{Host, Lab};

const BACKEND_PORT: u16 = 8080;
const UDP_BACKEND_PORT: u16 = 5353;
/// The transparent Services' VIP ports; the normal one's is `PLAIN`.
const TRANSPARENT: u16 = 80;
const PLAIN: u16 = 81;
const TRANSPARENT_UDP: u16 = 53;
const PLAIN_UDP: u16 = 54;
const ADMIN: &str = "127.0.0.1:9901";

/// How the router is set up for replies to the client's address.
#[derive(Clone, Copy, PartialEq)]
enum Routing {
    /// The README's recipe: fwmark rule, local route table, nftables `socket transparent` mark.
    Complete,
    /// The same without the `ip rule`: marked replies are forwarded to the client as any packet.
    NoRule,
}

struct Setup {
    _lab: Lab,
    client: Host,
    router: Host,
    backend: Host,
    client_ip: IpAddr,
    /// The router's address on the backends' segment: the source of non-transparent connects.
    router_ip: IpAddr,
    vip: IpAddr,
    server: Option<Server>,
    udp_server: Option<UdpServer>,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(routing: Routing) -> Setup {
        let lab = Lab::create().expect("a lab");
        let (clients, backends) = (lab.segment().expect("a segment"), lab.segment().expect("a segment"));
        let router = lab.host("router").expect("a host");
        let router_client_side = lab.join(&router, &clients).expect("join");
        let router_ip = lab.join(&router, &backends).expect("join");
        let client = lab.host("client").expect("a host");
        let client_ip = lab.join(&client, &clients).expect("join");
        let backend = lab.host("backend").expect("a host");
        let backend_ip = lab.join(&backend, &backends).expect("join");
        // The backend answers every address through the router, the client's included: the
        // first half of transparent mode's routing.
        client.ip(&["route", "add", "default", "via", &router_client_side.to_string()]).expect("route");
        backend.ip(&["route", "add", "default", "via", &router_ip.to_string()]).expect("route");
        router.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
        let vip = clients.spare(0);
        router.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"]).expect("the VIP");
        policy_routing(&router, routing);
        let server = backend
            .enter(|| peer_server_on(SocketAddr::new(backend_ip, BACKEND_PORT)))
            .expect("a TCP backend");
        let udp_server = backend
            .enter(|| {
                UdpServer::spawn_on(SocketAddr::new(backend_ip, UDP_BACKEND_PORT), |p| Some(p.to_vec()))
            })
            .expect("a UDP backend");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let manifest = dir.path().join("services.yaml");
        let services = [
            service("web-transparent", vip, TRANSPARENT, "TCP", BACKEND_PORT, backend_ip, "true"),
            service("web", vip, PLAIN, "TCP", BACKEND_PORT, backend_ip, "false"),
            service("dns-transparent", vip, TRANSPARENT_UDP, "UDP", UDP_BACKEND_PORT, backend_ip, "true"),
            service("dns", vip, PLAIN_UDP, "UDP", UDP_BACKEND_PORT, backend_ip, "false"),
        ];
        save(&manifest, &services.concat());
        Setup {
            _lab: lab,
            client,
            router,
            backend,
            client_ip,
            router_ip,
            vip,
            server: Some(server),
            udp_server: Some(udp_server),
            dir,
        }
    }

    /// Starts ringlb in the router, through `wrapper` (e.g. `setpriv …`) if given.
    fn start(&self, wrapper: &[&str], flags: &[&str]) -> Ringlb {
        let ringlb = env!("CARGO_BIN_EXE_ringlb");
        let mut command: Command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = self.router.command(program);
                command.args(args).arg(ringlb);
                command
            }
            None => self.router.command(ringlb),
        };
        command.arg("run").arg("--manifests").arg(self.dir.path().join("services.yaml"));
        command.args(["--admin", ADMIN, "--shutdown-grace", "1s", "--log-level", "warn"]);
        if !flags.contains(&"--workers") {
            command.args(["--workers", "2"]);
        }
        command.args(flags);
        start_in(&self.router, command, admin())
    }

    fn status(&self) -> serde_json::Value {
        status_in(&self.router, admin())
    }

    /// Connects from the client to the VIP's `port` and returns the source address the backend
    /// saw, and the stream.
    fn peer_seen(&self, port: u16) -> std::io::Result<(SocketAddr, TcpStream)> {
        let stream = self.connect(port)?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut line)?;
        let peer =
            line.trim_end().parse().map_err(|_| std::io::Error::other(format!("no address: {line:?}")))?;
        Ok((peer, stream))
    }

    /// A client connection to the VIP's `port` (accepted by ringlb's listener whatever follows).
    fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        let vip = SocketAddr::new(self.vip, port);
        self.client.enter(|| {
            let stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            Ok(stream)
        })
    }

    /// Sends a datagram from the client to the VIP's UDP `port`; true when its echo came back.
    fn udp_round_trip(&self, port: u16) -> bool {
        let vip = SocketAddr::new(self.vip, port);
        self.client.enter(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
            let mut buffer = [0u8; 64];
            socket.send_to(b"ping", vip).is_ok()
                && socket.recv_from(&mut buffer).is_ok_and(|(n, from)| &buffer[..n] == b"ping" && from == vip)
        })
    }

    /// The source IPs the UDP backend has seen (each client socket was a flow of its own).
    fn udp_peers(&self) -> BTreeSet<IpAddr> {
        let server = self.udp_server.as_ref().expect("running");
        server.peer_addrs().into_iter().map(|peer| peer.ip()).collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Servers made in a namespace stop by reaching themselves: from inside.
        let (server, udp_server) = (self.server.take(), self.udp_server.take());
        self.backend.enter(move || drop((server, udp_server)));
    }
}

fn admin() -> SocketAddr {
    ADMIN.parse().expect("literal")
}

/// The router's half of transparent mode's routing, as the README gives it.
fn policy_routing(router: &Host, routing: Routing) {
    if routing == Routing::Complete {
        router.ip(&["rule", "add", "fwmark", "0x1", "lookup", "100"]).expect("ip rule");
    }
    router.ip(&["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]).expect("ip route");
    let chain = "{ type filter hook prerouting priority mangle; policy accept; }";
    for rule in [
        &["add", "table", "inet", "ringlb"][..],
        &["add", "chain", "inet", "ringlb", "prerouting", chain],
        &[
            "add",
            "rule",
            "inet",
            "ringlb",
            "prerouting",
            "socket",
            "transparent",
            "1",
            "meta",
            "mark",
            "set",
            "0x1",
        ],
    ] {
        let output = router.command("nft").args(rule).output().expect("run nft");
        assert!(output.status.success(), "nft {rule:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// A Service with external IP `vip`:`port`/`protocol`, `ringlb.io/transparent: <transparent>`,
/// a connect timeout of 500 ms and one attempt (so a failing connect shows fast), and one
/// endpoint `backend`:`backend_port`.
fn service(
    name: &str,
    vip: IpAddr,
    port: u16,
    protocol: &str,
    backend_port: u16,
    backend: IpAddr,
    transparent: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n  annotations:\n    \
         ringlb.io/transparent: \"{transparent}\"\n    ringlb.io/connect-timeout: 500ms\n    \
         ringlb.io/connect-attempts: \"1\"\nspec:\n  externalIPs: [\"{vip}\"]\n  ports:\n  - name: p\n    \
         port: {port}\n    protocol: {protocol}\n    targetPort: {backend_port}\n---\napiVersion: \
         discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: shop\n  \
         labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: p\n  port: \
         {backend_port}\n  protocol: {protocol}\nendpoints:\n- addresses: [\"{backend}\"]\n  conditions: \
         {{ready: true}}\n---\n"
    )
}

/// Sends `len` bytes through `stream` (an echo behind it) from another thread, half-closes, and
/// checks that exactly those bytes come back before the echo's EOF.
fn echoes(stream: TcpStream, len: usize) {
    let sent: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut writer = stream.try_clone().expect("clone");
    let expected = sent.clone();
    let sending = std::thread::spawn(move || {
        writer.write_all(&sent).expect("send through the relay");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut received = Vec::with_capacity(len);
    (&stream).read_to_end(&mut received).expect("read the echo to its EOF");
    sending.join().expect("the sender");
    assert!(received == expected, "{} bytes came back for {len} sent, or different ones", received.len());
}

/// Whether the stream was ended by the peer without a byte (a reset, or an EOF).
fn refused(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!((&*stream).read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn through_a_transparent_service_the_backend_sees_the_client_and_through_a_normal_one_ringlb() {
    let setup = Setup::new(Routing::Complete);
    // The worker's own source ports serve the normal Services; transparent ones skip them.
    let _ringlb = setup.start(&[], &["--source-ports", "worker", "--source-port-range", "20000-29999"]);

    let (seen, stream) = setup.peer_seen(TRANSPARENT).expect("the transparent Service answers");
    assert_eq!(seen.ip(), setup.client_ip, "the backend sees the client's own address");
    echoes(stream, 1 << 20);
    let (seen, stream) = setup.peer_seen(PLAIN).expect("the normal Service answers");
    assert_eq!(seen.ip(), setup.router_ip, "the backend sees ringlb's address");
    echoes(stream, 1 << 20);
    // Many connections of one client at once each get their own port from the kernel.
    let streams: Vec<_> =
        (0..20).map(|_| setup.peer_seen(TRANSPARENT).expect("the transparent Service answers")).collect();
    let ports: BTreeSet<u16> = streams.iter().map(|(seen, _)| seen.port()).collect();
    assert_eq!(ports.len(), streams.len(), "each connection has a 4-tuple of its own");
    assert!(streams.iter().all(|(seen, _)| seen.ip() == setup.client_ip));

    poll_until("a UDP echo through the transparent Service", || {
        setup.udp_round_trip(TRANSPARENT_UDP).then_some(())
    });
    assert_eq!(setup.udp_peers(), BTreeSet::from([setup.client_ip]), "the UDP backend sees the client");
    poll_until("a UDP echo through the normal Service", || setup.udp_round_trip(PLAIN_UDP).then_some(()));
    assert_eq!(setup.udp_peers(), BTreeSet::from([setup.client_ip, setup.router_ip]));

    let status = setup.status();
    assert_eq!(worker_sum(&status, "local_transparent_failed"), 0, "{status}");
    assert_eq!(worker_sum(&status, "connect_failures"), 0, "{status}");
}

#[test]
fn without_the_ip_rule_a_transparent_connect_fails_within_its_connect_timeout_and_is_counted() {
    let setup = Setup::new(Routing::NoRule);
    let _ringlb = setup.start(&[], &[]);
    // The backend's SYN-ACK, addressed to the client, is forwarded to the client (which resets
    // it) instead of reaching ringlb's socket: the connect can only time out.
    let started = Instant::now();
    let stream = setup.connect(TRANSPARENT).expect("ringlb accepts the client");
    assert!(refused(&stream), "the client is reset, never left hanging");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "reset after {elapsed:?}, its connect timeout being 500 ms");
    let status = poll_until("the failed connect to be counted", || {
        let status = setup.status();
        (worker_sum(&status, "connect_failures") >= 1).then_some(status)
    });
    assert_eq!(worker_sum(&status, "local_transparent_failed"), 0, "the socket itself was fine: {status}");
    // The normal Service needs no policy routing.
    let (seen, _) = setup.peer_seen(PLAIN).expect("the normal Service answers");
    assert_eq!(seen.ip(), setup.router_ip);
}

#[test]
fn without_cap_net_admin_a_transparent_service_resets_its_clients_and_counts_why_never_the_backend() {
    let setup = Setup::new(Routing::Complete);
    // Root keeps only what the bounding set allows across the exec. One worker: its backend
    // events reach the control loop in the order they happened.
    let _ringlb = setup.start(&["setpriv", "--bounding-set=-net_admin,-net_raw"], &["--workers", "1"]);
    for _ in 0..3 {
        // The reset may reach the client's connect already (ringlb accepts and resets at once).
        match setup.connect(TRANSPARENT) {
            Ok(stream) => assert!(refused(&stream), "reset, never relayed from ringlb's address"),
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
        }
    }
    assert!(!setup.udp_round_trip(TRANSPARENT_UDP), "no datagram leaves from ringlb's address instead");
    let status = poll_until("every refusal to be counted", || {
        let status = setup.status();
        (worker_sum(&status, "local_transparent_failed") >= 4).then_some(status)
    });
    assert_eq!(worker_sum(&status, "connect_failures"), 0, "{status}");
    assert!(setup.udp_peers().is_empty(), "no datagram reached the backend");
    let (seen, _) = setup.peer_seen(PLAIN).expect("the normal Service still answers");
    assert_eq!(seen.ip(), setup.router_ip);
    assert_eq!(setup.server.as_ref().expect("running").accepted(), 1, "only the normal Service's client");
    // The normal connection's success is the one backend event: the refusals before it sent none.
    let status = poll_until("the normal connection's backend event", || {
        let status = setup.status();
        (status["health"]["backend_events"].as_u64() >= Some(1)).then_some(status)
    });
    assert_eq!(status["health"]["backend_events"], 1, "no backend is blamed: {status}");
}
