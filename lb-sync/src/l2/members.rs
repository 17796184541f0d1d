//! The API half of L2 cluster mode: the member list lives in one `coordination.k8s.io/v1` Lease
//! (`<--lease-name>-l2`, in the election's namespace) as the annotation
//! [`lb_core::annotations::L2_MEMBERS`]. This task watches it (one watch, field selector on its
//! name, so a removed replica learns within milliseconds) into [`MemberList::Leased`], and writes
//! the changes [`super::L2::run`] proposes (decided by `lb_core::l2::members`).
//!
//! Invariants:
//! - every write is a PUT (or the first create) carrying the resourceVersion the change was
//!   decided on: a change decided on an older list is never written (a 409, or a list seen newer
//!   in the meantime, lets L2 decide again on the list it then sees);
//! - writes happen only on joins, address changes and removals (a gracefully stopping replica
//!   removes itself): no periodic or per-Service load;
//! - an API failure (unreachable, 409, 422, 500) is logged throttled and the write retried with
//!   back-off while it is still wanted; nothing here panics or stops L2.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Error};
use lb_core::LogThrottle;
use lb_core::annotations::L2_MEMBERS;
use lb_core::l2::members::{Roster, parse_roster, render_roster};
use tokio::sync::watch;

use super::{MemberList, Proposal};

/// Log at most this often per kind of trouble.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// The first wait before a failed write is tried again; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a stopping replica tries to take itself off the list before it leaves that to the
/// leader's fencing.
const LEAVE_WITHIN: Duration = Duration::from_secs(2);
/// Compare-and-swap attempts of that removal, at most.
const LEAVE_ATTEMPTS: usize = 5;

/// Where the member Lease is.
#[derive(Debug, Clone)]
pub struct MemberLease {
    pub namespace: String,
    pub name: String,
}

impl MemberLease {
    /// The member Lease beside the election Lease `election` (named `<election>-l2`).
    pub fn beside(namespace: &str, election: &str) -> MemberLease {
        MemberLease { namespace: namespace.to_owned(), name: format!("{election}-l2") }
    }
}

