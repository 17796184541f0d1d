//! Hot upgrade: a new ringlb process takes the VIP sockets of the running one over a unix socket
//! (`--upgrade-socket`), so no client is refused while the old process drains.
//!
//! The exchange, on one stream connection (the new process connects, the old one listens):
//! 1. new → old: [`HELLO`];
//! 2. old → new: every open VIP socket (TCP and SCTP listeners, UDP VIP sockets), as `SCM_RIGHTS`
//!    batches of at most [`BATCH`] descriptors, each on one [`FDS`] byte, then one [`END`] byte.
//!    From the first batch on the old process never `shutdown(2)`s a VIP socket (that would end
//!    listening for both);
//! 3. the new process starts its workers on those sockets (binding only what it did not get),
//!    builds its table, and once every worker serves it: new → old: [`READY`];
//! 4. old: stops accepting and receiving (its descriptors close; the sockets live on in the new
//!    process), closes its admin and node health listeners, removes the socket path, and answers
//!    [`BYE`]; then drains its established connections and UDP flows as on SIGTERM and exits;
//! 5. new: binds its admin and node health listeners (the ports are free now), closes the
//!    inherited sockets no worker took, and listens on the upgrade socket itself.
//!
//! Invariants: until [`READY`] the old process serves as before (a new process that dies or
//! stalls — [`READY_TIMEOUT`] — costs nothing: the old one takes its sockets back); a socket is
//! never closed by both or by neither; nothing here runs on a datapath worker.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use lb_datapath::Engine;

/// What the new process says first.
pub const HELLO: &[u8] = b"ringlb-upgrade 1\n";
/// Marks a batch of descriptors.
const FDS: u8 = b'F';
/// After the last batch.
const END: u8 = b'E';
/// The new process serves.
const READY: u8 = b'R';
/// The old process let go.
const BYE: u8 = b'B';
/// Descriptors per message (the kernel takes at most 253, `SCM_MAX_FD`).
const BATCH: usize = 200;
/// How long the old process waits for the new one to serve.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long each step of the exchange may take otherwise.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The new process's side, after it got the sockets: tells the old one when it serves.
pub struct Takeover {
    stream: UnixStream,
    path: PathBuf,
}

/// Connects to a running ringlb's upgrade socket at `path` and takes its VIP sockets; `None` when
/// nothing listens there (a first start, or a stale path, which is removed).
pub fn take_over(path: &Path) -> anyhow::Result<Option<(Takeover, Vec<OwnedFd>)>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error) if matches!(error.kind(), io::ErrorKind::NotFound) => return Ok(None),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            // A socket file nobody listens on: a process that died without cleaning up.
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        Err(error) => return Err(error).with_context(|| format!("connecting to {}", path.display())),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.write_all(HELLO).context("greeting the running ringlb")?;
    let mut fds = Vec::new();
    loop {
        let (byte, received) = receive_fds(&stream).context("receiving the VIP sockets")?;
        fds.extend(received);
        match byte {
            FDS => continue,
            END => break,
            other => anyhow::bail!("the running ringlb sent {other:#x} where sockets were expected"),
        }
    }
    Ok(Some((Takeover { stream, path: path.to_owned() }, fds)))
}

impl Takeover {
    /// Tells the old process this one serves, and waits until it let go of its listeners.
    pub fn finish(mut self) -> anyhow::Result<PathBuf> {
        self.stream.write_all(&[READY]).context("telling the old ringlb this one serves")?;
        self.stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        let mut answer = [0u8; 1];
        self.stream.read_exact(&mut answer).context("waiting for the old ringlb to let go")?;
        anyhow::ensure!(answer[0] == BYE, "the old ringlb answered {:#x}", answer[0]);
        Ok(self.path)
    }
}

/// The old process's side: listens on `path` for a new process.
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
}

impl Offer {
    pub fn bind(path: &Path) -> anyhow::Result<Offer> {
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the upgrade socket {}", path.display()))?;
        Ok(Offer { listener, path: path.to_owned() })
    }

