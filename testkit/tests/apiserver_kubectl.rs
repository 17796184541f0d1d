//! `kubectl` (v1.32) against the emulator, as an operator drives a cluster: apply, get, label,
//! patch, delete, RBAC-limited users. What kubectl needs of a server (discovery, OpenAPI v3 for
//! server-side field validation, strategic merge patches) is what this exercises.

use testkit::apiserver::ApiServer;
use testkit::kubectl::Kubectl;

const SHOP: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

#[test]
fn an_operator_applies_changes_and_deletes_with_kubectl() {
    let server = ApiServer::start();
    let kubectl = Kubectl::for_server(&server);
    let out = kubectl.ok(&["apply", "-f", "-"], Some(SHOP));
    assert!(out.contains("namespace/shop created") && out.contains("service/web created"), "{out}");
    let web = kubectl.json(&["get", "svc", "-n", "shop", "web"]);
    assert_eq!(web["spec"]["type"], "LoadBalancer");
    let node_port = web["spec"]["ports"][0]["nodePort"].clone();
    assert!(node_port.is_u64(), "a nodePort is allocated: {web}");

    // A second apply with a changed port: a strategic merge patch that keeps the allocations.
    let changed = SHOP.replace("targetPort: 8080", "targetPort: 9090");
    let out = kubectl.ok(&["apply", "-f", "-"], Some(&changed));
    assert!(out.contains("service/web configured"), "{out}");
    let web = kubectl.json(&["get", "svc", "-n", "shop", "web"]);
    assert_eq!(web["spec"]["ports"][0]["targetPort"], 9090);
    assert_eq!(web["spec"]["ports"][0]["nodePort"], node_port, "an update keeps the port's nodePort");

    kubectl.ok(&["label", "svc", "-n", "shop", "web", "tier=front"], None);
    kubectl.ok(&["annotate", "svc", "-n", "shop", "web", "ringlb.io/scheduler=maglev"], None);
    kubectl.ok(
        &[
            "patch",
            "svc",
            "-n",
            "shop",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"externalIPs":["192.0.2.9"]}}"#,
        ],
        None,
    );
    let web = kubectl.json(&["get", "svc", "-n", "shop", "web"]);
    assert_eq!(web["metadata"]["labels"]["tier"], "front");
    assert_eq!(web["metadata"]["annotations"]["ringlb.io/scheduler"], "maglev");
    assert_eq!(web["spec"]["externalIPs"][0], "192.0.2.9");

    // Server-side field validation: a typo is refused, as kubectl's default (strict) asks.
    let typo = SHOP.replace("selector:", "selectr:");
    let (ok, _, err) = kubectl.run(&["apply", "-f", "-"], Some(&typo));
    assert!(!ok && err.contains("unknown field \"spec.selectr\""), "{err}");

    kubectl.ok(&["delete", "namespace", "shop"], None);
    let (ok, _, err) = kubectl.run(&["get", "svc", "-n", "shop", "web"], None);
    assert!(!ok && err.contains("NotFound"), "deleting the namespace deletes what is in it: {err}");
}

#[test]
fn kubectl_as_a_service_account_is_held_to_its_rbac() {
    let server = ApiServer::start();
    let admin = Kubectl::for_server(&server);
    let rbac = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: shop}
rules:
- apiGroups: ['']
  resources: [services]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: shop}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects:
- {kind: ServiceAccount, name: ringlb, namespace: shop}
";
    admin.ok(&["apply", "-f", "-"], Some(rbac));
    server.add_token("ringlb-token", "system:serviceaccount:shop:ringlb");
    let ringlb = Kubectl::with_token(&server, "ringlb-token");
    ringlb.ok(&["get", "services", "-n", "shop"], None);
    let (ok, _, err) = ringlb.run(&["get", "services", "-A"], None);
    assert!(
        !ok && err.contains("cannot list resource \"services\" in API group \"\" at the cluster scope"),
        "{err}"
    );
    let (ok, _, err) = ringlb.run(&["delete", "service", "-n", "shop", "anything"], None);
    assert!(!ok && err.contains("cannot delete resource \"services\""), "{err}");
}

#[test]
fn kubectl_generators_that_send_protobuf_get_a_clear_refusal() {
    let server = ApiServer::start();
    let kubectl = Kubectl::for_server(&server);
    let (ok, _, err) = kubectl.run(&["create", "namespace", "shop"], None);
    assert!(!ok && err.contains("unknown format"), "the emulator speaks JSON only, and says so: {err}");
}
