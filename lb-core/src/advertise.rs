//! Which VIPs a node advertises to the network (BGP mode): those it can serve right now.
//!
//! A VIP is advertised when at least one entry of the snapshot on that address (any port, any
//! protocol, any Service: Services may share an address) has an eligible backend. So a Service
//! whose endpoints all turn not ready, fail their health checks or (with
//! `externalTrafficPolicy: Local`) leave this node stops attracting traffic to this node, while a
//! VIP that another Service on the same address still serves stays advertised.
//!
//! Pure: the published snapshot in, the set of addresses out; the routing daemon's driver
//! (lb-sync) compares successive sets and only then touches the daemon.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::Snapshot;

/// The addresses of `snapshot` to advertise: see the module doc.
///
/// ```
/// let empty = lb_core::Snapshot::empty();
/// assert!(lb_core::advertised_vips(&empty).is_empty());
/// ```
pub fn advertised_vips(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    snapshot.entries().filter(|entry| !entry.eligible.is_empty()).map(|entry| entry.key.addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObjectRef, Protocol, ServiceEntry, TrafficPolicy, VipKey};
    use crate::testing::entry;

    fn on(addr: [u8; 4], port: u16, protocol: Protocol, service: &str, ready: &[bool]) -> ServiceEntry {
        let mut entry = entry(ready, TrafficPolicy::default());
        entry.key = VipKey::new(addr.into(), port, protocol);
        entry.service = ObjectRef::service("shop", service);
        entry
    }

    #[test]
    fn a_vip_with_an_eligible_backend_is_advertised_and_one_without_is_not() {
        let snapshot = Snapshot::from_entries(
            1,
            [
                on([192, 0, 2, 1], 80, Protocol::Tcp, "web", &[false, true]),
                on([192, 0, 2, 2], 80, Protocol::Tcp, "down", &[false, false]),
                on([192, 0, 2, 3], 80, Protocol::Tcp, "empty", &[]),
            ],
        );
        let advertised: Vec<IpAddr> = advertised_vips(&snapshot).into_iter().collect();
        assert_eq!(advertised, vec![IpAddr::from([192, 0, 2, 1])]);
    }

    #[test]
    fn a_shared_vip_is_advertised_while_any_of_its_services_or_ports_has_an_eligible_backend() {
        let vip = [192, 0, 2, 9];
        let shared = |dns_ready: bool, web_ready: bool| {
            Snapshot::from_entries(
                1,
                [
                    on(vip, 53, Protocol::Udp, "dns", &[dns_ready]),
                    on(vip, 53, Protocol::Tcp, "dns", &[dns_ready]),
                    on(vip, 443, Protocol::Tcp, "web", &[web_ready, false]),
                ],
            )
        };
        let advertised = |snapshot: &Snapshot| advertised_vips(snapshot).contains(&IpAddr::from(vip));
        assert!(advertised(&shared(true, false)), "dns alone keeps the address");
        assert!(advertised(&shared(false, true)), "web alone keeps the address");
        assert!(!advertised(&shared(false, false)), "no Service on it can serve");
    }

    #[test]
    fn ipv6_vips_are_advertised_as_well() {
        let vip: IpAddr = "2001:db8::1".parse().expect("an IPv6 address");
        let mut entry = on([0, 0, 0, 0], 80, Protocol::Tcp, "web", &[true]);
        entry.key.addr = vip;
        let snapshot = Snapshot::from_entries(1, [entry]);
        assert_eq!(advertised_vips(&snapshot).into_iter().collect::<Vec<_>>(), vec![vip]);
    }
}
