//! Listener reconciliation over real loopback sockets: IPv6 VIPs, bind failures retried until they
//! succeed, UDP keys on the same address as TCP ones served side by side (UDP: tests/udp.rs), and
//! VIPs sharing a port served through one wildcard socket per worker (or, where the wildcard
//! collides with another socket on the host, one socket per VIP).

mod support;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::time::Duration;

use lb_core::{Protocol, VipKey};
use lb_datapath::RelayMode;
use support::*;
use testkit::backends::echo_server;

#[test]
fn ipv6_vip_relays_to_an_ipv4_backend() {
    let backend = echo_server().expect("backend");
    let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let key = VipKey::new(ip, free_port(ip), Protocol::Tcp);
    let _engine = start_engine(
        1,
        RelayMode::Splice,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"over v6"), b"over v6");
}

#[test]
fn failed_bind_is_retried_until_the_address_is_free() {
    let backend = echo_server().expect("backend");
    let key = tcp_key(50);
    // A socket without SO_REUSEPORT holds the VIP:port, so the workers' binds fail.
    let blocker = TcpListener::bind(key.socket_addr()).expect("hold the VIP port");
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    wait_until("a bind failure is counted", Duration::from_secs(5), || {
        engine.stats().total().bind_failures > 0
    });
    assert_eq!(engine.stats().total().listeners, 0);
    drop(blocker);
    wait_until("the listener is bound at a later tick", Duration::from_secs(5), || {
        engine.stats().total().listeners == 1
    });
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"bound at last"), b"bound at last");
}

#[test]
fn udp_keys_get_their_own_sockets_and_tcp_keys_still_served() {
    let backend = echo_server().expect("backend");
    let tcp = tcp_key(51);
    let udp = VipKey::new(tcp.addr, tcp.port, Protocol::Udp);
    let entries = vec![
        entry(tcp, &[(backend.addr(), true)], test_policy()),
        entry(udp, &[(SocketAddr::new(backend.addr().ip(), backend.addr().port()), true)], test_policy()),
    ];
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, entries));
    let total = engine.stats().total();
    assert_eq!(total.listeners, 2, "one TCP listener per worker");
    assert_eq!(total.udp_listeners, 2, "one UDP VIP socket per worker, counted apart");
    let mut client = connect(tcp.socket_addr());
    assert_eq!(round_trip(&mut client, b"tcp"), b"tcp");
}

#[test]
fn republishing_the_same_keys_keeps_listeners_and_connections() {
    let backend = echo_server().expect("backend");
    let key = tcp_key(52);
    let make = |version| snapshot(version, vec![entry(key, &[(backend.addr(), true)], test_policy())]);
    let engine = start_engine(2, RelayMode::Splice, make(1));
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"one"), b"one");
    for version in 2..20 {
        publish(&engine, make(version));
    }
    assert_eq!(engine.current().version, 19);
    assert_eq!(round_trip(&mut client, b"two"), b"two", "publishing never disturbs a connection");
    assert_eq!(engine.stats().total().listeners, 2);
    assert_eq!(engine.stats().total().resets, 0);
}

