//! The Kubernetes API as a source: kube-rs watchers on Services and EndpointSlices (in every
//! namespace, or in each of `--namespace`), and, for allocation, MetalLB `IPAddressPool`s in the
//! pool namespace and the Namespaces (whose labels pools' `namespaceSelectors` match); for L2
//! announcement, MetalLB `L2Advertisement`s in the pool namespace and the Nodes (whose labels
//! their `nodeSelectors` match); for BGP from the cluster, MetalLB's `BGPPeer`s,
//! `BGPAdvertisement`s, `Community`s and `BFDProfile`s there, and the Nodes.
//!
//! Each watcher lists, then watches from the list's resourceVersion; a dropped connection, a
//! watch error or `410 Gone` makes it relist, with kube-rs's exponential back-off. A relist of one
//! watcher becomes a [`Change::Reset`] of its kind in its namespace, so objects deleted while the
//! watch was down go away; events in between become single changes. The first batch handed to the
//! control loop waits for every watcher's first complete list (the source contract), so `/readyz`
//! turns ready only once the whole view is in. Throughout, the datapath serves the last table.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use lb_core::LogThrottle;
use lb_core::ipam::IpAddressPool;
use lb_core::metallb::{BfdProfile, BgpAdvertisement, BgpPeer, Community, L2Advertisement};

use super::{Source, SyncError};
use crate::control::SourceHandle;
use crate::store::{Change, Kind, Object, SliceParser};

/// Events taken from the watchers at once into one batch, at most (a relist of a big cluster
/// arrives as one Reset per watcher anyway).
const BATCH: usize = 4096;

/// How often the same watch failure is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// What to watch. See the module doc.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    namespaces: Vec<String>,
    pool_namespace: Option<String>,
    l2_advertisements: bool,
    bgp: bool,
}

impl KubeSource {
    /// Watches Services and EndpointSlices in `namespaces` (every namespace when empty).
    pub fn new(client: Client, namespaces: Vec<String>) -> Self {
        KubeSource { client, namespaces, pool_namespace: None, l2_advertisements: false, bgp: false }
    }

    /// Also watches the `IPAddressPool`s of `namespace`, and the Namespaces, for allocation.
    pub fn with_pools(mut self, namespace: impl Into<String>) -> Self {
        self.pool_namespace = Some(namespace.into());
        self
    }

    /// With pools, also watches the pool namespace's `L2Advertisement`s, and the Nodes.
    pub fn with_l2_advertisements(mut self) -> Self {
        self.l2_advertisements = true;
        self
    }

    /// With pools, also watches the pool namespace's BGP objects, and the Nodes.
    pub fn with_bgp(mut self) -> Self {
        self.bgp = true;
        self
    }
}

/// One watcher's identity: the kind it watches and its namespace (`None`: all or cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    kind: Kind,
    namespace: Option<String>,
}

type Stream = BoxStream<'static, (usize, Result<Event<Object>, watcher::Error>)>;

/// The events of a watcher on `api`, each object as `wrap` makes it what the store keeps (`None`:
/// nothing to keep, the event is dropped).
fn watch<K>(id: usize, api: Api<K>, mut wrap: impl FnMut(K) -> Option<Object> + Send + 'static) -> Stream
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| {
            let event = match event {
                Ok(event) => map_event(event, &mut wrap).map(Ok),
                Err(error) => Some(Err(error)),
            };
            std::future::ready(event.map(|event| (id, event)))
        })
        .boxed()
}

fn map_event<K>(event: Event<K>, wrap: &mut impl FnMut(K) -> Option<Object>) -> Option<Event<Object>> {
    let mut wrap = |object: K| wrap(object).map(crate::store::slimmed);
    Some(match event {
        Event::Apply(object) => Event::Apply(wrap(object)?),
        Event::Delete(object) => Event::Delete(wrap(object)?),
        Event::Init => Event::Init,
        Event::InitApply(object) => Event::InitApply(wrap(object)?),
        Event::InitDone => Event::InitDone,
    })
}

