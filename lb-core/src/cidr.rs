//! IPv4 and IPv6 address ranges (`10.0.0.0/8`, `2001:db8::/32`), as in
//! `spec.loadBalancerSourceRanges`.
//!
//! A [`Cidr`] is stored masked (host bits cleared, as Go's `net.ParseCIDR` reports the network) and
//! canonical: an IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) becomes the IPv4 range it denotes,
//! and clients are canonicalised the same way before matching, so a dual-stack socket's mapped client
//! address matches an IPv4 range. Parsing never panics.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Serialize;

/// An address range: a network address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why a string is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("expected ADDRESS/PREFIX, e.g. 10.0.0.0/8 or 2001:db8::/32")]
    MissingPrefix,
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    InvalidAddress(String),
    #[error("prefix {prefix:?} is not an integer in 0..={max}")]
    InvalidPrefix { prefix: String, max: u8 },
}

impl Cidr {
    /// The range of `addr` with `prefix` bits; host bits of `addr` are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(CidrError::InvalidPrefix { prefix: prefix.to_string(), max });
        }
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        Ok(Cidr { network: mask(addr, prefix), prefix })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The first and last address of the range.
    pub fn bounds(&self) -> (IpAddr, IpAddr) {
        match self.network {
            IpAddr::V4(v4) => {
                let host = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                (self.network, IpAddr::V4(Ipv4Addr::from(u32::from(v4) | host)))
            }
            IpAddr::V6(v6) => {
                let host = u128::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                (self.network, IpAddr::V6(Ipv6Addr::from(u128::from(v6) | host)))
            }
        }
    }

    /// Whether `ip` (canonicalised: IPv4-mapped IPv6 counts as IPv4) lies in this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.trim().split_once('/').ok_or(CidrError::MissingPrefix)?;
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::InvalidAddress(addr.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let invalid = || CidrError::InvalidPrefix { prefix: prefix.to_owned(), max };
        // Digits only: `u8::from_str` would also take a leading `+`.
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        Cidr::new(addr, prefix).map_err(|_| invalid())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn contains_agrees_with_comparing_the_top_prefix_bits(net in any::<u128>(), ip in any::<u128>(), prefix in 0u8..=128, v4 in any::<bool>()) {
            let (range, ip, same) = if v4 {
                let prefix = prefix % 33;
                let (net, ip) = (net as u32, ip as u32);
                let shift = 32 - u32::from(prefix);
                let same = net.checked_shr(shift).unwrap_or(0) == ip.checked_shr(shift).unwrap_or(0);
                (Cidr::new(IpAddr::V4(net.into()), prefix), IpAddr::V4(ip.into()), same)
            } else {
                let shift = 128 - u32::from(prefix);
                let same = net.checked_shr(shift).unwrap_or(0) == ip.checked_shr(shift).unwrap_or(0);
                (Cidr::new(IpAddr::V6(net.into()), prefix), IpAddr::V6(ip.into()), same)
            };
            let range = range.expect("prefix in range");
            // Mapped IPv6 addresses and ranges are canonicalised to IPv4: compare like with like.
            prop_assume!(range.network().is_ipv4() == v4 && ip.to_canonical().is_ipv4() == v4);
            prop_assert_eq!(range.contains(ip), same, "{} contains {}?", range, ip);
            prop_assert_eq!(range.to_string().parse::<Cidr>(), Ok(range));
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn ipv4_ranges_contain_their_addresses_only() {
        let range = cidr("10.1.0.0/16");
        assert!(range.contains(ip("10.1.255.3")));
        assert!(!range.contains(ip("10.2.0.1")));
        assert!(range.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped clients match IPv4 ranges");
        assert!(!range.contains(ip("2001:db8::1")));
        assert!(cidr("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("192.0.2.7/32").contains(ip("192.0.2.7")));
        assert!(!cidr("192.0.2.7/32").contains(ip("192.0.2.6")));
    }

    #[test]
    fn ipv6_ranges_contain_their_addresses_only() {
        let range = cidr("2001:db8::/32");
        assert!(range.contains(ip("2001:db8:ffff::1")));
        assert!(!range.contains(ip("2001:db9::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")), "mapped range is the IPv4 one");
        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
    }

    #[test]
    fn host_bits_are_cleared_and_display_shows_the_network() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("2001:db8::1/32").to_string(), "2001:db8::/32");
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            "",
            "10.0.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} must be refused");
        }
    }
}
