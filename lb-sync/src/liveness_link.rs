//! The liveness link (`--bird-liveness-link`): a TUN interface that exists exactly as long as this
//! ringlb process does, so that the routing daemon withdraws the VIPs of a ringlb that died without
//! a word (SIGKILL, a crash, the OOM killer) while the daemon itself runs on.
//!
//! The kernel keeps the promise: a TUN interface that is not persistent is deleted when the last
//! descriptor of it is closed, and a process's descriptors close when it ends, however it ends. BIRD's
//! static routes point at the interface (`route VIP/32 via "NAME"` with `check link`, see
//! [`crate::bird::render`]); when it goes, BIRD drops them and the BGP peers get a withdrawal.
//!
//! Invariants: nothing is ever sent into the interface or read from it (no address, no kernel route
//! points at it; BIRD only watches that it exists and is up); dropping a [`LivenessLink`] deletes the
//! interface.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use futures::TryStreamExt;
use rtnetlink::LinkUnspec;

#[derive(Debug, thiserror::Error)]
pub enum LivenessLinkError {
    #[error("{name:?} is no interface name (1 to 15 bytes, no '/', ':' or whitespace)")]
    Name { name: String },
    #[error("cannot open /dev/net/tun for the liveness link {name}: {error}")]
    Open {
        name: String,
        #[source]
        error: io::Error,
    },
    #[error("cannot create the TUN interface {name} (another process may hold it): {error}")]
    Create {
        name: String,
        #[source]
        error: io::Error,
    },
    #[error("cannot bring the liveness link {name} up: {error}")]
    Up { name: String, error: String },
}

/// The interface and the descriptor that keeps it. See the module doc.
#[derive(Debug)]
pub struct LivenessLink {
    name: String,
    /// Closing it deletes the interface.
    _device: File,
}

impl LivenessLink {
    /// Creates the TUN interface `name` (not persistent) and brings it up.
    pub async fn open(name: &str) -> Result<LivenessLink, LivenessLinkError> {
        let bytes = name.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() < libc::IFNAMSIZ
            && !bytes.iter().any(|b| *b == b'/' || *b == b':' || *b == 0 || b.is_ascii_whitespace());
        if !valid {
            return Err(LivenessLinkError::Name { name: name.to_owned() });
        }
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|error| LivenessLinkError::Open { name: name.to_owned(), error })?;
        let mut request = TunRequest { name: [0; libc::IFNAMSIZ], flags: 0, _rest: [0; 22] };
        for (to, from) in request.name.iter_mut().zip(bytes) {
            *to = *from as libc::c_char;
        }
        request.flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the name and flags and may write the name within the request, which
        // outlives the call and has ifreq's size; the descriptor is open.
        if unsafe { libc::ioctl(device.as_raw_fd(), libc::TUNSETIFF, std::ptr::from_mut(&mut request)) } < 0 {
            let error = io::Error::last_os_error();
            return Err(LivenessLinkError::Create { name: name.to_owned(), error });
        }
        let link = LivenessLink { name: name.to_owned(), _device: device };
        link.up().await.map_err(|error| LivenessLinkError::Up { name: name.to_owned(), error })?;
        tracing::info!(link = %link.name, "liveness link up: BIRD's routes to it live as long as this process");
        Ok(link)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn up(&self) -> Result<(), String> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|error| error.to_string())?;
        let connection = tokio::spawn(connection);
        let outcome = async {
            let mut links = handle.link().get().match_name(self.name.clone()).execute();
            let link = links.try_next().await.map_err(|error| error.to_string())?;
            let index = link.ok_or("the interface is gone")?.header.index;
            let up = handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute();
            up.await.map_err(|error| error.to_string())
        }
        .await;
        connection.abort();
        outcome
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct TunRequest {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip -o link show dev NAME` inside `network`; `None` when there is no such link.
    fn shown(network: &testkit::pods::PodNetwork, name: &str) -> Option<String> {
        let output = std::process::Command::new("ip")
            .args(["-n", network.name(), "-o", "link", "show", "dev", name])
            .output()
            .expect("run ip");
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    #[test]
    fn the_interface_lives_exactly_as_long_as_the_link_and_a_bad_name_is_an_error() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        // Inside a namespace of the test's own, so the host's interfaces are never touched.
        let network = testkit::pods::PodNetwork::create().expect("a network namespace");
        network.enter(|| {
            runtime.block_on(async {
                let link = LivenessLink::open("ringlb-live").await.expect("a TUN interface (root)");
                let link_shown = shown(&network, "ringlb-live").expect("the interface exists");
                assert!(link_shown.contains(",UP") || link_shown.contains("<UP"), "up: {link_shown}");
                let second = LivenessLink::open("ringlb-live").await.expect_err("held by the first");
                assert!(second.to_string().contains("cannot create the TUN interface"), "{second}");
                drop(link);
                assert_eq!(shown(&network, "ringlb-live"), None, "closing the descriptor deletes it");
                let bad = LivenessLink::open("much-too-long-a-name").await.expect_err("16 bytes and more");
                assert!(bad.to_string().contains("is no interface name"), "{bad}");
            })
        });
    }
}