impl KubeSource {
    fn api<K>(&self, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        }
    }

    fn streams(&self) -> (Vec<Scope>, SelectAll<Stream>) {
        let mut scopes = Vec::new();
        let mut streams = SelectAll::new();
        let namespaces: Vec<Option<&str>> = if self.namespaces.is_empty() {
            vec![None]
        } else {
            self.namespaces.iter().map(|n| Some(n.as_str())).collect()
        };
        for namespace in namespaces {
            let owned = namespace.map(str::to_owned);
            scopes.push(Scope { kind: Kind::Service, namespace: owned.clone() });
            streams.push(watch(scopes.len() - 1, self.api::<Service>(namespace), |s| Some(Object::from(s))));
            scopes.push(Scope { kind: Kind::EndpointSlice, namespace: owned });
            let mut parser = SliceParser::default();
            streams.push(watch(scopes.len() - 1, self.api::<EndpointSlice>(namespace), move |slice| {
                parser.object(&slice)
            }));
        }
        if let Some(pools) = &self.pool_namespace {
            scopes.push(Scope { kind: Kind::Pool, namespace: Some(pools.clone()) });
            streams.push(watch(scopes.len() - 1, self.api::<IpAddressPool>(Some(pools)), |p| {
                Some(Object::Pool(p))
            }));
            scopes.push(Scope { kind: Kind::Namespace, namespace: None });
            streams.push(watch(scopes.len() - 1, Api::<Namespace>::all(self.client.clone()), |n| {
                Some(Object::Namespace(n))
            }));
            if self.l2_advertisements {
                scopes.push(Scope { kind: Kind::L2Advertisement, namespace: Some(pools.clone()) });
                streams.push(watch(scopes.len() - 1, self.api::<L2Advertisement>(Some(pools)), |a| {
                    Some(Object::L2Advertisement(a))
                }));
            }
            if self.bgp {
                let namespace = Some(pools.clone());
                scopes.push(Scope { kind: Kind::BgpPeer, namespace: namespace.clone() });
                streams.push(watch(scopes.len() - 1, self.api::<BgpPeer>(Some(pools)), |p| {
                    Some(Object::BgpPeer(p))
                }));
                scopes.push(Scope { kind: Kind::BgpAdvertisement, namespace: namespace.clone() });
                streams.push(watch(scopes.len() - 1, self.api::<BgpAdvertisement>(Some(pools)), |a| {
                    Some(Object::BgpAdvertisement(a))
                }));
                scopes.push(Scope { kind: Kind::Community, namespace: namespace.clone() });
                streams.push(watch(scopes.len() - 1, self.api::<Community>(Some(pools)), |c| {
                    Some(Object::Community(c))
                }));
                scopes.push(Scope { kind: Kind::BfdProfile, namespace });
                streams.push(watch(scopes.len() - 1, self.api::<BfdProfile>(Some(pools)), |b| {
                    Some(Object::BfdProfile(b))
                }));
            }
            if self.l2_advertisements || self.bgp {
                scopes.push(Scope { kind: Kind::Node, namespace: None });
                streams.push(watch(scopes.len() - 1, Api::<Node>::all(self.client.clone()), |n| {
                    Some(Object::Node(n))
                }));
            }
        }
        (scopes, streams)
    }
}

/// What to say when `error` is the API server not knowing `kind` at all: a MetalLB kind whose
/// CustomResourceDefinition is not installed answers 404, and ringlb waits for it (the first
/// complete view, hence `/readyz`, waits for every kind it watches).
fn missing_definition(kind: Kind, error: &watcher::Error) -> Option<String> {
    let crd = matches!(
        kind,
        Kind::Pool
            | Kind::L2Advertisement
            | Kind::BgpPeer
            | Kind::BgpAdvertisement
            | Kind::Community
            | Kind::BfdProfile
    );
    let not_found = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    };
    (crd && not_found).then(|| {
        format!(
            ": the API server has no {} resource; install its CustomResourceDefinition (MetalLB's, or \
             deploy/kubernetes/base/ of ringlb)",
            kind.name()
        )
    })
}

impl Source for KubeSource {
    async fn run(self, handle: SourceHandle) -> Result<(), SyncError> {
        let (scopes, mut streams) = self.streams();
        // A relist in progress per watcher; the first complete view waits for all of them.
        let mut listing: BTreeMap<usize, Vec<Object>> = BTreeMap::new();
        let mut first: Option<Vec<Change>> = Some(Vec::new());
        let mut listed = vec![false; scopes.len()];
        let mut failures = LogThrottle::new(LOG_EVERY);
        while let Some(item) = streams.next().await {
            let mut batch = Vec::new();
            let mut pending = Some(item);
            while let Some((id, event)) = pending.take() {
                let scope = &scopes[id];
                match event {
                    Ok(Event::Init) => {
                        listing.insert(id, Vec::new());
                    }
                    Ok(Event::InitApply(object)) => listing.entry(id).or_default().push(object),
                    Ok(Event::InitDone) => {
                        let objects = listing.remove(&id).unwrap_or_default();
                        tracing::debug!(kind = scope.kind.name(), namespace = ?scope.namespace, objects = objects.len(), "listed");
                        batch.push(Change::Reset {
                            kinds: vec![scope.kind],
                            scope: scope.namespace.clone(),
                            objects,
                        });
                        listed[id] = true;
                    }
                    Ok(Event::Apply(object)) => batch.push(Change::Applied(object)),
                    Ok(Event::Delete(object)) => {
                        if let Some(reference) = object.reference() {
                            batch.push(Change::Deleted(reference));
                        }
                    }
                    Err(error) => {
                        if let Some(suppressed) = failures.admit(std::time::Instant::now()) {
                            let hint = missing_definition(scope.kind, &error).unwrap_or_default();
                            tracing::warn!(
                                kind = scope.kind.name(),
                                namespace = ?scope.namespace,
                                %error,
                                suppressed,
                                "watching the Kubernetes API failed; retrying with back-off, the table stays as it is{hint}"
                            );
                        }
                    }
                }
                if batch.len() < BATCH {
                    pending = streams.next().now_or_never().flatten();
                }
            }
            if let Some(initial) = first.as_mut() {
                initial.append(&mut batch);
                if listed.iter().all(|done| *done) {
                    let initial = first.take().unwrap_or_default();
                    tracing::info!(watchers = scopes.len(), "initial lists of the Kubernetes API are in");
                    if !handle.send(initial).await {
                        return Ok(());
                    }
                }
                continue;
            }
            if !batch.is_empty() && !handle.send(batch).await {
                return Ok(());
            }
        }
        Ok(())
    }
}
