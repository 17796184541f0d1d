//! Every load mode against the built-in servers over real loopback: it completes within its bound,
//! reports operations and no errors, its JSON is consistent, and byte counts add up. Also the failure
//! paths: a closed port yields counted connect errors, a silent UDP peer yields counted loss.

mod support;

use std::io::Read as _;
use std::net::{TcpListener, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

use support::{Server, f64_at, run_bounded, run_json, u64_at};

const SHORT: &str = "400ms";

fn stream_sums(report: &serde_json::Value, field: &str) -> u64 {
    report["streams"]
        .as_array()
        .expect("streams is an array")
        .iter()
        .map(|s| s[field].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn tcp_stream_up_reports_exactly_the_bytes_the_sink_received() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the counting sink");
    let target = listener.local_addr().expect("sink address");
    let streams = 3;
    let (total_tx, total_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let readers: Vec<_> = (0..streams)
            .map(|_| {
                let (mut connection, _) = listener.accept().expect("accept a stream");
                connection.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
                std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    loop {
                        match connection.read(&mut buffer) {
                            Ok(0) | Err(_) => return total,
                            Ok(count) => total += count as u64,
                        }
                    }
                })
            })
            .collect();
        let total: u64 = readers.into_iter().map(|r| r.join().unwrap_or(0)).sum();
        let _ = total_tx.send(total);
    });

    let report = run_json("tcp-stream", target, &["--streams", "3", "--duration", SHORT, "--threads", "2"]);
    let received = total_rx.recv_timeout(Duration::from_secs(20)).expect("the sink saw every stream end");

    assert_eq!(u64_at(&report, "/errors_total"), 0, "{report}");
    assert!(u64_at(&report, "/ops") > 0);
    let sent = u64_at(&report, "/bytes_sent");
    assert!(sent > 0);
    assert_eq!(received, sent, "the sink received exactly what the report says was sent");
    assert_eq!(stream_sums(&report, "bytes_sent"), sent, "per-stream bytes add up to the total");
    assert_eq!(report["streams"].as_array().map(Vec::len), Some(3));
    assert!(f64_at(&report, "/gbit_per_sec_sent") > 0.0);
}

#[test]
fn tcp_stream_down_reads_from_the_source_server() {
    let server = Server::start("tcp-source");
    let report = run_json(
        "tcp-stream",
        server.address,
        &["--streams", "2", "--direction", "down", "--duration", SHORT],
    );
    assert_eq!(u64_at(&report, "/errors_total"), 0, "{report}");
    let received = u64_at(&report, "/bytes_received");
    assert!(received > 0);
    assert_eq!(u64_at(&report, "/bytes_sent"), 0);
    assert_eq!(stream_sums(&report, "bytes_received"), received);
}

#[test]
fn tcp_stream_both_gets_its_bytes_echoed() {
    let server = Server::start("tcp-echo");
    let report = run_json(
        "tcp-stream",
        server.address,
        &["--streams", "2", "--direction", "both", "--duration", SHORT],
    );
    assert_eq!(u64_at(&report, "/errors_total"), 0, "{report}");
    let (sent, received) = (u64_at(&report, "/bytes_sent"), u64_at(&report, "/bytes_received"));
    assert!(sent > 0 && received > 0);
    assert_eq!(stream_sums(&report, "bytes_sent"), sent);
    assert_eq!(stream_sums(&report, "bytes_received"), received);
}

#[test]
fn tcp_rr_completes_pipelined_round_trips_against_the_echo_server() {
    let server = Server::start("tcp-echo");
    let report = run_json(
        "tcp-rr",
        server.address,
        &[
            "--connections",
            "4",
            "--message-size",
            "100",
            "--pipeline",
            "2",
            "--duration",
            SHORT,
            "--threads",
            "2",
        ],
    );
    assert_eq!(u64_at(&report, "/errors_total"), 0, "{report}");
    let ops = u64_at(&report, "/ops");
    assert!(ops > 0);
    assert_eq!(u64_at(&report, "/latency_us/count"), ops, "one latency sample per completed request");
    assert!(u64_at(&report, "/bytes_received") >= ops * 100, "each completed request received its echo");
    assert_eq!(u64_at(&report, "/params/pipeline"), 2);
}

