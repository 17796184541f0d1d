//! The result of a load run: counters, latency percentiles and derived rates, printed as a human table
//! or as one JSON object (`--json`).
//!
//! Rates are always computed from the measured window (after warm-up), never from the whole run.
//! Errors are never folded into other numbers: each kind is counted and printed on its own.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub const LATENCY_MAX_NS: u64 = 60_000_000_000;

pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("constant histogram bounds are valid")
}

/// One reason an operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    ConnectRefused,
    ConnectTimeout,
    ConnectOther,
    /// An established connection was reset (or the peer stopped reading: broken pipe).
    Reset,
    /// The peer closed before the whole response arrived.
    UnexpectedEof,
    /// No (complete) response within `--timeout`.
    ResponseTimeout,
    /// A datagram was refused (ICMP port unreachable reported on the connected UDP socket).
    Refused,
    OtherIo,
}

/// Per-kind failure counts over the whole run, warm-up included (errors are never hidden).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ErrorCounts {
    pub connect_refused: u64,
    pub connect_timeout: u64,
    pub connect_other: u64,
    pub reset: u64,
    pub unexpected_eof: u64,
    pub response_timeout: u64,
    pub refused: u64,
    pub other_io: u64,
}

impl ErrorCounts {
    pub fn record(&mut self, failure: Failure) {
        *self.slot(failure) += 1;
    }

    fn slot(&mut self, failure: Failure) -> &mut u64 {
        match failure {
            Failure::ConnectRefused => &mut self.connect_refused,
            Failure::ConnectTimeout => &mut self.connect_timeout,
            Failure::ConnectOther => &mut self.connect_other,
            Failure::Reset => &mut self.reset,
            Failure::UnexpectedEof => &mut self.unexpected_eof,
            Failure::ResponseTimeout => &mut self.response_timeout,
            Failure::Refused => &mut self.refused,
            Failure::OtherIo => &mut self.other_io,
        }
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        self.connect_refused += other.connect_refused;
        self.connect_timeout += other.connect_timeout;
        self.connect_other += other.connect_other;
        self.reset += other.reset;
        self.unexpected_eof += other.unexpected_eof;
        self.response_timeout += other.response_timeout;
        self.refused += other.refused;
        self.other_io += other.other_io;
    }

    pub fn total(&self) -> u64 {
        self.connect_refused
            + self.connect_timeout
            + self.connect_other
            + self.reset
            + self.unexpected_eof
            + self.response_timeout
            + self.refused
            + self.other_io
    }

    fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("connect_refused", self.connect_refused),
            ("connect_timeout", self.connect_timeout),
            ("connect_other", self.connect_other),
            ("reset", self.reset),
            ("unexpected_eof", self.unexpected_eof),
            ("response_timeout", self.response_timeout),
            ("refused", self.refused),
            ("other_io", self.other_io),
        ]
    }
}

/// Latency percentiles in microseconds. `pNN` is the smallest recorded value that at least NN % of the
/// operations did not exceed (hdrhistogram `value_at_quantile`, 3 significant digits).
#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let micros = |ns: u64| ns as f64 / 1000.0;
        Some(Self {
            count: histogram.len(),
            min: micros(histogram.min()),
            mean: histogram.mean() / 1000.0,
            p50: micros(histogram.value_at_quantile(0.50)),
            p90: micros(histogram.value_at_quantile(0.90)),
            p99: micros(histogram.value_at_quantile(0.99)),
            p999: micros(histogram.value_at_quantile(0.999)),
            max: micros(histogram.max()),
        })
    }
}

/// Bytes moved by one TCP stream in the measured window.
#[derive(Clone, Debug, Serialize)]
pub struct StreamSummary {
    pub stream: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub gbit_per_sec: f64,
}

/// Datagram accounting for the UDP modes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DatagramSummary {
    pub sent: u64,
    /// udp-rr: answers matched to their request; udp-stream: what the sink counted.
    pub received: u64,
    /// Sent but never received (udp-rr: not answered within `--timeout`).
    pub lost: u64,
    /// udp-rr: answers that arrived after their request had been declared lost.
    pub late: u64,
    pub sent_per_sec: f64,
    pub received_per_sec: f64,
    pub loss_percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub target: String,
    pub params: serde_json::Value,
    pub client_threads: usize,
    pub warmup_s: f64,
    /// Measured window: from the end of warm-up until the last thread stopped.
    pub duration_s: f64,
    /// Completed operations (rr: responses, crr: connections with response, stream: write/read calls).
    pub ops: u64,
    pub ops_per_sec: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub gbit_per_sec_sent: f64,
    pub gbit_per_sec_received: f64,
    pub gbit_per_sec: f64,
    pub errors: ErrorCounts,
    pub errors_total: u64,
    pub latency_us: Option<LatencySummary>,
    pub streams: Option<Vec<StreamSummary>>,
    pub datagrams: Option<DatagramSummary>,
    /// tcp-idle: the connections held and what they cost the watched processes.
    pub idle: Option<crate::load::tcp_idle::IdleSummary>,
    /// The generator's own CPU use over the whole run (filled in by `main`).
    pub client_cpu: Option<ClientCpu>,
}

