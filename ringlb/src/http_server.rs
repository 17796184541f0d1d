//! The one accept loop behind ringlb's small HTTP/1 listeners (admin, node health, health-check
//! node ports), all on the control thread's tokio runtime, never on a datapath worker.
//!
//! Invariants: an answer is a pure function of the request and shared state read at that moment
//! (no body is read, nothing is written); a failing accept (out of descriptors: the connection
//! waits in the backlog) pauses accepting with a growing back-off instead of spinning, logged at
//! most once per interval; a listener's connections live in its own task set, so dropping (or
//! aborting) [`serve`] closes the listener and every connection it accepted; the optional
//! [`ConnectionLimit`] bounds the descriptors remote clients can hold open (a connection beyond it
//! is closed at once), and a client gets [`HEADER_READ_TIMEOUT`] to send its request headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lb_core::LogThrottle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// An HTTP answer, as every responder builds it.
pub type Answer = Response<Full<Bytes>>;

/// The first pause after a failed accept; each failure in a row doubles it up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a client may take to send its request headers; a slow or silent one is disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open at once over the listeners that share it; one beyond is closed at accept.
#[derive(Clone)]
pub struct ConnectionLimit(Arc<Semaphore>);

impl ConnectionLimit {
    pub fn new(connections: usize) -> ConnectionLimit {
        ConnectionLimit(Arc::new(Semaphore::new(connections)))
    }
}

/// Serves `listener` (named `name` in logs) with `respond` until the returned future is dropped.
pub async fn serve<R>(listener: TcpListener, name: &'static str, limit: Option<ConnectionLimit>, respond: R)
where
    R: Fn(&Request<Incoming>) -> Answer + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut warnings = LogThrottle::default();
    let mut over_limit = LogThrottle::default();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set does not grow with every one ever served.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                stream
            }
            Err(error) => {
                if let Some(held_back) = warnings.admit(Instant::now()) {
                    tracing::warn!(%error, held_back, ?backoff, listener = name, "accept failed; pausing accepts");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let permit = match &limit {
            None => None,
            Some(ConnectionLimit(semaphore)) => match Arc::clone(semaphore).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    if let Some(held_back) = over_limit.admit(Instant::now()) {
                        tracing::warn!(
                            held_back,
                            listener = name,
                            "too many HTTP connections; closing a new one"
                        );
                    }
                    continue;
                }
            },
        };
        let respond = Arc::clone(&respond);
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let answer = respond(&request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, listener = name, "HTTP connection ended with an error");
            }
        });
    }
}

/// An answer with `status`, `content_type` and `body`.
pub fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Answer {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

/// A `text/plain` answer.
pub fn text(status: StatusCode, body: &'static str) -> Answer {
    respond(status, "text/plain", Bytes::from_static(body.as_bytes()))
}
