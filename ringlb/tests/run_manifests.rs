//! End-to-end: the `ringlb` binary serving manifests over real loopback sockets, the way the
//! foundation issue is checked by hand: a Service with an external IP on 127.0.0.x, an EndpointSlice
//! with three ready endpoints and one not ready, live edits, and large transfers.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};

use support::{Ringlb, greeting, loopback, poll_until, port_free_on, save, web_manifest};
use testkit::backends::{named_server_on, read_pattern, stream_header, stream_server, write_pattern};

/// Opens `count` connections through `vip` and counts the greetings per backend name.
fn spread(vip: SocketAddr, count: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let (name, _) = greeting(vip).expect("connect through ringlb and read the greeting");
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

#[test]
fn run_balances_over_ready_endpoints_and_follows_readiness_edits() {
    let backend_ips: Vec<_> = (41..=44).map(loopback).collect();
    let backend_port = port_free_on(&backend_ips);
    let names = ["web-1", "web-2", "web-3", "web-4"];
    let _backends: Vec<_> = backend_ips
        .iter()
        .zip(names)
        .map(|(ip, name)| named_server_on(SocketAddr::new(*ip, backend_port), name).expect("backend"))
        .collect();
    let vip = SocketAddr::new(loopback(40), port_free_on(&[loopback(40)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("web.yaml");
    let readiness = |ready: [bool; 4]| -> Vec<_> { backend_ips.iter().copied().zip(ready).collect() };
    save(&file, &web_manifest(vip, backend_port, &readiness([true, true, true, false])));

    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    let seen = spread(vip, 30);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["web-1", "web-2", "web-3"],
        "only ready endpoints: {seen:?}"
    );
    assert!(seen.values().all(|&n| n >= 5), "round robin spreads evenly enough: {seen:?}");

    // An established connection to web-1 must survive web-1 turning not ready.
    let mut on_web1 = poll_until("a connection that lands on web-1", || {
        let (name, stream) = greeting(vip).expect("connect");
        (name == "web-1").then_some(stream)
    });

    save(&file, &web_manifest(vip, backend_port, &readiness([false, true, true, true])));
    poll_until("the readiness edit to take effect", || {
        let seen = spread(vip, 9);
        (seen.keys().collect::<Vec<_>>() == ["web-2", "web-3", "web-4"]).then_some(())
    });
    let seen = spread(vip, 30);
    assert!(!seen.contains_key("web-1"), "a not-ready endpoint gets no new connections: {seen:?}");
    assert!(seen.contains_key("web-4"), "the newly ready endpoint gets connections: {seen:?}");

    let mut reply = [0u8; 5];
    on_web1.write_all(b"still").expect("write on the established connection");
    on_web1.read_exact(&mut reply).expect("echo on the established connection");
    assert_eq!(&reply, b"still");

    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits cleanly on SIGTERM: {status}");
}

#[test]
fn bad_edit_keeps_the_previous_table_serving() {
    let backend_ip = loopback(46);
    let backend_port = port_free_on(&[backend_ip]);
    let _backend = named_server_on(SocketAddr::new(backend_ip, backend_port), "only").expect("backend");
    let vip = SocketAddr::new(loopback(45), port_free_on(&[loopback(45)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("web.yaml");
    let good = web_manifest(vip, backend_port, &[(backend_ip, true)]);
    save(&file, &good);
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    assert_eq!(greeting(vip).expect("served").0, "only");

    // Unparsable YAML, then an invalid port: each rejected while the previous table keeps serving.
    let service_port = format!("port: {}\n    targetPort", vip.port());
    let invalid_port = good.replace(&service_port, "port: 70000\n    targetPort");
    assert_ne!(invalid_port, good);
    // (edit, how /status shows its rejection): a load that fails, or an object the builder rejects.
    let broken = [
        (format!("{good}\n  - {{ this is: [not yaml"), ("inputs_rejected", serde_json::json!(true))),
        (invalid_port, ("rejected_objects", serde_json::json!(1))),
    ];
    for (text, (field, rejected)) in &broken {
        let loads_before = ringlb.status()["source"]["loads"].as_u64().expect("loads");
        save(&file, text);
        let status = poll_until("ringlb to load the bad edit", || {
            let status = ringlb.status();
            (status["source"]["loads"].as_u64() > Some(loads_before)).then_some(status)
        });
        assert_eq!(&status["source"][field], rejected, "the bad edit is rejected: {status}");
        assert_eq!(status["snapshot"]["version"], 1, "a rejected edit publishes nothing: {status}");
        assert_eq!(greeting(vip).expect("still served after a bad edit").0, "only");
    }

    // A good edit after the bad ones is applied: the watch loop survived them.
    let second_ip = loopback(48);
    let _second = named_server_on(SocketAddr::new(second_ip, backend_port), "second").expect("backend");
    save(&file, &web_manifest(vip, backend_port, &[(backend_ip, false), (second_ip, true)]));
    poll_until("the good edit to be published", || {
        (ringlb.status()["snapshot"]["version"] == 2).then_some(())
    });
    assert_eq!(greeting(vip).expect("served by the new table").0, "second");
    let status = ringlb.terminate();
    assert!(status.success(), "ringlb exits cleanly on SIGTERM: {status}");
}

#[test]
fn large_transfers_through_run_arrive_intact_both_ways() {
    let (backend, reports) = stream_server().expect("stream backend");
    let vip = SocketAddr::new(loopback(47), port_free_on(&[loopback(47)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bulk.yaml");
    save(&file, &web_manifest(vip, backend.addr().port(), &[(backend.addr().ip(), true)]));
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    const LEN: u64 = 256 << 20;
    let mut client = std::net::TcpStream::connect(vip).expect("connect through ringlb");
    client.set_read_timeout(Some(support::IO_TIMEOUT)).expect("timeout");
    client.write_all(&stream_header(11, 22, LEN)).expect("header");
    let mut writer = client.try_clone().expect("clone");
    let upload = std::thread::spawn(move || {
        write_pattern(&mut writer, 11, LEN).expect("upload");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let (downloaded, intact) = read_pattern(&mut client, 22).expect("download");
    upload.join().expect("upload thread");
    assert_eq!((downloaded, intact), (LEN, true), "download arrives whole and intact");
    let report = reports.recv_timeout(support::DEADLINE).expect("backend report");
    assert_eq!((report.received, report.intact), (LEN, true), "upload arrives whole and intact");
    ringlb.terminate();
}

#[test]
fn run_serves_udp_services_with_replies_from_the_vip() {
    let backend = testkit::backends::udp_named_server("dns-1").expect("udp backend");
    let vip = SocketAddr::new(loopback(49), port_free_on(&[loopback(49)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dns.yaml");
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: kube-system}}\nspec:\n  \
         externalIPs: [\"{}\"]\n  ports:\n  - {{name: dns, port: {}, protocol: UDP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-x1\n  \
         namespace: kube-system\n  labels: {{kubernetes.io/service-name: dns}}\naddressType: IPv4\n\
         ports: [{{name: dns, port: {}, protocol: UDP}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        vip.ip(),
        vip.port(),
        backend.addr().port(),
        backend.addr().ip()
    );
    save(&file, &text);
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    for client in 0..3 {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
        socket.set_read_timeout(Some(support::IO_TIMEOUT)).expect("timeout");
        for query in 0..5 {
            let payload = format!("client {client} query {query}");
            socket.send_to(payload.as_bytes(), vip).expect("send to the VIP");
            let mut reply = [0u8; 256];
            let (len, from) = socket.recv_from(&mut reply).expect("a reply through ringlb");
            assert_eq!(from, vip, "the reply comes from the VIP");
            assert_eq!(std::str::from_utf8(&reply[..len]), Ok(format!("dns-1:{payload}").as_str()));
        }
    }
    let status = ringlb.status();
    let created: u64 = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["flows_created"].as_u64().expect("flows_created"))
        .sum();
    assert_eq!(created, 3, "one flow per client: {status}");
    assert!(ringlb.terminate().success());
}

/// A slice whose endpoints carry full `(ready, serving, terminating)` conditions.
fn manifest_with_conditions(
    vip: SocketAddr,
    backend_port: u16,
    endpoints: &[(std::net::IpAddr, [bool; 3])],
) -> String {
    let plain: Vec<_> = endpoints.iter().map(|(ip, [ready, ..])| (*ip, *ready)).collect();
    let mut text = web_manifest(vip, backend_port, &plain);
    for (ip, [ready, serving, terminating]) in endpoints {
        let short = format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}\n");
        let full = format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        );
        text = text.replace(&short, &full);
    }
    text
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_take_new_connections_else_the_vip_refuses() {
    let ips: Vec<_> = (91..=92).map(loopback).collect();
    let backend_port = port_free_on(&ips);
    let _backends: Vec<_> = ips
        .iter()
        .zip(["old-1", "old-2"])
        .map(|(ip, name)| named_server_on(SocketAddr::new(*ip, backend_port), name).expect("backend"))
        .collect();
    let vip = SocketAddr::new(loopback(90), port_free_on(&[loopback(90)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rollout.yaml");
    // A rolling update with long drains: every pod terminating, old-1 still serving.
    let draining = [(ips[0], [false, true, true]), (ips[1], [false, false, true])];
    save(&file, &manifest_with_conditions(vip, backend_port, &draining));
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    let seen = spread(vip, 6);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["old-1"],
        "only the serving, terminating endpoint: {seen:?}"
    );

    // Nothing serving any more: the VIP refuses at once instead of hanging the client.
    let gone = [(ips[0], [false, false, true]), (ips[1], [false, false, true])];
    save(&file, &manifest_with_conditions(vip, backend_port, &gone));
    poll_until("new connections to be refused", || {
        let mut stream = std::net::TcpStream::connect(vip).ok()?;
        stream.set_read_timeout(Some(support::IO_TIMEOUT)).ok()?;
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => Some(()),
            Ok(_) => None,
        }
    });
    assert!(ringlb.terminate().success());
}
