//! ringlb's sources of truth: where Service and EndpointSlice objects come from, and how the
//! snapshots built from them reach the datapath.
//!
//! Today the source is manifest files ([`ManifestSource`], `ringlb run --manifests PATH`); the
//! Kubernetes API comes later behind the same [`SnapshotSink`]. This crate never touches connections:
//! its only output is an immutable `lb_core::Snapshot` handed to a sink. It keeps one invariant above
//! all: a bad input never replaces a good snapshot.
//!
//! - [`manifest`]: reading files and directories of `kubectl get -o yaml` output into typed objects;
//! - [`ManifestSource`]: the load → build → publish loop that follows the files as they change;
//! - [`SnapshotSink`]: where snapshots go; [`Readiness`]: whether the first one went there;
//! - active health checks (`ringlb.io/health-check`), applied as an overlay; [`HealthStatus`]: counts.

mod health;
pub mod manifest;
mod readiness;
mod sink;
mod source;

pub use health::{BackendEventReceiver, EVENT_POLL, HealthStatus};
pub use manifest::{Location, ManifestError, ManifestSet, ReadError, parse_manifest_str};
pub use readiness::Readiness;
pub use sink::SnapshotSink;
pub use source::{DEFAULT_DEBOUNCE, DEFAULT_MAX_DELAY, DEFAULT_POLL_INTERVAL, ManifestSource, SyncError};
