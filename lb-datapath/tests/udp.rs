//! The UDP datapath over real loopback sockets: many clients echo through a VIP with replies from
//! the VIP address, flows stick to their backend, idle flows expire, not-ready backends get no new
//! flows (and existing ones move), an ICMP error ends only its own flow, the largest and empty
//! datagrams pass intact, removed VIPs stop receiving, source ranges are enforced, VIPs sharing a
//! port share a wildcard socket (each reaches its own backend, replies come from the VIP sent to, a
//! non-VIP address is dropped), and every fd and buffer comes back.
//!
//! The fd accounting is process-wide, so the leak test takes the write side of `FDS` while every
//! other test here holds its read side.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::RwLock;
use std::time::Duration;

use lb_core::{EntryPolicy, StaleFlowPolicy};
use lb_core::{Protocol, VipKey};
use lb_datapath::{Engine, RelayMode};
use support::*;
use testkit::backends::{
    MAX_UDP_PAYLOAD, UdpServer, fill_pattern, udp_echo_server, udp_named_server, udp_silent_server,
};

static FDS: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    FDS.read().unwrap_or_else(|e| e.into_inner())
}

fn named(reply: &[u8]) -> (String, Vec<u8>) {
    let colon = reply.iter().position(|&b| b == b':').expect("a named backend's reply has `name:`");
    (String::from_utf8(reply[..colon].to_vec()).expect("ascii name"), reply[colon + 1..].to_vec())
}

fn udp_engine(workers: usize, entries: Vec<lb_core::ServiceEntry>) -> Engine {
    start_engine(workers, RelayMode::Copy, snapshot(1, entries))
}

#[test]
fn many_clients_echo_through_the_vip_with_replies_from_the_vip_address() {
    let _fds = shared();
    let backends = [udp_echo_server().expect("echo"), udp_echo_server().expect("echo")];
    let key = udp_key(60);
    let list: Vec<_> = backends.iter().map(|b| (b.addr(), true)).collect();
    let engine = udp_engine(2, vec![entry(key, &list, test_policy())]);
    assert_eq!(engine.stats().total().udp_listeners, 2, "one VIP socket per worker");
    let clients: Vec<_> = (0..50).map(|_| udp_client()).collect();
    for round in 0..3u8 {
        for (i, client) in clients.iter().enumerate() {
            let message = format!("client {i} round {round}");
            let (reply, from) = udp_exchange(client, key.socket_addr(), message.as_bytes());
            assert_eq!(reply, message.as_bytes());
            assert_eq!(from, key.socket_addr(), "replies carry the VIP as source address");
        }
    }
    // A worker counts a reply just after sending it, so the client may read the counters first:
    // give them a bounded moment to settle.
    wait_until("the worker counted 150 replies", Duration::from_secs(5), || {
        engine.stats().total().udp_datagrams_backend_to_client == 150
    });
    let total = engine.stats().total();
    assert_eq!(total.flows_created, 50, "{total:?}");
    assert_eq!(total.flows_active, 50);
    assert_eq!(total.udp_datagrams_client_to_backend, 150);
    wait_until("the backends counted 150 datagrams", Duration::from_secs(5), || {
        backends[0].received() + backends[1].received() == 150
    });
    assert!(backends.iter().all(|b| b.peers() > 0), "both backends got flows");
}

