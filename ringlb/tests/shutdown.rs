//! End-to-end: graceful shutdown of the `ringlb` binary over real loopback sockets. SIGTERM closes
//! the listeners at once and turns `/readyz` 503, an in-flight transfer that goes on well after that
//! completes intact, and ringlb exits 0 as soon as it ended; a second signal, or the end of
//! `--shutdown-grace`, closes what is left.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{IO_TIMEOUT, Ringlb, http_get, loopback, poll_until, port_free_on, save, web_manifest};
use testkit::backends::echo_server;

/// An echo backend behind a VIP on `127.0.0.<octet>`, and ringlb serving it with `grace`.
fn serving(octet: u8, grace: &str) -> (Ringlb, SocketAddr, testkit::backends::Server, tempfile::TempDir) {
    let backend = echo_server().expect("backend");
    let vip = SocketAddr::new(loopback(octet), port_free_on(&[loopback(octet)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("echo.yaml");
    let text = web_manifest(vip, backend.addr().port(), &[(backend.addr().ip(), true)]);
    save(&file, &text);
    let mut ringlb =
        Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path"), "--shutdown-grace", grace]);
    ringlb.wait_ready();
    (ringlb, vip, backend, dir)
}

fn client(vip: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT).expect("connect through ringlb");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

/// Sends `len` bytes of a pattern through the echo and checks every byte that comes back.
fn exchange(stream: &mut TcpStream, seed: u8, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let mut writer = stream.try_clone().expect("clone");
    let sent = data.clone();
    let upload = std::thread::spawn(move || writer.write_all(&sent).expect("write through ringlb"));
    let mut echoed = vec![0u8; len];
    stream.read_exact(&mut echoed).expect("read the echo through ringlb");
    upload.join().expect("upload");
    assert!(echoed == data, "the echo arrives intact");
}

fn refused(vip: SocketAddr) -> bool {
    TcpStream::connect_timeout(&vip, IO_TIMEOUT)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn sigterm_closes_the_listeners_at_once_and_an_in_flight_transfer_completes_intact() {
    let (ringlb, vip, _backend, _dir) = serving(126, "30s");
    let mut transfer = client(vip);
    exchange(&mut transfer, 1, 1 << 20);

    let signalled = Instant::now();
    ringlb.signal(libc::SIGTERM);
    poll_until("/readyz to answer 503", || http_get(ringlb.admin, "/readyz").ok().filter(|(s, _)| *s == 503));
    poll_until("the listeners to close", || refused(vip).then_some(()));
    // Well after the listeners closed, the established transfer goes on, 64 MiB more.
    for round in 0..16 {
        exchange(&mut transfer, round, 4 << 20);
    }
    drop(transfer);
    let status = ringlb.wait();
    assert!(status.success(), "exit 0 after a graceful shutdown: {status}");
    assert!(signalled.elapsed() < Duration::from_secs(30), "it did not wait for the grace once drained");
}

#[test]
fn a_second_signal_closes_everything_at_once() {
    let (ringlb, vip, _backend, _dir) = serving(127, "1h");
    let mut idle = client(vip);
    exchange(&mut idle, 7, 1024);
    ringlb.signal(libc::SIGTERM);
    poll_until("the listeners to close", || refused(vip).then_some(()));
    ringlb.signal(libc::SIGINT);
    let status = ringlb.wait();
    assert!(status.success(), "{status}");
    let mut byte = [0u8; 1];
    assert!(matches!(idle.read(&mut byte), Ok(0) | Err(_)), "the held connection was closed");
}

#[test]
fn the_shutdown_grace_bounds_the_drain_and_zero_closes_at_once() {
    for grace in ["1s", "0s"] {
        let octet = if grace == "0s" { 128 } else { 129 };
        let (ringlb, vip, _backend, _dir) = serving(octet, grace);
        let mut held = client(vip);
        exchange(&mut held, 9, 1024);
        // The client never closes: only the grace (or its absence) ends the connection.
        let status = ringlb.terminate();
        assert!(status.success(), "grace {grace}: {status}");
        let mut byte = [0u8; 1];
        assert!(matches!(held.read(&mut byte), Ok(0) | Err(_)), "grace {grace}: the connection was closed");
    }
}
