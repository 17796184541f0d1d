//! Shared helpers of the binary's end-to-end tests: a `ringlb` child process that is stopped on drop,
//! bounded polling of its admin endpoint, and loopback ports and clients; [`load`] and
//! [`backend_process`] for the chaos tests.
//!
//! Every wait is bounded by a deadline and polls a real condition; nothing sleeps as synchronisation.
#![allow(dead_code)]

pub mod backend_process;
pub mod bgp;
pub mod cluster;
pub mod l2;
pub mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for anything the tests wait for; generous because CI machines are shared and noisy.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn loopback(last_octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet))
}

/// A port that is free on every one of `ips` right now (bound on all of them, then released).
pub fn port_free_on(ips: &[IpAddr]) -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind(SocketAddr::new(ips[0], 0)).expect("bind an ephemeral port");
        let port = first.local_addr().expect("bound").port();
        if ips[1..].iter().all(|ip| TcpListener::bind(SocketAddr::new(*ip, port)).is_ok()) {
            return port;
        }
    }
    panic!("no port free on all of {ips:?} after 100 tries");
}

/// A loopback address for an admin endpoint, free right now.
pub fn free_admin_addr() -> SocketAddr {
    SocketAddr::new(loopback(1), port_free_on(&[loopback(1)]))
}

/// A `ringlb` process; killed (and reaped) on drop unless stopped first.
pub struct Ringlb {
    child: Option<Child>,
    pub admin: SocketAddr,
}

impl Ringlb {
    /// Starts `ringlb <args> --admin <free loopback port>` with logs to stderr of the test.
    pub fn start(args: &[&str]) -> Ringlb {
        Ringlb::start_with(args, |_| {})
    }

    /// [`Ringlb::start`] with the command adjusted by `configure` first (stderr, limits).
    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Ringlb {
        let admin = free_admin_addr();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringlb"));
        command.args(args).args(["--admin", &admin.to_string(), "--workers", "2", "--log-level", "warn"]);
        // Tests that do not test the graceful shutdown need not wait its default 30 s for
        // connections they left open.
        if !args.contains(&"--shutdown-grace") {
            command.args(["--shutdown-grace", "2s"]);
        }
        configure(&mut command);
        Ringlb::spawn(command, admin)
    }

    /// Spawns `command` as it is (it must run ringlb with its admin endpoint on `admin`).
    pub fn spawn(mut command: Command, admin: SocketAddr) -> Ringlb {
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let child = command.spawn().expect("spawn ringlb");
        Ringlb { child: Some(child), admin }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().is_ok_and(|status| status.is_none()))
    }

    /// Waits until `/readyz` answers 200, failing if the process exits first.
    pub fn wait_ready(&mut self) {
        let admin = self.admin;
        let child = self.child.as_mut().expect("running");
        poll_until("ringlb to answer /readyz with 200", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ringlb exited before it was ready: {status}");
            }
            http_get(admin, "/readyz").ok().filter(|(status, _)| *status == 200)
        });
    }

    /// The admin `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.admin, "/status").expect("GET /status");
        assert_eq!(code, 200, "/status answers: {body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    /// Waits until the admin `/metrics` (the Prometheus text format) holds the sample `line`.
    pub fn wait_metric(&self, line: &str) {
        poll_until(&format!("{line} in /metrics"), || {
            let (code, body) = http_get(self.admin, "/metrics").ok()?;
            (code == 200 && body.lines().any(|l| l == line)).then_some(())
        });
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) without waiting.
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("running");
        let pid = i32::try_from(child.id()).expect("pid fits");
        // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits (bounded) for the exit status.
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_exit(&mut child)
    }
}

impl Drop for Ringlb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    poll_until("ringlb to exit", || child.try_wait().expect("wait for ringlb"))
}