/// Runs until `stop` resolves: keeps `list` at the Lease's members, writes what `proposals`
/// asks for this replica `me`.
pub async fn run(
    client: Client,
    lease: MemberLease,
    me: String,
    list: watch::Sender<MemberList>,
    mut proposals: watch::Receiver<Option<Proposal>>,
    stop: impl Future,
) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", lease.name));
    let mut events = watcher::watcher(api.clone(), config).default_backoff().boxed();
    let mut stop = std::pin::pin!(stop);
    // The Lease as last seen (`None`: there is none), once the first list completed.
    let mut current: Option<Option<Lease>> = None;
    let mut listing: Option<Lease> = None;
    let (mut watch_log, mut write_log, mut parse_log) =
        (LogThrottle::new(LOG_EVERY), LogThrottle::new(LOG_EVERY), LogThrottle::new(LOG_EVERY));
    let mut backoff = FIRST_BACKOFF;
    let mut retry_at: Option<Instant> = None;
    let mut open = true;
    tracing::info!(lease = %lease.name, namespace = %lease.namespace, "L2 member list");
    loop {
        // Write the wanted change when it was decided on the list as it is now.
        let wanted = proposals.borrow_and_update().clone();
        if let (Some(seen), Some(proposal)) = (&current, wanted)
            && retry_at.is_none_or(|at| Instant::now() >= at)
            && proposal.version == version_of(seen.as_ref())
        {
            let roster = roster_of(seen.as_ref(), &mut parse_log);
            let next = proposal.change.apply(&me, &roster);
            match write(&api, &lease.name, seen.as_ref(), &next).await {
                Ok(stored) => {
                    tracing::info!(members = %render_roster(&next), "wrote the L2 member list");
                    publish(&list, Some(&stored), &mut parse_log);
                    current = Some(Some(stored));
                    (backoff, retry_at) = (FIRST_BACKOFF, None);
                }
                Err(Error::Api(status)) if status.code == 409 => {
                    // Someone wrote first: read again (the watch would tell soon anyway), and
                    // let L2 decide on what is there; a short pause keeps a confused server
                    // from making this spin.
                    retry_at = Some(Instant::now() + FIRST_BACKOFF);
                    tracing::debug!(lease = %lease.name, "the L2 member list changed under a write; reading again");
                    match api.get_opt(&lease.name).await {
                        Ok(fresh) => {
                            publish(&list, fresh.as_ref(), &mut parse_log);
                            current = Some(fresh);
                        }
                        Err(error) => {
                            log_write(&mut write_log, &error);
                            retry_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
                Err(error) => {
                    log_write(&mut write_log, &error);
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        }
        let retry = async {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = &mut stop => {
                leave(&api, &lease.name, &me, &mut parse_log).await;
                break;
            }
            event = events.next() => match event {
                Some(Ok(Event::Init)) => listing = None,
                Some(Ok(Event::InitApply(object))) => listing = Some(object),
                Some(Ok(Event::InitDone)) => {
                    publish(&list, listing.as_ref(), &mut parse_log);
                    current = Some(listing.take());
                }
                Some(Ok(Event::Apply(object))) => {
                    publish(&list, Some(&object), &mut parse_log);
                    current = Some(Some(object));
                }
                Some(Ok(Event::Delete(_))) => {
                    publish(&list, None, &mut parse_log);
                    current = Some(None);
                }
                Some(Err(error)) => {
                    if let Some(suppressed) = watch_log.admit(Instant::now()) {
                        tracing::warn!(%error, suppressed, lease = %lease.name, "cannot watch the L2 member list");
                    }
                }
                None => break,
            },
            changed = proposals.changed(), if open => open = changed.is_ok(),
            () = retry => retry_at = None,
        }
    }
}

/// Takes `me` off the list on a graceful stop, so that the members who stay count without it:
/// two of three stopping together would otherwise leave the third hearing a minority of a list
/// of three, and silent. A compare-and-swap like every write, bounded by [`LEAVE_WITHIN`].
async fn leave(api: &Api<Lease>, name: &str, me: &str, log: &mut LogThrottle) {
    let attempt = async {
        for _ in 0..LEAVE_ATTEMPTS {
            let seen = api.get_opt(name).await?;
            let mut roster = roster_of(seen.as_ref(), log);
            if roster.remove(me).is_none() {
                return Ok(false);
            }
            match write(api, name, seen.as_ref(), &roster).await {
                Ok(_) => return Ok(true),
                Err(Error::Api(status)) if status.code == 409 => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(LEAVE_WITHIN, attempt).await {
        Ok(Ok(true)) => tracing::info!(lease = name, "left the L2 member list"),
        Ok(Ok(false)) => tracing::debug!(lease = name, "not on the L2 member list (or it kept changing)"),
        Ok(Err(error)) => {
            tracing::warn!(%error, lease = name, "cannot leave the L2 member list; the leader removes this replica once unheard")
        }
        Err(_) => tracing::warn!(
            lease = name,
            "leaving the L2 member list timed out; the leader removes this replica once unheard"
        ),
    }
}

fn log_write(log: &mut LogThrottle, error: &Error) {
    if let Some(suppressed) = log.admit(Instant::now()) {
        tracing::warn!(%error, suppressed, "cannot write the L2 member list; retrying");
    }
}

fn version_of(lease: Option<&Lease>) -> Option<String> {
    lease.and_then(|lease| lease.metadata.resource_version.clone())
}

/// The members `lease` lists (none without the Lease or the annotation; a bad value is logged).
fn roster_of(lease: Option<&Lease>, log: &mut LogThrottle) -> Roster {
    let value = lease.and_then(|lease| lease.metadata.annotations.as_ref()?.get(L2_MEMBERS));
    match value.map(|value| parse_roster(value)) {
        None => Roster::new(),
        Some(Ok(roster)) => roster,
        Some(Err(error)) => {
            if let Some(suppressed) = log.admit(Instant::now()) {
                tracing::warn!(%error, suppressed, "ignoring the L2 member list");
            }
            Roster::new()
        }
    }
}

fn publish(list: &watch::Sender<MemberList>, lease: Option<&Lease>, log: &mut LogThrottle) {
    let next = MemberList::Leased { members: roster_of(lease, log), version: version_of(lease) };
    list.send_if_modified(|current| {
        let changed = *current != next;
        if changed {
            *current = next;
        }
        changed
    });
}

/// Writes `roster` over `seen` (compare-and-swap on its resourceVersion), or creates the Lease.
async fn write(api: &Api<Lease>, name: &str, seen: Option<&Lease>, roster: &Roster) -> Result<Lease, Error> {
    let value = render_roster(roster);
    match seen {
        Some(lease) => {
            let mut next = lease.clone();
            next.metadata.annotations.get_or_insert_default().insert(L2_MEMBERS.to_owned(), value);
            api.replace(name, &PostParams::default(), &next).await
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    annotations: Some([(L2_MEMBERS.to_owned(), value)].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec::default()),
            };
            api.create(&PostParams::default(), &lease).await
        }
    }
}
