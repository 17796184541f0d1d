//! Whether this node serves, as external load balancers ask it (kube-proxy's contract): the node
//! health server of `--healthz-bind-address` (`GET /healthz`, `/livez`) and the verdict the
//! health-check node ports add to their own (see `service_health`).
//!
//! The node is healthy from the first published snapshot on, while every datapath worker runs,
//! until the first shutdown signal: from then on (the whole grace period, while established
//! connections drain) every answer is 503, so balancers move new traffic elsewhere before the
//! listeners are gone. It never blinks while workers catch up with a new table.
//!
//! Unlike the admin listener this one is meant to be reachable remotely, so it exposes nothing but
//! that verdict and two times, answers only GET and HEAD, and caps its connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};
use k8s_openapi::jiff::Timestamp;
use lb_datapath::Engine;
use serde_json::json;

use crate::http_server::{self, Answer, ConnectionLimit, respond, text};

/// This node's health; shared by the snapshot sink (which records publications), the shutdown
/// path (which starts the drain) and the health servers (which read it per request).
pub struct NodeHealth {
    engine: Arc<Engine>,
    /// Unix time in nanoseconds of the last published snapshot; 0 before the first.
    last_published: AtomicI64,
    draining: AtomicBool,
}

impl NodeHealth {
    pub fn new(engine: Arc<Engine>) -> NodeHealth {
        NodeHealth { engine, last_published: AtomicI64::new(0), draining: AtomicBool::new(false) }
    }

    /// A snapshot was handed to the datapath.
    pub fn published(&self) {
        let now = i64::try_from(Timestamp::now().as_nanosecond()).unwrap_or(i64::MAX);
        self.last_published.store(now.max(1), Ordering::Release);
    }

    /// Whether any snapshot was published yet.
    pub fn has_published(&self) -> bool {
        self.last_published.load(Ordering::Acquire) != 0
    }

    /// The first shutdown signal arrived: unhealthy from now on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Serving: a snapshot was published, no worker failed, no shutdown began.
    pub fn is_healthy(&self) -> bool {
        self.has_published() && !self.draining.load(Ordering::Acquire) && self.engine.is_serving()
    }

    fn last_published_at(&self) -> Option<Timestamp> {
        match self.last_published.load(Ordering::Acquire) {
            0 => None,
            nanos => Timestamp::from_nanosecond(nanos.into()).ok(),
        }
    }
}

/// Connections the node health server keeps open at once (probes are short; anything beyond is
/// someone holding them open).
const MAX_CONNECTIONS: usize = 64;

/// Serves `/healthz` and `/livez` on `listener` until dropped.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<NodeHealth>) {
    let limit = ConnectionLimit::new(MAX_CONNECTIONS);
    http_server::serve(listener, "node health", Some(limit), move |request| route(request, &health)).await;
}

fn route(request: &Request<Incoming>, health: &NodeHealth) -> Answer {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    match request.uri().path() {
        "/healthz" | "/livez" => {
            node_answer(health.is_healthy(), health.last_published_at(), Timestamp::now())
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /healthz or /livez\n"),
    }
}

/// kube-proxy's `/healthz` answer: 200 or 503, `Content-Type: application/json` with
/// `X-Content-Type-Options: nosniff`, and `{"lastUpdated", "currentTime", "nodeHealthy",
/// "nodeEligible"}`. kube-proxy 1.28 named the verdict `nodeHealthy`, later releases
/// `nodeEligible`; both are written so a probe written against either reads it. As kube-proxy
/// does for compatibility, a healthy answer reports `lastUpdated` as now; an unhealthy one the
/// time of the last published snapshot (Go's zero time before the first).
pub fn node_answer(healthy: bool, last_published: Option<Timestamp>, now: Timestamp) -> Answer {
    let last_updated = if healthy { Some(now) } else { last_published };
    let body = json!({
        "lastUpdated": go_time(last_updated),
        "currentTime": go_time(Some(now)),
        "nodeHealthy": healthy,
        "nodeEligible": healthy,
    });
    json_answer(if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, &body)
}

/// A JSON answer with kube-proxy's headers.
pub fn json_answer(status: StatusCode, body: &serde_json::Value) -> Answer {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let mut answer = respond(status, "application/json", Bytes::from(body));
    answer.headers_mut().insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    answer
}

/// A time as Go prints a `time.Time` (what kube-proxy's `%q` writes): `2006-01-02 15:04:05.999999999
/// +0000 UTC`, in UTC, trailing zeros of the fraction trimmed; `None` is Go's zero time.
fn go_time(time: Option<Timestamp>) -> String {
    match time {
        Some(time) => time.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        None => "0001-01-01 00:00:00 +0000 UTC".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn body(answer: Answer) -> serde_json::Value {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let bytes = runtime.block_on(answer.into_body().collect()).expect("a full body").to_bytes();
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[test]
    fn go_time_matches_what_kube_proxy_prints() {
        let time: Timestamp = "2026-12-02T03:10:58.1234Z".parse().expect("timestamp");
        assert_eq!(go_time(Some(time)), "2026-12-02 03:10:58.1234 +0000 UTC");
        let whole: Timestamp = "2026-12-02T03:10:58Z".parse().expect("timestamp");
        assert_eq!(go_time(Some(whole)), "2026-12-02 03:10:58 +0000 UTC");
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
    }

    #[test]
    fn an_unhealthy_node_answers_503_with_the_last_publication() {
        let now: Timestamp = "2026-12-02T03:11:00Z".parse().expect("timestamp");
        let published: Timestamp = "2026-12-02T03:10:00Z".parse().expect("timestamp");
        let healthy = node_answer(true, Some(published), now);
        assert_eq!(healthy.status(), StatusCode::OK);
        assert_eq!(healthy.headers()["x-content-type-options"], "nosniff");
        assert_eq!(healthy.headers()["content-type"], "application/json");
        let healthy = body(healthy);
        assert_eq!(healthy["lastUpdated"], healthy["currentTime"], "kube-proxy's compatibility rule");
        assert_eq!(healthy["nodeHealthy"], true);

        let draining = node_answer(false, Some(published), now);
        assert_eq!(draining.status(), StatusCode::SERVICE_UNAVAILABLE);
        let draining = body(draining);
        assert_eq!(draining["lastUpdated"], "2026-12-02 03:10:00 +0000 UTC");
        assert_eq!((&draining["nodeHealthy"], &draining["nodeEligible"]), (&json!(false), &json!(false)));
        assert_eq!(body(node_answer(false, None, now))["lastUpdated"], "0001-01-01 00:00:00 +0000 UTC");
    }
}
