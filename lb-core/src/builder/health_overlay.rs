//! Applies new health verdicts to a built snapshot without rebuilding it from the objects.
//!
//! Health changes far more often than Services do, and a full build re-parses every object and
//! rebuilds every Maglev table. [`apply_health`] recomputes only each entry's eligible set (with the
//! same rule as the builder: readiness tiers, `externalTrafficPolicy: Local`, overlay, panic mode)
//! and rebuilds the scheduler of the entries whose set changed; the others are shared by `Arc`.
//! Pure: the same snapshot and options give the same result as a full build with those options.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::BuildOptions;
use super::endpoints::eligible_of;
use crate::model::{ServiceEntry, Snapshot};
use crate::scheduler::Scheduler;

/// `snapshot` with `options.health` (and `options.node_name`) applied, as version `version`.
pub fn apply_health(snapshot: &Snapshot, options: &BuildOptions, version: u64) -> Snapshot {
    let mut table = BTreeMap::new();
    for entry in snapshot.entries() {
        let node = options.node_name.as_deref().filter(|_| entry.traffic.node_local);
        let eligible =
            eligible_of(&entry.backends, node, |b| options.health.is_unhealthy(&entry.service, b.id));
        let next = if eligible == entry.eligible {
            Arc::clone(entry)
        } else {
            let scheduler = Scheduler::build_with(&entry.scheduler.config(), &entry.backends, &eligible);
            Arc::new(ServiceEntry {
                key: entry.key,
                service: entry.service.clone(),
                port_name: entry.port_name.clone(),
                backends: entry.backends.clone(),
                eligible,
                scheduler,
                policy: entry.policy,
                traffic: entry.traffic.clone(),
            })
        };
        table.insert(entry.key, next);
    }
    // Health verdicts never change readiness, so the health-check node ports stay as they are.
    Snapshot::from_parts(version, table, Arc::clone(snapshot.last_good()))
        .with_health_check_node_ports(Arc::clone(snapshot.health_check_node_ports()))
        .with_announcements(Arc::clone(snapshot.announcements()))
}

#[cfg(test)]
mod tests {
    use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};

    use super::*;
    use crate::annotations::SCHEDULER;
    use crate::builder::build;
    use crate::model::{BackendId, ObjectRef};

    #[test]
    fn applying_health_equals_building_with_it_and_shares_unchanged_entries() {
        let services = ["web", "api"].map(|name| {
            ServiceBuilder::new("default", name)
                .external_ips([if name == "web" { "127.0.0.10" } else { "127.0.0.11" }])
                .port("", 80, "TCP", TargetPort::Int(8080))
                .annotation(SCHEDULER, "maglev")
                .build()
        });
        let slices = ["web", "api"].map(|name| {
            SliceBuilder::new("default", &format!("{name}-1"), name)
                .port("", 8080, "TCP")
                .endpoint("127.0.0.1", Cond::ready())
                .endpoint("127.0.0.2", Cond::ready())
                .endpoint("127.0.0.3", Cond::terminating())
                .build()
        });
        let plain = build(&services, &slices, &[], &BuildOptions::default(), None, 1).snapshot;
        let mut options = BuildOptions::default();
        options
            .health
            .mark(&ObjectRef::service("default", "web"), BackendId("127.0.0.1:8080".parse().expect("addr")));
        let full = build(&services, &slices, &[], &options, None, 2).snapshot;
        let applied = apply_health(&plain, &options, 2);
        assert_eq!(applied.version, 2);
        for (a, b) in full.entries().zip(applied.entries()) {
            assert_eq!((a.key, &a.eligible), (b.key, &b.eligible));
            let (Scheduler::Maglev(x), Scheduler::Maglev(y)) = (&a.scheduler, &b.scheduler) else {
                panic!("maglev expected");
            };
            assert_eq!(x.digest, y.digest, "same table as a full build");
        }
        let changed: Vec<bool> =
            plain.entries().zip(applied.entries()).map(|(p, a)| !Arc::ptr_eq(p, a)).collect();
        assert_eq!(changed, [true, false], "only web (127.0.0.10) is rebuilt; api is shared");

        let healed = apply_health(&applied, &BuildOptions::default(), 3);
        assert!(healed.entries().zip(plain.entries()).all(|(h, p)| h.eligible == p.eligible));
    }
}
