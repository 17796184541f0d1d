//! Which Services ringlb serves, and from which of their fields it takes the addresses.
//!
//! A `LoadBalancer` Service is ringlb's when its `spec.loadBalancerClass` is ringlb's class, or
//! when it has none and ringlb is the cluster's default implementation (`--default-class`). A
//! Service of another class is never served and never written to, its `externalIPs` included
//! (another implementation owns it). `spec.externalIPs` of any other Service are served unless
//! turned off (`--external-ips=false`).
//!
//! In a cluster the load-balancer IPs are the ones the allocator wrote into
//! `status.loadBalancer.ingress` ([`VipSource::Allocated`]): an IP merely requested by an
//! annotation is never served, since it may be another Service's. Standalone (manifests, nothing
//! allocates) the requested IPs are served directly ([`VipSource::Requested`]).

use crate::compact::CompactService;

/// ringlb's own class, the default of `--load-balancer-class`.
pub const DEFAULT_CLASS: &str = "ringlb.io/lb";

/// Where load-balancer IPs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipSource {
    /// The status, else the requested IPs (`metallb.io/loadBalancerIPs`, `spec.loadBalancerIP`).
    Requested,
    /// The status only: what the allocator assigned.
    Allocated,
}

/// See the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSelection {
    pub class: String,
    /// Also serve `LoadBalancer` Services without a class.
    pub default_class: bool,
    /// Serve `spec.externalIPs`.
    pub external_ips: bool,
    pub vips: VipSource,
}

impl Default for ServiceSelection {
    /// Standalone: ringlb's class and classless Services (the manifests are ringlb's own input),
    /// external IPs, requested IPs served.
    fn default() -> Self {
        ServiceSelection {
            class: DEFAULT_CLASS.to_owned(),
            default_class: true,
            external_ips: true,
            vips: VipSource::Requested,
        }
    }
}

/// What the selection makes of one Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// A `LoadBalancer` Service of ringlb's: its load-balancer IPs (and external IPs) are served,
    /// and in a cluster it gets an allocation and a status.
    LoadBalancer,
    /// Not a `LoadBalancer` Service of ringlb's, but its `externalIPs` are served.
    ExternalIpsOnly,
    /// Not ringlb's at all.
    NotOurs(&'static str),
}

impl ServiceSelection {
    pub fn ownership(&self, svc: &CompactService) -> Ownership {
        let is_load_balancer = svc.is_load_balancer();
        if is_load_balancer {
            match svc.class() {
                Some(class) if class == self.class => return Ownership::LoadBalancer,
                None if self.default_class => return Ownership::LoadBalancer,
                Some(_) => {
                    return Ownership::NotOurs("its loadBalancerClass belongs to another implementation");
                }
                None => {}
            }
        }
        let has_external = !svc.spec.external_ips.is_empty();
        match (is_load_balancer, has_external, self.external_ips) {
            (_, true, true) => Ownership::ExternalIpsOnly,
            (true, _, _) => Ownership::NotOurs(
                "a LoadBalancer without loadBalancerClass, and ringlb is not the default class",
            ),
            (false, true, false) => Ownership::NotOurs("serving externalIPs is turned off"),
            (false, false, _) => Ownership::NotOurs("no externalIPs and not a LoadBalancer"),
        }
    }

    /// Whether ringlb allocates for and writes the status of `svc`.
    pub fn allocates_for(&self, svc: &CompactService) -> bool {
        self.ownership(svc) == Ownership::LoadBalancer
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Service, ServiceSpec};

    use super::*;

    fn service(type_: &str, class: Option<&str>, external: &[&str]) -> CompactService {
        CompactService::from(Service {
            spec: Some(ServiceSpec {
                type_: Some(type_.to_owned()),
                load_balancer_class: class.map(str::to_owned),
                external_ips: (!external.is_empty())
                    .then(|| external.iter().map(|s| (*s).to_owned()).collect()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }

    #[test]
    fn the_class_decides_for_load_balancers_and_another_class_is_never_ours() {
        let cluster = ServiceSelection {
            default_class: false,
            vips: VipSource::Allocated,
            ..ServiceSelection::default()
        };
        assert_eq!(
            cluster.ownership(&service("LoadBalancer", Some(DEFAULT_CLASS), &[])),
            Ownership::LoadBalancer
        );
        assert!(matches!(cluster.ownership(&service("LoadBalancer", None, &[])), Ownership::NotOurs(_)));
        assert!(matches!(
            cluster.ownership(&service("LoadBalancer", Some("other.io/lb"), &["192.0.2.1"])),
            Ownership::NotOurs(_)
        ));
        let default = ServiceSelection { default_class: true, ..cluster.clone() };
        assert_eq!(default.ownership(&service("LoadBalancer", None, &[])), Ownership::LoadBalancer);
        assert!(matches!(
            default.ownership(&service("LoadBalancer", Some("other.io/lb"), &[])),
            Ownership::NotOurs(_)
        ));
    }

    #[test]
    fn external_ips_of_other_services_are_served_unless_turned_off() {
        let on = ServiceSelection::default();
        assert_eq!(on.ownership(&service("ClusterIP", None, &["192.0.2.1"])), Ownership::ExternalIpsOnly);
        let classless = ServiceSelection { default_class: false, ..on.clone() };
        assert_eq!(
            classless.ownership(&service("LoadBalancer", None, &["192.0.2.1"])),
            Ownership::ExternalIpsOnly
        );
        assert!(!classless.allocates_for(&service("LoadBalancer", None, &["192.0.2.1"])));
        let off = ServiceSelection { external_ips: false, ..on };
        assert!(matches!(off.ownership(&service("ClusterIP", None, &["192.0.2.1"])), Ownership::NotOurs(_)));
        assert!(matches!(off.ownership(&service("ClusterIP", None, &[])), Ownership::NotOurs(_)));
    }
}
