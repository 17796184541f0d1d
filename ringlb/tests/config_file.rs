//! End-to-end: `ringlb --config FILE run` takes its flags from a TOML file, the command line's win,
//! and a bad file stops ringlb before it serves anything, with an error naming the file and the key.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;

use support::{Ringlb, free_admin_addr, greeting, loopback, port_free_on, save, web_manifest};
use testkit::backends::{Server, named_server_on};

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
