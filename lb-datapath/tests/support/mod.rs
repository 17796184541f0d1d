//! Shared helpers of the datapath integration tests: snapshots built directly from entries, an
//! engine started and waited for, bounded polling, loopback clients and a blackhole backend.
//!
//! Every helper is bounded in time and panics loudly (never skips) when the engine or io_uring
//! cannot be set up. Each test uses its own VIP (127.0.0.x) and free ports so tests run in parallel.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::{
    Backend, BackendId, EndpointConditions, EntryPolicy, LoadRegistry, ObjectRef, Protocol, Scheduler,
    SchedulerKind, ServiceEntry, Snapshot, VipKey,
};
use lb_datapath::{Engine, EngineConfig, RelayMode};

/// Client socket timeout: a hung proxy fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn vip(last_octet: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet))
}

/// A port currently free on `ip` (bound and released; tests use distinct VIPs, so a clash is rare).
pub fn free_port(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind an ephemeral port on loopback");
    listener.local_addr().expect("bound").port()
}

/// A TCP key on `127.0.0.<last_octet>` with a free port.
pub fn tcp_key(last_octet: u8) -> VipKey {
    let ip = vip(last_octet);
    VipKey::new(ip, free_port(ip), Protocol::Tcp)
}

/// Policy with short timeouts so failure paths finish quickly in tests.
/// `count` VIP keys on `port`, one address each in 127.`second`.0.0/16 (250 per third octet).
pub fn many_vips(count: u32, second: u8, port: u16, protocol: Protocol) -> Vec<VipKey> {
    let addr = |i: u32| IpAddr::from([127, second, (i / 250) as u8, (i % 250) as u8 + 1]);
    (0..count).map(|i| VipKey::new(addr(i), port, protocol)).collect()
}

pub fn test_policy() -> EntryPolicy {
    EntryPolicy {
        connect_timeout: Duration::from_secs(2),
        connect_attempts: 3,
        idle_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(30),
        ..EntryPolicy::default()
    }
}

/// The load counters of the test process's backends: as a source's registry does, it gives a
/// backend listed again in a new snapshot the counter it had, so counts survive publishes.
pub static LOADS: std::sync::LazyLock<LoadRegistry> = std::sync::LazyLock::new(LoadRegistry::new);

/// An entry for `key` over `backends` (address, ready) with round robin.
pub fn entry(key: VipKey, backends: &[(SocketAddr, bool)], policy: EntryPolicy) -> ServiceEntry {
    let mut list: Vec<Backend> = backends
        .iter()
        .map(|&(addr, ready)| Backend {
            id: BackendId(addr),
            conditions: EndpointConditions { ready, serving: ready, terminating: false },
            weight: 1,
            placement: Default::default(),
            load: LOADS.counter(BackendId(addr)),
        })
        .collect();
    list.sort_by_key(|b| b.id);
    let eligible: Vec<u32> =
        list.iter().enumerate().filter(|(_, b)| b.conditions.ready).map(|(i, _)| i as u32).collect();
    let scheduler = Scheduler::build(SchedulerKind::RoundRobin, &list, &eligible);
    ServiceEntry {
        key,
        service: ObjectRef::service("test", "svc"),
        port_name: None,
        backends: list.into(),
        eligible,
        scheduler,
        policy,
        traffic: Default::default(),
    }
}

pub fn snapshot(version: u64, entries: Vec<ServiceEntry>) -> Arc<Snapshot> {
    Arc::new(Snapshot::from_entries(version, entries))
}

/// Starts an engine and waits until it is ready. Panics if io_uring is refused: datapath tests must
/// fail loudly, never skip.
pub fn start_engine(workers: usize, relay: RelayMode, initial: Arc<Snapshot>) -> Engine {
    start_engine_with(test_config(workers, relay), initial)
}

/// The engine configuration tests use: unpinned workers and a fast housekeeping tick.
pub fn test_config(workers: usize, relay: RelayMode) -> EngineConfig {
    EngineConfig {
        workers,
        pin_workers: false,
        relay,
        housekeeping_interval: Duration::from_millis(50),
        ..EngineConfig::default()
    }
}

/// Starts an engine with `config` and waits until it is ready; panics loudly if it cannot start.
pub fn start_engine_with(config: EngineConfig, initial: Arc<Snapshot>) -> Engine {
    let engine = match Engine::start(config, initial) {
        Ok(engine) => engine,
        Err(err) => panic!("the datapath engine must start (io_uring refused?): {err}"),
    };
    wait_until("engine ready", Duration::from_secs(10), || engine.is_ready());
    engine
}

