//! What one build computed, kept for the next ([`BuildCache`]): an unchanged Service is not parsed
//! again (slices come parsed), an unchanged Service's ports are not resolved again (backends,
//! eligibility, scheduler), and an unchanged entry is the same `Arc` in the next snapshot. One slice change then costs the
//! work of one Service plus the passes over names that every build makes.
//!
//! Invariants, which make a cached value always the one a fresh build would compute:
//! - a Service's parse is reused only for the same object name and the same *revision*, which the
//!   caller changes whenever the object's content changes (lb-sync's store does); an object given
//!   without a revision is parsed afresh;
//! - the last slices pass is patched only when the slices are the same names at the same
//!   positions (one per name, in name order, checked at the full pass) and only some revisions
//!   differ;
//! - a resolved port is reused only when it was resolved from the very same parsed Service and the
//!   very same parsed slices (`Arc` identity; the cache holds those `Arc`s, so no other value can
//!   take their addresses), under the same health overlay;
//! - an entry is reused only when built from the same parsed Service, resolved port and VIP;
//! - the options parsing depends on are compared at every build: any change empties the cache;
//! - what a build did not use is dropped at its end, so the cache stays the size of the table.

// foldhash: the keys are backend addresses and names from the cluster, hashed on every build;
// SipHash was a tenth of a full build. Seeded per process.
use foldhash::HashMap;
use std::collections::BTreeSet;
use std::sync::Arc;

use super::endpoints::ResolvedPort;
use super::service::ParsedService;
use super::service::ParsedServices;
use super::slices::{ParsedEndpointSlice, ParsedSlice, SlicesByService};
use super::vips::Vip;
use super::{BuildOptions, Skipped};
use crate::compact::CompactService;
use crate::error::BuildError;
use crate::health::HealthOverlay;
use crate::model::{EntryPolicy, ObjectRef, ServiceEntry, VipKey};
use crate::scheduler::{LoadRegistry, SchedulerKind};
use crate::selection::ServiceSelection;

/// An object with the caller's revision of it (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct Revised<'a, T> {
    pub object: &'a T,
    /// Changes whenever the object's content changes; equal revisions mean equal content.
    pub revision: u64,
}

/// Results of earlier builds; see the module doc. Keep one per sequence of builds (a control loop).
#[derive(Debug, Default)]
pub struct BuildCache {
    options: Option<OptionsKey>,
    health: HealthOverlay,
    generation: u64,
    /// The whole services pass of the last build, with the revisions of its input in order: when
    /// no Service changed, nothing of them is looked at again.
    services_pass: Option<(Vec<u64>, ServicesPass)>,
    /// The generation that reused `services_pass`.
    services_pass_reused: u64,
    /// The slices pass of the last build: its input's revisions and slices in order, and the
    /// slices by Service it gave (taken by a build, given back at its end).
    slices_pass: Option<SlicesPass>,
    slices_by_service: Option<super::slices::SlicesByService>,
    /// The owners of the keys of the last build, when no key was contested, with the candidates
    /// they were chosen among (an uncontested key's owner does not depend on the previous table).
    owners: Option<KnownOwners>,
    /// This build reuses the last owners (the candidates are the same).
    owners_reused: bool,
    /// The Services whose slices this build's patched slices pass changed (`None`: a full pass).
    touched: Option<std::collections::BTreeSet<(String, String)>>,
    /// The last build's table: a build that only touched a few Services' slices starts from it.
    last_table: Option<std::collections::BTreeMap<VipKey, Arc<ServiceEntry>>>,
    /// The generation that started from `last_table` (its unused slots are still valid then).
    from_last_table: u64,
    services: HashMap<ObjectRef, Slot<super::service::Outcome>>,
    /// By the parsed Service's address (the slot holds that `Arc`, so the address is its own), port
    /// index and family.
    ports: HashMap<(usize, usize, bool), PortSlot>,
    entries: HashMap<VipKey, EntrySlot>,
}

/// What the services pass of a build produced.
#[derive(Debug)]
struct ServicesPass {
    parsed: ParsedServices,
    with_selector: Arc<BTreeSet<(String, String)>>,
    errors: Vec<BuildError>,
    skipped: Vec<Skipped>,
}

