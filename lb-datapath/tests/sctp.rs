//! The SCTP datapath over real SCTP associations: messages keep their stream id, PPID and unordered
//! flag both ways, associations spread over backends and workers, aborts and clean shutdowns cross
//! the proxy in both directions, connects retry, drain/idle/stop end associations, oversized
//! messages abort; and, where the kernel has no SCTP (the host), an SCTP key does not keep a TCP key
//! of the same snapshot from being served.
//!
//! The host kernel has no SCTP: the SCTP tests are ignored there and run in the test VM with
//! `vm/cargo-test.sh --timeout 600 -p lb-datapath --test sctp -- --include-ignored`.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use lb_core::{Protocol, VipKey};
use lb_datapath::{Engine, RelayMode};
use support::*;
use testkit::backends::echo_server;
use testkit::backends::sctp::{
    SctpMessage, SctpSocket, sctp_abort_server, sctp_close_server, sctp_echo_server, sctp_named_server,
};

fn sctp_key(last_octet: u8) -> VipKey {
    let ip = vip(last_octet);
    VipKey::new(ip, free_port(ip), Protocol::Sctp)
}

fn kernel_has_sctp() -> bool {
    // SAFETY: plain syscall; a valid fd is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 132) };
    if fd >= 0 {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

fn sctp_engine(workers: usize, key: VipKey, backends: &[std::net::SocketAddr]) -> Engine {
    if std::env::var_os("RINGLB_VM").is_some() {
        assert!(kernel_has_sctp(), "the test VM must have SCTP");
    }
    let list: Vec<_> = backends.iter().map(|&a| (a, true)).collect();
    let engine = start_engine(workers, RelayMode::Copy, snapshot(1, vec![entry(key, &list, test_policy())]));
    assert_eq!(engine.stats().total().sctp_listeners, workers as u64, "one SCTP listener per worker");
    engine
}

/// Receives `expected.len()` messages in any order (other streams and unordered messages may
/// overtake) and checks each arrived exactly as sent.
fn expect_messages(socket: &SctpSocket, expected: &[SctpMessage]) {
    let mut pending = expected.to_vec();
    while !pending.is_empty() {
        let got = socket.recv().expect("recv through the proxy").expect("a message, not EOF");
        let Some(index) = pending.iter().position(|want| *want == got) else {
            panic!(
                "unexpected message (stream {}, ppid {:#x}, unordered {}, {} bytes); pending {}",
                got.stream,
                got.ppid,
                got.unordered,
                got.payload.len(),
                pending.len()
            );
        };
        pending.remove(index);
    }
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn multi_stream_messages_keep_stream_ids_ppids_and_unordered_flag_both_ways() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    let key = sctp_key(201);
    let engine = sctp_engine(2, key, &[backend.addr()]);
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    let messages = vec![
        SctpMessage::new(b"stream zero", 0, 46u32.to_be(), false),
        SctpMessage::new(b"stream three", 3, 42u32.to_be(), false),
        SctpMessage::new(b"unordered on five", 5, 7u32.to_be(), true),
        SctpMessage::new(b"stream nine, ppid 0", 9, 0, false),
        SctpMessage::new(&big, 2, 0xDEAD_BEEF, false),
        SctpMessage::new(b"unordered on zero", 0, 60u32.to_be(), true),
    ];
    for round in 0..3 {
        for message in &messages {
            client.send(message).unwrap_or_else(|e| panic!("round {round}: send: {e}"));
        }
        // The echo comes back through the backend→client direction with the same metadata, so both
        // directions are checked by one exchange.
        expect_messages(&client, &messages);
    }
    let total = engine.stats().total();
    assert_eq!(total.sctp_messages_client_to_backend, 18, "{total:?}");
    wait_until("18 messages relayed to the client", Duration::from_secs(10), || {
        engine.stats().total().sctp_messages_backend_to_client == 18
    });
    assert_eq!(backend.accepted(), 1, "one backend association per client association");
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn several_associations_spread_over_two_backends() {
    let backends = [sctp_named_server("a").expect("backend a"), sctp_named_server("b").expect("backend b")];
    let key = sctp_key(202);
    let engine = sctp_engine(1, key, &[backends[0].addr(), backends[1].addr()]);
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    let clients: Vec<SctpSocket> =
        (0..6).map(|_| SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP")).collect();
    for (i, client) in clients.iter().enumerate() {
        let message = SctpMessage::new(format!("hello {i}").as_bytes(), (i % 4) as u16, i as u32, false);
        client.send(&message).expect("send");
        let reply = client.recv().expect("recv").expect("a reply, not EOF");
        let text = String::from_utf8(reply.payload.clone()).expect("ascii reply");
        let (name, rest) = text.split_once(':').expect("named backend reply");
        assert_eq!(rest, format!("hello {i}"));
        assert_eq!((reply.stream, reply.ppid), (message.stream, message.ppid));
        // The same association keeps its backend.
        client.send(&message).expect("send again");
        let again = client.recv().expect("recv").expect("a reply");
        assert!(again.payload.starts_with(format!("{name}:").as_bytes()), "association moved backend");
        *per_backend.entry(name.to_string()).or_default() += 1;
    }
    assert_eq!(per_backend.get("a"), Some(&3), "round robin over one worker: {per_backend:?}");
    assert_eq!(per_backend.get("b"), Some(&3), "{per_backend:?}");
    assert_eq!(backends[0].accepted() + backends[1].accepted(), 6);
    assert_eq!(engine.stats().total().sctp_active, 6);
    drop(clients);
    wait_until("every association released", Duration::from_secs(20), || {
        engine.stats().total().sctp_active == 0
    });
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn backend_abort_reaches_the_client_as_an_abort() {
    let backend = sctp_abort_server().expect("aborting backend");
    let key = sctp_key(203);
    let engine = sctp_engine(1, key, &[backend.addr()]);
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    client.send(&SctpMessage::new(b"trigger", 1, 1, false)).expect("send");
    match client.recv() {
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "expected an abort: {err}"),
        Ok(other) => panic!("expected ECONNRESET from the propagated abort, got {other:?}"),
    }
    wait_until("association released", Duration::from_secs(10), || {
        let total = engine.stats().total();
        total.sctp_active == 0 && total.sctp_aborts == 1
    });
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn backend_clean_shutdown_reaches_the_client_as_eof() {
    let backend = sctp_close_server().expect("closing backend");
    let key = sctp_key(204);
    let engine = sctp_engine(1, key, &[backend.addr()]);
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    let message = SctpMessage::new(b"last words", 4, 99u32.to_be(), false);
    client.send(&message).expect("send");
    expect_messages(&client, std::slice::from_ref(&message));
    assert_eq!(client.recv().expect("a clean end, not an abort"), None, "EOF after the backend's shutdown");
    wait_until("association released without abort", Duration::from_secs(10), || {
        engine.stats().total().sctp_active == 0
    });
    assert_eq!(engine.stats().total().sctp_aborts, 0);
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn a_refusing_backend_is_skipped_and_the_next_one_serves() {
    let good = sctp_echo_server().expect("SCTP echo backend");
    // Nothing listens for SCTP on this port: the INIT is answered with ABORT.
    let refusing = {
        let placeholder = sctp_echo_server().expect("placeholder");
        placeholder.addr()
    };
    let key = sctp_key(206);
    let engine = sctp_engine(1, key, &[refusing, good.addr()]);
    for i in 0..4u16 {
        let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
        let message = SctpMessage::new(b"retry me", i, u32::from(i), false);
        client.send(&message).expect("send");
        expect_messages(&client, std::slice::from_ref(&message));
    }
    assert_eq!(good.accepted(), 4, "every association reached the listening backend");
    let total = engine.stats().total();
    assert!(total.connect_failures >= 1 && total.retries >= 1, "the refusing backend was tried: {total:?}");
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn a_message_of_the_largest_relayed_size_passes_and_a_larger_one_aborts() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    let key = sctp_key(207);
    let engine = sctp_engine(1, key, &[backend.addr()]);
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    let largest: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
    let message = SctpMessage::new(&largest, 1, 5, false);
    client.send(&message).expect("send 64 KiB");
    expect_messages(&client, std::slice::from_ref(&message));
    let too_large = SctpMessage::new(&vec![7u8; 64 * 1024 + 1], 1, 5, false);
    client.send(&too_large).expect("send 64 KiB + 1");
    match client.recv() {
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "expected an abort: {err}"),
        Ok(other) => panic!("a message past the relay buffer must abort, got {other:?}"),
    }
    wait_until("the too-large message was counted", Duration::from_secs(10), || {
        let total = engine.stats().total();
        total.sctp_too_large == 1 && total.sctp_active == 0
    });
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn a_removed_vip_aborts_its_associations_after_the_drain_timeout() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    let key = sctp_key(208);
    let policy = lb_core::EntryPolicy { drain_timeout: Duration::from_millis(300), ..test_policy() };
    let engine =
        start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &[(backend.addr(), true)], policy)]));
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    let message = SctpMessage::new(b"before removal", 2, 3, false);
    client.send(&message).expect("send");
    expect_messages(&client, std::slice::from_ref(&message));
    publish(&engine, snapshot(2, vec![]));
    wait_until("the listener closed with its key", Duration::from_secs(10), || {
        engine.stats().total().sctp_listeners == 0
    });
    // Still relayed while draining.
    client.send(&message).expect("send while draining");
    expect_messages(&client, std::slice::from_ref(&message));
    match client.recv() {
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "expected an abort: {err}"),
        Ok(other) => panic!("the drained association must be aborted, got {other:?}"),
    }
    let total = engine.stats().total();
    assert_eq!((total.drain_closes, total.sctp_active), (1, 0), "{total:?}");
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn so_reuseport_spreads_associations_over_workers() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    let key = sctp_key(209);
    let engine = sctp_engine(2, key, &[backend.addr()]);
    let clients: Vec<SctpSocket> =
        (0..24).map(|_| SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP")).collect();
    for (i, client) in clients.iter().enumerate() {
        let message = SctpMessage::new(format!("worker spread {i}").as_bytes(), 0, 1, false);
        client.send(&message).expect("send");
        expect_messages(client, std::slice::from_ref(&message));
    }
    let stats = engine.stats();
    let per_worker: Vec<u64> = stats.workers.iter().map(|w| w.sctp_accepted).collect();
    assert_eq!(per_worker.iter().sum::<u64>(), 24);
    // The kernel hashes each association's addresses and ports over the listeners: 24 distinct client
    // ports all landing on one worker would mean the second listener is not used (odds 2^-23).
    assert!(per_worker.iter().all(|&n| n > 0), "associations per worker: {per_worker:?}");
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn stopping_the_engine_aborts_open_associations() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    let key = sctp_key(210);
    let engine = sctp_engine(1, key, &[backend.addr()]);
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    let message = SctpMessage::new(b"before stop", 0, 1, false);
    client.send(&message).expect("send");
    expect_messages(&client, std::slice::from_ref(&message));
    drop(engine);
    match client.recv() {
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET), "expected an abort: {err}"),
        Ok(other) => panic!("a stopping engine must abort its associations, got {other:?}"),
    }
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn an_idle_association_is_shut_down_gracefully() {
    let backend = sctp_echo_server().expect("SCTP echo backend");
    let key = sctp_key(211);
    let policy = lb_core::EntryPolicy { idle_timeout: Duration::from_millis(300), ..test_policy() };
    let engine =
        start_engine(1, RelayMode::Copy, snapshot(1, vec![entry(key, &[(backend.addr(), true)], policy)]));
    let client = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    let message = SctpMessage::new(b"then silence", 0, 1, false);
    client.send(&message).expect("send");
    expect_messages(&client, std::slice::from_ref(&message));
    assert_eq!(client.recv().expect("a graceful end, not an abort"), None, "EOF after the idle timeout");
    wait_until("idle association released", Duration::from_secs(10), || {
        let total = engine.stats().total();
        total.sctp_active == 0 && total.idle_timeouts == 1
    });
    assert_eq!(engine.stats().total().sctp_aborts, 0);
}

