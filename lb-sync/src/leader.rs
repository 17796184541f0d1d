//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! one replica holds the Lease and renews it every `retry`; the others poll it and take it over
//! once it has not been renewed for `lease_duration` (measured on their own clock from when they
//! last saw it change, so clock skew between nodes does not matter). Every write carries the
//! resourceVersion it read, so two candidates cannot both win (the second gets 409). A leader that
//! cannot renew within `renew_deadline` steps down before anyone else may take over; on shutdown
//! it releases the Lease (empty holder) so a successor takes over at once.
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
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// Whether this replica leads, as [`run`] keeps it.
pub type Leadership = watch::Receiver<bool>;

/// The last state of the Lease a candidate saw, and when (on its own clock).
struct Observed {
    holder: Option<String>,
    resource_version: Option<String>,
    duration: Duration,
    at: Instant,
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
        let outcome = try_acquire_or_renew(&api, &config, &mut observed).await;
        let now = Instant::now();
        match outcome {
            Ok(true) => {
                last_renewal = Some(now);
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
        tokio::select! {
            _ = &mut shutdown => break,
            () = tokio::time::sleep(config.retry) => {}
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

/// One round: `Ok(true)` when this replica holds the Lease after it.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
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
    // The Lease changed since last seen: its holder renewed; expiry counts from now.
    if observed.as_ref().is_none_or(|o| o.resource_version != current.metadata.resource_version) {
        *observed = Some(Observed {
            holder: holder.clone(),
            resource_version: current.metadata.resource_version.clone(),
            duration,
            at: now,
        });
    }
    let seen = observed.as_ref().expect("just set");
    let mine = holder.as_deref() == Some(config.identity.as_str());
    let expired = holder.is_none() || now.duration_since(seen.at) >= seen.duration;
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
                at: Instant::now(),
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
