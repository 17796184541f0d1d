//! The objects the control loop builds from: every Service, EndpointSlice and core/v1 Endpoints a
//! source reported, and what allocation reads besides (MetalLB `IPAddressPool`s, Namespaces for
//! the pools' namespace selectors) and announcement (MetalLB's advertisement, peer, community and
//! BFD CRDs; the Nodes, of which only names and labels are kept), by kind, namespace and name.
//! Services and EndpointSlices are kept as the builder reads them ([`CompactService`], converted as
//! each arrives, and [`ParsedEndpointSlice`], parsed by the source: a third of the decoded
//! objects); the other kinds as decoded, less what nothing reads ([`slimmed`]).
//!
//! Sources say what changed ([`Change`]): one object created, changed or deleted (a watch event), or
//! every object of some kinds replaced at once (a manifest reload, a relist after the watch was cut).
//! The store applies each change and says whether the objects it holds are different afterwards, so a
//! change that changes nothing (a resync, a touched file) builds nothing. It never validates: bad
//! objects are the builder's to reject, with errors naming them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::Metadata;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_core::CompactService;
use lb_core::ipam::IpAddressPool;
use lb_core::metallb::{BfdProfile, BgpAdvertisement, BgpPeer, Community, L2Advertisement};
use lb_core::{ObjectRef, ParsedEndpointSlice, SliceNames};

/// The namespace Kubernetes assumes when an object names none.
const DEFAULT_NAMESPACE: &str = "default";

/// One object of a kind the builder reads.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "moved once per change into the store; boxing buys nothing")]
pub enum Object {
    Service(CompactService),
    EndpointSlice(ParsedEndpointSlice),
    Endpoints(Endpoints),
    Pool(IpAddressPool),
    Namespace(Namespace),
    L2Advertisement(L2Advertisement),
    BgpAdvertisement(BgpAdvertisement),
    BgpPeer(BgpPeer),
    Community(Community),
    BfdProfile(BfdProfile),
    Node(Node),
}

/// kubectl's copy of the last applied object, in an annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl From<Service> for Object {
    /// A Service as the store keeps it (compact: what nothing reads is gone).
    fn from(service: Service) -> Self {
        Object::Service(CompactService::from(service))
    }
}

