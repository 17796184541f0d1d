//! End-to-end tests of the command line: the `check` and `demo` commands, the admin listener's
//! guard, and `--config FILE` (flags from a TOML file, the command line's winning, a bad file
//! refused before anything is served with an error naming the file and the key).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;

use support::{Ringlb, free_admin_addr, greeting, http_get, loopback, port_free_on, save, web_manifest};
use testkit::backends::{Server, named_server_on};

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

    let eligible_with = |extra: &[&str], node_name_variable: Option<&str>| -> usize {
        let mut args = vec!["check", "--manifests", manifests, "--json"];
        args.extend_from_slice(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringlb"));
        command.args(&args).env_remove("NODE_NAME");
        if let Some(node) = node_name_variable {
            command.env("NODE_NAME", node);
        }
        let output = command.output().expect("run ringlb");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        json["entries"][0]["eligible"].as_array().expect("eligible").len()
    };
    let eligible = |extra: &[&str]| eligible_with(extra, None);
    assert_eq!(eligible(&[]), 3, "appliance mode (no node name) ignores the Local policy");
    assert_eq!(eligible(&["--node-name", "node-a"]), 1, "only node-a's endpoint is eligible");

    // From a configuration file, which the environment variable overrides.
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[check]\nnode-name = \"node-a\"\n").expect("write config");
    let config_flag = ["--config", config.to_str().expect("utf-8")];
    assert_eq!(eligible(&config_flag), 1, "the file's node name applies");
    std::fs::write(&config, "[check]\nnode-name = \"node-without-endpoints\"\n").expect("write config");
    assert_eq!(eligible_with(&config_flag, Some("node-a")), 1, "$NODE_NAME wins over the file");
}

/// A Service on a loopback VIP with one named backend, its manifest in `dir/manifests/`.
fn served_vip(dir: &Path, vip_octet: u8, backend_octet: u8) -> (SocketAddr, Server) {
    let backend_ip = loopback(backend_octet);
    let backend_port = port_free_on(&[backend_ip]);
    let backend = named_server_on(SocketAddr::new(backend_ip, backend_port), "from-file").expect("backend");
    let vip = SocketAddr::new(loopback(vip_octet), port_free_on(&[loopback(vip_octet)]));
    std::fs::create_dir(dir.join("manifests")).expect("manifests dir");
    save(&dir.join("manifests/web.yaml"), &web_manifest(vip, backend_port, &[(backend_ip, true)]));
    (vip, backend)
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8 path").to_owned()
}

fn worker_count(ringlb: &Ringlb) -> usize {
    ringlb.status()["workers"].as_array().expect("workers").len()
}

#[test]
fn run_takes_its_flags_from_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (vip, _backend) = served_vip(dir.path(), 150, 151);
    let admin = free_admin_addr();
    let manifests = dir.path().join("manifests");
    let config = write_config(
        dir.path(),
        &format!(
            "log-level = \"warn\"\n[run]\nmanifests = {:?}\nadmin = \"{admin}\"\nworkers = 3\n\
             shutdown-grace = \"1s\"\nno-pin = true\n",
            manifests.to_str().expect("utf-8 path")
        ),
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringlb"));
    command.args(["run"]).env("RINGLB_CONFIG", &config);
    let mut ringlb = Ringlb::spawn(command, admin);
    ringlb.wait_ready();
    assert_eq!(worker_count(&ringlb), 3, "the file's --workers");
    assert_eq!(greeting(vip).expect("the file's --manifests are served").0, "from-file");
    assert!(ringlb.terminate().success());
}

#[test]
fn flags_on_the_command_line_win_over_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (vip, _backend) = served_vip(dir.path(), 152, 153);
    let file_admin = free_admin_addr();
    let manifests = dir.path().join("manifests");
    let config = write_config(
        dir.path(),
        &format!(
            "[run]\nmanifests = {:?}\nadmin = \"{file_admin}\"\nworkers = 3\n",
            manifests.to_str().expect("utf-8 path")
        ),
    );
    // Ringlb::start_with puts `--admin <another port> --workers 2` on the command line.
    let mut ringlb = Ringlb::start(&["--config", &config, "run"]);
    assert_ne!(ringlb.admin, file_admin);
    ringlb.wait_ready();
    assert_eq!(worker_count(&ringlb), 2, "the command line's --workers");
    assert!(TcpStream::connect(file_admin).is_err(), "nothing listens on the file's --admin");
    assert_eq!(greeting(vip).expect("the file's --manifests still apply").0, "from-file");
    assert!(ringlb.terminate().success());
}

#[test]
fn a_bad_file_is_refused_before_anything_is_served_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("[run]\nmanifests = \"m\"\nworker = 2\n", "unknown key `run.worker`"),
        ("[run]\nmanifests = \"m\"\nworkers = \"two\"\n", "`run.workers`: invalid value 'two' for --workers"),
        ("[run]\nmanifests = \"m\"\nno-pin = \"yes\"\n", "`run.no-pin`: a switch takes true or false"),
        ("[run]\nmanifests = [\"m\"]\n", "`run.manifests`: --manifests takes one value, not an array"),
    ];
    for (text, expected) in cases {
        let config = write_config(dir.path(), text);
        let output = Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(["--config", &config, "run", "--admin", &free_admin_addr().to_string()])
            .output()
            .expect("run ringlb");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(stderr.contains(&format!("{config}: {expected}")), "{text:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