#[test]
fn publishing_during_a_transfer_never_disturbs_it() {
    use std::io::Write;
    use testkit::backends::{read_pattern, stream_header, stream_server, write_pattern};

    let (backend, reports) = stream_server().expect("stream backend");
    let other = echo_server().expect("other backend");
    let key = tcp_key(53);
    let extra = tcp_key(54);
    let engine = start_engine(
        1,
        RelayMode::Auto,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut client = connect(key.socket_addr());
    let len = 128 * 1024 * 1024;
    client.write_all(&stream_header(3, 4, len)).expect("header");
    let mut writer = client.try_clone().expect("clone");
    let uploader = std::thread::spawn(move || {
        write_pattern(&mut writer, 3, len).expect("upload");
        writer.shutdown(std::net::Shutdown::Write).expect("half-close");
    });
    // The kernel completes the handshake before the worker accepts; publish only once the
    // connection reached its backend, or it may legitimately be sent to `other`.
    wait_until("connection reached the stream backend", Duration::from_secs(5), || backend.accepted() == 1);
    let publisher = {
        let (backend, other) = (backend.addr(), other.addr());
        let engine = &engine;
        move || {
            for version in 2..40u64 {
                // Alternate: the backend becomes not-ready, another VIP comes and goes.
                let ready = version % 2 == 0;
                let mut entries = vec![entry(key, &[(backend, ready), (other, true)], test_policy())];
                if version % 3 == 0 {
                    entries.push(entry(extra, &[(other, true)], test_policy()));
                }
                publish(engine, snapshot(version, entries));
            }
        }
    };
    std::thread::scope(|scope| {
        let publishing = scope.spawn(publisher);
        let (received, intact) = read_pattern(&mut client, 4).expect("download during publishes");
        assert_eq!((received, intact), (len, true));
        publishing.join().expect("publisher");
    });
    uploader.join().expect("uploader");
    let report = reports.recv_timeout(Duration::from_secs(30)).expect("backend report");
    assert_eq!((report.received, report.intact), (len, true));
    assert_eq!(engine.stats().total().resets, 0);
}

#[test]
fn a_drain_closes_every_listener_at_once_while_established_connections_and_flows_go_on() {
    let echo = echo_server().expect("backend");
    let udp_echo = testkit::backends::udp_echo_server().expect("udp backend");
    let tcp = tcp_key(134);
    let udp = udp_key(134);
    let engine = start_engine(
        2,
        RelayMode::Copy,
        snapshot(
            1,
            vec![
                entry(tcp, &[(echo.addr(), true)], test_policy()),
                entry(udp, &[(udp_echo.addr(), true)], test_policy()),
            ],
        ),
    );
    let mut established = connect(tcp.socket_addr());
    assert_eq!(round_trip(&mut established, b"before"), b"before");
    let flow = udp_client();
    assert_eq!(udp_exchange(&flow, udp.socket_addr(), b"before").0, b"before");

    engine.begin_drain();
    assert!(!engine.is_ready(), "a draining engine is not ready");
    wait_until("every TCP listener closed", Duration::from_secs(10), || {
        engine.stats().total().listeners == 0
    });
    let refused = std::net::TcpStream::connect_timeout(&tcp.socket_addr(), IO_TIMEOUT);
    assert!(
        refused.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "new clients are refused"
    );
    assert_eq!(round_trip(&mut established, b"still going"), b"still going");
    assert_eq!(udp_exchange(&flow, udp.socket_addr(), b"flow goes on").0, b"flow goes on");
    let newcomer = udp_client();
    newcomer.send_to(b"new flow?", udp.socket_addr()).expect("send");
    wait_until("the new client's datagram is dropped", Duration::from_secs(10), || {
        engine.stats().total().udp_drops_no_backend == 1
    });
    assert_eq!(engine.stats().total().flows_created, 1, "no flow is created while draining");
    assert!(!engine.is_drained());

    // Publishing during a drain opens nothing again.
    let again = vec![
        entry(tcp, &[(echo.addr(), true)], test_policy()),
        entry(udp, &[(udp_echo.addr(), true)], test_policy()),
    ];
    engine.publish(snapshot(2, again));
    wait_until("the publish is reconciled", Duration::from_secs(10), || engine.is_reconciled());
    assert_eq!(engine.stats().total().listeners, 0);
    drop(established);
    wait_until("the TCP connection ended", Duration::from_secs(10), || engine.stats().total().active == 0);
    assert!(!engine.is_drained(), "the UDP flow still lives until it expires");
}

/// A port free on every address (the VIPs of a wildcard group share it).
fn port_free_everywhere() -> u16 {
    TcpListener::bind("0.0.0.0:0").expect("bind").local_addr().expect("bound").port()
}

/// Two workers that always share a wildcard socket among VIPs of one port (the default does so
/// only once socket-per-VIP does not fit the descriptor budget).
fn wildcard_config() -> lb_datapath::EngineConfig {
    lb_datapath::EngineConfig {
        listen_mode: lb_datapath::ListenMode::Wildcard,
        ..test_config(2, RelayMode::Copy)
    }
}

fn on(octet: u8, port: u16) -> VipKey {
    VipKey::new(vip(octet), port, Protocol::Tcp)
}

#[test]
fn vips_sharing_a_port_share_one_wildcard_socket_and_each_reaches_its_own_backend() {
    let port = port_free_everywhere();
    let names = ["a", "b", "c"];
    let backends: Vec<_> =
        names.iter().map(|n| testkit::backends::named_server(n).expect("backend")).collect();
    let keys = [on(61, port), on(62, port), on(63, port)];
    let entries = keys
        .iter()
        .zip(&backends)
        .map(|(key, backend)| entry(*key, &[(backend.addr(), true)], test_policy()))
        .collect();
    let engine = start_engine_with(wildcard_config(), snapshot(1, entries));
    assert_eq!(engine.stats().total().listeners, 2, "one wildcard socket per worker for three VIPs");
    let mut held = None;
    for _ in 0..3 {
        for (key, name) in keys.iter().zip(names) {
            let mut client = connect(key.socket_addr());
            assert_eq!(read_name(&mut client), name, "{key} reaches its own backend");
            held = Some(client);
        }
    }
    // An address of this host that is no VIP of the port is refused, not served.
    let stranger = SocketAddr::new(vip(64), port);
    assert_eq!(connect_and_read_to_close(stranger), Err(std::io::ErrorKind::ConnectionReset));
    assert_eq!(engine.stats().total().tcp_refused_not_a_vip, 1);

    // Down to one VIP on the port: it gets a socket of its own and the wildcard goes; the
    // connection made through the wildcard goes on.
    publish(&engine, snapshot(2, vec![entry(keys[2], &[(backends[2].addr(), true)], test_policy())]));
    wait_until("the wildcard closed", Duration::from_secs(5), || engine.stats().total().listeners == 2);
    let mut client = connect(keys[2].socket_addr());
    assert_eq!(read_name(&mut client), "c");
    let refused = std::net::TcpStream::connect_timeout(&keys[0].socket_addr(), Duration::from_secs(2));
    assert_eq!(refused.map(|_| ()).map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionRefused));
    let mut held = held.expect("a connection");
    assert_eq!(round_trip(&mut held, b"still"), b"still", "the connection made through the wildcard goes on");
    assert_eq!(engine.stats().total().tcp_refused_not_a_vip, 1);
}

