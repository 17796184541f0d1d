//! The `ringlb` binary under the seccomp profile shipped for Kubernetes
//! (`deploy/kubernetes/base/seccomp/ringlb.json`), loaded by `testkit/seccomp-exec.py` the way a container
//! runtime loads a `Localhost` profile: no_new_privs, the filter, then exec.
//!
//! The profile must let ringlb serve through io_uring and stop gracefully, and it must not be
//! permissive by accident: the same profile without an io_uring syscall makes ringlb fail or never
//! turn ready, which the main test's readiness gate detects (so a profile denying io_uring cannot
//! pass it). The wrapper needs Debian's `python3-seccomp`; without it these tests fail, never skip.

mod support;

use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;

use support::{
    IO_TIMEOUT, Ringlb, http_get, io_uring_descriptors, loopback, poll_until, port_free_on, proc_status,
    save, web_manifest,
};
use testkit::backends::{Server, StreamReport, read_pattern, stream_header, stream_server, write_pattern};

const PROFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/base/seccomp/ringlb.json");
const WRAPPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testkit/seccomp-exec.py");
/// Debian's interpreter, the one `python3-seccomp` installs libseccomp's binding for (a pyenv or
/// virtualenv `python3` earlier on PATH does not see it).
const PYTHON: &str = "/usr/bin/python3";
const IO_URING_SYSCALLS: [&str; 3] = ["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// One Service on a loopback VIP with one real backend, and ringlb's log file, in a temporary dir.
struct Fixture {
    dir: tempfile::TempDir,
    manifest: PathBuf,
    vip: SocketAddr,
    _backend: Server,
    reports: Receiver<StreamReport>,
}

impl Fixture {
    fn new(vip_octet: u8) -> Fixture {
        require_libseccomp_binding();
        let (backend, reports) = stream_server().expect("stream backend");
        let vip = SocketAddr::new(loopback(vip_octet), port_free_on(&[loopback(vip_octet)]));
        let dir = tempfile::tempdir().expect("temp dir");
        let manifest = dir.path().join("web.yaml");
        save(&manifest, &web_manifest(vip, backend.addr().port(), &[(backend.addr().ip(), true)]));
        Fixture { dir, manifest, vip, _backend: backend, reports }
    }

    /// `ringlb run --manifests` under `profile`, its stderr to [`Fixture::log`].
    fn start_under(&self, profile: &Path) -> Ringlb {
        let log = File::create(self.log_path()).expect("create the log file");
        let manifest = self.manifest.to_str().expect("utf-8 path");
        Ringlb::start_with(&["run", "--manifests", manifest], under_profile(profile, log))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("ringlb.log")
    }

    /// What ringlb (and the wrapper before it) wrote to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The shipped profile without `names`, written into the fixture's directory.
    fn profile_without(&self, names: &[&str]) -> PathBuf {
        let text = std::fs::read_to_string(PROFILE).expect("read the shipped profile");
        let mut profile: serde_json::Value = serde_json::from_str(&text).expect("the profile is JSON");
        let mut removed = 0;
        for rule in profile["syscalls"].as_array_mut().expect("syscalls") {
            let rule_names = rule["names"].as_array_mut().expect("names");
            let before = rule_names.len();
            rule_names.retain(|name| !names.contains(&name.as_str().expect("a name")));
            removed += before - rule_names.len();
        }
        assert_eq!(removed, names.len(), "the shipped profile allows each of {names:?} once");
        let path = self.dir.path().join("trimmed-profile.json");
        std::fs::write(&path, profile.to_string()).expect("write the trimmed profile");
        path
    }
}

/// Fails (never skips) when the wrapper cannot load profiles on this machine.
fn require_libseccomp_binding() {
    let probe = Command::new(PYTHON).args(["-c", "import seccomp"]).stderr(Stdio::null()).status();
    assert!(
        probe.is_ok_and(|status| status.success()),
        "libseccomp's Python binding is missing for {PYTHON}: install it with \
         `apt-get install python3-seccomp` (.ci/run installs it); these tests never skip"
    );
}

/// Replaces the `ringlb ARGS` command built by [`Ringlb::start_with`] with
/// `seccomp-exec.py PROFILE -- ringlb ARGS` (same environment), stderr to `log`.
fn under_profile(profile: &Path, log: File) -> impl FnOnce(&mut Command) {
    let profile = profile.to_path_buf();
    move |command: &mut Command| {
        let mut wrapped = Command::new(PYTHON);
        wrapped.arg(WRAPPER).arg(&profile).arg("--").arg(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        *command = wrapped;
    }
}

/// Polls until ringlb answers `/readyz` with 200 (`true`) or has exited (`false`).
fn ready_or_exited(ringlb: &mut Ringlb) -> bool {
    let admin = ringlb.admin;
    poll_until("ringlb to turn ready or exit", || {
        if !ringlb.is_running() {
            return Some(false);
        }
        http_get(admin, "/readyz").ok().filter(|(status, _)| *status == 200).map(|_| true)
    })
}

/// The sum of one TCP counter over the workers in `/status`.
fn workers_total(ringlb: &Ringlb, counter: &str) -> u64 {
    let status = ringlb.status();
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|worker| worker[counter].as_u64().expect(counter))
        .sum()
}

#[test]
fn ringlb_serves_through_io_uring_under_the_shipped_profile_and_stops_gracefully() {
    let fixture = Fixture::new(130);
    let mut ringlb = fixture.start_under(Path::new(PROFILE));
    assert!(ready_or_exited(&mut ringlb), "ringlb exited under the shipped profile:\n{}", fixture.log());

    // The filter is in force in the ringlb process itself, and its rings exist under it.
    let pid = ringlb.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
    assert!(exe.ends_with("ringlb"), "the wrapper exec'd ringlb: {exe:?}");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "a seccomp filter is loaded");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert!(io_uring_descriptors(pid) >= 2, "one io_uring per worker (--workers 2)");

    // Bytes flow both ways through the VIP, intact, and the io_uring workers count them.
    const LEN: u64 = 4 << 20;
    let mut client = TcpStream::connect_timeout(&fixture.vip, IO_TIMEOUT).expect("connect to the VIP");
    client.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    client.write_all(&stream_header(5, 6, LEN)).expect("header");
    let mut writer = client.try_clone().expect("clone");
    let upload = std::thread::spawn(move || {
        write_pattern(&mut writer, 5, LEN).expect("upload");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let (downloaded, intact) = read_pattern(&mut client, 6).expect("download");
    upload.join().expect("upload thread");
    assert_eq!((downloaded, intact), (LEN, true), "the download arrives whole and intact");
    let report = fixture.reports.recv_timeout(support::DEADLINE).expect("backend report");
    assert_eq!((report.received, report.intact), (LEN, true), "the upload arrives whole and intact");
    drop(client);
    poll_until("the workers to count the relayed bytes", || {
        (workers_total(&ringlb, "bytes_client_to_backend") >= LEN
            && workers_total(&ringlb, "bytes_backend_to_client") >= LEN)
            .then_some(())
    });

    let status = ringlb.terminate();
    let log = fixture.log();
    assert!(status.success(), "ringlb exits 0 on SIGTERM under the profile: {status}\n{log}");
    assert!(!log.contains("Operation not permitted"), "nothing ringlb did was refused:\n{log}");
}

#[test]
fn without_io_uring_setup_or_register_ringlb_fails_at_start() {
    for syscall in ["io_uring_setup", "io_uring_register"] {
        let fixture = Fixture::new(131);
        let mut ringlb = fixture.start_under(&fixture.profile_without(&[syscall]));
        assert!(!ready_or_exited(&mut ringlb), "ringlb turned ready without {syscall}:\n{}", fixture.log());
        let status = ringlb.wait();
        let log = fixture.log();
        assert!(!status.success(), "ringlb without {syscall} exits non-zero: {status}\n{log}");
        assert!(
            log.contains("io_uring setup failed") && log.contains("Operation not permitted"),
            "ringlb without {syscall} says io_uring was refused:\n{log}"
        );
    }
}

#[test]
fn without_io_uring_enter_ringlb_never_serves() {
    let fixture = Fixture::new(132);
    let mut ringlb = fixture.start_under(&fixture.profile_without(&["io_uring_enter"]));
    // Today every worker stops on its first submission and the process stays up, not ready; a
    // process that exits instead is as good. Either way the main test's readiness gate fails.
    let readiness = poll_until("every worker to report its ring refused, or ringlb to exit", || {
        if !ringlb.is_running() {
            return Some(None);
        }
        if fixture.log().matches("io_uring failed").count() < 2 {
            return None;
        }
        // The admin endpoint starts after the workers; poll until it answers too.
        http_get(ringlb.admin, "/readyz").ok().map(|(code, _)| Some(code))
    });
    match readiness {
        Some(code) => {
            assert_eq!(code, 503, "ringlb whose rings were refused is not ready:\n{}", fixture.log());
            ringlb.terminate();
        }
        None => {
            let status = ringlb.wait();
            assert!(
                !status.success(),
                "ringlb without io_uring_enter exits non-zero: {status}\n{}",
                fixture.log()
            );
        }
    }
    assert!(fixture.log().contains("Operation not permitted"), "the refusal is logged:\n{}", fixture.log());
}

#[test]
fn the_shipped_profile_allows_io_uring_and_refuses_what_ringlb_never_calls() {
    let text = std::fs::read_to_string(PROFILE).expect("read the shipped profile");
    let profile: serde_json::Value = serde_json::from_str(&text).expect("the profile is JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO", "an allowlist: everything else refused");
    let rules = profile["syscalls"].as_array().expect("syscalls");
    assert!(rules.iter().all(|rule| rule["action"] == "SCMP_ACT_ALLOW" && rule.get("args").is_none()));
    let allowed: Vec<&str> = rules
        .iter()
        .flat_map(|rule| rule["names"].as_array().expect("names"))
        .filter_map(|n| n.as_str())
        .collect();
    for syscall in IO_URING_SYSCALLS {
        assert!(allowed.contains(&syscall), "the profile allows {syscall}");
    }
    let never =
        ["mount", "umount2", "ptrace", "kexec_load", "bpf", "unshare", "setns", "init_module", "keyctl"];
    for syscall in never {
        assert!(!allowed.contains(&syscall), "ringlb never calls {syscall}; the profile refuses it");
    }
}
