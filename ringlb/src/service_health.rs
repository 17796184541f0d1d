//! The health-check node ports: for each Service of the served snapshot's
//! [`Snapshot::health_check_node_ports`] (`LoadBalancer`, `externalTrafficPolicy: Local`, with
//! `spec.healthCheckNodePort`, ringlb knowing its node), an HTTP server on that port of every
//! address, answering as kube-proxy's `service_health.go` does: any path, 200 while this node has a
//! ready local endpoint of the Service and serves at all ([`NodeHealth`]), else 503, with
//! `{"service":{"namespace","name"},"localEndpoints","serviceProxyHealthy"}`. External load
//! balancers probe it on every node and send a Service's traffic only where it answers 200.
//!
//! Invariants: what is answered follows only the published snapshots (a `watch` the snapshot sink
//! feeds), never the object store; a server opens when its port appears, answers the port's
//! current Service and count from then on, and closes with its connections when the port leaves
//! the snapshot; a port that cannot be bound (kube-proxy or another process holds it, no
//! descriptors) is never fatal: it is counted, logged at most once per interval, and retried every
//! [`BIND_RETRY`] while the snapshot still wants it. Once the snapshots stop (shutdown), the servers
//! stay and answer 503 until the process exits.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::StatusCode;
use hyper::header::HeaderValue;
use lb_core::{HealthCheckNodePort, LogThrottle, Snapshot};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::http_server::{self, Answer, ConnectionLimit};
use crate::node_health::{NodeHealth, json_answer};

/// How often a port that could not be bound is tried again.
pub const BIND_RETRY: Duration = Duration::from_secs(1);

/// Connections open at once over every health-check node port (probes are short; a Service per
/// port must not let remote clients take the control thread's descriptors).
const MAX_CONNECTIONS: usize = 256;

/// What `/status` shows of the health-check node ports.
#[derive(Debug, Default)]
pub struct ServiceHealthStatus {
    /// Ports answered now.
    servers: AtomicU64,
    /// Ports the snapshot wants that are not bound now (retried).
    unbound: AtomicU64,
    /// Binds that failed, retries included.
    bind_failures: AtomicU64,
}

impl ServiceHealthStatus {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "servers": self.servers.load(Ordering::Relaxed),
            "unbound": self.unbound.load(Ordering::Relaxed),
            "bind_failures": self.bind_failures.load(Ordering::Relaxed),
        })
    }
}

/// One open port: what it answers now, and its server task (aborted, listener and connections
/// closed, when this is dropped).
struct Server {
    answers: Arc<ArcSwap<HealthCheckNodePort>>,
    task: AbortHandle,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers the health-check node ports of every snapshot `snapshots` sees, until dropped.
pub async fn run(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    node: Arc<NodeHealth>,
    status: Arc<ServiceHealthStatus>,
) {
    let mut ports = Ports {
        servers: BTreeMap::new(),
        node,
        status,
        limit: ConnectionLimit::new(MAX_CONNECTIONS),
        bind_warnings: LogThrottle::default(),
    };
    let mut following = true;
    loop {
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        let wanted = snapshot.health_check_node_ports();
        let unbound = ports.reconcile(wanted);
        tokio::select! {
            changed = snapshots.changed(), if following => {
                // The sink is gone (shutdown): keep answering what was served last, retries included.
                following = changed.is_ok();
            }
            () = tokio::time::sleep(BIND_RETRY), if unbound > 0 => {
                if let Some(held_back) = ports.bind_warnings.poll_summary(Instant::now()) {
                    tracing::warn!(held_back, unbound, "health-check node ports still cannot be bound");
                }
            }
            () = std::future::pending(), if !following && unbound == 0 => {}
        }
    }
}

struct Ports {
    servers: BTreeMap<u16, Server>,
    node: Arc<NodeHealth>,
    status: Arc<ServiceHealthStatus>,
    limit: ConnectionLimit,
    bind_warnings: LogThrottle,
}

impl Ports {
    /// Opens, updates and closes servers so that exactly `wanted`'s ports are answered (sorted by
    /// port, as the snapshot keeps them); returns how many of them could not be bound.
    fn reconcile(&mut self, wanted: &[HealthCheckNodePort]) -> usize {
        let before = self.servers.len();
        self.servers.retain(|port, _| wanted.binary_search_by_key(port, |w| w.port).is_ok());
        let mut unbound = 0;
        for check in wanted {
            if let Some(server) = self.servers.get(&check.port) {
                if **server.answers.load() != *check {
                    server.answers.store(Arc::new(check.clone()));
                }
                continue;
            }
            match bind_every_address(check.port) {
                Ok(listener) => {
                    tracing::debug!(port = check.port, service = %check.service, "answering a health-check node port");
                    self.servers.insert(check.port, self.spawn(listener, check));
                }
                Err(error) => {
                    unbound += 1;
                    self.status.bind_failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(held_back) = self.bind_warnings.admit(Instant::now()) {
                        tracing::warn!(
                            port = check.port,
                            service = %check.service,
                            %error,
                            held_back,
                            retry = ?BIND_RETRY,
                            "cannot bind a health-check node port; retrying"
                        );
                    }
                }
            }
        }
        if self.servers.len() != before {
            tracing::info!(ports = self.servers.len(), unbound, "health-check node ports answered");
        }
        self.status.servers.store(self.servers.len() as u64, Ordering::Relaxed);
        self.status.unbound.store(unbound as u64, Ordering::Relaxed);
        unbound
    }

