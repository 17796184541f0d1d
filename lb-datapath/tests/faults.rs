//! Local faults over real loopback sockets. Running out of descriptors: the load balancer's own
//! shortage is counted apart and never reported against a backend, a failing accept backs off
//! instead of spinning, and service resumes by itself once descriptors are back. A completion queue
//! far too small for the load: completions wait in the kernel's overflow list and nothing is reset.
//! A worker whose ring fails for good: it shuts its sockets down and stops, the others serve on.
//!
//! Its own test binary: the tests take every descriptor of the process, or close a ring's
//! descriptor from outside, which would break tests running beside them; they run one after
//! another behind a lock.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use lb_core::health::BackendOutcome;
use lb_datapath::RelayMode;
use support::*;
use testkit::backends::named_server;
use testkit::descriptors::Exhausted;

static SERIAL: Mutex<()> = Mutex::new(());

/// An engine whose budget cannot get in the way: these tests hit the kernel's limit itself.
fn unbudgeted(workers: usize) -> lb_datapath::EngineConfig {
    lb_datapath::EngineConfig { descriptor_limit: Some(1 << 20), ..test_config(workers, RelayMode::Copy) }
}

#[test]
fn a_backend_socket_refused_for_want_of_descriptors_is_no_backend_failure() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = named_server("ok").expect("backend");
    let key = tcp_key(130);
    let engine = start_engine_with(
        unbudgeted(1),
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let events = engine.take_backend_events().expect("backend events");
    {
        // Two descriptors left: the client's socket and the accepted one. The backend socket fails.
        let _exhausted = Exhausted::leaving(2);
        let outcome = connect_and_read_to_close(key.socket_addr());
        assert!(outcome.is_err() || outcome == Ok(Vec::new()), "the client is refused: {outcome:?}");
        wait_until("the shortage is counted", STATS_WAIT, || {
            engine.stats().total().local_no_descriptors >= 1
        });
    }
    let total = engine.stats().total();
    assert_eq!(total.connect_failures, 0, "not a failed connect to the backend: {total:?}");
    let mut client = connect(key.socket_addr());
    assert_eq!(read_name(&mut client), "ok", "served again once descriptors are back");
    wait_until("the workers flush their events", STATS_WAIT, || {
        let seen: Vec<_> = events.try_iter().flatten().collect();
        assert!(seen.iter().all(|e| e.outcome != BackendOutcome::ConnectFailed), "{seen:?}");
        seen.iter().any(|e| e.outcome == BackendOutcome::Connected)
    });
}

#[test]
fn a_failing_accept_backs_off_without_spinning_and_resumes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = named_server("ok").expect("backend");
    let key = tcp_key(131);
    let engine = start_engine_with(
        unbudgeted(2),
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let waiting;
    let (cpu, elapsed);
    {
        // One descriptor left: the client's. Its connection waits in the backlog while every accept
        // fails with EMFILE.
        let _exhausted = Exhausted::leaving(1);
        waiting =
            std::net::TcpStream::connect(key.socket_addr()).expect("the kernel completes the handshake");
        let failures = || engine.stats().total().local_no_descriptors;
        wait_until("a failing accept is counted", STATS_WAIT, || failures() >= 1);
        // Measured while the accepts keep failing (not while the table is filled or emptied).
        let (cpu_before, started, before) = (process_cpu(), std::time::Instant::now(), failures());
        wait_until("ten more failing accepts", STATS_WAIT, || failures() >= before + 10);
        (cpu, elapsed) = (process_cpu() - cpu_before, started.elapsed());
    }
    // A worker spinning on EMFILE would burn a whole core; backing off per tick costs next to nothing.
    assert!(cpu < elapsed.mul_f64(0.5), "{cpu:?} of CPU in {elapsed:?} while accepts failed");
    assert_eq!(engine.stats().total().connect_failures, 0);
    let mut waiting = waiting;
    waiting.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    assert_eq!(read_name(&mut waiting), "ok", "the waiting client is served once descriptors are back");
    drop(backend);
}

