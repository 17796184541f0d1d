//! ringlb's pure logic: the model of what is served, the builder that turns Kubernetes objects into an
//! immutable [`Snapshot`], and backend selection.
//!
//! This crate never does I/O, never spawns threads and never reads a clock: time, objects and events
//! are arguments, decisions are return values. `.ci/run` checks that `cargo tree -p lb-core` holds no
//! tokio, io-uring, libc or kube, and clippy's `disallowed-methods` bans clocks and thread RNGs here.
//!
//! Data flow: sources (lb-sync) hand Service and EndpointSlice objects to [`build`]; the resulting
//! [`Snapshot`] is published to the datapath workers, which only read it and keep their own mutable
//! per-worker state (a [`PickState`] per [`VipKey`]); what must hold across workers is shared: each
//! backend's [`BackendLoad`] counter, and [`AffinityTable`]s the datapath shards between workers.
//! Health verdicts come back through the sans-IO machines of [`health`] and enter the next build as
//! a [`HealthOverlay`] in [`BuildOptions`].

pub mod advertise;
pub mod affinity;
pub mod annotations;
pub mod announcement;
pub mod builder;
pub mod cidr;
pub mod compact;
pub mod duration;
pub mod error;
pub mod hash;
pub mod health;
pub mod histogram;
pub mod ipam;
pub mod l2;
pub mod labels;
pub mod lifecycle;
pub mod local;
pub mod metallb;
pub mod model;
pub mod proxy_protocol;
pub mod rate;
pub mod scheduler;
pub mod selection;
#[cfg(test)]
mod testing;
pub mod throttle;

pub use advertise::advertised_vips;
pub use affinity::AffinityTable;
pub use builder::{
    BackendState, BuildCache, BuildOptions, BuildReport, ParsedEndpointSlice, Revised, Skipped, SliceNames,
    apply_health, build, build_incremental,
};
pub use cidr::Cidr;
pub use compact::CompactService;
pub use duration::parse_duration;
pub use error::BuildError;
pub use health::HealthOverlay;
pub use labels::Labels;
pub use lifecycle::{Established, NotReadyConnections, StaleFlowPolicy};
pub use local::LocalResource;
pub use model::{
    Backend, BackendId, BackendIdx, EndpointConditions, EntryChanges, EntryPolicy, HealthCheckNodePort,
    ObjectRef, Placement, Protocol, ServiceEntry, Snapshot, TrafficPolicy, VipKey,
};
pub use proxy_protocol::{ProxyHeader, ProxyProtocol};
pub use rate::{ClientRate, RateTable};
pub use scheduler::{
    BackendLoad, HashKey, LoadRegistry, PickContext, PickRequest, PickState, Scheduler, SchedulerConfig,
    SchedulerKind,
};
pub use selection::{Ownership, ServiceSelection, VipSource};
pub use throttle::LogThrottle;
