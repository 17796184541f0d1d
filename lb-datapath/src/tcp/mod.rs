//! The TCP connections of a worker, one component: accept → pick → connect (with timeout and
//! bounded retries on other backends; from the client's own address for a transparent entry, see
//! `crate::transparent`) → the entry's PROXY protocol header, if any, as the first bytes to the
//! backend → relay both directions → half-close / reset / idle → release.
//!
//! [`Listeners`] (`listeners`) are the worker's listening sockets for TCP keys, which hand each
//! accepted client on; [`Connections`] owns the connection table, the copy relay's buffers and the splice relay's pipes
//! (nothing else uses them); the worker hands it each accepted client and each completion of a
//! connection's operations, with a [`Ctx`] of what it may use besides (ring, counters, pick state,
//! backend events, warnings, descriptor room). `connection` is one connection's state, `relay`
//! the byte-moving steps of one direction.
//! Never blocks, never logs per connection above debug, never allocates in steady state (slots,
//! buffers and pipes come from the table and pools).
//! Invariants: a client that cannot be served is reset at once (`SO_LINGER {on, 0}`), never left
//! hanging; a connection is released only when `in_flight == 0`, and releasing returns every buffer
//! and pipe and closes both sockets; a reset on one side is propagated as a reset to the other.

pub(crate) mod connection;
mod listeners;
pub(crate) mod relay;

pub(crate) use self::listeners::Listeners;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use lb_core::health::{BackendEvent, BackendOutcome};
use lb_core::{LocalResource, ProxyHeader, Snapshot, VipKey};
use socket2::{Domain, Socket, Type};

use self::connection::{Conn, ConnTable, Pending, Phase};
use self::relay::{Advanced, Next, Path};
use crate::connect::{self, Attempt, Failure, drain_deadline};
use crate::context::Ctx;
use crate::dir::Dir;
use crate::pool::{Pipe, PipePool, RelayBuffers};
use crate::ring::{OpKind, UserData};
use crate::source_ports::{COLLISION_RETRIES, SourcePorts};
use crate::stats::{self, WorkerCounters};
use crate::traffic::{ConnectError, Refusal};
use crate::transparent;
use crate::warnings::{Warning, warn_limited};

/// How often the kernel's ephemeral and reserved ports are read again (an operator may change
/// them).
const PORTS_REFRESH: Duration = Duration::from_secs(10);

/// The TCP connections of one worker. See the module doc.
pub(crate) struct Connections {
    conns: ConnTable,
    /// The copy relay's buffers (a provided-buffer ring, and pool buffers beyond it).
    buffers: RelayBuffers,
    /// The splice relay's pipes.
    pipes: PipePool,
    path: Path,
    /// Upper bound of open client connections (the descriptor budget may allow fewer).
    max_connections: usize,
    /// The backend connects' source ports (and the kernel's ephemeral range, see
    /// `connected_to_itself`), re-read every [`PORTS_REFRESH`] by housekeeping: never on a
    /// connection's path, nor per publish.
    source_ports: SourcePorts,
    ports_read_at: Instant,
    /// Reused by the walks over every connection.
    scratch: Vec<(u32, u32)>,
}

/// A connect to a local port nobody listens on can pick that same port as its source and "succeed"
/// by TCP simultaneous open, connecting the socket to itself; that backend is in fact down. Only a
/// backend port inside the kernel's ephemeral range can be picked as a source port, so only those
/// cost a `getsockname` (any local address, not only loopback, can be a backend in appliance mode).
fn connected_to_itself(
    socket: &Socket,
    backend: Option<lb_core::BackendId>,
    ephemeral: &std::ops::RangeInclusive<u16>,
) -> bool {
    let Some(backend) = backend else { return false };
    if !ephemeral.contains(&backend.0.port()) {
        return false;
    }
    socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(backend.0)
}

