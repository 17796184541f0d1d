//! PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): which version an entry sends
//! its backends, and the header that tells a backend the client's address.
//!
//! Pure: [`ProxyHeader::encode`] writes into a fixed array held by value, so the datapath builds a
//! header per connection (or per UDP flow) without allocating. Invariants:
//! - a header always names the client as source and the VIP:port the client addressed as
//!   destination, in one address family: a v4-mapped IPv6 address is written as the IPv4 address it
//!   maps, and when one side is IPv4 and the other IPv6 the IPv4 side is written v4-mapped (both
//!   forms are what the peer's own sockets would report);
//! - v1 exists for TCP only (`TCP4`/`TCP6`; `UNKNOWN` is never sent), v2 for TCP (`STREAM`) and UDP
//!   (`DGRAM`, one header at the start of every datagram as the specification allows); SCTP has no
//!   transport code in either version and never gets a header;
//! - v2 headers carry the `PROXY` command and no TLVs, so their length is fixed per family (28 bytes
//!   for IPv4, 52 for IPv6).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::Serialize;

use crate::model::Protocol;

/// Which PROXY protocol header an entry's backends receive first (`ringlb.io/proxy-protocol`,
/// `--proxy-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocol {
    /// No header: the backend sees ringlb's address as the client's.
    #[default]
    None,
    /// The text header (`PROXY TCP4 …\r\n`); TCP only.
    V1,
    /// The binary header; TCP, and UDP (a header in every datagram).
    V2,
}

impl ProxyProtocol {
    pub const NAMES: &'static str = "none, v1, v2";

    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "none" => Ok(ProxyProtocol::None),
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            other => Err(format!("unknown value {other:?} (known: {})", Self::NAMES)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::None => "none",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }

    /// Whether a `protocol` port can be served as asked: v1 has a header for TCP, v2 for TCP and
    /// UDP, and `none` asks for nothing.
    pub fn supports(self, protocol: Protocol) -> bool {
        match (self, protocol) {
            (ProxyProtocol::None, _) => true,
            (ProxyProtocol::V1, Protocol::Tcp) => true,
            (ProxyProtocol::V2, Protocol::Tcp | Protocol::Udp) => true,
            (_, _) => false,
        }
    }

    /// What an entry of `protocol` sends: this version where it has a header for the protocol,
    /// else none (a global default of `v1` leaves UDP and SCTP entries alone).
    pub fn for_protocol(self, protocol: Protocol) -> ProxyProtocol {
        if self.supports(protocol) { self } else { ProxyProtocol::None }
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest header of either version: v1's bound (107 bytes with its CRLF) rounded up.
pub const MAX_HEADER_LEN: usize = 108;

/// One encoded header, held by value (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl fmt::Debug for ProxyHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyHeader({:02x?})", self.as_bytes())
    }
}

/// Both addresses in one family (see the module doc).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let (source, destination) = (canonical(source), canonical(destination));
    let mapped = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (mapped(source), mapped(destination))
    }
}

/// Appends to a fixed array; the callers' bounds (checked by the tests at the extremes) keep every
/// write inside it.
struct Writer {
    bytes: [u8; MAX_HEADER_LEN],
    len: usize,
}

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

impl Writer {
    fn put(&mut self, data: &[u8]) {
        let end = (self.len + data.len()).min(MAX_HEADER_LEN);
        let taken = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&data[..taken]);
        self.len = end;
    }
}

impl ProxyHeader {
    /// The header `version` sends for a `protocol` connection (or datagram) from `source` (the
    /// client) to `destination` (the VIP:port it addressed); `None` when the version has no header
    /// for the protocol (see [`ProxyProtocol::supports`]), or is [`ProxyProtocol::None`].
    pub fn encode(
        version: ProxyProtocol,
        protocol: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Option<ProxyHeader> {
        let (source, destination) = same_family(source, destination);
        let mut out = Writer { bytes: [0; MAX_HEADER_LEN], len: 0 };
        match (version, protocol) {
            (ProxyProtocol::V1, Protocol::Tcp) => {
                let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
                // `Ipv6Addr`'s Display is RFC 5952's compressed form, which parsers accept; a
                // v4-mapped one prints as `::ffff:a.b.c.d`, also valid IPv6 text.
                let _ = fmt::Write::write_fmt(
                    &mut out,
                    format_args!(
                        "PROXY {family} {} {} {} {}\r\n",
                        source.ip(),
                        destination.ip(),
                        source.port(),
                        destination.port()
                    ),
                );
            }
            (ProxyProtocol::V2, Protocol::Tcp | Protocol::Udp) => {
                let transport = if protocol == Protocol::Tcp { 0x1 } else { 0x2 };
                let (family, address_len) = if source.is_ipv4() { (0x10, 12u16) } else { (0x20, 36u16) };
                out.put(&V2_SIGNATURE);
                // Version 2, command PROXY.
                out.put(&[0x21, family | transport]);
                out.put(&address_len.to_be_bytes());
                match (source.ip(), destination.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        out.put(&s.octets());
                        out.put(&d.octets());
                    }
                    (s, d) => {
                        out.put(&as_v6(s).octets());
                        out.put(&as_v6(d).octets());
                    }
                }
                out.put(&source.port().to_be_bytes());
                out.put(&destination.port().to_be_bytes());
            }
            _ => return None,
        }
        Some(ProxyHeader { bytes: out.bytes, len: out.len as u8 })
    }