#[test]
fn a_completion_queue_far_too_small_overflows_into_the_kernel_and_resets_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let echo = testkit::backends::echo_server().expect("echo");
    let key = tcp_key(132);
    // Eight submission and eight completion slots for 64 busy connections.
    let config = lb_datapath::EngineConfig {
        ring_entries: 8,
        completion_entries: Some(8),
        ..test_config(1, RelayMode::Copy)
    };
    let engine =
        start_engine_with(config, snapshot(1, vec![entry(key, &[(echo.addr(), true)], test_policy())]));
    let clients: Vec<_> = (0..64).map(|_| connect(key.socket_addr())).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            std::thread::spawn(move || {
                for round in 0..20 {
                    let message = format!("client {i} round {round} ").repeat(50);
                    assert_eq!(round_trip(&mut client, message.as_bytes()), message.as_bytes());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("every exchange arrives intact");
    }
    // The ring's counters reach the stats at the next housekeeping tick.
    wait_until("the overflow is counted", STATS_WAIT, || engine.stats().total().ring_cq_overflowed > 0);
    let total = engine.stats().total();
    assert_eq!(total.resets, 0, "{total:?}");
    assert_eq!(total.ring_completion_entries, 8);
    assert_eq!(total.ring_cq_dropped, 0);
}

#[test]
fn a_worker_whose_ring_fails_shuts_its_sockets_down_and_the_others_serve_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let backend = named_server("ok").expect("backend");
    let key = tcp_key(133);
    let engine = start_engine_with(
        unbudgeted(2),
        snapshot(1, vec![entry(key, &[(backend.addr(), true)], test_policy())]),
    );
    let mut before: Vec<_> = (0..16).map(|_| connect(key.socket_addr())).collect();
    for client in &mut before {
        assert_eq!(read_name(client), "ok");
    }
    // Close one worker's io_uring descriptor behind its back: its next submission fails for good.
    let rings: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("procfs")
        .filter_map(|fd| {
            let fd = fd.ok()?;
            let target = std::fs::read_link(fd.path()).ok()?;
            (target.to_str()? == "anon_inode:[io_uring]").then(|| fd.file_name().to_str()?.parse().ok())?
        })
        .collect();
    assert_eq!(rings.len(), 2, "one ring per worker: {rings:?}");
    // SAFETY: closes a descriptor of this process; the worker that used it never closes it again
    // (a failed worker leaks its ring).
    unsafe { libc::close(rings[0]) };
    wait_until("one worker reports its ring failed", STATS_WAIT, || engine.stats().total().ring_failed == 1);
    assert!(!engine.is_ready(), "an engine with a failed worker is not ready");
    // The failed worker's connections end; the other worker's go on.
    let (mut ended, mut alive) = (0, 0);
    for client in &mut before {
        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
        match std::io::Write::write_all(client, b"x").and_then(|()| {
            let mut byte = [0u8; 1];
            std::io::Read::read(client, &mut byte)
        }) {
            Ok(1) => alive += 1,
            _ => ended += 1,
        }
    }
    assert!(ended > 0 && alive > 0, "ended {ended}, alive {alive}");
    // New connections all reach the surviving worker.
    for _ in 0..20 {
        let mut client = connect(key.socket_addr());
        assert_eq!(read_name(&mut client), "ok");
    }
}

#[test]
fn a_backend_connect_without_a_free_source_port_is_local_and_tries_the_next_backend() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A network namespace of its own, entered by one thread (the engine's workers and the backends'
    // threads, spawned from it, live there too), whose ephemeral port range is a single port.
    std::thread::spawn(|| {
        // SAFETY: unshare(2) affects only the calling thread here (no CLONE_FS or files flags).
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare: {}",
            std::io::Error::last_os_error()
        );
        let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("run ip");
        assert!(up.success(), "ip link set lo up");
        let (first, second) =
            (named_server("first").expect("backend"), named_server("second").expect("backend"));
        // Narrowed once the backends are bound, and widened again before they are dropped (a
        // backend's accept loop is woken by a connect to itself, which needs a port).
        let _narrow = PortRange::narrowed_to(60000);
        let key = lb_core::VipKey::new(vip(135), 8135, lb_core::Protocol::Tcp);
        let backends = [(first.addr(), true), (second.addr(), true)];
        // Source hashing: every client of 127.0.0.1 is sent to the same backend first.
        let mut sticky = entry(key, &backends, test_policy());
        sticky.scheduler =
            lb_core::Scheduler::build(lb_core::SchedulerKind::SourceHash, &sticky.backends, &sticky.eligible);
        let engine = start_engine_with(unbudgeted(1), snapshot(1, vec![sticky]));
        let events = engine.take_backend_events().expect("backend events");
        // Clients bind ports outside the range, so only ringlb's backend connects need the one port.
        let client = |port: u16| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).expect("bind");
            socket.connect(&key.socket_addr().into()).expect("connect to the VIP");
            let mut stream: std::net::TcpStream = socket.into();
            stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let name = read_name(&mut stream);
            (name, stream)
        };
        // The first client takes the one port towards its backend; the second is hashed to the same
        // backend, finds no port left towards it, and ringlb moves on to the other backend, whose
        // 4-tuple from port 60000 is still free.
        let (a, _held_a) = client(4001);
        let (b, _held_b) = client(4002);
        assert_ne!(a, b, "the second client was moved to the other backend");
        let total = engine.stats().total();
        assert_eq!(total.local_no_source_port, 1, "{total:?}");
        assert_eq!((total.connect_failures, total.retries), (0, 1), "not the backend's failure: {total:?}");
        wait_until("the workers flush their events", STATS_WAIT, || {
            let seen: Vec<_> = events.try_iter().flatten().collect();
            assert!(seen.iter().all(|e| e.outcome != BackendOutcome::ConnectFailed), "{seen:?}");
            !seen.is_empty()
        });
    })
    .join()
    .expect("the test thread");
}

const STATS_WAIT: Duration = Duration::from_secs(10);

/// The calling thread's network namespace's ephemeral port range, narrowed to one port until drop.
struct PortRange(String);

impl PortRange {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";

    fn narrowed_to(port: u16) -> PortRange {
        let before = std::fs::read_to_string(Self::PATH).expect("the port range");
        std::fs::write(Self::PATH, format!("{port} {port}")).expect("narrow the port range");
        PortRange(before)
    }
}

impl Drop for PortRange {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// CPU time (user + system) this process has used so far.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage we pass.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) }, 0);
    // SAFETY: initialised by the successful call above.
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}
