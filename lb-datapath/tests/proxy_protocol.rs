//! PROXY protocol headers over real loopback sockets: a TCP backend reads the header the entry asks
//! for (v1 or v2, IPv4 and IPv6) before any client byte, with every relay mode, and a retry after a
//! refused connect sends the backend that connects its own header; a UDP backend (IPv4 and IPv6)
//! finds the v2 header at the start of every datagram of a burst (which would otherwise leave as
//! one GSO send), and the replies reach the client without one.
//!
//! The expected headers are written out here from the specification, not with lb-core's encoder,
//! so the test checks the encoder as well as the datapath. Every wait is bounded; nothing sleeps.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use lb_core::{EntryPolicy, Protocol, ProxyProtocol, VipKey};
use lb_datapath::RelayMode;
use support::*;
use testkit::backends::{RefusingAddr, Server};

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

fn policy(version: ProxyProtocol) -> EntryPolicy {
    EntryPolicy { proxy_protocol: version, ..test_policy() }
}

/// The header the specification prescribes for a connection from `client` to `vip`.
fn expected_header(
    version: ProxyProtocol,
    protocol: Protocol,
    client: SocketAddr,
    vip: SocketAddr,
) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {} {} {} {}\r\n", client.ip(), vip.ip(), client.port(), vip.port())
                .into_bytes()
        }
        ProxyProtocol::V2 => {
            let transport = if protocol == Protocol::Tcp { 1 } else { 2 };
            let mut header = SIGNATURE.to_vec();
            let addresses: Vec<u8> = match (client.ip(), vip.ip()) {
                (IpAddr::V4(c), IpAddr::V4(v)) => {
                    header.extend_from_slice(&[0x21, 0x10 | transport, 0, 12]);
                    [c.octets(), v.octets()].concat()
                }
                (IpAddr::V6(c), IpAddr::V6(v)) => {
                    header.extend_from_slice(&[0x21, 0x20 | transport, 0, 36]);
                    [c.octets(), v.octets()].concat()
                }
                _ => panic!("the tests use one family per connection"),
            };
            header.extend_from_slice(&addresses);
            header.extend_from_slice(&client.port().to_be_bytes());
            header.extend_from_slice(&vip.port().to_be_bytes());
            header
        }
        ProxyProtocol::None => Vec::new(),
    }
}

/// Reads one PROXY header of `version` off `stream`, exactly its bytes and no more (v1: through its
/// CRLF, at most 107 bytes; v2: the 16-byte preamble, then the length it gives).
fn read_header(stream: &mut TcpStream, version: ProxyProtocol) -> std::io::Result<Vec<u8>> {
    let mut header = Vec::new();
    match version {
        ProxyProtocol::V1 => {
            let mut byte = [0u8; 1];
            while !header.ends_with(b"\r\n") && header.len() < 107 {
                stream.read_exact(&mut byte)?;
                header.push(byte[0]);
            }
        }
        ProxyProtocol::V2 => {
            header.resize(16, 0);
            stream.read_exact(&mut header)?;
            let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
            header.resize(16 + len, 0);
            stream.read_exact(&mut header[16..])?;
        }
        ProxyProtocol::None => {}
    }
    Ok(header)
}

/// A backend on `ip` that reads the header of `version` of each connection, reports it, then
/// echoes everything that follows.
fn header_backend(ip: IpAddr, version: ProxyProtocol) -> (Server, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = Server::spawn_on(SocketAddr::new(ip, 0), move |mut stream| {
        let Ok(header) = read_header(&mut stream, version) else { return };
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(header);
        }
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buffer) {
            if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
    })
    .expect("header backend");
    (server, rx)
}

/// Connects `connections` clients in turn through `key`, each sending a message first: each
/// backend connection must start with the client's own header, then carry the message intact.
fn tcp_headers_arrive_first(key: VipKey, version: ProxyProtocol, relay: RelayMode, refusing_first: bool) {
    let (backend, headers) = header_backend(key.addr, version);
    let refusing = RefusingAddr::new().expect("refusing address");
    let mut backends = vec![(backend.addr(), true)];
    if refusing_first {
        backends.insert(0, (refusing.addr(), true));
    }
    let engine = start_engine(1, relay, snapshot(1, vec![entry(key, &backends, policy(version))]));
    let connections = 4;
    for i in 0..connections {
        let mut client = connect(key.socket_addr());
        let message = format!("client {i} speaks first");
        // Written before the proxy could have sent the header: the header must still come first.
        client.write_all(message.as_bytes()).expect("client writes");
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).expect("echo through the proxy");
        assert_eq!(echoed, message.as_bytes(), "the client's bytes follow the header intact");
        let header = headers.recv_timeout(IO_TIMEOUT).expect("the backend read a header");
        let local = client.local_addr().expect("client address");
        let expected = expected_header(version, Protocol::Tcp, local, key.socket_addr());
        assert_eq!(
            header,
            expected,
            "connection {i}: got {:?}, want {:?}",
            String::from_utf8_lossy(&header),
            String::from_utf8_lossy(&expected)
        );
    }
    let total = engine.stats().total();
    if refusing_first {
        assert!(total.connect_failures >= 1, "round robin tried the refusing backend first: {total:?}");
    }
    assert_eq!(backend.accepted(), connections, "one backend connection per client");
    assert!(headers.try_recv().is_err(), "one header per backend connection");
}