    /// The header a connection of the proxy's own (a health check) sends under `version`: v1's
    /// `PROXY UNKNOWN\r\n`, v2's `LOCAL` command with no addresses. Either tells the receiver to
    /// take the connection's real endpoints. `None` for [`ProxyProtocol::None`].
    pub fn local(version: ProxyProtocol) -> Option<ProxyHeader> {
        let mut out = Writer { bytes: [0; MAX_HEADER_LEN], len: 0 };
        match version {
            ProxyProtocol::None => return None,
            ProxyProtocol::V1 => out.put(b"PROXY UNKNOWN\r\n"),
            ProxyProtocol::V2 => {
                out.put(&V2_SIGNATURE);
                // Version 2, command LOCAL; family and transport unspecified; no address block.
                out.put(&[0x20, 0x00, 0, 0]);
            }
        }
        Some(ProxyHeader { bytes: out.bytes, len: out.len as u8 })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    #[test]
    fn v1_over_ipv4_is_the_specification_s_example_line() {
        let header = ProxyHeader::encode(
            ProxyProtocol::V1,
            Protocol::Tcp,
            v4([192, 168, 0, 1], 56324),
            v4([192, 168, 0, 11], 443),
        )
        .expect("v1 has a TCP header");
        assert_eq!(header.as_bytes(), b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
    }

    #[test]
    fn v2_over_ipv4_and_tcp_is_28_bytes_checked_by_hand() {
        let header = ProxyHeader::encode(
            ProxyProtocol::V2,
            Protocol::Tcp,
            v4([10, 0, 0, 1], 0x1234),
            v4([10, 0, 0, 2], 80),
        )
        .expect("v2 has a TCP header");
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 0x12, 0x34, 0, 80]);
        assert_eq!(header.as_bytes(), &expected[..]);
    }

    #[test]
    fn v2_over_udp_says_dgram_and_ipv6_takes_52_bytes() {
        let (s, d) = ("[2001:db8::1]:53000".parse().unwrap(), "[2001:db8::2]:53".parse().unwrap());
        let header = ProxyHeader::encode(ProxyProtocol::V2, Protocol::Udp, s, d).expect("v2 has UDP");
        assert_eq!(header.len(), 52);
        assert_eq!(&header.as_bytes()[12..16], &[0x21, 0x22, 0, 36]);
        let header =
            ProxyHeader::encode(ProxyProtocol::V2, Protocol::Udp, v4([1, 2, 3, 4], 1), v4([5, 6, 7, 8], 2))
                .expect("v2 has UDP");
        assert_eq!(header.as_bytes()[13], 0x12);
    }

    #[test]
    fn no_header_where_the_version_has_none() {
        let (s, d) = (v4([10, 0, 0, 1], 1), v4([10, 0, 0, 2], 2));
        assert_eq!(ProxyHeader::encode(ProxyProtocol::V1, Protocol::Udp, s, d), None);
        assert_eq!(ProxyHeader::encode(ProxyProtocol::V2, Protocol::Sctp, s, d), None);
        assert_eq!(ProxyHeader::encode(ProxyProtocol::None, Protocol::Tcp, s, d), None);
        assert_eq!(ProxyProtocol::V1.for_protocol(Protocol::Udp), ProxyProtocol::None);
        assert_eq!(ProxyProtocol::V2.for_protocol(Protocol::Udp), ProxyProtocol::V2);
        assert_eq!(ProxyProtocol::V2.for_protocol(Protocol::Sctp), ProxyProtocol::None);
    }

