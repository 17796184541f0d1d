//! Transparent entries over loopback, where every client address is local and needs no policy
//! routing: the backend of a transparent TCP or UDP entry sees the client's own address (the
//! kernel's source, 127.0.0.1, for a normal entry); and an engine whose workers lack CAP_NET_ADMIN
//! and CAP_NET_RAW resets a transparent entry's clients (drops its datagrams), counts them apart,
//! reports no backend event and never reaches the backend from its own address instead.
//! The policy routing for non-local clients is tested in network namespaces by
//! `ringlb/tests/transparent.rs`. Every wait is bounded; nothing sleeps.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};

use lb_core::EntryPolicy;
use lb_datapath::{Refusal, RelayMode};
use socket2::{Domain, Socket, Type};
use support::*;
use testkit::backends::{UdpServer, peer_server_on};

fn transparent() -> EntryPolicy {
    EntryPolicy { transparent: true, ..test_policy() }
}

/// A client connected to `vip` from `from` (port of the kernel's choice).
fn connect_from(from: IpAddr, vip: SocketAddr) -> TcpStream {
    try_connect_from(from, vip).expect("connect to the VIP")
}

fn try_connect_from(from: IpAddr, vip: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&vip.into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// The address the peer-reporting backend behind `stream` saw the connection come from.
fn peer_seen(stream: &TcpStream) -> SocketAddr {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("the backend's line through the proxy");
    line.trim_end().parse().unwrap_or_else(|_| panic!("not an address: {line:?}"))
}

#[test]
fn the_backend_of_a_transparent_entry_sees_the_client_and_that_of_a_normal_one_does_not() {
    let backend = peer_server_on(SocketAddr::new(vip(181), 0)).expect("a backend");
    let udp_backend =
        UdpServer::spawn_on(SocketAddr::new(vip(181), 0), |p| Some(p.to_vec())).expect("a UDP backend");
    let (key, plain, udp) = (tcp_key(182), tcp_key(183), udp_key(182));
    let entries = vec![
        entry(key, &[(backend.addr(), true)], transparent()),
        entry(plain, &[(backend.addr(), true)], test_policy()),
        entry(udp, &[(udp_backend.addr(), true)], transparent()),
    ];
    let engine = start_engine(2, RelayMode::Auto, snapshot(1, entries));
    let client = vip(180);

    let mut stream = connect_from(client, key.socket_addr());
    let seen = peer_seen(&stream);
    assert_eq!(seen.ip(), client, "the backend sees the client's own address");
    assert_eq!(round_trip(&mut stream, b"both ways"), b"both ways");
    let stream = connect_from(client, plain.socket_addr());
    assert_ne!(peer_seen(&stream).ip(), client, "a normal entry connects from the host's address");

    let socket = UdpSocket::bind(SocketAddr::new(client, 0)).expect("a UDP client");
    socket.set_read_timeout(Some(UDP_REPLY_TIMEOUT)).expect("timeout");
    let (reply, from) = udp_exchange(&socket, udp.socket_addr(), b"ping");
    assert_eq!((reply.as_slice(), from), (&b"ping"[..], udp.socket_addr()));
    let peers = udp_backend.peer_addrs();
    assert!(peers.len() == 1 && peers[0].ip() == client, "the UDP backend sees the client: {peers:?}");
    assert_eq!(engine.stats().total().local_transparent_failed, 0);
}

#[test]
fn without_the_capabilities_clients_are_reset_counted_apart_and_no_backend_is_blamed() {
    let backend = peer_server_on(SocketAddr::new(vip(185), 0)).expect("a backend");
    let udp_backend =
        UdpServer::spawn_on(SocketAddr::new(vip(185), 0), |p| Some(p.to_vec())).expect("a UDP backend");
    let (key, udp) = (tcp_key(186), udp_key(186));
    let entries = vec![
        entry(key, &[(backend.addr(), true)], transparent()),
        entry(udp, &[(udp_backend.addr(), true)], transparent()),
    ];
    // The workers inherit the starting thread's capabilities.
    let engine = testkit::capabilities::without_network_admin(|| {
        start_engine(1, RelayMode::Copy, snapshot(1, entries))
    });
    let events = engine.take_backend_events().expect("backend events");
    let clients = 3;
    for _ in 0..clients {
        // The reset may already reach the client's connect (a slow machine: the micro-VM).
        match try_connect_from(vip(184), key.socket_addr()) {
            Ok(mut stream) => {
                assert!(read_to_close(&mut stream).is_err(), "the client is reset, never relayed")
            }
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
        }
    }
    let socket = UdpSocket::bind(SocketAddr::new(vip(184), 0)).expect("a UDP client");
    socket.send_to(b"ping", udp.socket_addr()).expect("send");
    wait_until("the refusals to be counted", IO_TIMEOUT, || {
        engine.stats().total().local_transparent_failed == clients + 1
    });
    let total = engine.stats().total();
    assert_eq!((total.connect_failures, total.resets), (0, clients), "{total:?}");
    assert_eq!((backend.accepted(), udp_backend.received()), (0, 0), "nothing reached a backend");
    let refused = |k| {
        engine
            .traffic()
            .iter()
            .filter(|(t, _)| t.vip == k)
            .map(|(_, s)| s.refused(Refusal::Transparent))
            .sum::<u64>()
    };
    assert_eq!((refused(key), refused(udp)), (clients, 1), "refused per VIP, with the reason");
    // Events are flushed per housekeeping tick: a later success's event would follow any earlier one.
    let plain = tcp_key(187);
    let normal = testkit::backends::echo_server().expect("an echo backend");
    publish(&engine, snapshot(2, vec![entry(plain, &[(normal.addr(), true)], test_policy())]));
    let mut stream = connect(plain.socket_addr());
    assert_eq!(round_trip(&mut stream, b"hello"), b"hello");
    let batch = events.recv_timeout(IO_TIMEOUT).expect("the normal connection's event");
    assert!(batch.iter().all(|event| event.backend.0 == normal.addr()), "only the normal backend: {batch:?}");
}
