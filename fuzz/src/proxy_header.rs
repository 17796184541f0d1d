//! Target `proxy_header`: PROXY protocol headers for arbitrary addresses, decoded back by an
//! independent parser (the `ppp` crate).
//!
//! Input bytes, read in order (missing bytes count as zero, so every input is a case): the version
//! (`% 3`: none, v1, v2), the transport (`% 3`: TCP, UDP, SCTP), the families (bit 0: source is
//! IPv6, bit 1: destination is IPv6), then source address and port, destination address and port
//! (big endian). Checks `lb_core::proxy_protocol`'s invariants: a header exactly when the version
//! has one for the transport; it decodes to the addresses it was given, canonicalised (a v4-mapped
//! address is its IPv4 address), both in one family (IPv4 only when both are); v1 within the
//! specification's 107 bytes, v2 exactly 28 or 52 bytes with the PROXY command and no TLVs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_core::proxy_protocol::MAX_HEADER_LEN;
use lb_core::{Protocol, ProxyHeader, ProxyProtocol};

pub fn run(data: &[u8]) {
    let mut bytes = data.iter().copied().chain(std::iter::repeat(0));
    let mut next = || bytes.next().expect("an endless iterator");
    let version = [ProxyProtocol::None, ProxyProtocol::V1, ProxyProtocol::V2][usize::from(next() % 3)];
    let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][usize::from(next() % 3)];
    let families = next();
    let mut address = |v6: bool| {
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|_| next())))
        } else {
            IpAddr::V4(Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|_| next())))
        };
        SocketAddr::new(ip, u16::from_be_bytes([next(), next()]))
    };
    let source = address(families & 1 != 0);
    let destination = address(families & 2 != 0);
    check(version, protocol, source, destination);
}

fn check(version: ProxyProtocol, protocol: Protocol, source: SocketAddr, destination: SocketAddr) {
    let header = ProxyHeader::encode(version, protocol, source, destination);
    let expected = version != ProxyProtocol::None && version.supports(protocol);
    assert_eq!(header.is_some(), expected, "{version:?} over {protocol:?}: {header:?}");
    let Some(header) = header else { return };
    let bytes = header.as_bytes();
    assert!(bytes.len() <= MAX_HEADER_LEN);
    let both_v4 = source.ip().to_canonical().is_ipv4() && destination.ip().to_canonical().is_ipv4();
    let (decoded, v4) = match version {
        ProxyProtocol::V1 => {
            assert!(bytes.len() <= 107, "v1 is at most 107 bytes: {header:?}");
            let parsed = ppp::v1::Header::try_from(bytes).expect("ppp parses our v1 header");
            assert_eq!(parsed.header.len(), bytes.len(), "the header is the whole encoding");
            match parsed.addresses {
                ppp::v1::Addresses::Tcp4(a) => (v4_pair(a), true),
                ppp::v1::Addresses::Tcp6(a) => (v6_pair(a), false),
                other => panic!("v1 sent {other:?}"),
            }
        }
        ProxyProtocol::V2 => {
            assert_eq!(bytes.len(), if both_v4 { 28 } else { 52 }, "{header:?}");
            let parsed = ppp::v2::Header::try_from(bytes).expect("ppp parses our v2 header");
            assert_eq!(parsed.len(), bytes.len(), "the header is the whole encoding");
            assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            let transport = if protocol == Protocol::Tcp {
                ppp::v2::Protocol::Stream
            } else {
                ppp::v2::Protocol::Datagram
            };
            assert_eq!(parsed.protocol, transport);
            assert_eq!(parsed.tlvs().count(), 0);
            match parsed.addresses {
                ppp::v2::Addresses::IPv4(a) => (v4_pair(a), true),
                ppp::v2::Addresses::IPv6(a) => (v6_pair(a), false),
                other => panic!("v2 sent {other:?}"),
            }
        }
        ProxyProtocol::None => unreachable!("no header is encoded for none"),
    };
    assert_eq!(v4, both_v4, "family of {source} -> {destination}: {header:?}");
    let canonical = |a: SocketAddr| (a.ip().to_canonical(), a.port());
    assert_eq!(
        (canonical(decoded.0), canonical(decoded.1)),
        (canonical(source), canonical(destination)),
        "{header:?}"
    );
    check_local(version);
}

/// A health check's header (`PROXY UNKNOWN`, v2 `LOCAL`) parses too.
fn check_local(version: ProxyProtocol) {
    let header = ProxyHeader::local(version).expect("every version but none has a local header");
    match version {
        ProxyProtocol::V1 => {
            let parsed = ppp::v1::Header::try_from(header.as_bytes()).expect("ppp parses v1 UNKNOWN");
            assert_eq!(parsed.addresses, ppp::v1::Addresses::Unknown);
        }
        _ => {
            let parsed = ppp::v2::Header::try_from(header.as_bytes()).expect("ppp parses v2 LOCAL");
            assert_eq!(parsed.command, ppp::v2::Command::Local);
        }
    }
}

// ppp's v1 and v2 share these address types.
fn v4_pair(a: ppp::v2::IPv4) -> (SocketAddr, SocketAddr) {
    ((a.source_address, a.source_port).into(), (a.destination_address, a.destination_port).into())
}

fn v6_pair(a: ppp::v2::IPv6) -> (SocketAddr, SocketAddr) {
    ((a.source_address, a.source_port).into(), (a.destination_address, a.destination_port).into())
}
