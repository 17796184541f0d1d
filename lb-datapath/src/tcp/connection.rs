//! Per-connection state and the worker's connection slab.
//!
//! A [`Conn`] lives in a pinned slot of the [`ConnTable`] (see [`crate::slots`]) that is never moved
//! or freed while the worker runs, so the addresses and buffers the kernel reads or writes stay put.
//! A slot is released only when no operation of the connection is in flight (`in_flight == 0`); its
//! generation then advances so late completions for the old connection are ignored. Releasing returns every buffer and pipe to the pools and closes both sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::connect::Tried;
use crate::ring::ConnectTarget;
use lb_core::{BackendId, BackendLoad, EntryPolicy, ServiceEntry, VipKey};
use socket2::Socket;

use crate::dir::Dir;
use crate::pool::{Held, Pipe};
use crate::slots::{Pinned, Slots};
use crate::traffic::Counted;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A backend connect (with its link timeout) is in flight.
    Connecting,
    /// Bytes flow; each direction has at most one operation in flight.
    Relaying,
    /// Being torn down: outstanding operations were cancelled; released when the last completes.
    Closing,
}

/// The single operation a direction has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    None,
    Recv,
    Send,
    PollIn,
    PollOut,
}

/// State of one relay direction (which one: a [`Dir`]): reads from one socket, writes to the other.
pub(crate) struct Direction {
    pub pending: Pending,
    /// Copy relay: the buffer `[start..end]` of which is received but not yet sent; none while
    /// nothing is (see `crate::pool`).
    pub held: Held,
    pub start: usize,
    pub end: usize,
    /// Copy relay: the last receive left the socket drained (it did not fill the buffer), so the
    /// next one waits for readability before trying (`IORING_RECVSEND_POLL_FIRST`) instead of
    /// paying for a receive that would only say "try again".
    pub drained: bool,
    /// Copy relay: receives in a row that filled the whole buffer (see `relay::BULK_READS`).
    pub full_reads: u8,
    /// This direction splices (bytes wait in `pipe.buffered`) instead of copying.
    pub spliced: bool,
    /// Splice relay: bytes wait in `pipe.buffered`.
    pub pipe: Option<Pipe>,
    /// The source sent EOF; once the pending bytes are written the destination gets `SHUT_WR`.
    pub eof: bool,
    /// EOF was propagated; nothing more flows this way.
    pub done: bool,
}

impl Direction {
    pub(crate) fn new() -> Self {
        Direction {
            pending: Pending::None,
            held: Held::None,
            start: 0,
            end: 0,
            drained: false,
            full_reads: 0,
            spliced: false,
            pipe: None,
            eof: false,
            done: false,
        }
    }
}

/// One proxied client connection.
pub(crate) struct Conn {
    pub key: VipKey,
    pub client: Socket,
    pub client_addr: SocketAddr,
    pub backend: Option<Socket>,
    /// The entry current at accept time; kept while connecting so retries pick from the same set.
    pub entry: Option<Arc<ServiceEntry>>,
    pub backend_id: Option<BackendId>,
    /// The source port the worker bound the backend socket to; `None`: the kernel's choice.
    pub source_port: Option<u16>,
    /// Connects to the current backend whose chosen source port was found taken (see
    /// `crate::source_ports`).
    pub source_port_collisions: u8,
    /// The load counter of the backend this connection is counted against, from its connect
    /// submission until the connect fails or the connection is released (closed exactly once).
    pub counted: Option<Counted>,
    pub tried: Tried,
    /// This connection's count on its VIP key's open connections (`max-connections`), from the
    /// accept to the release; `None` when the entry sets no limit.
    pub vip_load: Option<BackendLoad>,
    /// Read by the kernel when the connect is submitted.
    pub connect_target: ConnectTarget,
    pub policy: EntryPolicy,
    pub phase: Phase,
    pub connect_pending: bool,
    /// Operations of this connection whose completion has not been reaped yet.
    pub in_flight: u32,
    pub client_to_backend: Direction,
    pub backend_to_client: Direction,
    pub last_activity: Instant,
    /// Set when the VIP or backend left the snapshot: the connection is closed at this instant.
    pub drain_deadline: Option<Instant>,
    /// Close with `SO_LINGER {on, 0}` (a reset) rather than a FIN.
    pub reset: bool,
}

impl Conn {
    pub fn new(
        key: VipKey,
        client: Socket,
        client_addr: SocketAddr,
        entry: Arc<ServiceEntry>,
        now: Instant,
    ) -> Conn {
        let policy = entry.policy;
        Conn {
            key,
            client,
            client_addr,
            backend: None,
            entry: Some(entry),
            backend_id: None,
            source_port: None,
            source_port_collisions: 0,
            counted: None,
            tried: Tried::default(),
            vip_load: None,
            connect_target: ConnectTarget::unset(),
            policy,
            phase: Phase::Connecting,
            connect_pending: false,
            in_flight: 0,
            client_to_backend: Direction::new(),
            // Most protocols have the client speak first: the backend has nothing to read yet.
            backend_to_client: Direction { drained: true, ..Direction::new() },
            last_activity: now,
            drain_deadline: None,
            reset: false,
        }
    }

    pub fn direction(&mut self, dir: Dir) -> &mut Direction {
        match dir {
            Dir::ToBackend => &mut self.client_to_backend,
            Dir::ToClient => &mut self.backend_to_client,
        }
    }
}

/// The worker's connections; slot index + generation name a connection in `user_data`. Pinned: the
/// kernel reads connect addresses and timespecs inside a connection, so it must not move when the
/// table grows.
pub(crate) type ConnTable = Slots<Conn, (), Pinned<Conn>>;
