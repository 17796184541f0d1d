//! Every annotation ringlb reads, declared once with its meaning and accepted values.
//!
//! Parsing lives in `builder::policy` (once per build); the README lists the same table. An invalid
//! value rejects the object it is on (see [`crate::BuildError::InvalidAnnotation`]), never silently
//! falls back, except [`WEIGHT`] on an EndpointSlice (the slice's endpoints keep weight 1, and an error
//! is reported) because dropping a slice would take healthy backends out of service.

/// MetalLB's requested VIPs (comma-separated IPv4/IPv6) for a `LoadBalancer` Service with an empty
/// `status.loadBalancer`. Takes precedence over the deprecated `spec.loadBalancerIP`.
pub const METALLB_LOAD_BALANCER_IPS: &str = "metallb.universe.tf/loadBalancerIPs";

/// On a Service: the scheduler of all its ports, `rr` or `wrr`. Default: `BuildOptions::default_scheduler`.
pub const SCHEDULER: &str = "ringlb.io/scheduler";

/// On a Service: how long one backend connect may take before the next backend is tried.
/// A duration: an integer and a unit `ms`, `s`, `m` or `h` (`250ms`, `5s`, `2m`, `1h`); must be > 0.
pub const CONNECT_TIMEOUT: &str = "ringlb.io/connect-timeout";

/// On a Service: close a connection idle in both directions for this long. Duration as
/// [`CONNECT_TIMEOUT`]; must be > 0.
pub const IDLE_TIMEOUT: &str = "ringlb.io/idle-timeout";

/// On a Service: how long established connections of a removed VIP or backend may continue. Duration
/// as [`CONNECT_TIMEOUT`]; `0s` closes them at once.
pub const DRAIN_TIMEOUT: &str = "ringlb.io/drain-timeout";

/// On a Service: how many backends one client connection may try in all, first try included; 1..=16.
pub const CONNECT_ATTEMPTS: &str = "ringlb.io/connect-attempts";

/// On an EndpointSlice: the weight of all its endpoints for `wrr`, 1..=10000. Default 1.
pub const WEIGHT: &str = "ringlb.io/weight";

/// On a Service: per-endpoint weights by endpoint IP, `10.0.0.1=3,10.0.0.2=1` (each 1..=10000). They
/// override [`WEIGHT`] of the slice; addresses that are not endpoints of the Service are ignored.
pub const BACKEND_WEIGHTS: &str = "ringlb.io/backend-weights";

/// The label that ties an EndpointSlice to its Service (set by Kubernetes, not by users).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Longest duration any timeout annotation accepts (30 days), so adding it to an `Instant` in the
/// datapath can never overflow.
pub const MAX_DURATION_SECS: u64 = 30 * 24 * 3600;
