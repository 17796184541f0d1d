//! The appliance package end to end: `deploy/debian/build-deb.sh` packs the binary under test,
//! `dpkg -i` installs it, maintainer scripts and all, into a copy-on-write view of this machine's
//! root (`testkit/overlay-root.sh`: every write lands in the test's directory, the machine is never
//! changed), and the installed unit serves a manifest over real sockets.
//!
//! systemd is not PID 1 here (nor in CI), so nothing can start the unit the way systemd would.
//! The test reads the installed unit file and runs its `ExecStart` with everything of the unit
//! that can be applied without systemd, each from the unit's own lines, so that a change to the
//! unit is a change to what is tested: `User=`/`Group=`, `AmbientCapabilities=`,
//! `CapabilityBoundingSet=` and `NoNewPrivileges=` (setpriv), `LimitNOFILE=` (prlimit),
//! `SystemCallFilter=`, `SystemCallErrorNumber=` and `SystemCallArchitectures=` (expanded with
//! `systemd-analyze syscall-filter` into a seccomp profile that `testkit/seccomp-exec.py` loads),
//! and `ProtectSystem=strict`, `ProtectHome=`, `PrivateTmp=` (`overlay-root.sh --sandbox`). The
//! kernel-facing rest (`Protect*` of the kernel, `RestrictAddressFamilies=`, namespaces) is only
//! checked by `systemd-analyze verify` and `security` on the installed file.
//!
//! Needs root, unshare, dpkg, adduser, setpriv, prlimit, systemd-analyze and python3-seccomp (a
//! fresh Debian 12 has all but the last; `.ci/run` installs what is missing). Fails, never skips.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use support::{
    Ringlb, greeting, io_uring_descriptors, loopback, port_free_on, proc_status, save, web_manifest,
};
use testkit::backends::named_server_on;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The exposure `systemd-analyze security` may give the unit at most, in its tenths (1.6 when
/// written): a change that weakens the sandbox fails this test.
const EXPOSURE_THRESHOLD: &str = "20";

/// The package built from this test's ringlb binary, once per test binary.
fn package() -> &'static Path {
    static PACKAGE: OnceLock<PathBuf> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("appliance-deb");
        let output = Command::new(format!("{REPO}/deploy/debian/build-deb.sh"))
            .args(["--binary", env!("CARGO_BIN_EXE_ringlb"), "--out"])
            .arg(&out)
            .output()
            .expect("run build-deb.sh");
        assert!(output.status.success(), "build-deb.sh: {}", String::from_utf8_lossy(&output.stderr));
        PathBuf::from(String::from_utf8(output.stdout).expect("utf-8").trim())
    })
}

fn checked(mut command: Command) -> String {
    let output: Output = command.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?}: {}\n{text}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

fn dpkg_deb(args: &[&str]) -> String {
    let mut command = Command::new("dpkg-deb");
    command.args(args).arg(package());
    checked(command)
}

#[test]
fn the_package_holds_the_binary_the_unit_a_commented_config_and_the_manifests_directory() {
    let contents = dpkg_deb(&["--contents"]);
    let paths: BTreeSet<&str> = contents
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    for path in [
        "/usr/bin/ringlb",
        "/lib/systemd/system/ringlb.service",
        "/etc/ringlb/config.toml",
        "/etc/ringlb/manifests/",
        "/usr/share/doc/ringlb/README.md",
        "/usr/share/doc/ringlb/copyright",
        "/usr/share/doc/ringlb/examples/web.yaml",
        "/usr/share/doc/ringlb/examples/ringlb-l2.conf",
    ] {
        assert!(paths.contains(path), "the package holds {path}: {contents}");
    }
    let binary = contents.lines().find(|line| line.ends_with("./usr/bin/ringlb")).expect("the binary");
    assert!(binary.starts_with("-rwxr-xr-x root/root"), "{binary}");

    let field = |name: &str| {
        dpkg_deb(&["--field"]).lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_owned))
    };
    assert_eq!(field("Package").as_deref(), Some("ringlb"));
    let depends = field("Depends").expect("Depends");
    assert!(depends.contains("libc6 (>=") && depends.contains("adduser"), "{depends}");

    let dir = tempfile::tempdir().expect("temp dir");
    let mut control = Command::new("dpkg-deb");
    control.arg("--control").arg(package()).arg(dir.path());
    checked(control);
    let conffiles = std::fs::read_to_string(dir.path().join("conffiles")).expect("conffiles");
    assert_eq!(conffiles, "/etc/ringlb/config.toml\n", "the configuration survives upgrades as a conffile");
}