#[test]
fn concurrent_clients_each_get_their_own_replies() {
    let _fds = shared();
    let backends = [udp_echo_server().expect("echo"), udp_echo_server().expect("echo")];
    let key = udp_key(77);
    let list: Vec<_> = backends.iter().map(|b| (b.addr(), true)).collect();
    let engine = udp_engine(2, vec![entry(key, &list, test_policy())]);
    // Many datagrams in flight at once, so completions and sends arrive in batches (80 at most, well
    // within the default socket buffers, so loopback never drops one).
    std::thread::scope(|scope| {
        for thread in 0..8 {
            scope.spawn(move || {
                let clients: Vec<_> = (0..10).map(|_| udp_client()).collect();
                for round in 0..30 {
                    for (i, client) in clients.iter().enumerate() {
                        let message = format!("t{thread} c{i} r{round}");
                        client.send_to(message.as_bytes(), key.socket_addr()).expect("send");
                    }
                    for (i, client) in clients.iter().enumerate() {
                        let mut buffer = [0u8; 64];
                        let (n, from) = client.recv_from(&mut buffer).expect("a reply for every datagram");
                        assert_eq!(&buffer[..n], format!("t{thread} c{i} r{round}").as_bytes());
                        assert_eq!(from, key.socket_addr());
                    }
                }
            });
        }
    });
    let total = engine.stats().total();
    assert_eq!(total.flows_created, 80, "{total:?}");
    assert_eq!(total.udp_drops_send + total.udp_drops_truncated + total.udp_drops_no_backend, 0);
}

#[test]
fn a_clients_datagrams_all_reach_the_same_backend() {
    let _fds = shared();
    let backends: Vec<UdpServer> =
        ["a", "b", "c"].iter().map(|n| udp_named_server(n).expect("named backend")).collect();
    let key = udp_key(61);
    let list: Vec<_> = backends.iter().map(|b| (b.addr(), true)).collect();
    let _engine = udp_engine(2, vec![entry(key, &list, test_policy())]);
    let clients: Vec<_> = (0..20).map(|_| udp_client()).collect();
    let mut chosen: HashMap<usize, String> = HashMap::new();
    for round in 0..5 {
        for (i, client) in clients.iter().enumerate() {
            let (reply, _) = udp_exchange(client, key.socket_addr(), format!("{i}/{round}").as_bytes());
            let (name, echoed) = named(&reply);
            assert_eq!(echoed, format!("{i}/{round}").as_bytes());
            let first = chosen.entry(i).or_insert_with(|| name.clone());
            assert_eq!(*first, name, "client {i} changed backend in round {round}");
        }
    }
    let used: HashSet<_> = chosen.values().collect();
    assert_eq!(used.len(), 3, "round robin spreads the 20 flows over all backends");
    wait_until("the backends counted 100 datagrams", Duration::from_secs(5), || {
        backends.iter().map(UdpServer::received).sum::<u64>() == 100
    });
    for backend in &backends {
        assert_eq!(backend.received() % 5, 0, "every flow of a backend sent it all 5 datagrams");
    }
}

#[test]
fn idle_flows_expire_after_the_configured_timeouts() {
    let _fds = shared();
    let echo = udp_echo_server().expect("echo");
    let silent = udp_silent_server().expect("silent");
    let answered = udp_key(62);
    let unanswered = udp_key(63);
    let policy = udp_policy(Duration::from_millis(150), Duration::from_millis(300));
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(
            1,
            vec![
                entry(answered, &[(echo.addr(), true)], policy),
                entry(unanswered, &[(silent.addr(), true)], policy),
            ],
        ),
    );
    let clients: Vec<_> = (0..4).map(|_| udp_client()).collect();
    for client in &clients {
        assert_eq!(udp_exchange(client, answered.socket_addr(), b"hi").0, b"hi");
        client.send_to(b"anyone?", unanswered.socket_addr()).expect("send");
    }
    wait_until("the silent backend got every datagram", Duration::from_secs(5), || silent.received() == 4);
    wait_until("all 8 flows expired", Duration::from_secs(10), || {
        let total = engine.stats().total();
        total.flows_expired == 8 && total.flows_active == 0
    });
    // An expired flow's client is served again by a new flow.
    assert_eq!(udp_exchange(&clients[0], answered.socket_addr(), b"again").0, b"again");
    assert_eq!(engine.stats().total().flows_created, 9);
}

