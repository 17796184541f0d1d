//! Selection policies over real loopback sockets: `loadBalancerSourceRanges` refuses TCP clients at
//! accept (IPv4 and IPv6), the least-connection scheduler follows the worker's open connections and
//! its counts return to zero on every way a connection or flow ends, round-robin cursors start per
//! worker, and `sessionAffinity: ClientIP` keeps a client on its backend across connections and
//! snapshots until that backend turns not ready (and UDP flows of one client IP share a backend).

mod support;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use lb_core::{Cidr, Protocol, Scheduler, SchedulerKind, ServiceEntry, VipKey};
use lb_datapath::{Engine, RelayMode};
use support::*;
use testkit::backends::{RefusingAddr, named_server, reset_server, udp_echo_server, udp_named_server};

const STATS_WAIT: Duration = Duration::from_secs(10);

fn with_scheduler(mut entry: ServiceEntry, kind: SchedulerKind) -> ServiceEntry {
    entry.scheduler = Scheduler::build(kind, &entry.backends, &entry.eligible);
    entry
}

fn with_ranges(mut entry: ServiceEntry, ranges: &[&str]) -> ServiceEntry {
    entry.traffic.source_ranges =
        ranges.iter().map(|r| r.parse::<Cidr>().unwrap_or_else(|e| panic!("range {r}: {e}"))).collect();
    entry
}

/// `sessionAffinity: ClientIP` with the default timeout, as lb-core's builder sets it.
fn with_affinity(mut entry: ServiceEntry) -> ServiceEntry {
    entry.traffic.session_affinity = Some(lb_core::affinity::DEFAULT_TIMEOUT);
    entry
}

/// Waits until nothing is open: no client connection held and no backend counted in any worker's
/// load table.
fn wait_until_idle(engine: &Engine) {
    wait_until("no connection open and every load count back to zero", STATS_WAIT, || {
        let total = engine.stats().total();
        total.active == 0 && total.backend_load == 0
    });
}

/// A client is refused (reset at once, or refused) rather than served.
fn assert_refused(addr: SocketAddr) {
    match connect_and_read_to_close(addr) {
        Err(ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted) => {}
        other => panic!("a client outside the source ranges must be reset, got {other:?}"),
    }
}

fn source_ranges_refuse_then_admit(key: VipKey, outside: &[&str], inside: &[&str]) {
    let backend = named_server("inside").expect("backend");
    let backends = [(backend.addr(), true)];
    let refusing = with_ranges(entry(key, &backends, test_policy()), outside);
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, vec![refusing]));
    for _ in 0..3 {
        assert_refused(key.socket_addr());
    }
    wait_until("every refusal counted", STATS_WAIT, || engine.stats().total().tcp_refused_source_range == 3);
    let total = engine.stats().total();
    assert_eq!(backend.accepted(), 0, "a refused client must never reach a backend");
    assert_eq!((total.connect_failures, total.no_backend), (0, 0), "{total:?}");
    assert_eq!(total.backend_load, 0, "a refused client is never counted against a backend");

    publish(&engine, snapshot(2, vec![with_ranges(entry(key, &backends, test_policy()), inside)]));
    let mut client = connect(key.socket_addr());
    assert_eq!(read_name(&mut client), "inside");
    assert_eq!(round_trip(&mut client, b"admitted"), b"admitted");
    assert_eq!(engine.stats().total().tcp_refused_source_range, 3);
    drop(client);
    wait_until_idle(&engine);
}

#[test]
fn tcp_client_outside_the_source_ranges_is_reset_at_accept_and_no_backend_sees_it() {
    source_ranges_refuse_then_admit(tcp_key(90), &["10.0.0.0/8", "2001:db8::/32"], &["127.0.0.0/8"]);
}

#[test]
fn ipv6_tcp_client_outside_the_source_ranges_is_reset_at_accept() {
    let ip = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let key = VipKey::new(ip, free_port(ip), Protocol::Tcp);
    // 127.0.0.0/8 does not cover ::1 (no v4-mapped confusion); ::1/128 does.
    source_ranges_refuse_then_admit(key, &["127.0.0.0/8", "fd00::/8"], &["::1/128"]);
}

