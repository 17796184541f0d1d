//! Leader election with a `coordination.k8s.io/v1` Lease, after client-go's leaderelection:
//! one replica holds the Lease and renews it every `retry`; the others poll it every `retry`.
//! Every write carries the resourceVersion it read, so two candidates cannot both win (the second
//! gets 409) and a candidate cannot take a Lease renewed since it last read it.
//!
//! Invariants, all on each replica's own clock (skew between nodes does not matter):
//! - A leader counts its renewal from when it *sent* the request, bounds every request by what is
//!   left of `renew_deadline`, and steps down once `renew_deadline` has passed without a renewal.
//! - A candidate dates a renewal it sees at the earliest moment it can have happened: its previous
//!   read, which still showed the older version. It takes over `lease_duration` after that, at
//!   that instant rather than on its next poll. So a killed leader is replaced within
//!   `lease_duration` of its death (between `lease_duration - 2 * retry` and `lease_duration`).
//! - That is safe while `renew_deadline + retry < lease_duration` (client-go's proportions,
//!   2/3 + 2/15 of the lease, leave a fifth of the lease as margin): by the time a candidate may
//!   take over, a leader that could not renew has stepped down.
//! - On shutdown a leader releases the Lease (empty holder) so a successor takes over at once.
//!
//! Hand-written rather than a crate: the maintained kube-rs election crates pin older kube
//! versions, and the algorithm is a page of Lease GET/PUT.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Error};
use tokio::sync::watch;

/// Timings, client-go's defaults.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name, usually).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down (less than `lease_duration`).
    pub renew_deadline: Duration,
    /// How often the leader renews and candidates try.
    pub retry: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: a 15 s lease.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::ZERO,
            renew_deadline: Duration::ZERO,
            retry: Duration::ZERO,
        }
        .with_lease_duration(Duration::from_secs(15))
    }

    /// Another lease duration, with client-go's proportions: renew deadline 2/3 and retry 2/15 of
    /// it (at least 200 ms), which keep `renew_deadline + retry < lease_duration`.
    pub fn with_lease_duration(mut self, lease_duration: Duration) -> Self {
        self.lease_duration = lease_duration;
        self.renew_deadline = lease_duration * 2 / 3;
        self.retry = (lease_duration * 2 / 15).max(Duration::from_millis(200));
        self
    }
}

/// Whether this replica leads, as [`run`] keeps it.
pub type Leadership = watch::Receiver<bool>;

/// The last state of the Lease a candidate saw, on its own clock.
struct Observed {
    holder: Option<String>,
    resource_version: Option<String>,
    duration: Duration,
    /// The earliest moment this version can have been written: the previous read (which showed
    /// an older one), or this read itself when there was none.
    since: Instant,
    /// When it was last read.
    read: Instant,
}

impl Observed {
    /// When a candidate may take this Lease over (now, for a released one).
    fn expires(&self) -> Instant {
        if self.holder.is_none() { self.since } else { self.since + self.duration }
    }
}