#[test]
fn v1_header_comes_before_the_client_bytes_with_copy_relay() {
    tcp_headers_arrive_first(tcp_key(160), ProxyProtocol::V1, RelayMode::Copy, false);
}

#[test]
fn v2_header_comes_before_the_client_bytes_with_splice_relay() {
    tcp_headers_arrive_first(tcp_key(161), ProxyProtocol::V2, RelayMode::Splice, false);
}

#[test]
fn v1_header_comes_before_the_client_bytes_with_auto_relay() {
    tcp_headers_arrive_first(tcp_key(162), ProxyProtocol::V1, RelayMode::Auto, false);
}

#[test]
fn a_retry_after_a_refused_connect_sends_the_connected_backend_its_header() {
    tcp_headers_arrive_first(tcp_key(163), ProxyProtocol::V2, RelayMode::Copy, true);
}

#[test]
fn ipv6_clients_get_tcp6_and_v2_ipv6_headers() {
    let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    for (version, relay) in [(ProxyProtocol::V1, RelayMode::Copy), (ProxyProtocol::V2, RelayMode::Splice)] {
        let key = VipKey::new(ip, free_port(ip), Protocol::Tcp);
        tcp_headers_arrive_first(key, version, relay, false);
    }
}

#[test]
fn without_proxy_protocol_the_backend_gets_the_client_bytes_only() {
    let key = tcp_key(164);
    let backend = testkit::backends::echo_server().expect("echo");
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"plain"), b"plain");
    assert_eq!(engine.stats().total().bytes_client_to_backend, 5, "not one byte of header");
}

#[test]
fn every_udp_datagram_to_the_backend_starts_with_the_v2_header_and_replies_have_none() {
    udp_datagrams_carry_the_header(udp_key(165));
}

#[test]
fn ipv6_udp_datagrams_carry_the_v2_ipv6_header() {
    let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let free = UdpSocket::bind(SocketAddr::new(ip, 0)).and_then(|s| s.local_addr()).expect("a free UDP port");
    udp_datagrams_carry_the_header(VipKey::new(ip, free.port(), Protocol::Udp));
}

/// A burst through UDP `key` (its backend and client on the key's loopback family): every datagram
/// reaches the backend behind the client's v2 header, and a reply reaches the client bare.
fn udp_datagrams_carry_the_header(key: VipKey) {
    let loopback = SocketAddr::new(if key.addr.is_ipv4() { [127, 0, 0, 1].into() } else { key.addr }, 0);
    let backend = UdpSocket::bind(loopback).expect("UDP backend");
    backend.set_read_timeout(Some(UDP_REPLY_TIMEOUT)).expect("timeout");
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(
            1,
            vec![entry(key, &[(backend.local_addr().expect("bound"), true)], policy(ProxyProtocol::V2))],
        ),
    );
    let client = UdpSocket::bind(loopback).expect("UDP client");
    client.set_read_timeout(Some(UDP_REPLY_TIMEOUT)).expect("timeout");
    let expected = expected_header(
        ProxyProtocol::V2,
        Protocol::Udp,
        client.local_addr().expect("client address"),
        key.socket_addr(),
    );
    // A burst of equal datagrams, as the datapath would group into one GSO send, and an empty one.
    let sent: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 100]).chain([Vec::new()]).collect();
    for datagram in &sent {
        client.send_to(datagram, key.socket_addr()).expect("send to the VIP");
    }
    let mut buffer = vec![0u8; 65_536];
    let mut proxy = None;
    for (i, datagram) in sent.iter().enumerate() {
        let (n, from) = backend.recv_from(&mut buffer).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        let got = &buffer[..n];
        assert_eq!(&got[..expected.len().min(n)], &expected[..], "datagram {i} starts with the header");
        assert_eq!(&got[expected.len()..], &datagram[..], "datagram {i}: its payload follows, intact");
        proxy = Some(from);
    }
    // The backend answers the payload alone: the client gets it as sent, with no header.
    let proxy = proxy.expect("datagrams came from the proxy");
    backend.send_to(b"reply", proxy).expect("backend replies");
    let (n, from) = client.recv_from(&mut buffer).expect("the reply reaches the client");
    assert_eq!((&buffer[..n], from), (&b"reply"[..], key.socket_addr()));
    wait_until("every datagram counted", Duration::from_secs(5), || {
        engine.stats().total().udp_datagrams_client_to_backend == sent.len() as u64
    });
    let total = engine.stats().total();
    assert_eq!(total.udp_drops_send, 0, "{total:?}");
    assert_eq!(total.flows_created, 1);
}
