//! End-to-end: Kubernetes promises the `ringlb` binary keeps, over real loopback sockets:
//! selector-less Services with core/v1 Endpoints, one address family per VIP, source ranges that
//! guard only load-balancer IPs, and a rejected Service edit that still follows its pods.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use support::{Ringlb, greeting, loopback, poll_until, port_free_on, save};
use testkit::backends::named_server_on;

/// The backend names of `count` connections through `vip`.
fn names(vip: SocketAddr, count: usize) -> BTreeSet<String> {
    (0..count).map(|_| greeting(vip).expect("connect through ringlb and read the greeting").0).collect()
}

/// Whether `vip` refuses a client (reset or refused) instead of serving it.
fn refused(vip: SocketAddr) -> bool {
    greeting(vip).is_err_and(|e| {
        matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused)
    })
}

fn start(file: &std::path::Path) -> Ringlb {
    let mut ringlb = Ringlb::start(&["run", "--manifests", file.to_str().expect("utf-8 path")]);
    ringlb.wait_ready();
    ringlb
}

#[test]
fn a_selector_less_service_is_served_from_its_endpoints_object() {
    let ips = [loopback(111), loopback(112), loopback(113)];
    let port = port_free_on(&ips);
    let _backends: Vec<_> = ips
        .iter()
        .zip(["legacy-0", "legacy-1", "legacy-2"])
        .map(|(ip, name)| named_server_on(SocketAddr::new(*ip, port), name).expect("backend"))
        .collect();
    let vip = SocketAddr::new(loopback(110), port_free_on(&[loopback(110)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("legacy.yaml");
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: legacy, namespace: default}}\nspec:\n  \
         externalIPs: [\"{}\"]\n  ports:\n  - {{name: http, port: {}, targetPort: {port}}}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {{name: legacy, namespace: default}}\nsubsets:\n\
         - addresses: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]\n  notReadyAddresses: [{{ip: \"{}\"}}]\n  \
         ports: [{{name: http, port: {port}}}]\n",
        vip.ip(),
        vip.port(),
        ips[0],
        ips[1],
        ips[2]
    );
    save(&file, &text);
    let ringlb = start(&file);
    let seen = names(vip, 12);
    assert_eq!(seen, BTreeSet::from(["legacy-0".into(), "legacy-1".into()]), "ready addresses only");
    assert!(ringlb.terminate().success());
}

#[test]
fn each_vip_family_is_served_by_the_endpoints_of_its_own_family() {
    let v4_backend = loopback(116);
    let v6_backend = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let port = port_free_on(&[v4_backend, v6_backend]);
    let _v4 = named_server_on(SocketAddr::new(v4_backend, port), "pod-v4").expect("IPv4 backend");
    let _v6 = named_server_on(SocketAddr::new(v6_backend, port), "pod-v6").expect("IPv6 backend");
    let vip_port = port_free_on(&[loopback(115), v6_backend]);
    let (vip4, vip6) = (SocketAddr::new(loopback(115), vip_port), SocketAddr::new(v6_backend, vip_port));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dual.yaml");
    let slice = |family: &str, suffix: &str, ip: IpAddr| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-{suffix}\n  \
             namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\n\
             ports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:\n- addresses: [\"{ip}\"]\n"
        )
    };
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
         externalIPs: [\"{}\", \"{}\"]\n  ports:\n  - {{name: http, port: {vip_port}}}\n{}{}",
        vip4.ip(),
        vip6.ip(),
        slice("IPv4", "v4", v4_backend),
        slice("IPv6", "v6", v6_backend)
    );
    save(&file, &text);
    let ringlb = start(&file);
    assert_eq!(names(vip4, 8), BTreeSet::from(["pod-v4".into()]), "an IPv4 VIP, IPv4 endpoints only");
    assert_eq!(names(vip6, 8), BTreeSet::from(["pod-v6".into()]), "an IPv6 VIP, IPv6 endpoints only");
    assert!(ringlb.terminate().success());
}

#[test]
fn source_ranges_refuse_outsiders_on_the_load_balancer_ip_but_not_on_external_ips() {
    let backend = SocketAddr::new(loopback(119), port_free_on(&[loopback(119)]));
    let _backend = named_server_on(backend, "web").expect("backend");
    let port = port_free_on(&[loopback(117), loopback(118)]);
    let (balanced, external) = (SocketAddr::new(loopback(117), port), SocketAddr::new(loopback(118), port));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ranged.yaml");
    // Test clients connect from 127.0.0.1, outside 10.0.0.0/8.
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  \
         type: LoadBalancer\n  externalIPs: [\"{}\"]\n  loadBalancerSourceRanges: [10.0.0.0/8]\n  \
         ports:\n  - {{name: http, port: {port}, targetPort: {}}}\nstatus:\n  loadBalancer:\n    \
         ingress: [{{ip: \"{}\"}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{name: http, port: {}, protocol: TCP}}]\nendpoints:\n\
         - addresses: [\"{}\"]\n",
        external.ip(),
        backend.port(),
        balanced.ip(),
        backend.port(),
        backend.ip()
    );
    save(&file, &text);
    let ringlb = start(&file);
    assert!(refused(balanced), "a client outside the ranges is refused on the load-balancer IP");
    assert_eq!(names(external, 4), BTreeSet::from(["web".into()]), "externalIPs are not filtered");
    assert!(ringlb.terminate().success());
}

#[test]
fn a_rejected_service_edit_keeps_its_policy_and_follows_its_rolled_pods() {
    let (old_ip, new_ip) = (loopback(121), loopback(122));
    let port = port_free_on(&[old_ip, new_ip]);
    let old = named_server_on(SocketAddr::new(old_ip, port), "old-pod").expect("backend");
    let _new = named_server_on(SocketAddr::new(new_ip, port), "new-pod").expect("backend");
    let vip = SocketAddr::new(loopback(120), port_free_on(&[loopback(120)]));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("web.yaml");
    let manifest = |scheduler: &str, pod: IpAddr| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n  annotations:\n    \
             ringlb.io/scheduler: {scheduler}\nspec:\n  externalIPs: [\"{}\"]\n  ports:\n  - \
             {{name: http, port: {}, targetPort: {port}}}\n---\napiVersion: discovery.k8s.io/v1\n\
             kind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: \
             {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {port}, \
             protocol: TCP}}]\nendpoints:\n- addresses: [\"{pod}\"]\n",
            vip.ip(),
            vip.port()
        )
    };
    save(&file, &manifest("lc", old_ip));
    let ringlb = start(&file);
    assert_eq!(names(vip, 3), BTreeSet::from(["old-pod".into()]));
    // A bad annotation in the same edit that rolls the pod: the Service is rejected...
    let loads = ringlb.status()["source"]["loads"].as_u64().expect("loads");
    save(&file, &manifest("fastest", new_ip));
    let status = poll_until("the edit to be loaded", || {
        let status = ringlb.status();
        (status["source"]["loads"].as_u64() > Some(loads)).then_some(status)
    });
    assert_eq!(status["source"]["rejected_objects"], 1, "{status}");
    // ...yet new connections follow the rolled pod, not the one that is gone.
    drop(old);
    assert_eq!(names(vip, 3), BTreeSet::from(["new-pod".into()]));
    assert!(ringlb.terminate().success());
}
