//! A Kubernetes API server emulator for tests: a real HTTPS server on loopback that real clients
//! (kube-rs, `kubectl`) talk to over a socket, answering as kube-apiserver v1.32 does for what
//! ringlb uses. `testkit/kube-fixtures/` holds exchanges recorded from the real server (copied from
//! the project's shared `kube-fixtures`); `tests/apiserver_fixtures.rs` replays them against the
//! emulator, which is how it is kept faithful.
//!
//! What it serves: discovery and a minimal OpenAPI v3 (enough for `kubectl apply`'s server-side
//! field validation); Services (with `/status`), Endpoints, Namespaces (deleting one deletes what
//! is in it, as a cluster's namespace controller would), Events (core and `events.k8s.io`, one
//! object in two shapes), EndpointSlices, Leases, ServiceAccounts (with the TokenRequest API),
//! RBAC Roles, ClusterRoles and bindings (evaluated: an unbound user gets the real server's 403),
//! and MetalLB `IPAddressPool`s as a custom resource with its CRD's schema; list (resourceVersion
//! rules, `limit`/`continue`, label and field selectors, metadata-only), watch (ADDED, MODIFIED,
//! DELETED, BOOKMARK; selector enter/leave; `410 Gone` as an ERROR event once compacted), get,
//! create, update, merge/JSON/strategic patch, server-side apply (as a merge: field ownership is
//! not tracked), delete (with preconditions) and delete of a collection. Bodies are decoded as the
//! Go types are (a wrong type is a 400, an unknown field a `Warning` or, strict, a 400), then
//! defaulted and validated as the real server does (loopback endpoint addresses are a 422, as in
//! a cluster). Bearer tokens and client certificates authenticate; an unknown token is a 401.
//! Protobuf request bodies are refused (415): kubectl's `create namespace`-style generators send
//! them, `kubectl apply` does not. Test controls: [`ApiServer::stop`] and [`ApiServer::restart`]
//! on the same port and state, [`ApiServer::compact`] (resuming a watch from before answers 410),
//! [`ApiServer::cut_watches`]. [`ApiServer::start_also_on`] adds a listener made elsewhere (e.g.
//! inside a network namespace of a [`crate::lab`], which a socket keeps), so hosts that cannot
//! reach the test process's loopback reach the emulator too.
//!
//! ```no_run
//! let server = testkit::apiserver::ApiServer::start();
//! let kubeconfig = server.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"));
//! // kubectl --kubeconfig /tmp/kubeconfig create namespace shop
//! # let _ = kubeconfig;
//! ```

mod convert;
mod crd;
mod discovery;
mod handler;
mod openapi;
mod rbac;
mod reads;
mod resources;
mod schema;
mod selectors;
mod store;
mod strategic;
mod tls;
mod writes;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use tls::Pem;

use handler::Shared;
use rbac::Identity;
use resources::Installed;
use store::Store;

/// The token of the administrator every kubeconfig written by [`ApiServer::write_kubeconfig`] uses.
pub const ADMIN_TOKEN: &str = "ringlb-test-admin-token";

/// A running emulator; stops when dropped.
pub struct ApiServer {
    shared: Arc<Shared>,
    authority: Arc<tls::Authority>,
    addr: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

/// A listener besides the loopback one, and its address.
type Extra = (StdListener, SocketAddr);

impl ApiServer {
    /// Starts on a free port of 127.0.0.1 with the administrator token [`ADMIN_TOKEN`].
    pub fn start() -> ApiServer {
        ApiServer::start_with(Duration::from_secs(1800), Duration::from_secs(60))
    }

    /// [`ApiServer::start`] with a watch timeout (for watches without `timeoutSeconds`) and a
    /// bookmark interval of its own.
    pub fn start_with(watch_timeout: Duration, bookmark_interval: Duration) -> ApiServer {
        ApiServer::start_full(watch_timeout, bookmark_interval, None)
    }

    /// [`ApiServer::start`], also serving on `listener` (bound wherever the caller chose: a
    /// socket keeps the network namespace it was made in), whose IP the server's certificate
    /// names too. [`ApiServer::restart`] listens again on loopback only.
    pub fn start_also_on(listener: StdListener) -> ApiServer {
        let addr = listener.local_addr().expect("a bound listener");
        ApiServer::start_full(Duration::from_secs(1800), Duration::from_secs(60), Some((listener, addr)))
    }