/// `object` without what no build or allocation reads and a cluster makes large: `managedFields`,
/// kubectl's last-applied annotation, owner references. What a source of cluster objects stores.
pub fn slimmed(mut object: Object) -> Object {
    if let Some(meta) = object.metadata_mut() {
        meta.managed_fields = None;
        meta.owner_references = None;
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.remove(LAST_APPLIED);
        }
    }
    // A Node's status (images, conditions) is kilobytes; node selectors read only labels.
    if let Object::Node(node) = &mut object {
        *node = Node {
            metadata: ObjectMeta {
                name: node.metadata.name.take(),
                labels: node.metadata.labels.take(),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }
    object
}

/// Parses EndpointSlices as the store keeps them; keep one per source, so that its slices share
/// node and zone names (and the names of nodes that went away are forgotten now and then).
#[derive(Debug, Default)]
pub struct SliceParser {
    names: SliceNames,
    parsed: usize,
}

/// Parses between two prunes of the shared names.
const PRUNE_NAMES_EVERY: usize = 4096;

impl SliceParser {
    /// `slice` as the store keeps it; `None`, after a debug line, for a slice without a name,
    /// which no store keeps.
    pub fn object(&mut self, slice: &EndpointSlice) -> Option<Object> {
        self.parsed += 1;
        if self.parsed.is_multiple_of(PRUNE_NAMES_EVERY) {
            self.names.prune();
        }
        match ParsedEndpointSlice::parse(slice, &mut self.names) {
            Ok(parsed) => Some(Object::EndpointSlice(parsed)),
            Err(error) => {
                tracing::debug!(%error, "an EndpointSlice was not stored");
                None
            }
        }
    }
}

/// The kinds of [`Object`], for changes that replace every object of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
    Pool,
    Namespace,
    L2Advertisement,
    BgpAdvertisement,
    BgpPeer,
    Community,
    BfdProfile,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Endpoints,
        Kind::Pool,
        Kind::Namespace,
        Kind::L2Advertisement,
        Kind::BgpAdvertisement,
        Kind::BgpPeer,
        Kind::Community,
        Kind::BfdProfile,
        Kind::Node,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
            Kind::Pool => "IPAddressPool",
            Kind::Namespace => "Namespace",
            Kind::L2Advertisement => "L2Advertisement",
            Kind::BgpAdvertisement => "BGPAdvertisement",
            Kind::BgpPeer => "BGPPeer",
            Kind::Community => "Community",
            Kind::BfdProfile => "BFDProfile",
            Kind::Node => "Node",
        }
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Endpoints(_) => Kind::Endpoints,
            Object::Pool(_) => Kind::Pool,
            Object::Namespace(_) => Kind::Namespace,
            Object::L2Advertisement(_) => Kind::L2Advertisement,
            Object::BgpAdvertisement(_) => Kind::BgpAdvertisement,
            Object::BgpPeer(_) => Kind::BgpPeer,
            Object::Community(_) => Kind::Community,
            Object::BfdProfile(_) => Kind::BfdProfile,
            Object::Node(_) => Kind::Node,
        }
    }

    /// Its metadata; `None` for a compact Service and a parsed EndpointSlice, which keep their own.
    fn metadata_mut(&mut self) -> Option<&mut ObjectMeta> {
        match self {
            Object::Service(_) => None,
            Object::EndpointSlice(_) => None,
            Object::Endpoints(object) => Some(object.metadata_mut()),
            Object::Pool(object) => Some(object.metadata_mut()),
            Object::Namespace(object) => Some(object.metadata_mut()),
            Object::L2Advertisement(object) => Some(object.metadata_mut()),
            Object::BgpAdvertisement(object) => Some(object.metadata_mut()),
            Object::BgpPeer(object) => Some(object.metadata_mut()),
            Object::Community(object) => Some(object.metadata_mut()),
            Object::BfdProfile(object) => Some(object.metadata_mut()),
            Object::Node(object) => Some(object.metadata_mut()),
        }
    }

    fn metadata(&self) -> Option<&ObjectMeta> {
        match self {
            Object::Service(_) => None,
            Object::EndpointSlice(_) => None,
            Object::Endpoints(object) => Some(object.metadata()),
            Object::Pool(object) => Some(object.metadata()),
            Object::Namespace(object) => Some(object.metadata()),
            Object::L2Advertisement(object) => Some(object.metadata()),
            Object::BgpAdvertisement(object) => Some(object.metadata()),
            Object::BgpPeer(object) => Some(object.metadata()),
            Object::Community(object) => Some(object.metadata()),
            Object::BfdProfile(object) => Some(object.metadata()),
            Object::Node(object) => Some(object.metadata()),
        }
    }

    /// Its kind, namespace (`default` when unset) and name; `None` without a name.
    pub fn reference(&self) -> Option<ObjectRef> {
        let Some(meta) = self.metadata() else {
            return match self {
                Object::EndpointSlice(slice) => Some(slice.object().clone()),
                Object::Service(service) => service.object(),
                _ => None,
            };
        };
        let name = meta.name.as_deref().filter(|name| !name.is_empty())?;
        // Namespaces and Nodes are cluster-scoped: their reference has no namespace.
        let namespace = match self {
            Object::Namespace(_) | Object::Node(_) => "",
            _ => meta.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or(DEFAULT_NAMESPACE),
        };
        Some(ObjectRef { kind: self.kind().name(), namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

/// What a source saw change.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "moved once per change into the store; boxing buys nothing")]
pub enum Change {
    /// Every object of `kinds` (in namespace `scope`, or in all when `None`) is replaced by
    /// `objects` (those of other kinds or namespaces are ignored).
    Reset { kinds: Vec<Kind>, scope: Option<String>, objects: Vec<Object> },
    /// One object was created or changed.
    Applied(Object),
    /// One object was deleted.
    Deleted(ObjectRef),
}

impl Change {
    /// Every object of every kind replaced by `objects` (a manifest load).
    pub fn everything(objects: Vec<Object>) -> Change {
        Change::Reset { kinds: Kind::ALL.to_vec(), scope: None, objects }
    }
}

/// A stored object and its revision: a number the store changes whenever the object's content
/// changes (never reused), so equal revisions of one name mean equal content (what the builder's
/// cache relies on, see `lb_core::BuildCache`).
#[derive(Debug)]
pub struct Stored<T> {
    pub revision: u64,
    pub object: Arc<T>,
}

impl<T> Clone for Stored<T> {
    fn clone(&self) -> Self {
        Stored { revision: self.revision, object: Arc::clone(&self.object) }
    }
}

impl<T> std::ops::Deref for Stored<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.object
    }
}

impl<T> Stored<T> {
    /// The object with its revision, as the builder takes it.
    pub fn revised(&self) -> lb_core::Revised<'_, T> {
        lb_core::Revised { object: &self.object, revision: self.revision }
    }
}

