//! ringlb as a cluster's load balancer: the `ringlb` binary against testkit's API server emulator,
//! the objects created, changed and deleted with kubectl as an operator would (see
//! `support::cluster`).
//!
//! Every wait polls a real condition (an API object, an answer from a VIP) under a deadline.

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use k8s_openapi::api::core::v1::Service;
use serde_json::Value;
use support::cluster::{CLASS, Cluster, load_balancer, reached, set, wait_reached};
use support::{Ringlb, greeting, poll_until};
use testkit::objects::{ServiceBuilder, TargetPort};

#[test]
fn a_load_balancer_gets_a_pool_address_with_ip_mode_proxy_and_serves_its_ready_pods() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.110.0/29"]);
    let _pods = [cluster.backend(0, "web-0"), cluster.backend(1, "web-1")];
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true), (1, true)]);

    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    let ip = cluster.wait_ingress("web");
    assert_eq!(ip.to_string(), "127.0.110.0", "the lowest address of the pool");
    let (note, instance) = cluster.wait_event("web", "IPAllocated");
    assert!(note.contains("127.0.110.0 (pool front)"), "{note}");
    assert_eq!(instance, "a");

    let vip = SocketAddr::new(ip, 80);
    wait_reached(vip, &["web-0", "web-1"]);

    // web-1 turns not ready through the API: new connections go to web-0 only, and come back.
    cluster.endpoints("web", &[(0, true), (1, false)]);
    wait_reached(vip, &["web-0"]);
    assert_eq!(reached(vip, 24), set(&["web-0"]), "a not-ready pod gets no new connection");
    cluster.endpoints("web", &[(0, true), (1, true)]);
    wait_reached(vip, &["web-0", "web-1"]);

    // Deleting the Service releases its address and stops serving it.
    cluster.kubectl.ok(&["delete", "service", "-n", "shop", "web"], None);
    poll_until("the deleted Service's VIP to stop answering", || greeting(vip).is_err().then_some(()));
    assert!(ringlb.is_running());
}

#[test]
fn services_of_another_class_or_without_a_class_are_untouched_unless_ringlb_is_the_default() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.111.0/29"]);
    let _pod = cluster.backend(0, "pod-0");
    for (name, class) in
        [("ours", Some(CLASS)), ("theirs", Some("example.com/other-lb")), ("classless", None)]
    {
        let service: Service = load_balancer(name, class, &[("http", 80)]).build();
        cluster.apply_json(&service);
        cluster.endpoints(name, &[(0, true)]);
    }
    let versions = [cluster.resource_version("theirs"), cluster.resource_version("classless")];

    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    // All three were listed before ringlb's first allocation, so its answer for them is in.
    let ours = cluster.wait_ingress("ours");
    wait_reached(SocketAddr::new(ours, 80), &["pod-0"]);
    assert_eq!(ringlb.status()["snapshot"]["entries"], 1, "only ringlb's Service is served");
    for (name, version) in ["theirs", "classless"].iter().zip(&versions) {
        assert!(cluster.ingress(name).is_empty(), "{name} gets no status");
        assert!(cluster.events(name).is_empty(), "{name} gets no Event: {:?}", cluster.events(name));
        assert_eq!(&cluster.resource_version(name), version, "{name} is never written to");
    }
    ringlb.terminate();

    // As the cluster's default implementation, the classless Service is ringlb's too.
    let mut ringlb = cluster.ringlb("a", &["--default-class"]);
    ringlb.wait_ready();
    let classless = cluster.wait_ingress("classless");
    assert_ne!(classless, ours);
    wait_reached(SocketAddr::new(classless, 80), &["pod-0"]);
    assert_eq!(cluster.ingress("ours")[0].0, ours.to_string(), "a restart moves no address");
    assert!(cluster.ingress("theirs").is_empty(), "another class stays untouched");
    assert_eq!(cluster.resource_version("theirs"), versions[0]);
}

