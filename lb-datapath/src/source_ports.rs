//! The source ports of a worker's backend TCP connects: which ports a worker may use, and (in
//! [`SourcePortMode::Worker`]) the worker choosing each one itself so that the kernel's connect
//! does not search for a free port (`__inet_hash_connect` walking the ephemeral range, checking
//! each candidate's 4-tuples and TIME_WAIT sockets under the bind-hash locks).
//!
//! Each worker gets its own share of the ports (the kernel's `ip_local_port_range`, or the configured
//! range, cut into one slice per worker; the kernel's reserved ports skipped), so workers never pick
//! the same one. In `Worker` mode a backend socket gets `SO_REUSEADDR` and is bound to the wildcard
//! address and the next port of the worker's cursor before its connect; the connect then only
//! checks that its 4-tuple is free, and a TIME_WAIT socket of the same 4-tuple is reused whenever
//! TCP timestamps protect it (the kernel's rule for a connect on a bound socket, whatever
//! `tcp_tw_reuse` says: what lets a proxy that closes first reach non-loopback backends at more
//! than ~470 new connections/s per backend). Invariants:
//! - a port is never chosen equal to the backend's own port (a connect to a local backend from its
//!   own address and port would be a TCP self-connect);
//! - a 4-tuple that turns out taken (`EADDRNOTAVAIL` on the connect) is the worker's collision, not
//!   a shortage: the same backend is tried again on the next port, a bounded number of times, then
//!   with the kernel's choice (narrowed to the worker's share by `IP_LOCAL_PORT_RANGE`, Linux 6.3+,
//!   where the share lies inside the kernel's range); only when that fails too are the ports short
//!   (a local resource, never the backend's failure);
//! - nothing here allocates or reads a file on a connection's path: the range and the reserved
//!   ports are re-read by housekeeping (an operator may change them).
//!
//! Why `Worker` mode wants a range of its own: a port bound with `SO_REUSEADDR` (and its TIME_WAIT
//! sockets, for 60 s) is skipped by every other socket's kernel search, so binding across the
//! kernel's ephemeral range would starve the host's other connects. `Kernel` stays the default:
//! on this kernel (6.18) the search measured no cheaper to avoid (bench/RESULTS.md, issue 11 item 4).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;

use socket2::Socket;

/// How a backend TCP connect gets its source port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourcePortMode {
    /// The kernel searches the whole ephemeral range for a free port at each connect (what a plain
    /// `connect` does).
    #[default]
    Kernel,
    /// The kernel searches, but only within the worker's share (`IP_LOCAL_PORT_RANGE`): workers do
    /// not contend for the same ports.
    KernelPerWorker,
    /// The worker binds each backend socket to the next port of its share; the kernel only checks
    /// the 4-tuple. Falls back to `KernelPerWorker` for a connect whose ports keep colliding.
    Worker,
}

/// Ports tried by `bind` for one backend socket before the kernel is left to choose.
const BIND_TRIES: usize = 4;

/// Connects of one client to one backend whose own port collided (`EADDRNOTAVAIL`) before the
/// kernel chooses instead.
pub(crate) const COLLISION_RETRIES: u8 = 4;

/// Ports the cursor steps over (reserved, or the backend's own) before giving up on one socket.
const SKIP_LIMIT: usize = 64;

/// `IP_LOCAL_PORT_RANGE` (Linux 6.3+), not yet in the `libc` crate.
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

/// A worker's source ports. See the module doc.
pub(crate) struct SourcePorts {
    mode: SourcePortMode,
    /// The configured range, or `None` for the kernel's ephemeral range.
    configured: Option<RangeInclusive<u16>>,
    worker: usize,
    workers: usize,
    /// The kernel's ephemeral range (also what the self-connect check needs).
    ephemeral: RangeInclusive<u16>,
    /// This worker's slice of the range.
    share: RangeInclusive<u16>,
    /// `ip_local_reserved_ports`: never chosen.
    reserved: Vec<RangeInclusive<u16>>,
    /// The next port the cursor offers (always inside `share`).
    next: u16,
}

