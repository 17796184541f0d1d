//! End-to-end: kube-proxy's load-balancer health-check contract over real sockets. The node health
//! server (`--healthz-bind-address`) answers 200 while ringlb serves and 503 before the first table
//! and through the shutdown grace; a `LoadBalancer` Service with `externalTrafficPolicy: Local`
//! answers its `healthCheckNodePort` with 200 only on a node with a ready endpoint of it, follows
//! readiness, moves between ringlb processes as the port frees up, and goes away with the Service.
//!
//! Every wait polls a real answer under a deadline (`support::poll_until`).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use k8s_openapi::api::core::v1::Service;
use serde_json::json;
use support::cluster::{CLASS, Cluster, load_balancer};
use support::{
    HttpResponse, IO_TIMEOUT, Ringlb, free_node_port, http_get_response, loopback, poll_until, port_free_on,
    save,
};
use testkit::backends::echo_server;

/// Go's zero `time.Time`, what kube-proxy reports as `lastUpdated` before its first sync.
const GO_ZERO_TIME: &str = "0001-01-01 00:00:00 +0000 UTC";

fn free_loopback_addr() -> SocketAddr {
    SocketAddr::new(loopback(1), port_free_on(&[loopback(1)]))
}

/// Polls `addr` until an answer satisfies `wanted`; returns it.
fn wait_answer(addr: SocketAddr, what: &str, wanted: impl Fn(&HttpResponse) -> bool) -> HttpResponse {
    poll_until(&format!("{addr} to answer with {what}"), || {
        http_get_response(addr, "/healthz").ok().filter(&wanted)
    })
}

fn local_endpoints(response: &HttpResponse) -> serde_json::Value {
    response.json()["localEndpoints"].clone()
}

fn refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn assert_kube_proxy_headers(response: &HttpResponse) {
    assert_eq!(response.header("content-type"), Some("application/json"), "{response:?}");
    assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{response:?}");
}

/// A `LoadBalancer` Service `shop/web` on `vip` (requested, as manifests do) with
/// `externalTrafficPolicy: Local`, `healthCheckNodePort: check_port`, and one endpoint `backend`
/// on node `node-a`.
fn local_manifest(vip: SocketAddr, check_port: u16, backend: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n  type: LoadBalancer\n  \
         loadBalancerIP: \"{}\"\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {check_port}\n  ports:\n  \
         - {{name: http, port: {}, targetPort: {}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-abc12\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}, protocol: TCP}}]\nendpoints:\n\
         - {{addresses: [\"{}\"], nodeName: node-a, conditions: {{ready: true}}}}\n",
        vip.ip(),
        vip.port(),
        backend.port(),
        backend.port(),
        backend.ip()
    )
}

/// A Local manifest (see [`local_manifest`]) in a directory of its own, with its VIP on
/// `127.0.0.<octet>` and its echo backend; `octet` also seeds the health-check node port.
struct LocalManifest {
    vip: SocketAddr,
    check_port: u16,
    file: std::path::PathBuf,
    _backend: testkit::backends::Server,
    _dir: tempfile::TempDir,
}

impl LocalManifest {
    fn write(octet: u8) -> LocalManifest {
        let backend = echo_server().expect("backend");
        let vip = SocketAddr::new(loopback(octet), port_free_on(&[loopback(octet)]));
        let check_port = free_node_port(octet.into());
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("web.yaml");
        save(&file, &local_manifest(vip, check_port, backend.addr()));
        LocalManifest { vip, check_port, file, _backend: backend, _dir: dir }
    }

    fn path(&self) -> &str {
        self.file.to_str().expect("utf-8 path")
    }
}

/// One round trip through the echo backend.
fn echo(stream: &mut TcpStream, text: &[u8]) {
    stream.write_all(text).expect("write through ringlb");
    let mut back = vec![0; text.len()];
    stream.read_exact(&mut back).expect("read the echo through ringlb");
    assert_eq!(back, text);
}