    fn start_full(watch_timeout: Duration, bookmark_interval: Duration, extra: Option<Extra>) -> ApiServer {
        let admin = Identity::new("kubernetes-admin", &["system:masters"]);
        let tokens = HashMap::from([(ADMIN_TOKEN.to_owned(), admin)]);
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the emulator");
        let addr = listener.local_addr().expect("bound");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(addr.port())),
            addr,
            tokens: Mutex::new(tokens),
            watch_timeout,
            bookmark_interval,
            requests: Mutex::new(Vec::new()),
            installed: Mutex::new(Installed::all()),
        });
        let extra_ip = extra.as_ref().map(|(_, addr)| addr.ip().to_string());
        let authority = Arc::new(tls::Authority::new(extra_ip.as_deref()));
        let mut server = ApiServer { shared, authority, addr, running: None };
        let extra = extra.map(|(listener, _)| listener);
        server.serve(std::iter::once(listener).chain(extra).collect());
        server
    }

    fn serve(&mut self, listeners: Vec<StdListener>) {
        for listener in &listeners {
            listener.set_nonblocking(true).expect("non-blocking listener");
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let shared = Arc::clone(&self.shared);
        let acceptor = TlsAcceptor::from(self.authority.server_config());
        let thread = std::thread::Builder::new()
            .name("apiserver".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async move {
                    // One accepting task per listener, all feeding the one loop below.
                    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(16);
                    let mut accepting = tokio::task::JoinSet::new();
                    for listener in listeners {
                        let listener = TcpListener::from_std(listener).expect("tokio listener");
                        let accepted_tx = accepted_tx.clone();
                        accepting.spawn(async move {
                            loop {
                                if accepted_tx.send(listener.accept().await).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    drop(accepted_tx);
                    let mut connections = tokio::task::JoinSet::new();
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => break,
                            Some(accepted) = accepted_rx.recv() => {
                                let Ok((stream, _)) = accepted else { continue };
                                // As Go's net package does for every kube-apiserver connection: a
                                // watch writes one small chunk per event, which Nagle's algorithm
                                // would hold back for the client's delayed ACK (40 ms).
                                let _ = stream.set_nodelay(true);
                                let (acceptor, shared) = (acceptor.clone(), Arc::clone(&shared));
                                connections.spawn(async move {
                                    let Ok(tls) = acceptor.accept(stream).await else { return };
                                    let user = certificate_user(&tls);
                                    let service = service_fn(move |request| {
                                        let (shared, user) = (Arc::clone(&shared), user.clone());
                                        async move { Ok::<_, std::convert::Infallible>(handler::handle(shared, user, request).await) }
                                    });
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(tls), service)
                                        .await;
                                });
                            }
                        }
                    }
                    // Dropping the tasks closes every connection, watches included.
                    connections.abort_all();
                    // The listeners close with their tasks.
                    accepting.abort_all();
                    while accepting.join_next().await.is_some() {}
                });
            })
            .expect("spawn the emulator thread");
        self.running = Some(Running { stop, thread });
    }

    /// Installs the CustomResourceDefinitions of exactly these kinds (at start, every one the
    /// emulator knows is in): the others' groups and resources leave discovery and answer 404, as
    /// on a cluster without them. Their stored objects stay, as etcd keeps them for a CRD put back.
    pub fn install_only(&self, kinds: &[&str]) {
        *self.shared.installed.lock().expect("installed") = Installed::only(kinds);
    }

    /// Installs every CustomResourceDefinition the emulator knows again, as at start.
    pub fn install_all(&self) {
        *self.shared.installed.lock().expect("installed") = Installed::all();
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM) that signed the server's certificate.
    pub fn ca_pem(&self) -> String {
        self.authority.ca_pem.clone()
    }

    /// Accepts `token` as user `user` from now on. What the user may do is up to the RBAC objects
    /// stored (none: nothing); a `system:serviceaccount:<namespace>:<name>` user is that
    /// ServiceAccount, with its groups.
    pub fn add_token(&self, token: &str, user: &str) {
        self.add_token_in_groups(token, user, &[]);
    }

    /// [`ApiServer::add_token`] for a user in `groups` as well (`system:masters` may do anything).
    pub fn add_token_in_groups(&self, token: &str, user: &str, groups: &[&str]) {
        let identity = Identity::new(user, groups);
        self.shared.tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(token.to_owned(), identity);
    }

    /// A client certificate for `user` in `groups` (its subject's organisations, as the real server
    /// reads them), signed by the server's CA.
    pub fn client_certificate(&self, user: &str, groups: &[&str]) -> Pem {
        self.authority.issue(&[], user, groups, true).0
    }

    /// Writes a kubeconfig at `path` for the administrator (token, embedded CA) and returns `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> PathBuf {
        self.write_kubeconfig_with(path, json!({"token": ADMIN_TOKEN}))
    }

    /// Writes a kubeconfig whose user is `user` (e.g. `{"client-certificate-data": ...}`) with the
    /// CA embedded.
    pub fn write_kubeconfig_with(&self, path: &Path, user: Value) -> PathBuf {
        let config = self.kubeconfig(user);
        std::fs::write(path, serde_json::to_string_pretty(&config).expect("json"))
            .expect("write the kubeconfig");
        path.to_path_buf()
    }

    /// A kubeconfig for the administrator that reaches the server at `addr` (the address of a
    /// listener given to [`ApiServer::start_also_on`]).
    pub fn write_kubeconfig_at(&self, path: &Path, addr: SocketAddr) -> PathBuf {
        let config = self.kubeconfig_for(&format!("https://{addr}"), json!({"token": ADMIN_TOKEN}));
        std::fs::write(path, serde_json::to_string_pretty(&config).expect("json"))
            .expect("write the kubeconfig");
        path.to_path_buf()
    }

    fn kubeconfig(&self, user: Value) -> Value {
        self.kubeconfig_for(&self.url(), user)
    }

    fn kubeconfig_for(&self, url: &str, user: Value) -> Value {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": url, "certificate-authority-data": ca}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "user"}}],
            "current-context": "emulator",
        })
    }

    /// A client configuration for the administrator, as a kubeconfig written by
    /// [`ApiServer::write_kubeconfig`] gives it to kube-rs.
    pub async fn kube_config(&self) -> kube::Config {
        let text = serde_json::to_string(&self.kubeconfig(json!({"token": ADMIN_TOKEN}))).expect("json");
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).expect("a kubeconfig");
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .expect("a client configuration")
    }

    /// Stops listening and closes every connection (watches end); the state is kept.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
            let _ = running.thread.join();
        }
    }

    /// Listens again on the same address, with the same objects (after [`ApiServer::stop`]). As a
    /// restarted kube-apiserver, its new watch cache starts after the writes it made while
    /// starting: a watch resuming from before the restart answers 410 and the client must re-list.
    pub fn restart(&mut self) {
        self.stop();
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).restarted();
        let listener = bind_again(self.addr);
        self.serve(vec![listener]);
    }

    /// Forgets the event history: a watch that resumes from an older resourceVersion gets `410 Gone`
    /// (an ERROR event), as after etcd compaction.
    pub fn compact(&self) {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).compact();
    }

    /// Ends every open watch cleanly (as the real server does at a watch's timeout).
    pub fn cut_watches(&self) {
        let store = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        store.cut.send_modify(|n| *n += 1);
    }

    /// The current resourceVersion (etcd's revision).
    pub fn revision(&self) -> u64 {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).revision
    }

    /// Every request so far as `METHOD path?query`, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Who a verified client certificate names: its subject's common name and organisations.
