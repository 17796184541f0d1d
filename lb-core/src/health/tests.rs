//! Deterministic tests of the health state machines, with explicit instants.

use std::time::{Duration, Instant};

use super::*;
use crate::testing::{at, backend_id, origin};

fn tcp_config(rise: u32, fall: u32) -> HealthCheckConfig {
    HealthCheckConfig {
        probe: ProbeKind::Tcp,
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(2),
        rise,
        fall,
        proxy_protocol: crate::ProxyProtocol::None,
    }
}

/// Drives one probe of `backend` at or after `now` to the outcome `ok`; returns the probe time.
fn probe_once(checker: &mut ActiveChecker, now: Instant, ok: bool) -> (Instant, Option<Health>) {
    let due = checker.next_deadline().expect("a probe is scheduled").max(now);
    let request = checker.poll_probe(due).expect("a probe is due at the deadline");
    (due, checker.handle_result(due, request.backend, ok))
}

#[test]
fn jitter_stays_within_its_bounds() {
    let interval = Duration::from_secs(10);
    let low = Duration::from_secs(9);
    let high = Duration::from_secs(11);
    assert_eq!(jittered(interval, 0), low);
    assert_eq!(jittered(interval, u64::MAX), high);
    let mut random = crate::hash::SplitMix64(7);
    let mut values = std::collections::BTreeSet::new();
    for _ in 0..1000 {
        let value = jittered(interval, random.next_u64());
        assert!(value >= low && value <= high, "{value:?}");
        values.insert(value);
    }
    assert!(values.len() > 900, "jitter actually varies: {} distinct values", values.len());
    assert_eq!(jittered(Duration::ZERO, 12345), Duration::ZERO);
}

#[test]
fn fall_failures_make_a_backend_unhealthy_and_rise_successes_bring_it_back() {
    let t0 = origin();
    let mut checker = ActiveChecker::new(tcp_config(2, 3), 1);
    checker.set_backends(t0, [backend_id(1)]);
    let first = checker.next_deadline().expect("first probe scheduled");
    assert!(first < at(t0, 10), "first probe within one interval");
    assert!(first > t0, "this seed spreads the first probe into the interval");
    assert_eq!(checker.poll_probe(t0), None, "nothing due before the first probe");
    let mut now = t0;
    let mut transitions = Vec::new();
    for ok in [false, false, true, false, false, false, true, true] {
        let (due, change) = probe_once(&mut checker, now, ok);
        transitions.push(change);
        now = due;
    }
    assert_eq!(
        transitions,
        [None, None, None, None, None, Some(Health::Unhealthy), None, Some(Health::Healthy)],
        "a success resets the failure streak; 3 failures fall, 2 successes rise"
    );
    assert_eq!(checker.verdict(backend_id(1)), Health::Healthy);
}

#[test]
fn probes_that_could_not_be_made_change_no_verdict_and_break_no_streak() {
    let t0 = origin();
    let mut checker = ActiveChecker::new(tcp_config(2, 2), 1);
    checker.set_backends(t0, [backend_id(1)]);
    let (now, change) = probe_once(&mut checker, t0, false);
    assert_eq!(change, None);
    // Ten probes in a row the load balancer could not make (say, no descriptors): no verdict.
    let mut now = now;
    for _ in 0..10 {
        let due = checker.next_deadline().expect("scheduled").max(now);
        let request = checker.poll_probe(due).expect("due");
        checker.handle_inconclusive(request.backend);
        assert!(checker.handle_timeout(due + Duration::from_secs(5)).is_empty(), "no timeout counted either");
        now = due;
    }
    assert_eq!(checker.verdict(backend_id(1)), Health::Healthy);
    // The failure streak is neither reset nor grown: one more real failure makes it two.
    assert_eq!(probe_once(&mut checker, now, false).1, Some(Health::Unhealthy));
}

#[test]
fn probes_follow_the_jittered_interval_and_one_is_in_flight_at_a_time() {
    let t0 = origin();
    let mut checker = ActiveChecker::new(tcp_config(1, 1), 42);
    checker.set_backends(t0, [backend_id(1)]);
    let due = checker.next_deadline().expect("scheduled");
    let request = checker.poll_probe(due).expect("due");
    assert_eq!(request.deadline, due + Duration::from_secs(2));
    assert_eq!(request.kind, ProbeKind::Tcp);
    assert_eq!(checker.poll_probe(at(due, 100)), None, "never two probes of one backend in flight");
    assert_eq!(checker.next_deadline(), Some(request.deadline));
    checker.handle_result(at(due, 1), backend_id(1), true);
    let next = checker.next_deadline().expect("next probe scheduled");
    assert!(next >= at(due, 9) && next <= at(due, 11), "next probe one jittered interval later");
}

#[test]
fn a_probe_past_its_deadline_counts_as_a_failure_and_late_results_are_ignored() {
    let t0 = origin();
    let mut checker = ActiveChecker::new(tcp_config(1, 1), 3);
    checker.set_backends(t0, [backend_id(1), backend_id(2)]);
    // Every first probe falls within the first interval.
    let now = at(t0, 10);
    let mut started = Vec::new();
    while let Some(request) = checker.poll_probe(now) {
        started.push(request);
    }
    assert_eq!(started.len(), 2);
    checker.handle_result(now, backend_id(2), true);
    let deadline = started.iter().find(|r| r.backend == backend_id(1)).expect("probe of 1").deadline;
    assert!(checker.handle_timeout(deadline - Duration::from_millis(1)).is_empty());
    assert_eq!(checker.handle_timeout(deadline), [(backend_id(1), Health::Unhealthy)]);
    assert_eq!(checker.handle_result(deadline, backend_id(1), true), None, "late result ignored");
    assert_eq!(checker.unhealthy().collect::<Vec<_>>(), [backend_id(1)]);
}