#[test]
fn a_wildcard_that_collides_with_another_socket_on_the_host_falls_back_to_one_socket_per_vip() {
    let port = port_free_everywhere();
    // Someone else on the host listens on this port on one address (no SO_REUSEPORT).
    let host_service = TcpListener::bind(SocketAddr::new(vip(69), port)).expect("host service");
    let backend = echo_server().expect("backend");
    let keys = [on(66, port), on(67, port)];
    let entries = keys.iter().map(|key| entry(*key, &[(backend.addr(), true)], test_policy())).collect();
    let engine = start_engine_with(wildcard_config(), snapshot(1, entries));
    assert_eq!(engine.stats().total().listeners, 4, "two workers, one socket per VIP");
    for key in keys {
        let mut client = connect(key.socket_addr());
        assert_eq!(round_trip(&mut client, b"exact"), b"exact");
    }
    let _theirs = connect(SocketAddr::new(vip(69), port));
    host_service.set_nonblocking(false).expect("blocking");
    let (_, peer) = host_service.accept().expect("the host service still gets its own connections");
    assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 1]));
    assert_eq!(engine.stats().total().tcp_refused_not_a_vip, 0);
}

#[test]
fn vips_sharing_a_port_get_sockets_of_their_own_while_those_fit() {
    let port = port_free_everywhere();
    let backend = echo_server().expect("backend");
    let keys = [on(76, port), on(77, port)];
    let entries = keys.iter().map(|key| entry(*key, &[(backend.addr(), true)], test_policy())).collect();
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, entries));
    assert_eq!(engine.stats().total().listeners, 4, "the default binds each VIP while they fit");
    let stranger = SocketAddr::new(vip(78), port);
    let refused = std::net::TcpStream::connect_timeout(&stranger, Duration::from_secs(2));
    assert_eq!(refused.map(|_| ()).map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionRefused));
}

/// With the default (`ListenMode::Auto`): 10,000 sockets per worker do not fit the descriptor
/// budget of a 20,000 limit, so the VIPs of the port share a wildcard.
#[test]
fn ten_thousand_vips_on_one_port_take_one_socket_per_worker() {
    let port = port_free_everywhere();
    let backend = echo_server().expect("backend");
    let vips = many_vips(10_000, 1, port, Protocol::Tcp);
    let entries = vips.iter().map(|key| entry(*key, &[(backend.addr(), true)], test_policy())).collect();
    // The limit of the machine this is about (the micro-VM's is larger, and 20,000 sockets fit it).
    let config =
        lb_datapath::EngineConfig { descriptor_limit: Some(20_000), ..test_config(2, RelayMode::Copy) };
    let engine = start_engine_with(config, snapshot(1, entries));
    let total = engine.stats().total();
    assert_eq!(total.listeners, 2, "{total:?}");
    assert!(total.descriptors < 64, "two workers hold {} descriptors for 10,000 VIPs", total.descriptors);
    for key in vips.iter().step_by(499) {
        let mut client = connect(key.socket_addr());
        assert_eq!(round_trip(&mut client, b"one of many"), b"one of many", "{key}");
    }
}
