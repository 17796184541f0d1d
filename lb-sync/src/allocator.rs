//! The leader's duty: allocate addresses (`lb_core::ipam::plan`) from the watched objects, write
//! them into each Service's `status.loadBalancer.ingress` with `ipMode: Proxy` through the status
//! subresource (a JSON merge patch), remove the status ringlb wrote from Services it no longer
//! owns, and say on each Service, as a Kubernetes Event, what was allocated or why nothing was.
//!
//! Only the leader writes; every replica serves what the statuses say (the builder serves only
//! allocated IPs in a cluster), so the datapath of all replicas follows the same state. A write
//! comes back through the watch, which is the only way the store learns it. Events are published
//! once per change of outcome, not per plan, so a Service stuck without an address does not
//! flood its events; failed writes are retried on the next plan and logged at most every 30 s.
//!
//! Cost: a cluster's first allocation writes every Service's status, and each write comes back as
//! a watch event. A write the watch has not shown yet is *pending* (what was written, over which
//! resourceVersion): it is not written again while the store still holds that resourceVersion,
//! and a change that only brings pending writes back (status as written, nothing else of the
//! Service different) plans nothing. So allocating 10,000 Services is 10,000 writes and one plan
//! plus what the events bring, not a plan and a rewrite of everything unseen per event.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use lb_core::ipam::{self, IP_MODE, Inputs, IpAddressPool, Plan};
use lb_core::{CompactService, LogThrottle, ObjectRef, ServiceSelection};
use serde_json::json;
use tokio::sync::watch;

use crate::events::{self, EventType, Note, Reporter};
use crate::store::Objects;

/// The Event `reportingController` and the field manager of status writes.
pub const CONTROLLER: &str = "ringlb.io/controller";

/// See the module doc.
pub struct Allocator {
    client: Client,
    selection: ServiceSelection,
    reporter: Reporter,
    /// The last outcome each Service was told about (its Event reason and message).
    told: BTreeMap<ObjectRef, (String, String)>,
    /// Status writes the watch has not shown yet (see the module doc).
    pending: HashMap<ObjectRef, Pending>,
    /// A write or an Event of the last round failed: the next round comes at this time too.
    retry_at: Option<tokio::time::Instant>,
    failures: LogThrottle,
    /// How full each pool is after the last plan (`/metrics`).
    usage: PoolUsageHandle,
}

/// The pools' usage as the leader's last plan left it; empty on a follower (it plans nothing).
pub type PoolUsageHandle = Arc<std::sync::Mutex<Vec<ipam::PoolUsage>>>;

/// A status written over a given version of the Service.
#[derive(Debug)]
struct Pending {
    ips: Vec<IpAddr>,
    over: Option<Box<str>>,
}

impl Allocator {
    pub fn new(client: Client, selection: ServiceSelection, identity: &str) -> Self {
        let reporter = Reporter { controller: CONTROLLER.to_owned(), instance: identity.to_owned() };
        Allocator {
            reporter,
            client,
            selection,
            told: BTreeMap::new(),
            pending: HashMap::new(),
            retry_at: None,
            failures: LogThrottle::new(Duration::from_secs(30)),
            usage: PoolUsageHandle::default(),
        }
    }

    /// Where the usage of the pools is kept after every plan.
    pub fn usage(&self) -> PoolUsageHandle {
        Arc::clone(&self.usage)
    }