/// Publishes and waits until every worker reconciled.
pub fn publish(engine: &Engine, snapshot: Arc<Snapshot>) {
    engine.publish(snapshot);
    wait_until("snapshot reconciled", Duration::from_secs(10), || engine.is_ready());
}

/// Polls `condition` until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set read timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set write timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

/// Sends `message` and reads the same number of bytes back.
pub fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).expect("write through the proxy");
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).expect("read the echo through the proxy");
    reply
}

/// Reads the `name\n` greeting of a named backend.
pub fn read_name(stream: &mut TcpStream) -> String {
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte).expect("read the backend's name through the proxy");
        if byte[0] == b'\n' {
            return String::from_utf8(name).expect("ascii name");
        }
        name.push(byte[0]);
    }
}

/// Reads until the peer closes: `Ok(bytes)` on EOF, `Err(kind)` on an error such as a reset.
pub fn read_to_close(stream: &mut TcpStream) -> Result<Vec<u8>, std::io::ErrorKind> {
    let mut all = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&buffer[..n]),
            Err(e) => return Err(e.kind()),
        }
    }
}

/// A backend address whose SYNs are dropped: a listener with backlog 0 whose accept queue is kept
/// full and never accepted. Connects to it hang until the connect timeout.
pub struct Blackhole {
    listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
    addr: SocketAddr,
}

impl Blackhole {
    pub fn new() -> Blackhole {
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener.local_addr().expect("bound").as_socket().expect("inet");
        let mut fillers = Vec::new();
        // Fill the accept queue until a connect no longer completes.
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => fillers.push(stream),
                Err(_) => break,
            }
            assert!(fillers.len() < 16, "the accept queue of a backlog-0 listener never filled");
        }
        Blackhole { listener, _fillers: fillers, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("procfs").count()
}

/// Test-only policy tweaks.
pub trait EntryPolicyExt {
    fn with_drain(self, drain: Duration) -> Self;
}

impl EntryPolicyExt for EntryPolicy {
    fn with_drain(self, drain: Duration) -> Self {
        EntryPolicy { drain_timeout: drain, ..self }
    }
}

/// Connects and reads until the proxy closes; returns how the connection ended. A reset that
/// arrives before the connect call returns counts as a reset.
pub fn connect_and_read_to_close(addr: SocketAddr) -> Result<Vec<u8>, std::io::ErrorKind> {
    match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(mut stream) => {
            stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.kind())?;
            read_to_close(&mut stream)
        }
        Err(e) => Err(e.kind()),
    }
}

/// A UDP key on `127.0.0.<last_octet>` with a port currently free for UDP there.
pub fn udp_key(last_octet: u8) -> VipKey {
    let ip = vip(last_octet);
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind an ephemeral UDP port");
    VipKey::new(ip, socket.local_addr().expect("bound").port(), Protocol::Udp)
}

/// A UDP port free on every address (the VIPs of a wildcard group share it).
pub fn free_udp_port_everywhere() -> u16 {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("bound").port()
}

/// How long a UDP client waits for one reply before the test fails (or, where no reply is the
/// expected outcome, concludes that none came).
pub const UDP_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A loopback UDP client (one flow) with bounded receives.
pub fn udp_client() -> std::net::UdpSocket {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP client");
    socket.set_read_timeout(Some(UDP_REPLY_TIMEOUT)).expect("set read timeout");
    socket
}

/// Sends `payload` to `target` and returns the reply and where it came from.
pub fn udp_exchange(
    socket: &std::net::UdpSocket,
    target: SocketAddr,
    payload: &[u8],
) -> (Vec<u8>, SocketAddr) {
    socket.send_to(payload, target).expect("send a datagram to the VIP");
    let mut buffer = vec![0u8; 65_536];
    let (n, from) = socket.recv_from(&mut buffer).unwrap_or_else(|e| panic!("reply from {target}: {e}"));
    buffer.truncate(n);
    (buffer, from)
}

/// The test policy with the given UDP flow timeouts.
pub fn udp_policy(unreplied: Duration, replied: Duration) -> EntryPolicy {
    EntryPolicy { udp_unreplied_timeout: unreplied, udp_replied_timeout: replied, ..test_policy() }
}