/// Whether a relay completion says the backend broke the connection: reading from it failed (not
/// cancelled, not "try again", not for lack of local memory), or writing to it was refused with a
/// reset or broken pipe. Failures on the client's side are not the backend's fault and are not
/// reported.
fn backend_failed(dir: Dir, pending: Pending, result: i32) -> bool {
    if result >= 0
        || result == -libc::ECANCELED
        || result == -libc::EAGAIN
        || LocalResource::of_errno(-result).is_some()
    {
        return false;
    }
    match (dir, pending) {
        (Dir::ToClient, Pending::Recv) => true,
        (Dir::ToBackend, Pending::Send) => result == -libc::ECONNRESET || result == -libc::EPIPE,
        _ => false,
    }
}

/// Closes a client with a reset so it learns at once that it will not be served.
fn reset_socket(socket: Socket) {
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

/// Buffers a backend event for passive outlier detection (see [`crate::events`]).
fn report(ctx: &mut Ctx<'_>, key: VipKey, backend: Option<lb_core::BackendId>, outcome: BackendOutcome) {
    if let Some(backend) = backend {
        ctx.report(BackendEvent { key, backend, outcome });
    }
}

/// Makes the backend socket of `conn`, readies its source port (or, for a transparent entry,
/// binds it to the client's address) and submits its connect to `backend`, counted against the
/// backend's load from the submission on.
fn start_connect(
    conn: &mut Conn,
    ports: &mut SourcePorts,
    ctx: &mut Ctx<'_>,
    index: u32,
    generation: u32,
    entry: &lb_core::ServiceEntry,
    backend: &lb_core::Backend,
) -> Result<(), Failure> {
    let addr = backend.addr();
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), None)
        .map_err(Failure::local)?;
    let _ = socket.set_tcp_nodelay(true);
    if entry.policy.transparent {
        // The client's address, not the worker's ports (see `crate::transparent`); no fallback
        // to the host's own address.
        transparent::bind_to_client(&socket, conn.client_addr, addr, true)
            .map_err(|error| Failure::Transparent(entry.key, error))?;
        conn.source_port = None;
    } else {
        conn.source_port = ports.prepare(&socket, addr, conn.source_port_collisions < COLLISION_RETRIES);
    }
    conn.backend_id = Some(backend.id);
    let fd = socket.as_raw_fd();
    conn.backend = Some(socket);
    // SAFETY: the target lives in the connection's boxed slot, which is not released before
    // both completions are reaped; the socket is owned by the connection for as long.
    unsafe {
        ctx.ring.push_connect(
            fd,
            &mut conn.connect_target,
            addr,
            entry.policy.connect_timeout,
            UserData::new(OpKind::Connect, index, generation).encode(),
            UserData::new(OpKind::ConnectTimeout, index, generation).encode(),
        )
    }
    .map_err(Failure::Submit)?;
    conn.in_flight += 2;
    conn.connect_pending = true;
    // Counted from the submission (not the completion) so that a burst of accepts handled in
    // one batch already sees each other's load.
    let retry = conn.tried.connects() > 1 && conn.source_port_collisions == 0;
    conn.counted = Some(ctx.selection.open(conn.key, backend, retry, ctx.now, ctx.counters));
    Ok(())
}

impl Connections {
    pub fn new(
        path: Path,
        max_connections: usize,
        buffers: RelayBuffers,
        pipes: PipePool,
        source_ports: SourcePorts,
    ) -> Connections {
        Connections {
            conns: ConnTable::default(),
            buffers,
            pipes,
            path,
            max_connections,
            source_ports,
            ports_read_at: Instant::now(),
            scratch: Vec::new(),
        }
    }