/// A copy-on-write root of this machine with the package installed, and a directory shared with it.
struct Appliance {
    dir: tempfile::TempDir,
}

impl Appliance {
    fn installed() -> Appliance {
        let appliance = Appliance { dir: tempfile::tempdir().expect("temp dir") };
        std::fs::create_dir(appliance.share()).expect("share dir");
        let deb = appliance.share().join("ringlb.deb");
        std::fs::copy(package(), &deb).expect("copy the package");
        let mut install = appliance.chroot(false);
        install.arg("dpkg").arg("--install").arg(&deb);
        checked(install);
        appliance
    }

    fn share(&self) -> PathBuf {
        self.dir.path().join("share")
    }

    /// A path of the installed system as the host sees it, once written (dpkg's writes, the test's).
    fn upper(&self, path: &str) -> PathBuf {
        self.dir.path().join("state/upper").join(path.trim_start_matches('/'))
    }

    /// `unshare ... overlay-root.sh STATE SHARE --`: the command to run in the root follows.
    fn chroot(&self, sandbox: bool) -> Command {
        let mut command = Command::new("unshare");
        command.args(["--mount", "--propagation", "private", "--"]);
        command.arg(format!("{REPO}/testkit/overlay-root.sh"));
        if sandbox {
            command.arg("--sandbox");
        }
        command.arg(self.dir.path().join("state")).arg(self.share()).arg("--");
        command
    }

    /// The stdout of `args` run in the root.
    fn run(&self, args: &[&str]) -> String {
        let mut command = self.chroot(false);
        command.args(args);
        checked(command)
    }
}

#[test]
fn dpkg_installs_the_user_the_enabled_unit_and_the_configuration() {
    let appliance = Appliance::installed();
    assert!(
        appliance
            .run(&["dpkg-query", "--show", "--showformat=${Status}", "ringlb"])
            .contains("install ok installed")
    );
    let user = appliance.run(&["getent", "passwd", "ringlb"]);
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert_eq!(
        fields[5..],
        ["/nonexistent", "/usr/sbin/nologin"],
        "a system user without login or home: {user}"
    );
    assert!(fields[2].parse::<u32>().expect("uid") < 1000, "a system uid: {user}");
    let wants = appliance.upper("/etc/systemd/system/multi-user.target.wants/ringlb.service");
    assert_eq!(std::fs::read_link(&wants).expect("enabled"), Path::new("/lib/systemd/system/ringlb.service"));
    assert!(appliance.upper("/etc/ringlb/manifests").is_dir());

    // systemd's own checks of the installed unit (its binary, its user, every option).
    let verify = appliance.run(&["systemd-analyze", "verify", "/lib/systemd/system/ringlb.service"]);
    assert_eq!(verify, "", "systemd-analyze verify finds nothing");
    let threshold = format!("--threshold={EXPOSURE_THRESHOLD}");
    let mut security = appliance.chroot(false);
    security.args(["systemd-analyze", "security", "--offline=true", &threshold, "--no-pager"]);
    security.arg("/lib/systemd/system/ringlb.service");
    let report = checked(security);
    let score = report.lines().find(|line| line.contains("Overall exposure level")).expect("a score");
    eprintln!("{score}");
}

/// The `[Service]` settings of a unit file, each key's assignments in order (an empty one resets).
fn service_section(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let joined = text.replace("\\\n", " ");
    let mut in_service = false;
    for line in joined.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with(['#', ';']) {
            let (key, value) = line.split_once('=').expect("key=value");
            let values = settings.entry(key.to_owned()).or_default();
            if value.is_empty() {
                values.clear();
            } else {
                values.push(value.to_owned());
            }
        }
    }
    settings
}

/// Every value of `key`, as one list (capabilities may be given over several lines, or none).
fn joined(settings: &BTreeMap<String, Vec<String>>, key: &str) -> String {
    settings.get(key).map(|values| values.join(" ")).unwrap_or_default()
}

/// The one value of `key`.
fn one<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match settings.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("the unit sets {key} once: {other:?}"),
    }
}

