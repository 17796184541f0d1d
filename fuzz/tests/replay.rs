//! Replays every file of `corpus/<target>/` through its target, as plain tests: the seeds, the inputs
//! fuzzing kept for new coverage, and the regressions of bugs fuzzing found. Each file is run on its
//! own so that a failure names it.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

fn replay(target: &str) {
    let (_, run) = ringlb_fuzz::TARGETS.iter().find(|(name, _)| *name == target).expect("a known target");
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .unwrap_or_else(|error| panic!("{}: {error}", folder.display()))
        .map(|entry| entry.expect("a readable corpus folder").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus", folder.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            panic::catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{} of {} corpus files failed: {failed:#?}", failed.len(), files.len());
}

#[test]
fn manifest_corpus_replays() {
    replay("manifest");
}

#[test]
fn objects_corpus_replays() {
    replay("objects");
}

#[test]
fn annotations_corpus_replays() {
    replay("annotations");
}

#[test]
fn proxy_header_corpus_replays() {
    replay("proxy_header");
}

#[test]
fn text_corpus_replays() {
    replay("text");
}

/// Every target has a corpus folder and a test above.
#[test]
fn every_target_has_a_corpus() {
    for (name, _) in ringlb_fuzz::TARGETS {
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name).is_dir(), "{name}");
    }
}