impl SourcePorts {
    pub fn new(
        mode: SourcePortMode,
        configured: Option<RangeInclusive<u16>>,
        worker: usize,
        workers: usize,
    ) -> SourcePorts {
        let mut ports = SourcePorts {
            mode,
            configured,
            worker,
            workers: workers.max(1),
            ephemeral: 0..=u16::MAX,
            share: 0..=u16::MAX,
            reserved: Vec::new(),
            next: 0,
        };
        ports.refresh();
        ports
    }

    /// Re-reads the kernel's ephemeral and reserved ports (housekeeping, now and then).
    pub fn refresh(&mut self) {
        self.ephemeral = ephemeral_port_range();
        // A configured range is the operator's: reserving it (`ip_local_reserved_ports`) is how the
        // kernel is kept from handing its ports to anyone else, so it is not skipped then.
        self.reserved = if self.configured.is_none() { reserved_ports() } else { Vec::new() };
        let range = self.configured.clone().unwrap_or_else(|| self.ephemeral.clone());
        let share = share_of(&range, self.worker, self.workers);
        if share != self.share {
            self.next = *share.start();
            self.share = share;
        }
    }

    /// The kernel's ephemeral range, as last read.
    pub fn ephemeral(&self) -> &RangeInclusive<u16> {
        &self.ephemeral
    }

    /// Readies a fresh backend socket for its connect to `backend`: in `Worker` mode (and when
    /// `own` allows it) binds it to the next free port of the worker's share and returns that port;
    /// otherwise (or when no port would bind) leaves the choice to the kernel within the worker's
    /// share, except in `Kernel` mode, and returns `None`.
    pub fn prepare(&mut self, socket: &Socket, backend: SocketAddr, own: bool) -> Option<u16> {
        if self.mode == SourcePortMode::Worker
            && own
            && let Some(port) = self.bind(socket, backend)
        {
            return Some(port);
        }
        if self.mode != SourcePortMode::Kernel {
            self.restrict(socket);
        }
        None
    }

    fn bind(&mut self, socket: &Socket, backend: SocketAddr) -> Option<u16> {
        socket.set_reuse_address(true).ok()?;
        let wildcard = match backend {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        for _ in 0..BIND_TRIES {
            let port = self.take(backend.port())?;
            // A failure (a listener on the port, a socket bound without `SO_REUSEADDR`): next one.
            if socket.bind(&SocketAddr::new(wildcard.ip(), port).into()).is_ok() {
                return Some(port);
            }
        }
        None
    }

    /// The cursor's next port that is neither reserved nor `avoid`.
    fn take(&mut self, avoid: u16) -> Option<u16> {
        for _ in 0..SKIP_LIMIT {
            let port = self.next;
            self.next = if port >= *self.share.end() { *self.share.start() } else { port + 1 };
            if port != avoid && !self.reserved.iter().any(|r| r.contains(&port)) {
                return Some(port);
            }
        }
        None
    }

    /// Keeps the kernel's own search inside the worker's share. Refused by kernels before 6.3:
    /// the kernel then searches its whole range, which is still correct.
    fn restrict(&self, socket: &Socket) {
        let value: u32 = u32::from(*self.share.start()) | (u32::from(*self.share.end()) << 16);
        // SAFETY: `value` outlives the call, which only reads `size_of::<u32>()` bytes of it; the
        // descriptor is owned by `socket`.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                IP_LOCAL_PORT_RANGE,
                (&value as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            );
        }
    }
}