    #[test]
    fn mapped_and_mixed_families_are_written_in_one_family() {
        let mapped = SocketAddr::new(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().into(), 4000);
        let header = ProxyHeader::encode(ProxyProtocol::V1, Protocol::Tcp, mapped, v4([10, 0, 0, 2], 80))
            .expect("v1 has a TCP header");
        assert_eq!(header.as_bytes(), b"PROXY TCP4 10.0.0.1 10.0.0.2 4000 80\r\n");
        let vip: SocketAddr = "[2001:db8::2]:80".parse().unwrap();
        let header = ProxyHeader::encode(ProxyProtocol::V1, Protocol::Tcp, v4([10, 0, 0, 1], 4000), vip)
            .expect("v1 has a TCP header");
        assert_eq!(header.as_bytes(), b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 4000 80\r\n");
    }

    #[test]
    fn the_longest_v1_header_fits() {
        let widest: SocketAddr = SocketAddr::new(
            Ipv6Addr::new(0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xfffe).into(),
            65535,
        );
        let header = ProxyHeader::encode(ProxyProtocol::V1, Protocol::Tcp, widest, widest)
            .expect("v1 has a TCP header");
        assert!(header.as_bytes().ends_with(b" 65535 65535\r\n"), "{header:?}");
        assert_eq!(header.len(), 104);
    }

    #[test]
    fn local_headers_decode_as_unknown_and_local() {
        assert_eq!(ProxyHeader::local(ProxyProtocol::None), None);
        let v1 = ProxyHeader::local(ProxyProtocol::V1).expect("v1");
        assert_eq!(v1.as_bytes(), b"PROXY UNKNOWN\r\n");
        let parsed = ppp::v1::Header::try_from(v1.as_bytes()).expect("ppp parses it");
        assert_eq!(parsed.addresses, ppp::v1::Addresses::Unknown);
        let v2 = ProxyHeader::local(ProxyProtocol::V2).expect("v2");
        let parsed = ppp::v2::Header::try_from(v2.as_bytes()).expect("ppp parses it");
        assert_eq!((parsed.command, parsed.len()), (ppp::v2::Command::Local, 16));
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
    }

    #[test]
    fn versions_parse_and_unknown_ones_are_named_in_the_error() {
        assert_eq!(ProxyProtocol::parse("v2"), Ok(ProxyProtocol::V2));
        assert_eq!(ProxyProtocol::parse("none"), Ok(ProxyProtocol::None));
        let error = ProxyProtocol::parse("V2").expect_err("spelled lower case only");
        assert!(error.contains("\"V2\"") && error.contains(ProxyProtocol::NAMES), "{error}");
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
        ]
    }

    /// What an independent decoder (the `ppp` crate) reads back, as (source, destination).
    fn decode_v1(bytes: &[u8]) -> (SocketAddr, SocketAddr) {
        let header = ppp::v1::Header::try_from(bytes).expect("ppp parses our v1 header");
        assert_eq!(header.header.len(), bytes.len(), "the header is the whole encoding");
        match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => v4_pair(a),
            ppp::v1::Addresses::Tcp6(a) => v6_pair(a),
            other => panic!("unexpected v1 addresses {other:?}"),
        }
    }

    fn decode_v2(bytes: &[u8], protocol: ppp::v2::Protocol) -> (SocketAddr, SocketAddr) {
        let header = ppp::v2::Header::try_from(bytes).expect("ppp parses our v2 header");
        assert_eq!(header.len(), bytes.len(), "the header is the whole encoding");
        assert_eq!(header.command, ppp::v2::Command::Proxy);
        assert_eq!(header.protocol, protocol);
        assert_eq!(header.tlvs().count(), 0);
        match header.addresses {
            ppp::v2::Addresses::IPv4(a) => v4_pair(a),
            ppp::v2::Addresses::IPv6(a) => v6_pair(a),
            other => panic!("unexpected v2 addresses {other:?}"),
        }
    }

    // ppp's v1 and v2 share these address types.
    fn v4_pair(a: ppp::v2::IPv4) -> (SocketAddr, SocketAddr) {
        ((a.source_address, a.source_port).into(), (a.destination_address, a.destination_port).into())
    }

    fn v6_pair(a: ppp::v2::IPv6) -> (SocketAddr, SocketAddr) {
        ((a.source_address, a.source_port).into(), (a.destination_address, a.destination_port).into())
    }

    proptest! {
        #[test]
        fn every_header_decodes_to_the_addresses_it_was_given(source in any_addr(), destination in any_addr()) {
            let expected = same_family(source, destination);
            prop_assert_eq!(expected.0.is_ipv4(), expected.1.is_ipv4());
            prop_assert_eq!(expected.0.ip().to_canonical(), source.ip().to_canonical());
            prop_assert_eq!(expected.1.ip().to_canonical(), destination.ip().to_canonical());

            let v1 = ProxyHeader::encode(ProxyProtocol::V1, Protocol::Tcp, source, destination).expect("v1");
            prop_assert!(v1.len() <= 107);
            prop_assert_eq!(decode_v1(v1.as_bytes()), expected);

            for (protocol, theirs) in [(Protocol::Tcp, ppp::v2::Protocol::Stream), (Protocol::Udp, ppp::v2::Protocol::Datagram)] {
                let v2 = ProxyHeader::encode(ProxyProtocol::V2, protocol, source, destination).expect("v2");
                prop_assert_eq!(v2.len(), if expected.0.is_ipv4() { 28 } else { 52 });
                prop_assert_eq!(decode_v2(v2.as_bytes(), theirs), expected);
                // Byte for byte what ppp's own encoder writes for the same addresses.
                let built = ppp::v2::Builder::with_addresses(
                    ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                    theirs,
                    expected,
                )
                .build()
                .expect("ppp builds");
                prop_assert_eq!(v2.as_bytes(), &built[..]);
            }
        }
    }
}