    fn spawn(&self, listener: TcpListener, check: &HealthCheckNodePort) -> Server {
        let answers = Arc::new(ArcSwap::from_pointee(check.clone()));
        let (node, current) = (Arc::clone(&self.node), Arc::clone(&answers));
        let respond = move |_: &_| service_answer(&current.load(), node.is_healthy());
        let task = tokio::spawn(http_server::serve(
            listener,
            "health-check node port",
            Some(self.limit.clone()),
            respond,
        ));
        Server { answers, task: task.abort_handle() }
    }
}

/// Binds `port` on every address, IPv4 and IPv6, as kube-proxy does: one dual-stack socket, or an
/// IPv4 one where the host has no IPv6.
fn bind_every_address(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let (socket, addr) = match Socket::new(Domain::IPV6, Type::STREAM, None) {
        Ok(socket) => {
            socket.set_only_v6(false)?;
            (socket, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        }
        Err(_) => (Socket::new(Domain::IPV4, Type::STREAM, None)?, SocketAddr::from(([0, 0, 0, 0], port))),
    };
    // SO_REUSEADDR only (never SO_REUSEPORT): a port another process listens on must fail to bind
    // rather than share its probes.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// kube-proxy's answer for one Service: 200 when `node_healthy` and the Service has a local
/// endpoint, else 503; JSON with `X-Content-Type-Options: nosniff`, and the count also as
/// `X-Load-Balancing-Endpoint-Weight` (kube-proxy's hint for balancers that weight nodes).
pub fn service_answer(check: &HealthCheckNodePort, node_healthy: bool) -> Answer {
    let healthy = node_healthy && check.local_endpoints > 0;
    let body = json!({
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": node_healthy,
    });
    let mut answer =
        json_answer(if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body);
    answer.headers_mut().insert("x-load-balancing-endpoint-weight", HeaderValue::from(check.local_endpoints));
    answer
}

#[cfg(test)]
mod tests {
    use lb_core::ObjectRef;

    use super::*;

    #[test]
    fn a_service_is_healthy_with_a_local_endpoint_on_a_healthy_node_only() {
        let check = |local_endpoints| HealthCheckNodePort {
            port: 31000,
            service: ObjectRef::service("shop", "web"),
            local_endpoints,
        };
        let answer = service_answer(&check(2), true);
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()["x-content-type-options"], "nosniff");
        assert_eq!(answer.headers()["content-type"], "application/json");
        assert_eq!(answer.headers()["x-load-balancing-endpoint-weight"], "2");
        assert_eq!(service_answer(&check(0), true).status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(service_answer(&check(2), false).status(), StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
}
