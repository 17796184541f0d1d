//! Loopback test backends: real TCP servers on 127.0.0.1 ephemeral ports that tests send bytes
//! through (echo, stream/sink with verification, named, peer-reporting, reset), UDP servers (echo, named echo) that
//! count what they receive, and a refusing address.
//!
//! Std only (no lb-core, no async). Every server stops when its handle drops: the accept loop is
//! woken by a connect to itself, and connection threads end when their peer closes. Every socket a
//! server creates has read/write timeouts so a broken test fails instead of hanging.

pub mod sctp;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Socket timeout of server-side connections: generous, but bounded.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A running loopback server; stops on drop.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds 127.0.0.1:0 and runs `handle` on a thread per accepted connection.
    pub fn spawn<F>(handle: F) -> io::Result<Server>
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Server::spawn_on("127.0.0.1:0".parse().expect("literal address"), handle)
    }

    /// Binds `addr` and runs `handle` on a thread per accepted connection.
    pub fn spawn_on<F>(addr: SocketAddr, handle: F) -> io::Result<Server>
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let handle = Arc::new(handle);
        let thread = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            std::thread::Builder::new().name(format!("backend-{}", addr.port())).spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::AcqRel);
                    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    let handle = handle.clone();
                    let _ =
                        std::thread::Builder::new().name("backend-conn".into()).spawn(move || handle(stream));
                }
            })?
        };
        Ok(Server { addr, stop, accepted, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept so the thread sees the stop flag. A server whose address this
        // thread cannot reach (dropped outside the network namespace it was bound in, as when a
        // test panics half-way through its set-up) is left to the process's exit: joining it
        // would wait forever.
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(thread) = self.thread.take()
            && woken
        {
            let _ = thread.join();
        }
    }
}

/// Echoes every byte back; answers EOF with EOF.
pub fn echo_server() -> io::Result<Server> {
    Server::spawn(echo)
}

fn echo(mut stream: TcpStream) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Writes `name` and a newline on connect, then echoes.
pub fn named_server(name: &str) -> io::Result<Server> {
    named_server_on("127.0.0.1:0".parse().expect("literal address"), name)
}

/// A [`named_server`] on `addr` (e.g. several backends on 127.0.0.x sharing one port, as pods behind
/// one EndpointSlice port do).
pub fn named_server_on(addr: SocketAddr, name: &str) -> io::Result<Server> {
    let greeting = format!("{name}\n").into_bytes();
    Server::spawn_on(addr, move |mut stream| {
        if stream.write_all(&greeting).is_ok() {
            echo(stream);
        }
    })
}

/// Writes the address it sees the connection come from (`ip:port`) and a newline on connect, then
/// echoes: what tells a test which source address a proxy in between used.
pub fn peer_server_on(addr: SocketAddr) -> io::Result<Server> {
    Server::spawn_on(addr, |mut stream| {
        let Ok(peer) = stream.peer_addr() else { return };
        if stream.write_all(format!("{peer}\n").as_bytes()).is_ok() {
            echo(stream);
        }
    })
}

/// Reads the client's first byte, waits until more has arrived, then closes with those bytes unread,
/// which makes Linux answer with a reset (std has no `SO_LINGER`). Clients must send at least 2 bytes.
pub fn reset_server() -> io::Result<Server> {
    Server::spawn(|mut stream| {
        let mut byte = [0u8; 1];
        // Wait for the client's first bytes and leave some of them unread: closing a socket with
        // unread received data makes Linux answer with RST instead of FIN.
        if stream.read(&mut byte).is_ok() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut probe = [0u8; 1];
            let _ = stream.set_nonblocking(true);
            while std::time::Instant::now() < deadline {
                match stream.peek(&mut probe) {
                    Ok(n) if n > 0 => break,
                    _ => std::thread::yield_now(),
                }
            }
        }
        drop(stream);
    })
}

/// What a [`stream_server`] connection saw from its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamReport {
    /// Bytes received after the header.
    pub received: u64,
    /// Every received byte matched the client's pattern.
    pub intact: bool,
}

