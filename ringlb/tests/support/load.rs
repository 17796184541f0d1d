//! Load for chaos tests: client threads making requests through ringlb back to back while a test
//! breaks something, each request's outcome tallied by the backend that answered it.
//!
//! A request is whatever the test passes (connect, exchange, close); it answers the backend's name
//! or why it failed. The threads stop when the [`Load`] is stopped (or dropped); nothing here
//! waits on time: [`Load::wait_made`] polls the request count under the shared deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::poll_until;

/// What the client threads saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests served, by the name of the backend that served them.
    pub served: BTreeMap<String, u64>,
    /// Each failed request: when it started, when it failed, and why.
    pub failures: Vec<Failure>,
}

/// A request that failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub started: Instant,
    pub failed: Instant,
    pub why: String,
}

impl Tally {
    pub fn requests(&self) -> u64 {
        self.served.values().sum::<u64>() + self.failures.len() as u64
    }

    pub fn served_by(&self, name: &str) -> u64 {
        self.served.get(name).copied().unwrap_or(0)
    }
}

/// Client threads making requests until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    /// Starts `clients` threads, each making `request` after `request` with `pause` between them
    /// (pacing, so the load leaves CPU to ringlb on a small machine).
    pub fn start<F>(clients: usize, pause: Duration, request: F) -> Load
    where
        F: Fn() -> Result<String, String> + Send + Sync + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicU64::new(0));
        let request = Arc::new(request);
        let threads = (0..clients)
            .map(|i| {
                let (stop, made, request) = (stop.clone(), made.clone(), request.clone());
                std::thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || {
                        let mut tally = Tally::default();
                        while !stop.load(Ordering::Acquire) {
                            let started = Instant::now();
                            match request() {
                                Ok(name) => *tally.served.entry(name).or_insert(0) += 1,
                                Err(why) => {
                                    tally.failures.push(Failure { started, failed: Instant::now(), why })
                                }
                            }
                            made.fetch_add(1, Ordering::AcqRel);
                            std::thread::sleep(pause);
                        }
                        tally
                    })
                    .expect("spawn a load thread")
            })
            .collect();
        Load { stop, made, threads }
    }

    /// Requests completed (served or failed) so far.
    pub fn made(&self) -> u64 {
        self.made.load(Ordering::Acquire)
    }

    /// Waits until `more` requests beyond those made so far are completed.
    pub fn wait_made(&self, more: u64) {
        let target = self.made() + more;
        poll_until(&format!("the load to make {more} more requests"), || {
            (self.made() >= target).then_some(())
        });
    }

    /// Stops the threads; what they saw, summed.
    pub fn stop(mut self) -> Tally {
        self.stop.store(true, Ordering::Release);
        let mut total = Tally::default();
        for thread in self.threads.drain(..) {
            let tally = thread.join().expect("a load thread");
            for (name, n) in tally.served {
                *total.served.entry(name).or_insert(0) += n;
            }
            total.failures.extend(tally.failures);
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}
