//! A cluster for the binary's tests: testkit's API server emulator with the namespaces ringlb
//! uses, kubectl as its operator, and a pod network (an API server refuses loopback endpoint
//! addresses); VIPs come from pools on 127.0.x.0, which ringlb serves on loopback.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use testkit::apiserver::ApiServer;
use testkit::backends::{Server, named_server_on};
use testkit::kubectl::Kubectl;
use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};
use testkit::pods::PodNetwork;

use super::{Ringlb, greeting, poll_until};

pub const CLASS: &str = "ringlb.io/lb";
pub const POD_PORT: u16 = 8080;
const NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: metallb-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: ringlb-system}
";

/// An emulated cluster with the namespaces ringlb uses, an operator, and a pod network.
pub struct Cluster {
    pub server: ApiServer,
    pub kubectl: Kubectl,
    pub pods: PodNetwork,
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::on(ApiServer::start())
    }

    /// [`Cluster::start`] on a server started otherwise (e.g. one a lab's hosts reach).
    pub fn on(server: ApiServer) -> Cluster {
        let kubectl = Kubectl::for_server(&server);
        kubectl.apply(NAMESPACES);
        let pods = PodNetwork::create().expect("a pod network");
        Cluster { server, kubectl, pods }
    }

    /// `ringlb run` against the cluster as `identity`, with a short Lease so failover is quick.
    pub fn ringlb(&self, identity: &str, extra: &[&str]) -> Ringlb {
        self.ringlb_with(self.kubectl.kubeconfig(), identity, extra)
    }

    pub fn ringlb_with(&self, kubeconfig: &Path, identity: &str, extra: &[&str]) -> Ringlb {
        let kubeconfig = kubeconfig.to_str().expect("a UTF-8 path");
        let mut args =
            vec!["run", "--kubeconfig", kubeconfig, "--identity", identity, "--lease-duration", "3s"];
        args.extend_from_slice(extra);
        Ringlb::start(&args)
    }

    pub fn apply_json(&self, object: &impl serde::Serialize) {
        self.kubectl.apply(&serde_json::to_string(object).expect("serialises"));
    }

    pub fn pool(&self, name: &str, addresses: &[&str]) {
        let addresses: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
        self.kubectl.apply(&format!(
            "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: {name}, namespace: metallb-system}}\n\
             spec:\n  addresses: [{}]\n",
            addresses.join(", ")
        ));
    }

    /// An `L2Advertisement` in the pool namespace with `spec` (JSON), as a MetalLB user writes it.
    pub fn l2_advertisement(&self, name: &str, spec: serde_json::Value) {
        let object = serde_json::json!({
            "apiVersion": "metallb.io/v1beta1", "kind": "L2Advertisement",
            "metadata": {"name": name, "namespace": "metallb-system"}, "spec": spec,
        });
        self.apply_json(&object);
    }

    /// A Node `name` with `labels` (what advertisements' node selectors match).
    pub fn node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, serde_json::Value> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect();
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
        });
        self.apply_json(&object);
    }

    /// A named backend (it greets with `name`) at pod `pod`'s address, inside the pod network.
    pub fn backend(&self, pod: u8, name: &str) -> Server {
        let addr = SocketAddr::new(self.pods.pod_ip(pod), POD_PORT);
        self.pods.enter(|| named_server_on(addr, name)).expect("a backend in the pod network")
    }

    /// Applies `service`'s EndpointSlice: pods `(n, ready)` on the pod port named `http`.
    pub fn endpoints(&self, service: &str, pods: &[(u8, bool)]) {
        self.apply_slice(service, pods.iter().map(|&(pod, ready)| (pod, ready, None)));
    }

    /// [`Cluster::endpoints`] of pods `(n, ready, node)`, each on its node (as the EndpointSlice
    /// controller writes `nodeName`, with the pod as `targetRef`).
    pub fn endpoints_on_nodes(&self, service: &str, pods: &[(u8, bool, &str)]) {
        self.apply_slice(service, pods.iter().map(|&(pod, ready, node)| (pod, ready, Some(node))));
    }

    fn apply_slice<'a>(&self, service: &str, pods: impl Iterator<Item = (u8, bool, Option<&'a str>)>) {
        let slice = SliceBuilder::new("shop", &format!("{service}-abcde"), service).port(
            "http",
            POD_PORT.into(),
            "TCP",
        );
        let slice = pods.fold(slice, |slice, (pod, ready, node)| {
            let conditions = if ready { Cond::ready() } else { Cond::not_ready() };
            let ip = self.pods.pod_ip(pod).to_string();
            match node {
                Some(node) => slice.pod_endpoint(&ip, conditions, node, &format!("{service}-{pod}")),
                None => slice.endpoint(&ip, conditions),
            }
        });
        let slice: EndpointSlice = slice.build();
        self.apply_json(&slice);
    }

    pub fn service(&self, name: &str) -> Value {
        self.kubectl.json(&["get", "service", "-n", "shop", name])
    }

    /// `status.loadBalancer.ingress` as (ip, ipMode) pairs.
    pub fn ingress(&self, name: &str) -> Vec<(String, String)> {
        let service = self.service(name);
        let ingress = service["status"]["loadBalancer"]["ingress"].as_array().cloned().unwrap_or_default();
        ingress
            .iter()
            .map(|i| {
                (i["ip"].as_str().unwrap_or("").to_owned(), i["ipMode"].as_str().unwrap_or("").to_owned())
            })
            .collect()
    }

    /// Waits for `name`'s first ingress address; asserts it is written with `ipMode: Proxy`.
    pub fn wait_ingress(&self, name: &str) -> IpAddr {
        let ingress = poll_until(&format!("shop/{name} to get an address"), || {
            let ingress = self.ingress(name);
            (!ingress.is_empty()).then_some(ingress)
        });
        assert!(
            ingress.iter().all(|(_, mode)| mode == "Proxy"),
            "ipMode Proxy on every address: {ingress:?}"
        );
        ingress[0].0.parse().expect("an IP address")
    }

    /// The (reason, note, reportingInstance) of the events.k8s.io Events regarding `shop/<name>`.
    pub fn events(&self, name: &str) -> Vec<(String, String, String)> {
        let list = self.kubectl.json(&["get", "events.events.k8s.io", "-n", "shop"]);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .filter(|event| event["regarding"]["name"] == name && event["regarding"]["kind"] == "Service")
            .map(|event| {
                let text = |field: &str| event[field].as_str().unwrap_or("").to_owned();
                (text("reason"), text("note"), text("reportingInstance"))
            })
            .collect()
    }

    /// Waits for an Event with `reason` on `shop/<name>`; its note and reporting instance.
    pub fn wait_event(&self, name: &str, reason: &str) -> (String, String) {
        poll_until(&format!("a {reason} Event on shop/{name}"), || {
            self.events(name)
                .into_iter()
                .find(|(r, _, _)| r == reason)
                .map(|(_, note, instance)| (note, instance))
        })
    }

    pub fn resource_version(&self, name: &str) -> String {
        self.service(name)["metadata"]["resourceVersion"].as_str().expect("a resourceVersion").to_owned()
    }
}

/// A LoadBalancer Service of `class` in `shop` with TCP ports `(name, port)` to the pods' `http`.
pub fn load_balancer(name: &str, class: Option<&str>, ports: &[(&str, i32)]) -> ServiceBuilder {
    let service = ServiceBuilder::new("shop", name).service_type("LoadBalancer");
    let service = match class {
        Some(class) => service.load_balancer_class(class),
        None => service,
    };
    ports.iter().fold(service, |service, (port_name, port)| {
        service.port(port_name, *port, "TCP", TargetPort::String("http".into()))
    })
}

/// The greetings of `count` new connections to `vip` (empty if any connection fails).
pub fn reached(vip: SocketAddr, count: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for _ in 0..count {
        match greeting(vip) {
            Ok((name, _)) => names.insert(name),
            Err(_) => return BTreeSet::new(),
        };
    }
    names
}

pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

pub fn wait_reached(vip: SocketAddr, names: &[&str]) {
    let expected = set(names);
    poll_until(&format!("new connections to {vip} to reach exactly {names:?}"), || {
        (reached(vip, 12) == expected).then_some(())
    });
}