#[test]
fn an_exhausted_pool_and_a_taken_or_foreign_request_give_events_and_no_status() {
    let cluster = Cluster::start();
    cluster.pool("single", &["127.0.112.7/32"]);
    let _pod = cluster.backend(0, "pod-0");
    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();

    let first: Service = load_balancer("first", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&first);
    assert_eq!(cluster.wait_ingress("first").to_string(), "127.0.112.7");

    let second: Service = load_balancer("second", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&second);
    let (note, _) = cluster.wait_event("second", "AddressPoolExhausted");
    assert!(note.contains("single"), "the Event names the pool: {note}");
    // What RingLBPoolExhausted alerts on, from the leader.
    ringlb.wait_metric("ringlb_leader{} 1");
    ringlb.wait_metric("ringlb_pool_addresses{pool=\"single\"} 1");
    ringlb.wait_metric("ringlb_pool_addresses_in_use{pool=\"single\"} 1");

    let taken: Service = load_balancer("taken", Some(CLASS), &[("http", 80)])
        .annotation("metallb.io/loadBalancerIPs", "127.0.112.7")
        .build();
    cluster.apply_json(&taken);
    let (note, _) = cluster.wait_event("taken", "RequestedIPTaken");
    assert!(note.contains("127.0.112.7") && note.contains("shop/first"), "{note}");

    let foreign: Service = load_balancer("foreign", Some(CLASS), &[("http", 80)])
        .annotation("metallb.universe.tf/loadBalancerIPs", "127.0.99.9")
        .build();
    cluster.apply_json(&foreign);
    cluster.wait_event("foreign", "RequestedIPNotInPool");
    for name in ["second", "taken", "foreign"] {
        assert!(cluster.ingress(name).is_empty(), "{name} gets no status");
    }

    // A pool that grows: the waiting Service gets the new address (pools are watched).
    cluster.pool("single", &["127.0.112.7/32", "127.0.112.8/32"]);
    assert_eq!(cluster.wait_ingress("second").to_string(), "127.0.112.8");
    ringlb.wait_metric("ringlb_pool_addresses{pool=\"single\"} 2");
    ringlb.wait_metric("ringlb_pool_addresses_in_use{pool=\"single\"} 2");
    cluster.endpoints("second", &[(0, true)]);
    wait_reached("127.0.112.8:80".parse().expect("literal"), &["pod-0"]);
    assert!(cluster.ingress("taken").is_empty(), "a taken request stays unallocated");
    assert!(ringlb.is_running());
}

#[test]
fn services_with_one_sharing_key_share_an_address_unless_their_ports_collide() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.113.0/30"]);
    let _pods = [cluster.backend(0, "web-0"), cluster.backend(1, "api-1")];
    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();

    // Different pods and ports, one key: one address, each port dispatched to its own pods.
    for (name, port, pod) in [("web", 80, 0), ("api", 8443, 1)] {
        let service: Service = load_balancer(name, Some(CLASS), &[("http", port)])
            .annotation("metallb.io/allow-shared-ip", "front-door")
            .external_traffic_policy(if name == "api" { "Local" } else { "Cluster" })
            .build();
        cluster.apply_json(&service);
        cluster.endpoints(name, &[(pod, true)]);
    }
    let web = cluster.wait_ingress("web");
    let api = cluster.wait_ingress("api");
    assert_eq!(web, api, "same key, disjoint ports: one address");
    wait_reached(SocketAddr::new(web, 80), &["web-0"]);
    wait_reached(SocketAddr::new(web, 8443), &["api-1"]);

    // Same key, but port 80 is web's: asked for web's address it is refused with an Event...
    let clash: Service = load_balancer("clash", Some(CLASS), &[("http", 80)])
        .annotation("metallb.io/allow-shared-ip", "front-door")
        .annotation("metallb.io/loadBalancerIPs", &web.to_string())
        .build();
    cluster.apply_json(&clash);
    let (note, _) = cluster.wait_event("clash", "RequestedIPTaken");
    assert!(note.contains("80"), "the Event says which port collides: {note}");
    assert!(cluster.ingress("clash").is_empty());

    // ...and without a request it gets an address of its own.
    let other: Service = load_balancer("other", Some(CLASS), &[("http", 80)])
        .annotation("metallb.io/allow-shared-ip", "front-door")
        .build();
    cluster.apply_json(&other);
    assert_ne!(cluster.wait_ingress("other"), web);
    assert_eq!(cluster.ingress("web")[0].0, web.to_string(), "the share is unchanged");
}

