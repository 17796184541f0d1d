//! Loading manifests from files and directories: what is accepted, and how a refusal is explained.

mod support;

use std::fs;
use std::path::Path;

use lb_core::{BuildOptions, ObjectRef};
use lb_sync::manifest::{ManifestError, ManifestSet};
use lb_sync::parse_manifest_str;
use support::{WEB_BACKENDS, WEB_VIP, addrs, eligible, service_yaml, slice_header, web_manifest};

fn names(set: &ManifestSet) -> (Vec<String>, Vec<String>) {
    let name = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        format!("{}/{}", meta.namespace.as_deref().unwrap_or("?"), meta.name.as_deref().unwrap_or("?"))
    };
    (
        set.services.iter().map(|s| name(&s.metadata)).collect(),
        set.slices.iter().map(|s| name(&s.metadata)).collect(),
    )
}

fn load_err(path: &Path) -> Vec<ManifestError> {
    match ManifestSet::load(path) {
        Ok(set) => panic!("expected {} to be rejected, loaded {:?}", path.display(), names(&set)),
        Err(errors) => errors,
    }
}

fn only_error(errors: Vec<ManifestError>) -> ManifestError {
    assert_eq!(errors.len(), 1, "expected exactly one error, got: {errors:#?}");
    errors.into_iter().next().expect("length checked above")
}

#[test]
fn multi_document_file_yields_every_service_and_slice() {
    let text = format!(
        "# leading comment\n{}---\n{}---\n# a document with only a comment\n---\n",
        web_manifest([true; 4]),
        service_yaml("shop", "api", "127.0.0.51")
    );
    let set = parse_manifest_str(&text, "multi.yaml").expect("valid manifests load");
    assert_eq!(names(&set), (vec!["shop/web".into(), "shop/api".into()], vec!["shop/web-abcde".into()]));
}

#[test]
fn directory_loads_yaml_yml_and_json_but_not_editor_files_or_subdirectories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write fixture");
    write("a.yaml", &service_yaml("shop", "a", "127.0.0.61"));
    write("b.yml", &service_yaml("shop", "b", "127.0.0.62"));
    write(
        "c.json",
        r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "c", "namespace": "shop"},
            "spec": {"externalIPs": ["127.0.0.63"], "ports": [{"port": 80}]}}"#,
    );
    // Editor and backup files hold half-written or stale copies of the same objects: loading them
    // would either fail (duplicate) or serve old data. None of them may be read.
    for junk in [".a.yaml.swp", "a.yaml~", ".#a.yaml", "a.yaml.bak", "notes.txt"] {
        write(junk, "this is: [not valid yaml");
    }
    fs::create_dir(dir.path().join("nested")).expect("mkdir");
    fs::write(dir.path().join("nested/d.yaml"), service_yaml("shop", "d", "127.0.0.64")).expect("write");

    let set = ManifestSet::load(dir.path()).expect("directory loads");
    assert_eq!(names(&set).0, vec!["shop/a", "shop/b", "shop/c"]);
}

#[test]
fn an_empty_directory_is_an_empty_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(ManifestSet::load(dir.path()).expect("loads").is_empty());
}

#[test]
fn kind_list_items_are_unpacked() {
    let text = "apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: one, namespace: shop}
  spec: {externalIPs: [127.0.0.71], ports: [{port: 80}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: one-x, namespace: shop, labels: {kubernetes.io/service-name: one}}
  addressType: IPv4
  endpoints: [{addresses: [127.0.0.2]}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: settings}
  data: {a: b}
metadata:
  resourceVersion: \"\"
";
    let set = parse_manifest_str(text, "list.yaml").expect("list loads");
    assert_eq!(names(&set), (vec!["shop/one".into()], vec!["shop/one-x".into()]));
}

#[test]
fn typed_lists_give_their_items_kind_and_api_version() {
    // The API server's own list format (`kubectl get --raw`): items carry no apiVersion or kind.
    let text = r#"{"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "9"},
        "items": [{"metadata": {"name": "raw", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}}]}
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList", "metadata": {},
        "items": [{"metadata": {"name": "raw-1", "namespace": "shop"}, "addressType": "IPv4", "endpoints": []}]}"#;
    let set = parse_manifest_str(text, "raw.json").expect("typed lists load");
    assert_eq!(names(&set), (vec!["shop/raw".into()], vec!["shop/raw-1".into()]));
}