/// The objects by kind; see the module doc.
#[derive(Debug, Default, Clone)]
pub struct ObjectStore {
    /// The revision the next changed object gets.
    next_revision: u64,
    services: BTreeMap<ObjectRef, Stored<CompactService>>,
    slices: BTreeMap<ObjectRef, Stored<ParsedEndpointSlice>>,
    endpoints: BTreeMap<ObjectRef, Stored<Endpoints>>,
    pools: BTreeMap<ObjectRef, Stored<IpAddressPool>>,
    namespaces: BTreeMap<ObjectRef, Stored<Namespace>>,
    l2_advertisements: BTreeMap<ObjectRef, Stored<L2Advertisement>>,
    bgp_advertisements: BTreeMap<ObjectRef, Stored<BgpAdvertisement>>,
    bgp_peers: BTreeMap<ObjectRef, Stored<BgpPeer>>,
    communities: BTreeMap<ObjectRef, Stored<Community>>,
    bfd_profiles: BTreeMap<ObjectRef, Stored<BfdProfile>>,
    nodes: BTreeMap<ObjectRef, Stored<Node>>,
    /// The lists last handed out ([`ObjectStore::objects`]), and the kinds changed since.
    lists: Objects,
    stale: Vec<Kind>,
}

/// The objects of a store as the builder takes them (in namespace/name order). Each kind's list
/// is shared with the store until that kind changes: a change of one slice copies the slices'
/// list, not the Services'.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Arc<Vec<Stored<CompactService>>>,
    pub slices: Arc<Vec<Stored<ParsedEndpointSlice>>>,
    pub endpoints: Arc<Vec<Stored<Endpoints>>>,
    pub pools: Arc<Vec<Stored<IpAddressPool>>>,
    pub namespaces: Arc<Vec<Stored<Namespace>>>,
    pub l2_advertisements: Arc<Vec<Stored<L2Advertisement>>>,
    pub bgp_advertisements: Arc<Vec<Stored<BgpAdvertisement>>>,
    pub bgp_peers: Arc<Vec<Stored<BgpPeer>>>,
    pub communities: Arc<Vec<Stored<Community>>>,
    pub bfd_profiles: Arc<Vec<Stored<BfdProfile>>>,
    pub nodes: Arc<Vec<Stored<Node>>>,
}

