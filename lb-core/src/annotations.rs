//! Every annotation ringlb reads, declared once. Parsing lives in the builder; the README lists them.

/// MetalLB's requested VIPs (comma-separated) for a `LoadBalancer` Service with an empty status.
pub const METALLB_LOAD_BALANCER_IPS: &str = "metallb.universe.tf/loadBalancerIPs";
/// Scheduler of the Service's ports: one of `rr`, `wrr`.
pub const SCHEDULER: &str = "ringlb.io/scheduler";
