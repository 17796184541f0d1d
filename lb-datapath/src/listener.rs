//! Listening sockets: where a worker listens for the TCP and UDP keys of a snapshot ([`ListenPlan`],
//! one per protocol; UDP's is used by [`crate::udp`]), setup of its `SO_REUSEPORT` TCP sockets, and
//! the worker's table of them (a [`crate::slots::KeyedSlots`]).
//!
//! Every worker binds its own sockets, so the kernel spreads new connections over workers. A VIP
//! gets a socket of its own per worker while they fit the worker's descriptor budget. When they do
//! not (`ListenMode::Auto`; always with `ListenMode::Wildcard`), VIPs that share a port and address
//! family ([`WILDCARD_MIN_VIPS`] or more; the largest groups first) share one socket per worker on
//! the wildcard address (`0.0.0.0:port`, `[::]:port`): the worker finds the VIP of each connection
//! from its local address and refuses (resets) one to an address that is not a VIP of that port.
//! So 10,000 Services on port 443 cost each worker one descriptor, not 10,000. Exact sockets stay
//! the default because a wildcard takes the whole port of the host: it refuses what other
//! addresses of the host would get on it, and another process's wildcard on the same port (same
//! user, `SO_REUSEPORT`) would share its connections. Where the wildcard bind collides with another
//! socket on the host (`EADDRINUSE`: something else listens on that port on some address), the
//! group keeps one exact socket per VIP. An exact socket outranks the wildcard in the kernel's
//! lookup, so a group moving between the two (opened first, the other closed after) never stops
//! accepting.
//!
//! A socket is bound with `IP_FREEBIND`/`IPV6_FREEBIND` so VIPs that are not (yet) local addresses
//! bind in appliance mode, and with `TCP_NODELAY`, which accepted sockets inherit. Never panics on
//! a bind failure: the caller logs it and retries at the next housekeeping tick.
//! Invariant: a listener slot is freed only once its accept operation has completed for the last
//! time (no `IORING_CQE_F_MORE`), so the kernel never accepts on a closed fd number.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use io_uring::squeue::Entry;
use lb_core::VipKey;
use socket2::{Domain, Protocol as SockProtocol, Socket, Type};

use crate::handover::VipSocket;
use crate::ring::Ring;

/// Pending-connection queue length asked for (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Prepares a socket to bind a VIP `addr` of any protocol: the port is shared with the other
/// workers' sockets (`SO_REUSEPORT`), a VIP that is not a local address binds anyway (`FREEBIND`),
/// and an IPv6 VIP never takes the IPv4 space. TCP, UDP and SCTP VIP sockets all start here.
pub(crate) fn share_vip_port(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_freebind_v4(true),
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_freebind_v6(true)
        }
    }
}

/// Opens a non-blocking listening socket for `addr` that shares the port with the other workers.
pub(crate) fn bind_listener(addr: SocketAddr) -> io::Result<Socket> {
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(SockProtocol::TCP))?;
    share_vip_port(&socket, addr)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// Where a worker's TCP and UDP VIPs listen (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListenMode {
    /// A socket per VIP:port while they fit the descriptor budget; beyond, VIPs sharing a port
    /// share a wildcard socket, the largest groups first.
    #[default]
    Auto,
    /// Always a socket per VIP:port.
    Exact,
    /// VIPs sharing a port always share a wildcard socket.
    Wildcard,
}

/// VIPs of one port and address family from which on a worker may listen once, on the wildcard
/// address.
pub(crate) const WILDCARD_MIN_VIPS: usize = 2;

/// The wildcard listen key of `key`'s address family and port.
pub(crate) fn wildcard_of(key: &VipKey) -> VipKey {
    let any = match key.addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    VipKey::new(any, key.port, key.protocol)
}

/// Whether a listen key is a wildcard (no VIP is the unspecified address: the builder refuses it).
pub(crate) fn is_wildcard(key: &VipKey) -> bool {
    key.addr.is_unspecified()
}

/// The fewest listening sockets `keys` of one protocol take per worker under `mode`: one per
/// group that may share a wildcard, one per other key. What one protocol counts for another's
/// sockets when it plans its own (TCP plans first; UDP then sees what TCP holds).
pub(crate) fn fewest_sockets<'a>(keys: impl Iterator<Item = &'a VipKey>, mode: ListenMode) -> usize {
    let mut groups: HashMap<VipKey, usize> = HashMap::new();
    for key in keys {
        *groups.entry(wildcard_of(key)).or_default() += 1;
    }
    let shared = |len: usize| mode != ListenMode::Exact && len >= WILDCARD_MIN_VIPS;
    groups.into_values().map(|len| if shared(len) { 1 } else { len }).sum()
}

