//! The `ringlb` binary: command line, logging and wiring of the crates. Logic lives in the crates;
//! this binary only connects a source (lb-sync) to the datapath (lb-datapath) and serves the admin API.

mod admin;
mod allocator;
mod check;
mod cli;
mod config;
mod demo;
mod http_server;
mod logging;
mod metrics;
mod node_health;
mod serve;
mod service_health;
mod table;
mod upgrade;

use clap::{CommandFactory, FromArgMatches};

use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = match parse_arguments() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
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

/// The command line, with the flags of the configuration file it names; on a usage error, the
/// error has been printed and the exit code is returned (2, as clap's own).
fn parse_arguments() -> Result<Cli, std::process::ExitCode> {
    let command = Cli::command();
    let arguments = config::arguments(&command, std::env::args_os().collect()).map_err(|error| {
        eprintln!("ringlb: {error}");
        std::process::ExitCode::from(2)
    })?;
    let parsed =
        command.try_get_matches_from(&arguments.all).and_then(|matches| Cli::from_arg_matches(&matches));
    parsed.map_err(|error| {
        let _ = error.print();
        if let Some((file, from_file)) = arguments.from_file.filter(|_| error.use_stderr()) {
            let from_file: Vec<_> = from_file.iter().map(|argument| argument.to_string_lossy()).collect();
            eprintln!("note: {} supplied: {}", file.display(), from_file.join(" "));
        }
        std::process::ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
    })
}
