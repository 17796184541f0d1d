//! Parses the health annotations of a Service (active checks `ringlb.io/health-*`, outlier detection
//! `ringlb.io/outlier-*` and `ringlb.io/max-ejection-percent`) into the entry's [`TrafficPolicy`].
//!
//! Like every annotation parser: an invalid value is an error that rejects the Service, never a
//! silent default. A `health-*` parameter without `ringlb.io/health-check` is an error too (it would
//! otherwise be ignored without a word).
//!
//! [`TrafficPolicy`]: crate::model::TrafficPolicy

use super::policy::{parse_duration, parse_in_range, positive};
use crate::annotations::{
    HEALTH_CHECK, HEALTH_CHECK_STATUS, HEALTH_FALL, HEALTH_INTERVAL, HEALTH_RISE, HEALTH_TIMEOUT,
    MAX_EJECTION_PERCENT, OUTLIER_BASE_EJECTION, OUTLIER_FAILURES, OUTLIER_MAX_EJECTION,
};
use crate::error::BuildError;
use crate::health::{HealthCheckConfig, OutlierConfig, ProbeKind};
use crate::model::ObjectRef;

const THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
const FAILURES_RANGE: std::ops::RangeInclusive<u32> = 1..=1000;
const STATUS_RANGE: std::ops::RangeInclusive<u32> = 100..=599;

pub(super) fn parse_health(
    annotations: Option<&crate::Labels>,
    object: &ObjectRef,
    errors: &mut Vec<BuildError>,
) -> (Option<HealthCheckConfig>, OutlierConfig) {
    let mut outlier = OutlierConfig::default();
    let Some(annotations) = annotations else { return (None, outlier) };
    let mut field = |annotation: &'static str, apply: &mut dyn FnMut(&str) -> Result<(), String>| {
        super::read_annotation(annotations, object, errors, annotation, apply)
    };
    let mut check: Option<HealthCheckConfig> = None;
    field(HEALTH_CHECK, &mut |v| {
        check = Some(HealthCheckConfig::new(parse_probe(v)?));
        Ok(())
    });
    let needs_check = || format!("needs {HEALTH_CHECK}");
    field(HEALTH_CHECK_STATUS, &mut |v| match check.as_mut().map(|c| &mut c.probe) {
        Some(ProbeKind::Http { expected_status, .. }) => {
            *expected_status = u16::try_from(parse_in_range(v, STATUS_RANGE)?).map_err(|e| e.to_string())?;
            Ok(())
        }
        Some(ProbeKind::Tcp) | None => Err(format!("only with an http: {HEALTH_CHECK}")),
    });
    field(HEALTH_INTERVAL, &mut |v| {
        let interval = positive(parse_duration(v)?)?;
        check.as_mut().ok_or_else(needs_check)?.interval = interval;
        Ok(())
    });
    field(HEALTH_TIMEOUT, &mut |v| {
        let timeout = positive(parse_duration(v)?)?;
        check.as_mut().ok_or_else(needs_check)?.timeout = timeout;
        Ok(())
    });
    field(HEALTH_RISE, &mut |v| {
        let rise = parse_in_range(v, THRESHOLD_RANGE)?;
        check.as_mut().ok_or_else(needs_check)?.rise = rise;
        Ok(())
    });
    field(HEALTH_FALL, &mut |v| {
        let fall = parse_in_range(v, THRESHOLD_RANGE)?;
        check.as_mut().ok_or_else(needs_check)?.fall = fall;
        Ok(())
    });
    field(OUTLIER_FAILURES, &mut |v| {
        outlier.consecutive_failures = parse_in_range(v, FAILURES_RANGE)?;
        Ok(())
    });
    field(OUTLIER_BASE_EJECTION, &mut |v| {
        outlier.base_ejection = positive(parse_duration(v)?)?;
        Ok(())
    });
    field(OUTLIER_MAX_EJECTION, &mut |v| {
        outlier.max_ejection = positive(parse_duration(v)?)?;
        Ok(())
    });
    field(MAX_EJECTION_PERCENT, &mut |v| {
        outlier.max_ejection_percent =
            u8::try_from(parse_in_range(v, 0..=100)?).map_err(|e| e.to_string())?;
        Ok(())
    });
    if outlier.max_ejection < outlier.base_ejection && annotations.get(OUTLIER_MAX_EJECTION).is_some() {
        errors.push(BuildError::InvalidAnnotation {
            object: object.clone(),
            annotation: OUTLIER_MAX_EJECTION,
            value: annotations.get(OUTLIER_MAX_EJECTION).unwrap_or_default().to_owned(),
            reason: format!("shorter than {OUTLIER_BASE_EJECTION}"),
        });
    }
    (check, outlier)
}

