//! Target `manifest`: a manifest file's text through lb-sync's parser, read both as YAML and as
//! JSON (the parser picks by file name), and whatever parses through the builder.
//!
//! Checks what `lb_sync::manifest` promises: it never panics; a load is all or nothing (errors, and
//! then no objects, or objects and no error); every object it returns has a name and a namespace,
//! and no two share kind, namespace and name; every error names the file and can be shown.

use std::collections::BTreeSet;

use lb_sync::{ManifestSet, parse_manifest_str};

pub fn run(data: &[u8]) {
    // A file is read with `read_to_string`, so the parser only ever sees UTF-8.
    let text = String::from_utf8_lossy(data);
    for origin in ["fuzz.yaml", "fuzz.json"] {
        match parse_manifest_str(&text, origin) {
            Ok(set) => {
                check_set(&set);
                super::objects::check_build(&set.services, &set.slices, &set.endpoints);
            }
            Err(errors) => {
                assert!(!errors.is_empty(), "a failed load names at least one error");
                for error in &errors {
                    assert_eq!(error.file(), std::path::Path::new(origin), "{error}");
                    let _ = error.to_string();
                }
            }
        }
    }
}

fn check_set(set: &ManifestSet) {
    let mut seen = BTreeSet::new();
    let metadata = set.services.iter().map(|s| ("Service", &s.metadata));
    let metadata = metadata.chain(set.slices.iter().map(|s| ("EndpointSlice", &s.metadata)));
    for (kind, meta) in metadata.chain(set.endpoints.iter().map(|e| ("Endpoints", &e.metadata))) {
        let name = meta.name.clone().filter(|n| !n.is_empty()).expect("every object has a name");
        let namespace =
            meta.namespace.clone().filter(|n| !n.is_empty()).expect("every object has a namespace");
        assert!(seen.insert((kind, namespace, name)), "a duplicate {kind} was loaded");
    }
}