#[test]
fn least_connection_sends_a_new_connection_to_the_backend_with_fewer_open_connections() {
    let a = named_server("a").expect("backend a");
    let b = named_server("b").expect("backend b");
    let key = tcp_key(91);
    let lc = with_scheduler(
        entry(key, &[(a.addr(), true), (b.addr(), true)], test_policy()),
        SchedulerKind::LeastConnection,
    );
    let engine = start_engine(1, RelayMode::Copy, snapshot(1, vec![lc]));
    let mut first = connect(key.socket_addr());
    let first_name = read_name(&mut first);
    let mut second = connect(key.socket_addr());
    let second_name = read_name(&mut second);
    assert_ne!(first_name, second_name, "lc sent a connection to the busier backend");
    assert_eq!(engine.stats().total().backend_load, 2);

    // With `first` closed its backend has 0 open connections against 1: it gets the next one, twice
    // in a row would mean the count did not come down.
    drop(first);
    wait_until("the closed connection left the load table", STATS_WAIT, || {
        engine.stats().total().backend_load == 1
    });
    let mut third = connect(key.socket_addr());
    assert_eq!(read_name(&mut third), first_name, "lc must pick the backend with fewer open connections");
    let mut fourth = connect(key.socket_addr());
    let fourth_name = read_name(&mut fourth);
    assert!(fourth_name == "a" || fourth_name == "b");
    assert_eq!(engine.stats().total().backend_load, 3);
    for mut client in [second, third, fourth] {
        assert_eq!(round_trip(&mut client, b"bye"), b"bye");
    }
    wait_until_idle(&engine);
}

#[test]
fn load_counts_return_to_zero_after_refused_connects_resets_and_closes() {
    let refusing = RefusingAddr::new().expect("refusing address");
    let good = named_server("good").expect("backend");
    let resetting = reset_server().expect("resetting backend");
    let retried = tcp_key(92);
    let reset = tcp_key(93);
    let entries = vec![
        with_scheduler(
            entry(retried, &[(refusing.addr(), true), (good.addr(), true)], test_policy()),
            SchedulerKind::LeastConnection,
        ),
        entry(reset, &[(resetting.addr(), true)], test_policy()),
    ];
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, entries));
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut client = connect(retried.socket_addr());
        assert_eq!(read_name(&mut client), "good");
        held.push(client);
    }
    let total = engine.stats().total();
    assert!(total.connect_failures >= 1, "the refusing backend was tried: {total:?}");
    assert_eq!(total.backend_load, 4, "only established connections stay counted: {total:?}");
    for _ in 0..3 {
        let mut client = connect(reset.socket_addr());
        std::io::Write::write_all(&mut client, b"xx").expect("write to the resetting backend");
        assert!(read_to_close(&mut client).is_err(), "the backend's reset reaches the client");
    }
    drop(held);
    wait_until_idle(&engine);
}

#[test]
fn udp_flows_are_counted_until_they_expire() {
    let echo = udp_echo_server().expect("echo");
    let key = udp_key(94);
    let policy = udp_policy(Duration::from_secs(2), Duration::from_secs(2));
    let engine =
        start_engine(2, RelayMode::Copy, snapshot(1, vec![entry(key, &[(echo.addr(), true)], policy)]));
    let clients: Vec<_> = (0..3).map(|_| udp_client()).collect();
    for client in &clients {
        assert_eq!(udp_exchange(client, key.socket_addr(), b"hi").0, b"hi");
    }
    assert_eq!(engine.stats().total().backend_load, 3, "one count per flow");
    wait_until("the flows expired and left the load table", STATS_WAIT, || {
        let total = engine.stats().total();
        total.flows_active == 0 && total.backend_load == 0
    });
}

