//! The lab's hosts reach each other over a shared segment, and nothing of it outlives the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use testkit::lab::Lab;

fn namespaces() -> String {
    let output = std::process::Command::new("ip").args(["netns", "list"]).output().expect("run ip");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn hosts_on_one_segment_talk_and_are_gone_after_the_lab() {
    let names = {
        let lab = Lab::create().expect("a lab");
        let segment = lab.segment().expect("a segment");
        let (server, client) = (lab.host("server").expect("a host"), lab.host("client").expect("a host"));
        let server_ip = lab.join(&server, &segment).expect("join");
        let client_ip = lab.join(&client, &segment).expect("join");
        assert_eq!((server_ip, client_ip), (segment.ip(1), segment.ip(2)));
        let listener = server.enter(|| TcpListener::bind(SocketAddr::new(server_ip, 0))).expect("bind");
        let addr = listener.local_addr().expect("bound");
        let mut stream = client.enter(|| TcpStream::connect(addr)).expect("connect across the segment");
        let (mut accepted, peer) = listener.accept().expect("accept");
        assert_eq!(peer.ip(), client_ip);
        stream.write_all(b"hi").expect("write");
        let mut got = [0u8; 2];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
        assert_eq!(
            client.neighbour(server_ip, &segment.interface()),
            Some(server.mac(&segment.interface()).expect("a MAC"))
        );
        vec![server.name().to_owned(), client.name().to_owned()]
    };
    let left = namespaces();
    for name in names {
        assert!(!left.contains(&name), "{name} outlived its lab: {left}");
    }
}