impl Objects {
    /// Each node's labels, as advertisements' and peers' `nodeSelectors` match them.
    pub fn node_labels(&self) -> lb_core::announcement::NodeLabels {
        self.nodes
            .iter()
            .filter_map(|node| {
                Some((
                    node.metadata.name.as_deref()?.into(),
                    node.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Each namespace's labels, as pools' `namespaceSelectors` match them.
    pub fn namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.namespaces
            .iter()
            .filter_map(|ns| {
                Some((ns.metadata.name.clone()?, ns.metadata.labels.clone().unwrap_or_default()))
            })
            .collect()
    }
}

impl ObjectStore {
    pub fn new() -> Self {
        ObjectStore::default()
    }

    /// Applies `change`; returns whether the objects differ afterwards.
    pub fn apply(&mut self, change: Change) -> bool {
        let kinds = match &change {
            Change::Reset { kinds, .. } => kinds.clone(),
            Change::Applied(object) => vec![object.kind()],
            Change::Deleted(object) => {
                Kind::ALL.iter().copied().filter(|k| k.name() == object.kind).collect()
            }
        };
        let changed = self.apply_change(change);
        if changed {
            for kind in kinds {
                self.changed(kind);
            }
        }
        changed
    }

    fn apply_change(&mut self, change: Change) -> bool {
        match change {
            Change::Reset { kinds, scope, objects } => {
                let in_scope = |key: &ObjectRef| scope.as_ref().is_none_or(|ns| &key.namespace == ns);
                let mut fresh = ObjectStore::new();
                for object in objects.into_iter().filter(|o| kinds.contains(&o.kind())) {
                    if object.reference().is_some_and(|r| in_scope(&r)) {
                        fresh.upsert(object);
                    }
                }
                let mut changed = false;
                for kind in kinds {
                    changed |= match kind {
                        Kind::Service => replace(
                            &mut self.services,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.services),
                            in_scope,
                        ),
                        Kind::EndpointSlice => replace(
                            &mut self.slices,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.slices),
                            in_scope,
                        ),
                        Kind::Endpoints => replace(
                            &mut self.endpoints,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.endpoints),
                            in_scope,
                        ),
                        Kind::Pool => replace(
                            &mut self.pools,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.pools),
                            in_scope,
                        ),
                        Kind::Namespace => replace(
                            &mut self.namespaces,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.namespaces),
                            in_scope,
                        ),
                        Kind::L2Advertisement => replace(
                            &mut self.l2_advertisements,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.l2_advertisements),
                            in_scope,
                        ),
                        Kind::BgpAdvertisement => replace(
                            &mut self.bgp_advertisements,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.bgp_advertisements),
                            in_scope,
                        ),
                        Kind::BgpPeer => replace(
                            &mut self.bgp_peers,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.bgp_peers),
                            in_scope,
                        ),
                        Kind::Community => replace(
                            &mut self.communities,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.communities),
                            in_scope,
                        ),
                        Kind::BfdProfile => replace(
                            &mut self.bfd_profiles,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.bfd_profiles),
                            in_scope,
                        ),
                        Kind::Node => replace(
                            &mut self.nodes,
                            &mut self.next_revision,
                            std::mem::take(&mut fresh.nodes),
                            in_scope,
                        ),
                    };
                }
                changed
            }
            Change::Applied(object) => self.upsert(object),
            Change::Deleted(object) => match object.kind {
                "Service" => self.services.remove(&object).is_some(),
                "EndpointSlice" => self.slices.remove(&object).is_some(),
                "Endpoints" => self.endpoints.remove(&object).is_some(),
                "IPAddressPool" => self.pools.remove(&object).is_some(),
                "Namespace" => self.namespaces.remove(&object).is_some(),
                "L2Advertisement" => self.l2_advertisements.remove(&object).is_some(),
                "BGPAdvertisement" => self.bgp_advertisements.remove(&object).is_some(),
                "BGPPeer" => self.bgp_peers.remove(&object).is_some(),
                "Community" => self.communities.remove(&object).is_some(),
                "BFDProfile" => self.bfd_profiles.remove(&object).is_some(),
                "Node" => self.nodes.remove(&object).is_some(),
                _ => false,
            },
        }
    }

    /// Stores `object` under its reference; returns whether that changed anything. An object
    /// without a name cannot be stored (sources never produce one; the manifest parser refuses it).
    fn upsert(&mut self, object: Object) -> bool {
        let Some(key) = object.reference() else {
            tracing::debug!(kind = object.kind().name(), "an object without a name was not stored");
            return false;
        };
        match object {
            Object::Service(service) => insert(&mut self.services, &mut self.next_revision, key, service),
            Object::EndpointSlice(slice) => insert(&mut self.slices, &mut self.next_revision, key, slice),
            Object::Endpoints(endpoints) => {
                insert(&mut self.endpoints, &mut self.next_revision, key, endpoints)
            }
            Object::Pool(pool) => insert(&mut self.pools, &mut self.next_revision, key, pool),
            Object::Namespace(namespace) => {
                insert(&mut self.namespaces, &mut self.next_revision, key, namespace)
            }
            Object::L2Advertisement(object) => {
                insert(&mut self.l2_advertisements, &mut self.next_revision, key, object)
            }
            Object::BgpAdvertisement(object) => {
                insert(&mut self.bgp_advertisements, &mut self.next_revision, key, object)
            }
            Object::BgpPeer(object) => insert(&mut self.bgp_peers, &mut self.next_revision, key, object),
            Object::Community(object) => insert(&mut self.communities, &mut self.next_revision, key, object),
            Object::BfdProfile(object) => {
                insert(&mut self.bfd_profiles, &mut self.next_revision, key, object)
            }
            Object::Node(object) => insert(&mut self.nodes, &mut self.next_revision, key, object),
        }
    }

    /// Every object, by kind; lists of kinds unchanged since the last call are shared with it.
    pub fn objects(&mut self) -> Objects {
        fn list<T: Send + Sync + 'static>(
            map: &BTreeMap<ObjectRef, Stored<T>>,
            old: &mut Arc<Vec<Stored<T>>>,
        ) {
            let old = std::mem::replace(old, Arc::new(map.values().cloned().collect()));
            crate::control::drop_aside(old);
        }
        let lists = &mut self.lists;
        for kind in std::mem::take(&mut self.stale) {
            match kind {
                Kind::Service => list(&self.services, &mut lists.services),
                Kind::EndpointSlice => list(&self.slices, &mut lists.slices),
                Kind::Endpoints => list(&self.endpoints, &mut lists.endpoints),
                Kind::Pool => list(&self.pools, &mut lists.pools),
                Kind::Namespace => list(&self.namespaces, &mut lists.namespaces),
                Kind::L2Advertisement => list(&self.l2_advertisements, &mut lists.l2_advertisements),
                Kind::BgpAdvertisement => list(&self.bgp_advertisements, &mut lists.bgp_advertisements),
                Kind::BgpPeer => list(&self.bgp_peers, &mut lists.bgp_peers),
                Kind::Community => list(&self.communities, &mut lists.communities),
                Kind::BfdProfile => list(&self.bfd_profiles, &mut lists.bfd_profiles),
                Kind::Node => list(&self.nodes, &mut lists.nodes),
            }
        }
        lists.clone()
    }

    /// Notes that `kind`'s list must be made again.
    fn changed(&mut self, kind: Kind) {
        if !self.stale.contains(&kind) {
            self.stale.push(kind);
        }
    }

    /// How many objects of each kind: (Services, EndpointSlices, Endpoints).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.endpoints.len())
    }
}

