//! `ringlb check`: load and build manifests, or list a cluster's objects, exactly as `run` would
//! build them, print the table, and exit non-zero when anything was rejected, so a pipeline can
//! gate on it. From a cluster, what is served is what the statuses hold (the allocated IPs).

use std::process::ExitCode;

use anyhow::Context;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use lb_sync::ManifestSet;
use serde::Serialize;

use crate::cli::CheckArgs;
use crate::serve::build_options;
use crate::table;

/// Exit code when manifests load but some objects were rejected.
const EXIT_REJECTED: u8 = 1;
/// Exit code when the manifests could not be loaded at all.
const EXIT_UNLOADABLE: u8 = 2;

#[derive(Serialize)]
struct CheckOutput<'a> {
    entries: Vec<&'a lb_core::ServiceEntry>,
    rejected: Vec<String>,
    /// Rejected Services served from their last good spec (only ever set with a previous table).
    kept_previous: &'a [lb_core::ObjectRef],
    skipped: Vec<SkippedView<'a>>,
}

#[derive(Serialize)]
struct SkippedView<'a> {
    service: &'a lb_core::ObjectRef,
    reason: &'a str,
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let report = match &args.manifests {
        Some(path) => match ManifestSet::load(path) {
            Ok(set) => lb_core::build(
                &set.services,
                &set.slices,
                &set.endpoints,
                &build_options(&args.defaults, &args.cluster, false),
                None,
                1,
            ),
            Err(errors) => {
                for error in &errors {
                    eprintln!("error: {error}");
                }
                return Ok(ExitCode::from(EXIT_UNLOADABLE));
            }
        },
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (services, slices) = match runtime.block_on(list_cluster(&args)) {
                Ok(objects) => objects,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    return Ok(ExitCode::from(EXIT_UNLOADABLE));
                }
            };
            lb_core::build(
                &services,
                &slices,
                &[],
                &build_options(&args.defaults, &args.cluster, true),
                None,
                1,
            )
        }
    };
    if args.json {
        let output = CheckOutput {
            entries: report.snapshot.entries().map(|e| e.as_ref()).collect(),
            rejected: report.errors.iter().map(ToString::to_string).collect(),
            kept_previous: &report.kept_previous,
            skipped: report
                .skipped
                .iter()
                .map(|s| SkippedView { service: &s.service, reason: &s.reason })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print!("{}", table::render(&report));
    }
    Ok(if report.errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REJECTED) })
}

/// Every Service and EndpointSlice `run` would watch, listed page by page.
async fn list_cluster(args: &CheckArgs) -> anyhow::Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let client = lb_sync::kubeconfig::client(args.cluster.kubeconfig.as_deref()).await?;
    let scopes: Vec<Option<&str>> = if args.cluster.namespaces.is_empty() {
        vec![None]
    } else {
        args.cluster.namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for scope in scopes {
        services.extend(list_all::<Service>(&client, scope).await.context("listing Services")?);
        slices.extend(list_all::<EndpointSlice>(&client, scope).await.context("listing EndpointSlices")?);
    }
    Ok((services, slices))
}

async fn list_all<K>(client: &kube::Client, namespace: Option<&str>) -> Result<Vec<K>, kube::Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let mut all = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        all.extend(page.items);
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(all),
        }
    }
}