/// Where a worker listens for the TCP or UDP keys of a snapshot. See the module doc.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ListenPlan {
    /// Keys with a socket of their own.
    pub exact: HashSet<VipKey>,
    /// Wildcard listen keys, each with the VIP keys it serves.
    pub wildcards: BTreeMap<VipKey, Vec<VipKey>>,
}

impl ListenPlan {
    /// The plan for `keys` under `mode`, with room for `room` listening sockets: groups of at
    /// least [`WILDCARD_MIN_VIPS`] keys of one family and port may share a wildcard (all of them
    /// with `Wildcard`; with `Auto` the largest first, only until the sockets fit `room`), except
    /// those whose wildcard is in `exact_only` (its bind collided before; forgotten once the group
    /// is gone).
    pub fn new<'a>(
        keys: impl Iterator<Item = &'a VipKey>,
        mode: ListenMode,
        room: usize,
        exact_only: &mut HashSet<VipKey>,
    ) -> Self {
        let mut groups: HashMap<VipKey, Vec<VipKey>> = HashMap::new();
        for key in keys {
            groups.entry(wildcard_of(key)).or_default().push(*key);
        }
        exact_only.retain(|wildcard| groups.contains_key(wildcard));
        let mut sockets: usize = groups.values().map(Vec::len).sum();
        let mut eligible: Vec<(VipKey, Vec<VipKey>)> = Vec::new();
        let mut plan = ListenPlan::default();
        for (wildcard, keys) in groups {
            if mode != ListenMode::Exact && keys.len() >= WILDCARD_MIN_VIPS && !exact_only.contains(&wildcard)
            {
                eligible.push((wildcard, keys));
            } else {
                plan.exact.extend(keys);
            }
        }
        // Largest groups first (ties by key, so every worker plans alike): each saves the most.
        eligible.sort_unstable_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        for (wildcard, keys) in eligible {
            if mode == ListenMode::Wildcard || sockets > room {
                sockets -= keys.len() - 1;
                plan.wildcards.insert(wildcard, keys);
            } else {
                plan.exact.extend(keys);
            }
        }
        plan
    }

    /// Whether a socket on `listen` belongs to the plan.
    pub fn wants(&self, listen: &VipKey) -> bool {
        self.exact.contains(listen) || self.wildcards.contains_key(listen)
    }

    /// Listening sockets the plan takes per worker.
    pub fn sockets(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }

    /// Moves the group of `wildcard` to exact sockets (its bind collided); returns its keys.
    pub fn fall_back(&mut self, wildcard: &VipKey) -> Vec<VipKey> {
        let keys = self.wildcards.remove(wildcard).unwrap_or_default();
        self.exact.extend(keys.iter().copied());
        keys
    }
}

/// One worker's listening socket for one key.
pub(crate) struct Listener {
    pub key: VipKey,
    pub socket: VipSocket,
    /// An accept operation is in the kernel for this listener.
    pub armed: bool,
    /// The armed accept is multishot (keeps producing completions).
    pub multishot: bool,
    /// The key left the snapshot: no new accept is armed; the slot is freed once `armed` is false.
    pub closing: bool,
    /// The last accept failed with a resource error (e.g. `EMFILE`); re-arm at the next tick.
    pub rearm_at_tick: bool,
}

impl Listener {
    /// A listener for `key` on a freshly bound `socket`, not armed yet.
    pub fn new(key: VipKey, socket: VipSocket) -> Listener {
        Listener { key, socket, armed: false, multishot: false, closing: false, rearm_at_tick: false }
    }

    /// Queues `accept` and records it as armed; if the ring refuses it, the listener is left to be
    /// re-armed at the next housekeeping tick. Shared by the TCP and SCTP listeners.
    ///
    /// # Safety
    /// `accept` must be an accept on this listener's socket that passes no user memory, and the
    /// socket must stay open until the accept's final completion has been reaped.
    pub unsafe fn arm(&mut self, ring: &mut Ring, accept: &Entry, multishot: bool, worker: usize) {
        self.armed = true;
        self.multishot = multishot;
        self.rearm_at_tick = false;
        // SAFETY: forwarded to the caller (see this function's contract).
        if let Err(err) = unsafe { ring.push(accept) } {
            self.armed = false;
            self.rearm_at_tick = true;
            tracing::warn!(worker, key = %self.key, protocol = %self.key.protocol, error = %err, "cannot arm accept");
        }
    }
}

