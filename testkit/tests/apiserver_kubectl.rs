//! `kubectl` (v1.32) against the emulator, as an operator drives a cluster: apply, get, label,
//! patch, delete, RBAC-limited users. What kubectl needs of a server (discovery, OpenAPI v3 for
//! server-side field validation, strategic merge patches) is what this exercises.

use std::process::Command;

use serde_json::Value;
use testkit::apiserver::ApiServer;

struct Kubectl {
    kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Kubectl {
    fn for_server(server: &ApiServer) -> Kubectl {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = server.write_kubeconfig(&dir.path().join("kubeconfig"));
        Kubectl { kubeconfig, _dir: dir }
    }

    fn with_token(server: &ApiServer, token: &str) -> Kubectl {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig =
            server.write_kubeconfig_with(&dir.path().join("kubeconfig"), serde_json::json!({"token": token}));
        Kubectl { kubeconfig, _dir: dir }
    }

    /// Runs kubectl; its (status, stdout, stderr).
    fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("kubectl is installed");
        if let Some(input) = stdin {
            use std::io::Write as _;
            child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().expect("kubectl ran");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.run(args, stdin);
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all, None)).expect("kubectl prints JSON")
    }
}

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
