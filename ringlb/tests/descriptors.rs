//! End-to-end: `ringlb` under a low descriptor limit (`ulimit -n 256`), flooded with many more
//! connections than fit. It stays up and ready, its CPU stays bounded while saturated, no backend is
//! ejected or counted as failed, the log stays short, and it serves normally once the load stops.
//! And with more VIPs than its listeners may take, it says how many it needs and what limit fits.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use support::{
    IO_TIMEOUT, Ringlb, greeting, http_get, loopback, poll_until, port_free_on, save, web_manifest,
};
use testkit::backends::named_server;

/// The limit ringlb runs under: soft and hard, as `ulimit -n 256` sets them.
const LIMIT: u64 = 256;
/// Connections the test opens and holds: far more than 256 descriptors can serve.
const FLOOD: usize = 600;

/// Runs the command under a descriptor limit of [`LIMIT`] (soft and hard, as `ulimit -n` sets
/// them) with its stderr to `stderr`.
fn limited(command: &mut std::process::Command, stderr: std::fs::File) {
    command.stderr(stderr);
    // SAFETY: only setrlimit runs between fork and exec; it is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: LIMIT, rlim_max: LIMIT };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// CPU time (user + system) of process `pid` so far, from `/proc/<pid>/stat`.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The sum of one worker counter over all workers of a `/status` document.
fn sum(status: &serde_json::Value, counter: &str) -> u64 {
    let workers = status["workers"].as_array().expect("workers");
    workers.iter().map(|w| w[counter].as_u64().unwrap_or_else(|| panic!("{counter} in {w}"))).sum()
}

#[test]
fn a_flood_beyond_the_descriptor_limit_is_refused_without_spinning_or_ejecting_and_service_resumes() {
    let backend = named_server("web").expect("backend");
    let vip = SocketAddr::new(loopback(125), port_free_on(&[loopback(125)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("web.yaml");
    let log = dir.path().join("ringlb.log");
    let text = web_manifest(vip, backend.addr().port(), &[(backend.addr().ip(), true)]);
    save(&file, &text);
    let stderr = std::fs::File::create(&log).expect("log file");
    let mut ringlb =
        Ringlb::start_with(&["run", "--manifests", file.to_str().expect("utf-8 path")], |command| {
            limited(command, stderr)
        });
    ringlb.wait_ready();
    assert_eq!(greeting(vip).expect("served before the flood").0, "web");

    let cpu_before = cpu_of(ringlb.pid());
    let started = Instant::now();
    let mut held = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..FLOOD {
        match greeting(vip) {
            Ok((name, stream)) if name == "web" => {
                served += 1;
                held.push(stream);
            }
            Ok(_) | Err(_) => refused += 1,
        }
    }
    // Saturated: keep knocking for a while (paced, so the window is long enough to measure).
    for _ in 0..50 {
        if let Ok(stream) = TcpStream::connect_timeout(&vip, IO_TIMEOUT) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_millis(10)); // pacing the load, not synchronisation
    }
    let elapsed = started.elapsed();
    let cpu = cpu_of(ringlb.pid()) - cpu_before;
    eprintln!("flood: served {served}, refused {refused}, ringlb CPU {cpu:?} in {elapsed:?}");
    assert!(refused > 0 && served > 0, "served {served}, refused {refused}");
    assert!(served < FLOOD, "a 256-descriptor budget cannot hold {FLOOD} connections");
    assert!(ringlb.is_running(), "ringlb stays up");
    // Spinning on EMFILE would burn a core per worker; refusing at accept costs a little per try.
    assert!(cpu < elapsed.mul_f64(0.5), "{cpu:?} of CPU in {elapsed:?} while saturated");
    assert_eq!(http_get(ringlb.admin, "/readyz").expect("/readyz answers").0, 200, "still ready");

    let status = ringlb.status();
    assert_eq!(sum(&status, "connect_failures"), 0, "no connect was counted against the backend: {status}");
    assert_eq!(status["health"]["ejections"], 0, "no backend ejected: {status}");
    assert!(sum(&status, "budget_refusals") > 0, "{status}");
    let budget = sum(&status, "descriptor_budget");
    assert!(budget > 0 && budget < LIMIT, "the budget is a share of the limit: {budget}");

    drop(held);
    let name = poll_until("ringlb to serve again once the flood is gone", || greeting(vip).ok().map(|g| g.0));
    assert_eq!(name, "web");
    for _ in 0..20 {
        assert_eq!(greeting(vip).expect("served normally").0, "web");
    }
    assert!(ringlb.terminate().success());
    let text = std::fs::read_to_string(&log).expect("log");
    let lines = text.lines().count();
    eprintln!("ringlb wrote {lines} log lines:\n{text}");
    assert!(lines < 40, "the log stays short: {lines} lines");
}

/// A Service `shop/many` with every address of `ips` on each of `ports` (named `p0`, `p1`, ...),
/// and one endpoint `backend` for all of them.
fn many_vips_manifest(ips: &[std::net::IpAddr], ports: &[u16], backend: SocketAddr) -> String {
    let list = |items: Vec<String>| items.join(", ");
    let addresses = list(ips.iter().map(|ip| format!("\"{ip}\"")).collect());
    let service_ports: String = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("  - {{name: p{i}, port: {port}, targetPort: {}}}\n", backend.port()))
        .collect();
    let slice_ports: String = (0..ports.len())
        .map(|i| format!("- {{name: p{i}, port: {}, protocol: TCP}}\n", backend.port()))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: many, namespace: shop}}\nspec:\n  \
         clusterIP: 10.96.0.21\n  externalIPs: [{addresses}]\n  ports:\n{service_ports}---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: many-abc12\n  \
         namespace: shop\n  labels: {{kubernetes.io/service-name: many}}\naddressType: IPv4\nports:\n\
         {slice_ports}endpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n",
        backend.ip()
    )
}

