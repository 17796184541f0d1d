//! Fuzz targets: each turns arbitrary bytes into one input of ringlb's parsers or builder and panics
//! when an invariant breaks. The same functions serve two drivers:
//! - AFL++ (`src/bin/fuzz-*.rs`, built only with `cargo afl build --features afl`, see the README's
//!   "Fuzzing" section), which explores new inputs with coverage feedback;
//! - `tests/replay.rs`, a plain `cargo test`, which feeds every file of `corpus/<target>/` through
//!   its target, so that whatever fuzzing once found stays fixed.
//!
//! A target never panics on input the code under test rejects with an error: only a panic in ringlb,
//! or a broken invariant checked here, is a finding. Targets keep no state between calls (AFL++ runs
//! many inputs in one process).

pub mod annotations;
pub mod manifest;
pub mod objects;
pub mod proxy_header;
pub mod text;

/// A target: bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by the name of its corpus folder (`corpus/<name>/`) and of its AFL++ binary
/// (`fuzz-<name>`).
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest::run),
    ("objects", objects::run),
    ("annotations", annotations::run),
    ("proxy_header", proxy_header::run),
    ("text", text::run),
];