#[test]
fn not_ready_backend_gets_no_new_flows() {
    let _fds = shared();
    let ready = udp_named_server("ready").expect("backend");
    let not_ready = udp_named_server("not-ready").expect("backend");
    let key = udp_key(64);
    let engine =
        udp_engine(2, vec![entry(key, &[(ready.addr(), true), (not_ready.addr(), false)], test_policy())]);
    // Clients stay open so each has its own port: a closed client's port can be reused by the next,
    // which would make it the same flow.
    let clients: Vec<_> = (0..20).map(|_| udp_client()).collect();
    for (i, client) in clients.iter().enumerate() {
        let (reply, _) = udp_exchange(client, key.socket_addr(), format!("{i}").as_bytes());
        assert_eq!(named(&reply).0, "ready");
    }
    assert_eq!(not_ready.received(), 0);
    assert_eq!(engine.stats().total().flows_created, 20);
}

#[test]
fn flows_of_a_backend_that_became_not_ready_move_on_their_next_datagram() {
    let _fds = shared();
    let first = udp_named_server("first").expect("backend");
    let second = udp_named_server("second").expect("backend");
    let key = udp_key(65);
    let engine =
        udp_engine(2, vec![entry(key, &[(first.addr(), true), (second.addr(), false)], test_policy())]);
    let clients: Vec<_> = (0..10).map(|_| udp_client()).collect();
    for client in &clients {
        assert_eq!(named(&udp_exchange(client, key.socket_addr(), b"x").0).0, "first");
    }
    publish(
        &engine,
        snapshot(2, vec![entry(key, &[(first.addr(), false), (second.addr(), true)], test_policy())]),
    );
    for client in &clients {
        assert_eq!(named(&udp_exchange(client, key.socket_addr(), b"y").0).0, "second");
    }
    let total = engine.stats().total();
    assert_eq!(total.flows_moved, 10, "{total:?}");
    assert_eq!(total.flows_active, 10);
    // A removed backend's flows move the same way.
    publish(&engine, snapshot(3, vec![entry(key, &[(first.addr(), true)], test_policy())]));
    for client in &clients {
        assert_eq!(named(&udp_exchange(client, key.socket_addr(), b"z").0).0, "first");
    }
    assert_eq!(engine.stats().total().flows_moved, 20);
}

#[test]
fn drain_policy_keeps_a_flow_on_its_backend_until_the_drain_timeout() {
    let _fds = shared();
    let first = udp_named_server("first").expect("backend");
    let second = udp_named_server("second").expect("backend");
    let key = udp_key(66);
    let policy = EntryPolicy { udp_stale_flows: StaleFlowPolicy::Drain, ..test_policy() }
        .with_drain(Duration::from_millis(200));
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(first.addr(), true), (second.addr(), false)], policy)]),
    );
    let client = udp_client();
    assert_eq!(named(&udp_exchange(&client, key.socket_addr(), b"1").0).0, "first");
    publish(&engine, snapshot(2, vec![entry(key, &[(first.addr(), false), (second.addr(), true)], policy)]));
    assert_eq!(named(&udp_exchange(&client, key.socket_addr(), b"2").0).0, "first", "draining, not moved");
    assert_eq!(named(&udp_exchange(&udp_client(), key.socket_addr(), b"new").0).0, "second");
    wait_until("the flow moves once the drain timeout passed", Duration::from_secs(10), || {
        named(&udp_exchange(&client, key.socket_addr(), b"3").0).0 == "second"
    });
    assert_eq!(engine.stats().total().flows_moved, 1);
}