#[test]
fn kubectl_get_output_with_managed_fields_and_status_parses_and_builds() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubectl_get_svc_endpointslices.yaml");
    let set = ManifestSet::load(&path).expect("kubectl output loads");
    assert_eq!(
        names(&set),
        (vec!["shop/web".into(), "default/kubernetes".into()], vec!["shop/web-x7m2q".into()])
    );

    let report =
        lb_core::build(&set.services, &set.slices, &set.endpoints, &BuildOptions::default(), None, 1);
    assert!(report.errors.is_empty(), "unexpected rejections: {:?}", report.errors);
    // The fixture's fourth endpoint is not ready.
    assert_eq!(eligible(&report.snapshot, WEB_VIP), addrs(&WEB_BACKENDS[..3]));
}

#[test]
fn objects_without_a_namespace_are_in_default() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: bare\nspec:\n  ports: [{port: 80}]\n";
    let set = parse_manifest_str(text, "bare.yaml").expect("loads");
    assert_eq!(set.services[0].metadata.namespace.as_deref(), Some("default"));
}

#[test]
fn malformed_yaml_is_refused_with_file_document_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("broken.yaml");
    let text =
        format!("{}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [oops\n", web_manifest([true; 4]));
    fs::write(&file, &text).expect("write");

    let error = only_error(load_err(&file));
    let ManifestError::Syntax { at, line, .. } = &error else {
        panic!("expected a syntax error, got {error:?}");
    };
    assert_eq!(at.file, file);
    assert_eq!(at.document, 3, "the broken document is the third");
    let broken_line = text.lines().position(|l| l.contains("[oops")).expect("fixture has it") + 1;
    assert!(line.is_some_and(|l| l >= broken_line), "line {line:?} should point at or after {broken_line}");
    let message = error.to_string();
    assert!(message.contains("broken.yaml") && message.contains("document 3"), "{message}");
}

#[test]
fn a_field_of_the_wrong_type_is_refused_naming_object_and_field() {
    let text = service_yaml("shop", "typo", "127.0.0.80").replace("port: 80", "port: eighty");
    let error = only_error(parse_manifest_str(&text, "typo.yaml").expect_err("must be refused"));
    let ManifestError::InvalidObject { object, field, .. } = &error else {
        panic!("expected an invalid object, got {error:?}");
    };
    assert_eq!(object, &ObjectRef::service("shop", "typo"));
    assert_eq!(field, "spec.ports[0].port");
    let message = error.to_string();
    assert!(message.contains("typo.yaml") && message.contains("Service shop/typo"), "{message}");
}

#[test]
fn an_unknown_api_version_is_refused_not_ignored() {
    let text = slice_header("shop", "old", "web").replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
    let error = only_error(parse_manifest_str(&text, "old.yaml").expect_err("must be refused"));
    let ManifestError::UnsupportedApiVersion { object, api_version, .. } = &error else {
        panic!("expected an unsupported apiVersion, got {error:?}");
    };
    assert_eq!(object, &ObjectRef::endpoint_slice("shop", "old"));
    assert_eq!(api_version, "discovery.k8s.io/v1beta1");
}