#[test]
fn a_restart_keeps_every_allocation() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.114.0/29"]);
    let _pod = cluster.backend(0, "pod-0");
    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    // Created in the reverse of name order: a planner that ignored the statuses would swap them.
    let mut addresses = Vec::new();
    for name in ["zeta", "alpha"] {
        let service: Service = load_balancer(name, Some(CLASS), &[("http", 80)]).build();
        cluster.apply_json(&service);
        cluster.endpoints(name, &[(0, true)]);
        addresses.push(cluster.wait_ingress(name));
    }
    assert_eq!(addresses[0].to_string(), "127.0.114.0");
    let versions = [cluster.resource_version("zeta"), cluster.resource_version("alpha")];
    ringlb.terminate();

    let mut ringlb = cluster.ringlb("b", &[]);
    ringlb.wait_ready();
    // Once a new Service is allocated, the restarted leader has planned over the old ones.
    let new: Service = load_balancer("new", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&new);
    let fresh = cluster.wait_ingress("new");
    assert!(!addresses.contains(&fresh));
    for ((name, address), version) in ["zeta", "alpha"].iter().zip(&addresses).zip(&versions) {
        assert_eq!(cluster.ingress(name)[0].0, address.to_string(), "{name} keeps its address");
        assert_eq!(&cluster.resource_version(name), version, "{name}'s status is not rewritten");
        wait_reached(SocketAddr::new(*address, 80), &["pod-0"]);
    }
}

#[test]
fn the_datapath_serves_through_an_api_outage_and_a_410_then_resyncs() {
    let mut cluster = Cluster::start();
    cluster.pool("front", &["127.0.115.0/29"]);
    let _pods = [cluster.backend(0, "web-0"), cluster.backend(1, "web-1")];
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true)]);
    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    let vip = SocketAddr::new(cluster.wait_ingress("web"), 80);
    wait_reached(vip, &["web-0"]);

    // The API server goes away: the last table keeps serving, and ringlb stays ready.
    cluster.server.stop();
    assert_eq!(reached(vip, 24), set(&["web-0"]), "served while the API server is down");
    let (code, _) = support::http_get(ringlb.admin, "/readyz").expect("GET /readyz");
    assert_eq!(code, 200, "an API outage does not make a serving ringlb unready");

    // It comes back on the same state, compacted: the watches resume into 410 Gone and relist.
    cluster.server.restart();
    cluster.endpoints("web", &[(0, true), (1, true)]);
    wait_reached(vip, &["web-0", "web-1"]);

    // A compaction with the watches cut while running: the same, without an outage.
    cluster.server.compact();
    cluster.server.cut_watches();
    cluster.endpoints("web", &[(1, true)]);
    wait_reached(vip, &["web-1"]);
    assert_eq!(cluster.ingress("web")[0].0, vip.ip().to_string(), "the address survives the resyncs");
    assert!(ringlb.is_running());
}