#[test]
fn a_backend_that_disappears_fails_only_its_own_flows() {
    let _fds = shared();
    let stays = udp_named_server("stays").expect("backend");
    let goes = udp_named_server("goes").expect("backend");
    let key = udp_key(67);
    let engine = udp_engine(1, vec![entry(key, &[(stays.addr(), true), (goes.addr(), true)], test_policy())]);
    let clients: Vec<_> = (0..10).map(|_| udp_client()).collect();
    let mut on_goes = Vec::new();
    let mut on_stays = Vec::new();
    for client in clients {
        let (name, _) = named(&udp_exchange(&client, key.socket_addr(), b"hello").0);
        if name == "goes" { on_goes.push(client) } else { on_stays.push(client) }
    }
    assert!(!on_goes.is_empty() && !on_stays.is_empty(), "round robin used both backends");
    drop(goes);
    // Datagrams to the closed port draw ICMP port unreachable; the flow's receive fails with
    // ECONNREFUSED and only that flow ends.
    for client in &on_goes {
        client.send_to(b"still there?", key.socket_addr()).expect("send");
    }
    wait_until("the dead backend's flows failed", Duration::from_secs(5), || {
        engine.stats().total().flows_failed as usize == on_goes.len()
    });
    for client in &on_stays {
        let (reply, from) = udp_exchange(client, key.socket_addr(), b"unaffected");
        assert_eq!(named(&reply), ("stays".to_string(), b"unaffected".to_vec()));
        assert_eq!(from, key.socket_addr());
    }
    let total = engine.stats().total();
    assert_eq!(total.udp_listeners, 1, "the VIP socket is never torn down by a flow's error");
    assert_eq!(total.flows_active as usize, on_stays.len());
}

fn largest_and_empty_datagrams_pass_intact(key: VipKey, multishot_recv: bool) {
    let echo = udp_echo_server().expect("echo");
    let mut config = test_config(2, RelayMode::Copy);
    config.udp.multishot_recv = multishot_recv;
    let engine =
        start_engine_with(config, snapshot(1, vec![entry(key, &[(echo.addr(), true)], test_policy())]));
    let client = if key.addr.is_ipv6() {
        let socket = std::net::UdpSocket::bind("[::1]:0").expect("bind a v6 client");
        socket.set_read_timeout(Some(UDP_REPLY_TIMEOUT)).expect("timeout");
        socket
    } else {
        udp_client()
    };
    let mut largest = vec![0u8; MAX_UDP_PAYLOAD];
    fill_pattern(42, 0, &mut largest);
    for payload in [&largest[..], &[][..], b"small", &largest[..1000]] {
        let (reply, from) = udp_exchange(&client, key.socket_addr(), payload);
        assert_eq!(reply.len(), payload.len());
        assert!(reply == payload, "a {}-byte datagram came back altered", payload.len());
        assert_eq!(from, key.socket_addr());
    }
    let total = engine.stats().total();
    if multishot_recv && engine.features().multishot_recvmsg {
        // A zero-length datagram ends a multishot recvmsg (the kernel takes 0 bytes for end of
        // stream), so the VIP and the upstream socket each re-arm once for the empty one; the other
        // three datagrams keep their receives armed.
        assert!(total.udp_recv_rearms <= 2, "multishot receives stay armed: {total:?}");
    } else {
        assert!(total.udp_recv_rearms >= 8, "a single-shot receive is re-armed per datagram: {total:?}");
    }
    assert_eq!(total.udp_drops_truncated, 0);
    assert_eq!(total.udp_bytes_client_to_backend, MAX_UDP_PAYLOAD as u64 + 5 + 1000);
}

#[test]
fn largest_and_empty_datagrams_pass_intact_with_multishot_receives() {
    let _fds = shared();
    largest_and_empty_datagrams_pass_intact(udp_key(68), true);
}

#[test]
fn largest_and_empty_datagrams_pass_intact_with_single_shot_receives() {
    let _fds = shared();
    largest_and_empty_datagrams_pass_intact(udp_key(69), false);
}

#[test]
fn ipv6_vip_serves_udp() {
    let _fds = shared();
    let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let port =
        std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).expect("v6").local_addr().expect("bound").port();
    largest_and_empty_datagrams_pass_intact(VipKey::new(ip, port, Protocol::Udp), true);
}

#[test]
fn removed_vip_stops_receiving_and_ends_its_flows() {
    let _fds = shared();
    let echo = udp_echo_server().expect("echo");
    let key = udp_key(70);
    let engine = udp_engine(2, vec![entry(key, &[(echo.addr(), true)], test_policy())]);
    let client = udp_client();
    client.connect(key.socket_addr()).expect("connect the client to the VIP");
    client.send(b"one").expect("send");
    let mut buffer = [0u8; 16];
    assert_eq!(client.recv(&mut buffer).expect("echo"), 3);
    publish(&engine, snapshot(2, Vec::new()));
    wait_until("VIP sockets closed and flows ended", Duration::from_secs(5), || {
        let total = engine.stats().total();
        total.udp_listeners == 0 && total.flows_active == 0
    });
    // Nothing listens on the VIP any more: the kernel answers with port unreachable.
    client.send(b"two").expect("send");
    assert_eq!(client.recv(&mut buffer).map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused));
}

