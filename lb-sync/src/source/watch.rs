//! File-system change notifications for a manifest PATH, coalesced and debounced.
//!
//! For a file the PARENT directory is watched, because editors save by writing a temporary file and
//! renaming it over the original (a watch on the old inode would go silent) and tools delete and
//! recreate. Events are only hints: every wake-up re-reads the files and compares their content, so
//! spurious events cost a read, never a publish. Our own reads raise open/close events; those are
//! ignored so a reload never triggers the next one. Missed events are covered by the periodic re-check
//! in the run loop; this module must never be the only way a change is seen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A running watch; dropping it stops the watcher thread.
pub(crate) struct FileWatch {
    _watcher: RecommendedWatcher,
    changed: Arc<Notify>,
}

impl FileWatch {
    /// Starts watching `path` (see the module doc for what exactly is watched).
    pub(crate) fn start(path: &Path) -> Result<FileWatch, notify::Error> {
        let changed = Arc::new(Notify::new());
        let signal = Arc::clone(&changed);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            // An error (e.g. a queue overflow) may hide a change: re-check rather than ignore it.
            if event.as_ref().map_or(true, is_change) {
                signal.notify_one();
            }
        })?;
        watcher.watch(&watched_dir(path), RecursiveMode::NonRecursive)?;
        // A file that is a symlink into another directory changes there; watch that too. (A ConfigMap
        // mount needs no extra watch: its updates swap a symlink in the parent directory.)
        if let Some(target_dir) = symlink_target_dir(path)
            && let Err(error) = watcher.watch(&target_dir, RecursiveMode::NonRecursive)
        {
            tracing::debug!(dir = %target_dir.display(), %error, "cannot watch the manifest's symlink target");
        }
        Ok(FileWatch { _watcher: watcher, changed })
    }

    /// Resolves once something changed since the previous call returned (a change that happened while
    /// nobody waited is remembered, never lost).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// After a first change, waits until changes stop for `quiet` (editors and `kubectl` write in
    /// bursts), but no longer than `max_delay` in all, so a steady trickle cannot starve a reload.
    pub(crate) async fn settle(&self, quiet: Duration, max_delay: Duration) {
        let give_up = Instant::now() + max_delay;
        loop {
            let quiet_until = (Instant::now() + quiet).min(give_up);
            tokio::select! {
                () = self.changed.notified() => {
                    if Instant::now() >= give_up {
                        return;
                    }
                }
                () = tokio::time::sleep_until(quiet_until) => return,
            }
        }
    }
}

/// The directory whose entries decide what a load of `path` reads.
pub(crate) fn watched_dir(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// For a `path` that is a symlink to a file, the directory of its target when that is not the directory
/// watched anyway.
fn symlink_target_dir(path: &Path) -> Option<PathBuf> {
    if !std::fs::symlink_metadata(path).ok()?.file_type().is_symlink() {
        return None;
    }
    let target = std::fs::canonicalize(path).ok()?;
    if target.is_dir() {
        return None;
    }
    let target_dir = target.parent()?.to_path_buf();
    let watched = std::fs::canonicalize(watched_dir(path)).ok()?;
    (target_dir != watched).then_some(target_dir)
}

/// Whether an event may mean changed content; opens and read-closes (including our own reads) do not.
fn is_change(event: &Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    #[test]
    fn a_file_is_watched_through_its_parent_directory() {
        assert_eq!(watched_dir(Path::new("/nonexistent/dir/services.yaml")), Path::new("/nonexistent/dir"));
        assert_eq!(watched_dir(Path::new("services.yaml")), Path::new("."));
    }

    #[test]
    fn reads_are_not_changes_but_writes_and_renames_are() {
        let read = Event::new(EventKind::Access(AccessKind::Open(AccessMode::Any)));
        let read_close = Event::new(EventKind::Access(AccessKind::Close(AccessMode::Read)));
        assert!(!is_change(&read));
        assert!(!is_change(&read_close));
        let written = Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)));
        let renamed = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::To)));
        let created = Event::new(EventKind::Create(CreateKind::File));
        assert!(is_change(&written) && is_change(&renamed) && is_change(&created));
    }
}
