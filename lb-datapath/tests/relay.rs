//! Relay behaviour over real loopback sockets: bytes arrive intact both ways with every relay mode,
//! half-close is propagated, and a backend reset reaches the client as a reset.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use lb_datapath::RelayMode;
use support::*;
use testkit::backends::{
    echo_server, read_pattern, reset_server, stream_header, stream_server, write_pattern,
};

#[test]
fn echo_passes_through_the_proxy() {
    let backend = echo_server().expect("echo backend");
    let key = tcp_key(10);
    let engine = start_engine(
        1,
        RelayMode::Copy,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut client = connect(key.socket_addr());
    assert_eq!(round_trip(&mut client, b"hello ringlb"), b"hello ringlb");
    drop(client);
    wait_until("connection released", Duration::from_secs(5), || engine.stats().total().active == 0);
    let total = engine.stats().total();
    assert_eq!(total.accepted, 1);
    assert_eq!(total.bytes_client_to_backend, 12);
    assert_eq!(total.bytes_backend_to_client, 12);
}

const GIB: u64 = 1 << 30;

fn transfer_both_ways_intact(relay: RelayMode, octet: u8) -> lb_datapath::Engine {
    let (backend, reports) = stream_server().expect("stream backend");
    let key = tcp_key(octet);
    let engine =
        start_engine(1, relay, snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]));
    assert_eq!(engine.relay_mode(), relay, "the kernel here supports {relay:?}");
    let mut client = connect(key.socket_addr());
    let (upload_seed, download_seed) = (0x5EED_0001, 0x5EED_0002);
    client.write_all(&stream_header(upload_seed, download_seed, GIB)).expect("header");
    let mut writer = client.try_clone().expect("clone");
    let uploader = std::thread::spawn(move || {
        write_pattern(&mut writer, upload_seed, GIB).expect("upload through the proxy");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let (downloaded, intact) = read_pattern(&mut client, download_seed).expect("download through the proxy");
    uploader.join().expect("uploader");
    assert_eq!(downloaded, GIB, "download length");
    assert!(intact, "downloaded bytes differ from what the backend sent");
    let report = reports.recv_timeout(Duration::from_secs(30)).expect("backend report");
    assert_eq!(report.received, GIB, "upload length");
    assert!(report.intact, "uploaded bytes differ from what the client sent");
    let total = engine.stats().total();
    assert_eq!(total.bytes_backend_to_client, GIB);
    assert_eq!(total.bytes_client_to_backend, GIB + 24);
    engine
}

#[test]
fn one_gib_each_way_arrives_intact_with_copy_relay() {
    transfer_both_ways_intact(RelayMode::Copy, 11);
}

#[test]
fn one_gib_each_way_arrives_intact_with_splice_relay() {
    transfer_both_ways_intact(RelayMode::Splice, 12);
}

fn check_half_close(relay: RelayMode, octet: u8) {
    let (backend, reports) = stream_server().expect("stream backend");
    let key = tcp_key(octet);
    let engine =
        start_engine(1, relay, snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]));
    let mut client = connect(key.socket_addr());
    let response_len = 8 * 1024 * 1024;
    client.write_all(&stream_header(1, 2, response_len)).expect("header");
    // The client is done sending before the backend has answered anything.
    client.shutdown(Shutdown::Write).expect("half-close");
    let (received, intact) = read_pattern(&mut client, 2).expect("response after half-close");
    assert_eq!(received, response_len);
    assert!(intact);
    let report = reports.recv_timeout(Duration::from_secs(10)).expect("backend saw EOF");
    assert_eq!(report.received, 0);
    wait_until("connection released", Duration::from_secs(5), || engine.stats().total().active == 0);
}

#[test]
fn client_half_close_still_receives_the_full_response() {
    check_half_close(RelayMode::Copy, 13);
}

#[test]
fn client_half_close_still_receives_the_full_response_with_splice() {
    check_half_close(RelayMode::Splice, 14);
}