#[test]
fn node_and_service_health_answer_503_from_sigterm_through_the_grace_while_connections_drain() {
    let manifest = LocalManifest::write(140);
    let (vip, check_port) = (manifest.vip, manifest.check_port);
    let healthz = free_loopback_addr();
    let mut ringlb = Ringlb::start(&[
        "run",
        "--manifests",
        manifest.path(),
        "--node-name",
        "node-a",
        "--healthz-bind-address",
        &healthz.to_string(),
        "--shutdown-grace",
        "30s",
    ]);
    ringlb.wait_ready();

    let serving = http_get_response(healthz, "/healthz").expect("GET /healthz");
    assert_eq!(serving.status, 200, "{serving:?}");
    assert_kube_proxy_headers(&serving);
    let body = serving.json();
    assert_eq!((&body["nodeHealthy"], &body["nodeEligible"]), (&json!(true), &json!(true)), "{body}");
    assert_eq!(body["lastUpdated"], body["currentTime"], "kube-proxy reports a healthy node as updated now");
    assert_eq!(http_get_response(healthz, "/livez").expect("GET /livez").status, 200);

    let check = SocketAddr::new(loopback(1), check_port);
    let answer = wait_answer(check, "200", |r| r.status == 200);
    assert_kube_proxy_headers(&answer);
    assert_eq!(
        answer.json(),
        json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    assert_eq!(ringlb.status()["service_health"]["servers"], 1);

    let mut held = TcpStream::connect_timeout(&vip, IO_TIMEOUT).expect("connect through ringlb");
    held.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    echo(&mut held, b"before");
    ringlb.signal(libc::SIGTERM);

    let draining = wait_answer(healthz, "503", |r| r.status == 503);
    assert_kube_proxy_headers(&draining);
    let body = draining.json();
    assert_eq!(body["nodeHealthy"], false, "{body}");
    assert_ne!(body["lastUpdated"], GO_ZERO_TIME, "the last publication, not never: {body}");
    let answer = wait_answer(check, "503", |r| r.status == 503);
    assert_eq!(answer.json()["serviceProxyHealthy"], false, "{answer:?}");
    assert_eq!(local_endpoints(&answer), 1, "the endpoint is still there; the node is not");
    // Still draining: the held connection goes on while both answer 503.
    echo(&mut held, b"during the grace");
    assert!(ringlb.is_running());
    assert_eq!(http_get_response(healthz, "/healthz").expect("GET /healthz").status, 503);

    drop(held);
    let status = ringlb.wait();
    assert!(status.success(), "exit 0 once drained: {status}");
}

#[test]
fn node_health_answers_503_until_the_first_table_is_served() {
    let mut cluster = Cluster::start();
    cluster.server.stop();
    let healthz = free_loopback_addr();
    let _ringlb = cluster.ringlb("a", &["--healthz-bind-address", &healthz.to_string()]);
    let waiting =
        poll_until("the node health server to answer", || http_get_response(healthz, "/healthz").ok());
    assert_eq!(waiting.status, 503, "nothing served yet: {waiting:?}");
    assert_eq!(waiting.json()["lastUpdated"], GO_ZERO_TIME);
    assert_eq!(waiting.json()["nodeHealthy"], false);

    cluster.server.restart();
    let serving = wait_answer(healthz, "200", |r| r.status == 200);
    assert_eq!(serving.json()["nodeHealthy"], true);
}

#[test]
fn a_local_services_health_check_node_port_answers_200_only_on_the_node_with_its_ready_endpoints() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.120.0/29"]);
    let port = free_node_port(120);
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)])
        .external_traffic_policy("Local")
        .health_check_node_port(i32::from(port))
        .build();
    cluster.apply_json(&web);
    let pods = |a0: bool, a1: bool| [(0, a0, "node-a"), (1, a1, "node-a"), (2, true, "node-c")];
    cluster.endpoints_on_nodes("web", &pods(true, true));
    let check = SocketAddr::new(loopback(1), port);

    let mut on_a = cluster.ringlb("a", &["--node-name", "node-a"]);
    on_a.wait_ready();
    let answer =
        wait_answer(check, "200 and 2 local endpoints", |r| r.status == 200 && local_endpoints(r) == 2);
    assert_kube_proxy_headers(&answer);
    assert_eq!(answer.json()["service"], json!({"namespace": "shop", "name": "web"}));
    assert_eq!(answer.json()["serviceProxyHealthy"], true);

    // The answer follows readiness: one local pod not ready, then none.
    cluster.endpoints_on_nodes("web", &pods(true, false));
    wait_answer(check, "200 and 1 local endpoint", |r| r.status == 200 && local_endpoints(r) == 1);
    cluster.endpoints_on_nodes("web", &pods(false, false));
    let none =
        wait_answer(check, "503 and no local endpoint", |r| r.status == 503 && local_endpoints(r) == 0);
    assert_eq!(none.json()["serviceProxyHealthy"], true, "ringlb is fine; the Service has no pod here");
    cluster.endpoints_on_nodes("web", &pods(true, true));
    wait_answer(check, "200 and 2 local endpoints", |r| r.status == 200 && local_endpoints(r) == 2);

    // A ringlb on node-b finds the port taken (by the one on node-a): counted, retried, not fatal.
    let mut on_b = cluster.ringlb("b", &["--node-name", "node-b"]);
    on_b.wait_ready();
    poll_until("ringlb on node-b to count the port it cannot bind", || {
        let health = on_b.status()["service_health"].clone();
        (health["unbound"] == 1 && health["bind_failures"].as_u64() >= Some(1)).then_some(())
    });
    assert_eq!(local_endpoints(&wait_answer(check, "200", |r| r.status == 200)), 2, "node-a still answers");

    // Once node-a's ringlb is gone, node-b's binds the port and answers for its node: no endpoint.
    assert!(on_a.terminate().success());
    let on_node_b = wait_answer(check, "node-b's 503", |r| {
        r.status == 503 && r.json()["serviceProxyHealthy"] == true && local_endpoints(r) == 0
    });
    assert_kube_proxy_headers(&on_node_b);
    let health = on_b.status()["service_health"].clone();
    assert_eq!((&health["servers"], &health["unbound"]), (&json!(1), &json!(0)), "{health}");

    // Deleting the Service closes its port.
    cluster.kubectl.ok(&["delete", "service", "-n", "shop", "web"], None);
    poll_until("the deleted Service's health-check node port to close", || refused(check).then_some(()));
    assert_eq!(on_b.status()["service_health"]["servers"], 0);
    assert!(on_b.is_running());
}

#[test]
fn without_a_node_name_or_with_service_health_checks_off_no_port_is_answered() {
    let manifest = LocalManifest::write(141);
    for flags in [&[][..], &["--node-name", "node-a", "--service-health-checks=false"][..]] {
        let mut args = vec!["run", "--manifests", manifest.path()];
        args.extend_from_slice(flags);
        let mut ringlb = Ringlb::start(&args);
        ringlb.wait_ready();
        assert!(ringlb.status()["service_health"].is_null(), "{flags:?}");
        let check = SocketAddr::new(loopback(1), manifest.check_port);
        assert!(refused(check), "{flags:?}: nothing listens on the port");
        assert!(ringlb.terminate().success());
    }
}