fn certificate_user(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Option<Identity> {
    let certificate = tls.get_ref().1.peer_certificates()?.first()?;
    let der = certificate.as_ref();
    let user = subject_values(der, 0x03).into_iter().next()?;
    let groups = subject_values(der, 0x0a);
    Some(Identity::new(&user, &groups.iter().map(String::as_str).collect::<Vec<_>>()))
}

/// The string values of the subject attribute `2.5.4.<attribute>` of a DER certificate rcgen made
/// (the CN is `0x03`, an O `0x0a`). The issuer's name comes first in a certificate, and the CA
/// names only a CN, so the subject's values are every match but the issuer's CN.
fn subject_values(der: &[u8], attribute: u8) -> Vec<String> {
    let oid = [0x06, 0x03, 0x55, 0x04, attribute];
    let mut values: Vec<String> = der
        .windows(oid.len())
        .enumerate()
        .filter(|(_, w)| *w == oid)
        .filter_map(|(i, _)| {
            let at = i + oid.len();
            let (tag, length) = (*der.get(at)?, usize::from(*der.get(at + 1)?));
            if tag != 0x0c && tag != 0x13 {
                return None;
            }
            String::from_utf8(der.get(at + 2..at + 2 + length)?.to_vec()).ok()
        })
        .collect();
    if attribute == 0x03 && !values.is_empty() {
        values.remove(0);
    }
    values
}

fn bind_again(addr: SocketAddr) -> StdListener {
    for _ in 0..200 {
        if let Ok(listener) = StdListener::bind(addr) {
            return listener;
        }
        std::thread::sleep(Duration::from_millis(10)); // the old socket is being closed
    }
    panic!("cannot listen on {addr} again");
}