/// Header a [`stream_server`] client sends first: `(upload seed, download seed, download length)`.
pub fn stream_header(upload_seed: u64, download_seed: u64, download_len: u64) -> [u8; 24] {
    let mut header = [0u8; 24];
    header[..8].copy_from_slice(&upload_seed.to_le_bytes());
    header[8..16].copy_from_slice(&download_seed.to_le_bytes());
    header[16..].copy_from_slice(&download_len.to_le_bytes());
    header
}

/// Reads a [`stream_header`], then concurrently sends `download length` pattern bytes of the
/// download seed (then EOF) and verifies the incoming pattern of the upload seed until EOF; reports
/// each connection on the returned channel.
pub fn stream_server() -> io::Result<(Server, mpsc::Receiver<StreamReport>)> {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = Server::spawn(move |mut stream| {
        let mut header = [0u8; 24];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let field = |i: usize| u64::from_le_bytes(header[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (upload_seed, download_seed, download_len) = (field(0), field(1), field(2));
        let Ok(mut writer) = stream.try_clone() else { return };
        let sender = std::thread::spawn(move || {
            let _ = write_pattern(&mut writer, download_seed, download_len);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let report = match read_pattern(&mut stream, upload_seed) {
            Ok((received, intact)) => StreamReport { received, intact },
            Err(_) => StreamReport { received: 0, intact: false },
        };
        let _ = sender.join();
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(report);
        }
    })?;
    Ok((server, rx))
}

/// Fills `buffer` with the pattern of `seed` starting at stream offset `offset` (a multiple of 8
/// keeps it fast; any offset works).
pub fn fill_pattern(seed: u64, offset: u64, buffer: &mut [u8]) {
    let head = (((8 - offset % 8) % 8) as usize).min(buffer.len());
    for (i, byte) in buffer[..head].iter_mut().enumerate() {
        let position = offset + i as u64;
        *byte = pattern_word(seed, position / 8).to_le_bytes()[(position % 8) as usize];
    }
    let mut word_index = (offset + head as u64) / 8;
    let mut chunks = buffer[head..].chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&pattern_word(seed, word_index).to_le_bytes());
        word_index += 1;
    }
    let tail = chunks.into_remainder();
    let tail_len = tail.len();
    if tail_len > 0 {
        tail.copy_from_slice(&pattern_word(seed, word_index).to_le_bytes()[..tail_len]);
    }
}

fn pattern_word(seed: u64, index: u64) -> u64 {
    // splitmix64 of (seed, index): cheap, and any misplaced or altered byte changes the stream.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes `len` pattern bytes of `seed`.
pub fn write_pattern(stream: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(buffer.len() as u64) as usize;
        fill_pattern(seed, sent, &mut buffer[..n]);
        stream.write_all(&buffer[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads until EOF and checks every byte against the pattern of `seed`; returns (bytes, intact).
pub fn read_pattern(stream: &mut impl Read, seed: u64) -> io::Result<(u64, bool)> {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut expected = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    let mut intact = true;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Ok((received, intact));
        }
        if intact {
            fill_pattern(seed, received, &mut expected[..n]);
            intact = buffer[..n] == expected[..n];
        }
        received += n as u64;
    }
}

/// Largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// A running loopback UDP server that answers each datagram from the address it came from, and
/// counts datagrams and distinct peers; stops (and closes its port, so later datagrams draw ICMP
/// port unreachable) on drop.
pub struct UdpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    peers: Arc<std::sync::Mutex<std::collections::HashSet<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    /// Binds `addr` and answers every datagram with `reply(payload)` (`None`: no answer).
    pub fn spawn_on<F>(addr: SocketAddr, reply: F) -> io::Result<UdpServer>
    where
        F: Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    {
        let socket = UdpSocket::bind(addr)?;
        let addr = socket.local_addr()?;
        // Bounds how long a stop can go unnoticed if the wake-up datagram of `drop` is lost.
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let thread = {
            let (stop, received, peers) = (stop.clone(), received.clone(), peers.clone());
            std::thread::Builder::new().name(format!("udp-backend-{}", addr.port())).spawn(move || {
                let mut buffer = vec![0u8; 65_536];
                while !stop.load(Ordering::Acquire) {
                    let Ok((n, peer)) = socket.recv_from(&mut buffer) else { continue };
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    received.fetch_add(1, Ordering::AcqRel);
                    if let Ok(mut peers) = peers.lock() {
                        peers.insert(peer);
                    }
                    if let Some(answer) = reply(&buffer[..n]) {
                        let _ = socket.send_to(&answer, peer);
                    }
                }
            })?
        };
        Ok(UdpServer { addr, stop, received, peers, thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    /// Distinct source addresses seen so far (with a proxy in between: one per flow).
    pub fn peers(&self) -> usize {
        self.peers.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// The distinct source addresses seen so far.
    pub fn peer_addrs(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.iter().copied().collect()).unwrap_or_default()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(waker) = UdpSocket::bind(SocketAddr::new(self.addr.ip(), 0)) {
            let _ = waker.send_to(b"stop", self.addr);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP server on 127.0.0.1 that echoes every datagram unchanged (empty ones included).
pub fn udp_echo_server() -> io::Result<UdpServer> {
    UdpServer::spawn_on("127.0.0.1:0".parse().expect("literal address"), |payload| Some(payload.to_vec()))
}

/// A UDP server on 127.0.0.1 that answers `name:` followed by the datagram.
pub fn udp_named_server(name: &str) -> io::Result<UdpServer> {
    let prefix = format!("{name}:").into_bytes();
    UdpServer::spawn_on("127.0.0.1:0".parse().expect("literal address"), move |payload| {
        let mut answer = prefix.clone();
        answer.extend_from_slice(payload);
        Some(answer)
    })
}

/// A UDP server on 127.0.0.1 that never answers (a flow to it stays unreplied).
pub fn udp_silent_server() -> io::Result<UdpServer> {
    UdpServer::spawn_on("127.0.0.1:0".parse().expect("literal address"), |_| None)
}

/// The loopback address [`RefusingAddr`]s live on. Nothing may ever listen on it (tests use other
/// 127/8 addresses), and it is never a source address of outgoing connects (those use 127.0.0.1), so
/// a connect to it is refused and can never turn into a TCP self-connect.
pub const REFUSING_IP: [u8; 4] = [127, 0, 0, 2];

/// An address where nothing listens, so connects are refused (RST).
///
/// The port was free when taken (bound, then released); only refusing addresses use [`REFUSING_IP`],
/// so nothing will start listening there.
pub struct RefusingAddr {
    addr: SocketAddr,
}

impl RefusingAddr {
    pub fn new() -> io::Result<RefusingAddr> {
        let addr = TcpListener::bind(SocketAddr::from((REFUSING_IP, 0)))?.local_addr()?;
        Ok(RefusingAddr { addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_offset_consistent() {
        let mut whole = vec![0u8; 1000];
        fill_pattern(7, 0, &mut whole);
        for offset in [0usize, 1, 5, 8, 13, 999] {
            let mut part = vec![0u8; 1000 - offset];
            fill_pattern(7, offset as u64, &mut part);
            assert_eq!(part[..], whole[offset..], "offset {offset}");
        }
        let mut other = vec![0u8; 1000];
        fill_pattern(8, 0, &mut other);
        assert_ne!(other, whole);
    }

    #[test]
    fn refusing_addr_refuses() {
        let refusing = RefusingAddr::new().expect("loopback");
        let err = TcpStream::connect_timeout(&refusing.addr(), Duration::from_secs(2))
            .expect_err("nothing listens");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn echo_server_echoes() {
        let server = echo_server().expect("bind");
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        stream.write_all(b"hello").expect("write");
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).expect("read");
        assert_eq!(&reply, b"hello");
    }
}
