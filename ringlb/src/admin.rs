//! The admin HTTP listener: `/healthz` (the process runs) and `/readyz` (the datapath serves the
//! first snapshot). Runs on the control thread's tokio runtime; never on a datapath worker.
//!
//! It listens on loopback unless the operator explicitly allows another address, because it will
//! expose internals (metrics, tables) that should not be reachable from the VIP side.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, bail};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Answers whether ringlb is ready to serve; implemented by the `run` wiring.
pub trait Readiness: Send + Sync + 'static {
    fn is_ready(&self) -> bool;
}

impl<F: Fn() -> bool + Send + Sync + 'static> Readiness for F {
    fn is_ready(&self) -> bool {
        self()
    }
}

/// Binds the admin listener, refusing a non-loopback address unless `allow_remote`.
pub async fn bind(addr: SocketAddr, allow_remote: bool) -> anyhow::Result<TcpListener> {
    if !addr.ip().is_loopback() && !allow_remote {
        bail!("admin address {addr} is not a loopback address; pass --admin-allow-remote to allow it");
    }
    TcpListener::bind(addr).await.with_context(|| format!("binding the admin listener on {addr}"))
}

/// Serves admin requests on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Arc<dyn Readiness>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                continue;
            }
        };
        let readiness = Arc::clone(&readiness);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let readiness = Arc::clone(&readiness);
                async move { Ok::<_, Infallible>(route(&request, readiness.as_ref())) }
            });
            if let Err(error) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn route(request: &Request<Incoming>, readiness: &dyn Readiness) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found; try /healthz or /readyz\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    response
}
