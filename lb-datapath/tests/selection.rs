//! Backend selection and snapshot changes over real loopback sockets: retries after refused and
//! timed-out connects, readiness flips, removed VIPs draining, spreading over workers, and clients
//! that cannot be served being reset at once.

mod support;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lb_datapath::RelayMode;
use support::*;
use testkit::backends::{RefusingAddr, echo_server, named_server};

#[test]
fn refused_connect_is_retried_on_another_backend() {
    let refusing = RefusingAddr::new().expect("refusing address");
    let good = named_server("good").expect("backend");
    let key = tcp_key(20);
    let backends = [(refusing.addr(), true), (good.addr(), true)];
    let engine = start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &backends, test_policy())]));
    // Round robin reaches the refusing backend first for one of two consecutive connections.
    for _ in 0..4 {
        let mut client = connect(key.socket_addr());
        assert_eq!(read_name(&mut client), "good");
        assert_eq!(round_trip(&mut client, b"ping"), b"ping");
    }
    let total = engine.stats().total();
    assert!(total.connect_failures >= 2, "refused connects are counted: {total:?}");
    assert!(total.retries >= 2, "and retried: {total:?}");
}

#[test]
fn not_ready_endpoint_gets_no_new_connections_while_its_established_ones_keep_working() {
    let a = named_server("a").expect("backend a");
    let b = named_server("b").expect("backend b");
    let key = tcp_key(21);
    let policy = test_policy();
    let engine = start_engine(
        2,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(a.addr(), true), (b.addr(), true)], policy)]),
    );
    let mut established: Vec<(String, TcpStream)> = (0..4)
        .map(|_| {
            let mut client = connect(key.socket_addr());
            (read_name(&mut client), client)
        })
        .collect();
    assert!(established.iter().any(|(name, _)| name == "a"), "a got connections before the flip");
    publish(&engine, snapshot(2, vec![entry(key, &[(a.addr(), false), (b.addr(), true)], policy)]));
    for _ in 0..8 {
        let mut client = connect(key.socket_addr());
        assert_eq!(read_name(&mut client), "b", "a not-ready endpoint got a new connection");
    }
    for (name, client) in &mut established {
        let message = format!("still talking to {name}");
        assert_eq!(round_trip(client, message.as_bytes()), message.as_bytes());
    }
}

#[test]
fn removed_vip_stops_accepting_while_established_connections_finish_then_drain() {
    let backend = echo_server().expect("backend");
    let removed = tcp_key(22);
    let kept = tcp_key(23);
    let policy = support::test_policy();
    let drain = Duration::from_millis(800);
    let both = vec![
        entry(removed, &[(backend.addr(), true)], support::EntryPolicyExt::with_drain(policy, drain)),
        entry(kept, &[(backend.addr(), true)], policy),
    ];
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, both));
    let mut established = connect(removed.socket_addr());
    assert_eq!(round_trip(&mut established, b"before"), b"before");

    let removed_at = Instant::now();
    publish(&engine, snapshot(2, vec![entry(kept, &[(backend.addr(), true)], policy)]));
    let refused = TcpStream::connect_timeout(&removed.socket_addr(), Duration::from_secs(2));
    assert_eq!(refused.map(|_| ()).map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused));
    assert_eq!(round_trip(&mut established, b"after"), b"after", "established connection keeps working");
    let mut other = connect(kept.socket_addr());
    assert_eq!(round_trip(&mut other, b"kept"), b"kept");

    // After the drain timeout the proxy closes the established connection.
    let closed = read_to_close(&mut established);
    assert!(closed.is_ok() || closed == Err(ErrorKind::ConnectionReset), "closed, not timed out: {closed:?}");
    assert!(removed_at.elapsed() >= drain, "closed before the drain timeout");
    assert_eq!(engine.stats().total().drain_closes, 1);
    assert_eq!(round_trip(&mut other, b"kept"), b"kept", "the other VIP's connection is not drained");
}

