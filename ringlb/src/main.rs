//! The `ringlb` binary: command line, logging and wiring of the crates. Logic lives in the crates;
//! this binary only connects a source (lb-sync) to the datapath (lb-datapath) and serves the admin API.

mod admin;
mod allocator;
mod check;
mod cli;
mod demo;
mod http_server;
mod logging;
mod metrics;
mod node_health;
mod serve;
mod service_health;
mod table;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(error) = logging::init(cli.log_format, &cli.log_level) {
        eprintln!("ringlb: {error:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run(args) => serve::run(args),
        Command::Check(args) => check::run(args),
        Command::Demo(args) => demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("ringlb: {error:#}");
            std::process::ExitCode::from(1)
        }
    }
}