#[test]
fn the_same_object_in_two_files_is_refused_naming_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("a.yaml"), service_yaml("shop", "web", "127.0.0.50")).expect("write");
    // Same object, namespace left to default in one and spelled out in the other.
    let text = service_yaml("default", "twice", "127.0.0.90");
    fs::write(
        dir.path().join("b.yaml"),
        format!("{text}---\n{}", text.replace("  namespace: default\n", "")),
    )
    .expect("write");

    let error = only_error(load_err(dir.path()));
    let ManifestError::Duplicate { object, first, second } = &error else {
        panic!("expected a duplicate, got {error:?}");
    };
    assert_eq!(object, &ObjectRef::service("default", "twice"));
    assert_eq!((first.document, second.document), (1, 2));
    assert!(second.file.ends_with("b.yaml"));
}

#[test]
fn one_bad_file_refuses_the_whole_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("good.yaml"), web_manifest([true; 4])).expect("write");
    fs::write(dir.path().join("bad.yaml"), "apiVersion: v1\nkind: Service\nmetadata: {name: x\n")
        .expect("write");
    let errors = load_err(dir.path());
    assert!(errors.iter().all(|e| e.file().ends_with("bad.yaml")), "{errors:#?}");
}

#[test]
fn every_error_of_every_file_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("a.yaml"), "kind: [").expect("write");
    fs::write(dir.path().join("b.yaml"), "- just\n- a list\n").expect("write");
    let errors = load_err(dir.path());
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(matches!(errors[0], ManifestError::Syntax { .. }));
    assert!(matches!(errors[1], ManifestError::NotAnObject { .. }));
}

#[test]
fn objects_without_kind_or_name_are_refused() {
    let no_kind = parse_manifest_str("apiVersion: v1\nmetadata: {name: x}\n", "k.yaml").expect_err("refused");
    assert!(matches!(only_error(no_kind), ManifestError::NotAnObject { .. }));
    let no_name =
        parse_manifest_str("apiVersion: v1\nkind: Service\nmetadata: {}\n", "n.yaml").expect_err("refused");
    let error = only_error(no_name);
    assert!(
        matches!(&error, ManifestError::InvalidObject { field, .. } if field == "metadata.name"),
        "{error:?}"
    );
}

#[test]
fn a_missing_path_is_a_read_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.yaml");
    let error = only_error(load_err(&missing));
    assert!(matches!(error, ManifestError::Io(_)));
    assert_eq!(error.file(), missing);
}

#[test]
fn hostile_input_never_panics() {
    let inputs = [
        "",
        "---\n---\n",
        "null",
        "42",
        "!!binary aGVsbG8=",
        "apiVersion: v1\nkind: List\nitems: 7\n",
        "apiVersion: v1\nkind: List\nitems: [1, [2], {kind: List, items: [{kind: Service}]}]\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 99999999999999999999}]}\n",
        "a: &a [*a]\n",
        "{1: 2}",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: 5}\n",
        "\u{feff}apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
    ];
    for input in inputs {
        let _ = parse_manifest_str(input, "hostile.yaml");
        let _ = parse_manifest_str(input, "hostile.json");
    }
}

#[test]
fn an_empty_file_is_taken_for_a_write_in_progress() {
    let error = only_error(parse_manifest_str("  \n", "truncated.yaml").expect_err("refused"));
    assert!(matches!(error, ManifestError::EmptyFile { .. }), "{error:?}");
    // Saying "nothing" explicitly is fine.
    assert!(parse_manifest_str("# no services here\n", "c.yaml").expect("a comment loads").is_empty());
    let empty_list = "apiVersion: v1\nkind: List\nitems: []\n";
    assert!(parse_manifest_str(empty_list, "l.yaml").expect("an empty List loads").is_empty());
}