#[test]
fn tcp_crr_opens_a_connection_per_transaction_against_the_echo_server() {
    let server = Server::start("tcp-echo");
    for extra in [&["--close", "fin"][..], &["--close", "reset", "--source-ips", "4"][..]] {
        let mut args = vec!["--connections", "4", "--message-size", "64", "--duration", SHORT];
        args.extend_from_slice(extra);
        let report = run_json("tcp-crr", server.address, &args);
        assert_eq!(u64_at(&report, "/errors_total"), 0, "{extra:?}: {report}");
        let ops = u64_at(&report, "/ops");
        assert!(ops > 0, "{extra:?}");
        assert_eq!(u64_at(&report, "/latency_us/count"), ops);
        assert!(u64_at(&report, "/bytes_received") >= ops * 64);
    }
}

#[test]
fn tcp_crr_against_a_closed_port_reports_connect_errors_and_stops_at_the_deadline() {
    let closed = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("reserve a port");
    let report = run_json("tcp-crr", closed, &["--connections", "2", "--duration", "300ms"]);
    assert_eq!(u64_at(&report, "/ops"), 0);
    assert!(u64_at(&report, "/errors/connect_refused") > 0, "{report}");
    assert!(report["latency_us"].is_null(), "no latency without a completed transaction");
}

#[test]
fn tcp_crr_and_rr_against_a_listener_that_never_accepts_report_timeouts_and_stop_at_the_deadline() {
    // Backlog 0: once the accept queue is full the kernel drops further SYNs, so connects hang.
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any_port: std::net::SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    listener.bind(&any_port.into()).expect("bind");
    listener.listen(0).expect("listen");
    let target = listener.local_addr().ok().and_then(|a| a.as_socket()).expect("listener address");
    for mode in ["tcp-crr", "tcp-rr"] {
        let args =
            ["--connections", "8", "--connect-timeout", "100ms", "--timeout", "100ms", "--duration", SHORT];
        let report = run_json(mode, target, &args);
        assert_eq!(u64_at(&report, "/ops"), 0, "{mode}: {report}");
        assert!(u64_at(&report, "/errors/connect_timeout") > 0, "{mode}: {report}");
    }
}

#[test]
fn tcp_rr_against_a_closed_port_reports_connect_errors() {
    let closed = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("reserve a port");
    let report = run_json("tcp-rr", closed, &["--connections", "2", "--duration", "300ms"]);
    assert_eq!(u64_at(&report, "/ops"), 0);
    assert!(u64_at(&report, "/errors/connect_refused") > 0, "{report}");
}

#[test]
fn tcp_idle_holds_every_connection_pings_them_and_samples_the_watched_process() {
    let server = Server::start("tcp-echo");
    let pid = server.pid().to_string();
    let args = [
        "--connections",
        "40",
        "--source-ips",
        "8",
        "--ping-every",
        "100ms",
        "--ping-bytes",
        "16",
        "--duration",
        SHORT,
        "--watch-pid",
        &pid,
    ];
    let report = run_json("tcp-idle", server.address, &args);
    assert_eq!(u64_at(&report, "/errors_total"), 0, "{report}");
    assert_eq!(u64_at(&report, "/idle/requested"), 40);
    assert_eq!(u64_at(&report, "/idle/established"), 40, "{report}");
    assert_eq!(u64_at(&report, "/idle/alive_at_end"), 40, "{report}");
    let pings = u64_at(&report, "/ops");
    assert!(pings >= 40, "at least one round of pings: {pings}");
    assert_eq!(u64_at(&report, "/bytes_received"), pings * 16);
    assert!(u64_at(&report, "/idle/proxy/rss_kib_open") > 0, "{report}");
    assert_eq!(report.pointer("/idle/proxy/pids/0").and_then(|p| p.as_u64()), Some(server.pid().into()));
}

#[test]
fn tcp_idle_counts_connections_that_a_dying_server_took_down() {
    let mut server = Server::start("tcp-echo");
    let address = server.address;
    // The server dies during the hold: no ping, so only the check at the end can find out.
    let run = std::thread::spawn(move || {
        run_json("tcp-idle", address, &["--connections", "10", "--duration", "1500ms"])
    });
    // Each run opens its connections first: wait until the server holds them, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while established_to(address) < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.kill();
    let report = run.join().expect("the run completes");
    assert_eq!(u64_at(&report, "/idle/established"), 10, "{report}");
    assert_eq!(u64_at(&report, "/idle/alive_at_end"), 0, "{report}");
    assert_eq!(u64_at(&report, "/errors_total"), 10, "one failure per lost connection: {report}");
    assert!(report.pointer("/idle/proxy").is_some_and(|p| p.is_null()), "nothing watched");
}