/// A worker's listening sockets (TCP or SCTP) by slot and key.
pub(crate) type ListenerTable = crate::slots::KeyedSlots<Listener>;

impl ListenerTable {
    /// Marks the listener in `index` closing (no accept is armed again, and its key is free to be
    /// bound anew); the slot is freed once its accept has completed for the last time.
    pub fn close(&mut self, index: u32) -> Option<&mut Listener> {
        self.retire(index);
        let generation = self.generation(index);
        let listener = self.get_mut(index, generation)?;
        listener.closing = true;
        Some(listener)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::Protocol;

    fn tcp(addr: &str, port: u16) -> VipKey {
        VipKey::new(addr.parse().expect("literal"), port, Protocol::Tcp)
    }

    #[test]
    fn vips_sharing_a_port_and_family_share_a_wildcard_and_a_lone_one_binds_exactly() {
        let keys = [
            tcp("10.0.0.1", 80),
            tcp("10.0.0.2", 80),
            tcp("10.0.0.3", 443),
            tcp("fd00::1", 80),
            tcp("fd00::2", 80),
        ];
        let plan = ListenPlan::new(keys.iter(), ListenMode::Wildcard, usize::MAX, &mut HashSet::new());
        assert_eq!(plan.exact, HashSet::from([tcp("10.0.0.3", 443)]));
        let wildcards: Vec<_> = plan.wildcards.keys().copied().collect();
        assert_eq!(wildcards, vec![tcp("0.0.0.0", 80), tcp("::", 80)]);
        assert_eq!(plan.sockets(), 3);
        assert!(plan.wants(&tcp("0.0.0.0", 80)) && plan.wants(&tcp("10.0.0.3", 443)));
        assert!(!plan.wants(&tcp("10.0.0.1", 80)), "served by the wildcard");

        let exact = ListenPlan::new(keys.iter(), ListenMode::Exact, 0, &mut HashSet::new());
        assert_eq!((exact.exact.len(), exact.wildcards.len()), (5, 0), "wildcards off");
        let fits = ListenPlan::new(keys.iter(), ListenMode::Auto, 5, &mut HashSet::new());
        assert_eq!((fits.exact.len(), fits.wildcards.len()), (5, 0), "auto: exact while they fit");
        let tight = ListenPlan::new(keys.iter(), ListenMode::Auto, 4, &mut HashSet::new());
        assert_eq!((tight.exact.len(), tight.wildcards.len()), (3, 1), "auto: one wildcard is enough");
        let tighter = ListenPlan::new(keys.iter(), ListenMode::Auto, 3, &mut HashSet::new());
        assert_eq!(tighter.sockets(), 3);
        let mut collided = HashSet::from([tcp("0.0.0.0", 80), tcp("0.0.0.0", 8080)]);
        let mut plan = ListenPlan::new(keys.iter(), ListenMode::Wildcard, usize::MAX, &mut collided);
        assert_eq!(collided, HashSet::from([tcp("0.0.0.0", 80)]), "a group that is gone is forgotten");
        assert!(plan.exact.contains(&tcp("10.0.0.1", 80)) && plan.wildcards.contains_key(&tcp("::", 80)));
        let mut moved = plan.fall_back(&tcp("::", 80));
        moved.sort();
        assert_eq!(moved, vec![tcp("fd00::1", 80), tcp("fd00::2", 80)]);
        assert_eq!((plan.exact.len(), plan.wildcards.len()), (5, 0));
        assert_eq!(fewest_sockets(keys.iter(), ListenMode::Auto), 3);
        assert_eq!(fewest_sockets(keys.iter(), ListenMode::Exact), 5);
    }

    #[test]
    fn two_listeners_share_a_port_and_a_non_local_vip_binds() {
        let first = bind_listener("127.0.0.1:0".parse().expect("literal")).expect("bind");
        let addr = first.local_addr().expect("bound").as_socket().expect("inet");
        let second = bind_listener(addr);
        assert!(second.is_ok(), "SO_REUSEPORT must let a second worker bind {addr}: {second:?}");
        // 192.0.2.0/24 (TEST-NET-1) is never local; IP_FREEBIND makes the bind succeed anyway.
        let foreign = bind_listener("192.0.2.77:0".parse().expect("literal"));
        assert!(foreign.is_ok(), "IP_FREEBIND bind failed: {foreign:?}");
    }
}
