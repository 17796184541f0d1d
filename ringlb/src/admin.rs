//! The admin HTTP listener, read-only: `/healthz` (the process runs), `/readyz` (the datapath serves
//! the first snapshot), `/metrics` (Prometheus, see [`crate::metrics`]), `/snapshot` (the served
//! table as JSON), `/backends` (every backend's state and why) and `/status` (JSON: snapshot
//! version, source state, per-worker counters). Runs on the control thread's tokio runtime; never
//! on a datapath worker.
//!
//! It listens on loopback unless the operator explicitly allows another address, because it
//! exposes internals (metrics, tables) that should not be reachable from the VIP side.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;

use crate::cli::{AdminAddr, AdminArgs};
use crate::http_server::{self, Answer, respond, text};
use crate::metrics;

fn json(document: &serde_json::Value) -> Answer {
    let mut body = serde_json::to_vec_pretty(document).unwrap_or_default();
    body.push(b'\n');
    respond(StatusCode::OK, "application/json", Bytes::from(body))
}

/// What the admin endpoints report; implemented by the serving wiring.
pub trait AdminState: Send + Sync + 'static {
    /// Whether the datapath serves the first snapshot.
    fn is_ready(&self) -> bool;
    /// The `/status` document.
    fn status(&self) -> serde_json::Value;
    /// The `/metrics` exposition.
    fn metrics(&self) -> String;
    /// The `/snapshot` document: the served table.
    fn snapshot(&self) -> serde_json::Value;
    /// The `/backends` document.
    fn backends(&self) -> serde_json::Value;
}

/// The address to listen on, if any, refusing a non-loopback one unless explicitly allowed.
/// Called before anything starts, so a refused address costs nothing.
pub fn listen_addr(args: &AdminArgs) -> anyhow::Result<Option<SocketAddr>> {
    match args.admin {
        AdminAddr::Off => Ok(None),
        AdminAddr::Listen(addr) if addr.ip().is_loopback() || args.admin_allow_remote => Ok(Some(addr)),
        AdminAddr::Listen(addr) => {
            bail!("admin address {addr} is not a loopback address; pass --admin-allow-remote to allow it")
        }
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the admin listener on {addr}"))
}

/// Serves admin requests on `listener` until the task is dropped (see [`http_server::serve`]).
pub async fn serve(listener: TcpListener, state: Arc<dyn AdminState>) {
    http_server::serve(listener, "admin", None, move |request| route(request, state.as_ref())).await;
}

fn route(request: &Request<Incoming>, state: &dyn AdminState) -> Answer {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/status" => json(&state.status()),
        "/snapshot" => json(&state.snapshot()),
        "/backends" => json(&state.backends()),
        "/metrics" => {
            let accept = request.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
            let exposition = state.metrics();
            if metrics::wants_openmetrics(accept) {
                respond(StatusCode::OK, metrics::CONTENT_TYPE, Bytes::from(exposition))
            } else {
                let text = metrics::to_prometheus_text(&exposition);
                respond(StatusCode::OK, metrics::TEXT_CONTENT_TYPE, Bytes::from(text))
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics, /snapshot, /backends or /status\n",
        ),
    }
}
