//! `deploy/kubernetes` as an operator installs it: rendered by `kubectl kustomize`, its RBAC
//! applied to the emulator, and ringlb started exactly as the Deployment starts it (its arguments,
//! its downward-API environment, the in-cluster ServiceAccount token and CA) with a token of the
//! shipped ServiceAccount: those rights must be enough to serve, allocate, write statuses, record
//! Events and hold the Lease.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Service;
use serde_json::Value;
use support::cluster::{CLASS, Cluster, load_balancer, wait_reached};
use support::{Ringlb, free_admin_addr};

fn deploy_dir(variant: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes").join(variant)
}

/// The documents `kubectl kustomize` renders for `variant` ("" or "daemonset").
fn render(variant: &str) -> Vec<Value> {
    let output =
        Command::new("kubectl").arg("kustomize").arg(deploy_dir(variant)).output().expect("run kubectl");
    assert!(output.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).expect("UTF-8");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| serde::Deserialize::deserialize(document).expect("a YAML document"))
        .collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> &'a Value {
    documents.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn the_deployment_and_the_daemonset_run_the_same_hardened_ringlb() {
    let deployment = render("");
    let daemonset = render("daemonset");
    let pod = |documents: &[Value], kind: &str| of_kind(documents, kind)["spec"]["template"]["spec"].clone();
    let (mut appliance, mut per_node) = (pod(&deployment, "Deployment"), pod(&daemonset, "DaemonSet"));

    let container = &appliance["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["seccompProfile"]["type"], "Localhost", "io_uring needs ringlb's profile");
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(security["capabilities"]["add"], serde_json::json!(["NET_BIND_SERVICE"]));
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(appliance["serviceAccountName"], "ringlb");
    // The profile the pods install is the one in the repository.
    let configmap = of_kind(&deployment, "ConfigMap");
    let shipped = std::fs::read_to_string(deploy_dir("base/seccomp/ringlb.json")).expect("the profile");
    assert_eq!(configmap["data"]["ringlb.json"].as_str(), Some(shipped.as_str()));
    let profile: Value = serde_json::from_str(&shipped).expect("the profile is JSON");
    let allowed: Vec<&str> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|rule| rule["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|rule| rule["names"].as_array().expect("names").iter().filter_map(Value::as_str))
        .collect();
    for io_uring in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(allowed.contains(&io_uring), "the profile allows {io_uring}");
    }

    // NODE_NAME only on every node (externalTrafficPolicy: Local), anti-affinity only for replicas.
    let env = per_node["containers"][0]["env"].as_array_mut().expect("env");
    let node = env.iter().position(|e| e["name"] == "NODE_NAME").expect("the DaemonSet sets NODE_NAME");
    assert_eq!(env.remove(node)["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    appliance.as_object_mut().expect("a pod spec").remove("affinity").expect("replicas on different nodes");
    assert_eq!(appliance, per_node, "the two pod templates differ only in NODE_NAME and affinity");
}

/// The rendered CustomResourceDefinition named `name`.
fn crd<'a>(documents: &'a [Value], name: &str) -> &'a Value {
    documents
        .iter()
        .find(|d| d["kind"] == "CustomResourceDefinition" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no CustomResourceDefinition {name} rendered"))
}

#[test]
fn the_shipped_crd_is_the_schema_the_emulator_validates_pools_against() {
    let rendered = render("");
    let crd = crd(&rendered, "ipaddresspools.metallb.io");
    let emulator: Value =
        serde_yaml_ng::from_str(include_str!("../../testkit/kube-fixtures/crd/ipaddresspool-crd.yaml"))
            .expect("the emulator's CRD");
    assert_eq!(crd["spec"], emulator["spec"]);
}

/// The names of the fields `T` (a struct) deserialises, as serde's derive lists them (renamed).
fn fields_of<'de, T: serde::Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor, value};

    struct Introspect<'a>(&'a std::cell::Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Introspect<'_> {
        type Error = value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, value::Error> {
            Err(value::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, value::Error> {
            self.0.set(fields);
            Err(value::Error::custom("fields recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let fields = std::cell::Cell::new(&[][..]);
    let _ = T::deserialize(Introspect(&fields));
    assert!(!fields.get().is_empty(), "{} is a struct with fields", std::any::type_name::<T>());
    fields.get()
}

/// Every key of `value`, at any depth, is a property of `schema` (an object's `properties`, an
/// array's `items`; a map's `additionalProperties` takes any key).
fn assert_in_schema(value: &Value, schema: &Value, path: &str) {
    match value {
        Value::Object(map) if schema.get("additionalProperties").is_some() => {
            for (key, item) in map {
                assert_in_schema(item, &schema["additionalProperties"], &format!("{path}.{key}"));
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                let property = &schema["properties"][key.as_str()];
                assert!(!property.is_null(), "the schema has no {path}.{key}: the API server would prune it");
                assert_in_schema(item, property, &format!("{path}.{key}"));
            }
        }
        Value::Array(items) => {
            for item in items {
                assert_in_schema(item, &schema["items"], &format!("{path}[]"));
            }
        }
        _ => {}
    }
}

/// `T` has a shipped CRD of the group, version, kind and plural ringlb reads it as, whose schema
/// keeps every field of `example` (a fully populated `T`, every field of `Spec` set).
fn assert_shipped<T, Spec>(rendered: &[Value], example: Value)
where
    T: k8s_openapi::Resource + serde::de::DeserializeOwned + serde::Serialize,
    Spec: serde::de::DeserializeOwned,
{
    let (group, version, kind, plural) = (T::GROUP, T::VERSION, T::KIND, T::URL_PATH_SEGMENT);
    let crd = crd(rendered, &format!("{plural}.{group}"));
    assert_eq!(crd["spec"]["group"], group);
    assert_eq!(crd["spec"]["names"]["kind"], kind);
    assert_eq!(crd["spec"]["names"]["plural"], plural);
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    let shipped = versions
        .iter()
        .find(|v| v["name"] == version)
        .unwrap_or_else(|| panic!("{kind}'s CRD has no version {version}"));
    assert_eq!((&shipped["served"], &shipped["storage"]), (&Value::Bool(true), &Value::Bool(true)), "{kind}");
    let schema = &shipped["schema"]["openAPIV3Schema"];
    assert_eq!(schema["properties"]["status"]["type"], "object", "{kind} has a status");

    // The example is what ringlb decodes: nothing in it is ignored, and it sets every field.
    let object: T = serde_json::from_value(example.clone()).expect("the example decodes");
    let spec = serde_json::to_value(&object).expect("JSON")["spec"].take();
    assert_eq!(spec, example["spec"], "{kind}: the example round-trips (every field it sets is read)");
    let keys: Vec<&str> = spec.as_object().expect("a spec").keys().map(String::as_str).collect();
    for field in fields_of::<Spec>() {
        assert!(keys.contains(field), "{kind}: the example sets spec.{field}");
    }
    assert_in_schema(&spec, &schema["properties"]["spec"], &format!("{kind}.spec"));
}

#[test]
fn every_metallb_kind_ringlb_reads_has_a_shipped_crd_of_the_version_it_reads() {
    use lb_core::ipam::{IpAddressPool, PoolSpec};
    use lb_core::metallb::{
        BfdProfile, BfdProfileSpec, BgpAdvertisement, BgpAdvertisementSpec, BgpPeer, BgpPeerSpec, Community,
        CommunitySpec, L2Advertisement, L2AdvertisementSpec,
    };
    use serde_json::json;

    let rendered = render("");
    let selector = json!({
        "matchLabels": {"zone": "a"},
        "matchExpressions": [{"key": "edge", "operator": "In", "values": ["true"]}]
    });
    let metadata = json!({"name": "example", "namespace": "metallb-system"});
    assert_shipped::<IpAddressPool, PoolSpec>(
        &rendered,
        json!({"metadata": metadata, "spec": {
            "addresses": ["192.0.2.0/28", "198.51.100.10-198.51.100.20"],
            "autoAssign": false,
            "avoidBuggyIPs": true,
            "serviceAllocation": {"priority": 1, "namespaces": ["web"],
                                  "namespaceSelectors": [selector], "serviceSelectors": [selector]}
        }}),
    );
    assert_shipped::<L2Advertisement, L2AdvertisementSpec>(
        &rendered,
        json!({"metadata": metadata, "spec": {
            "ipAddressPools": ["lan"], "ipAddressPoolSelectors": [selector],
            "nodeSelectors": [selector], "interfaces": ["eth1"]
        }}),
    );
    assert_shipped::<BgpAdvertisement, BgpAdvertisementSpec>(
        &rendered,
        json!({"metadata": metadata, "spec": {
            "aggregationLength": 32, "aggregationLengthV6": 128, "localPref": 100,
            "communities": ["65535:65282", "no-advertise"], "ipAddressPools": ["wan"],
            "ipAddressPoolSelectors": [selector], "nodeSelectors": [selector], "peers": ["tor"]
        }}),
    );
    assert_shipped::<BgpPeer, BgpPeerSpec>(
        &rendered,
        json!({"metadata": metadata, "spec": {
            "myASN": 4200000000u32, "peerASN": 64512, "peerAddress": "192.0.2.1", "peerPort": 1179,
            "sourceAddress": "192.0.2.2", "holdTime": "90s", "keepaliveTime": "30s",
            "routerID": "192.0.2.2", "nodeSelectors": [selector], "password": "secret",
            "bfdProfile": "fast", "ebgpMultiHop": true, "connectTime": "5s", "enableGracefulRestart": true,
            "passwordSecret": {"name": "bgp-auth", "namespace": "metallb-system"}, "vrf": "red"
        }}),
    );
    assert_shipped::<Community, CommunitySpec>(
        &rendered,
        json!({"metadata": metadata, "spec": {
            "communities": [{"name": "no-advertise", "value": "65535:65282"}]
        }}),
    );
    assert_shipped::<BfdProfile, BfdProfileSpec>(
        &rendered,
        json!({"metadata": metadata, "spec": {
            "receiveInterval": 100, "transmitInterval": 100, "detectMultiplier": 3,
            "passiveMode": false, "minimumTtl": 254
        }}),
    );
}

/// Files of an in-cluster ServiceAccount mount, and `sh` that puts them where every client looks
/// (`/var/run/secrets/kubernetes.io/serviceaccount`) in a mount namespace of the process only.
fn in_cluster(dir: &Path, token: &str, ca: &str, server: SocketAddr) -> Command {
    let account = dir.join("serviceaccount");
    std::fs::create_dir_all(&account).expect("mkdir");
    std::fs::write(account.join("token"), token).expect("token");
    std::fs::write(account.join("ca.crt"), ca).expect("ca.crt");
    std::fs::write(account.join("namespace"), "ringlb-system").expect("namespace");
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io && \
             cp -r \"$ACCOUNT\" /run/secrets/kubernetes.io/serviceaccount && exec \"$@\"",
        )
        .arg("sh")
        .env("ACCOUNT", &account)
        .env("KUBERNETES_SERVICE_HOST", server.ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", server.port().to_string())
        // No kubeconfig to find: the in-cluster rule is the one left.
        .env_remove("KUBECONFIG")
        .env("HOME", dir);
    command
}

#[test]
fn ringlb_started_as_the_deployment_starts_it_serves_with_the_shipped_rights_only() {
    let cluster = Cluster::start();
    // The RBAC and ServiceAccount as rendered (the emulator serves no Deployments or CRDs).
    let rendered = render("");
    for document in &rendered {
        let kind = document["kind"].as_str().unwrap_or_default();
        if ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
            .contains(&kind)
        {
            cluster.kubectl.apply(&serde_json::to_string(document).expect("JSON"));
        }
    }
    // A TokenRequest, as the kubelet makes for the pod's projected token (`kubectl create token`
    // would send protobuf, which the emulator does not speak).
    let request =
        r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":[]}}"#;
    let path = "/api/v1/namespaces/ringlb-system/serviceaccounts/ringlb/token";
    let answer: Value =
        serde_json::from_str(&cluster.kubectl.ok(&["create", "--raw", path, "-f", "-"], Some(request)))
            .expect("JSON");
    let token = answer["status"]["token"].as_str().expect("a token").to_owned();

    cluster.pool("front", &["127.0.117.0/29"]);
    let _pod = cluster.backend(0, "web-0");
    let web: Service = load_balancer("web", Some(CLASS), &[("http", 80)]).build();
    cluster.apply_json(&web);
    cluster.endpoints("web", &[(0, true)]);

    // The container's arguments, with the admin endpoint moved to a free port.
    let deployment = of_kind(&rendered, "Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("text").to_owned())
        .collect();
    let admin = free_admin_addr();
    let at = args.iter().position(|a| a == "--admin").expect("the Deployment sets --admin");
    args[at + 1] = admin.to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut command = in_cluster(dir.path(), &token, &cluster.server.ca_pem(), cluster.server.addr());
    command.arg(env!("CARGO_BIN_EXE_ringlb")).args(&args).args(["--workers", "2", "--shutdown-grace", "2s"]);
    // The downward API of the pod.
    command.env("POD_NAME", "ringlb-7d9f8-abcde").env("POD_NAMESPACE", "ringlb-system");
    let mut ringlb = Ringlb::spawn(command, admin);
    ringlb.wait_ready();

    let ip = cluster.wait_ingress("web");
    let (_, instance) = cluster.wait_event("web", "IPAllocated");
    assert_eq!(instance, "ringlb-7d9f8-abcde", "the pod's name from the downward API is its identity");
    wait_reached(SocketAddr::new(ip, 80), &["web-0"]);
    let lease = cluster.kubectl.json(&["get", "lease", "-n", "ringlb-system", "ringlb"]);
    assert_eq!(lease["spec"]["holderIdentity"], "ringlb-7d9f8-abcde");
    assert_eq!(ringlb.status()["leader"], true);
    assert_eq!(ringlb.terminate().code(), Some(0));
}
