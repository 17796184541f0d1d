//! Parses the ringlb annotations (declared in [`crate::annotations`]) into per-Service policy and
//! per-slice weights. Parsing happens here only, once per build.
//!
//! Never falls back silently: an invalid value is an error (which rejects the Service; for a slice's
//! weight the slice keeps weight 1, see the annotations module). Values are trimmed of whitespace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use super::{BuildOptions, parse_ip};
use crate::annotations::{
    BACKEND_WEIGHTS, CLIENT_CONNECTION_BURST, CLIENT_CONNECTION_RATE, CONNECT_ATTEMPTS, CONNECT_TIMEOUT,
    DRAIN_TIMEOUT, HASH_KEY, IDLE_TIMEOUT, MAGLEV_TABLE_SIZE, MAX_BACKEND_CONNECTIONS, MAX_CONNECTIONS,
    NOT_READY_CONNECTIONS, PROXY_PROTOCOL, SCHEDULER, TRANSPARENT, UDP_REPLIED_TIMEOUT, UDP_STALE_FLOWS,
    UDP_UNREPLIED_TIMEOUT, WEIGHT,
};
pub(crate) use crate::duration::parse_duration;
use crate::error::BuildError;
use crate::lifecycle::{NotReadyConnections, StaleFlowPolicy};
use crate::model::{EntryPolicy, ObjectRef, Protocol, TrafficPolicy};
use crate::proxy_protocol::ProxyProtocol;
use crate::rate::ClientRate;
use crate::scheduler::{SchedulerConfig, TABLE_SIZES};

/// Backend weights accepted by [`WEIGHT`] and [`BACKEND_WEIGHTS`].
pub(crate) const WEIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
const ATTEMPTS_RANGE: std::ops::RangeInclusive<u32> = 1..=16;
/// Connection limits accepted by [`MAX_CONNECTIONS`] and [`MAX_BACKEND_CONNECTIONS`].
pub(crate) const CONNECTIONS_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000_000;
/// Rates and bursts accepted by [`CLIENT_CONNECTION_RATE`] and [`CLIENT_CONNECTION_BURST`].
pub(crate) const RATE_RANGE: std::ops::RangeInclusive<u32> = 1..=1_000_000;

/// Everything the annotations of one Service decide.
#[derive(Debug, Clone)]
pub(crate) struct ServicePolicy {
    pub scheduler: SchedulerConfig,
    pub entry: EntryPolicy,
    /// Health and outlier settings from annotations; the spec's parts (source ranges, affinity,
    /// node-local) are filled in by `service`.
    pub traffic: TrafficPolicy,
    /// From [`BACKEND_WEIGHTS`]: weight by endpoint IP, overriding the slice's weight.
    pub backend_weights: BTreeMap<IpAddr, u32>,
}

type Annotations = crate::Labels;