/// Established TCP connections to `address` as the kernel lists them (`/proc/net/tcp`).
fn established_to(address: std::net::SocketAddr) -> usize {
    let std::net::SocketAddr::V4(v4) = address else { return 0 };
    let local = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    // Columns: sl local remote st ...; state 01 is ESTABLISHED, on the server's side of each.
    table
        .lines()
        .filter(|line| {
            let mut columns = line.split_whitespace().skip(1);
            columns.next() == Some(local.as_str()) && columns.nth(1) == Some("01")
        })
        .count()
}

#[test]
fn udp_rr_round_trips_against_the_echo_server() {
    let server = Server::start("udp-echo");
    // A generous loss timeout: this asserts correctness, not the latency of a busy machine.
    let report = run_json(
        "udp-rr",
        server.address,
        &["--flows", "4", "--message-size", "64", "--timeout", "5s", "--duration", SHORT],
    );
    assert_eq!(u64_at(&report, "/errors_total"), 0, "{report}");
    let ops = u64_at(&report, "/ops");
    assert!(ops > 0);
    assert_eq!(u64_at(&report, "/datagrams/received"), ops);
    assert_eq!(u64_at(&report, "/datagrams/lost"), 0);
    assert_eq!(u64_at(&report, "/latency_us/count"), ops);
}

#[test]
fn udp_rr_counts_loss_when_the_peer_never_answers_and_stops_at_the_deadline() {
    // Bound, so no ICMP port-unreachable comes back: datagrams simply vanish.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind a silent peer");
    let target = silent.local_addr().expect("silent peer address");
    let report = run_json("udp-rr", target, &["--flows", "3", "--timeout", "50ms", "--duration", SHORT]);
    assert_eq!(u64_at(&report, "/ops"), 0);
    assert!(u64_at(&report, "/datagrams/lost") > 0, "{report}");
    assert_eq!(f64_at(&report, "/datagrams/loss_percent"), 100.0);
    assert_eq!(u64_at(&report, "/errors_total"), 0, "loss is reported as loss, not as an error");
    drop(silent);
}

#[test]
fn udp_stream_learns_the_received_count_from_the_sink() {
    let server = Server::start("udp-sink");
    for extra in [&[][..], &["--warmup", "200ms", "--rate", "20000"][..], &["--gso", "8"][..]] {
        let mut args = vec!["--flows", "3", "--message-size", "200", "--duration", SHORT];
        args.extend_from_slice(extra);
        let report = run_json("udp-stream", server.address, &args);
        assert_eq!(u64_at(&report, "/errors_total"), 0, "{extra:?}: {report}");
        let sent = u64_at(&report, "/datagrams/sent");
        let received = u64_at(&report, "/datagrams/received");
        assert_eq!(sent, u64_at(&report, "/ops"));
        assert!(sent > 0 && received > 0, "{report}");
        assert!(received <= sent, "the sink cannot count more than was sent in the window: {report}");
        assert_eq!(u64_at(&report, "/datagrams/lost"), sent - received);
        assert_eq!(u64_at(&report, "/bytes_received"), received * 200, "{report}");
    }
}

#[test]
fn udp_stream_refuses_a_target_that_cannot_report_what_it_received() {
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind a silent peer");
    let target = silent.local_addr().expect("silent peer address");
    let output = run_bounded(&[
        "udp-stream".into(),
        "--target".into(),
        target.to_string(),
        "--duration".into(),
        "200ms".into(),
        "--quiet".into(),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("stats query"), "{output:?}");
}

#[test]
fn human_table_and_progress_line_are_printed_for_long_runs() {
    let server = Server::start("tcp-echo");
    let output = run_bounded(&[
        "tcp-rr".into(),
        "--target".into(),
        server.address.to_string(),
        "--duration".into(),
        "2100ms".into(),
    ]);
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("latency us p50") && table.contains("errors     0"), "{table}");
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(progress.contains("ops/s"), "a run over 2 s shows progress on stderr: {progress}");
}

#[test]
fn server_with_a_duration_exits_by_itself() {
    let output = run_bounded(&[
        "serve".into(),
        "udp-echo".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--duration".into(),
        "200ms".into(),
    ]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("listening udp-echo 127.0.0.1:") && stdout.contains("stopped"), "{stdout}");
}