#[test]
fn many_concurrent_connections_spread_across_workers_and_echo_correctly() {
    let backends: Vec<_> = (0..3).map(|_| echo_server().expect("backend")).collect();
    let key = tcp_key(24);
    let list: Vec<_> = backends.iter().map(|b| (b.addr(), true)).collect();
    let engine = start_engine(2, RelayMode::Copy, snapshot(1, vec![entry(key, &list, test_policy())]));
    let clients: Vec<_> = (0..200).map(|_| connect(key.socket_addr())).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            std::thread::spawn(move || {
                let message = format!("client {i} says hello").repeat(50);
                round_trip(&mut client, message.as_bytes()) == message.as_bytes()
            })
        })
        .collect();
    let correct = threads.into_iter().map(|t| t.join().expect("client thread")).filter(|ok| *ok).count();
    assert_eq!(correct, 200);
    let stats = engine.stats();
    assert_eq!(stats.total().accepted, 200);
    for (index, worker) in stats.workers.iter().enumerate() {
        assert!(worker.accepted > 0, "worker {index} accepted nothing: {stats:?}");
    }
    let per_backend: HashMap<_, _> = backends.iter().map(|b| (b.addr(), b.accepted())).collect();
    assert!(per_backend.values().all(|&n| n > 0), "every backend served: {per_backend:?}");
}

#[test]
fn client_without_eligible_backend_is_reset_quickly() {
    let a = named_server("a").expect("backend");
    let key = tcp_key(25);
    let engine =
        start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &[(a.addr(), false)], test_policy())]));
    let started = Instant::now();
    let outcome = connect_and_read_to_close(key.socket_addr());
    assert_eq!(outcome, Err(ErrorKind::ConnectionReset));
    assert!(started.elapsed() < IO_TIMEOUT, "not hung");
    assert_eq!(engine.stats().total().no_backend, 1);
}

#[test]
fn exhausted_connect_attempts_reset_the_client() {
    let refusing = [RefusingAddr::new().expect("a"), RefusingAddr::new().expect("b")];
    let key = tcp_key(26);
    let list: Vec<_> = refusing.iter().map(|r| (r.addr(), true)).collect();
    let engine = start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &list, test_policy())]));
    assert_eq!(connect_and_read_to_close(key.socket_addr()), Err(ErrorKind::ConnectionReset));
    let total = engine.stats().total();
    assert_eq!(total.connect_failures, 2, "each backend tried once: {total:?}");
}

#[test]
fn connect_timeout_to_a_blackhole_backend_is_retried_on_another() {
    let blackhole = Blackhole::new();
    let good = named_server("good").expect("backend");
    let key = tcp_key(27);
    let policy = lb_core::EntryPolicy { connect_timeout: Duration::from_millis(300), ..test_policy() };
    let backends = [(blackhole.addr(), true), (good.addr(), true)];
    let engine = start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &backends, policy)]));
    for _ in 0..2 {
        let mut client = connect(key.socket_addr());
        assert_eq!(read_name(&mut client), "good");
    }
    let total = engine.stats().total();
    // Round robin sends one or both first attempts to the blackhole, depending on address order.
    assert!(total.connect_failures >= 1, "a connect went to the blackhole and timed out: {total:?}");
    assert_eq!(total.retries, total.connect_failures, "every timed-out connect was retried: {total:?}");
}

#[test]
fn single_shot_accept_fallback_serves_many_connections() {
    // The path kernels without multishot accept (before 5.19) take: one accept re-armed per client.
    let backend = echo_server().expect("backend");
    let key = tcp_key(28);
    let config = lb_datapath::EngineConfig { multishot_accept: false, ..test_config(2, RelayMode::Copy) };
    let engine =
        start_engine_with(config, snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]));
    let mut clients: Vec<_> = (0..40).map(|_| connect(key.socket_addr())).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let message = format!("single-shot {i}");
        assert_eq!(round_trip(client, message.as_bytes()), message.as_bytes());
    }
    assert_eq!(engine.stats().total().accepted, 40);
}