/// `tcp` or `http:/path` (an absolute path of visible ASCII, as it goes on the request line).
fn parse_probe(value: &str) -> Result<ProbeKind, String> {
    if value == "tcp" {
        return Ok(ProbeKind::Tcp);
    }
    let Some(path) = value.strip_prefix("http:") else {
        return Err("expected tcp or http:/path".to_owned());
    };
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the http path must start with / and hold no spaces or control characters".to_owned());
    }
    Ok(ProbeKind::Http { path: path.to_owned(), expected_status: HealthCheckConfig::DEFAULT_HTTP_STATUS })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (Option<HealthCheckConfig>, OutlierConfig, Vec<String>) {
        let annotations = crate::Labels::from(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        );
        let mut errors = Vec::new();
        let (check, outlier) =
            parse_health(Some(&annotations), &ObjectRef::service("default", "web"), &mut errors);
        (check, outlier, errors.iter().map(|e| e.field()).collect())
    }

    #[test]
    fn http_check_with_every_parameter() {
        let (check, outlier, errors) = parse(&[
            (HEALTH_CHECK, "http:/healthz?full=1"),
            (HEALTH_CHECK_STATUS, "204"),
            (HEALTH_INTERVAL, "5s"),
            (HEALTH_TIMEOUT, "500ms"),
            (HEALTH_RISE, "1"),
            (HEALTH_FALL, "4"),
            (OUTLIER_FAILURES, "7"),
            (OUTLIER_BASE_EJECTION, "10s"),
            (OUTLIER_MAX_EJECTION, "1m"),
            (MAX_EJECTION_PERCENT, "20"),
        ]);
        assert!(errors.is_empty(), "{errors:?}");
        let expected = HealthCheckConfig {
            probe: ProbeKind::Http { path: "/healthz?full=1".to_owned(), expected_status: 204 },
            interval: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 4,
            proxy_protocol: crate::ProxyProtocol::None,
        };
        assert_eq!(check, Some(expected));
        let expected = OutlierConfig {
            consecutive_failures: 7,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 20,
        };
        assert_eq!(outlier, expected);
    }

    #[test]
    fn defaults_apply_when_only_the_check_is_named() {
        let (check, outlier, errors) = parse(&[(HEALTH_CHECK, "tcp")]);
        assert!(errors.is_empty());
        assert_eq!(check, Some(HealthCheckConfig::new(ProbeKind::Tcp)));
        assert_eq!(outlier, OutlierConfig::default());
        assert_eq!(parse(&[]).0, None);
    }

    #[test]
    fn invalid_values_and_orphan_parameters_are_named() {
        let cases: [(&[(&str, &str)], &str); 12] = [
            (&[(HEALTH_CHECK, "udp")], HEALTH_CHECK),
            (&[(HEALTH_CHECK, "http:healthz")], HEALTH_CHECK),
            (&[(HEALTH_CHECK, "http:/a b")], HEALTH_CHECK),
            (&[(HEALTH_CHECK, "tcp"), (HEALTH_CHECK_STATUS, "200")], HEALTH_CHECK_STATUS),
            (&[(HEALTH_CHECK, "http:/"), (HEALTH_CHECK_STATUS, "600")], HEALTH_CHECK_STATUS),
            (&[(HEALTH_INTERVAL, "5s")], HEALTH_INTERVAL),
            (&[(HEALTH_CHECK, "tcp"), (HEALTH_TIMEOUT, "0s")], HEALTH_TIMEOUT),
            (&[(HEALTH_CHECK, "tcp"), (HEALTH_RISE, "0")], HEALTH_RISE),
            (&[(HEALTH_CHECK, "tcp"), (HEALTH_FALL, "101")], HEALTH_FALL),
            (&[(OUTLIER_FAILURES, "0")], OUTLIER_FAILURES),
            (&[(MAX_EJECTION_PERCENT, "101")], MAX_EJECTION_PERCENT),
            (&[(OUTLIER_BASE_EJECTION, "1m"), (OUTLIER_MAX_EJECTION, "30s")], OUTLIER_MAX_EJECTION),
        ];
        for (pairs, annotation) in cases {
            let (_, _, errors) = parse(pairs);
            assert_eq!(errors.len(), 1, "{pairs:?}: {errors:?}");
            assert!(errors[0].contains(annotation), "{pairs:?}: {errors:?}");
        }
    }
}
