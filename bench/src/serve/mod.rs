//! The built-in servers: `serve tcp-echo|tcp-sink|tcp-source|udp-echo|udp-sink`.
//!
//! Each server thread owns one `SO_REUSEPORT` socket, so the kernel spreads connections and flows over
//! threads with no shared accept queue. Once every socket is bound the server prints one line on
//! stdout, `listening KIND ADDR threads=N`, which scripts and tests wait for (port 0 is resolved there).
//! Servers run until killed or until `--duration` passes; they never exit on a client's misbehaviour.

mod tcp;
mod udp;

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cli::{ServeArgs, ServerKind};
use crate::sockets::reuseport_group;

/// How often a server thread looks at the stop deadline while idle.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Per-thread traffic counters of a server, padded so threads never share a cache line.
#[derive(Default)]
#[repr(align(128))]
pub struct ServerCounters {
    pub units: AtomicU64,
    pub bytes: AtomicU64,
}

impl ServerCounters {
    pub fn add(&self, units: u64, bytes: u64) {
        // One writer per counter; a load+store is cheaper than a locked add and just as exact.
        self.units.store(self.units.load(Ordering::Relaxed) + units, Ordering::Relaxed);
        self.bytes.store(self.bytes.load(Ordering::Relaxed) + bytes, Ordering::Relaxed);
    }
}

pub fn sum(counters: &[ServerCounters]) -> (u64, u64) {
    counters.iter().fold((0, 0), |(units, bytes), c| {
        (units + c.units.load(Ordering::Relaxed), bytes + c.bytes.load(Ordering::Relaxed))
    })
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let threads =
        args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(1));
    let threads = threads.max(1);
    let udp = matches!(args.kind, ServerKind::UdpEcho | ServerKind::UdpSink);
    let sockets = reuseport_group(args.listen, udp, threads)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = sockets[0].local_addr()?.as_socket().context("listening socket has no IP address")?;
    let kind =
        clap::ValueEnum::to_possible_value(&args.kind).map(|v| v.get_name().to_owned()).unwrap_or_default();
    let stop_at = args.duration.map(|duration| Instant::now() + duration);
    let counters: Vec<ServerCounters> = (0..threads).map(|_| ServerCounters::default()).collect();
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening {kind} {bound} threads={threads}")?;
        stdout.flush()?;
    }
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let all = &counters[..];
        let handles: Vec<_> = sockets
            .into_iter()
            .enumerate()
            .map(|(index, socket)| {
                let own = &all[index];
                std::thread::Builder::new().name(format!("serve-{index}")).spawn_scoped(scope, move || {
                    match args.kind {
                        ServerKind::TcpEcho | ServerKind::TcpSink | ServerKind::TcpSource => {
                            tcp::serve(args.kind, socket, stop_at, own)
                        }
                        ServerKind::UdpEcho => udp::serve_echo(socket, stop_at, own),
                        ServerKind::UdpSink => udp::serve_sink(socket, stop_at, own, all),
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        for handle in handles {
            handle.join().map_err(|_| anyhow::anyhow!("a server thread panicked"))??;
        }
        Ok(())
    })?;
    let (units, bytes) = sum(&counters);
    let unit = if udp { "datagrams" } else { "connections" };
    println!("stopped {kind} {bound}: {units} {unit}, {bytes} bytes received");
    Ok(())
}