#[test]
fn clients_outside_the_source_ranges_are_dropped() {
    let _fds = shared();
    let echo = udp_echo_server().expect("echo");
    let fenced = udp_key(75);
    let open = udp_key(76);
    let range = |text: &str| text.parse::<lb_core::Cidr>().expect("literal CIDR");
    let mut outside = entry(fenced, &[(echo.addr(), true)], test_policy());
    outside.traffic.source_ranges = vec![range("10.0.0.0/8")];
    let mut inside = entry(open, &[(echo.addr(), true)], test_policy());
    inside.traffic.source_ranges = vec![range("10.0.0.0/8"), range("127.0.0.0/8")];
    let engine = udp_engine(1, vec![outside, inside]);
    let client = udp_client();
    client.send_to(b"let me in", fenced.socket_addr()).expect("send");
    wait_until("the datagram is dropped", Duration::from_secs(5), || {
        engine.stats().total().udp_drops_source_range == 1
    });
    assert_eq!(echo.received(), 0, "nothing from outside the ranges reaches a backend");
    assert_eq!(udp_exchange(&client, open.socket_addr(), b"allowed").0, b"allowed");
    assert_eq!(engine.stats().total().flows_created, 1);
}

#[test]
fn udp_and_tcp_keys_on_one_address_are_both_served() {
    let _fds = shared();
    let tcp_backend = testkit::backends::echo_server().expect("tcp echo");
    let udp_backend = udp_echo_server().expect("udp echo");
    let tcp = tcp_key(71);
    let udp = VipKey::new(tcp.addr, tcp.port, Protocol::Udp);
    let engine = udp_engine(
        2,
        vec![
            entry(tcp, &[(tcp_backend.addr(), true)], test_policy()),
            entry(udp, &[(udp_backend.addr(), true)], test_policy()),
        ],
    );
    let total = engine.stats().total();
    assert_eq!((total.listeners, total.udp_listeners), (2, 2));
    assert_eq!(round_trip(&mut connect(tcp.socket_addr()), b"tcp"), b"tcp");
    assert_eq!(udp_exchange(&udp_client(), udp.socket_addr(), b"udp").0, b"udp");
}

#[test]
fn full_flow_table_evicts_the_least_recently_used_flow() {
    let _fds = shared();
    let echo = udp_echo_server().expect("echo");
    let key = udp_key(72);
    let mut config = test_config(1, RelayMode::Copy);
    config.udp.max_flows_per_worker = 8;
    let engine =
        start_engine_with(config, snapshot(1, vec![entry(key, &[(echo.addr(), true)], test_policy())]));
    let clients: Vec<_> = (0..12).map(|_| udp_client()).collect();
    for client in &clients {
        assert_eq!(udp_exchange(client, key.socket_addr(), b"x").0, b"x");
    }
    let total = engine.stats().total();
    assert_eq!((total.flows_active, total.flows_evicted), (8, 4));
    // The evicted clients are served again by new flows.
    assert_eq!(udp_exchange(&clients[0], key.socket_addr(), b"back").0, b"back");
}

