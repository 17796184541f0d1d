//! Parsing of human durations given on the command line (`10s`, `500ms`, `2m`, `1.5s`, `250us`).
//!
//! Must never panic on bad input: every malformed value becomes an error message naming the value,
//! which clap shows next to the flag. A bare number means seconds.

use std::time::Duration;

/// Parses `"10s"`, `"500ms"`, `"250us"`, `"2m"`, `"1h"` or a bare number of seconds (`"2.5"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 10s or 500ms"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("`{text}`: unknown unit `{other}` (use ns, us, ms, s, m or h)")),
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_seconds_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn malformed_durations_are_errors_not_panics() {
        for bad in ["", "s", "10x", "-1s", "1e999", "..s", "10 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }
}