/// Worker `worker`'s slice of `range` among `workers`: equal slices, the last one taking the
/// remainder. A range with fewer ports than workers is shared whole (connects still check their
/// 4-tuples; workers may then collide and retry).
fn share_of(range: &RangeInclusive<u16>, worker: usize, workers: usize) -> RangeInclusive<u16> {
    let (start, end) = (u32::from(*range.start()), u32::from(*range.end()));
    if end < start {
        return range.clone();
    }
    let len = end - start + 1;
    let per = len / workers as u32;
    if per == 0 {
        return range.clone();
    }
    let first = start + per * worker as u32;
    let last = if worker + 1 == workers { end } else { first + per - 1 };
    first as u16..=last as u16
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`, which IPv6 shares). Unreadable:
/// every port, so the self-connect check errs on the side of checking.
fn ephemeral_port_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|part| part.parse::<u16>().ok());
            Some(bounds.next()??..=bounds.next()??)
        })
        .unwrap_or(0..=u16::MAX)
}

/// `net.ipv4.ip_local_reserved_ports` (which IPv6 shares); unreadable: none.
fn reserved_ports() -> Vec<RangeInclusive<u16>> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .map(|text| parse_port_list(&text))
        .unwrap_or_default()
}

/// `8000-8080,9000` → `[8000..=8080, 9000..=9000]`; parts that do not parse are skipped.
fn parse_port_list(text: &str) -> Vec<RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            let (low, high) = part.split_once('-').unwrap_or((part, part));
            Some(low.trim().parse().ok()?..=high.trim().parse().ok()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(share: RangeInclusive<u16>, reserved: Vec<RangeInclusive<u16>>) -> SourcePorts {
        SourcePorts {
            mode: SourcePortMode::Worker,
            configured: Some(share.clone()),
            worker: 0,
            workers: 1,
            ephemeral: share.clone(),
            next: *share.start(),
            share,
            reserved,
        }
    }

    #[test]
    fn ephemeral_range_matches_the_kernels() {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("procfs");
        let bounds: Vec<u16> = text.split_whitespace().map(|p| p.parse().expect("port")).collect();
        assert_eq!(ephemeral_port_range(), bounds[0]..=bounds[1]);
    }

    #[test]
    fn worker_shares_are_disjoint_and_cover_the_range() {
        let range = 32768..=60999;
        let shares: Vec<_> = (0..3).map(|w| share_of(&range, w, 3)).collect();
        assert_eq!(shares, vec![32768..=42177, 42178..=51587, 51588..=60999]);
        assert_eq!(share_of(&range, 0, 1), range);
        // Fewer ports than workers: everyone shares the range.
        assert_eq!(share_of(&(60000..=60000), 1, 2), 60000..=60000);
        assert_eq!(share_of(&(65534..=65535), 1, 2), 65535..=65535);
    }

    #[test]
    fn the_cursor_wraps_and_skips_reserved_ports_and_the_backends_own() {
        let mut ports = cursor(100..=105, vec![101..=102]);
        let taken: Vec<_> = (0..5).map(|_| ports.take(104).expect("a port")).collect();
        assert_eq!(taken, vec![100, 103, 105, 100, 103]);
        // Every port reserved: no port, the kernel chooses.
        let mut none = cursor(100..=101, vec![100..=101]);
        assert_eq!(none.take(0), None);
    }

    #[test]
    fn reserved_port_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_port_list("8000-8080,9000\n"), vec![8000..=8080, 9000..=9000]);
        assert_eq!(parse_port_list("\n"), vec![]);
    }

    #[test]
    fn a_port_with_a_listener_is_skipped() {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("listener");
        let held = listener.local_addr().expect("addr").port();
        let mut ports = cursor(held..=held.saturating_add(1), vec![]);
        let socket = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        let backend = SocketAddr::from(([127, 0, 0, 1], 1));
        let port = ports.prepare(&socket, backend, true);
        assert_ne!(port, Some(held));
        if let Some(port) = port {
            assert_eq!(socket.local_addr().expect("local").as_socket().expect("inet").port(), port);
        }
    }
}
