//! Resource accounting over real loopback sockets: the idle timeout closes quiet connections, and
//! after many connections that end in every way (served, reset by the backend, refused, no backend,
//! reset by the client) every fd, buffer and pipe the workers took is returned; connections that go
//! idle hold no relay buffer.
//!
//! This file holds the process-wide fd check, so it must stay the only test binary that counts fds
//! while other tests of the same process run: its tests run one after another behind a lock.

mod support;

use std::io::{ErrorKind, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lb_core::EntryPolicy;
use lb_datapath::RelayMode;
use support::*;
use testkit::backends::{RefusingAddr, echo_server, reset_server};

/// Serialises the tests of this file: the fd count is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn idle_timeout_closes_an_idle_connection() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = echo_server().expect("backend");
    let key = tcp_key(30);
    let idle = Duration::from_millis(400);
    let policy = EntryPolicy { idle_timeout: idle, ..test_policy() };
    let engine =
        start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &[(backend.addr(), true)], policy)]));
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"wake"), b"wake");
    let quiet_since = Instant::now();
    let closed = read_to_close(&mut client);
    assert_eq!(closed, Ok(Vec::new()), "an idle connection is closed with EOF");
    assert!(quiet_since.elapsed() >= idle, "closed before the idle timeout");
    assert_eq!(engine.stats().total().idle_timeouts, 1);
}

fn churn_returns_every_resource(relay: RelayMode, octet: u8) {
    let echo = echo_server().expect("echo");
    let resetting = reset_server().expect("reset backend");
    let refusing = RefusingAddr::new().expect("refusing");
    let served = tcp_key(octet);
    let resets = tcp_key(octet + 1);
    let refused = tcp_key(octet + 2);
    let policy = test_policy();
    let entries = vec![
        entry(served, &[(echo.addr(), true)], policy),
        entry(resets, &[(resetting.addr(), true)], policy),
        entry(refused, &[(refusing.addr(), true)], policy),
    ];
    let engine = start_engine(2, relay, snapshot(1, entries));
    // Warm up pools and lazily opened fds, then take the baseline.
    for _ in 0..4 {
        let mut client = connect(served.socket_addr());
        assert_eq!(round_trip(&mut client, b"warm"), b"warm");
    }
    wait_until("warm-up released", Duration::from_secs(5), || engine.stats().total().active == 0);
    // Pipes idle in a pool are open fds the workers keep on purpose; count them out.
    let pooled_fds = |engine: &lb_datapath::Engine| 2 * engine.stats().total().pipes_idle as usize;
    let baseline = open_fds() - pooled_fds(&engine);

    for round in 0..60 {
        let mut ok = connect(served.socket_addr());
        assert_eq!(round_trip(&mut ok, b"payload"), b"payload");
        if round % 2 == 0 {
            // Client goes away with a reset mid-connection.
            let _ = ok.set_linger_zero();
        }
        drop(ok);
        let mut reset = connect(resets.socket_addr());
        // One write: a second write after the reset arrived would consume the socket's pending
        // ECONNRESET and the read below would see EOF instead.
        reset.write_all(b"xxyy").expect("write before the backend resets");
        assert!(read_to_close(&mut reset).is_err(), "backend reset reaches the client");
        let outcome = connect_and_read_to_close(refused.socket_addr());
        assert_eq!(outcome, Err(ErrorKind::ConnectionReset), "round {round}: {:?}", engine.stats());
    }

    wait_until("every connection released", Duration::from_secs(10), || engine.stats().total().active == 0);
    let total = engine.stats().total();
    assert_eq!(total.buffers_in_use, 0, "buffers returned: {total:?}");
    assert_eq!(total.pipes_in_use, 0, "pipes returned: {total:?}");
    assert!(total.resets >= 120, "resets counted: {total:?}");
    // Backend-side sockets close on their own threads; wait for the count to settle.
    wait_until("fds back to baseline", Duration::from_secs(10), || {
        open_fds() - pooled_fds(&engine) <= baseline
    });
}

#[test]
fn many_failing_and_reset_connections_return_every_fd_and_buffer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    churn_returns_every_resource(RelayMode::Copy, 31);
}

#[test]
fn many_failing_and_reset_connections_return_every_fd_and_pipe() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    churn_returns_every_resource(RelayMode::Splice, 35);
}

#[test]
fn shutdown_closes_every_listener_and_connection() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = echo_server().expect("backend");
    let key = tcp_key(40);
    let baseline = open_fds();
    let engine = start_engine(
        2,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"x"), b"x");
    engine.shutdown();
    assert!(!engine.is_ready());
    assert!(read_to_close(&mut client).is_err(), "open connections are reset on shutdown");
    drop(client);
    let refused = std::net::TcpStream::connect_timeout(&key.socket_addr(), Duration::from_secs(2));
    assert_eq!(refused.map(|_| ()).map_err(|e| e.kind()), Err(ErrorKind::ConnectionRefused));
    drop(engine);
    wait_until("fds back to baseline", Duration::from_secs(10), || open_fds() <= baseline);
}

trait LingerZero {
    fn set_linger_zero(&self) -> std::io::Result<()>;
}

impl LingerZero for std::net::TcpStream {
    fn set_linger_zero(&self) -> std::io::Result<()> {
        socket2::SockRef::from(self).set_linger(Some(Duration::ZERO))
    }
}

/// io-wq worker threads (`iou-wrk-*`) of this process.
fn io_wq_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("iou-wrk"))
        .count()
}

#[test]
fn idle_splice_connections_park_no_kernel_worker_threads() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = echo_server().expect("backend");
    let key = tcp_key(41);
    let engine = start_engine(
        1,
        RelayMode::Splice,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut clients: Vec<_> = (0..64).map(|_| connect(key.socket_addr())).collect();
    for client in &mut clients {
        assert_eq!(round_trip(client, b"data then idle"), b"data then idle");
    }
    // A blocking splice per idle direction would park 128 io-wq threads; splicing inline after a
    // readiness poll parks none. Other tests of this binary may own a few, so allow some slack.
    wait_until("io-wq workers of idle connections gone", Duration::from_secs(10), || io_wq_threads() < 16);
    assert_eq!(engine.stats().total().active, 64);
}

#[test]
fn connections_that_go_idle_hold_no_relay_buffer_and_give_back_every_fd() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = echo_server().expect("backend");
    let key = tcp_key(42);
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let baseline = open_fds();
    let mut clients: Vec<_> = (0..64).map(|_| connect(key.socket_addr())).collect();
    let bulk: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let message = format!("message {i}");
        assert_eq!(round_trip(client, message.as_bytes()), message.as_bytes());
    }
    // Each direction holds a buffer only while received bytes wait to be sent; once the echoes
    // are delivered, 64 open connections hold none (before, each held two for its whole life).
    wait_until("64 idle connections holding no buffer", Duration::from_secs(5), || {
        let total = engine.stats().total();
        total.active == 64 && total.buffers_in_use == 0
    });
    for client in &mut clients {
        assert_eq!(round_trip(client, &bulk), bulk, "an idle connection relays again, in full");
    }
    wait_until("idle again", Duration::from_secs(5), || engine.stats().total().buffers_in_use == 0);
    drop(clients);
    wait_until("every connection released", Duration::from_secs(10), || engine.stats().total().active == 0);
    wait_until("fds back to baseline", Duration::from_secs(10), || open_fds() <= baseline);
    assert_eq!(engine.stats().total().relay_buffers_exhausted, 0, "64 connections fit the ring");
}