#[test]
fn connection_to_a_removed_backend_is_closed_after_the_drain_timeout() {
    let old = named_server("old").expect("backend old");
    let new = named_server("new").expect("backend new");
    let key = tcp_key(29);
    let policy = support::EntryPolicyExt::with_drain(test_policy(), Duration::from_millis(500));
    let engine =
        start_engine(1, RelayMode::Splice, snapshot(1, vec![entry(key, &[(old.addr(), true)], policy)]));
    let mut to_old = connect(key.socket_addr());
    assert_eq!(read_name(&mut to_old), "old");
    let removed_at = Instant::now();
    publish(&engine, snapshot(2, vec![entry(key, &[(new.addr(), true)], policy)]));
    let mut to_new = connect(key.socket_addr());
    assert_eq!(read_name(&mut to_new), "new");
    assert_eq!(round_trip(&mut to_old, b"draining"), b"draining", "works until the drain timeout");
    let closed = read_to_close(&mut to_old);
    assert!(closed.is_ok() || closed == Err(ErrorKind::ConnectionReset), "closed, not timed out: {closed:?}");
    assert!(removed_at.elapsed() >= Duration::from_millis(500), "closed before the drain timeout");
    assert_eq!(round_trip(&mut to_new, b"unaffected"), b"unaffected");
}

#[test]
fn established_connection_to_a_backend_turned_not_ready_drains_then_closes_after_the_drain_timeout() {
    let a = named_server("a").expect("backend a");
    let b = named_server("b").expect("backend b");
    let key = tcp_key(97);
    let drain = Duration::from_millis(800);
    let policy = support::EntryPolicyExt::with_drain(test_policy(), drain);
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(a.addr(), true), (b.addr(), true)], policy)]),
    );
    // Round robin over two backends: one of the first two connections goes to each.
    let mut on_a = None;
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut client = connect(key.socket_addr());
        match read_name(&mut client).as_str() {
            "a" => on_a = Some(client),
            _ => others.push(client),
        }
    }
    let mut on_a = on_a.expect("a got one of the first two connections");
    assert_eq!(engine.stats().total().draining, 0);

    let flipped_at = Instant::now();
    publish(&engine, snapshot(2, vec![entry(key, &[(a.addr(), false), (b.addr(), true)], policy)]));
    wait_until("the connection to a counts as draining", IO_TIMEOUT, || engine.stats().total().draining == 1);
    assert_eq!(round_trip(&mut on_a, b"still here"), b"still here", "a draining connection keeps working");

    let closed = read_to_close(&mut on_a);
    assert!(closed.is_ok() || closed == Err(ErrorKind::ConnectionReset), "closed, not timed out: {closed:?}");
    assert!(flipped_at.elapsed() >= drain, "closed before the drain timeout");
    wait_until("the draining gauge returns to zero", IO_TIMEOUT, || engine.stats().total().draining == 0);
    assert_eq!(engine.stats().total().drain_closes, 1);
    for client in &mut others {
        assert_eq!(round_trip(client, b"ready"), b"ready", "a ready backend's connection is not drained");
    }
}

#[test]
fn workers_report_connect_outcomes_and_backend_resets_as_backend_events() {
    use lb_core::BackendId;
    use lb_core::health::{BackendEvent, BackendOutcome};
    use std::io::Write;
    use testkit::backends::reset_server;

    let refusing = RefusingAddr::new().expect("refusing address");
    let resetting = reset_server().expect("resetting backend");
    let key = tcp_key(98);
    let refused_key = tcp_key(99);
    let entries = vec![
        entry(key, &[(resetting.addr(), true)], test_policy()),
        entry(refused_key, &[(refusing.addr(), true)], test_policy()),
    ];
    let engine = start_engine(1, RelayMode::Copy, snapshot(1, entries));
    let events = engine.take_backend_events().expect("the receiver, taken once");
    assert!(engine.take_backend_events().is_none(), "only the first call gets the receiver");

    let mut client = connect(key.socket_addr());
    client.write_all(b"hello").expect("write to the resetting backend");
    let closed = read_to_close(&mut client);
    assert_eq!(closed, Err(ErrorKind::ConnectionReset), "the backend's reset reaches the client");
    let refused = connect_and_read_to_close(refused_key.socket_addr());
    assert_eq!(refused, Err(ErrorKind::ConnectionReset), "no backend accepts: the client is reset");

    let mut seen: Vec<BackendEvent> = Vec::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    let wanted = |seen: &[BackendEvent], key, backend: SocketAddr, outcome| {
        seen.iter().any(|e| e.key == key && e.backend == BackendId(backend) && e.outcome == outcome)
    };
    while !(wanted(&seen, key, resetting.addr(), BackendOutcome::Connected)
        && wanted(&seen, key, resetting.addr(), BackendOutcome::Reset)
        && wanted(&seen, refused_key, refusing.addr(), BackendOutcome::ConnectFailed))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch = events.recv_timeout(left).unwrap_or_else(|_| panic!("events missing; saw {seen:?}"));
        seen.extend(batch);
    }
    assert!(!wanted(&seen, refused_key, refusing.addr(), BackendOutcome::Connected), "{seen:?}");
    assert_eq!(engine.stats().total().backend_events_dropped, 0);
}