#[test]
fn of_two_replicas_one_leads_and_the_other_takes_over_when_it_dies() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.116.0/29"]);
    let _pods = [cluster.backend(0, "web-0"), cluster.backend(1, "api-1")];
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true)]);

    let mut replicas = [cluster.ringlb("a", &[]), cluster.ringlb("b", &[])];
    for replica in &mut replicas {
        replica.wait_ready();
    }
    let leading = |replica: &Ringlb| replica.status()["leader"] == true;
    let leader = poll_until("one replica to lead", || {
        let leaders: Vec<usize> = (0..2).filter(|&i| leading(&replicas[i])).collect();
        (leaders.len() == 1).then(|| leaders[0])
    });
    let identities = ["a", "b"];
    let vip = SocketAddr::new(cluster.wait_ingress("web"), 80);
    let (_, instance) = cluster.wait_event("web", "IPAllocated");
    assert_eq!(instance, identities[leader], "the leader allocates");
    // Both replicas serve the same table from their own watches.
    for replica in &replicas {
        poll_until("each replica to serve web", || {
            (replica.status()["snapshot"]["entries"] == 1).then_some(())
        });
    }
    wait_reached(vip, &["web-0"]);

    // The leader dies without giving the Lease up; the survivor takes over and serves on.
    let [first, second] = replicas;
    let (dead, mut survivor) = if leader == 0 { (first, second) } else { (second, first) };
    let died = Instant::now();
    dead.signal(libc::SIGKILL);
    drop(dead);
    poll_until("the survivor to lead", || leading(&survivor).then_some(()));
    eprintln!("takeover after the leader was killed: {:?} (lease 3 s)", died.elapsed());
    assert_eq!(reached(vip, 24), set(&["web-0"]), "the survivor serves on");

    let api: Service = load_balancer("api", Some(CLASS), &[("http", 8443)]).build();
    cluster.apply_json(&api);
    cluster.endpoints("api", &[(1, true)]);
    let api_ip = cluster.wait_ingress("api");
    let (_, instance) = cluster.wait_event("api", "IPAllocated");
    assert_eq!(instance, identities[1 - leader], "the new leader allocates");
    wait_reached(SocketAddr::new(api_ip, 8443), &["api-1"]);
    assert!(survivor.is_running());
}

/// `ringlb check --kubeconfig` (and the KUBECONFIG and ~/.kube/config rules) with every kind of
/// credentials and CA a kubeconfig carries; a wrong token is a clear error, not a table.
#[test]
fn every_kind_of_kubeconfig_reaches_the_cluster() {
    use base64::Engine as _;
    let cluster = Cluster::start();
    let _pod = cluster.backend(0, "pod-0");
    let service: Service = ServiceBuilder::new("shop", "legacy")
        .external_ips(["192.0.2.10"])
        .port("http", 80, "TCP", TargetPort::String("http".into()))
        .build();
    cluster.apply_json(&service);
    cluster.endpoints("legacy", &[(0, true)]);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("UTF-8").to_owned()
    };
    let server = &cluster.server;
    cluster.server.add_token_in_groups("reader-token", "reader", &["system:masters"]);
    let certificate = server.client_certificate("operator", &["system:masters"]);
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let kubeconfig = |name: &str, cluster_entry: Value, user: Value| {
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": cluster_entry}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        });
        file(name, &config.to_string())
    };
    let url = server.url();
    let embedded_ca = serde_json::json!({"server": url, "certificate-authority-data": b64(&server.ca_pem())});
    let file_ca =
        serde_json::json!({"server": url, "certificate-authority": file("ca.crt", &server.ca_pem())});
    let insecure = serde_json::json!({"server": url, "insecure-skip-tls-verify": true});
    let variants = [
        (
            "token, embedded CA",
            kubeconfig("token", embedded_ca.clone(), serde_json::json!({"token": "reader-token"})),
        ),
        (
            "embedded client certificate",
            kubeconfig(
                "cert-data",
                embedded_ca.clone(),
                serde_json::json!({
                    "client-certificate-data": b64(&certificate.certificate),
                    "client-key-data": b64(&certificate.key),
                }),
            ),
        ),
        (
            "client certificate, key and CA files",
            kubeconfig(
                "cert-files",
                file_ca,
                serde_json::json!({
                    "client-certificate": file("client.crt", &certificate.certificate),
                    "client-key": file("client.key", &certificate.key),
                }),
            ),
        ),
        (
            "insecure-skip-tls-verify",
            kubeconfig("insecure", insecure, serde_json::json!({"token": "reader-token"})),
        ),
    ];
    let check = |configure: &dyn Fn(&mut std::process::Command)| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ringlb"));
        command.args(["check", "--log-level", "error"]).env_remove("KUBECONFIG").env("HOME", dir.path());
        configure(&mut command);
        let output = command.output().expect("run ringlb check");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for (what, path) in &variants {
        let (ok, out, err) = check(&|command| {
            command.args(["--kubeconfig", path]);
        });
        assert!(ok && out.contains("192.0.2.10:80"), "{what}: ringlb check printed {out:?}, {err}");
    }
    // KUBECONFIG, then ~/.kube/config.
    let (ok, out, err) = check(&|command| {
        command.env("KUBECONFIG", &variants[0].1);
    });
    assert!(ok && out.contains("192.0.2.10:80"), "KUBECONFIG: {out:?} {err}");
    std::fs::create_dir_all(dir.path().join(".kube")).expect("mkdir");
    std::fs::copy(&variants[1].1, dir.path().join(".kube/config")).expect("copy");
    let (ok, out, err) = check(&|_| {});
    assert!(ok && out.contains("192.0.2.10:80"), "~/.kube/config: {out:?} {err}");

    let wrong = kubeconfig("wrong", embedded_ca, serde_json::json!({"token": "no-such-token"}));
    let (ok, out, err) = check(&|command| {
        command.args(["--kubeconfig", &wrong]);
    });
    assert!(!ok && out.is_empty(), "a refused token prints no table: {out:?}");
    assert!(err.contains("401") || err.contains("Unauthorized"), "the error says why: {err}");
}

