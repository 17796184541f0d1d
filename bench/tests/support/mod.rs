//! Test support for the ringlb-bench integration tests: the binary's built-in servers as child
//! processes that are killed on drop, and a bounded runner that parses the binary's `--json` output.
//!
//! Every wait is bounded (`recv_timeout` on a channel fed by a reader/waiter thread); a child that
//! overruns its bound is killed and the test fails, so no test can hang.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BINARY: &str = env!("CARGO_BIN_EXE_ringlb-bench");

/// Upper bound for any single client run (runs themselves last well under a second).
pub const RUN_BOUND: Duration = Duration::from_secs(30);

/// A `ringlb-bench serve KIND` child on 127.0.0.1 with a free port; killed when dropped.
pub struct Server {
    child: Child,
    pub address: SocketAddr,
}

impl Server {
    pub fn start(kind: &str) -> Self {
        let mut child = Command::new(BINARY)
            .args(["serve", kind, "--listen", "127.0.0.1:0", "--threads", "1", "--duration", "120s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the ringlb-bench binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        let line = match line_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("serve {kind} printed no listening line within 10 s");
            }
        };
        // "listening KIND ADDR threads=N"
        let address = line
            .split_whitespace()
            .nth(2)
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("unexpected listening line: {line:?}"));
        Self { child, address }
    }
}

impl Server {
    /// The server process's id (to watch its memory and CPU).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server now (its connections are reset or closed by the kernel).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with `args`, killing it if it exceeds `RUN_BOUND`.
pub fn run_bounded(args: &[String]) -> Output {
    let child = Command::new(BINARY)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the ringlb-bench binary starts");
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(RUN_BOUND) {
        Ok(output) => output.expect("waiting for the child succeeds"),
        Err(_) => {
            kill_child(pid);
            panic!("ringlb-bench {args:?} did not finish within {RUN_BOUND:?}");
        }
    }
}

/// Kills the overrunning child we spawned (by its pid: the waiter thread owns the `Child`).
fn kill_child(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Runs a load mode with `--json --quiet`, requires success and returns the parsed report.
pub fn run_json(mode: &str, target: SocketAddr, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> =
        vec![mode.into(), "--target".into(), target.to_string(), "--json".into(), "--quiet".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let output = run_bounded(&args);
    assert!(
        output.status.success(),
        "ringlb-bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)));
    assert_common_fields(&report, mode, target);
    report
}

pub fn u64_at(report: &serde_json::Value, pointer: &str) -> u64 {
    report
        .pointer(pointer)
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("{pointer} missing in {report}"))
}

pub fn f64_at(report: &serde_json::Value, pointer: &str) -> f64 {
    report
        .pointer(pointer)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("{pointer} missing in {report}"))
}

/// The fields every report carries, with values consistent with each other.
pub fn assert_common_fields(report: &serde_json::Value, mode: &str, target: SocketAddr) {
    assert_eq!(report["mode"], mode);
    assert_eq!(report["target"], target.to_string());
    assert!(report["params"].is_object(), "params: {report}");
    assert!(f64_at(report, "/duration_s") > 0.0);
    assert!(u64_at(report, "/client_threads") >= 1);
    assert!(f64_at(report, "/client_cpu/wall_s") > 0.0);
    let errors = report["errors"].as_object().expect("errors is an object");
    let sum: u64 = errors.values().map(|v| v.as_u64().expect("error counts are integers")).sum();
    assert_eq!(sum, u64_at(report, "/errors_total"), "errors_total is the sum of the kinds");
    let ops = u64_at(report, "/ops");
    let rate = f64_at(report, "/ops_per_sec");
    let expected = ops as f64 / f64_at(report, "/duration_s");
    assert!((rate - expected).abs() <= expected * 1e-9 + 1e-9, "ops_per_sec {rate} vs {expected}");
    if !report["latency_us"].is_null() {
        let p = |name: &str| f64_at(report, &format!("/latency_us/{name}"));
        assert!(p("min") <= p("p50") && p("p50") <= p("p90") && p("p90") <= p("p99"), "{report}");
        assert!(p("p99") <= p("p999") && p("p999") <= p("max"), "{report}");
        assert!(p("min") > 0.0);
    }
}