/// Runs the election until `shutdown` resolves, reporting leadership into `leading`; a leader
/// releases the Lease on the way out.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leading: watch::Sender<bool>,
    shutdown: impl std::future::Future,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut observed: Option<Observed> = None;
    let mut last_renewal: Option<Instant> = None;
    let mut failures = lb_core::LogThrottle::new(Duration::from_secs(30));
    loop {
        let sent = Instant::now();
        // A leader's request may take only what is left of its renew deadline, so a hung
        // request cannot keep it leading past the point where a candidate may take over.
        let budget = match last_renewal {
            Some(at) if *leading.borrow() => config.renew_deadline.saturating_sub(sent.duration_since(at)),
            _ => config.renew_deadline,
        };
        let outcome = match tokio::time::timeout(
            budget,
            try_acquire_or_renew(&api, &config, &mut observed, sent),
        )
        .await
        {
            Ok(outcome) => outcome.map_err(Failure::Api),
            Err(_) => Err(Failure::TimedOut(budget)),
        };
        let now = Instant::now();
        match outcome {
            Ok(true) => {
                last_renewal = Some(sent);
                if !*leading.borrow() {
                    tracing::info!(identity = %config.identity, lease = %config.name, "became the leader");
                    leading.send_replace(true);
                }
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(identity = %config.identity, "lost the lease to another replica");
                    leading.send_replace(false);
                }
                last_renewal = None;
            }
            Err(error) => {
                if let Some(suppressed) = failures.admit(now) {
                    tracing::warn!(%error, suppressed, lease = %config.name, "the lease could not be read or written");
                }
                if *leading.borrow()
                    && last_renewal.is_none_or(|at| now.duration_since(at) >= config.renew_deadline)
                {
                    tracing::warn!(identity = %config.identity, "could not renew the lease in time; stepping down");
                    leading.send_replace(false);
                    last_renewal = None;
                }
            }
        }
        // A candidate wakes when the holder's Lease expires if that comes before its next poll.
        let mut wake = sent + config.retry;
        if !*leading.borrow()
            && let Some(seen) = &observed
        {
            wake = wake.min(seen.expires().max(now));
        }
        tokio::select! {
            _ = &mut shutdown => break,
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    if *leading.borrow() {
        leading.send_replace(false);
        if let Err(error) = release(&api, &config).await {
            tracing::warn!(%error, "the lease could not be released; a successor waits for it to expire");
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The earliest moment a version first seen at `now` counts as written: the previous read (which
/// showed an older one), but no earlier than one `retry` ago. The bound keeps a candidate whose
/// reads failed for a while from dating a fresh renewal back to its last good read; it is safe
/// because the holder sent its renewal before `now` and stays leader for at most `renew_deadline`
/// after, while `now - retry + lease_duration` lies beyond that.
fn written_since(previous_read: Option<Instant>, now: Instant, retry: Duration) -> Instant {
    let floor = now.checked_sub(retry).unwrap_or(now);
    previous_read.map_or(floor, |read| read.max(floor))
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Api(Error),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// One round, begun at `sent`: `Ok(true)` when this replica holds the Lease after it.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
    sent: Instant,
) -> Result<bool, Error> {
    let lease_seconds = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let current = match api.get_opt(&config.name).await? {
        Some(lease) => lease,
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(config.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(lease_seconds),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        }
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let duration = Duration::from_secs(
        spec.lease_duration_seconds.unwrap_or(lease_seconds).max(1).unsigned_abs().into(),
    );
    let now = Instant::now();
    match observed {
        Some(seen) if seen.resource_version == current.metadata.resource_version => seen.read = sent,
        _ => {
            let since = written_since(observed.as_ref().map(|seen| seen.read), now, config.retry);
            *observed = Some(Observed {
                holder: holder.clone(),
                resource_version: current.metadata.resource_version.clone(),
                duration,
                since,
                read: sent,
            });
        }
    }
    let seen = observed.as_ref().expect("just set");
    let mine = holder.as_deref() == Some(config.identity.as_str());
    let expired = now >= seen.expires();
    if !mine && !expired {
        return Ok(false);
    }
    let mut next = current.clone();
    let spec = next.spec.get_or_insert_with(LeaseSpec::default);
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(lease_seconds);
    if !mine {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(now_micro());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(seen.holder.is_some()));
    }
    match api.replace(&config.name, &PostParams::default(), &next).await {
        Ok(stored) => {
            *observed = Some(Observed {
                holder: Some(config.identity.clone()),
                resource_version: stored.metadata.resource_version,
                duration,
                since: sent,
                read: sent,
            });
            Ok(true)
        }
        // Someone else wrote it first (a renewal, or a rival candidate): not ours this round.
        Err(Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Gives the Lease up: no holder, so the next candidate takes it at once.
async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else { return Ok(()) };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(1);
    api.replace(&config.name, &PostParams::default(), &lease).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(holder: Option<&str>, since: Instant) -> Observed {
        Observed {
            holder: holder.map(str::to_owned),
            resource_version: Some("1".into()),
            duration: Duration::from_secs(15),
            since,
            read: since,
        }
    }

    #[test]
    fn a_renewal_is_dated_to_the_previous_read_but_never_more_than_one_retry_back() {
        let now = Instant::now() + Duration::from_secs(60);
        let retry = Duration::from_secs(2);
        let recent = now - Duration::from_millis(1500);
        assert_eq!(written_since(Some(recent), now, retry), recent);
        // Reads failed for a while: the renewal is not dated back to the last good one.
        assert_eq!(written_since(Some(now - Duration::from_secs(30)), now, retry), now - retry);
        assert_eq!(written_since(None, now, retry), now - retry);
    }

    #[test]
    fn a_held_lease_expires_its_duration_after_it_was_written_and_a_released_one_at_once() {
        let since = Instant::now();
        assert_eq!(observed(Some("a"), since).expires(), since + Duration::from_secs(15));
        assert_eq!(observed(None, since).expires(), since);
    }

    #[test]
    fn client_go_proportions_leave_a_margin_between_step_down_and_takeover() {
        for seconds in [1, 3, 15, 60] {
            let config = LeaseConfig::new("ns", "l", "me").with_lease_duration(Duration::from_secs(seconds));
            assert!(config.renew_deadline + config.retry < config.lease_duration, "{config:?}");
        }
    }
}