/// When a Service stops being ringlb's (another class, or no longer a LoadBalancer), the leader
/// removes the status it wrote, says so in an Event, and the address stops being served.
#[test]
fn a_service_that_stops_being_ringlbs_loses_its_status_and_its_address() {
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.119.0/29"]);
    let _pod = cluster.backend(0, "pod-0");
    // As the default implementation, so the demoted Service needs no class (a class stays with
    // a Service while it is a LoadBalancer).
    let mut ringlb = cluster.ringlb("a", &["--default-class"]);
    ringlb.wait_ready();
    for (name, class) in [("moved", Some(CLASS)), ("demoted", None)] {
        let service: Service = load_balancer(name, class, &[("http", 80)]).build();
        cluster.apply_json(&service);
        cluster.endpoints(name, &[(0, true)]);
    }
    let moved = SocketAddr::new(cluster.wait_ingress("moved"), 80);
    let demoted = SocketAddr::new(cluster.wait_ingress("demoted"), 80);
    wait_reached(moved, &["pod-0"]);
    wait_reached(demoted, &["pod-0"]);

    // spec.loadBalancerClass is immutable: moving to another class is a delete and a create.
    cluster.kubectl.ok(&["delete", "service", "-n", "shop", "moved"], None);
    let elsewhere: Service = load_balancer("moved", Some("example.com/other-lb"), &[("http", 80)]).build();
    cluster.apply_json(&elsewhere);
    // A LoadBalancer turned into a ClusterIP Service.
    cluster.kubectl.ok(
        &[
            "patch",
            "service",
            "-n",
            "shop",
            "demoted",
            "--type=merge",
            "-p",
            r#"{"spec":{"type":"ClusterIP"}}"#,
        ],
        None,
    );
    poll_until("the demoted Service's status to be removed", || {
        cluster.ingress("demoted").is_empty().then_some(())
    });
    cluster.wait_event("demoted", "IPReleased");
    poll_until("both addresses to stop answering", || {
        (greeting(moved).is_err() && greeting(demoted).is_err()).then_some(())
    });
    assert!(cluster.ingress("moved").is_empty(), "a Service of another class is never written to");
    assert!(ringlb.is_running());
}

