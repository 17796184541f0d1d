//! Chaos, bounded: each test keeps a few clients making requests through `ringlb run` while it
//! breaks something, then asserts what the clients saw. A backend killed with `kill -9` mid-stream;
//! endpoints of a Service churning every 10 ms; the manifest replaced by garbage; the API server
//! gone for longer than ringlb's Lease. Every wait polls a real condition under a deadline; sleeps
//! only pace the load and the churn.
//!
//! Where an older test proves a point without load it is named, not repeated:
//! `run_manifests::bad_edit_keeps_the_previous_table_serving` (each kind of rejection in
//! `/status`), `cluster::the_datapath_serves_through_an_api_outage_and_a_410_then_resyncs` (a 410
//! and a cut watch), `outlier::a_ready_backend_refusing_connections_is_ejected_then_tried_again_after_the_back_off`
//! (the back-off ending).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use support::backend_process::BackendProcess;
use support::cluster::{CLASS, Cluster, load_balancer, wait_reached};
use support::load::Load;
use support::{
    IO_TIMEOUT, Ringlb, greeting, http_get, http_get_response, loopback, poll_until, port_free_on, save,
    save_bytes, web_manifest,
};
use testkit::backends::named_server_on;

/// Load pacing: each client pauses this long between requests.
const PAUSE: Duration = Duration::from_millis(2);

/// One request to a `testkit` named server through `vip`: its greeting, then an echoed ping.
fn named_request(vip: SocketAddr) -> Result<String, String> {
    let (name, mut stream) = greeting(vip).map_err(|e| format!("connect or greeting: {e}"))?;
    stream.write_all(b"ping").map_err(|e| format!("{name}: write: {e}"))?;
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).map_err(|e| format!("{name}: echo: {e}"))?;
    if &echo != b"ping" {
        return Err(format!("{name}: echoed {echo:?}"));
    }
    Ok(name)
}

/// One ping of a [`BackendProcess`] through `vip`: its name, then its FIN.
fn process_ping(vip: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.write_all(b"p").map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).map_err(|e| format!("read {answer:?}: {e}"))?;
    answer.strip_suffix('\n').map(str::to_owned).ok_or_else(|| format!("answered {answer:?}"))
}

/// `text` (one of [`web_manifest`]'s) with `annotations` on its Service.
fn annotated(text: &str, annotations: &[(&str, &str)]) -> String {
    let lines: String = annotations.iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
    let service_head = "  namespace: shop\nspec:\n";
    assert!(text.contains(service_head), "a web_manifest Service");
    text.replacen(service_head, &format!("  namespace: shop\n  annotations:\n{lines}spec:\n"), 1)
}

/// The value of each `/metrics` sample of `family` labelled `backend="<backend>"`, summed.
fn backend_counter(ringlb: &Ringlb, family: &str, backend: SocketAddr) -> u64 {
    let (code, body) = http_get(ringlb.admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let label = format!("backend=\"{backend}\"");
    body.lines()
        .filter(|line| line.starts_with(&format!("{family}{{")) && line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The state `/backends` gives `backend` (of the first entry).
fn backend_state(ringlb: &Ringlb, backend: SocketAddr) -> String {
    let backends = http_get_response(ringlb.admin, "/backends").expect("GET /backends").json();
    let listed = backends["entries"][0]["backends"].as_array().cloned().unwrap_or_default();
    let mine = listed.iter().find(|b| b["address"] == backend.to_string());
    mine.and_then(|b| b["state"].as_str()).unwrap_or("absent").to_owned()
}

/// How a client's stream ended, and when.
#[derive(Debug)]
struct StreamEnd {
    backend: String,
    /// Whether the client had sent bytes the backend never read (so a kill resets it).
    unread: bool,
    received: Arc<AtomicU64>,
    end: std::thread::JoinHandle<(Instant, Result<(), ErrorKind>)>,
}

/// Opens a stream through `vip` and reads it on a thread until it ends (EOF is `Ok`).
fn open_stream(vip: SocketAddr, unread: bool) -> StreamEnd {
    let mut stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT).expect("connect through ringlb");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.write_all(if unread { b"s, then bytes nobody reads" } else { b"s" }).expect("write");
    let mut name = Vec::new();
    let mut byte = [0u8; 1];
    while byte != *b"\n" {
        stream.read_exact(&mut byte).expect("the backend's name");
        name.push(byte[0]);
    }
    let backend = String::from_utf8_lossy(&name).trim_end().to_owned();
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let end = std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return (Instant::now(), Ok(())),
                Ok(n) => counter.fetch_add(n as u64, Ordering::AcqRel),
                Err(e) => return (Instant::now(), Err(e.kind())),
            };
        }
    });
    StreamEnd { backend, unread, received, end }
}

