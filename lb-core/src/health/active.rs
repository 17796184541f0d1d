//! Active health checks: one state machine per Service probing each of its backends (TCP connect,
//! or HTTP GET expecting a status) every interval with jitter, and turning `rise` consecutive
//! successes into healthy and `fall` consecutive failures (a timeout is one) into unhealthy.
//!
//! Call order: `set_backends(now, ..)` whenever the snapshot's backends change; then, at every wake
//! up, `handle_timeout(now)`, `poll_probe(now)` until it returns `None` (start each probe), and sleep
//! until `next_deadline()`; feed each probe's outcome to `handle_result(now, backend, ok)`. New
//! backends start healthy (Kubernetes already called them ready) and are first probed at a random
//! point of the first interval, so probes of many backends do not start in lockstep. Randomness comes
//! from a seed given to [`ActiveChecker::new`]; the machine never reads a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Health;
use crate::hash::SplitMix64;
use crate::model::BackendId;
use crate::proxy_protocol::ProxyProtocol;

/// How far an interval may be stretched or shrunk, in percent of it.
pub const JITTER_PERCENT: u32 = 10;

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ProbeKind {
    /// A TCP connect that completes in time.
    Tcp,
    /// An HTTP/1.1 `GET path` answered with `expected_status` in time.
    Http { path: String, expected_status: u16 },
}

/// Active health check parameters, from the `ringlb.io/health-*` annotations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct HealthCheckConfig {
    pub probe: ProbeKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
    /// The PROXY protocol version the backends expect first (the Service's, for TCP): a probe
    /// sends them that version's LOCAL header, which says "a check of the proxy's own, take the
    /// connection's addresses" (see `ProxyHeader::local`).
    pub proxy_protocol: ProxyProtocol,
}

impl HealthCheckConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_RISE: u32 = 2;
    pub const DEFAULT_FALL: u32 = 3;
    pub const DEFAULT_HTTP_STATUS: u16 = 200;

    /// `probe` with every other parameter at its default.
    pub fn new(probe: ProbeKind) -> Self {
        HealthCheckConfig {
            probe,
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            rise: Self::DEFAULT_RISE,
            fall: Self::DEFAULT_FALL,
            proxy_protocol: ProxyProtocol::None,
        }
    }
}

/// A probe the caller should start now and report with [`ActiveChecker::handle_result`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    pub backend: BackendId,
    pub kind: ProbeKind,
    /// The header the probe sends first (see [`HealthCheckConfig::proxy_protocol`]).
    pub proxy_protocol: ProxyProtocol,
    /// Give up (and report nothing: `handle_timeout` counts it as a failure) at this instant.
    pub deadline: Instant,
}

/// `interval` moved by up to [`JITTER_PERCENT`] either way, as chosen by `random` (uniform over
/// `u64`): the result is always within `interval * (1 ± JITTER_PERCENT / 100)`.
pub fn jittered(interval: Duration, random: u64) -> Duration {
    let nanos = interval.as_nanos();
    let spread = nanos * u128::from(JITTER_PERCENT) / 100;
    let offset = (u128::from(random) * (2 * spread + 1)) >> 64;
    let value = nanos - spread + offset;
    Duration::from_nanos(u64::try_from(value).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone)]
struct Target {
    health: Health,
    successes: u32,
    failures: u32,
    next_probe: Instant,
    /// Deadline of the probe in flight.
    in_flight: Option<Instant>,
}

/// Active checks of one Service's backends. See the module doc for the call order.
#[derive(Debug, Clone)]
pub struct ActiveChecker {
    config: HealthCheckConfig,
    random: SplitMix64,
    targets: BTreeMap<BackendId, Target>,
}

impl ActiveChecker {
    pub fn new(config: HealthCheckConfig, seed: u64) -> Self {
        ActiveChecker { config, random: SplitMix64(seed), targets: BTreeMap::new() }
    }

    pub fn config(&self) -> &HealthCheckConfig {
        &self.config
    }