#[test]
fn each_workers_first_round_robin_pick_is_its_own_backend() {
    let a = named_server("a").expect("backend a");
    let b = named_server("b").expect("backend b");
    // Entries sort backends by address; worker i starts at sorted backend i.
    let mut sorted = [("a", a.addr()), ("b", b.addr())];
    sorted.sort_by_key(|&(_, addr)| addr);
    let key = tcp_key(95);
    let engine = start_engine(
        2,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(a.addr(), true), (b.addr(), true)], test_policy())]),
    );
    let mut firsts: HashMap<usize, String> = HashMap::new();
    // The kernel hashes each new client port to one worker; both get one within a few tries.
    for _ in 0..200 {
        let before = engine.stats();
        let mut client = connect(key.socket_addr());
        let name = read_name(&mut client);
        let after = engine.stats();
        let worker = (0..2)
            .find(|&w| after.workers[w].accepted > before.workers[w].accepted)
            .expect("one worker accepted the connection");
        firsts.entry(worker).or_insert(name);
        if firsts.len() == 2 {
            break;
        }
    }
    assert_eq!(firsts.len(), 2, "both workers accepted a connection");
    assert_eq!(firsts[&0], sorted[0].0, "worker 0 starts at the first backend");
    assert_eq!(firsts[&1], sorted[1].0, "worker 1 starts at the second backend, not the first again");
}

#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend_until_it_turns_not_ready() {
    let servers: Vec<_> = ["a", "b", "c"].iter().map(|name| named_server(name).expect("backend")).collect();
    let names: HashMap<SocketAddr, &str> =
        servers.iter().zip(["a", "b", "c"]).map(|(s, name)| (s.addr(), name)).collect();
    let key = tcp_key(96);
    let sticky = |ready: &dyn Fn(&str) -> bool| {
        let backends: Vec<_> = servers.iter().map(|s| (s.addr(), ready(names[&s.addr()]))).collect();
        with_affinity(entry(key, &backends, test_policy()))
    };
    // Two workers: the kernel spreads one client's connections over both by source port.
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, vec![sticky(&|_| true)]));
    let name_of_next = || {
        let mut client = connect(key.socket_addr());
        read_name(&mut client)
    };
    let bound = name_of_next();
    for _ in 0..5 {
        assert_eq!(name_of_next(), bound, "round robin alone would have moved the client");
    }

    // Another backend turns not ready: the bound one stays eligible, so the binding survives.
    let other = ["a", "b", "c"].into_iter().find(|&n| n != bound).expect("three backends");
    publish(&engine, snapshot(2, vec![sticky(&|n| n != other)]));
    for _ in 0..3 {
        assert_eq!(name_of_next(), bound, "a snapshot that keeps the backend eligible keeps the client");
    }

    // The bound backend turns not ready: the client moves, and sticks to its new backend.
    publish(&engine, snapshot(3, vec![sticky(&|n| n != bound)]));
    let moved = name_of_next();
    assert_ne!(moved, bound, "a not-ready backend keeps no affinity");
    for _ in 0..3 {
        assert_eq!(name_of_next(), moved, "the new binding holds");
    }
    wait_until_idle(&engine);
}

#[test]
fn client_ip_affinity_sends_every_udp_flow_of_one_client_ip_to_one_backend() {
    let servers: Vec<_> = ["a", "b", "c"].iter().map(|n| udp_named_server(n).expect("backend")).collect();
    let key = udp_key(97);
    let backends: Vec<_> = servers.iter().map(|s| (s.addr(), true)).collect();
    let engine = start_engine(
        4,
        RelayMode::Copy,
        snapshot(1, vec![with_affinity(entry(key, &backends, test_policy()))]),
    );
    // Each client socket has its own port, hence its own flow (on whichever of the 4 workers the
    // kernel hashes it to); round robin alone would spread them.
    // The sockets stay open so a closed one's port cannot be reused by the next.
    let clients: Vec<_> = (0..6).map(|_| udp_client()).collect();
    let names: Vec<String> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            let payload = format!("flow {i}");
            let (reply, _) = udp_exchange(client, key.socket_addr(), payload.as_bytes());
            let colon = reply.iter().position(|&b| b == b':').expect("a named reply");
            String::from_utf8(reply[..colon].to_vec()).expect("ascii name")
        })
        .collect();
    assert!(names.iter().all(|n| *n == names[0]), "flows of one client IP were spread: {names:?}");
    assert_eq!(engine.stats().total().flows_created, 6);
}

