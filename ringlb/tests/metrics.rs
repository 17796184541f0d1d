//! `/metrics` and the admin API end to end: a real Prometheus (Debian's `prometheus`, on loopback)
//! scrapes `ringlb run` while clients connect through it, and its query API returns the
//! per-backend series; `promtool check metrics` finds no naming problem in what ringlb serves;
//! the alert rules of `deploy/prometheus/` pass `promtool check rules`, and one of them fires in
//! Prometheus when a backend is killed. `/snapshot` and `/backends` show the served table and why
//! a backend gets no connections. Every wait polls a real condition under a deadline.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::{
    Ringlb, greeting, http_get, http_get_response, loopback, poll_until, port_free_on, save, web_manifest,
};
use testkit::backends::Server;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/ringlb-rules.yaml");

/// A backend greeting every client with its name on one line.
fn backend(addr: SocketAddr, name: &'static str) -> Server {
    Server::spawn_on(addr, move |mut stream: TcpStream| {
        let _ = writeln!(stream, "{name}");
    })
    .expect("bind a backend")
}

/// A Prometheus server on loopback scraping `target` every second, with `rules` loaded; killed on
/// drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr, rules: &Path) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{rules:?}]\n\
                 scrape_configs:\n  - job_name: ringlb\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr = SocketAddr::new(loopback(1), port_free_on(&[loopback(1)]));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (Debian package `prometheus`; .ci/run installs it)");
        let prometheus = Prometheus { child, addr };
        poll_until("Prometheus to be ready", || {
            http_get(addr, "/-/ready").ok().filter(|(status, _)| *status == 200)
        });
        prometheus
    }

    /// `GET /api/v1/<path>?query=<query>` as JSON `data`.
    fn api(&self, path: &str, query: &str) -> serde_json::Value {
        let response = http_get_response(self.addr, &format!("/api/v1/{path}?query={}", encode(query)))
            .expect("query Prometheus");
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()["data"].clone()
    }

    /// The value of each series `query` returns, by the value of label `by`.
    fn values(&self, query: &str, by: &str) -> Vec<(String, f64)> {
        let data = self.api("query", query);
        let series = data["result"].as_array().cloned().unwrap_or_default();
        series
            .iter()
            .map(|s| {
                let label = s["metric"][by].as_str().unwrap_or_default().to_owned();
                let value = s["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                (label, value)
            })
            .collect()
    }

    /// The alerts firing now, as `(alertname, label value of `by`)`.
    fn firing(&self, by: &str) -> Vec<(String, String)> {
        let response = http_get_response(self.addr, "/api/v1/alerts").expect("alerts");
        let alerts = response.json()["data"]["alerts"].as_array().cloned().unwrap_or_default();
        alerts
            .iter()
            .filter(|alert| alert["state"] == "firing")
            .map(|alert| {
                let name = alert["labels"]["alertname"].as_str().unwrap_or_default().to_owned();
                (name, alert["labels"][by].as_str().unwrap_or_default().to_owned())
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `promtool <args>`, which must succeed (its output in the failure message).
fn promtool(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package `prometheus`)");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("feed promtool");
    }
    drop(input);
    let output = child.wait_with_output().expect("promtool ran");
    assert!(
        output.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn prometheus_scrapes_per_backend_series_and_a_killed_backend_fires_its_alert() {
    let ips = [loopback(121), loopback(122)];
    let port = port_free_on(&ips);
    let steady = backend(SocketAddr::new(ips[0], port), "web-1");
    let doomed = backend(SocketAddr::new(ips[1], port), "web-2");
    let vip = SocketAddr::new(loopback(120), port_free_on(&[loopback(120)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("manifest dir");
    save(&manifests.join("web.yaml"), &web_manifest(vip, port, &[(ips[0], true), (ips[1], true)]));
    let mut ringlb = Ringlb::start(&["run", "--manifests", manifests.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    // The rules as shipped, but firing as soon as their condition holds: a test cannot wait out
    // production `for:` periods.
    let shipped = std::fs::read_to_string(RULES).expect("the shipped rules");
    promtool(&["check", "rules", RULES], None);
    let rules = dir.path().join("rules.yaml");
    let immediate: String = shipped
        .lines()
        .map(|line| if line.trim_start().starts_with("for:") { "        for: 0s" } else { line })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&rules, immediate).expect("write the test rules");
    let prometheus = Prometheus::start(dir.path(), ringlb.admin, &rules);

    for _ in 0..20 {
        let (name, _) = greeting(vip).expect("a connection through ringlb");
        assert!(name.starts_with("web-"), "{name}");
    }
    let exposition = http_get(ringlb.admin, "/metrics").expect("GET /metrics").1;
    promtool(&["check", "metrics"], Some(&exposition));

    // Prometheus holds a series per backend whose counts add up to the connections made.
    let per_backend = poll_until("Prometheus to scrape all 20 connections", || {
        let series =
            prometheus.values("ringlb_connections_total{service=\"web\",protocol=\"tcp\"}", "backend");
        let total: f64 = series.iter().map(|(_, v)| v).sum();
        (total >= 20.0).then_some(series)
    });
    let mut backends: Vec<_> = per_backend.iter().map(|(backend, _)| backend.clone()).collect();
    backends.sort();
    assert_eq!(backends, [format!("{}:{port}", ips[0]), format!("{}:{port}", ips[1])]);
    let eligible = prometheus.values("ringlb_vip_eligible_backends{service=\"web\"}", "vip");
    assert_eq!(eligible, [(vip.ip().to_string(), 2.0)]);
    assert!(prometheus.firing("backend").is_empty(), "nothing fires while every backend serves");

    // The fault: web-2 dies; clients are still served (by retries on web-1), and the alert on
    // failing connects names web-2.
    drop(doomed);
    let dead = format!("{}:{port}", ips[1]);
    poll_until("RingLBBackendConnectFailures to fire for the killed backend", || {
        let (name, _) = greeting(vip).expect("served while a backend is down");
        assert_eq!(name, "web-1");
        prometheus
            .firing("backend")
            .into_iter()
            .find(|(alert, backend)| alert == "RingLBBackendConnectFailures" && *backend == dead)
    });
    let refused = prometheus.values(
        &format!("ringlb_backend_connect_errors_total{{backend=\"{dead}\",cause=\"refused\"}}"),
        "cause",
    );
    assert!(refused.iter().all(|(_, v)| *v >= 1.0) && !refused.is_empty(), "{refused:?}");
    drop(steady);
}

#[test]
fn the_admin_api_shows_the_table_and_why_a_backend_gets_no_connections() {
    let ips = [loopback(126), loopback(127)];
    let port = port_free_on(&ips);
    let _web = backend(SocketAddr::new(ips[0], port), "web-1");
    let vip = SocketAddr::new(loopback(125), port_free_on(&[loopback(125)]));
    let dir = tempfile::tempdir().expect("temp dir");
    save(&dir.path().join("web.yaml"), &web_manifest(vip, port, &[(ips[0], true), (ips[1], false)]));
    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    let snapshot = http_get_response(ringlb.admin, "/snapshot").expect("GET /snapshot");
    assert_eq!(snapshot.header("content-type"), Some("application/json"));
    let snapshot = snapshot.json();
    let entries = snapshot["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{snapshot}");
    assert_eq!(entries[0]["key"]["addr"], vip.ip().to_string());
    assert_eq!(entries[0]["key"]["port"], vip.port());

    let backends = http_get_response(ringlb.admin, "/backends").expect("GET /backends").json();
    let listed = backends["entries"][0]["backends"].as_array().expect("backends").clone();
    let states: Vec<_> = listed
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_owned(),
                b["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (format!("{}:{port}", ips[0]), "eligible".to_owned()),
            (format!("{}:{port}", ips[1]), "not_ready".to_owned())
        ]
    );

    // A held connection shows as active on its backend in /backends and /metrics.
    let (name, _held) = greeting(vip).expect("a connection through ringlb");
    assert_eq!(name, "web-1");
    poll_until("the held connection in /backends", || {
        let backends = http_get_response(ringlb.admin, "/backends").ok()?.json();
        (backends["entries"][0]["backends"][0]["active"] == 1).then_some(())
    });
    let openmetrics = http_get_response_with_accept(
        ringlb.admin,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    );
    assert!(openmetrics.starts_with("HTTP/1.1 200"), "{openmetrics}");
    assert!(
        openmetrics.to_ascii_lowercase().contains("content-type: application/openmetrics-text"),
        "{openmetrics}"
    );
    assert!(openmetrics.trim_end().ends_with("# EOF"));
    let active = format!(
        "ringlb_connections_active{{namespace=\"shop\",service=\"web\",vip=\"{}\",port=\"{}\",protocol=\"tcp\",backend=\"{}:{port}\"}} 1",
        vip.ip(),
        vip.port(),
        ips[0]
    );
    assert!(openmetrics.contains(&active), "{active} in {openmetrics}");

    // Read-only: anything but GET and HEAD is refused.
    let mut stream = TcpStream::connect(ringlb.admin).expect("admin");
    write!(stream, "POST /snapshot HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

/// The raw response to a GET with an `Accept` header.
fn http_get_response_with_accept(addr: SocketAddr, path: &str, accept: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("admin");
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\naccept: {accept}\r\nconnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
    answer
}
