//! Log setup: `tracing` to stderr, human-readable or JSON, filtered by `--log-level` or `RUST_LOG`;
//! colours only when stderr is a terminal (a journal or a log file gets plain text).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Crates whose own logs repeat what ringlb already reports once, throttled (every failed request
/// of the Kubernetes client during an API outage, for one): silent unless the filter names them.
const QUIET: [&str; 2] = ["kube_client", "kube_runtime"];

pub fn init(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let directives = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => from_env,
        _ => level.to_owned(),
    };
    let mut filter = EnvFilter::try_new(&directives)?;
    for target in QUIET.iter().filter(|target| !directives.contains(*target)) {
        filter = filter.add_directive(format!("{target}=off").parse()?);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