    /// Tracks exactly `backends`: new ones start healthy with a first probe within one interval,
    /// removed ones are forgotten (their in-flight probes' results are then ignored).
    pub fn set_backends(&mut self, now: Instant, backends: impl IntoIterator<Item = BackendId>) {
        let mut targets = BTreeMap::new();
        for backend in backends {
            let target = match self.targets.remove(&backend) {
                Some(target) => target,
                None => {
                    let first = spread(self.config.interval, self.random.next_u64());
                    Target {
                        health: Health::Healthy,
                        successes: 0,
                        failures: 0,
                        next_probe: now + first,
                        in_flight: None,
                    }
                }
            };
            targets.insert(backend, target);
        }
        self.targets = targets;
    }

    /// How many backends it checks.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The next probe due at `now`, if any; call until `None`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<ProbeRequest> {
        let (&backend, target) =
            self.targets.iter_mut().find(|(_, t)| t.in_flight.is_none() && t.next_probe <= now)?;
        let deadline = now + self.config.timeout;
        target.in_flight = Some(deadline);
        target.next_probe = now + jittered(self.config.interval, self.random.next_u64());
        let (kind, proxy_protocol) = (self.config.probe.clone(), self.config.proxy_protocol);
        Some(ProbeRequest { backend, kind, proxy_protocol, deadline })
    }

    /// Feeds a probe's outcome; returns the new verdict when it changed. A success reported after
    /// the probe's deadline counts as a failure (too slow is unhealthy, whether or not
    /// `handle_timeout` ran first). Results for a backend with no probe in flight (after a timeout
    /// was counted, or forgotten by `set_backends`) are ignored.
    pub fn handle_result(&mut self, now: Instant, backend: BackendId, ok: bool) -> Option<Health> {
        let target = self.targets.get_mut(&backend)?;
        let deadline = target.in_flight.take()?;
        record(target, ok && now <= deadline, &self.config)
    }

    /// A probe that could not be made for the load balancer's own lack of resources (no descriptor,
    /// no source port, no memory: see [`crate::LocalResource`]): it says nothing about the backend,
    /// so it changes no count and no verdict; the next probe comes at its usual time.
    pub fn handle_inconclusive(&mut self, backend: BackendId) {
        if let Some(target) = self.targets.get_mut(&backend) {
            target.in_flight = None;
        }
    }

    /// Counts every probe whose deadline passed at `now` as a failure; returns the backends whose
    /// verdict changed.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(BackendId, Health)> {
        let mut changed = Vec::new();
        for (&backend, target) in &mut self.targets {
            if target.in_flight.is_some_and(|deadline| deadline <= now) {
                target.in_flight = None;
                if let Some(health) = record(target, false, &self.config) {
                    changed.push((backend, health));
                }
            }
        }
        changed
    }

    /// When to call back: the earliest probe deadline or next probe.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.targets.values().map(|t| t.in_flight.unwrap_or(t.next_probe)).min()
    }

    /// The verdict on `backend`; an untracked backend is healthy.
    pub fn verdict(&self, backend: BackendId) -> Health {
        self.targets.get(&backend).map_or(Health::Healthy, |t| t.health)
    }

    pub fn unhealthy(&self) -> impl Iterator<Item = BackendId> + '_ {
        self.targets.iter().filter(|(_, t)| t.health == Health::Unhealthy).map(|(&id, _)| id)
    }
}

/// A random point of `[0, interval)`.
fn spread(interval: Duration, random: u64) -> Duration {
    let nanos = (u128::from(random) * interval.as_nanos()) >> 64;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

fn record(target: &mut Target, ok: bool, config: &HealthCheckConfig) -> Option<Health> {
    if ok {
        target.failures = 0;
        target.successes = target.successes.saturating_add(1);
        if target.health == Health::Unhealthy && target.successes >= config.rise {
            target.health = Health::Healthy;
            return Some(Health::Healthy);
        }
    } else {
        target.successes = 0;
        target.failures = target.failures.saturating_add(1);
        if target.health == Health::Healthy && target.failures >= config.fall {
            target.health = Health::Unhealthy;
            return Some(Health::Unhealthy);
        }
    }
    None
}
