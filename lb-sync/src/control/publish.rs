//! Decides which builds become published snapshots, and logs each build's outcome once.
//!
//! A build whose entries equal the served ones is dropped (a touched file, a reformatted manifest or
//! a metadata-only edit must not make every worker reconcile listeners). Versions increase by one per
//! published snapshot and never repeat. Skipped Services are logged once per Service and reason while
//! they stay skipped, not on every reload; when many become skipped at once (a cluster's Services
//! before their addresses are allocated, a class of Services that is not ringlb's), one line per
//! reason says how many, with the names at debug. Rejected objects are logged per build.

use std::collections::BTreeMap;
use std::sync::Arc;

use lb_core::{BuildReport, ObjectRef, Skipped, Snapshot};

/// The served snapshot and what is needed to compare the next build with it.
#[derive(Default)]
pub(crate) struct Publisher {
    current: Option<Arc<Snapshot>>,
    /// The skips of the last build, sorted (as the builder gives them).
    logged_skips: Vec<Skipped>,
}

impl Publisher {
    pub(crate) fn current(&self) -> Option<&Arc<Snapshot>> {
        self.current.as_ref()
    }

    /// The version the next published snapshot carries: 1 first, since 0 is the empty start-up one.
    pub(crate) fn next_version(&self) -> u64 {
        self.current.as_ref().map_or(1, |snapshot| snapshot.version + 1)
    }

    /// Logs `report`'s rejections and skips; returns its snapshot when it must be published.
    pub(crate) fn accept(&mut self, report: BuildReport) -> Option<Arc<Snapshot>> {
        for error in &report.errors {
            tracing::warn!(%error, "object rejected");
        }
        for service in &report.kept_previous {
            tracing::warn!(%service, "serving this Service's entries from before the rejected edit");
        }
        self.log_new_skips(report.skipped);
        self.offer(report.snapshot)
    }

    /// Returns `snapshot` when its entries differ from the served ones, and makes it the served one.
    pub(crate) fn offer(&mut self, snapshot: Snapshot) -> Option<Arc<Snapshot>> {
        if self.current.as_deref().is_some_and(|current| same_entries(current, &snapshot)) {
            tracing::debug!("manifests changed but the served table did not; nothing to publish");
            return None;
        }
        let snapshot = Arc::new(snapshot);
        // Per-entry totals would touch every entry of a large table on every change: the entry
        // count is what the log carries; `check` and `/status` have the rest.
        tracing::info!(version = snapshot.version, entries = snapshot.len(), "publishing snapshot");
        self.current = Some(Arc::clone(&snapshot));
        Some(snapshot)
    }

    /// Logs the skips of `skipped` (sorted and deduplicated, as a build gives them) that the last
    /// build did not have. A merge of two sorted lists: no copy, no hashing of every skip.
    fn log_new_skips(&mut self, skipped: Vec<Skipped>) {
        let new = new_skips(&self.logged_skips, &skipped);
        if new.len() <= SKIPS_LOGGED_ONE_BY_ONE {
            for skip in new {
                tracing::info!(service = %skip.service, reason = skip.reason.as_str(), "service not served");
            }
        } else {
            let mut by_reason: BTreeMap<&str, (usize, &ObjectRef)> = BTreeMap::new();
            for skip in &new {
                tracing::debug!(service = %skip.service, reason = skip.reason.as_str(), "service not served");
                by_reason.entry(skip.reason.as_str()).or_insert((0, &skip.service)).0 += 1;
            }
            for (reason, (services, example)) in by_reason {
                tracing::info!(services, %example, reason, "services not served (names at debug level)");
            }
        }
        // Skips that ended are forgotten, so a Service that is skipped again later is logged again.
        self.logged_skips = skipped;
    }
}

/// The skips of `skipped` that `known` does not have; both sorted by (service, reason).
fn new_skips<'a>(known: &[Skipped], skipped: &'a [Skipped]) -> Vec<&'a Skipped> {
    let mut known = known.iter().peekable();
    let mut new = Vec::new();
    for skip in skipped {
        while known.next_if(|k| (&k.service, &k.reason) < (&skip.service, &skip.reason)).is_some() {}
        if known.next_if(|k| *k == skip).is_none() {
            new.push(skip);
        }
    }
    new
}

/// Up to this many new skips of one build get a line each; more get one line per reason.
const SKIPS_LOGGED_ONE_BY_ONE: usize = 8;