/// The candidates of a build, their keys' owners, and each candidate's positions in the owners.
type KnownOwners = (Arc<Vec<Arc<ParsedService>>>, Owners, Vec<Vec<usize>>);

/// A table and the positions in the owners of the keys to build again.
type Restart = (std::collections::BTreeMap<VipKey, Arc<ServiceEntry>>, Vec<usize>);

/// Each key's owner: (key, candidate, port index, VIP), in key order.
pub(super) type Owners = Arc<Vec<(VipKey, usize, usize, Vip)>>;

/// The input of the last slices pass (one slice per name, in name order).
#[derive(Debug)]
struct SlicesPass {
    revisions: Vec<u64>,
    slices: Vec<ParsedEndpointSlice>,
    /// The positions of the slices whose parse gave errors or skips (what a patched pass reports).
    noisy: BTreeSet<usize>,
}

/// At most this many changed slices are patched into the last pass; more redo the pass.
const PATCH_LIMIT: usize = 256;

/// How many builds may pass between two prunes of the load registry (a prune walks every backend;
/// counters nothing holds cost a map slot until then, nothing else).
const PRUNE_EVERY: u64 = 32;

/// What of [`BuildOptions`] parsing and resolving read, besides the health overlay.
#[derive(Debug)]
struct OptionsKey {
    default_scheduler: SchedulerKind,
    default_policy: EntryPolicy,
    node_name: Option<String>,
    selection: ServiceSelection,
    load: LoadRegistry,
}

impl OptionsKey {
    fn of(options: &BuildOptions) -> Self {
        OptionsKey {
            default_scheduler: options.default_scheduler,
            default_policy: options.default_policy,
            node_name: options.node_name.clone(),
            selection: options.selection.clone(),
            load: options.load.clone(),
        }
    }

    fn same(&self, other: &OptionsKey) -> bool {
        self.default_scheduler == other.default_scheduler
            && self.default_policy == other.default_policy
            && self.node_name == other.node_name
            && self.selection == other.selection
            && self.load.same(&other.load)
    }
}

#[derive(Debug)]
pub(super) struct Slot<O> {
    revision: u64,
    value: Arc<O>,
    used: u64,
}

#[derive(Debug)]
struct PortSlot {
    service: Arc<ParsedService>,
    slices: Vec<Arc<ParsedSlice>>,
    resolved: Arc<ResolvedPort>,
    used: u64,
}

#[derive(Debug)]
struct EntrySlot {
    service: Arc<ParsedService>,
    port: Arc<ResolvedPort>,
    vip: Vip,
    entry: Arc<ServiceEntry>,
    used: u64,
}

/// The revision of each object of one build in input order, and by address (the objects outlive
/// the build; that map is made only when a pass looks objects up one by one).
pub(super) struct Revisions<T> {
    addresses: Vec<*const T>,
    in_order: Vec<u64>,
    by_address: std::cell::OnceCell<HashMap<*const T, u64>>,
}

impl<T> Revisions<T> {
    pub(super) fn of(objects: &[Revised<'_, T>]) -> Self {
        Revisions {
            addresses: objects.iter().map(|r| r.object as *const T).collect(),
            in_order: objects.iter().map(|r| r.revision).collect(),
            by_address: std::cell::OnceCell::new(),
        }
    }

    fn get(&self, object: &T) -> Option<u64> {
        let by_address = self
            .by_address
            .get_or_init(|| self.addresses.iter().copied().zip(self.in_order.iter().copied()).collect());
        by_address.get(&(object as *const T)).copied()
    }
}

/// Parses an object, or replays an earlier parse of the same revision.
pub(super) trait Memo<T, O> {
    fn get_or_insert(
        &mut self,
        object: &ObjectRef,
        value: &T,
        compute: &mut dyn FnMut(&ObjectRef, &T) -> O,
    ) -> Arc<O>;
}

/// No cache: every object is parsed.
pub(super) struct Fresh;

impl<T, O> Memo<T, O> for Fresh {
    fn get_or_insert(
        &mut self,
        object: &ObjectRef,
        value: &T,
        compute: &mut dyn FnMut(&ObjectRef, &T) -> O,
    ) -> Arc<O> {
        Arc::new(compute(object, value))
    }
}

/// The cache's memo of one kind of object.
pub(super) struct ByRevision<'c, T, O> {
    revisions: &'c Revisions<T>,
    slots: &'c mut HashMap<ObjectRef, Slot<O>>,
    generation: u64,
}

