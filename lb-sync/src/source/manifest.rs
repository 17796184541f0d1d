//! [`ManifestSource`]: follows a manifest PATH and reports its objects to the control loop whenever
//! what the files say changes.
//!
//! Invariants: a load that fails (unreadable file, bad YAML, an object that does not match the
//! schema, a duplicate) reports nothing, so the served table stays; it is logged with file and object
//! and counted as a rejected reload. A load whose files did not change reports nothing either.
//! Reading and parsing run on tokio's blocking pool, never on the control thread itself. Changes are
//! noticed through file events (debounced) and, in case those are missed, by re-reading the files
//! every poll interval and comparing their content; both paths converge on one reload.

use std::future::pending;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::watch::FileWatch;
use super::{Source, SyncError};
use crate::control::{SourceHandle, blocking};
use crate::manifest::{ManifestError, ManifestFile, ManifestSet, ReadError, read_manifest_files};
use crate::store::{Change, Object, SliceParser};

/// How long file events must pause before a reload (editors and `kubectl` write in bursts).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
/// The longest a burst of events may delay a reload.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(500);
/// How often the files are re-read in case a file event was missed.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The Service, EndpointSlice and Endpoints objects of manifest files (a file or a directory, see
/// [`crate::manifest`]), followed as they change.
#[derive(Debug)]
pub struct ManifestSource {
    path: PathBuf,
    debounce: Duration,
    max_delay: Duration,
    poll_interval: Duration,
    file_events: bool,
}

/// What the last reload saw, so an unchanged input is neither reported nor re-logged.
#[derive(PartialEq)]
enum Seen {
    Files(Arc<Vec<ManifestFile>>),
    Unreadable(String),
}

impl ManifestSource {
    /// A source for `path`: a file or a directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ManifestSource {
            path: path.into(),
            debounce: DEFAULT_DEBOUNCE,
            max_delay: DEFAULT_MAX_DELAY,
            poll_interval: DEFAULT_POLL_INTERVAL,
            file_events: true,
        }
    }

    /// Sets how long file events must pause before a reload, and the longest a burst may delay one.
    pub fn with_debounce(mut self, quiet: Duration, max_delay: Duration) -> Self {
        self.debounce = quiet;
        self.max_delay = max_delay.max(quiet);
        self
    }

    /// Sets how often the files are re-read regardless of file events (the safety net).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Turns file events off, leaving only the periodic re-read (for file systems without inotify,
    /// and to test that safety net on its own).
    pub fn with_file_events(mut self, enabled: bool) -> Self {
        self.file_events = enabled;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn start_watch(&self) -> Option<FileWatch> {
        if !self.file_events {
            return None;
        }
        match FileWatch::start(&self.path) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    poll_interval = ?self.poll_interval,
                    "cannot watch manifests for changes; re-reading them periodically only"
                );
                None
            }
        }
    }

    /// Re-reads the files and, if they changed and parse, reports their objects. Returns `false`
    /// once the control loop is gone.
    async fn reload(&self, seen: &mut Seen, handle: &SourceHandle) -> bool {
        let readiness = handle.readiness();
        let files = match self.read_files().await {
            Ok(files) => files,
            Err(reason) => {
                tracing::warn!(path = %self.path.display(), reason, "manifest reload did not complete");
                return true;
            }
        };
        let now = match files {
            Ok(files) => Seen::Files(Arc::new(files)),
            Err(error) => Seen::Unreadable(error.to_string()),
        };
        if now == *seen {
            return true;
        }
        let files = match &now {
            Seen::Files(files) => Arc::clone(files),
            Seen::Unreadable(error) => {
                tracing::warn!(
                    error = error.as_str(),
                    "manifests unreadable; the previous snapshot keeps serving"
                );
                readiness.mark_inputs_rejected();
                *seen = now;
                readiness.count_load();
                return true;
            }
        };
        let parsed = match blocking(move || ManifestSet::from_files(&files)).await {
            Ok(parsed) => parsed,
            Err(reason) => {
                // `seen` stays as it was, so the next poll tries these files again.
                tracing::warn!(path = %self.path.display(), reason, "manifest reload did not complete");
                return true;
            }
        };
        *seen = now;
        match parsed {
            Ok(set) => {
                if readiness.inputs_rejected() {
                    tracing::info!(path = %self.path.display(), "manifests valid again");
                }
                readiness.mark_inputs_valid();
                handle.send(vec![everything(set)]).await
            }
            Err(errors) => {
                for error in &errors {
                    tracing::warn!(
                        file = %error.file().display(),
                        object = error.object().map(ToString::to_string),
                        %error,
                        "manifest edit rejected; the previous snapshot keeps serving"
                    );
                }
                readiness.mark_inputs_rejected();
                readiness.count_load();
                true
            }
        }
    }

    /// Reads the files on the blocking pool. The outer error means the task itself was lost.
    async fn read_files(&self) -> Result<Result<Vec<ManifestFile>, ReadError>, String> {
        let path = self.path.clone();
        blocking(move || read_manifest_files(&path)).await
    }

    /// The first load: any failure is the source's failure to start.
    async fn initial_load(&self) -> Result<(Seen, ManifestSet), SyncError> {
        let loader_failed = |reason| SyncError::LoaderFailed { path: self.path.clone(), reason };
        let initial_load =
            |errors: Vec<ManifestError>| SyncError::InitialLoad { path: self.path.clone(), errors };
        let files = self
            .read_files()
            .await
            .map_err(loader_failed)?
            .map_err(|error| initial_load(vec![error.into()]))?;
        let files = Arc::new(files);
        let parsing = Arc::clone(&files);
        let set = blocking(move || ManifestSet::from_files(&parsing)).await.map_err(loader_failed)?;
        Ok((Seen::Files(files), set.map_err(initial_load)?))
    }
}

impl Source for ManifestSource {
    /// Reports the files' objects, then follows the files; fails only when the first load fails
    /// (later bad edits are logged and the previous table keeps serving).
    async fn run(self, handle: SourceHandle) -> Result<(), SyncError> {
        // Started before the first read, so a change made during the initial load is not missed.
        let watch = self.start_watch();
        let (mut seen, set) = self.initial_load().await?;
        if !handle.send(vec![everything(set)]).await {
            return Ok(());
        }
        let mut poll = tokio::time::interval_at(Instant::now() + self.poll_interval, self.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let alive = tokio::select! {
                () = next_change(watch.as_ref()) => {
                    if let Some(watch) = &watch {
                        watch.settle(self.debounce, self.max_delay).await;
                    }
                    self.reload(&mut seen, &handle).await
                }
                _ = poll.tick() => self.reload(&mut seen, &handle).await,
            };
            if !alive {
                return Ok(());
            }
        }
    }
}

/// Every object of a load, replacing all the store held.
fn everything(set: ManifestSet) -> Change {
    let mut parser = SliceParser::default();
    let objects = (set.services.into_iter().map(Object::from))
        .chain(set.slices.iter().filter_map(|slice| parser.object(slice)))
        .chain(set.endpoints.into_iter().map(Object::Endpoints))
        .collect();
    Change::everything(objects)
}

/// Resolves on the next file event; never, when there are no file events.
async fn next_change(watch: Option<&FileWatch>) {
    match watch {
        Some(watch) => watch.changed().await,
        None => pending().await,
    }
}