/// Spawns `command` (ringlb run inside `host`, e.g. through [`testkit::lab::Host::command`], with
/// its admin endpoint on `admin` there) and waits until `/readyz` answers 200 inside the host.
pub fn start_in(host: &testkit::lab::Host, command: Command, admin: SocketAddr) -> Ringlb {
    let mut ringlb = Ringlb::spawn(command, admin);
    poll_until("ringlb to answer /readyz with 200 inside its host", || {
        assert!(ringlb.is_running(), "ringlb in {} exited before it was ready", host.name());
        host.enter(|| http_get(admin, "/readyz")).ok().filter(|(status, _)| *status == 200)
    });
    ringlb
}

/// The admin `/status` document of a ringlb whose admin endpoint `admin` is inside `host`.
pub fn status_in(host: &testkit::lab::Host, admin: SocketAddr) -> serde_json::Value {
    let (code, body) = host.enter(|| http_get(admin, "/status")).expect("GET /status");
    assert_eq!(code, 200, "/status answers: {body}");
    serde_json::from_str(&body).expect("/status is JSON")
}

/// The sum over the workers of counter `name` in a `/status` document.
pub fn worker_sum(status: &serde_json::Value, name: &str) -> u64 {
    let workers = status["workers"].as_array().expect("/status lists workers");
    workers.iter().map(|w| w[name].as_u64().unwrap_or_else(|| panic!("{name} in {w}"))).sum()
}

/// Polls `condition` every 10 ms until it yields a value; panics naming `what` after [`DEADLINE`].
pub fn poll_until<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {DEADLINE:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10)); // the polling interval, not synchronisation
    }
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get_response(addr, path).map(|response| (response.status, response.body))
}

/// An HTTP response as [`http_get_response`] reads it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }

    /// The body as JSON; panics (naming the body) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A minimal HTTP/1.1 GET, headers included.
pub fn http_get_response(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response.as_str(), ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(HttpResponse { status, headers, body: body.to_owned() })
}

/// A port of the Kubernetes node port range (30000-32767) that no socket of the host holds right
/// now on any address, tried from `30000 + seed` on: tests give different seeds so that they do
/// not pick the same port before ringlb binds it.
pub fn free_node_port(seed: u16) -> u16 {
    (0..2768u16)
        .map(|i| 30_000 + (seed.wrapping_add(i) % 2768))
        .find(|&port| {
            let any = |ip: IpAddr| TcpListener::bind(SocketAddr::new(ip, port)).is_ok();
            any(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) && any(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
        })
        .expect("a free port in the node port range")
}

/// Connects to `vip` and reads the one-line greeting of a `testkit` named server.
pub fn greeting(vip: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    let stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    Ok((line.trim_end().to_owned(), stream))
}

/// Writes `text` to `path` the way editors save: a temporary file renamed over the target.
pub fn save(path: &Path, text: &str) {
    save_bytes(path, text.as_bytes());
}

/// [`save`] of bytes that need not be text.
pub fn save_bytes(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("tmp~");
    std::fs::write(&temporary, bytes).expect("write manifest");
    std::fs::rename(&temporary, path).expect("rename manifest into place");
}

/// A Service `shop/web` with external IP `vip` and one slice of `(ip, ready)` endpoints on `backend_port`.
pub fn web_manifest(vip: SocketAddr, backend_port: u16, endpoints: &[(IpAddr, bool)]) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  \
         clusterIP: 10.96.0.20\n  externalIPs: [\"{}\"]\n  ports:\n  - name: http\n    port: {}\n    \
         targetPort: http\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: web-abc12\n  namespace: shop\n  labels:\n    kubernetes.io/service-name: web\n\
         addressType: IPv4\nports:\n- name: http\n  port: {backend_port}\n  protocol: TCP\nendpoints:\n",
        vip.ip(),
        vip.port()
    );
    for (ip, ready) in endpoints {
        text.push_str(&format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}\n"));
    }
    text
}

/// The value of the `field:` line of `/proc/PID/status`.
pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let prefix = format!("{field}:");
    let line = status.lines().find(|line| line.starts_with(&prefix)).expect("the field is listed");
    line[prefix.len()..].trim().to_owned()
}

/// How many of the process's descriptors are io_uring instances.
pub fn io_uring_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:[io_uring]")
        .count()
}
