//! End-to-end: the `ringlb` binary serving manifests whose Services carry
//! `ringlb.io/proxy-protocol`, in front of a real peer that parses the header: HAProxy (Debian's
//! `haproxy` package, see `.ci/run`) with `accept-proxy`, answering each HTTP request with the
//! client address and destination it learnt from the header. The client connects from an address
//! ringlb never uses as a source, so only a header can have told HAProxy about it.
//!
//! HAProxy runs as this test's child, on its own config and a free loopback port, and is killed on
//! drop. Every wait polls a real condition (HAProxy's port accepting, ringlb's /readyz).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};

use support::{IO_TIMEOUT, Ringlb, loopback, poll_until, port_free_on, save};

const PROXY: &str = "ringlb.io/proxy-protocol";
const CHECK: &str = "ringlb.io/health-check";
const INTERVAL: &str = "ringlb.io/health-interval";

/// An `haproxy -db` child process; killed and reaped on drop.
struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy with one frontend on `listen` that requires a PROXY header (v1 or v2, which it
    /// tells apart itself) and answers every request with `<src> <src_port> <dst> <dst_port>`.
    fn start(listen: SocketAddr) -> Haproxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 100\n\
                 defaults\n    mode http\n    timeout connect 5s\n    timeout client 10s\n    \
                 timeout server 10s\n\
                 frontend proxied\n    bind {listen} accept-proxy\n    \
                 http-request return status 200 content-type text/plain \
                 lf-string \"%[src] %[src_port] %[dst] %[dst_port]\\n\"\n"
            ),
        )
        .expect("write haproxy.cfg");
        let mut child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn haproxy: install Debian's haproxy package (.ci/run lists it)");
        poll_until("haproxy to listen", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("haproxy exited before listening: {status}");
            }
            TcpStream::connect_timeout(&listen, IO_TIMEOUT).ok()
        });
        Haproxy { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Service `shop/<name>` on `vip` with `annotations` and one ready endpoint at `backend`.
fn service(name: &str, vip: SocketAddr, annotations: &[(&str, &str)], backend: SocketAddr) -> String {
    let annotations = match annotations {
        [] => String::new(),
        list => list.iter().fold("  annotations:\n".to_owned(), |text, (key, value)| {
            format!("{text}    {key}: \"{value}\"\n")
        }),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n{annotations}\
         spec:\n  externalIPs: [\"{}\"]\n  ports:\n  - name: http\n    port: {}\n    targetPort: http\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         namespace: shop\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\n\
         ports:\n- name: http\n  port: {}\n  protocol: TCP\nendpoints:\n- addresses: [\"{}\"]\n---\n",
        vip.ip(),
        vip.port(),
        backend.port(),
        backend.ip()
    )
}

/// One HTTP request through `vip` from a socket bound to `client_ip`: the client's own address and
/// the response (`Err` if the peer closed without one).
fn request_from(client_ip: IpAddr, vip: SocketAddr) -> (SocketAddr, std::io::Result<String>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(client_ip, 0).into()).expect("bind the client address");
    socket.connect_timeout(&vip.into(), IO_TIMEOUT).expect("connect through ringlb");
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    let local = stream.local_addr().expect("client address");
    let response =
        write!(stream, "GET / HTTP/1.1\r\nhost: peer\r\nconnection: close\r\n\r\n").and_then(|()| {
            let mut response = String::new();
            stream.read_to_string(&mut response).map(|_| response)
        });
    (local, response)
}

#[test]
fn haproxy_behind_ringlb_sees_the_real_client_address_through_v1_and_v2_headers() {
    let peer_ip = loopback(131);
    let peer = SocketAddr::new(peer_ip, port_free_on(&[peer_ip]));
    let _haproxy = Haproxy::start(peer);
    let client_ip = loopback(133);
    let vips =
        [130, 132, 134].map(|octet| SocketAddr::new(loopback(octet), port_free_on(&[loopback(octet)])));
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = [
        service("v1", vips[0], &[(PROXY, "v1")], peer),
        // Its health checks reach HAProxy too, which accepts them only after a (LOCAL) header.
        service("v2", vips[1], &[(PROXY, "v2"), (CHECK, "http:/"), (INTERVAL, "200ms")], peer),
        service("plain", vips[2], &[], peer),
    ]
    .concat();
    save(&dir.path().join("services.yaml"), &manifest);
    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    for vip in &vips[..2] {
        let (client, response) = request_from(client_ip, *vip);
        let response = response.expect("haproxy answers a proxied connection");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let seen = response.split("\r\n\r\n").nth(1).unwrap_or_default().trim_end();
        let expected = format!("{} {} {} {}", client.ip(), client.port(), vip.ip(), vip.port());
        assert_eq!(seen, expected, "what haproxy learnt from the header sent for {vip}");
    }

    // Without the annotation no header goes out, and HAProxy, which requires one, answers nothing:
    // the header above is what made it see the client.
    let (_, plain) = request_from(client_ip, vips[2]);
    assert!(!plain.as_deref().unwrap_or_default().contains("200"), "answered without a header: {plain:?}");

    let health = poll_until("three health probes of the v2 Service", || {
        let status = ringlb.status();
        (status["health"]["probes_sent"].as_u64() >= Some(3)).then_some(status)
    });
    assert_eq!(health["health"]["probes_failed"], 0, "probes pass HAProxy's accept-proxy: {health}");

    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits cleanly on SIGTERM: {status}");
}

/// `ringlb check` on a UDP Service `shop/dns` annotated with `version`: (success, its output).
fn check_udp_service(version: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dns.yaml");
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: shop\n  annotations:\n    \
         ringlb.io/proxy-protocol: {version}\nspec:\n  externalIPs: [\"127.0.0.135\"]\n  ports:\n  - \
         name: dns\n    port: 53\n    protocol: UDP\n"
    );
    save(&file, &manifest);
    let output = Command::new(env!("CARGO_BIN_EXE_ringlb"))
        .args(["check", "--manifests", file.to_str().expect("utf-8 path")])
        .output()
        .expect("run ringlb check");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn check_refuses_v1_on_a_service_with_a_udp_port_and_shows_v2_on_it() {
    let (ok, text) = check_udp_service("v1");
    assert!(!ok, "check must fail: {text}");
    assert!(text.contains("ringlb.io/proxy-protocol") && text.contains("TCP-only"), "{text}");
    let (ok, text) = check_udp_service("v2");
    assert!(ok, "v2 serves UDP: {text}");
    assert!(text.contains("127.0.0.135:53") && text.contains("proxy-protocol=v2"), "{text}");
}