/// Every name of `SystemCallFilter=` lines as systemd reads them: the first line is an allow list
/// (the packaged unit's is), each `~` line takes its names away; groups expanded with
/// `systemd-analyze syscall-filter`, the same table systemd applies.
fn allowed_syscalls(filters: &[String]) -> BTreeSet<String> {
    let table = checked({
        let mut command = Command::new("systemd-analyze");
        command.args(["syscall-filter", "--no-pager"]);
        command
    });
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut current = None;
    for line in table.lines() {
        if let Some(group) = line.strip_prefix('@').map(|_| line.trim()) {
            current = Some(group);
            groups.insert(group, Vec::new());
        } else if let (Some(group), name) = (current, line.trim())
            && !name.is_empty()
            && !name.starts_with('#')
        {
            groups.get_mut(group).expect("current group").push(name);
        }
    }
    fn expand(name: &str, groups: &BTreeMap<&str, Vec<&str>>, into: &mut BTreeSet<String>) {
        match groups.get(name) {
            Some(members) => members.iter().for_each(|member| expand(member, groups, into)),
            None if name.starts_with('@') => panic!("systemd knows no group {name}"),
            None => {
                into.insert(name.to_owned());
            }
        }
    }
    assert!(!filters[0].starts_with('~'), "the unit's filter is an allow list: {filters:?}");
    let mut allowed = BTreeSet::new();
    for line in filters {
        let (deny, names) = match line.strip_prefix('~') {
            Some(names) => (true, names),
            None => (false, line.as_str()),
        };
        let mut expanded = BTreeSet::new();
        names.split_whitespace().for_each(|name| expand(name, &groups, &mut expanded));
        if deny {
            allowed.retain(|name| !expanded.contains(name));
        } else {
            allowed.extend(expanded);
        }
    }
    allowed
}

/// The seccomp profile (OCI JSON, as testkit/seccomp-exec.py loads it) of the unit's filter.
fn seccomp_profile(settings: &BTreeMap<String, Vec<String>>) -> serde_json::Value {
    assert_eq!(one(settings, "SystemCallErrorNumber"), "EPERM", "refused calls fail with EPERM (1)");
    assert_eq!(one(settings, "SystemCallArchitectures"), "native");
    let allowed = allowed_syscalls(&settings["SystemCallFilter"]);
    for syscall in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(syscall), "the unit allows {syscall}");
    }
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": [],
        "syscalls": [{ "names": allowed, "action": "SCMP_ACT_ALLOW" }],
    })
}

/// The bit mask of capabilities named as the unit names them (`CAP_NET_BIND_SERVICE ...`).
fn capability_mask(names: &str) -> u64 {
    names
        .split_whitespace()
        .map(|name| match name {
            "CAP_NET_BIND_SERVICE" => 1 << 10,
            "CAP_NET_ADMIN" => 1 << 12,
            "CAP_NET_RAW" => 1 << 13,
            other => panic!("add the number of {other} (linux/capability.h)"),
        })
        .fold(0, |mask, bit| mask | bit)
}