pub(super) fn parse_service_policy(
    annotations: Option<&Annotations>,
    object: &ObjectRef,
    options: &BuildOptions,
    errors: &mut Vec<BuildError>,
) -> ServicePolicy {
    let (health_check, outlier) = super::health_policy::parse_health(annotations, object, errors);
    let mut policy = ServicePolicy {
        scheduler: SchedulerConfig::new(options.default_scheduler),
        entry: options.default_policy,
        traffic: TrafficPolicy { health_check, outlier, ..TrafficPolicy::default() },
        backend_weights: BTreeMap::new(),
    };
    let Some(annotations) = annotations else { return policy };
    let mut field = |annotation: &'static str, apply: &mut dyn FnMut(&str) -> Result<(), String>| {
        super::read_annotation(annotations, object, errors, annotation, apply)
    };
    field(SCHEDULER, &mut |v| {
        policy.scheduler.kind = v.parse().map_err(|e: crate::scheduler::UnknownScheduler| e.to_string())?;
        Ok(())
    });
    field(HASH_KEY, &mut |v| {
        policy.scheduler.hash_key = v.parse()?;
        Ok(())
    });
    field(MAGLEV_TABLE_SIZE, &mut |v| {
        let sizes = || TABLE_SIZES.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let size = v.parse::<u32>().ok().filter(|n| TABLE_SIZES.contains(n));
        policy.scheduler.maglev_table_size = size.ok_or_else(|| format!("expected one of {}", sizes()))?;
        Ok(())
    });
    field(CONNECT_TIMEOUT, &mut |v| {
        policy.entry.connect_timeout = positive(parse_duration(v)?)?;
        Ok(())
    });
    field(IDLE_TIMEOUT, &mut |v| {
        policy.entry.idle_timeout = positive(parse_duration(v)?)?;
        Ok(())
    });
    field(DRAIN_TIMEOUT, &mut |v| {
        policy.entry.drain_timeout = parse_duration(v)?;
        Ok(())
    });
    field(NOT_READY_CONNECTIONS, &mut |v| {
        policy.entry.not_ready_connections = NotReadyConnections::parse(v)?;
        Ok(())
    });
    field(UDP_UNREPLIED_TIMEOUT, &mut |v| {
        policy.entry.udp_unreplied_timeout = positive(parse_duration(v)?)?;
        Ok(())
    });
    field(UDP_REPLIED_TIMEOUT, &mut |v| {
        policy.entry.udp_replied_timeout = positive(parse_duration(v)?)?;
        Ok(())
    });
    field(UDP_STALE_FLOWS, &mut |v| {
        policy.entry.udp_stale_flows = StaleFlowPolicy::parse(v)?;
        Ok(())
    });
    field(PROXY_PROTOCOL, &mut |v| {
        policy.entry.proxy_protocol = ProxyProtocol::parse(v)?;
        Ok(())
    });
    field(TRANSPARENT, &mut |v| {
        policy.entry.transparent = parse_bool(v)?;
        Ok(())
    });
    field(CONNECT_ATTEMPTS, &mut |v| {
        policy.entry.connect_attempts = parse_in_range(v, ATTEMPTS_RANGE)?;
        Ok(())
    });
    field(BACKEND_WEIGHTS, &mut |v| {
        policy.backend_weights = parse_backend_weights(v, object)?;
        Ok(())
    });
    field(MAX_CONNECTIONS, &mut |v| {
        policy.entry.max_connections = parse_in_range(v, CONNECTIONS_RANGE)?;
        Ok(())
    });
    field(MAX_BACKEND_CONNECTIONS, &mut |v| {
        policy.entry.max_backend_connections = parse_in_range(v, CONNECTIONS_RANGE)?;
        Ok(())
    });
    let mut burst = None;
    field(CLIENT_CONNECTION_BURST, &mut |v| {
        burst = Some(parse_in_range(v, RATE_RANGE)?);
        Ok(())
    });
    field(CLIENT_CONNECTION_RATE, &mut |v| {
        let per_second = parse_in_range(v, RATE_RANGE)?;
        policy.entry.client_rate = Some(ClientRate { per_second, burst: per_second });
        Ok(())
    });
    // A burst alone tunes the default rate; with neither a rate annotation nor a default there is
    // nothing to burst.
    if let (Some(burst), Some(rate)) = (burst, policy.entry.client_rate.as_mut()) {
        rate.burst = burst;
    }
    // Probes are TCP connections: they greet the backends as the Service's TCP ports do.
    if let Some(check) = policy.traffic.health_check.as_mut() {
        check.proxy_protocol = policy.entry.proxy_protocol.for_protocol(Protocol::Tcp);
    }
    policy
}

/// Refuses a [`PROXY_PROTOCOL`] annotation whose version has no header for one of the Service's
/// port protocols (v1 on UDP or SCTP, v2 on SCTP): its backends expect a header they would not get.
/// A global default is not refused: it applies where it can (`ProxyProtocol::for_protocol`).
pub(super) fn check_proxy_protocol(
    annotations: &Annotations,
    protocols: impl IntoIterator<Item = Protocol>,
    object: &ObjectRef,
    errors: &mut Vec<BuildError>,
) {
    let Some(value) = annotations.get(PROXY_PROTOCOL) else { return };
    let Ok(version) = ProxyProtocol::parse(value.trim()) else { return };
    let Some(unsupported) = protocols.into_iter().find(|p| !version.supports(*p)) else { return };
    let reason = match version {
        ProxyProtocol::V1 => format!(
            "PROXY protocol v1 is TCP-only and the Service has a {unsupported} port (v2 also serves UDP)"
        ),
        _ => format!("PROXY protocol {version} has no header for the Service's {unsupported} port"),
    };
    errors.push(BuildError::InvalidAnnotation {
        object: object.clone(),
        annotation: PROXY_PROTOCOL,
        value: value.to_owned(),
        reason,
    });
}

/// Whether an entry of `protocol` can leave from the client's address: TCP and UDP can, SCTP
/// (multi-homed, its addresses bound as a set) is not supported.
pub(super) fn transparent_serves(protocol: Protocol) -> bool {
    protocol != Protocol::Sctp
}

