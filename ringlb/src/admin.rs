//! The admin HTTP listener: `/healthz` (the process runs), `/readyz` (the datapath serves the first
//! snapshot) and `/status` (JSON: snapshot version, source state, per-worker counters). Runs on the
//! control thread's tokio runtime; never on a datapath worker.
//!
//! It listens on loopback unless the operator explicitly allows another address, because it will
//! expose internals (metrics, tables) that should not be reachable from the VIP side.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lb_core::LogThrottle;
use tokio::net::TcpListener;

use crate::cli::{AdminAddr, AdminArgs};

/// What the admin endpoints report; implemented by the serving wiring.
pub trait AdminState: Send + Sync + 'static {
    /// Whether the datapath serves the first snapshot.
    fn is_ready(&self) -> bool;
    /// The `/status` document.
    fn status(&self) -> serde_json::Value;
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

/// The first pause after a failed accept; each failure in a row doubles it up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves admin requests on `listener` until the task is dropped. A failing accept (out of
/// descriptors: the connection waits in the backlog) pauses accepting with a growing back-off
/// instead of retrying at once, and is logged at most once per interval.
pub async fn serve(listener: TcpListener, state: Arc<dyn AdminState>) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut warnings = LogThrottle::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(error) => {
                if let Some(held_back) = warnings.admit(Instant::now()) {
                    tracing::warn!(%error, held_back, ?backoff, "admin accept failed; pausing accepts");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&request, state.as_ref())) }
            });
            if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn route(request: &Request<Incoming>, state: &dyn AdminState) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/status" => {
            let mut body = serde_json::to_vec_pretty(&state.status()).unwrap_or_default();
            body.push(b'\n');
            respond(StatusCode::OK, "application/json", Bytes::from(body))
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz or /status\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain", Bytes::from_static(body.as_bytes()))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}