impl<T, O> Memo<T, O> for ByRevision<'_, T, O> {
    fn get_or_insert(
        &mut self,
        object: &ObjectRef,
        value: &T,
        compute: &mut dyn FnMut(&ObjectRef, &T) -> O,
    ) -> Arc<O> {
        let Some(revision) = self.revisions.get(value) else {
            return Arc::new(compute(object, value));
        };
        if let Some(slot) = self.slots.get_mut(object)
            && slot.revision == revision
        {
            slot.used = self.generation;
            return Arc::clone(&slot.value);
        }
        let computed = Arc::new(compute(object, value));
        let slot = Slot { revision, value: Arc::clone(&computed), used: self.generation };
        self.slots.insert(object.clone(), slot);
        computed
    }
}

impl BuildCache {
    pub fn new() -> Self {
        BuildCache::default()
    }

    /// Starts a build with `options`: forgets what they invalidate.
    pub(super) fn begin(&mut self, options: &BuildOptions) {
        let key = OptionsKey::of(options);
        if !self.options.as_ref().is_some_and(|known| known.same(&key)) {
            *self = BuildCache { options: Some(key), ..BuildCache::default() };
        }
        if self.health != options.health {
            self.ports.clear();
            self.entries.clear();
            self.last_table = None;
            self.health = options.health.clone();
        }
        self.owners_reused = false;
        self.touched = None;
        self.generation += 1;
    }

    /// Whether this build should prune the load registry.
    pub(super) fn prune_due(&self) -> bool {
        self.generation % PRUNE_EVERY == 1
    }

    /// The services pass of `services`: the last one whole if its input had exactly these
    /// revisions (revisions are never reused for other content, so the same sequence is the same
    /// Services), else a pass through the per-Service memo, kept for the next build.
    pub(super) fn services_pass(
        &mut self,
        services: &[&CompactService],
        options: &BuildOptions,
        revisions: &Revisions<CompactService>,
        errors: &mut Vec<BuildError>,
        skipped: &mut Vec<Skipped>,
    ) -> (ParsedServices, Arc<BTreeSet<(String, String)>>) {
        if let Some((known, pass)) = &self.services_pass
            && *known == revisions.in_order
        {
            // Its Services were not looked at, so their parses stay (see `end`).
            self.services_pass_reused = self.generation;
            errors.extend(pass.errors.iter().cloned());
            skipped.extend(pass.skipped.iter().cloned());
            return (pass.parsed.clone(), Arc::clone(&pass.with_selector));
        }
        let (mut pass_errors, mut pass_skipped) = (Vec::new(), Vec::new());
        let parsed = super::service::parse_all(
            services,
            options,
            &mut self.services(revisions),
            &mut pass_errors,
            &mut pass_skipped,
        );
        let with_selector = Arc::new(super::services_with_selector(services));
        errors.extend(pass_errors.iter().cloned());
        skipped.extend(pass_skipped.iter().cloned());
        let pass = ServicesPass {
            parsed: parsed.clone(),
            with_selector: Arc::clone(&with_selector),
            errors: pass_errors,
            skipped: pass_skipped,
        };
        self.services_pass = Some((revisions.in_order.clone(), pass));
        (parsed, with_selector)
    }

    /// Ends a build: drops what it did not use.
    pub(super) fn end(&mut self) {
        let generation = self.generation;
        if self.services_pass_reused != generation {
            self.services.retain(|_, slot| slot.used == generation);
        }
        if self.from_last_table != generation {
            self.ports.retain(|_, slot| slot.used == generation);
            self.entries.retain(|_, slot| slot.used == generation);
        }
    }