/// Refuses [`TRANSPARENT`] `true` on a Service with a port that cannot be transparent (SCTP): its
/// backends would see the load balancer's address where the Service asked for the client's. A
/// global default is not refused: it applies to the ports that can be.
pub(super) fn check_transparent(
    annotations: &Annotations,
    protocols: impl IntoIterator<Item = Protocol>,
    object: &ObjectRef,
    errors: &mut Vec<BuildError>,
) {
    let Some(value) = annotations.get(TRANSPARENT) else { return };
    if parse_bool(value.trim()) != Ok(true) {
        return;
    }
    let Some(unsupported) = protocols.into_iter().find(|p| !transparent_serves(*p)) else { return };
    errors.push(BuildError::InvalidAnnotation {
        object: object.clone(),
        annotation: TRANSPARENT,
        value: value.to_owned(),
        reason: format!("transparent mode serves TCP and UDP ports and the Service has a {unsupported} port"),
    });
}

/// `true` or `false`, as Kubernetes writes booleans in annotations.
fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".to_owned()),
    }
}

/// The [`WEIGHT`] of an EndpointSlice; 1 when unset.
pub(super) fn parse_slice_weight(
    annotations: Option<&BTreeMap<String, String>>,
    object: &ObjectRef,
) -> Result<u32, BuildError> {
    let Some(value) = annotations.and_then(|a| a.get(WEIGHT)) else { return Ok(1) };
    parse_in_range(value.trim(), WEIGHT_RANGE).map_err(|reason| BuildError::InvalidAnnotation {
        object: object.clone(),
        annotation: WEIGHT,
        value: value.clone(),
        reason,
    })
}

pub(super) fn positive(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() { Err("must be longer than 0".to_owned()) } else { Ok(duration) }
}

pub(super) fn parse_in_range(value: &str, range: std::ops::RangeInclusive<u32>) -> Result<u32, String> {
    let out_of_range = || format!("expected an integer in {}..={}", range.start(), range.end());
    let number: u32 = value.parse().map_err(|_| out_of_range())?;
    if range.contains(&number) { Ok(number) } else { Err(out_of_range()) }
}