#[test]
fn kill_9_of_a_backend_mid_stream_resets_its_clients_at_once_and_ejects_it_from_new_connections() {
    let ips = [loopback(161), loopback(162)];
    let port = port_free_on(&ips);
    let mut doomed = BackendProcess::start(SocketAddr::new(ips[0], port), "doomed");
    let stable = BackendProcess::start(SocketAddr::new(ips[1], port), "stable");
    let vip = SocketAddr::new(loopback(160), port_free_on(&[loopback(160)]));
    let dir = tempfile::tempdir().expect("temp dir");
    // One failure ejects, for longer than the test runs; 50 % of two backends lets one go.
    let outlier = [
        ("ringlb.io/outlier-consecutive-failures", "1"),
        ("ringlb.io/outlier-base-ejection", "60s"),
        ("ringlb.io/outlier-max-ejection", "60s"),
        ("ringlb.io/max-ejection-percent", "50"),
    ];
    let manifest = web_manifest(vip, port, &[(ips[0], true), (ips[1], true)]);
    save(&dir.path().join("web.yaml"), &annotated(&manifest, &outlier));
    let mut ringlb = Ringlb::start(&["run", "--manifests", dir.path().to_str().expect("utf-8 path")]);
    ringlb.wait_ready();

    // Streams on both backends; on the doomed one, two with bytes it never reads and two without.
    let mut streams: Vec<StreamEnd> = Vec::new();
    let count = |streams: &[StreamEnd], backend: &str, unread: bool| {
        streams.iter().filter(|s| s.backend == backend && s.unread == unread).count()
    };
    for i in 0.. {
        let on_stable = count(&streams, "stable", true) + count(&streams, "stable", false);
        if count(&streams, "doomed", true) >= 2 && count(&streams, "doomed", false) >= 2 && on_stable >= 1 {
            break;
        }
        assert!(i < 40, "round robin never put both kinds of stream on the doomed backend");
        streams.push(open_stream(vip, i % 4 < 2));
    }
    const CLIENTS: usize = 3;
    let load = Load::start(CLIENTS, PAUSE, move || process_ping(vip));
    poll_until("every stream to be well under way", || {
        streams.iter().all(|s| s.received.load(Ordering::Acquire) >= 64 * 1024).then_some(())
    });
    load.wait_made(100);

    let killed = Instant::now();
    doomed.kill();
    // Reaped: its sockets are closed now, not when the signal was sent.
    let dead = Instant::now();
    let (on_doomed, on_stable): (Vec<_>, Vec<_>) = streams.into_iter().partition(|s| s.backend == "doomed");
    for stream in on_doomed {
        let (ended, how) = stream.end.join().expect("a stream reader");
        let after = ended.duration_since(killed);
        eprintln!("doomed stream (unread bytes: {}) ended {after:?} after the kill: {how:?}", stream.unread);
        assert!(after < Duration::from_secs(1), "a client of the killed backend learnt it after {after:?}");
        // What the kernel did to the backend's socket is what ringlb passes on: a reset where the
        // backend left bytes unread, else the FIN, as a half-close (the client may still write).
        let expected = if stream.unread { Err(ErrorKind::ConnectionReset) } else { Ok(()) };
        assert_eq!(how, expected, "how a stream of the killed backend ended (unread: {})", stream.unread);
    }

    // "After the first failure": the first failure the datapath reports (a reset of one of those
    // streams, or a refused connect) ejects the backend, but the verdict takes a flush, a control
    // loop turn and a publish to reach every worker; connects started meanwhile may still try the
    // dead backend (each refused and retried on the other, unseen by the client). Once the
    // ejection is served, not one connect more goes to it.
    poll_until("the killed backend to be ejected", || {
        (backend_state(&ringlb, doomed.addr) == "ejected").then_some(())
    });
    let ejected_after = killed.elapsed();
    assert!(ejected_after < Duration::from_secs(1), "ejected only {ejected_after:?} after the kill");
    let errors = backend_counter(&ringlb, "ringlb_backend_connect_errors_total", doomed.addr);
    let connections = backend_counter(&ringlb, "ringlb_connections_total", doomed.addr);
    load.wait_made(300);
    assert_eq!(
        backend_counter(&ringlb, "ringlb_backend_connect_errors_total", doomed.addr),
        errors,
        "connects went to the ejected backend"
    );
    assert_eq!(backend_counter(&ringlb, "ringlb_connections_total", doomed.addr), connections);
    for stream in &on_stable {
        let before = stream.received.load(Ordering::Acquire);
        poll_until("a stream on the surviving backend to go on", || {
            (stream.received.load(Ordering::Acquire) >= before + 64 * 1024).then_some(())
        });
        assert!(!stream.end.is_finished(), "a stream on the surviving backend ended");
    }
    let tally = load.stop();
    eprintln!(
        "died {:?} after the signal; ejected {ejected_after:?} after it; {errors} connects refused by it \
         before; load {:?}; in flight and failed: {:?}",
        dead.duration_since(killed),
        tally.served,
        tally
            .failures
            .iter()
            .map(|f| (f.started.saturating_duration_since(killed), f.why.as_str()))
            .collect::<Vec<_>>()
    );
    // A ping in flight on the doomed backend while it died fails as its streams did; every ping
    // that started once it was dead is served.
    for failure in &tally.failures {
        assert!(failure.started < dead, "a ping started after the backend died failed: {failure:?}");
        assert!(failure.failed.duration_since(killed) < Duration::from_secs(1), "{failure:?}");
    }
    assert!(tally.failures.len() <= CLIENTS, "more pings failed than were in flight: {:?}", tally.failures);
    assert!(tally.served_by("stable") >= 400, "{:?}", tally.served);
    assert!(ringlb.terminate().success());
    drop(stable);
}