/// `/readyz` says ready only once the initial lists are in and published: with the API server
/// unreachable at start, ringlb runs but is not ready; once it answers, ringlb becomes ready and
/// serves.
#[test]
fn ringlb_is_not_ready_until_the_initial_lists_are_in() {
    let mut cluster = Cluster::start();
    cluster.pool("front", &["127.0.120.0/29"]);
    let _pod = cluster.backend(0, "pod-0");
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true)]);
    cluster.server.stop();

    let mut ringlb = cluster.ringlb("a", &[]);
    // Not ready while the lists cannot be made (the process is up: its admin endpoint answers).
    let (code, _) =
        poll_until("the admin endpoint to answer", || support::http_get(ringlb.admin, "/readyz").ok());
    assert_eq!(code, 503, "no lists yet: not ready");
    assert!(ringlb.is_running());

    cluster.server.restart();
    ringlb.wait_ready();
    let vip = SocketAddr::new(cluster.wait_ingress("web"), 80);
    wait_reached(vip, &["pod-0"]);
}

#[test]
fn a_clusters_first_allocation_writes_each_status_once() {
    const SERVICES: usize = 300;
    let cluster = Cluster::start();
    cluster.pool("front", &["127.0.124.0/23"]);
    let items: Vec<Service> = (0..SERVICES)
        .map(|i| load_balancer(&format!("svc-{i}"), Some(CLASS), &[("http", 80)]).build())
        .collect();
    // One kubectl apply: a stream of JSON objects.
    let documents: Vec<String> =
        items.iter().map(|s| serde_json::to_string(s).expect("serialises")).collect();
    cluster.kubectl.apply(&documents.join("\n"));

    let mut ringlb = cluster.ringlb("a", &[]);
    ringlb.wait_ready();
    let allocated = || {
        let services = cluster.kubectl.json(&["get", "services", "-n", "shop"]);
        let items = services["items"].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .filter(|s| s["status"]["loadBalancer"]["ingress"].as_array().is_some_and(|i| !i.is_empty()))
            .count()
    };
    poll_until("every Service to get an address", || (allocated() == SERVICES).then_some(()));
    // One more Service after all the others came back through the watch: its write follows
    // every round the earlier ones could have caused.
    cluster.apply_json(&load_balancer("last", Some(CLASS), &[("http", 80)]).build());
    cluster.wait_ingress("last");
    let writes = cluster
        .server
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH /api/v1/namespaces/shop/services/") && r.contains("/status"))
        .count();
    assert_eq!(writes, SERVICES + 1, "each status is written once, not again while its event is on the way");
    assert!(ringlb.is_running());
}

/// A cluster without MetalLB's CRDs: the pool watch answers 404, ringlb's warning names the kind
/// and where its CustomResourceDefinition comes from, and it stays not ready (the first complete
/// view waits for every kind); once the CRDs are installed it lists them, becomes ready and serves.
#[test]
fn a_missing_custom_resource_definition_is_named_and_waited_for() {
    let cluster = Cluster::start();
    cluster.server.install_only(&[]);
    let log = tempfile::NamedTempFile::new().expect("a log file");
    let stderr = log.reopen().expect("the log file");
    let kubeconfig = cluster.kubectl.kubeconfig().to_str().expect("a UTF-8 path").to_owned();
    let args = ["run", "--kubeconfig", &kubeconfig, "--identity", "a", "--lease-duration", "3s"];
    let mut ringlb = Ringlb::start_with(&args, |command| {
        command.stderr(stderr);
    });
    let warning = poll_until("the warning about the missing pool CRD", || {
        let text = std::fs::read_to_string(log.path()).ok()?;
        text.lines()
            .find(|line| line.contains("the API server has no IPAddressPool resource"))
            .map(str::to_owned)
    });
    assert!(warning.contains("deploy/kubernetes/base/"), "{warning}");
    let (code, _) = support::http_get(ringlb.admin, "/readyz").expect("GET /readyz");
    assert_eq!(code, 503, "a kind it watches cannot be listed: not ready");

    cluster.server.install_all();
    ringlb.wait_ready();
    cluster.pool("front", &["127.0.118.0/29"]);
    let _pod = cluster.backend(0, "pod-0");
    cluster.apply_json(&load_balancer("web", Some(CLASS), &[("http", 80)]).build());
    cluster.endpoints("web", &[(0, true)]);
    wait_reached(SocketAddr::new(cluster.wait_ingress("web"), 80), &["pod-0"]);
}
