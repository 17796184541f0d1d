//! What [`crate::pods`] and [`crate::lab`] share: named network namespaces of this test process,
//! entered from a thread, deleted on drop, and swept when the process that made them died; the
//! private /24s they use; `ip` as a fallible call.
//!
//! Invariants: every namespace a test makes is named `ringlb-test-<pid>-…`, so a later test
//! process deletes those of dead ones; a /24 is handed out once per process, never one that a
//! host interface already uses, and its second octet comes from the PID, so that concurrent test
//! processes rarely meet.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

pub(crate) const PREFIX: &str = "ringlb-test-";
const NETNS_DIR: &str = "/run/netns";

/// A named network namespace, deleted on drop.
pub(crate) struct Namespace {
    pub(crate) name: String,
}

impl Namespace {
    /// Creates `ringlb-test-<pid>-<suffix>` with its loopback up.
    pub(crate) fn create(suffix: &str) -> io::Result<Namespace> {
        let name = format!("{PREFIX}{}-{suffix}", std::process::id());
        ip(&["netns", "add", &name])?;
        let namespace = Namespace { name };
        namespace.ip(&["link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// `ip -n <namespace> args…`.
    pub(crate) fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside the namespace (sockets it creates live there).
    pub(crate) fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_DIR}/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let namespace = File::open(&path).expect("open the namespace");
                    // SAFETY: setns(2) on a descriptor we own; it changes only this thread's
                    // network namespace, and the thread ends with the scope.
                    let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "setns: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the namespace thread panicked")
        })
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A /24 of `10.0.0.0/8` for this process that no host interface uses (`[10, b, c]`).
pub(crate) fn free_subnet() -> io::Result<[u8; 3]> {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    remove_stale();
    let second = 200 + (std::process::id() % 50) as u8;
    for _ in 0..=u8::MAX {
        let subnet = [10, second, NEXT.fetch_add(1, Ordering::Relaxed)];
        if !subnet_in_use(subnet)? {
            return Ok(subnet);
        }
    }
    Err(io::Error::other("every 10.x.y.0/24 of this process is in use"))
}

/// A name for a link made in the host namespace before it moves: unique on the host, at most 15
/// bytes (IFNAMSIZ).
pub(crate) fn link_name(tag: char, subnet: [u8; 3], n: u8) -> String {
    format!("rlt{}{tag}{:02x}{n:02x}", std::process::id() % 100_000, subnet[2])
}

pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip").args(args).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn subnet_in_use(subnet: [u8; 3]) -> io::Result<bool> {
    let prefix = format!("{}.{}.{}.0/24", subnet[0], subnet[1], subnet[2]);
    let output = Command::new("ip").args(["-4", "-o", "addr", "show", "to", &prefix]).output()?;
    Ok(!output.stdout.is_empty())
}

/// Deletes the namespaces of test processes that no longer exist.
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix(PREFIX).and_then(|rest| rest.split_once('-')).map(|(pid, _)| pid.to_owned())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
