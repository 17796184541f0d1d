//! Target `text`: the scalar parsers every annotation and flag goes through, `lb_core::parse_duration`
//! (Go's duration syntax) and `Cidr`'s `FromStr`, on the input as text.
//!
//! Durations: what parses is within `MAX_DURATION`, is worth at least the whole part of its first
//! element (`2h30m` at least 2h: a wrapped sum would be smaller), parses the same with a `+`, and is
//! refused with a `-`; its value written in nanoseconds parses back to it. CIDRs: what parses prints
//! as text that parses back to it, holds its network and last address (unless v4-mapped: see
//! `check_cidr`), and has a prefix within its family's width.

use std::net::IpAddr;
use std::str::FromStr;

use lb_core::duration::{MAX_DURATION, UNITS};
use lb_core::{Cidr, parse_duration};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_duration(&text);
    check_cidr(&text);
}

fn check_duration(text: &str) {
    let Ok(duration) = parse_duration(text) else { return };
    assert!(duration <= MAX_DURATION, "{text:?} parsed to {duration:?}, over the cap");
    if let Some(floor) = first_element_floor(text) {
        assert!(duration.as_nanos() >= floor, "{text:?} parsed to {duration:?}, less than its first element");
    }
    if !text.starts_with('+') {
        assert_eq!(parse_duration(&format!("+{text}")), Ok(duration), "{text:?} with a +");
    }
    assert!(parse_duration(&format!("-{text}")).is_err(), "-{text:?} was accepted");
    let nanos = format!("{}ns", duration.as_nanos());
    assert_eq!(parse_duration(&nanos), Ok(duration), "{text:?} as {nanos}");
}

/// The whole part of the first `<number><unit>` element in nanoseconds (saturating), when the text
/// starts with one.
fn first_element_floor(text: &str) -> Option<u128> {
    let rest = text.strip_prefix('+').unwrap_or(text);
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let (whole, after) = rest.split_at(digits);
    let after = match after.strip_prefix('.') {
        Some(fraction) => fraction.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => after,
    };
    let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
    let &(_, nanos) = UNITS.iter().find(|(name, _)| *name == &after[..unit_len])?;
    let whole =
        whole.bytes().fold(0u128, |n, digit| n.saturating_mul(10).saturating_add(u128::from(digit - b'0')));
    Some(whole.saturating_mul(nanos))
}

fn check_cidr(text: &str) {
    let Ok(cidr) = Cidr::from_str(text) else { return };
    let width = if cidr.network().is_ipv4() { 32 } else { 128 };
    assert!(cidr.prefix() <= width, "{text:?}: prefix {} over {width}", cidr.prefix());
    let shown = cidr.to_string();
    assert_eq!(Cidr::from_str(&shown), Ok(cidr), "{text:?} shown as {shown}");
    assert_eq!(Cidr::new(cidr.network(), cidr.prefix()), Ok(cidr), "{text:?}: the network is masked");
    let (first, last) = cidr.bounds();
    // `contains` reads a v4-mapped address as the IPv4 client it is, which no IPv6 range holds:
    // `::ffe0:0:0/91` ends at `::ffff:255.255.255.255` yet contains none of `::ffff:0:0/96`.
    for bound in [first, last].into_iter().filter(|bound| bound.to_canonical() == *bound) {
        assert!(cidr.contains(bound), "{text:?}: {bound} outside");
    }
    if let IpAddr::V4(v4) = first {
        assert!(cidr.contains(IpAddr::V6(v4.to_ipv6_mapped())), "{text:?}: the v4-mapped network is outside");
    }
}