    /// Open connections (closing ones included).
    #[inline]
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Descriptors held: a client and a backend socket per connection (counted from the accept on,
    /// as the backend socket comes next), two per pipe, whether in use or pooled.
    #[inline]
    pub fn descriptors(&self) -> usize {
        2 * self.conns.len() + 2 * (self.pipes.in_use + self.pipes.idle())
    }

    /// Takes a client freshly accepted on the listener of `listen` (a VIP key, or a wildcard whose
    /// VIP is the connection's local address): picks a backend from the current snapshot and
    /// connects.
    pub fn new_connection(&mut self, ctx: &mut Ctx<'_>, listen: VipKey, client: Socket) {
        stats::add(&ctx.counters.accepted, 1);
        let wildcard = crate::listener::is_wildcard(&listen);
        let key = if wildcard {
            match client.local_addr().ok().and_then(|a| a.as_socket()) {
                Some(local) => VipKey::new(local.ip(), local.port(), listen.protocol),
                None => listen,
            }
        } else {
            listen
        };
        let entry = ctx.shared.snapshot.load().get(&key).cloned();
        let Some(entry) = entry else {
            // On a wildcard: an address of this host that is no VIP of the port. Otherwise the key
            // left the snapshot between the accept and now.
            if wildcard {
                stats::add(&ctx.counters.tcp_refused_not_a_vip, 1);
            }
            stats::add(&ctx.counters.resets, 1);
            reset_socket(client);
            return;
        };
        // Most entries never read the client's address; a `getpeername` per connection is skipped.
        let unknown = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
        let client_addr = if entry.needs_client_address() {
            client.peer_addr().ok().and_then(|a| a.as_socket()).unwrap_or(unknown)
        } else {
            unknown
        };
        // `loadBalancerSourceRanges` comes before anything else: no slot, no pick, no backend connect.
        // (A client whose address cannot be read is refused when ranges are set: it is gone anyway.)
        if !entry.allows(client_addr.ip()) {
            ctx.selection.refuse(key, Refusal::SourceRange);
            stats::add(&ctx.counters.tcp_refused_source_range, 1);
            stats::add(&ctx.counters.resets, 1);
            reset_socket(client);
            return;
        }
        // The client's socket and its backend's: both must fit (the accept already took the first,
        // which the reserve above the budget covers).
        if self.conns.len() >= self.max_connections || !ctx.room.fits(self.descriptors(), 2) {
            stats::add(&ctx.counters.resets, 1);
            reset_socket(client);
            ctx.refuse_for_budget("a client connection was reset at accept");
            return;
        }
        // The entry's limits (client rate, max-connections) last: still no slot, no backend connect.
        let Ok(vip_load) = connect::admit(ctx, &entry, client_addr.ip()) else {
            stats::add(&ctx.counters.resets, 1);
            reset_socket(client);
            return;
        };
        let mut conn = Conn::new(key, client, client_addr, entry, ctx.now);
        conn.vip_load = vip_load;
        let (index, generation) = self.conns.insert(conn);
        stats::set(&ctx.counters.active, self.conns.len() as u64);
        self.try_connect(ctx, index, generation);
    }

    /// Starts a connect to the next eligible backend not tried yet, or resets the client when the
    /// attempts are used up, no eligible backend is left, or a local shortage (no descriptor for
    /// the backend socket) would fail every backend alike.
    fn try_connect(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) {
        if let Err(failure) = self.connect_next(ctx, index, generation) {
            failure.report(ctx, "a backend socket");
            self.begin_close(ctx, index, generation, true);
        }
    }

    /// One attempt of [`Connections::try_connect`]: `Ok` with a connect in flight (or the connection
    /// gone). A failed connect comes back through `on_connect`, which tries again.
    fn connect_next(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) -> Result<(), Failure> {
        let Some(conn) = self.conns.get_mut(index, generation) else { return Ok(()) };
        let Some(entry) = conn.entry.clone() else { return Ok(()) };
        let attempt = Attempt { client: conn.client_addr, tried: &mut conn.tried };
        let backend = attempt.next(ctx.selection, ctx.counters, ctx.now, &entry)?;
        conn.source_port_collisions = 0;
        start_connect(conn, &mut self.source_ports, ctx, index, generation, &entry, backend)
    }

    /// The backend last tried again, on another source port: the one the worker chose made a
    /// 4-tuple already in use (see [`crate::source_ports`]).
    fn reconnect_same(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) {
        let Some(conn) = self.conns.get_mut(index, generation) else { return };
        let Some(entry) = conn.entry.clone() else { return };
        let last = conn.tried.last();
        let Some(backend) = last.and_then(|idx| entry.backend(idx)) else {
            self.try_connect(ctx, index, generation);
            return;
        };
        conn.source_port_collisions += 1;
        if let Err(failure) =
            start_connect(conn, &mut self.source_ports, ctx, index, generation, &entry, backend)
        {
            failure.report(ctx, "a backend socket");
            self.begin_close(ctx, index, generation, true);
        }
    }

    pub fn on_connect(&mut self, ctx: &mut Ctx<'_>, data: UserData, result: i32) {
        let Some(conn) = self.conns.get_mut(data.slot, data.generation) else { return };
        conn.in_flight -= 1;
        conn.connect_pending = false;
        if conn.phase == Phase::Closing {
            self.release_if_idle(ctx, data.slot, data.generation);
            return;
        }
        let local = if result < 0 { LocalResource::of_errno(-result) } else { None };
        // A port the worker chose is never the backend's own: no self-connect to look for.
        if result < 0
            || (conn.source_port.is_none()
                && conn
                    .backend
                    .as_ref()
                    .is_some_and(|b| connected_to_itself(b, conn.backend_id, self.source_ports.ephemeral())))
        {
            let (key, backend) = (conn.key, conn.backend_id);
            conn.backend = None;
            if let Some(counted) = conn.counted.take() {
                let collision = local == Some(LocalResource::SourcePorts) && conn.source_port.is_some();
                // A self-connect reached a port nobody listens on.
                let cause = if result < 0 { ConnectError::of_errno(-result) } else { ConnectError::Refused };
                if !collision {
                    counted.failed(cause);
                }
                ctx.selection.close(counted, ctx.now, ctx.counters);
            }
            match local {
                // The port the worker chose makes a 4-tuple in use: the same backend again, on
                // another port (or, after a few, the kernel's choice). Not a shortage yet.
                Some(LocalResource::SourcePorts) if conn.source_port.is_some() => {
                    stats::add(&ctx.counters.source_port_collisions, 1);
                    self.reconnect_same(ctx, data.slot, data.generation);
                }
                // No source port towards this backend: another backend has its own ports; nothing
                // here is the backend's fault.
                Some(LocalResource::SourcePorts) => {
                    ctx.local_failure(LocalResource::SourcePorts, "a backend connect", -result);
                    self.try_connect(ctx, data.slot, data.generation);
                }
                // No memory or descriptors: every backend would fail alike.
                Some(resource) => {
                    ctx.local_failure(resource, "a backend connect", -result);
                    self.begin_close(ctx, data.slot, data.generation, true);
                }
                // Refused, unreachable, -ECANCELED when the link timeout fired, or a self-connect.
                None => {
                    stats::add(&ctx.counters.connect_failures, 1);
                    report(ctx, key, backend, BackendOutcome::ConnectFailed);
                    self.try_connect(ctx, data.slot, data.generation);
                }
            }
            return;
        }
        if let Some(counted) = conn.counted.as_mut() {
            counted.established(ctx.now);
        }
        let (key, backend) = (conn.key, conn.backend_id);
        report(ctx, key, backend, BackendOutcome::Connected);
        self.start_relay(ctx, data.slot, data.generation);
    }

    pub fn on_connect_timeout(&mut self, ctx: &mut Ctx<'_>, data: UserData) {
        let Some(conn) = self.conns.get_mut(data.slot, data.generation) else { return };
        conn.in_flight -= 1;
        if conn.phase == Phase::Closing {
            self.release_if_idle(ctx, data.slot, data.generation);
        }
    }

    fn start_relay(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) {
        let path = self.path;
        let Some(conn) = self.conns.get_mut(index, generation) else { return };
        conn.phase = Phase::Relaying;
        conn.entry = None;
        conn.last_activity = ctx.now;
        for dir in Dir::BOTH {
            // Without a pipe (out of descriptors, or over the budget) a direction copies instead.
            let pipe = if path == Path::Splice { self.take_pipe(ctx) } else { None };
            let Some(conn) = self.conns.get_mut(index, generation) else { return };
            let direction = conn.direction(dir);
            // A copy direction takes no buffer yet: its receive draws one when data arrives.
            if let Some(pipe) = pipe {
                direction.pipe = Some(pipe);
                direction.spliced = true;
            }
        }
        if !self.preload_proxy_header(ctx, index, generation) {
            return;
        }
        self.update_pool_gauges(ctx.counters);
        for dir in Dir::BOTH {
            if !self.step(ctx, index, generation, dir, Next::Advance) {
                return;
            }
        }
    }

    /// Puts the entry's PROXY protocol header, if it has one, in front of the client→backend
    /// direction (see [`relay::preload`]): the backend connected, nothing of the client was read
    /// yet, so the header is the first byte the backend gets, and each backend that connects (a
    /// retry's included) gets its own. Returns false if the connection was reset instead.
    fn preload_proxy_header(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) -> bool {
        let Some(conn) = self.conns.get_mut(index, generation) else { return false };
        let (source, destination) = (conn.client_addr, conn.key.socket_addr());
        let version = conn.policy.proxy_protocol;
        let Some(header) = ProxyHeader::encode(version, conn.key.protocol, source, destination) else {
            return true;
        };
        // Port 0: the client's address could not be read (it left before the accept was served);
        // a made-up source must never reach a backend that trusts the header.
        if source.port() == 0
            || relay::preload(conn.direction(Dir::ToBackend), &mut self.buffers, header.as_bytes()).is_err()
        {
            self.begin_close(ctx, index, generation, true);
            return false;
        }
        true
    }

    /// Moves an adaptive direction that proved bulk from copy to splice: its (empty) buffer goes back
    /// to the pool and a pipe takes its place. Without a pipe (out of fds) it keeps copying and only
    /// tries again once it has proved bulk anew, not on every receive.
    fn switch_to_splice(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32, dir: Dir) {
        let Some(pipe) = self.take_pipe(ctx) else {
            if let Some(conn) = self.conns.get_mut(index, generation) {
                conn.direction(dir).full_reads = 0;
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(index, generation) else {
            self.pipes.give(pipe);
            return;
        };
        let direction = conn.direction(dir);
        direction.pipe = Some(pipe);
        direction.spliced = true;
        self.buffers.release(&mut direction.held);
        stats::add(&ctx.counters.relay_spliced, 1);
        self.update_pool_gauges(ctx.counters);
    }

    /// Issues the operation `next` asks for on one direction. Returns false if the connection was
    /// closed as a consequence.
    fn step(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32, dir: Dir, next: Next) -> bool {
        if next == Next::Advance
            && self
                .conns
                .get_mut(index, generation)
                .is_some_and(|conn| relay::wants_splice(self.path, conn.direction(dir)))
        {
            self.switch_to_splice(ctx, index, generation, dir);
        }
        let Some(conn) = self.conns.get_mut(index, generation) else { return false };
        let Some(backend) = conn.backend.as_ref() else { return false };
        let (client_fd, backend_fd) = (conn.client.as_raw_fd(), backend.as_raw_fd());
        let (source, destination) = dir.ends(client_fd, backend_fd);
        let user_data = UserData::new(OpKind::tcp_relay(dir), index, generation).encode();
        let direction = conn.direction(dir);
        let issued = match next {
            Next::Advance => {
                relay::advance(ctx.ring, direction, &mut self.buffers, source, destination, user_data)
            }
            Next::ReadNow => relay::read_now(ctx.ring, direction, &mut self.buffers, source, user_data)
                .map(|()| Advanced::Issued),
            Next::PollIn => {
                relay::poll(ctx.ring, direction, source, libc::POLLIN, Pending::PollIn, user_data)
                    .map(|()| Advanced::Issued)
            }
            Next::PollOut => {
                relay::poll(ctx.ring, direction, destination, libc::POLLOUT, Pending::PollOut, user_data)
                    .map(|()| Advanced::Issued)
            }
            Next::Reset | Next::Cancelled => {
                self.begin_close(ctx, index, generation, true);
                return false;
            }
        };
        match issued {
            Ok(Advanced::Issued) => {
                conn.in_flight += 1;
                true
            }
            Ok(Advanced::Finished) => {
                if conn.client_to_backend.done && conn.backend_to_client.done {
                    self.begin_close(ctx, index, generation, false);
                    return false;
                }
                true
            }
            Err(error) => {
                warn_limited!(ctx, Warning::Submit, %error, "cannot submit a relay operation");
                self.begin_close(ctx, index, generation, true);
                false
            }
        }
    }

    pub fn on_direction(&mut self, ctx: &mut Ctx<'_>, data: UserData, dir: Dir, result: i32, flags: u32) {
        let Some(conn) = self.conns.get_mut(data.slot, data.generation) else { return };
        conn.in_flight -= 1;
        let pending = conn.direction(dir).pending;
        let mut backend_reset = backend_failed(dir, pending, result);
        let mut completed = relay::complete(conn.direction(dir), &mut self.buffers, result, flags);
        let (client_fd, backend_fd) = (conn.client.as_raw_fd(), conn.backend.as_ref().map(|b| b.as_raw_fd()));
        let (source, destination) = dir.ends(Some(client_fd), backend_fd);
        let closing = conn.phase == Phase::Closing;
        let direction = conn.direction(dir);
        if direction.spliced
            && !closing
            && matches!(completed.next, Next::ReadNow | Next::Advance)
            && !direction.eof
            && let (Some(source), Some(destination)) = (source, destination)
        {
            // The poll said the source is readable (or the destination writable): move the bytes now.
            let direction = conn.direction(dir);
            let pumped = relay::splice::pump(direction, source, destination, relay::SPLICE_BUDGET);
            completed = pumped.completed;
            if let Some((failed, errno)) = pumped.failure {
                backend_reset |= backend_failed(dir, failed, errno);
            }
            if relay::wants_copy(self.path, direction, completed.next, pumped.read, self.buffers.size()) {
                // Back to copy: the pipe goes back and the next receive waits without a buffer.
                if let Some(pipe) = direction.pipe.take() {
                    self.pipes.give(pipe);
                }
                direction.spliced = false;
                direction.drained = true;
                direction.full_reads = 0;
                completed.next = Next::Advance;
                stats::add(&ctx.counters.relay_unspliced, 1);
            }
        }
        if completed.eof {
            // The state tells a reset apart only while we have not sent our own FIN on the source:
            // after it, the peer's FIN moves the socket to TIME_WAIT, which leaves it in TCP_CLOSE too.
            let fin_sent = conn.direction(dir.reverse()).done;
            if !fin_sent && source.is_some_and(relay::source_was_reset) {
                completed.next = Next::Reset;
                backend_reset |= dir == Dir::ToClient;
            }
        }
        if let (true, Some(backend)) = (backend_reset && conn.phase != Phase::Closing, conn.backend_id) {
            let event = BackendEvent { key: conn.key, backend, outcome: BackendOutcome::Reset };
            ctx.report(event);
        }
        if completed.active {
            conn.last_activity = ctx.now;
        }
        if completed.written > 0 {
            let counter = match dir {
                Dir::ToBackend => &ctx.counters.bytes_client_to_backend,
                Dir::ToClient => &ctx.counters.bytes_backend_to_client,
            };
            stats::add(counter, completed.written);
            if let Some(counted) = &conn.counted {
                counted.cell().moved(dir == Dir::ToBackend, completed.written, 0);
            }
        }
        if conn.phase == Phase::Closing {
            self.release_if_idle(ctx, data.slot, data.generation);
            return;
        }
        self.step(ctx, data.slot, data.generation, dir, completed.next);
    }

    /// Starts tearing a connection down: cancels what is in flight and releases it once nothing is.
    /// With `reset`, both sockets are closed with `SO_LINGER {on, 0}` so the peers see a reset.
    pub fn begin_close(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32, reset: bool) {
        let Some(conn) = self.conns.get_mut(index, generation) else { return };
        if conn.phase == Phase::Closing {
            conn.reset |= reset;
            return;
        }
        conn.phase = Phase::Closing;
        conn.reset = reset;
        let mut targets = [None; 3];
        if conn.connect_pending {
            targets[0] = Some(OpKind::Connect);
        }
        if conn.client_to_backend.pending != Pending::None {
            targets[1] = Some(OpKind::ClientToBackend);
        }
        if conn.backend_to_client.pending != Pending::None {
            targets[2] = Some(OpKind::BackendToClient);
        }
        for kind in targets.into_iter().flatten() {
            ctx.cancel(UserData::new(kind, index, generation));
        }
        self.release_if_idle(ctx, index, generation);
    }

    /// Releases a closing connection once none of its operations is in flight.
    fn release_if_idle(&mut self, ctx: &mut Ctx<'_>, index: u32, generation: u32) {
        let Some(conn) = self.conns.get_mut(index, generation) else { return };
        if conn.in_flight > 0 {
            return;
        }
        let Some(mut conn) = self.conns.remove(index) else { return };
        if let Some(counted) = conn.counted.take() {
            ctx.selection.close(counted, ctx.now, ctx.counters);
        }
        if let Some(vip_load) = conn.vip_load.take() {
            vip_load.close();
        }
        for dir in Dir::BOTH {
            let direction = conn.direction(dir);
            self.buffers.release(&mut direction.held);
            if let Some(pipe) = direction.pipe.take() {
                self.pipes.give(pipe);
            }
        }
        if conn.reset {
            stats::add(&ctx.counters.resets, 1);
            let _ = conn.client.set_linger(Some(Duration::ZERO));
            if let Some(backend) = conn.backend.as_ref() {
                let _ = backend.set_linger(Some(Duration::ZERO));
            }
        }
        drop(conn);
        stats::set(&ctx.counters.active, self.conns.len() as u64);
        self.update_pool_gauges(ctx.counters);
    }

    /// A pipe for a splice direction, if the budget has room and the kernel gives one; `None` keeps
    /// the direction on copy (counted as a refusal or a local shortage).
    fn take_pipe(&mut self, ctx: &mut Ctx<'_>) -> Option<Pipe> {
        if !ctx.room.fits(self.descriptors(), 2) {
            ctx.refuse_for_budget("a relay direction keeps copying instead of taking a pipe");
            return None;
        }
        match self.pipes.take() {
            Ok(pipe) => Some(pipe),
            Err(error) => {
                let errno = error.raw_os_error().unwrap_or(libc::ENOMEM);
                let resource = LocalResource::of_errno(errno).unwrap_or(LocalResource::Memory);
                ctx.local_failure(resource, "a relay pipe", errno);
                None
            }
        }
    }

    pub fn update_pool_gauges(&self, counters: &WorkerCounters) {
        stats::set(&counters.buffers_in_use, self.buffers.in_use as u64);
        stats::set(&counters.relay_buffers_exhausted, self.buffers.exhausted);
        stats::set(&counters.pipes_in_use, self.pipes.in_use as u64);
        stats::set(&counters.pipes_idle, self.pipes.idle() as u64);
    }

    /// Housekeeping: re-reads the source ports now and then, closes idle connections and those
    /// whose drain deadline passed, and sets the pool gauges (buffers are lent and given back per
    /// receive: the gauges follow at the tick, not per operation).
    pub fn housekeeping(&mut self, ctx: &mut Ctx<'_>) {
        if ctx.now.saturating_duration_since(self.ports_read_at) >= PORTS_REFRESH {
            self.source_ports.refresh();
            self.ports_read_at = ctx.now;
        }
        self.expire(ctx);
        self.update_pool_gauges(ctx.counters);
    }

    /// Closes idle connections and those whose drain deadline passed.
    pub fn expire(&mut self, ctx: &mut Ctx<'_>) {
        let mut live = std::mem::take(&mut self.scratch);
        self.conns.live(&mut live);
        let now = ctx.now;
        for &(index, generation) in &live {
            let Some(conn) = self.conns.get_mut(index, generation) else { continue };
            if conn.phase == Phase::Closing {
                continue;
            }
            if conn.drain_deadline.is_some_and(|deadline| now >= deadline) {
                stats::add(&ctx.counters.drain_closes, 1);
                self.begin_close(ctx, index, generation, true);
            } else if conn.phase == Phase::Relaying
                && now.saturating_duration_since(conn.last_activity) >= conn.policy.idle_timeout
            {
                stats::add(&ctx.counters.idle_timeouts, 1);
                self.begin_close(ctx, index, generation, false);
            }
        }
        self.scratch = live;
        self.count_draining(ctx);
    }

    /// Gives connections whose VIP or backend left the snapshot, or whose backend turned not ready
    /// (terminating, failing readiness), a drain deadline; takes it back if they return.
    pub fn mark_draining(&mut self, ctx: &mut Ctx<'_>, snapshot: &Snapshot) {
        let mut live = std::mem::take(&mut self.scratch);
        self.conns.live(&mut live);
        for &(index, generation) in &live {
            let Some(conn) = self.conns.get_mut(index, generation) else { continue };
            conn.drain_deadline = drain_deadline(
                snapshot,
                conn.key,
                conn.backend_id,
                conn.drain_deadline,
                ctx.now,
                conn.policy.drain_timeout,
            );
        }
        self.scratch = live;
        self.count_draining(ctx);
    }

    /// Sets the `draining` gauges (the worker's, and each traffic cell's): connections with a
    /// drain deadline that are not closing yet.
    fn count_draining(&mut self, ctx: &mut Ctx<'_>) {
        let mut live = std::mem::take(&mut self.scratch);
        self.conns.live(&mut live);
        let mut draining = 0u64;
        for &(index, generation) in &live {
            let Some(conn) = self.conns.get_mut(index, generation) else { continue };
            if conn.phase != Phase::Closing && conn.drain_deadline.is_some() {
                draining += 1;
                if let Some(counted) = &conn.counted {
                    counted.cell().count_draining();
                }
            }
        }
        stats::set(&ctx.counters.draining, draining);
        ctx.selection.traffic().publish_draining(draining > 0);
        self.scratch = live;
    }

    /// The worker stops: every connection is reset.
    pub fn close_all(&mut self, ctx: &mut Ctx<'_>) {
        let mut live = std::mem::take(&mut self.scratch);
        self.conns.live(&mut live);
        for &(index, generation) in &live {
            self.begin_close(ctx, index, generation, true);
        }
        self.scratch = live;
    }

    /// Shuts both sockets of every connection down (the ring failed; see `Worker::abandon`).
    pub fn shut_down_sockets(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            let _ = conn.client.shutdown(std::net::Shutdown::Both);
            if let Some(backend) = &conn.backend {
                let _ = backend.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// The stop grace is over: connections whose cancelled operations never completed are leaked on
    /// purpose, with the relay's buffer ring, as the kernel may still write into their buffers.
    pub fn leak_if_busy(&mut self, worker: usize) {
        if !self.conns.is_empty() {
            tracing::warn!(
                worker,
                left = self.conns.len(),
                "operations outlived the stop grace; leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut self.conns));
            self.buffers.leak_ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_connected_to_itself_is_recognised() {
        // Binding first to an ephemeral port and connecting to that same address is a TCP
        // simultaneous open with itself: exactly what a connect to an unused local port can become.
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
        let own = socket.local_addr().expect("local").as_socket().expect("inet");
        socket.connect(&own.into()).expect("self-connect succeeds");
        let backend = Some(lb_core::BackendId(own));
        assert!(connected_to_itself(&socket, backend, &(own.port()..=own.port())));
        assert!(connected_to_itself(&socket, backend, &(0..=u16::MAX)));
        // A port outside the ephemeral range cannot be a source port the kernel picked: not checked.
        assert!(!connected_to_itself(&socket, backend, &(1..=own.port() - 1)));
        let other = Some(lb_core::BackendId(SocketAddr::from(([127, 0, 0, 1], own.port() ^ 1))));
        assert!(!connected_to_itself(&socket, other, &(0..=u16::MAX)));
    }
}