fn insert<T: PartialEq>(
    map: &mut BTreeMap<ObjectRef, Stored<T>>,
    next_revision: &mut u64,
    key: ObjectRef,
    value: T,
) -> bool {
    match map.get(&key) {
        Some(existing) if *existing.object == value => false,
        _ => {
            *next_revision += 1;
            map.insert(key, Stored { revision: *next_revision, object: Arc::new(value) });
            true
        }
    }
}

/// Replaces the objects of `map` that are `in_scope` by `fresh` (stored in a scratch store, whose
/// revisions are not used); whether anything changed.
fn replace<T: PartialEq + Clone>(
    map: &mut BTreeMap<ObjectRef, Stored<T>>,
    next_revision: &mut u64,
    fresh: BTreeMap<ObjectRef, Stored<T>>,
    in_scope: impl Fn(&ObjectRef) -> bool,
) -> bool {
    let before = map.len();
    let mut changed = false;
    map.retain(|key, value| !in_scope(key) || fresh.get(key).is_some_and(|f| f.object == value.object));
    changed |= map.len() != before;
    for (key, value) in fresh {
        let value = Arc::try_unwrap(value.object).unwrap_or_else(|shared| (*shared).clone());
        changed |= insert(map, next_revision, key, value);
    }
    changed
}