/// Connects to `key` until a connection lands on the backend named `name` (round robin over two
/// backends gets there within two tries); the others are returned too, still open.
fn connection_to(key: lb_core::VipKey, name: &str) -> (TcpStream, Vec<TcpStream>) {
    let mut others = Vec::new();
    for _ in 0..4 {
        let mut client = connect(key.socket_addr());
        if read_name(&mut client) == name {
            return (client, others);
        }
        others.push(client);
    }
    panic!("no connection reached {name}");
}

#[test]
fn not_ready_connections_keep_and_close_are_decided_per_service() {
    use lb_core::{EntryPolicy, NotReadyConnections};
    let backends: Vec<_> = ["keep-a", "keep-b", "close-a", "close-b", "drain-a", "drain-b"]
        .iter()
        .map(|name| named_server(name).expect("backend"))
        .collect();
    let (keep, close, drain) = (tcp_key(113), tcp_key(114), tcp_key(115));
    let policy = |rule| EntryPolicy {
        not_ready_connections: rule,
        ..test_policy().with_drain(Duration::from_millis(300))
    };
    let table = |version, a_ready| {
        let two = |i: usize| [(backends[i].addr(), a_ready), (backends[i + 1].addr(), true)];
        snapshot(
            version,
            vec![
                entry(keep, &two(0), policy(NotReadyConnections::Keep)),
                entry(close, &two(2), policy(NotReadyConnections::Close)),
                entry(drain, &two(4), policy(NotReadyConnections::Drain)),
            ],
        )
    };
    let engine = start_engine(1, RelayMode::Copy, table(1, true));
    let (mut kept, _k) = connection_to(keep, "keep-a");
    let (mut closed, _c) = connection_to(close, "close-a");
    let (mut drained, _d) = connection_to(drain, "drain-a");

    // Every "-a" backend turns not ready in one snapshot.
    publish(&engine, table(2, false));
    let outcome = read_to_close(&mut closed);
    assert!(outcome.is_err() || outcome == Ok(Vec::new()), "close: the connection ends at once: {outcome:?}");
    // The drained connection closing after its 300 ms is the clock: the kept one outlives it.
    let outcome = read_to_close(&mut drained);
    assert!(outcome.is_ok() || outcome == Err(ErrorKind::ConnectionReset), "drain: closed: {outcome:?}");
    assert_eq!(engine.stats().total().drain_closes, 2, "the closed and the drained connection");
    assert_eq!(
        round_trip(&mut kept, b"still here"),
        b"still here",
        "keep: it continues past the drain timeout"
    );
    assert_eq!(engine.stats().total().draining, 0, "a kept connection is not draining");

    // Under keep, removal from the Service still drains.
    let removed =
        snapshot(3, vec![entry(keep, &[(backends[1].addr(), true)], policy(NotReadyConnections::Keep))]);
    publish(&engine, removed);
    let outcome = read_to_close(&mut kept);
    assert!(outcome.is_ok() || outcome == Err(ErrorKind::ConnectionReset), "removed: closed: {outcome:?}");
}
