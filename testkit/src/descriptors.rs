//! Running a test process out of file descriptors on purpose: [`Exhausted`] takes every descriptor
//! the process may still open (leaving as many free as asked) and gives them back on drop.
//!
//! Process-wide: only for a test binary of its own, whose tests run one after another.

use std::fs::File;

/// Holds all but `left` of the descriptors the process may still open; gives them back on drop.
///
/// It fills the descriptor table up to the soft `RLIMIT_NOFILE` as it is (tens of thousands of
/// `/dev/null` opens take some milliseconds) rather than lowering the limit: io_uring takes the
/// limit of an accept when the accept is submitted, so only a really full table makes an armed
/// accept fail, as it does in production.
pub struct Exhausted {
    _files: Vec<File>,
}

impl Exhausted {
    pub fn leaving(left: usize) -> Exhausted {
        let mut files = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(file) => files.push(file),
                Err(error) => {
                    assert_eq!(error.raw_os_error(), Some(libc::EMFILE), "{error}");
                    break;
                }
            }
        }
        files.truncate(files.len().saturating_sub(left));
        Exhausted { _files: files }
    }
}
