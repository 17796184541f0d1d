//! Keeping something outside ringlb (the VIP link's addresses, BIRD's routes) equal to the set
//! a watched value asks for, until told to stop.
//!
//! Invariants: the set is applied again only when it differs from the last one applied
//! successfully (a failure forgets what was applied, so the next pass compares with nothing);
//! a failure is logged at most every [`LOG_EVERY`] and retried after [`RETRY_AFTER`] without
//! waiting for a change; the watch's sender gone (the control loop ended), the last set stays
//! until `stop`, so that draining connections keep their addresses and routes.

use std::fmt::Display;
use std::time::{Duration, Instant};

use lb_core::LogThrottle;
use tokio::sync::watch;

/// How often the same failure is logged at most.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(30);

/// How long a failed change waits before the next attempt.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What makes the outside equal to a set.
///
/// A trait rather than an async closure: the future of an async closure that borrows its argument
/// is not known to be `Send` for every lifetime, so a task running [`follow`] could not be spawned.
pub(crate) trait Apply<S> {
    type Error: Display;

    /// Makes the outside equal to `target`.
    fn apply(&mut self, target: &S) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Applies `target_of` of each value of `wanted` through `target` until `stop` resolves; a failed
/// apply is logged as `failure` (see the module doc).
pub(crate) async fn follow<T, S: PartialEq>(
    mut wanted: watch::Receiver<T>,
    target_of: impl Fn(&T) -> S,
    target: &mut impl Apply<S>,
    failure: &'static str,
    stop: impl Future,
) {
    let mut stop = std::pin::pin!(stop);
    let mut throttle = LogThrottle::new(LOG_EVERY);
    let mut applied = None;
    let mut open = true;
    loop {
        let set = target_of(&wanted.borrow_and_update());
        let failing = if applied.as_ref() == Some(&set) {
            false
        } else {
            match target.apply(&set).await {
                Ok(()) => {
                    applied = Some(set);
                    false
                }
                Err(error) => {
                    if let Some(suppressed) = throttle.admit(Instant::now()) {
                        tracing::warn!(%error, suppressed, "{failure}; retrying");
                    }
                    applied = None;
                    true
                }
            }
        };
        let retry = async {
            if failing {
                tokio::time::sleep(RETRY_AFTER).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            changed = wanted.changed(), if open => open = changed.is_ok(),
            () = retry => {}
        }
    }
}