#[test]
fn endpoints_churning_every_10_ms_fail_no_request() {
    const CHURN: Duration = Duration::from_secs(3);
    const PERIOD: Duration = Duration::from_millis(10);
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.130.0/29"]);
    let names = ["stable-0", "stable-1", "churn-2", "churn-3"];
    let _pods: Vec<_> =
        names.iter().enumerate().map(|(pod, name)| cluster.backend(pod as u8, name)).collect();
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true), (1, true), (2, true), (3, true)]);
    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    let vip = SocketAddr::new(cluster.wait_ingress("web"), 80);
    wait_reached(vip, &names);

    let load = Load::start(4, PAUSE, move || named_request(vip));
    load.wait_made(50);
    let version =
        |ringlb: &Ringlb| ringlb.status()["snapshot"]["version"].as_u64().expect("snapshot version");
    let versions_before = version(&ringlb);

    // The churning pods cycle ready, not ready, gone, one step every PERIOD, through the API as
    // the EndpointSlice controller writes them: one merge patch of the slice's endpoints each.
    let endpoint = |pod: u8, ready: bool| serde_json::json!({"addresses": [cluster.pods.pod_ip(pod).to_string()], "conditions": {"ready": ready}});
    let stable = [endpoint(0, true), endpoint(1, true)];
    let steps: Vec<Vec<serde_json::Value>> = [Some(true), Some(false), None]
        .into_iter()
        .map(|churners| {
            let mut endpoints = stable.to_vec();
            if let Some(ready) = churners {
                endpoints.extend([endpoint(2, ready), endpoint(3, ready)]);
            }
            endpoints
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let (patches, elapsed) = runtime.block_on(async {
        let client = kube::Client::try_from(cluster.server.kube_config().await).expect("a client");
        let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "shop");
        let start = tokio::time::Instant::now();
        let mut patches = 0u32;
        while start.elapsed() < CHURN {
            let patch = serde_json::json!({"endpoints": steps[patches as usize % steps.len()]});
            slices
                .patch("web-abcde", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                .await
                .expect("patch the slice");
            patches += 1;
            // The period is the pacing of the churn, from its start (so a slow patch is caught up).
            tokio::time::sleep_until(start + PERIOD * patches).await;
        }
        (patches, start.elapsed())
    });
    let published = version(&ringlb) - versions_before;
    let tally = load.stop();
    let rate = f64::from(patches) / elapsed.as_secs_f64();
    eprintln!(
        "{patches} slice changes in {elapsed:?} ({rate:.0}/s), {published} tables published; load {:?}",
        tally.served
    );
    assert!(rate >= 80.0, "the churn ran at {rate:.0} changes/s, not one per 10 ms");
    assert!(published >= 10, "ringlb published only {published} tables during the churn");
    // The churning pods keep listening: a connection that reached one before it turned not ready
    // or left drains rather than failing; so not one request of any backend may fail.
    assert!(
        tally.failures.is_empty(),
        "{} of {} failed: {:?}",
        tally.failures.len(),
        tally.requests(),
        tally.failures
    );
    for name in names {
        assert!(tally.served_by(name) > 0, "{name} served nothing: {:?}", tally.served);
    }
    assert!(ringlb.is_running());
}

#[test]
fn a_manifest_replaced_by_garbage_keeps_the_last_good_table_serving() {
    let ips = [loopback(166), loopback(167)];
    let port = port_free_on(&ips);
    let _backends: Vec<_> = ips
        .iter()
        .zip(["web-1", "web-2"])
        .map(|(ip, name)| named_server_on(SocketAddr::new(*ip, port), name).expect("backend"))
        .collect();
    let vip = SocketAddr::new(loopback(165), port_free_on(&[loopback(165)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("web.yaml");
    let good = web_manifest(vip, port, &[(ips[0], true)]);
    save(&file, &good);
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    let load = Load::start(4, PAUSE, move || named_request(vip));
    load.wait_made(50);

    // Deterministic noise that is no UTF-8; a save cut inside a flow mapping; valid YAML that is
    // a Kubernetes object of no kind ringlb reads.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .chain([0xff, 0xfe])
        .collect();
    let cut = good.rfind("{ready: true}").expect("the endpoint's conditions") + "{rea".len();
    let truncated = good[..cut].to_owned();
    let wrong_kind =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: shop}\ndata: {a: b}\n";
    let garbage: [(&str, Vec<u8>); 3] = [
        ("random bytes", noise),
        ("truncated YAML", truncated.into_bytes()),
        ("a ConfigMap", wrong_kind.as_bytes().to_vec()),
    ];
    for (what, bytes) in garbage {
        let loads = ringlb.status()["source"]["loads"].as_u64().expect("loads");
        save_bytes(&file, &bytes);
        let status = poll_until(&format!("ringlb to load {what}"), || {
            let status = ringlb.status();
            (status["source"]["loads"].as_u64() > Some(loads)).then_some(status)
        });
        assert_eq!(status["source"]["inputs_rejected"], true, "{what} is rejected: {status}");
        assert_eq!(status["snapshot"]["version"], 1, "{what} publishes nothing: {status}");
        // Served on for a while with the garbage in place (the periodic re-read included).
        load.wait_made(200);
    }

    let _third = named_server_on(SocketAddr::new(loopback(168), port), "web-3").expect("backend");
    save(&file, &web_manifest(vip, port, &[(ips[0], true), (ips[1], true), (loopback(168), true)]));
    poll_until("the good edit to be published", || {
        (ringlb.status()["snapshot"]["version"] == 2).then_some(())
    });
    assert_eq!(ringlb.status()["source"]["inputs_rejected"], false);
    wait_reached(vip, &["web-1", "web-2", "web-3"]);
    let tally = load.stop();
    eprintln!("load through garbage: {:?}", tally.served);
    assert!(
        tally.failures.is_empty(),
        "{} of {} failed: {:?}",
        tally.failures.len(),
        tally.requests(),
        tally.failures
    );
    assert!(tally.served_by("web-1") >= 600, "the last good table served the load: {:?}", tally.served);
    assert!(ringlb.terminate().success());
}

#[test]
fn the_datapath_serves_every_request_through_an_api_outage_longer_than_the_lease_then_resyncs() {
    const OUTAGE: Duration = Duration::from_secs(4);
    let mut cluster = Cluster::start();
    cluster.pool("front", &["127.0.131.0/29"]);
    let _pods = [cluster.backend(0, "web-0"), cluster.backend(1, "web-1")];
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true)]);
    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    let vip = SocketAddr::new(cluster.wait_ingress("web"), 80);
    wait_reached(vip, &["web-0"]);
    let load = Load::start(4, PAUSE, move || named_request(vip));
    load.wait_made(50);

    // Longer than the 3 s Lease: the leader loses it meanwhile, which must not touch the datapath.
    cluster.server.stop();
    let down = Instant::now();
    let made = load.made();
    while down.elapsed() < OUTAGE {
        let (code, _) = http_get(ringlb.admin, "/readyz").expect("GET /readyz");
        assert_eq!(code, 200, "ready through the outage, {:?} in", down.elapsed());
        std::thread::sleep(Duration::from_millis(100)); // pacing of the checks
    }
    let during = load.made() - made;
    cluster.server.restart();
    cluster.endpoints("web", &[(0, true), (1, true)]);
    wait_reached(vip, &["web-0", "web-1"]);
    load.wait_made(100);
    let tally = load.stop();
    eprintln!("{during} requests during a {OUTAGE:?} outage; load {:?}", tally.served);
    assert!(during >= 200, "the load made only {during} requests during the outage");
    assert!(
        tally.failures.is_empty(),
        "{} of {} failed: {:?}",
        tally.failures.len(),
        tally.requests(),
        tally.failures
    );
    assert!(ringlb.is_running());
}
