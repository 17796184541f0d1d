//! ringlb's sources of truth and the control loop that turns them into the snapshots the datapath
//! serves.
//!
//! Data flow (one way): a [`Source`] (manifest files, or the Kubernetes API) reports what changed; the [`ControlLoop`] keeps the objects in an [`ObjectStore`], builds a snapshot with
//! `lb_core::build`, applies the health overlay, and hands each new snapshot to a [`SnapshotSink`].
//! This crate never touches connections: its only output is an immutable `lb_core::Snapshot`. It
//! keeps one invariant above all: a bad input never replaces a good snapshot.
//!
//! - [`manifest`]: reading files and directories of `kubectl get -o yaml` output into typed objects;
//! - [`ManifestSource`]: follows manifest files as they change; [`KubeSource`]: watches the API;
//! - [`leader`]: Lease-based leader election; [`allocator`]: the leader's address allocation,
//!   status write-back and Events; [`kubeconfig`]: the client configuration rules;
//! - [`ControlLoop`]: the one loop every source feeds; [`store`]: the objects it builds from;
//! - [`SnapshotSink`]: where snapshots go; [`Readiness`]: whether the first one went there;
//! - active health checks (`ringlb.io/health-check`) and outlier detection, applied as an overlay;
//!   [`HealthStatus`]: their counters.

pub mod allocator;
pub mod announce;
pub mod bird;
mod control;
pub mod events;
mod follow;
mod health;
pub mod kubeconfig;
pub mod l2;
pub mod leader;
pub mod liveness_link;
pub mod manifest;
mod readiness;
mod sink;
mod source;
pub mod store;
pub mod vip_link;

pub use control::{ControlLoop, SourceHandle};
pub use health::{BackendEventReceiver, EVENT_POLL, HealthStatus, Verdicts};
pub use manifest::{Location, ManifestError, ManifestSet, ReadError, parse_manifest_str};
pub use readiness::Readiness;
pub use sink::SnapshotSink;
pub use source::{
    DEFAULT_DEBOUNCE, DEFAULT_MAX_DELAY, DEFAULT_POLL_INTERVAL, KubeSource, ManifestSource, Source, SyncError,
};
pub use store::{Change, Kind, Object, ObjectStore, SliceParser, slimmed};