/// Whether two snapshots serve the same (everything but the version): entries, the health-check
/// node ports that external balancers probe, and who may announce which IP. Entries shared between them (`Arc`) are equal without
/// a look.
fn same_entries(current: &Snapshot, next: &Snapshot) -> bool {
    current.health_check_node_ports() == next.health_check_node_ports()
        && (Arc::ptr_eq(current.announcements(), next.announcements())
            || current.announcements() == next.announcements())
        && next.changes_from(current).all(|change| match change {
            (Some(before), Some(after)) => before.serves_like(after),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use lb_core::{
        Backend, EndpointConditions, EntryPolicy, Protocol, Scheduler, SchedulerKind, ServiceEntry, VipKey,
    };

    use super::*;

    #[test]
    fn only_skips_the_last_build_did_not_have_are_new() {
        let skip = |name: &str, reason: &str| Skipped {
            service: ObjectRef::service("default", name),
            reason: reason.to_owned(),
        };
        let known = [skip("a", "x"), skip("c", "x"), skip("d", "x")];
        let now = [skip("a", "x"), skip("b", "x"), skip("c", "y"), skip("d", "x"), skip("e", "x")];
        let new: Vec<_> = new_skips(&known, &now).into_iter().cloned().collect();
        assert_eq!(new, [skip("b", "x"), skip("c", "y"), skip("e", "x")]);
        assert!(new_skips(&now, &now).is_empty());
    }

    fn entry(ready: bool) -> ServiceEntry {
        let backend = Backend::ready(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)))
            .with_conditions(EndpointConditions { ready, ..EndpointConditions::default() });
        let eligible = if ready { vec![0] } else { vec![] };
        let backends = vec![backend];
        ServiceEntry {
            key: VipKey::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)), 80, Protocol::Tcp),
            service: ObjectRef::service("default", "web"),
            port_name: None,
            scheduler: Scheduler::build(SchedulerKind::RoundRobin, &backends, &eligible),
            backends: backends.into(),
            eligible,
            policy: EntryPolicy::default(),
            traffic: Default::default(),
        }
    }

    fn snapshot(version: u64, entries: Vec<ServiceEntry>) -> Snapshot {
        Snapshot::from_entries(version, entries)
    }

    #[test]
    fn first_build_is_published_as_version_one_even_when_empty() {
        let mut publisher = Publisher::default();
        assert_eq!(publisher.next_version(), 1);
        let published = publisher.offer(snapshot(1, vec![])).map(|s| s.version);
        assert_eq!(published, Some(1));
        assert_eq!(publisher.next_version(), 2);
    }

    #[test]
    fn a_build_with_equal_entries_is_not_published() {
        let mut publisher = Publisher::default();
        assert!(publisher.offer(snapshot(1, vec![entry(true)])).is_some());
        assert!(publisher.offer(snapshot(2, vec![entry(true)])).is_none());
        assert_eq!(publisher.current().map(|s| s.version), Some(1));
        assert_eq!(publisher.next_version(), 2);
    }

    #[test]
    fn a_readiness_flip_is_published_with_the_next_version() {
        let mut publisher = Publisher::default();
        assert!(publisher.offer(snapshot(1, vec![entry(true)])).is_some());
        let flipped = publisher.offer(snapshot(2, vec![entry(false)]));
        assert_eq!(
            flipped.map(|s| (s.version, s.entries().map(|e| e.eligible.len()).sum::<usize>())),
            Some((2, 0))
        );
    }

    #[test]
    fn a_build_that_changes_only_a_health_check_node_port_is_published() {
        use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};
        let service = |port: i32| {
            ServiceBuilder::new("shop", "web")
                .service_type("LoadBalancer")
                .ingress_ips(["192.0.2.1"])
                .port("http", 80, "TCP", TargetPort::Int(8080))
                .external_traffic_policy("Local")
                .health_check_node_port(port)
                .build()
        };
        let slices = [SliceBuilder::new("shop", "web-1", "web")
            .port("http", 8080, "TCP")
            .pod_endpoint("10.1.0.1", Cond::ready(), "node-a", "web-0")
            .build()];
        let options = lb_core::BuildOptions { node_name: Some("node-a".to_owned()), ..Default::default() };
        let build =
            |port: i32, version: u64| lb_core::build(&[service(port)], &slices, &[], &options, None, version);
        let mut publisher = Publisher::default();
        assert!(publisher.accept(build(31000, 1)).is_some());
        assert!(publisher.accept(build(31000, 2)).is_none(), "nothing changed");
        let moved = publisher.accept(build(31001, 2)).expect("the port moved: published");
        assert_eq!(moved.health_check_node_ports().iter().map(|p| p.port).collect::<Vec<_>>(), [31001]);
    }
}
