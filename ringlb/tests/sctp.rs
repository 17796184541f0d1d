//! End-to-end: an SCTP Service from a manifest served by the `ringlb` binary. The host kernel has no
//! SCTP, so `.ci/run` runs this inside the micro-VM (`vm/cargo-test.sh -p ringlb --test sctp --
//! --include-ignored`).

mod support;

use std::net::SocketAddr;

use support::{Ringlb, loopback, save};
use testkit::backends::sctp::{SctpMessage, SctpSocket, sctp_echo_server};

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn run_serves_an_sctp_service_keeping_streams_and_ppids() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    // A fixed port: the VM has nothing else running, and SCTP ports cannot be probed with TCP binds.
    let vip = SocketAddr::new(loopback(60), 3868);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("diameter.yaml");
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: diameter, namespace: core}}\nspec:\n  \
         externalIPs: [\"{}\"]\n  ports:\n  - {{name: diameter, port: {}, protocol: SCTP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: diameter-x1\n  \
         namespace: core\n  labels: {{kubernetes.io/service-name: diameter}}\naddressType: IPv4\n\
         ports: [{{name: diameter, port: {}, protocol: SCTP}}]\nendpoints:\n- addresses: [\"{}\"]\n",
        vip.ip(),
        vip.port(),
        backend.addr().port(),
        backend.addr().ip()
    );
    save(&file, &text);
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    let client = SctpSocket::connect(vip).expect("connect to the SCTP VIP");
    let messages = [
        SctpMessage::new(b"capabilities-exchange", 0, 46u32.to_be(), false),
        SctpMessage::new(b"on stream seven", 7, 42u32.to_be(), false),
        SctpMessage::new(b"unordered", 2, 5u32.to_be(), true),
    ];
    for message in &messages {
        client.send(message).expect("send through ringlb");
        let echoed = client.recv().expect("receive through ringlb").expect("a message, not EOF");
        assert_eq!(&echoed, message, "payload, stream id, PPID and unordered flag survive both ways");
    }
    // SCTP has no half-close: the SHUTDOWN we start ends the association (lb-datapath's SCTP tests
    // check it reaches the backend as EOF).
    client.shutdown().expect("shutdown");
    assert_eq!(backend.accepted(), 1, "one backend association for one client association");
    assert!(ringlb.terminate().success());
}
