//! `ringlb-bench`: a load generator (tcp-stream, tcp-rr, tcp-crr, tcp-idle, udp-rr, udp-stream) and the echo,
//! sink and source servers it runs against, so a comparison needs nothing else.
//!
//! It depends on no ringlb crate, so it is equally fair to every proxy it measures. A run is always
//! bounded by `--duration`; errors are counted per kind and reported, never hidden or retried silently.

mod cli;
mod duration;
mod load;
mod poller;
mod report;
mod run;
mod serve;
mod sockets;
mod udp_stats;

use std::io::Write as _;
use std::time::Instant;

use clap::Parser as _;

use cli::{Cli, Command};
use report::ClientCpu;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let started = Instant::now();
    let (user_before, system_before) = run::process_cpu_seconds();
    let (mut report, json) = match cli.command {
        Command::Serve(args) => return serve::run(&args),
        Command::TcpStream(args) => (load::tcp_stream::run(&args)?, args.run.json),
        Command::TcpRr(args) => (load::tcp_rr::run(&args)?, args.run.json),
        Command::TcpCrr(args) => (load::tcp_crr::run(&args)?, args.run.json),
        Command::TcpIdle(args) => (load::tcp_idle::run(&args)?, args.run.json),
        Command::UdpRr(args) => (load::udp_rr::run(&args)?, args.run.json),
        Command::UdpStream(args) => (load::udp_stream::run(&args)?, args.run.json),
    };
    let (user_after, system_after) = run::process_cpu_seconds();
    let wall_s = started.elapsed().as_secs_f64();
    let (user_s, system_s) = (user_after - user_before, system_after - system_before);
    report.client_cpu =
        Some(ClientCpu { user_s, system_s, wall_s, cores_busy: (user_s + system_s) / wall_s.max(1e-9) });
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut stdout, &report)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{}", report.to_human())?;
    }
    Ok(())
}