fn check_backend_reset(relay: RelayMode, octet: u8) {
    let backend = reset_server().expect("reset backend");
    let key = tcp_key(octet);
    let engine =
        start_engine(1, relay, snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]));
    let mut client = connect(key.socket_addr());
    // One write: a second write after the reset arrived would consume the socket's pending
    // ECONNRESET and the read below would see EOF instead.
    client.write_all(b"first and second").expect("write before the backend resets");
    let outcome = read_to_close(&mut client);
    assert_eq!(outcome, Err(std::io::ErrorKind::ConnectionReset), "the client must see a reset, not EOF");
    wait_until("connection released", Duration::from_secs(5), || engine.stats().total().active == 0);
    assert!(engine.stats().total().resets >= 1);
}

#[test]
fn backend_reset_reaches_the_client_as_a_reset() {
    check_backend_reset(RelayMode::Copy, 15);
}

#[test]
fn backend_reset_reaches_the_client_as_a_reset_with_splice() {
    check_backend_reset(RelayMode::Splice, 16);
}

#[test]
fn auto_relay_keeps_small_messages_on_copy() {
    let backend = echo_server().expect("echo backend");
    let key = tcp_key(17);
    let engine = start_engine(
        1,
        RelayMode::Auto,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    assert_eq!(engine.relay_mode(), RelayMode::Auto);
    let mut client = connect(key.socket_addr());
    for _ in 0..100 {
        assert_eq!(round_trip(&mut client, b"small request"), b"small request");
    }
    let total = engine.stats().total();
    assert_eq!(total.relay_spliced, 0, "request/response traffic never leaves the copy relay");
    assert_eq!(total.pipes_in_use, 0);
}

#[test]
fn one_gib_each_way_arrives_intact_when_auto_relay_switches_to_splice() {
    let engine = transfer_both_ways_intact(RelayMode::Auto, 18);
    let total = engine.stats().total();
    // Each direction moved to splice; one that briefly ran dry may have gone back to copy and
    // spliced again.
    assert!(total.relay_spliced >= 2, "both bulk directions moved to splice: {total:?}");
    assert!(total.relay_unspliced <= total.relay_spliced, "{total:?}");
}

#[test]
fn a_bulk_direction_gives_its_pipe_back_once_the_stream_goes_quiet() {
    let backend = echo_server().expect("echo backend");
    let key = tcp_key(14);
    let engine = start_engine(
        1,
        RelayMode::Auto,
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut client = connect(key.socket_addr());
    let bulk: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    let reader = {
        let mut client = client.try_clone().expect("clone");
        let len = bulk.len();
        std::thread::spawn(move || {
            let mut echoed = vec![0u8; len];
            client.read_exact(&mut echoed).map(|()| echoed)
        })
    };
    client.write_all(&bulk).expect("write through the proxy");
    assert_eq!(reader.join().expect("reader").expect("read the echo"), bulk, "8 MiB echoed intact");
    assert!(engine.stats().total().relay_spliced >= 1, "a bulk direction spliced");
    // Small messages after the stream: the directions go back to copy and give their pipes back,
    // so the idle connection holds neither a pipe nor a buffer.
    for _ in 0..4 {
        assert_eq!(round_trip(&mut client, b"small again"), b"small again");
    }
    wait_until("an idle connection holding no pipe and no buffer", Duration::from_secs(5), || {
        let total = engine.stats().total();
        total.active == 1 && total.pipes_in_use == 0 && total.buffers_in_use == 0
    });
    let total = engine.stats().total();
    assert_eq!(total.relay_unspliced, total.relay_spliced, "every spliced direction came back: {total:?}");
}

#[test]
fn client_half_close_still_receives_the_full_response_with_auto_relay() {
    check_half_close(RelayMode::Auto, 19);
}

#[test]
fn backend_reset_reaches_the_client_as_a_reset_with_auto_relay() {
    check_backend_reset(RelayMode::Auto, 60);
}
