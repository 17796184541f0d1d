//! `ringlb demo`: real load balancing with nothing but this binary. Starts four tiny HTTP backends on
//! loopback (three ready, one listed as not ready in the manifest), builds the snapshot from an
//! embedded manifest through the same loader and builder as `run`, and serves it until Ctrl-C.
//!
//! Backends listen on 127.0.0.2..=127.0.0.5 (all of 127/8 is local on Linux), so one EndpointSlice
//! with one port describes them, exactly as Kubernetes would for pods.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lb_core::BuildOptions;

use crate::cli::DemoArgs;
use crate::serve::{Source, serve};
use crate::table;

/// Backend addresses: (name, last octet of 127.0.0.x, ready in the manifest).
const BACKENDS: [(&str, u8, bool); 4] =
    [("backend-1", 2, true), ("backend-2", 3, true), ("backend-3", 4, true), ("backend-4", 5, false)];

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::admin::listen_addr(&args.admin)?;
    for (name, octet, _) in BACKENDS {
        let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, octet), args.backend_port));
        start_backend(name, addr)?;
    }
    let manifest = manifest(args.port, args.backend_port);
    let objects = lb_sync::parse_manifest_str(&manifest, "embedded demo manifest")
        .map_err(|errors| anyhow::anyhow!("embedded demo manifest: {errors:?}"))?;
    let report = lb_core::build(
        &objects.services,
        &objects.slices,
        &objects.endpoints,
        &BuildOptions::default(),
        None,
        1,
    );
    anyhow::ensure!(report.errors.is_empty(), "embedded demo manifest rejected: {:?}", report.errors);
    println!("ringlb demo: serving this table (from the embedded manifest below)\n");
    print!("{}", table::render(&report));
    println!("\n--- embedded manifest (save it and try `ringlb run --manifests FILE`) ---\n{manifest}---");
    println!("\nTry it (backend-4 is not ready, so it never answers):\n");
    println!("    for i in 1 2 3 4 5 6; do curl -s http://127.0.0.1:{}/; done\n", args.port);
    println!("Health: curl -s http://127.0.0.1:9901/readyz   Stop: Ctrl-C\n");
    serve(Source::Fixed(report.snapshot), &args.engine, &args.admin, None, Default::default(), None)
}

/// The demo Service and EndpointSlice, as `kubectl get -o yaml` would show them.
pub fn manifest(vip_port: u16, backend_port: u16) -> String {
    let mut endpoints = String::new();
    for (name, octet, ready) in BACKENDS {
        endpoints.push_str(&format!(
            "  - addresses: [\"127.0.0.{octet}\"]\n    conditions: {{ready: {ready}}}\n    \
             targetRef: {{kind: Pod, namespace: demo, name: {name}}}\n"
        ));
    }
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: demo\n\
         spec:\n  type: ClusterIP\n  clusterIP: 10.96.0.10\n  externalIPs: [\"127.0.0.1\"]\n  ports:\n  \
         - name: http\n    port: {vip_port}\n    targetPort: {backend_port}\n    protocol: TCP\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: hello-abcde\n  \
         namespace: demo\n  labels:\n    kubernetes.io/service-name: hello\naddressType: IPv4\n\
         ports:\n- name: http\n  port: {backend_port}\n  protocol: TCP\nendpoints:\n{endpoints}"
    )
}

/// Starts a thread that answers every HTTP request with the backend's name and address.
fn start_backend(name: &'static str, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("demo backend {name} binding {addr}"))?;
    std::thread::Builder::new().name(format!("demo-{name}")).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = std::thread::Builder::new().spawn(move || answer(stream, name, addr));
        }
    })?;
    Ok(())
}

/// Reads one request head (bounded in size and time) and answers it, closing the connection.
fn answer(mut stream: TcpStream, name: &str, addr: SocketAddr) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let body = format!("hello from {name} ({addr})\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}