#[cfg(test)]
mod tests {
    use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, ready_slice, simple_service};

    use super::*;

    fn service(name: &str, ip: &str) -> Object {
        Object::from(simple_service("shop", name, ip, 80, 8080))
    }

    fn slice(slice: EndpointSlice) -> Object {
        SliceParser::default().object(&slice).expect("named")
    }

    #[test]
    fn a_slice_edit_of_what_no_build_reads_changes_nothing() {
        let mut store = ObjectStore::new();
        let original = SliceBuilder::new("shop", "web-abcde", "web")
            .port("http", 8080, "TCP")
            .pod_endpoint("10.0.0.1", Cond::ready(), "node-a", "web-1")
            .pod_endpoint("10.0.0.2", Cond::not_ready(), "node-b", "web-2")
            .annotation("ringlb.io/weight", "3");
        assert!(store.apply(Change::Applied(slice(original.clone().build()))));
        let touched = original
            .clone()
            .annotation("endpoints.kubernetes.io/last-change-trigger-time", "2026-12-01T00:00:00Z")
            .with(|slice| {
                let labels = slice.metadata.labels.get_or_insert_default();
                labels.insert("app".into(), "web".into());
                slice.metadata.uid = Some("5f3c2e1a-0000-4000-8000-000000000001".into());
                slice.metadata.resource_version = Some("4711".into());
            })
            .build();
        assert!(!store.apply(Change::Applied(slice(touched))), "labels, uid, resourceVersion");
        let revision = store.objects().slices[0].revision;
        let weighted = original.clone().annotation("ringlb.io/weight", "4").build();
        assert!(store.apply(Change::Applied(slice(weighted))), "ringlb's weight is read");
        let ready = SliceBuilder::new("shop", "web-abcde", "web")
            .port("http", 8080, "TCP")
            .pod_endpoint("10.0.0.1", Cond::ready(), "node-a", "web-1")
            .pod_endpoint("10.0.0.2", Cond::ready(), "node-b", "web-2")
            .annotation("ringlb.io/weight", "4")
            .build();
        assert!(store.apply(Change::Applied(slice(ready))), "a readiness change");
        assert!(store.objects().slices[0].revision > revision);
        let unnamed = SliceBuilder::new("shop", "", "web").build();
        assert!(SliceParser::default().object(&unnamed).is_none());
    }

    #[test]
    fn the_lists_of_unchanged_kinds_are_shared_and_changed_ones_are_current() {
        let mut store = ObjectStore::new();
        let web = |ready: &[&str]| slice(ready_slice("shop", "web-abcde", "web", 8080, ready));
        let reset = Change::everything(vec![service("web", "192.0.2.1"), web(&["10.0.0.1"])]);
        assert!(store.apply(reset));
        let first = store.objects();
        assert_eq!((first.services.len(), first.slices.len()), (1, 1));

        assert!(store.apply(Change::Applied(web(&["10.0.0.1", "10.0.0.2"]))));
        let second = store.objects();
        assert!(Arc::ptr_eq(&first.services, &second.services), "no Service changed");
        assert!(!Arc::ptr_eq(&first.slices, &second.slices));
        assert!(second.slices[0].revision > first.slices[0].revision, "the slice's new revision");

        assert!(!store.apply(Change::Applied(service("web", "192.0.2.1"))), "the same Service");
        let third = store.objects();
        assert!(Arc::ptr_eq(&second.services, &third.services) && Arc::ptr_eq(&second.slices, &third.slices));

        assert!(store.apply(Change::Deleted(ObjectRef::service("shop", "web"))));
        let fourth = store.objects();
        assert!(fourth.services.is_empty() && Arc::ptr_eq(&third.slices, &fourth.slices));
        assert_eq!(first.services.len(), 1, "a list handed out before stays as it was");
    }

    #[test]
    fn changes_apply_and_say_whether_anything_changed() {
        let mut store = ObjectStore::new();
        assert!(store.apply(Change::Applied(service("web", "192.0.2.1"))));
        assert!(!store.apply(Change::Applied(service("web", "192.0.2.1"))), "the same object again");
        assert!(store.apply(Change::Applied(service("web", "192.0.2.2"))), "a changed one");
        assert!(store.apply(Change::Applied(slice(ready_slice(
            "shop",
            "web-1",
            "web",
            8080,
            &["10.0.0.1"]
        )))));
        assert_eq!(store.counts(), (1, 1, 0));
        let web = ObjectRef::service("shop", "web");
        assert!(store.apply(Change::Deleted(web.clone())));
        assert!(!store.apply(Change::Deleted(web)), "already gone");
        assert_eq!(store.objects().slices.len(), 1);
    }

    #[test]
    fn a_reset_replaces_only_its_kinds_and_an_equal_one_changes_nothing() {
        let mut store = ObjectStore::new();
        store.apply(Change::Applied(slice(ready_slice("shop", "a-1", "a", 80, &["10.0.0.1"]))));
        let services = vec![service("a", "192.0.2.1"), service("b", "192.0.2.2")];
        let reset = Change::Reset { kinds: vec![Kind::Service], scope: None, objects: services };
        assert!(store.apply(reset.clone()));
        assert!(!store.apply(reset), "a relist that finds the same objects");
        assert_eq!(store.counts(), (2, 1, 0), "the slices were not part of the reset");
        assert!(store.apply(Change::everything(vec![service("a", "192.0.2.1")])));
        assert_eq!(store.counts(), (1, 0, 0));
        let unnamed = Object::from(ServiceBuilder::new("shop", "").build());
        assert!(!store.apply(Change::Applied(unnamed)));
    }

    #[test]
    fn a_scoped_reset_replaces_only_its_namespace() {
        let mut store = ObjectStore::new();
        let elsewhere = Object::from(simple_service("other", "api", "192.0.2.9", 80, 8080));
        store.apply(Change::everything(vec![service("a", "192.0.2.1"), elsewhere]));
        let relist = Change::Reset {
            kinds: vec![Kind::Service],
            scope: Some("shop".to_owned()),
            objects: vec![service("b", "192.0.2.2")],
        };
        assert!(store.apply(relist.clone()));
        let objects = store.objects();
        let names: Vec<&str> = objects.services.iter().map(|s| s.metadata.name.as_deref().unwrap()).collect();
        assert_eq!(names, ["api", "b"], "shop's a is gone, other's api stays");
        assert!(!store.apply(relist));
    }
}