#[test]
#[ignore = "needs kernel SCTP: run through vm/cargo-test.sh"]
fn client_abort_and_client_shutdown_reach_the_backend_as_such() {
    // The backend echoes and reports how each association ended: Ok(()) for EOF, Err(errno).
    let (report, endings) = std::sync::mpsc::channel::<Result<(), Option<i32>>>();
    let backend = testkit::backends::sctp::SctpServer::spawn(move |socket| {
        let ending = loop {
            match socket.recv() {
                Ok(Some(message)) => {
                    if socket.send(&message).is_err() {
                        break Err(None);
                    }
                }
                Ok(None) => break Ok(()),
                Err(err) => break Err(err.raw_os_error()),
            }
        };
        let _ = report.send(ending);
    })
    .expect("reporting backend");
    let key = sctp_key(212);
    let _engine = sctp_engine(1, key, &[backend.addr()]);
    let message = SctpMessage::new(b"ping", 1, 2, false);

    let aborting = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    aborting.send(&message).expect("send");
    expect_messages(&aborting, std::slice::from_ref(&message));
    aborting.abort();
    let ending = endings.recv_timeout(Duration::from_secs(20)).expect("the backend saw the end");
    assert_eq!(ending, Err(Some(libc::ECONNRESET)), "a client abort reaches the backend as an abort");

    let closing = SctpSocket::connect(key.socket_addr()).expect("connect to the SCTP VIP");
    closing.send(&message).expect("send");
    expect_messages(&closing, std::slice::from_ref(&message));
    closing.shutdown().expect("shutdown");
    let ending = endings.recv_timeout(Duration::from_secs(20)).expect("the backend saw the end");
    assert_eq!(ending, Ok(()), "a client shutdown reaches the backend as EOF");
}

#[test]
fn an_sctp_key_does_not_keep_a_tcp_key_of_the_same_snapshot_from_being_served() {
    let backend = echo_server().expect("TCP echo backend");
    let sctp_backend = "127.0.0.1:9".parse().expect("literal");
    let tcp = tcp_key(205);
    let sctp = sctp_key(205);
    let engine = start_engine(
        2,
        RelayMode::Copy,
        snapshot(
            1,
            vec![
                entry(tcp, &[(backend.addr(), true)], test_policy()),
                entry(sctp, &[(sctp_backend, true)], test_policy()),
            ],
        ),
    );
    let mut stream = connect(tcp.socket_addr());
    assert_eq!(round_trip(&mut stream, b"tcp still works"), b"tcp still works");
    let total = engine.stats().total();
    assert_eq!(total.listeners, 2, "one TCP listener per worker");
    if kernel_has_sctp() {
        assert_eq!(total.sctp_listeners, 2, "{total:?}");
    } else {
        assert_eq!(total.sctp_listeners, 0, "{total:?}");
        assert_eq!(total.bind_failures, 2, "each worker counts its failed SCTP listener once: {total:?}");
    }
}