    /// Plans and writes whenever the objects change while this replica leads, until `shutdown`.
    pub async fn run(
        mut self,
        mut objects: watch::Receiver<Arc<Objects>>,
        mut leading: watch::Receiver<bool>,
        shutdown: impl std::future::Future,
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        // What the last round planned from: a change of anything else (an EndpointSlice, most
        // changes of a large cluster) plans nothing.
        let mut planned: Option<Arc<Objects>> = None;
        loop {
            let objects_changed = tokio::select! {
                _ = &mut shutdown => return,
                changed = objects.changed() => if changed.is_err() { return } else { true },
                changed = leading.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // A new leader retells every outcome once.
                    self.told.clear();
                    false
                }
                // Writes that failed are retried even when nothing changes (only then: a plan
                // reads every Service).
                () = sleep_until_retry(self.retry_at), if self.retry_at.is_some() => false,
            };
            if !*leading.borrow() {
                // A follower writes nothing, so it has nothing to retry, and tells no usage.
                self.retry_at = None;
                self.usage.lock().unwrap_or_else(|e| e.into_inner()).clear();
                continue;
            }
            let current = Arc::clone(&objects.borrow_and_update());
            if objects_changed
                && let Some(before) = &planned
                && self.nothing_to_plan(before, &current)
            {
                planned = Some(current);
                continue;
            }
            self.reconcile(&current).await;
            planned = Some(current);
        }
    }

    /// Whether `after` gives the same plan as `before` did: allocation reads nothing that differs
    /// except statuses that are pending writes come back (which are then no longer pending).
    fn nothing_to_plan(&mut self, before: &Objects, after: &Objects) -> bool {
        if !same(&before.pools, &after.pools)
            || !same(&before.namespaces, &after.namespaces)
            || before.services.len() != after.services.len()
        {
            return false;
        }
        let mut acknowledged = Vec::new();
        for (old, new) in before.services.iter().zip(after.services.iter()) {
            if old.revision == new.revision {
                continue;
            }
            let Some(object) = new.object() else { return false };
            let comes_back = self.pending.get(&object).is_some_and(|p| p.ips == status_ips(new));
            if !comes_back || !old.same_but_status(new) {
                return false;
            }
            acknowledged.push(object);
        }
        for object in acknowledged {
            self.pending.remove(&object);
        }
        true
    }

    /// One round: plan from `objects` and write what differs.
    pub async fn reconcile(&mut self, objects: &Objects) {
        self.retry_at = None;
        let labels = objects.namespace_labels();
        let all: Vec<&CompactService> = objects.services.iter().map(|o| &**o).collect();
        let pools: Vec<&IpAddressPool> = objects.pools.iter().map(|o| &**o).collect();
        let plan = ipam::plan(Inputs {
            services: &all,
            pools: &pools,
            namespace_labels: &labels,
            selection: &self.selection,
        });
        *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = plan.usage.clone();
        for error in &plan.pool_errors {
            self.complain(&format!("IPAddressPool {:?} is unusable: {}", error.pool, error.reason));
        }
        let services: BTreeMap<ObjectRef, &CompactService> =
            all.iter().filter_map(|&s| Some((s.object()?, s))).collect();
        // A Service deleted before its write came back leaves nothing pending behind.
        self.pending.retain(|object, _| services.contains_key(object));
        self.write_statuses(&plan, &services).await;
        self.tell(&plan, &services).await;
    }

    async fn write_statuses(&mut self, plan: &Plan, services: &BTreeMap<ObjectRef, &CompactService>) {
        use futures::StreamExt as _;
        let releases = plan.releases.iter().map(|object| (object, Vec::new()));
        let assignments =
            plan.assignments.iter().map(|(object, assignment)| (object, assignment.ips.clone()));
        // Owned before any await: the future must not hold iterators over borrowed plans.
        let pending = &mut self.pending;
        let writes: Vec<(ObjectRef, Pending)> = assignments
            .chain(releases)
            .filter_map(|(object, ips)| {
                let service = services.get(object)?;
                let over = service.metadata.resource_version.clone();
                match pending.get(object) {
                    // Written over the version the store still holds: the watch has yet to show it.
                    Some(written) if written.over == over && written.ips == ips => return None,
                    Some(_) => {
                        pending.remove(object);
                    }
                    None => {}
                }
                (status_ips(service) != ips).then(|| (object.clone(), Pending { ips, over }))
            })
            .collect();
        let params = PatchParams { field_manager: Some(CONTROLLER.to_owned()), ..PatchParams::default() };
        let client = &self.client;
        let params = &params;
        // Several in flight: a cluster's first allocation writes every Service's status, and their
        // watch events then come back in batches the control loop builds once per batch.
        let results: Vec<(ObjectRef, Pending, Result<(), kube::Error>)> = futures::stream::iter(writes)
            .map(|(object, write)| async move {
                let ingress: Vec<serde_json::Value> =
                    write.ips.iter().map(|ip| json!({"ip": ip.to_string(), "ipMode": IP_MODE})).collect();
                // A merge patch replaces the list as a whole; null removes it.
                let patch = if ingress.is_empty() {
                    json!({"status": {"loadBalancer": {"ingress": null}}})
                } else {
                    json!({"status": {"loadBalancer": {"ingress": ingress}}})
                };
                let api: Api<k8s_openapi::api::core::v1::Service> =
                    Api::namespaced(client.clone(), &object.namespace);
                let result = api.patch_status(&object.name, params, &Patch::Merge(&patch)).await.map(|_| ());
                (object, write, result)
            })
            .buffer_unordered(STATUS_WRITES_IN_FLIGHT)
            .collect()
            .await;
        let mut written = 0;
        for (object, write, result) in results {
            match result {
                Ok(()) => {
                    written += 1;
                    tracing::debug!(service = %object, ips = ?write.ips, "status written");
                    self.pending.insert(object, write);
                }
                // Deleted meanwhile: the next plan no longer has it.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => {
                    self.retry_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY);
                    self.complain(&format!("writing the status of {object} failed: {error}"));
                }
            }
        }
        if written > 0 {
            tracing::info!(written, "load-balancer statuses written");
        }
    }

    /// Publishes an Event for every Service whose outcome changed since it was last told.
    async fn tell(&mut self, plan: &Plan, services: &BTreeMap<ObjectRef, &CompactService>) {
        let mut outcomes: BTreeMap<ObjectRef, (EventType, String, String)> = BTreeMap::new();
        for (object, assignment) in &plan.assignments {
            if !assignment.ips.is_empty() {
                let listed: Vec<String> = assignment
                    .ips
                    .iter()
                    .zip(&assignment.pools)
                    .map(|(ip, pool)| format!("{ip} (pool {pool})"))
                    .collect();
                let note = format!("assigned {}", listed.join(", "));
                outcomes.insert(object.clone(), (EventType::Normal, "IPAllocated".to_owned(), note));
            }
        }
        for problem in &plan.problems {
            // A Service with an address and a problem (its optional second family) tells both in one.
            let entry = outcomes.entry(problem.service().clone()).or_insert((
                EventType::Warning,
                problem.reason().to_owned(),
                String::new(),
            ));
            if entry.2.is_empty() {
                entry.2 = problem.to_string();
            } else {
                entry.2 = format!("{}; {problem}", entry.2);
                entry.0 = EventType::Warning;
            }
        }
        for object in &plan.releases {
            outcomes.insert(
                object.clone(),
                (
                    EventType::Normal,
                    "IPReleased".to_owned(),
                    "ringlb no longer serves this Service".to_owned(),
                ),
            );
        }
        self.told.retain(|object, _| outcomes.contains_key(object));
        for (object, (type_, reason, note)) in outcomes {
            let told = (reason.clone(), note.clone());
            if self.told.get(&object) == Some(&told) {
                continue;
            }
            let Some(service) = services.get(&object) else { continue };
            let note = Note { type_, reason, action: "Allocate".to_owned(), note };
            match events::publish(&self.client, &self.reporter, &note, &service.object_reference()).await {
                Ok(()) => {
                    self.told.insert(object, told);
                }
                Err(error) => {
                    self.retry_at.get_or_insert_with(|| tokio::time::Instant::now() + RETRY);
                    self.complain(&format!("publishing an Event on {object} failed: {error}"));
                }
            }
        }
    }

    fn complain(&mut self, message: &str) {
        if let Some(suppressed) = self.failures.admit(Instant::now()) {
            tracing::warn!(suppressed, "{message}");
        }
    }
}

async fn sleep_until_retry(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How soon a round that failed to write something is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// Status writes in flight at once.
const STATUS_WRITES_IN_FLIGHT: usize = 16;

/// Whether two lists of stored objects hold the same revisions in the same order.
fn same<T>(a: &[crate::store::Stored<T>], b: &[crate::store::Stored<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.revision == b.revision)
}

/// The addresses a Service's status holds with ringlb's `ipMode` (another mode is rewritten).
fn status_ips(service: &CompactService) -> Vec<IpAddr> {
    let entries = &service.ingress;
    if entries.iter().any(|i| i.ip_mode.as_deref() != Some(IP_MODE)) {
        return vec![];
    }
    entries.iter().filter_map(|i| i.ip.as_deref()?.parse().ok()).collect()
}