#[test]
fn a_success_reported_after_the_deadline_counts_as_a_failure() {
    let t0 = origin();
    let mut checker = ActiveChecker::new(tcp_config(1, 1), 9);
    checker.set_backends(t0, [backend_id(1)]);
    let request = checker.poll_probe(at(t0, 10)).expect("due within the first interval");
    let late = request.deadline + Duration::from_millis(1);
    assert_eq!(checker.handle_result(late, backend_id(1), true), Some(Health::Unhealthy));
}

#[test]
fn removed_backends_are_forgotten_and_new_ones_start_healthy() {
    let t0 = origin();
    let mut checker = ActiveChecker::new(tcp_config(1, 1), 5);
    checker.set_backends(t0, [backend_id(1)]);
    let (due, _) = probe_once(&mut checker, t0, false);
    assert_eq!(checker.verdict(backend_id(1)), Health::Unhealthy);
    checker.set_backends(due, [backend_id(1), backend_id(2)]);
    assert_eq!(checker.verdict(backend_id(1)), Health::Unhealthy, "state of kept backends is kept");
    assert_eq!(checker.verdict(backend_id(2)), Health::Healthy);
    checker.set_backends(due, [backend_id(2)]);
    assert_eq!(checker.unhealthy().count(), 0);
}

fn outlier_config(percent: u8) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(10),
        max_ejection: Duration::from_secs(60),
        max_ejection_percent: percent,
    }
}

#[test]
fn consecutive_failures_eject_and_a_success_resets_the_count() {
    let t0 = origin();
    let mut detector = OutlierDetector::new(outlier_config(100));
    detector.set_backends([backend_id(1), backend_id(2)]);
    assert!(!detector.handle_failure(t0, backend_id(1)));
    assert!(!detector.handle_failure(t0, backend_id(1)));
    detector.handle_success(t0, backend_id(1));
    assert!(!detector.handle_failure(t0, backend_id(1)));
    assert!(!detector.handle_failure(t0, backend_id(1)));
    assert!(detector.handle_failure(t0, backend_id(1)), "third consecutive failure ejects");
    assert!(detector.is_ejected(backend_id(1)));
    assert_eq!(detector.next_deadline(), Some(at(t0, 10)));
    assert!(detector.handle_timeout(at(t0, 9)).is_empty());
    assert_eq!(detector.handle_timeout(at(t0, 10)), [backend_id(1)]);
    assert!(!detector.is_ejected(backend_id(1)));
}

#[test]
fn ejection_time_doubles_on_repeat_up_to_the_cap_and_decays() {
    let t0 = origin();
    let config = outlier_config(100);
    assert_eq!((1..=5).map(|n| config.ejection_time(n).as_secs()).collect::<Vec<_>>(), [10, 20, 40, 60, 60]);
    assert_eq!(config.ejection_time(u32::MAX), Duration::from_secs(60));
    let mut detector = OutlierDetector::new(config);
    detector.set_backends([backend_id(1), backend_id(2)]);
    let mut now = t0;
    let mut lengths = Vec::new();
    for _ in 0..3 {
        while !detector.handle_failure(now, backend_id(1)) {}
        let until = detector.next_deadline().expect("ejected");
        lengths.push(until.duration_since(now).as_secs());
        detector.handle_timeout(until);
        now = until;
    }
    assert_eq!(lengths, [10, 20, 40]);
    // A full max_ejection without ejection starts the back-off over.
    detector.handle_success(now + Duration::from_secs(60), backend_id(1));
    now += Duration::from_secs(60);
    while !detector.handle_failure(now, backend_id(1)) {}
    assert_eq!(detector.next_deadline(), Some(now + Duration::from_secs(10)));
}

#[test]
fn never_ejects_more_than_the_configured_share() {
    let t0 = origin();
    let mut detector = OutlierDetector::new(outlier_config(50));
    detector.set_backends((1..=5).map(backend_id));
    assert_eq!(detector.max_ejected(), 2);
    for i in 1..=5 {
        for _ in 0..10 {
            detector.handle_failure(t0, backend_id(i));
        }
    }
    assert_eq!(detector.ejected().collect::<Vec<_>>(), [backend_id(1), backend_id(2)]);
    // When one comes back, the next failing backend may take its place.
    detector.handle_timeout(at(t0, 10));
    assert!(detector.ejected().count() == 0);
    for _ in 0..3 {
        detector.handle_failure(at(t0, 10), backend_id(5));
    }
    assert!(detector.is_ejected(backend_id(5)));

    let mut single = OutlierDetector::new(outlier_config(50));
    single.set_backends([backend_id(1)]);
    for _ in 0..10 {
        assert!(!single.handle_failure(t0, backend_id(1)), "the only backend is never ejected at 50%");
    }
}

#[test]
fn overlay_marks_per_service_and_globally() {
    let web = crate::model::ObjectRef::service("default", "web");
    let api = crate::model::ObjectRef::service("default", "api");
    let mut overlay = HealthOverlay::new();
    assert!(overlay.is_empty());
    overlay.extend(&web, [backend_id(1)]);
    overlay.mark_global(backend_id(2));
    assert!(overlay.is_unhealthy(&web, backend_id(1)));
    assert!(!overlay.is_unhealthy(&api, backend_id(1)));
    assert!(overlay.is_unhealthy(&api, backend_id(2)));
    assert!(!overlay.is_empty());
}