#[test]
fn udp_flows_return_every_fd_and_buffer() {
    let _fds = FDS.write().unwrap_or_else(|e| e.into_inner());
    let baseline = open_fds();
    let echo = udp_echo_server().expect("echo");
    // Not on 127.0.0.1: once closed, its port could become a client's, which would then receive
    // what is sent to the closed port.
    let doomed =
        UdpServer::spawn_on("127.0.0.74:0".parse().expect("literal address"), |_| None).expect("bind");
    let served = udp_key(73);
    let failing = udp_key(74);
    let doomed_addr = doomed.addr();
    drop(doomed);
    let policy = udp_policy(Duration::from_millis(100), Duration::from_millis(100));
    let engine = start_engine(
        2,
        RelayMode::Copy,
        snapshot(
            1,
            vec![
                entry(served, &[(echo.addr(), true)], policy),
                entry(failing, &[(doomed_addr, true)], policy),
            ],
        ),
    );
    let with_engine = open_fds();
    for round in 0..3 {
        let clients: Vec<_> = (0..40).map(|_| udp_client()).collect();
        for client in &clients {
            assert_eq!(udp_exchange(client, served.socket_addr(), b"payload").0, b"payload");
            client.send_to(b"to a closed port", failing.socket_addr()).expect("send");
        }
        drop(clients);
        wait_until("every flow ended", Duration::from_secs(10), || engine.stats().total().flows_active == 0);
        let total = engine.stats().total();
        assert_eq!(total.flows_created, 80 * (round + 1), "{total:?}");
        assert_eq!(total.flows_expired + total.flows_failed, 80 * (round + 1));
    }
    wait_until("fds back to the engine's own", Duration::from_secs(10), || open_fds() <= with_engine);
    // Removing the VIP ends its live flows and closes its sockets.
    let live: Vec<_> = (0..10).map(|_| udp_client()).collect();
    for client in &live {
        assert_eq!(udp_exchange(client, served.socket_addr(), b"live").0, b"live");
    }
    publish(&engine, snapshot(2, Vec::new()));
    let total = engine.stats().total();
    assert_eq!((total.udp_listeners, total.flows_active), (0, 0));
    drop(live);
    drop(engine);
    // Stopping an engine with live flows returns everything too.
    let engine = start_engine_with(
        test_config(2, RelayMode::Copy),
        snapshot(1, vec![entry(served, &[(echo.addr(), true)], test_policy())]),
    );
    let live: Vec<_> = (0..10).map(|_| udp_client()).collect();
    for client in &live {
        assert_eq!(udp_exchange(client, served.socket_addr(), b"live").0, b"live");
    }
    assert_eq!(engine.stats().total().flows_active, 10);
    drop(engine);
    drop(live);
    drop(echo);
    wait_until("fds back to baseline", Duration::from_secs(10), || open_fds() <= baseline);
}

#[test]
fn each_services_flows_expire_by_its_own_timeouts() {
    let _fds = shared();
    let echo = udp_echo_server().expect("echo");
    let (quick, lasting) = (udp_key(116), udp_key(117));
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(
            1,
            vec![
                entry(
                    quick,
                    &[(echo.addr(), true)],
                    udp_policy(Duration::from_millis(100), Duration::from_millis(100)),
                ),
                entry(
                    lasting,
                    &[(echo.addr(), true)],
                    udp_policy(Duration::from_secs(60), Duration::from_secs(60)),
                ),
            ],
        ),
    );
    let clients: Vec<_> = (0..3).map(|_| udp_client()).collect();
    for client in &clients {
        assert_eq!(udp_exchange(client, quick.socket_addr(), b"q").0, b"q");
        assert_eq!(udp_exchange(client, lasting.socket_addr(), b"l").0, b"l");
    }
    wait_until("the quick Service's flows expired", Duration::from_secs(10), || {
        engine.stats().total().flows_expired == 3
    });
    let total = engine.stats().total();
    assert_eq!(total.flows_active, 3, "the other Service's flows live on: {total:?}");
}