    fn services<'c>(
        &'c mut self,
        revisions: &'c Revisions<CompactService>,
    ) -> ByRevision<'c, CompactService, super::service::Outcome> {
        ByRevision { revisions, slots: &mut self.services, generation: self.generation }
    }

    /// The slices by Service of `slices`: the last pass patched where only some slices changed
    /// (same names, new revisions), else a full pass. Give the result back with
    /// [`BuildCache::keep_slices_by_service`] once the build is done with it.
    pub(super) fn slices_pass(
        &mut self,
        slices: &[&ParsedEndpointSlice],
        revisions: &Revisions<ParsedEndpointSlice>,
        errors: &mut Vec<BuildError>,
        skipped: &mut Vec<Skipped>,
    ) -> SlicesByService {
        let known = self.slices_by_service.take();
        if let Some(by_service) = known.and_then(|known| self.patch(known, slices, revisions))
            && let Some(pass) = &self.slices_pass
        {
            for outcome in pass.noisy.iter().map(|&i| &pass.slices[i].0) {
                errors.extend(outcome.errors.iter().cloned());
                skipped.extend(outcome.skipped.iter().cloned());
            }
            return by_service;
        }
        let unique = super::slices::unique(slices, errors);
        let by_service = super::slices::group(&unique, errors, skipped);
        // Only a pass over slices one per name in name order can be patched (a change then keeps
        // them so); other input is made so on every build.
        self.slices_pass = matches!(unique, std::borrow::Cow::Borrowed(_)).then(|| SlicesPass {
            revisions: revisions.in_order.clone(),
            slices: slices.iter().map(|&slice| slice.clone()).collect(),
            noisy: (slices.iter().enumerate()).filter(|(_, s)| s.0.is_noisy()).map(|(i, _)| i).collect(),
        });
        by_service
    }

    /// The owners chosen last time, if the candidates are the very same parsed Services.
    pub(super) fn owners(&mut self, candidates: &Arc<Vec<Arc<ParsedService>>>) -> Option<Owners> {
        let (known, owners, _) = self.owners.as_ref()?;
        let same = Arc::ptr_eq(known, candidates)
            || (known.len() == candidates.len()
                && known.iter().zip(candidates.iter()).all(|(a, b)| Arc::ptr_eq(a, b)));
        self.owners_reused = same;
        same.then(|| Arc::clone(owners))
    }

    /// Forgets the owners (this build's were contested, and are chosen again next time).
    pub(super) fn forget_owners(&mut self) {
        self.owners = None;
    }

    /// Keeps uncontested `owners` chosen among `candidates`.
    pub(super) fn keep_owners(&mut self, candidates: &Arc<Vec<Arc<ParsedService>>>, owners: &Owners) {
        let mut by_candidate = vec![Vec::new(); candidates.len()];
        for (position, &(_, s, _, _)) in owners.iter().enumerate() {
            by_candidate[s].push(position);
        }
        self.owners = Some((Arc::clone(candidates), Arc::clone(owners), by_candidate));
    }

    /// When only some Services' slices changed since the last build (same candidates, same
    /// owners, same health, a patched slices pass): the last table, and the positions in the owners
    /// of the keys to build again (those of the touched Services). Else `None`: build every key.
    pub(super) fn start_from_last_table(&mut self, candidates: &[Arc<ParsedService>]) -> Option<Restart> {
        if !self.owners_reused {
            return None;
        }
        let (touched, (_, _, by_candidate)) = (self.touched.as_ref()?, self.owners.as_ref()?);
        let table = self.last_table.take()?;
        let mut redo = Vec::new();
        for (namespace, name) in touched {
            let found = candidates.binary_search_by(|c| {
                (c.object.namespace.as_str(), c.object.name.as_str())
                    .cmp(&(namespace.as_str(), name.as_str()))
            });
            if let Ok(s) = found {
                redo.extend_from_slice(&by_candidate[s]);
            }
        }
        self.from_last_table = self.generation;
        Some((table, redo))
    }

    /// Keeps this build's table for the next.
    pub(super) fn keep_table(&mut self, table: &std::collections::BTreeMap<VipKey, Arc<ServiceEntry>>) {
        self.last_table = Some(table.clone());
    }

    /// Keeps `by_service` (unmirrored) for the next slices pass.
    pub(super) fn keep_slices_by_service(&mut self, by_service: SlicesByService) {
        self.slices_by_service = Some(by_service);
    }

    /// `by_service` with the slices whose revision changed put in place of their last version, if
    /// that is all that changed; `None` when a full pass is needed (nothing has been changed then).
    fn patch(
        &mut self,
        mut by_service: SlicesByService,
        slices: &[&ParsedEndpointSlice],
        revisions: &Revisions<ParsedEndpointSlice>,
    ) -> Option<SlicesByService> {
        let pass = self.slices_pass.as_mut()?;
        if pass.revisions.len() != revisions.in_order.len() {
            return None;
        }
        let changed: Vec<usize> =
            (0..revisions.in_order.len()).filter(|&i| pass.revisions[i] != revisions.in_order[i]).collect();
        if changed.len() > PATCH_LIMIT
            || changed.iter().any(|&i| slices[i].object() != pass.slices[i].object())
        {
            return None;
        }
        let mut touched = std::collections::BTreeSet::new();
        for &i in &changed {
            let fresh = slices[i].clone();
            let old = std::mem::replace(&mut pass.slices[i], fresh.clone());
            if let Some((key, parsed)) = &old.0.used
                && let Some(list) = by_service.get_mut(key)
            {
                list.retain(|p| !Arc::ptr_eq(p, parsed));
                if list.is_empty() {
                    by_service.remove(key);
                }
                touched.insert(key.clone());
            }
            if fresh.0.is_noisy() {
                pass.noisy.insert(i);
            } else {
                pass.noisy.remove(&i);
            }
            if let Some((key, parsed)) = &fresh.0.used {
                touched.insert(key.clone());
                let list = by_service.entry(key.clone()).or_default();
                let at = list.partition_point(|p| p.name < parsed.name);
                list.insert(at, Arc::clone(parsed));
            }
            pass.revisions[i] = revisions.in_order[i];
        }
        self.touched = Some(touched);
        Some(by_service)
    }

    /// Port `port` of `service` on its `slices` of one family, resolved by `resolve` unless it was
    /// resolved from the very same inputs before.
    pub(super) fn resolved(
        &mut self,
        service: &Arc<ParsedService>,
        port: usize,
        ipv6: bool,
        slices: &[Arc<ParsedSlice>],
        resolve: impl FnOnce() -> ResolvedPort,
    ) -> Arc<ResolvedPort> {
        let key = (Arc::as_ptr(service) as usize, port, ipv6);
        if let Some(slot) = self.ports.get_mut(&key)
            && Arc::ptr_eq(&slot.service, service)
            && slot.slices.len() == slices.len()
            && slot.slices.iter().zip(slices).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            slot.used = self.generation;
            return Arc::clone(&slot.resolved);
        }
        let resolved = Arc::new(resolve());
        let slot = PortSlot {
            service: Arc::clone(service),
            slices: slices.to_vec(),
            resolved: Arc::clone(&resolved),
            used: self.generation,
        };
        self.ports.insert(key, slot);
        resolved
    }

    /// The entry of `key`, built by `build` unless it was built from the same inputs before.
    pub(super) fn entry(
        &mut self,
        key: VipKey,
        service: &Arc<ParsedService>,
        port: &Arc<ResolvedPort>,
        vip: Vip,
        build: impl FnOnce() -> ServiceEntry,
    ) -> Arc<ServiceEntry> {
        if let Some(slot) = self.entries.get_mut(&key)
            && Arc::ptr_eq(&slot.service, service)
            && Arc::ptr_eq(&slot.port, port)
            && slot.vip == vip
        {
            slot.used = self.generation;
            return Arc::clone(&slot.entry);
        }
        let entry = Arc::new(build());
        let slot = EntrySlot {
            service: Arc::clone(service),
            port: Arc::clone(port),
            vip,
            entry: Arc::clone(&entry),
            used: self.generation,
        };
        self.entries.insert(key, slot);
        entry
    }
}