#[test]
fn vips_that_need_more_listening_sockets_than_the_limit_allows_are_named_with_the_limit_that_fits() {
    let backend = named_server("many").expect("backend");
    // 200 VIPs on one port share a wildcard socket per worker; one VIP on 100 ports of its own
    // needs 100 more: 101 per worker, where a limit of 256 lets each of two workers bind 70.
    let shared: Vec<_> = (1..=200u8).map(|i| std::net::IpAddr::from([127, 3, 0, i])).collect();
    let shared_port = port_free_on(&[std::net::IpAddr::from([0, 0, 0, 0])]);
    let alone = std::net::IpAddr::from([127, 3, 1, 1]);
    // Held while choosing, so that the 100 ports differ.
    let holders: Vec<_> =
        (0..100).map(|_| std::net::TcpListener::bind(SocketAddr::new(alone, 0)).expect("bind")).collect();
    let ports: Vec<u16> = holders.iter().map(|h| h.local_addr().expect("bound").port()).collect();
    drop(holders);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("many.yaml");
    let log = dir.path().join("ringlb.log");
    let mut text = many_vips_manifest(&shared, &[shared_port], backend.addr());
    text.push_str("---\n");
    text.push_str(
        &many_vips_manifest(&[alone], &ports, backend.addr())
            .replace("name: many,", "name: alone,")
            .replace("service-name: many", "service-name: alone")
            .replace("many-abc12", "alone-abc12")
            .replace("10.96.0.21", "10.96.0.22"),
    );
    save(&file, &text);
    let stderr = std::fs::File::create(&log).expect("log file");
    let mut ringlb =
        Ringlb::start_with(&["run", "--manifests", file.to_str().expect("utf-8 path")], |command| {
            limited(command, stderr)
        });
    ringlb.wait_ready();
    // The wildcard is bound first: all 200 shared VIPs are served.
    for ip in shared.iter().step_by(37) {
        assert_eq!(greeting(SocketAddr::new(*ip, shared_port)).expect("a shared VIP is served").0, "many");
    }
    let status = ringlb.status();
    assert_eq!(sum(&status, "listeners"), 2 * 70, "each worker bound what its budget allows: {status}");
    assert!(ringlb.terminate().success());
    let text = std::fs::read_to_string(&log).expect("log");
    let limit = lb_datapath::DescriptorBudget::limit_for_listeners(101, 2);
    assert!(
        text.contains("need 101 listening sockets per worker")
            && text.contains("allows 70")
            && text.contains(&format!("raise the descriptor limit to {limit}")),
        "the log names what is needed and the limit that fits it:\n{text}"
    );
}
