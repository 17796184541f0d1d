//! Running out of descriptors over real loopback sockets: the load balancer's own shortage is counted
//! apart and never reported against a backend, a failing accept backs off instead of spinning, and
//! service resumes by itself once descriptors are back.
//!
//! Its own test binary: the tests take every descriptor of the process for a while (which would
//! break tests running beside them), so they run one after another behind a lock.

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
    let cpu_before = process_cpu();
    let started = std::time::Instant::now();
    let waiting;
    {
        // One descriptor left: the client's. Its connection waits in the backlog while every accept
        // fails with EMFILE.
        let _exhausted = Exhausted::leaving(1);
        waiting =
            std::net::TcpStream::connect(key.socket_addr()).expect("the kernel completes the handshake");
        wait_until("the failing accepts are counted", STATS_WAIT, || {
            engine.stats().total().local_no_descriptors >= 3
        });
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu() - cpu_before;
    // A worker spinning on EMFILE would burn a whole core; backing off per tick costs next to nothing.
    assert!(cpu < elapsed.mul_f64(0.5), "{cpu:?} of CPU in {elapsed:?} while accepts failed");
    assert_eq!(engine.stats().total().connect_failures, 0);
    let mut waiting = waiting;
    waiting.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    assert_eq!(read_name(&mut waiting), "ok", "the waiting client is served once descriptors are back");
    drop(backend);
}

const STATS_WAIT: Duration = Duration::from_secs(10);

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