    /// Waits for a new process and hands it `engine`'s VIP sockets; returns once it serves
    /// (the old process must then let go, see [`Handed::bye`]). A new process that fails midway
    /// is logged and the next one awaited; the sockets stay this process's alone meanwhile.
    pub fn hand_over(&self, engine: &Engine) -> Handed {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "upgrade socket: accept failed");
                    std::thread::sleep(Duration::from_millis(200)); // an accept error repeats at once
                    continue;
                }
            };
            match offer(stream, engine) {
                Ok(stream) => return Handed { stream, path: self.path.clone() },
                Err(error) => {
                    engine.take_sockets_back();
                    tracing::warn!(error = format!("{error:#}"), "an upgrade did not complete; serving on");
                }
            }
        }
    }
}

/// A new process serves on the sockets; the old one says goodbye once it let go.
pub struct Handed {
    stream: UnixStream,
    path: PathBuf,
}

impl Handed {
    /// Removes the socket path (the new process binds it next) and tells the new process the
    /// old one's own listeners are closed.
    pub fn bye(mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Err(error) = self.stream.write_all(&[BYE]) {
            tracing::warn!(%error, "upgrade: the new ringlb did not hear goodbye");
        }
    }
}

fn offer(mut stream: UnixStream, engine: &Engine) -> anyhow::Result<UnixStream> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let mut hello = vec![0u8; HELLO.len()];
    stream.read_exact(&mut hello).context("reading the new process's greeting")?;
    anyhow::ensure!(hello == HELLO, "not a ringlb upgrade: {:?}", String::from_utf8_lossy(&hello));
    engine.share_sockets();
    let sent = engine.sockets().with_open(|fds| -> io::Result<usize> {
        for batch in fds.chunks(BATCH) {
            send_fds(&stream, FDS, batch)?;
        }
        Ok(fds.len())
    })?;
    send_fds(&stream, END, &[])?;
    tracing::info!(sockets = sent, "upgrade: VIP sockets sent; waiting for the new ringlb to serve");
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut ready = [0u8; 1];
    stream.read_exact(&mut ready).context("waiting for the new process to serve")?;
    anyhow::ensure!(ready[0] == READY, "the new process answered {:#x}", ready[0]);
    Ok(stream)
}

/// Sends `byte` with `fds` attached.
fn send_fds(stream: &UnixStream, byte: u8, fds: &[RawFd]) -> io::Result<()> {
    let mut data = [byte];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 1 };
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u8; if fds.is_empty() { 0 } else { space }];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: `control` holds CMSG_SPACE(payload) bytes, room for one header and the fds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
        }
    }
    // SAFETY: the header points at live buffers; MSG_NOSIGNAL turns a closed peer into EPIPE.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Receives one byte and the descriptors attached to it.
fn receive_fds(stream: &UnixStream) -> io::Result<(u8, Vec<OwnedFd>)> {
    let mut data = [0u8; 1];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((BATCH * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the recvmsg call.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space;
    // SAFETY: as above; MSG_CMSG_CLOEXEC keeps the received fds out of any child process.
    let received = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    if received == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG macros walk it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let raw: Vec<RawFd> = (0..count).map(|i| data.add(i).read_unaligned()).collect();
                // The kernel installed them for this process; nothing else owns them.
                fds.extend(lb_datapath::owned_fds(&raw));
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were cut off (MSG_CTRUNC)"));
    }
    Ok((data[0], fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_cross_a_unix_socket_in_batches_and_stay_the_same_sockets() {
        let (a, b) = UnixStream::pair().expect("pair");
        let listeners: Vec<_> =
            (0..BATCH + 3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("listen")).collect();
        let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        for batch in fds.chunks(BATCH) {
            send_fds(&a, FDS, batch).expect("send");
        }
        send_fds(&a, END, &[]).expect("end");
        let mut received = Vec::new();
        loop {
            let (byte, fds) = receive_fds(&b).expect("receive");
            received.extend(fds);
            if byte == END {
                break;
            }
        }
        assert_eq!(received.len(), listeners.len());
        for (listener, fd) in listeners.iter().zip(&received) {
            let socket = socket2::SockRef::from(fd);
            assert_eq!(
                socket.local_addr().expect("addr").as_socket(),
                Some(listener.local_addr().expect("addr"))
            );
        }
    }
}
