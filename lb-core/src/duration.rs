//! Durations as Kubernetes users write them: Go's `time.ParseDuration` syntax, which kube-proxy's
//! flags and most controllers' annotations use (`1m30s`, `1.5s`, `500ms`, `2h`, `300us`).
//!
//! The grammar, as Go's: an optional `+`, then one or more `<number><unit>` elements, a number being
//! decimal digits with an optional fraction (`1.5`, `.5`, `5.`), a unit one of `ns`, `us` (`µs`,
//! `μs`), `ms`, `s`, `m`, `h`; a lone `0` is zero. Unlike Go, a negative duration is refused (no
//! timeout ringlb reads can be negative) and every duration is capped at [`MAX_DURATION`], so adding
//! one to an `Instant` can never overflow. Fractions are exact to the nanosecond (extra digits are
//! cut off, as Go does). Pure: used by the annotation parsers and the CLI alike.

use std::time::Duration;

use crate::annotations::MAX_DURATION_SECS;

/// The longest duration [`parse_duration`] accepts (30 days).
pub const MAX_DURATION: Duration = Duration::from_secs(MAX_DURATION_SECS);

/// Nanoseconds per unit, as Go's `time.ParseDuration` reads them.
pub const UNITS: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a duration in Go's syntax (see the module doc); the error says what is wrong, for a
/// message that also names the annotation or flag and the value.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(lb_core::parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(lb_core::parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(lb_core::parse_duration("5").is_err());
/// ```
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let expected = || "expected a number and a unit (ns, us, ms, s, m, h), e.g. 5s or 1m30s".to_owned();
    let rest = match value.strip_prefix('-') {
        Some(_) => return Err("must not be negative".to_owned()),
        None => value.strip_prefix('+').unwrap_or(value),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(expected());
    }
    let too_long = || format!("longer than the maximum of {}h", MAX_DURATION_SECS / 3600);
    let max_nanos = MAX_DURATION.as_nanos();
    let mut total: u128 = 0;
    let mut rest = rest;
    while !rest.is_empty() {
        let whole_len = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (whole, after) = rest.split_at(whole_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => {
                let len = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
                after.split_at(len)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(expected());
        }
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let Some(&(_, nanos_per_unit)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(if unit.is_empty() {
                "missing unit (ns, us, ms, s, m, h)".to_owned()
            } else {
                format!("unknown unit {unit:?} (ns, us, ms, s, m, h)")
            });
        };
        // More than 40 digits cannot be below the maximum in any unit; refusing them early keeps
        // the arithmetic below in range.
        if whole.len() > 40 {
            return Err(too_long());
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_long())? };
        // Over the maximum already: refused before the fraction is added, which could otherwise
        // carry a product just below `u128::MAX` past it (a panic, or in release a wrap to a
        // tiny duration that would be accepted).
        let mut element =
            whole.checked_mul(nanos_per_unit).filter(|&n| n <= max_nanos).ok_or_else(too_long)?;
        // Fraction digits beyond a nanosecond of the unit change nothing; at most 30 matter.
        let mut scale = nanos_per_unit;
        for digit in fraction.bytes().take(30) {
            scale /= 10;
            element += u128::from(digit - b'0') * scale;
        }
        total = total.checked_add(element).ok_or_else(too_long)?;
        if total > max_nanos {
            return Err(too_long());
        }
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| too_long())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_syntax_is_accepted() {
        let cases: &[(&str, Duration)] = &[
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            ("+5s", Duration::from_secs(5)),
            ("1m30s", Duration::from_secs(90)),
            ("2h45m10s", Duration::from_secs(2 * 3600 + 45 * 60 + 10)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("5.s", Duration::from_secs(5)),
            ("1.5h", Duration::from_secs(5400)),
            ("300us", Duration::from_micros(300)),
            ("300\u{b5}s", Duration::from_micros(300)),
            ("300\u{3bc}s", Duration::from_micros(300)),
            ("10ns", Duration::from_nanos(10)),
            ("1s500ms", Duration::from_millis(1500)),
            ("0.0000000015s", Duration::from_nanos(1)),
            ("1.000000000999s", Duration::from_secs(1)),
            ("720h", MAX_DURATION),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(*expected), "{text:?}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        let cases: &[(&str, &str)] = &[
            ("", "expected"),
            ("5", "missing unit"),
            ("s", "expected"),
            (".s", "expected"),
            ("-5s", "negative"),
            ("5 s", "unknown unit"),
            ("5d", "unknown unit"),
            ("1.5.5s", "missing unit"),
            ("1sm", "unknown unit"),
            ("721h", "maximum"),
            ("720h1ns", "maximum"),
            ("99999999999999999999h", "maximum"),
            ("99999999999999999999999999999999999999999999ns", "maximum"),
            // Whole parts whose product lies just below `u128::MAX`, in each unit, with the
            // largest fraction: adding it used to overflow (a panic; in release a tiny duration).
            // The `text` fuzz target checks that a duration is worth at least its whole part.
            ("340282366920938463463374607431768211.999us", "maximum"),
            ("340282366920938463463374607431768.999999ms", "maximum"),
            ("340282366920938463463374607431.999999999s", "maximum"),
            ("5671372782015641057722910123.9999999999m", "maximum"),
            ("94522879700260684295381835.9999999999999h", "maximum"),
        ];
        for (text, reason) in cases {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(reason), "{text:?}: {error}");
        }
    }
}