/// A TCP connection to `target` from `source` (any free port).
fn connect_from(source: IpAddr, target: SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&SocketAddr::new(source, 0).into()).expect("bind the client address");
    socket.connect_timeout(&target.into(), IO_TIMEOUT).expect("connect through the proxy");
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

#[test]
fn client_ip_affinity_holds_for_every_client_with_any_worker_count() {
    for (workers, octet) in [(2, 118), (4, 119)] {
        let servers: Vec<_> =
            ["a", "b", "c", "d"].iter().map(|n| named_server(n).expect("backend")).collect();
        let key = tcp_key(octet);
        let backends: Vec<_> = servers.iter().map(|s| (s.addr(), true)).collect();
        let engine = start_engine(
            workers,
            RelayMode::Copy,
            snapshot(1, vec![with_affinity(entry(key, &backends, test_policy()))]),
        );
        let mut bound = HashMap::new();
        for client in 201..=204u8 {
            let source = IpAddr::from([127, 0, 0, client]);
            // Kept open, so that every connection has a port of its own and the kernel spreads them.
            let streams: Vec<_> = (0..8).map(|_| connect_from(source, key.socket_addr())).collect();
            let names: Vec<String> = streams.into_iter().map(|mut s| read_name(&mut s)).collect();
            assert!(
                names.iter().all(|n| *n == names[0]),
                "{workers} workers: client {source} spread: {names:?}"
            );
            bound.insert(client, names[0].clone());
        }
        let accepting = engine.stats().workers.iter().filter(|w| w.accepted > 0).count();
        assert!(accepting >= 2, "{workers} workers: the connections were spread over workers");
        wait_until_idle(&engine);
        drop(bound);
    }
}

#[test]
fn least_connection_family_spreads_long_lived_connections_evenly_over_any_worker_count() {
    let kinds = [
        SchedulerKind::LeastConnection,
        SchedulerKind::WeightedLeastConnection,
        SchedulerKind::ShortestExpectedDelay,
        SchedulerKind::NeverQueue,
    ];
    for (round, workers) in [2, 4].into_iter().enumerate() {
        for (k, kind) in kinds.into_iter().enumerate() {
            let servers: Vec<_> =
                ["a", "b", "c", "d"].iter().map(|n| named_server(n).expect("backend")).collect();
            let key = tcp_key(120 + (round * kinds.len() + k) as u8);
            let backends: Vec<_> = servers.iter().map(|s| (s.addr(), true)).collect();
            let engine = start_engine(
                workers,
                RelayMode::Copy,
                snapshot(1, vec![with_scheduler(entry(key, &backends, test_policy()), kind)]),
            );
            // One by one: each connection is established (its greeting read) before the next, so
            // every pick sees all connections opened before it, whichever worker holds them.
            let mut held = Vec::new();
            let mut per_backend: HashMap<String, usize> = HashMap::new();
            for _ in 0..16 {
                let mut client = connect(key.socket_addr());
                *per_backend.entry(read_name(&mut client)).or_default() += 1;
                held.push(client);
            }
            let counts: Vec<usize> = per_backend.values().copied().collect();
            assert!(
                per_backend.len() == 4 && counts.iter().all(|&n| n == 4),
                "{kind} with {workers} workers: {per_backend:?}"
            );
            let accepting = engine.stats().workers.iter().filter(|w| w.accepted > 0).count();
            assert!(accepting >= 2, "{kind}: the connections were spread over workers");
            drop(held);
            wait_until_idle(&engine);
        }
    }
}