#[test]
fn a_set_of_only_other_kinds_is_refused_unless_a_file_says_nothing_on_purpose() {
    // The wrong file saved over the manifest: served, it would empty the table.
    let config_map =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: shop}\ndata: {a: b}\n";
    let error = only_error(parse_manifest_str(config_map, "web.yaml").expect_err("refused"));
    assert!(matches!(&error, ManifestError::OnlyOtherKinds { kind, .. } if kind == "ConfigMap"), "{error:?}");
    assert!(error.to_string().starts_with("web.yaml: document 1: a ConfigMap"), "{error}");
    // `kubectl get configmaps -o yaml`: a List of them is no different.
    let listed = format!("apiVersion: v1\nkind: List\nitems:\n- {}", config_map.replace('\n', "\n  "));
    let error = only_error(parse_manifest_str(&listed, "web.yaml").expect_err("refused"));
    assert!(matches!(error, ManifestError::OnlyOtherKinds { .. }), "{error:?}");

    // Beside a file ringlb reads, or one saying "nothing" on purpose, other kinds are ignored.
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write fixture");
    write("kustomization.yaml", "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n");
    assert!(matches!(only_error(load_err(dir.path())), ManifestError::OnlyOtherKinds { .. }));
    write("web.yaml", "# nothing served for now\n");
    assert!(ManifestSet::load(dir.path()).expect("a comment says nothing on purpose").is_empty());
    write("web.yaml", "apiVersion: v1\nkind: List\nitems: []\n");
    assert!(ManifestSet::load(dir.path()).expect("so does an empty List").is_empty());
    write("web.yaml", &service_yaml("shop", "web", "127.0.0.64"));
    assert_eq!(names(&ManifestSet::load(dir.path()).expect("loads")).0, vec!["shop/web"]);
}

#[test]
fn a_bad_object_is_the_builders_to_reject_not_the_loaders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad_vip = service_yaml("shop", "bad", "not-an-ip");
    fs::write(dir.path().join("all.yaml"), format!("{}---\n{bad_vip}", web_manifest([true; 4])))
        .expect("write");
    let set = ManifestSet::load(dir.path()).expect("the files load; only the build rejects");
    let report =
        lb_core::build(&set.services, &set.slices, &set.endpoints, &BuildOptions::default(), None, 7);
    assert_eq!(report.snapshot.version, 7);
    assert_eq!(eligible(&report.snapshot, WEB_VIP), addrs(&WEB_BACKENDS));
    assert!(
        report.errors.iter().any(|e| e.to_string().contains("shop/bad")),
        "the bad Service is named: {:?}",
        report.errors
    );
}

#[test]
fn a_selector_less_service_with_an_endpoints_object_is_served_as_the_kubernetes_docs_show() {
    // The "Services without selectors" example of the Kubernetes documentation, with an external IP
    // to serve it on, and a not-ready address. Endpoints used to be skipped as an unknown kind.
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: my-service\nspec:\n  externalIPs: [127.0.0.70]\n  \
                ports:\n    - name: http\n      protocol: TCP\n      port: 80\n      targetPort: 9376\n---\n\
                apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: my-service\nsubsets:\n  - addresses:\n      \
                - ip: 192.0.2.42\n    notReadyAddresses:\n      - ip: 192.0.2.43\n    ports:\n      \
                - name: http\n        port: 9376\n";
    let set = parse_manifest_str(text, "docs.yaml").expect("loads");
    assert_eq!(set.endpoints.len(), 1);
    let report =
        lb_core::build(&set.services, &set.slices, &set.endpoints, &BuildOptions::default(), None, 1);
    assert!(report.is_clean(), "{report}");
    let backend: std::net::SocketAddr = "192.0.2.42:9376".parse().expect("backend");
    assert_eq!(eligible(&report.snapshot, "127.0.0.70:80"), [backend]);
    let duplicate = format!("{text}---\napiVersion: v1\nkind: Endpoints\nmetadata:\n  name: my-service\n");
    let errors = parse_manifest_str(&duplicate, "twice.yaml").expect_err("the same Endpoints twice");
    assert!(
        matches!(only_error(errors), ManifestError::Duplicate { object, .. } if object.kind == "Endpoints")
    );
}
