//! Running a test process out of file descriptors on purpose: [`Exhausted`] takes every descriptor
//! the process may still open (leaving as many free as asked) and gives them back on drop.
//!
//! Process-wide: only for a test binary of its own, whose tests run one after another.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Holds all but `left` of the descriptors the process may still open; gives them back on drop.
///
/// It fills the descriptor table up to the soft `RLIMIT_NOFILE` as it is (tens of thousands of
/// `/dev/null` opens take some milliseconds) rather than lowering the limit: io_uring takes the
/// limit of an accept when the accept is submitted, so only a really full table makes an armed
/// accept fail, as it does in production.
pub struct Exhausted {
    _files: Vec<File>,
    /// [`Exhausted::kept_full`]: the refilling thread's stop flag, and the thread, which returns
    /// what it took.
    refill: Option<(Arc<AtomicBool>, std::thread::JoinHandle<Vec<File>>)>,
}

impl Exhausted {
    pub fn leaving(left: usize) -> Exhausted {
        let mut files = fill();
        files.truncate(files.len().saturating_sub(left));
        Exhausted { _files: files, refill: None }
    }

    /// Leaves no descriptor free, and keeps it so: one that another thread closes meanwhile (a
    /// probe's or a backend's socket that was open at the moment of filling) is taken again
    /// within a millisecond, so a loop that opens and closes one socket at a time cannot go on
    /// reusing it.
    pub fn kept_full() -> Exhausted {
        let files = fill();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut taken = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match File::open("/dev/null") {
                        Ok(file) => taken.push(file),
                        // Pacing the retries of a full table, not synchronisation.
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
                    }
                }
                taken
            })
        };
        Exhausted { _files: files, refill: Some((stop, thread)) }
    }
}

impl Drop for Exhausted {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.refill.take() {
            stop.store(true, Ordering::Relaxed);
            drop(thread.join());
        }
    }
}

/// Opens `/dev/null` until the table is full (`EMFILE`).
fn fill() -> Vec<File> {
    let mut files = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => files.push(file),
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(libc::EMFILE), "{error}");
                return files;
            }
        }
    }
}