/// CPU time the generator process used (getrusage) over the whole run, warm-up and setup included.
/// `cores_busy` close to `client_threads` means the generator itself may be the bottleneck.
#[derive(Clone, Debug, Serialize)]
pub struct ClientCpu {
    pub user_s: f64,
    pub system_s: f64,
    pub wall_s: f64,
    pub cores_busy: f64,
}

impl ClientCpu {
    /// Share of the client threads' capacity above which the table warns that the generator is busy.
    const SATURATED: f64 = 0.9;

    pub fn saturated(&self, client_threads: usize) -> bool {
        self.cores_busy >= Self::SATURATED * client_threads as f64
    }
}

pub fn gbit_per_sec(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { bytes as f64 * 8.0 / seconds / 1e9 } else { 0.0 }
}

pub fn per_sec(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

impl Report {
    /// A report with the rates derived from the counters over the measured window of `run`; the
    /// mode fills in the optional sections.
    pub fn new(
        mode: &'static str,
        run: &crate::cli::RunArgs,
        params: serde_json::Value,
        client_threads: usize,
        totals: &crate::run::Totals,
    ) -> Self {
        let duration_s = run.duration.as_secs_f64();
        Self {
            mode,
            target: run.target.to_string(),
            params,
            client_threads,
            warmup_s: run.warmup.as_secs_f64(),
            duration_s,
            ops: totals.ops,
            ops_per_sec: per_sec(totals.ops, duration_s),
            bytes_sent: totals.bytes_sent,
            bytes_received: totals.bytes_received,
            gbit_per_sec_sent: gbit_per_sec(totals.bytes_sent, duration_s),
            gbit_per_sec_received: gbit_per_sec(totals.bytes_received, duration_s),
            gbit_per_sec: gbit_per_sec(totals.bytes_sent + totals.bytes_received, duration_s),
            errors_total: totals.errors.total(),
            errors: totals.errors.clone(),
            latency_us: LatencySummary::from_histogram(&totals.latency),
            streams: None,
            datagrams: None,
            idle: None,
            client_cpu: None,
        }
    }

    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let params = match &self.params {
            serde_json::Value::Object(map) => {
                map.iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(" ")
            }
            other => other.to_string(),
        };
        let _ = writeln!(
            out,
            "{} -> {}  ({params}, client threads {})",
            self.mode, self.target, self.client_threads
        );
        let _ = writeln!(out, "  measured   {:.3} s (after {:.3} s warm-up)", self.duration_s, self.warmup_s);
        let _ = writeln!(out, "  ops        {:>14}  {:>14.1} /s", self.ops, self.ops_per_sec);
        let _ = writeln!(
            out,
            "  throughput {:>9.3} Gbit/s sent  {:>9.3} Gbit/s received  {:>9.3} Gbit/s total",
            self.gbit_per_sec_sent, self.gbit_per_sec_received, self.gbit_per_sec
        );
        if let Some(idle) = &self.idle {
            let _ = writeln!(
                out,
                "  held       {} of {} established in {:.3} s, {} alive at the end",
                idle.established, idle.requested, idle.open_s, idle.alive_at_end
            );
            if let Some(proxy) = &idle.proxy {
                let _ = writeln!(
                    out,
                    "  proxy      RSS {} -> {} -> {} KiB ({:.2} KiB per connection), {:.3} CPU s in the hold ({:.3} cores)",
                    proxy.rss_kib_before,
                    proxy.rss_kib_open,
                    proxy.rss_kib_end,
                    proxy.kib_per_connection,
                    proxy.cpu_s_hold,
                    proxy.cores_busy_hold
                );
            }
        }
        if let Some(datagrams) = &self.datagrams {
            let _ = writeln!(
                out,
                "  datagrams  sent {} ({:.1} /s)  received {} ({:.1} /s)  lost {} ({:.3} %)  late {}",
                datagrams.sent,
                datagrams.sent_per_sec,
                datagrams.received,
                datagrams.received_per_sec,
                datagrams.lost,
                datagrams.loss_percent,
                datagrams.late
            );
        }
        let nonzero: Vec<String> = self
            .errors
            .named()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  errors     {}{}",
            self.errors_total,
            if nonzero.is_empty() { String::new() } else { format!("  ({})", nonzero.join(", ")) }
        );
        match &self.latency_us {
            Some(l) => {
                let _ = writeln!(
                    out,
                    "  latency us p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, n={})",
                    l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
                );
            }
            // The stream modes measure throughput only: no latency line, rather than a misleading one.
            None if self.streams.is_some() || self.mode == "udp-stream" => {}
            None => {
                let _ = writeln!(out, "  latency    no completed operations");
            }
        }
        if let Some(cpu) = &self.client_cpu {
            let _ = writeln!(
                out,
                "  client cpu {:.2} cores busy (user {:.2} s, system {:.2} s over {:.2} s){}",
                cpu.cores_busy,
                cpu.user_s,
                cpu.system_s,
                cpu.wall_s,
                if cpu.saturated(self.client_threads) {
                    "  <- saturated: the generator may be the bottleneck"
                } else {
                    ""
                }
            );
        }
        if let Some(streams) = &self.streams {
            for s in streams {
                let _ = writeln!(
                    out,
                    "  stream {:>3} {:>9.3} Gbit/s  ({} B sent, {} B received)",
                    s.stream, s.gbit_per_sec, s.bytes_sent, s.bytes_received
                );
            }
        }
        out
    }
}
