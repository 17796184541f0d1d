//! `ringlb check`: load and build manifests exactly as `run` would, print the table, and exit
//! non-zero when anything was rejected, so a pipeline can gate on it.

use std::process::ExitCode;

use lb_sync::ManifestSet;
use serde::Serialize;

use crate::cli::CheckArgs;
use crate::serve::build_options;
use crate::table;

/// Exit code when manifests load but some objects were rejected.
const EXIT_REJECTED: u8 = 1;
/// Exit code when the manifests could not be loaded at all.
const EXIT_UNLOADABLE: u8 = 2;

#[derive(Serialize)]
struct CheckOutput<'a> {
    entries: Vec<&'a lb_core::ServiceEntry>,
    rejected: Vec<String>,
    /// Rejected Services served from their last good spec (only ever set with a previous table).
    kept_previous: &'a [lb_core::ObjectRef],
    skipped: Vec<SkippedView<'a>>,
}

#[derive(Serialize)]
struct SkippedView<'a> {
    service: &'a lb_core::ObjectRef,
    reason: &'a str,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let report = match ManifestSet::load(&args.manifests) {
        Ok(set) => lb_core::build(
            &set.services,
            &set.slices,
            &set.endpoints,
            &build_options(&args.defaults),
            None,
            1,
        ),
        Err(errors) => {
            for error in &errors {
                eprintln!("error: {error}");
            }
            return Ok(ExitCode::from(EXIT_UNLOADABLE));
        }
    };
    if args.json {
        let output = CheckOutput {
            entries: report.snapshot.entries().map(|e| e.as_ref()).collect(),
            rejected: report.errors.iter().map(ToString::to_string).collect(),
            kept_previous: &report.kept_previous,
            skipped: report
                .skipped
                .iter()
                .map(|s| SkippedView { service: &s.service, reason: &s.reason })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", table::render(&report));
    }
    Ok(if report.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REJECTED) })
}
