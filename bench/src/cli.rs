//! Command-line interface: one subcommand per load mode plus `serve` for the built-in servers.
//!
//! Only parsing and defaults live here; no flag is interpreted twice. Durations accept `10s`, `500ms`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::duration::parse_duration;

#[derive(Parser, Debug)]
#[command(name = "ringlb-bench", version, about = "Load generator and benchmark servers (TCP and UDP)")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a built-in server (echo, sink, source) until killed or `--duration` passes.
    Serve(ServeArgs),
    /// Bulk TCP throughput over N parallel streams.
    TcpStream(TcpStreamArgs),
    /// Request/response ping-pong over persistent TCP connections (needs an echo server).
    TcpRr(TcpRrArgs),
    /// Connect, request, response, close: the new-connection rate (needs an echo server).
    TcpCrr(TcpCrrArgs),
    /// Many established connections held (mostly) idle, and what they cost the proxy's processes
    /// (`--watch-pid`) in memory and CPU (needs an echo server).
    TcpIdle(TcpIdleArgs),
    /// Datagram ping-pong with a per-flow loss timeout (needs a UDP echo server).
    UdpRr(UdpRrArgs),
    /// Blast datagrams at a `serve udp-sink`, which reports what it received.
    UdpStream(UdpStreamArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// Returns every byte it reads (for tcp-rr, tcp-crr and tcp-stream --direction both).
    TcpEcho,
    /// Reads and discards (for tcp-stream --direction up).
    TcpSink,
    /// Writes endlessly, discards what it reads (for tcp-stream --direction down).
    TcpSource,
    /// Returns every datagram to its sender (for udp-rr).
    UdpEcho,
    /// Counts and discards datagrams; answers the stats query of udp-stream.
    UdpSink,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(value_enum)]
    pub kind: ServerKind,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Server threads, each with its own SO_REUSEPORT socket [default: available cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Stop after this long [default: run until killed].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// Flags every load mode shares.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address to load: host:port (resolved once, first address used).
    #[arg(long, value_parser = parse_target)]
    pub target: SocketAddr,
    /// Length of the measured window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load applied before measuring starts (not counted, except errors).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Client threads; connections/streams/flows are spread over them [default: available cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the result as one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl RunArgs {
    /// Progress lines are for runs long enough to watch.
    pub fn show_progress(&self) -> bool {
        !self.quiet && self.warmup + self.duration > Duration::from_secs(2)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client writes, server reads (against tcp-sink).
    Up,
    /// Server writes, client reads (against tcp-source).
    Down,
    /// Client writes and reads the echo (against tcp-echo).
    Both,
}

#[derive(Args, Debug)]
pub struct TcpStreamArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub streams: u32,
    /// Bytes per write (and read buffer size).
    #[arg(long, default_value_t = 128 * 1024, value_parser = clap::value_parser!(u32).range(1..=64 << 20))]
    pub size: u32,
    #[arg(long, value_enum, default_value = "up")]
    pub direction: Direction,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct TcpRrArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,
    /// Bytes per request (and per response: the echo).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16 << 20))]
    pub message_size: u32,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub pipeline: u32,
    /// A response not complete after this long is a `response_timeout`; the connection is replaced.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseStyle {
    /// Normal close (FIN); the client keeps TIME_WAIT (reused on loopback with tcp_tw_reuse=2).
    Fin,
    /// SO_LINGER 0: close sends RST, no TIME_WAIT anywhere.
    Reset,
}

#[derive(Args, Debug)]
pub struct TcpCrrArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Transactions in flight (each a fresh connection).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16 << 20))]
    pub message_size: u32,
    #[arg(long, value_enum, default_value = "fin")]
    pub close: CloseStyle,
    /// Spread client source addresses over 127.0.0.1 .. 127.0.0.N (loopback IPv4 targets only) to
    /// multiply the usable ephemeral ports; 0 lets the kernel choose.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_000))]
    pub source_ips: u32,
    /// Response deadline, counted from connection establishment.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct TcpIdleArgs {
    /// `--warmup` then `--duration` is the hold: how long the connections stay open once all are
    /// established (pings in the warm-up are not counted).
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub connections: u32,
    /// Spread client source addresses over 127.0.0.1 .. 127.0.0.N (loopback IPv4 targets only), as
    /// many clients would come from; 0 lets the kernel choose.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_000))]
    pub source_ips: u32,
    /// Send `--ping-bytes` on every connection (and read the echo) this often during the hold
    /// [default: never: the connections stay silent].
    #[arg(long, value_parser = parse_duration)]
    pub ping_every: Option<Duration>,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub ping_bytes: u32,
    /// A process to sample (resident memory, CPU time from /proc) before opening, once every
    /// connection is open and at the end of the hold; repeat for a proxy of several processes.
    #[arg(long)]
    pub watch_pid: Vec<u32>,
    /// An echo (the first byte's, a ping's) not complete after this long fails the connection.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct UdpRrArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Flows (each its own socket and source port), one datagram in flight each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub flows: u32,
    /// Datagram payload bytes; at least 8 (a sequence number tells late answers from current ones).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=65_507))]
    pub message_size: u32,
    /// An answer not received after this long counts as lost and the flow sends the next datagram.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct UdpStreamArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub flows: u32,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65_507))]
    pub message_size: u32,
    /// Total datagrams per second over all flows [default: as fast as possible].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// Datagrams per sendmmsg call.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch: u32,
    /// Datagrams per message of the batch, sent as one UDP GSO send (`UDP_SEGMENT`): the kernel walks
    /// the stack once and the receiver still gets separate datagrams of `--message-size` (its socket
    /// segments them, unless it asked for `UDP_GRO`). Makes the generator cheaper per datagram, so it
    /// can outrun what it loads. At most 64 and 65 507 bytes per message; 1 = off.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub gso: u32,
}

fn parse_target(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .map_err(|error| format!("cannot resolve `{text}`: {error}"))?
        .next()
        .ok_or_else(|| format!("`{text}` resolved to no address"))
}