/// `10.0.0.1=3, 10.0.0.2=1`; an IP may appear once.
fn parse_backend_weights(value: &str, object: &ObjectRef) -> Result<BTreeMap<IpAddr, u32>, String> {
    let mut weights = BTreeMap::new();
    for item in value.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let Some((ip, weight)) = item.split_once('=') else {
            return Err(format!("item {item:?} is not IP=WEIGHT"));
        };
        let ip =
            parse_ip(ip.trim(), object, String::new).map_err(|_| format!("{ip:?} is not an IP address"))?;
        let weight =
            parse_in_range(weight.trim(), WEIGHT_RANGE).map_err(|e| format!("weight of {ip}: {e}"))?;
        if weights.insert(ip, weight).is_some() {
            return Err(format!("{ip} appears more than once"));
        }
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_annotations_take_go_syntax_and_errors_name_annotation_and_value() {
        let object = ObjectRef::service("default", "web");
        let annotations = Annotations::from([
            (CONNECT_TIMEOUT.to_owned(), "1.5s".to_owned()),
            (IDLE_TIMEOUT.to_owned(), "1m30s".to_owned()),
            (DRAIN_TIMEOUT.to_owned(), "2h".to_owned()),
        ]);
        let mut errors = Vec::new();
        let policy = parse_service_policy(Some(&annotations), &object, &BuildOptions::default(), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(policy.entry.connect_timeout, Duration::from_millis(1500));
        assert_eq!(policy.entry.idle_timeout, Duration::from_secs(90));
        assert_eq!(policy.entry.drain_timeout, Duration::from_secs(7200));

        let annotations = Annotations::from([(IDLE_TIMEOUT.to_owned(), "90x".to_owned())]);
        parse_service_policy(Some(&annotations), &object, &BuildOptions::default(), &mut errors);
        let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(message.contains(IDLE_TIMEOUT) && message.contains("\"90x\""), "{message}");
    }

    #[test]
    fn lifecycle_annotations_reach_the_entry_policy() {
        let object = ObjectRef::service("default", "dns");
        let annotations = Annotations::from([
            (NOT_READY_CONNECTIONS.to_owned(), "keep".to_owned()),
            (UDP_UNREPLIED_TIMEOUT.to_owned(), "5s".to_owned()),
            (UDP_REPLIED_TIMEOUT.to_owned(), "1m".to_owned()),
            (UDP_STALE_FLOWS.to_owned(), "drain".to_owned()),
        ]);
        let mut errors = Vec::new();
        let policy = parse_service_policy(Some(&annotations), &object, &BuildOptions::default(), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(policy.entry.not_ready_connections, NotReadyConnections::Keep);
        assert_eq!(policy.entry.udp_unreplied_timeout, Duration::from_secs(5));
        assert_eq!(policy.entry.udp_replied_timeout, Duration::from_secs(60));
        assert_eq!(policy.entry.udp_stale_flows, StaleFlowPolicy::Drain);
        let bad = Annotations::from([
            (NOT_READY_CONNECTIONS.to_owned(), "forever".to_owned()),
            (UDP_REPLIED_TIMEOUT.to_owned(), "0s".to_owned()),
            (UDP_STALE_FLOWS.to_owned(), "stick".to_owned()),
        ]);
        parse_service_policy(Some(&bad), &object, &BuildOptions::default(), &mut errors);
        let named: Vec<_> = errors.iter().map(|e| e.field()).collect();
        assert_eq!(named.len(), 3, "{named:?}");
    }

    #[test]
    fn proxy_protocol_parses_and_v1_is_refused_beside_a_udp_port() {
        let object = ObjectRef::service("default", "dns");
        let mut errors = Vec::new();
        let parse = |value: &str, errors: &mut Vec<BuildError>| {
            let annotations = Annotations::from([(PROXY_PROTOCOL.to_owned(), value.to_owned())]);
            let policy = parse_service_policy(Some(&annotations), &object, &BuildOptions::default(), errors);
            (annotations, policy.entry.proxy_protocol)
        };
        assert_eq!(parse(" v2 ", &mut errors).1, ProxyProtocol::V2);
        assert_eq!(parse("none", &mut errors).1, ProxyProtocol::None);
        assert!(errors.is_empty(), "{errors:?}");
        parse("v3", &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("\"v3\""), "{}", errors[0]);

        let mut errors = Vec::new();
        let (v1, _) = parse("v1", &mut errors);
        check_proxy_protocol(&v1, [Protocol::Tcp], &object, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        check_proxy_protocol(&v1, [Protocol::Tcp, Protocol::Udp], &object, &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("TCP-only"), "{}", errors[0]);
        let (v2, _) = parse("v2", &mut errors);
        check_proxy_protocol(&v2, [Protocol::Udp], &object, &mut errors);
        assert_eq!(errors.len(), 1, "v2 serves UDP");
        check_proxy_protocol(&v2, [Protocol::Sctp], &object, &mut errors);
        assert_eq!(errors.len(), 2, "nor version serves SCTP");

        let checked = Annotations::from([
            (PROXY_PROTOCOL.to_owned(), "v2".to_owned()),
            (crate::annotations::HEALTH_CHECK.to_owned(), "http:/ready".to_owned()),
        ]);
        let policy = parse_service_policy(Some(&checked), &object, &BuildOptions::default(), &mut errors);
        let check = policy.traffic.health_check.expect("a health check");
        assert_eq!(check.proxy_protocol, ProxyProtocol::V2, "probes greet the backends as connections do");
    }

    #[test]
    fn transparent_parses_true_and_false_only_and_true_is_refused_beside_an_sctp_port() {
        let object = ObjectRef::service("default", "web");
        let parse = |value: &str, options: &BuildOptions, errors: &mut Vec<BuildError>| {
            let annotations = Annotations::from([(TRANSPARENT.to_owned(), value.to_owned())]);
            parse_service_policy(Some(&annotations), &object, options, errors).entry.transparent
        };
        let mut errors = Vec::new();
        let defaults = BuildOptions::default();
        assert!(parse(" true ", &defaults, &mut errors));
        let on = BuildOptions {
            default_policy: EntryPolicy { transparent: true, ..EntryPolicy::default() },
            ..BuildOptions::default()
        };
        assert!(!parse("false", &on, &mut errors), "the annotation overrides the flag");
        assert!(errors.is_empty(), "{errors:?}");
        for bad in ["yes", "True", "1", ""] {
            let mut errors = Vec::new();
            assert!(parse(bad, &on, &mut errors), "{bad:?} leaves the default");
            assert_eq!(errors.len(), 1, "{bad:?} must be refused");
            assert!(errors[0].to_string().contains(TRANSPARENT), "{}", errors[0]);
        }

        let annotations = |value: &str| Annotations::from([(TRANSPARENT.to_owned(), value.to_owned())]);
        let mut errors = Vec::new();
        check_transparent(&annotations("true"), [Protocol::Tcp, Protocol::Udp], &object, &mut errors);
        check_transparent(&annotations("false"), [Protocol::Sctp], &object, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        check_transparent(&annotations("true"), [Protocol::Tcp, Protocol::Sctp], &object, &mut errors);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("SCTP"), "{}", errors[0]);
    }

    #[test]
    fn backend_weights_parse_and_refuse_duplicates_and_range() {
        let object = ObjectRef::service("default", "web");
        let parsed = parse_backend_weights(" 10.0.0.1=3 , ::1=1,", &object);
        let expected = BTreeMap::from([("10.0.0.1".parse().unwrap(), 3), ("::1".parse().unwrap(), 1)]);
        assert_eq!(parsed, Ok(expected));
        for bad in ["10.0.0.1", "10.0.0.1=0", "10.0.0.1=10001", "x=1", "10.0.0.1=1,10.0.0.1=2"] {
            assert!(parse_backend_weights(bad, &object).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn invalid_annotations_are_reported_with_their_name() {
        let object = ObjectRef::service("default", "web");
        let annotations = Annotations::from([
            (CONNECT_ATTEMPTS.to_owned(), "17".to_owned()),
            (SCHEDULER.to_owned(), "maglev?".to_owned()),
            (MAGLEV_TABLE_SIZE.to_owned(), "65536".to_owned()),
            (HASH_KEY.to_owned(), "port".to_owned()),
            (IDLE_TIMEOUT.to_owned(), "0s".to_owned()),
            (DRAIN_TIMEOUT.to_owned(), "0s".to_owned()),
        ]);
        let mut errors = Vec::new();
        let policy = parse_service_policy(Some(&annotations), &object, &BuildOptions::default(), &mut errors);
        let named: Vec<_> = errors.iter().map(|e| e.field()).collect();
        assert_eq!(errors.len(), 5, "{named:?}");
        assert!(named.iter().any(|f| f.contains(MAGLEV_TABLE_SIZE)));
        assert!(named.iter().any(|f| f.contains(HASH_KEY)));
        assert!(named.iter().any(|f| f.contains(CONNECT_ATTEMPTS)));
        assert!(named.iter().any(|f| f.contains(SCHEDULER)));
        assert!(named.iter().any(|f| f.contains(IDLE_TIMEOUT)));
        assert_eq!(policy.entry.drain_timeout, Duration::ZERO);
    }

    #[test]
    fn limit_annotations_reach_the_entry_policy_and_a_burst_alone_tunes_the_default_rate() {
        let object = ObjectRef::service("default", "web");
        let annotations = Annotations::from([
            (MAX_CONNECTIONS.to_owned(), "100".to_owned()),
            (MAX_BACKEND_CONNECTIONS.to_owned(), " 7 ".to_owned()),
            (CLIENT_CONNECTION_RATE.to_owned(), "5".to_owned()),
            (CLIENT_CONNECTION_BURST.to_owned(), "20".to_owned()),
        ]);
        let mut errors = Vec::new();
        let policy = parse_service_policy(Some(&annotations), &object, &BuildOptions::default(), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((policy.entry.max_connections, policy.entry.max_backend_connections), (100, 7));
        assert_eq!(policy.entry.client_rate, Some(ClientRate { per_second: 5, burst: 20 }));

        let defaults = BuildOptions {
            default_policy: EntryPolicy {
                client_rate: Some(ClientRate { per_second: 50, burst: 50 }),
                ..EntryPolicy::default()
            },
            ..BuildOptions::default()
        };
        let burst = Annotations::from([(CLIENT_CONNECTION_BURST.to_owned(), "80".to_owned())]);
        let policy = parse_service_policy(Some(&burst), &object, &defaults, &mut errors);
        assert_eq!(policy.entry.client_rate, Some(ClientRate { per_second: 50, burst: 80 }));
        let none = parse_service_policy(Some(&burst), &object, &BuildOptions::default(), &mut errors);
        assert_eq!(none.entry.client_rate, None, "no rate to burst");

        let bad = Annotations::from([
            (MAX_CONNECTIONS.to_owned(), "0".to_owned()),
            (CLIENT_CONNECTION_RATE.to_owned(), "fast".to_owned()),
        ]);
        parse_service_policy(Some(&bad), &object, &BuildOptions::default(), &mut errors);
        let named: Vec<_> = errors.iter().map(|e| e.field()).collect();
        assert_eq!(named.len(), 2, "{named:?}");
    }
}
