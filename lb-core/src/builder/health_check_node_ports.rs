//! Which `spec.healthCheckNodePort`s this node answers, and with how many local endpoints: the
//! input of kube-proxy's load-balancer health-check contract (external balancers probe every node
//! on a Service's health-check node port and send traffic only to the nodes that answer 200).
//!
//! The rule, as kube-proxy's (`LocalReadyEndpoints`, `service_health.go`):
//! 1. a Service has a health-check node port here when it is a `LoadBalancer` ringlb serves as
//!    such, with `externalTrafficPolicy: Local`, `spec.healthCheckNodePort` set and the node known
//!    ([`super::BuildOptions::node_name`]); without a node name nothing is answered, since the
//!    policy itself is then ignored;
//! 2. its local endpoints are its backends (every port, both address families) whose `nodeName`
//!    is this node and that are ready and not terminating, counted once per IP: a pod behind ports
//!    80 and 443 is one endpoint. Terminating endpoints are not counted even while they still serve
//!    (kube-proxy's choice: the node should be drained by the balancer while its pods stop), and
//!    health verdicts are not applied either (the contract is Kubernetes readiness);
//! 3. one Service per port: the Service that had the port in the previous snapshot keeps it, else
//!    the first in namespace/name order; every other claimant gets a
//!    [`BuildError::ConflictingHealthCheckNodePort`] (the API server never allows this; manifests
//!    can say anything) and is still served otherwise.
//!
//! Pure and cheap: a scan of the served Services for the ones with a port (a field test each), then
//! table lookups for those few only.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::endpoints::is_ready;
use super::service::ParsedService;
use crate::error::BuildError;
use crate::model::{HealthCheckNodePort, ServiceEntry, Snapshot, VipKey};

/// The health-check node ports of `candidates` (the Services the table was built from) as served by
/// `table` on `node`, sorted by port; see the module doc.
pub(super) fn health_check_node_ports(
    candidates: &[Arc<ParsedService>],
    table: &BTreeMap<VipKey, Arc<ServiceEntry>>,
    node: Option<&str>,
    previous: Option<&Snapshot>,
    errors: &mut Vec<BuildError>,
) -> Arc<[HealthCheckNodePort]> {
    let Some(node) = node else { return Arc::default() };
    let mut claims: BTreeMap<u16, Vec<&ParsedService>> = BTreeMap::new();
    for svc in candidates.iter() {
        if let Some(port) = svc.health_check_node_port {
            claims.entry(port).or_default().push(svc);
        }
    }
    if claims.is_empty() {
        return Arc::default();
    }
    let previous_owner = |port: u16| {
        let ports = previous.map(|p| p.health_check_node_ports().as_ref()).unwrap_or_default();
        ports.binary_search_by_key(&port, |p| p.port).ok().map(|i| &ports[i].service)
    };
    let mut answered = Vec::with_capacity(claims.len());
    for (port, claimants) in claims {
        // Candidates come in object order, so the first is the first by namespace/name.
        let owner = previous_owner(port)
            .and_then(|owner| claimants.iter().find(|svc| &svc.object == owner))
            .unwrap_or(&claimants[0]);
        for other in claimants.iter().filter(|svc| svc.object != owner.object) {
            errors.push(BuildError::ConflictingHealthCheckNodePort {
                object: other.object.clone(),
                owner: owner.object.clone(),
                port,
            });
        }
        answered.push(HealthCheckNodePort {
            port,
            service: owner.object.clone(),
            local_endpoints: local_endpoints(owner, table, node),
        });
    }
    answered.into()
}

