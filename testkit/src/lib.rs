//! Test support shared by ringlb's crates (dev-dependency only; never part of a release binary).
//!
//! - [`objects`]: terse builders for Service and EndpointSlice objects;
//! - [`backends`]: real loopback TCP backends (echo, sink, named) that tests send bytes through;
//! - [`capabilities`]: running code on a thread without CAP_NET_ADMIN and CAP_NET_RAW;
//! - [`descriptors`]: running a test process out of file descriptors on purpose;
//! - [`apiserver`]: a Kubernetes API server emulator (HTTPS on loopback) held to recorded exchanges;
//! - [`kubectl`]: kubectl as a test's operator;
//! - [`pods`]: where tests put pods (network namespaces; never loopback, which API servers refuse);
//! - [`lab`]: multi-node networks of namespaces on shared segments (routers, nodes, clients).

pub mod apiserver;
pub mod backends;
pub mod capabilities;
pub mod descriptors;
pub mod kubectl;
pub mod lab;
mod netns;
pub mod objects;
pub mod pods;