/// setpriv's spelling of the unit's capability list: `-all,+net_bind_service,...`.
fn setpriv_capabilities(names: &str) -> String {
    let added: String = names
        .split_whitespace()
        .map(|name| format!(",+{}", name.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    format!("-all{added}")
}

/// The hard limit on descriptors this test may grant (a sandbox without CAP_SYS_RESOURCE caps it).
fn hard_descriptor_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let line = limits.lines().find(|line| line.starts_with("Max open files")).expect("the limit is listed");
    line.split_whitespace().nth(4).expect("hard limit").parse().expect("a number")
}

/// A port below 1024 free on `ip`: binding it needs the capability the unit grants.
fn privileged_port_free_on(ip: IpAddr) -> u16 {
    (80..1024)
        .find(|&port| TcpListener::bind(SocketAddr::new(ip, port)).is_ok())
        .expect("a free port below 1024")
}

#[test]
fn the_installed_unit_serves_a_manifest_as_its_own_user_with_only_its_capabilities_and_filter() {
    let appliance = Appliance::installed();
    let unit = service_section(&appliance.run(&["cat", "/lib/systemd/system/ringlb.service"]));

    // Configure as an administrator would: a manifest, and the admin port edited into the config.
    let backend = SocketAddr::new(loopback(156), port_free_on(&[loopback(156)]));
    let _backend = named_server_on(backend, "appliance").expect("backend");
    let vip = SocketAddr::new(loopback(155), privileged_port_free_on(loopback(155)));
    save(
        &appliance.upper("/etc/ringlb/manifests/web.yaml"),
        &web_manifest(vip, backend.port(), &[(backend.ip(), true)]),
    );
    let admin = SocketAddr::new(loopback(155), port_free_on(&[loopback(155)]));
    let config_path = appliance.upper("/etc/ringlb/config.toml");
    let config = std::fs::read_to_string(&config_path).expect("the installed config");
    let edited = config.replacen(
        "\n[run]\n",
        &format!("\n[run]\nadmin = \"{admin}\"\nworkers = 2\nshutdown-grace = \"2s\"\n"),
        1,
    );
    assert_ne!(edited, config, "the installed config has a [run] table");
    std::fs::write(&config_path, edited).expect("edit the config");

    let profile = appliance.share().join("profile.json");
    std::fs::write(&profile, seccomp_profile(&unit).to_string()).expect("write the profile");
    let wrapper = appliance.share().join("seccomp-exec.py");
    std::fs::copy(format!("{REPO}/testkit/seccomp-exec.py"), &wrapper).expect("copy the wrapper");

    let descriptors =
        one(&unit, "LimitNOFILE").parse::<u64>().expect("a number").min(hard_descriptor_limit());
    let ambient = &joined(&unit, "AmbientCapabilities");
    let bounding = &joined(&unit, "CapabilityBoundingSet");
    assert_eq!(one(&unit, "NoNewPrivileges"), "yes");
    let user = one(&unit, "User");
    let mut command = appliance.chroot(true);
    command.arg("prlimit").arg(format!("--nofile={descriptors}:{descriptors}")).arg("--");
    command.args(["setpriv", &format!("--reuid={user}"), &format!("--regid={}", one(&unit, "Group"))]);
    command.args(["--init-groups", "--no-new-privs"]);
    command.arg(format!("--inh-caps={}", setpriv_capabilities(ambient)));
    command.arg(format!("--ambient-caps={}", setpriv_capabilities(ambient)));
    command.arg(format!("--bounding-set={}", setpriv_capabilities(bounding)));
    command.args(["--", "/usr/bin/python3"]).arg(&wrapper).arg(&profile).arg("--");
    command.args(one(&unit, "ExecStart").split_whitespace());
    let log_path = appliance.share().join("ringlb.log");
    command.stderr(File::create(&log_path).expect("log file")).stdout(Stdio::null());
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let mut ringlb = Ringlb::spawn(command, admin);
    // wait_ready's own panic would not show the log, which says why.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ringlb.wait_ready())).is_err() {
        panic!("the installed unit's ringlb never turned ready:\n{}", log());
    }
    for _ in 0..3 {
        assert_eq!(greeting(vip).expect("connect to the VIP").0, "appliance", "the VIP reaches the backend");
    }

    // The process is the installed binary, as the unit's user, with the unit's limits only.
    let pid = ringlb.pid();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe");
    assert!(exe.ends_with("usr/bin/ringlb"), "the installed binary runs: {exe:?}");
    let uid = appliance.run(&["id", "-u", user]).trim().to_owned();
    assert_eq!(proc_status(pid, "Uid").split_whitespace().collect::<Vec<_>>(), [uid.as_str(); 4]);
    let hex = |mask: u64| format!("{mask:016x}");
    assert_eq!(proc_status(pid, "CapEff"), hex(capability_mask(ambient)), "only the ambient capabilities");
    assert_eq!(proc_status(pid, "CapAmb"), hex(capability_mask(ambient)));
    assert_eq!(proc_status(pid, "CapBnd"), hex(capability_mask(bounding)));
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "the unit's system call filter is loaded");
    assert!(io_uring_descriptors(pid) >= 2, "one io_uring per worker, under the filter");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).expect("listed");
    assert_eq!(open_files.split_whitespace().nth(3), Some(descriptors.to_string().as_str()), "{open_files}");

    let status = ringlb.terminate();
    let log = log();
    assert!(status.success(), "ringlb exits 0 on SIGTERM: {status}\n{log}");
    assert!(!log.contains("Operation not permitted"), "nothing ringlb did was refused:\n{log}");
}