/// The distinct IPs of `svc`'s ready, not terminating backends on `node`, over the entries it owns.
fn local_endpoints(svc: &ParsedService, table: &BTreeMap<VipKey, Arc<ServiceEntry>>, node: &str) -> u32 {
    let mut ips: Vec<IpAddr> = Vec::new();
    for vip in &svc.vips {
        for port in &svc.ports {
            let key = VipKey::new(vip.addr, port.port, port.protocol);
            // A key another Service won (a VIP conflict) says nothing about this one's endpoints.
            let Some(entry) = table.get(&key).filter(|entry| entry.service == svc.object) else { continue };
            ips.extend(
                entry
                    .backends
                    .iter()
                    .filter(|b| b.node_name() == Some(node) && is_ready(&b.conditions))
                    .map(|b| b.addr().ip()),
            );
        }
    }
    ips.sort_unstable();
    ips.dedup();
    u32::try_from(ips.len()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use testkit::objects::{Cond, ServiceBuilder, SliceBuilder, TargetPort};

    use crate::builder::{BuildOptions, BuildReport, apply_health, build};
    use crate::error::BuildError;
    use crate::model::{BackendId, HealthCheckNodePort, ObjectRef};

    /// A `LoadBalancer` Service `name` with `externalTrafficPolicy: Local` on `vip`, ports 80 and 443.
    fn local(name: &str, vip: &str, health_check_node_port: i32) -> ServiceBuilder {
        ServiceBuilder::new("shop", name)
            .service_type("LoadBalancer")
            .ingress_ips([vip])
            .port("http", 80, "TCP", TargetPort::Int(8080))
            .port("https", 443, "TCP", TargetPort::Int(8443))
            .external_traffic_policy("Local")
            .health_check_node_port(health_check_node_port)
    }

    /// `service`'s pods: (address, conditions, node), behind both of its ports.
    fn pods(service: &str, pods: &[(&str, Cond, &str)]) -> EndpointSlice {
        let slice = SliceBuilder::new("shop", &format!("{service}-1"), service)
            .port("http", 8080, "TCP")
            .port("https", 8443, "TCP");
        pods.iter()
            .enumerate()
            .fold(slice, |slice, (i, (ip, cond, node))| {
                slice.pod_endpoint(ip, *cond, node, &format!("{service}-{i}"))
            })
            .build()
    }

    fn on(node: Option<&str>) -> BuildOptions {
        BuildOptions { node_name: node.map(str::to_owned), ..BuildOptions::default() }
    }

    fn built(services: &[Service], slices: &[EndpointSlice], node: Option<&str>) -> BuildReport {
        build(services, slices, &[], &on(node), None, 1)
    }

    fn answered(report: &BuildReport) -> Vec<(u16, String, u32)> {
        let ports = report.snapshot.health_check_node_ports().iter();
        ports.map(|p| (p.port, p.service.name.clone(), p.local_endpoints)).collect()
    }

    #[test]
    fn local_endpoints_are_this_nodes_ready_ones_counted_once_per_ip() {
        let slices = [pods(
            "web",
            &[
                ("10.1.0.1", Cond::ready(), "node-a"),
                ("10.1.0.2", Cond::ready(), "node-a"),
                ("10.1.0.3", Cond::ready(), "node-b"),
                ("10.1.0.4", Cond::not_ready(), "node-a"),
                ("10.1.0.5", Cond::terminating(), "node-a"),
            ],
        )];
        let web = local("web", "192.0.2.1", 31000).build();
        let report = built(std::slice::from_ref(&web), &slices, Some("node-a"));
        assert!(report.is_clean(), "{report}");
        // Two ports per pod, one count per pod; not ready, terminating and remote pods count 0.
        assert_eq!(answered(&report), [(31000, "web".to_owned(), 2)]);
        assert_eq!(
            answered(&built(std::slice::from_ref(&web), &slices, Some("node-b"))),
            [(31000, "web".to_owned(), 1)]
        );
        assert_eq!(answered(&built(&[web], &slices, Some("node-c"))), [(31000, "web".to_owned(), 0)]);
    }

    #[test]
    fn only_local_load_balancers_on_a_known_node_have_a_health_check_node_port() {
        let slices = [pods("web", &[("10.1.0.1", Cond::ready(), "node-a")])];
        let web = local("web", "192.0.2.1", 31000).build();
        assert!(answered(&built(std::slice::from_ref(&web), &slices, None)).is_empty(), "appliance mode");
        let cluster = local("web", "192.0.2.1", 31000).external_traffic_policy("Cluster").build();
        assert!(answered(&built(&[cluster], &slices, Some("node-a"))).is_empty(), "Cluster policy");
        let external_ips = ServiceBuilder::new("shop", "web")
            .external_ips(["192.0.2.1"])
            .port("http", 80, "TCP", TargetPort::Int(8080))
            .external_traffic_policy("Local")
            .health_check_node_port(31000)
            .build();
        let report = built(&[external_ips], &slices, Some("node-a"));
        assert!(report.is_clean() && answered(&report).is_empty(), "not a LoadBalancer: {report}");
        let unset = local("web", "192.0.2.1", 0).build();
        assert!(answered(&built(&[unset], &slices, Some("node-a"))).is_empty(), "0 is unallocated");
    }

    #[test]
    fn an_invalid_health_check_node_port_rejects_the_service() {
        let report = built(&[local("web", "192.0.2.1", 70000).build()], &[], Some("node-a"));
        assert!(
            matches!(&report.errors[..], [BuildError::InvalidPort { field, value: 70000, .. }] if field == "spec.healthCheckNodePort"),
            "{report}"
        );
        assert!(report.snapshot.is_empty());
    }

    #[test]
    fn one_service_per_port_the_previous_owner_first_then_name_order() {
        let slices = [pods("b", &[("10.1.0.1", Cond::ready(), "node-a")])];
        let services = [local("b", "192.0.2.2", 31000).build(), local("c", "192.0.2.3", 31001).build()];
        let first = built(&services, &slices, Some("node-a"));
        assert_eq!(answered(&first), [(31000, "b".to_owned(), 1), (31001, "c".to_owned(), 0)]);

        // `a` claims b's port: b had it, so b keeps it; a's VIPs are served all the same.
        let mut claimed = services.to_vec();
        claimed.push(local("a", "192.0.2.1", 31000).build());
        let second = build(&claimed, &slices, &[], &on(Some("node-a")), Some(&first.snapshot), 2);
        assert_eq!(answered(&second), [(31000, "b".to_owned(), 1), (31001, "c".to_owned(), 0)]);
        let conflict = BuildError::ConflictingHealthCheckNodePort {
            object: ObjectRef::service("shop", "a"),
            owner: ObjectRef::service("shop", "b"),
            port: 31000,
        };
        assert_eq!(second.errors, [conflict]);
        assert_eq!(second.snapshot.len(), 6, "every VIP key of a, b and c is served");

        // Without a previous owner the first by namespace/name wins.
        let fresh = built(&claimed, &slices, Some("node-a"));
        assert_eq!(answered(&fresh), [(31000, "a".to_owned(), 0), (31001, "c".to_owned(), 0)]);
    }

    #[test]
    fn health_verdicts_leave_the_local_endpoint_count_alone() {
        let slices = [pods("web", &[("10.1.0.1", Cond::ready(), "node-a")])];
        let report = built(&[local("web", "192.0.2.1", 31000).build()], &slices, Some("node-a"));
        let mut options = on(Some("node-a"));
        let backend = BackendId("10.1.0.1:8080".parse().expect("addr"));
        options.health.mark(&ObjectRef::service("shop", "web"), backend);
        let applied = apply_health(&report.snapshot, &options, 2);
        let expected = HealthCheckNodePort {
            port: 31000,
            service: ObjectRef::service("shop", "web"),
            local_endpoints: 1,
        };
        assert_eq!(applied.health_check_node_ports().as_ref(), [expected]);
    }
}
