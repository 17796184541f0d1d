//! Backend source ports chosen by the workers (`SourcePortMode::Worker`), over real loopback
//! sockets: every backend connect comes from the configured range, a port still in TIME_WAIT from
//! an earlier connection is used again, and a range whose 4-tuples are all taken is the load
//! balancer's shortage (counted local, the client reset), never a failure of the backend.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};

use lb_core::health::BackendOutcome;
use lb_datapath::{EngineConfig, RelayMode, SourcePortMode};
use support::*;
use testkit::backends::{Server, named_server};

fn worker_ports(workers: usize, range: std::ops::RangeInclusive<u16>) -> EngineConfig {
    EngineConfig {
        source_ports: SourcePortMode::Worker,
        source_port_range: Some(range),
        ..test_config(workers, RelayMode::Copy)
    }
}

#[test]
fn backend_connects_come_from_the_workers_range_and_reuse_time_wait_ports() {
    // Outside the kernel's ephemeral range, so nothing else on the host picks these ports.
    let range = 20100..=20119;
    let peers = Arc::new(Mutex::new(Vec::new()));
    // Answers one byte and closes once the client did: ringlb's backend socket closes first and
    // stays in TIME_WAIT, as in a connect-request-close benchmark.
    let backend = {
        let peers = peers.clone();
        Server::spawn(move |mut stream| {
            if let Ok(peer) = stream.peer_addr() {
                peers.lock().expect("peers").push(peer.port());
            }
            let _ = stream.write_all(b"k");
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            let _ = stream.shutdown(Shutdown::Write);
        })
        .expect("backend")
    };
    let key = tcp_key(150);
    let engine = start_engine_with(
        worker_ports(2, range.clone()),
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    // Three times the range: ports come round again while their last connection is in TIME_WAIT.
    let connections = 3 * range.len();
    for _ in 0..connections {
        let mut client = connect(key.socket_addr());
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).expect("the backend's byte through the proxy");
        drop(client);
    }
    wait_until("the backend saw every connection", STATS_WAIT, || {
        peers.lock().expect("peers").len() == connections
    });
    let peers = peers.lock().expect("peers").clone();
    assert!(peers.iter().all(|port| range.contains(port)), "source ports outside {range:?}: {peers:?}");
    let total = engine.stats().total();
    assert_eq!((total.connect_failures, total.local_no_source_port), (0, 0), "{total:?}");
}

#[test]
fn a_range_whose_four_tuples_are_all_taken_is_local_and_no_backend_failure() {
    // Two ports inside the kernel's ephemeral range, so the kernel's own search after the
    // collisions is narrowed to them too (`IP_LOCAL_PORT_RANGE` only narrows that range).
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("port range");
    let high: u16 = ephemeral.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("range end");
    let range = high - 1..=high;
    let backend = named_server("held").expect("backend");
    let key = tcp_key(151);
    let engine = start_engine_with(
        worker_ports(1, range.clone()),
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let events = engine.take_backend_events().expect("backend events");
    // Two held connections take both 4-tuples towards the one backend.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = connect(key.socket_addr());
        assert_eq!(read_name(&mut client), "held");
        held.push(client);
    }
    // Refused with a reset, which may reach the client before its connect has returned.
    match std::net::TcpStream::connect_timeout(&key.socket_addr(), std::time::Duration::from_secs(5)) {
        Ok(mut third) => {
            let result = read_to_close(&mut third);
            assert!(
                matches!(&result, Ok(bytes) if bytes.is_empty()) || result.is_err(),
                "served: {result:?}"
            );
        }
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
    }
    let total = engine.stats().total();
    assert_eq!(total.local_no_source_port, 1, "{total:?}");
    assert!(total.source_port_collisions >= 1, "the worker's own ports were tried first: {total:?}");
    assert_eq!(total.connect_failures, 0, "not the backend's failure: {total:?}");
    wait_until("the workers flush their events", STATS_WAIT, || {
        let seen: Vec<_> = events.try_iter().flatten().collect();
        assert!(seen.iter().all(|e| e.outcome != BackendOutcome::ConnectFailed), "{seen:?}");
        !seen.is_empty()
    });
    drop(held);
}

const STATS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
