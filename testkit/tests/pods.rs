//! The pod network: backends bound inside a test's namespace answer from the host, at addresses an
//! API server accepts, and nothing is left behind.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use testkit::backends::named_server_on;
use testkit::pods::PodNetwork;

#[test]
fn a_pod_bound_in_the_namespace_answers_the_host_and_the_namespace_goes_on_drop() {
    let network = PodNetwork::create().expect("a pod network");
    let pod = network.pod_ip(3);
    assert!(!pod.is_loopback(), "{pod} must be an address an API server accepts");
    let server = network
        .enter(|| named_server_on(SocketAddr::new(pod, 0), "pod-3"))
        .expect("a backend in the namespace");
    let stream =
        TcpStream::connect_timeout(&server.addr(), Duration::from_secs(10)).expect("connect from the host");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).expect("greeting");
    assert_eq!(line.trim_end(), "pod-3");
    // The pod address is not the host's: binding it outside the namespace fails.
    assert!(
        std::net::TcpListener::bind(SocketAddr::new(pod, 0)).is_err(),
        "{pod} lives only in the namespace"
    );

    let name = network.name().to_owned();
    drop(stream);
    drop(server);
    drop(network);
    assert!(!std::path::Path::new("/run/netns").join(&name).exists(), "{name} is deleted on drop");
}
