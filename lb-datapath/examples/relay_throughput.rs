//! Manual throughput sanity check (not a test): streams bytes to a loopback sink directly and through
//! the engine with each relay path, and prints Gbit/s. Used to choose `RelayMode::Auto`.
//!
//! `cargo run --release -p lb-datapath --example relay_throughput -- [streams] [seconds] [copy buffer KiB]`
//! `... --example relay_throughput -- serve BACKEND VIP:PORT copy|splice` proxies until killed (for
//! measuring with an external tool such as `iperf3 -c VIP -p PORT`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_core::{
    Backend, EntryPolicy, ObjectRef, Protocol, Scheduler, SchedulerKind, ServiceEntry, Snapshot, VipKey,
};
use lb_datapath::{Engine, EngineConfig, RelayMode};
use testkit::backends::Server;

fn sink() -> Server {
    Server::spawn(|mut stream| {
        let mut buffer = vec![0u8; 256 * 1024];
        while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
    })
    .expect("sink")
}

fn blast(addr: SocketAddr, streams: usize, seconds: u64) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).expect("connect");
                let buffer = vec![0x5Au8; 256 * 1024];
                let deadline = Instant::now() + Duration::from_secs(seconds);
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    stream.write_all(&buffer).expect("write");
                    sent += buffer.len() as u64;
                }
                sent
            })
        })
        .collect();
    let bytes: u64 = threads.into_iter().map(|t| t.join().expect("client")).sum();
    bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("serve") {
        let mut arg = |what: &str| args.nth(if what == "backend" { 1 } else { 0 }).expect(what);
        let backend: SocketAddr = arg("backend").parse().expect("BACKEND address");
        let vip: SocketAddr = arg("vip").parse().expect("VIP:PORT");
        let relay = if arg("relay") == "copy" { RelayMode::Copy } else { RelayMode::Splice };
        let _engine = proxy(VipKey::new(vip.ip(), vip.port(), Protocol::Tcp), backend, relay, 64);
        println!("proxying {vip} -> {backend} with {relay:?}; Ctrl-C to stop");
        loop {
            std::thread::park();
        }
    }
    let streams: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let buffer_kib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let backend = sink();
    println!(
        "direct        : {:6.2} Gbit/s ({streams} streams, {seconds} s)",
        blast(backend.addr(), streams, seconds)
    );
    for relay in [RelayMode::Copy, RelayMode::Splice] {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200));
        let port = TcpListener::bind((ip, 0)).expect("port").local_addr().expect("addr").port();
        let key = VipKey::new(ip, port, Protocol::Tcp);
        let engine = proxy(key, backend.addr(), relay, buffer_kib);
        let gbps = blast(key.socket_addr(), streams, seconds);
        println!("proxy {relay:?}: {gbps:6.2} Gbit/s");
        drop(engine);
    }
}

fn proxy(key: VipKey, backend: SocketAddr, relay: RelayMode, buffer_kib: usize) -> Engine {
    {
        let backends = vec![Backend::ready(backend)];
        let entry = ServiceEntry {
            key,
            service: ObjectRef::service("bench", "sink"),
            port_name: None,
            scheduler: Scheduler::build(SchedulerKind::RoundRobin, &backends, &[0]),
            backends: backends.into(),
            eligible: vec![0],
            policy: EntryPolicy::default(),
            traffic: Default::default(),
        };
        let config =
            EngineConfig { workers: 1, relay, buffer_size: buffer_kib * 1024, ..EngineConfig::default() };
        let engine = Engine::start(config, Arc::new(Snapshot::from_entries(1, [entry]))).expect("engine");
        while !engine.is_ready() {
            std::thread::sleep(Duration::from_millis(5));
        }
        engine
    }
}
