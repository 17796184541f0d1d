//! End-to-end tests of the `check` and `demo` commands and of the admin listener's guard.

mod support;

use std::net::SocketAddr;
use std::process::Command;

use support::{Ringlb, http_get, loopback, port_free_on};

fn ringlb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringlb")).args(args).output().expect("run ringlb")
}

fn example(name: &str) -> String {
    format!("{}/../deploy/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_prints_the_table_that_run_would_serve() {
    let output = ringlb(&["check", "--manifests", &example("web.yaml")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "check succeeds: {stdout}");
    let entry = stdout.lines().find(|l| l.starts_with("127.0.0.10:8080")).expect("the VIP's line");
    assert!(entry.contains("default/web") && entry.contains("3/4"), "3 of 4 eligible: {entry}");
    assert_eq!(stdout.matches(" eligible ").count(), 3, "{stdout}");
    assert_eq!(stdout.matches(" not-ready ").count(), 1, "{stdout}");

    let output = ringlb(&["check", "--manifests", &example("web.yaml"), "--json"]);
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("check --json is JSON");
    let entries = json["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["key"]["port"], 8080);
    assert_eq!(entries[0]["eligible"].as_array().map(Vec::len), Some(3));
    assert_eq!(entries[0]["backends"].as_array().map(Vec::len), Some(4));
}

#[test]
fn check_names_the_rejected_object_and_field_and_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(example("web.yaml")).expect("example");
    let bad = text.replace("- 127.0.0.10", "- 127.0.0.300");
    assert_ne!(bad, text);
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, bad).expect("write");
    let output = ringlb(&["check", "--manifests", file.to_str().expect("utf-8")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let rejected = stdout.lines().find(|l| l.starts_with("rejected:")).expect("a rejection line");
    assert!(rejected.contains("Service default/web"), "{rejected}");
    assert!(rejected.contains("spec.externalIPs[0]") && rejected.contains("127.0.0.300"), "{rejected}");
    assert!(stdout.contains("last good spec"), "check says what serving does with a rejection: {stdout}");
}

#[test]
fn check_of_unloadable_manifests_exits_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: [oops\n").expect("write");
    let output = ringlb(&["check", "--manifests", file.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.yaml"), "the error names the file: {stderr}");
}

#[test]
fn demo_balances_over_the_ready_backends_only() {
    let backend_port = port_free_on(&[2, 3, 4, 5].map(loopback));
    let vip = SocketAddr::new(loopback(1), port_free_on(&[loopback(1)]));
    let mut demo = Ringlb::start(&[
        "demo",
        "--port",
        &vip.port().to_string(),
        "--backend-port",
        &backend_port.to_string(),
    ]);
    demo.wait_ready();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (status, body) = http_get(vip, "/").expect("GET through the demo VIP");
        assert_eq!(status, 200);
        let name = body.split_whitespace().nth(2).expect("hello from <name>").to_owned();
        seen.insert(name);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["backend-1", "backend-2", "backend-3"]);
    assert!(demo.terminate().success());
}

#[test]
fn admin_on_a_non_loopback_address_needs_explicit_permission() {
    let output = ringlb(&["demo", "--admin", "0.0.0.0:0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-allow-remote"), "{stderr}");
}

#[test]
fn check_with_a_node_name_honours_external_traffic_policy_local() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(example("web.yaml")).expect("example");
    let local = text.replace("  type: ClusterIP\n", "  type: ClusterIP\n  externalTrafficPolicy: Local\n");
    assert_ne!(local, text);
    // web-1 runs on node-a, the other ready endpoints elsewhere.
    let placed = local
        .replacen("- addresses: [\"127.0.0.21\"]\n", "- addresses: [\"127.0.0.21\"]\n  nodeName: node-a\n", 1)
        .replace("- addresses: [\"127.0.0.22\"]\n", "- addresses: [\"127.0.0.22\"]\n  nodeName: node-b\n");
    let file = dir.path().join("local.yaml");
    std::fs::write(&file, placed).expect("write");
    let manifests = file.to_str().expect("utf-8");

    let eligible = |extra: &[&str]| -> usize {
        let mut args = vec!["check", "--manifests", manifests, "--json"];
        args.extend_from_slice(extra);
        let output = Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(&args)
            .env_remove("NODE_NAME")
            .output()
            .expect("run ringlb");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        json["entries"][0]["eligible"].as_array().expect("eligible").len()
    };
    assert_eq!(eligible(&[]), 3, "appliance mode (no node name) ignores the Local policy");
    assert_eq!(eligible(&["--node-name", "node-a"]), 1, "only node-a's endpoint is eligible");
}