/// Two UDP VIPs on one port behind one wildcard socket per worker (`ListenMode::Wildcard`), with
/// multishot or single-shot receives: each client, `connect`ed to its VIP (so a reply from any
/// other source is never received), reaches its VIP's backend and gets replies from that VIP; a
/// datagram to an address of the host that is no VIP of the port is dropped and counted.
fn wildcard_serves_each_vip_from_its_own_address(multishot_recv: bool) {
    let _fds = shared();
    let port = free_udp_port_everywhere();
    let names = ["a", "b"];
    let backends: Vec<_> = names.iter().map(|n| udp_named_server(n).expect("named backend")).collect();
    let octet = if multishot_recv { 160 } else { 163 };
    let keys =
        [VipKey::new(vip(octet), port, Protocol::Udp), VipKey::new(vip(octet + 1), port, Protocol::Udp)];
    let entries =
        keys.iter().zip(&backends).map(|(key, b)| entry(*key, &[(b.addr(), true)], test_policy())).collect();
    let config = lb_datapath::EngineConfig {
        listen_mode: lb_datapath::ListenMode::Wildcard,
        udp: lb_datapath::UdpConfig { multishot_recv, ..lb_datapath::UdpConfig::default() },
        ..test_config(2, RelayMode::Copy)
    };
    let engine = start_engine_with(config, snapshot(1, entries));
    assert_eq!(engine.stats().total().udp_listeners, 2, "one wildcard socket per worker for two VIPs");
    for round in 0..3 {
        for (key, name) in keys.iter().zip(names) {
            let client = udp_client();
            client.connect(key.socket_addr()).expect("connect to the VIP");
            let message = format!("{name} round {round}");
            client.send(message.as_bytes()).expect("send");
            let mut buffer = [0u8; 256];
            let n = client.recv(&mut buffer).unwrap_or_else(|e| panic!("no reply from {key}: {e}"));
            let (from, echoed) = named(&buffer[..n]);
            assert_eq!((from.as_str(), echoed.as_slice()), (name, message.as_bytes()), "{key}");
        }
    }
    let total = engine.stats().total();
    assert_eq!((total.flows_created, total.udp_drops_not_a_vip), (6, 0), "{total:?}");

    let stranger = udp_client();
    stranger.connect(SocketAddr::new(vip(octet + 2), port)).expect("connect");
    stranger.send(b"who is there").expect("send");
    wait_until("the stranger's datagram was dropped", Duration::from_secs(5), || {
        engine.stats().total().udp_drops_not_a_vip == 1
    });
    let mut buffer = [0u8; 64];
    stranger.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    assert!(stranger.recv(&mut buffer).is_err(), "no reply to an address that is no VIP");
    let total = engine.stats().total();
    assert_eq!(total.flows_created, 6, "no flow for the stranger: {total:?}");
}

#[test]
fn udp_vips_sharing_a_port_share_a_wildcard_and_replies_come_from_the_vip_sent_to() {
    wildcard_serves_each_vip_from_its_own_address(true);
}

#[test]
fn udp_wildcard_dispatch_works_with_single_shot_receives() {
    wildcard_serves_each_vip_from_its_own_address(false);
}

/// With the default (`ListenMode::Auto`): 10,000 UDP sockets per worker do not fit the descriptor
/// budget of a 20,000 limit, so the UDP VIPs of the port share a wildcard, and each still answers
/// from its own address.
#[test]
fn ten_thousand_udp_vips_on_one_port_take_one_socket_per_worker() {
    let _fds = shared();
    let port = free_udp_port_everywhere();
    let backend = udp_echo_server().expect("echo");
    let vips = many_vips(10_000, 2, port, Protocol::Udp);
    let entries = vips.iter().map(|key| entry(*key, &[(backend.addr(), true)], test_policy())).collect();
    let config =
        lb_datapath::EngineConfig { descriptor_limit: Some(20_000), ..test_config(2, RelayMode::Copy) };
    let engine = start_engine_with(config, snapshot(1, entries));
    let total = engine.stats().total();
    assert_eq!(total.udp_listeners, 2, "{total:?}");
    assert!(total.descriptors < 64, "two workers hold {} descriptors for 10,000 VIPs", total.descriptors);
    for key in vips.iter().step_by(499) {
        let client = udp_client();
        client.connect(key.socket_addr()).expect("connect to the VIP");
        client.send(b"one of many").expect("send");
        let mut buffer = [0u8; 64];
        let n = client.recv(&mut buffer).unwrap_or_else(|e| panic!("no reply from {key}: {e}"));
        assert_eq!(&buffer[..n], b"one of many", "{key}");
    }
}
