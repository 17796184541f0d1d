//! TCP servers on one epoll loop per thread: echo (returns what it reads), sink (discards), source
//! (writes endlessly, discards what it reads).
//!
//! Connections are indexed by file descriptor in a per-thread table; dropping the entry closes the
//! socket and removes it from epoll. The echo keeps a backlog only when the peer stops reading, and
//! then stops reading itself until the backlog is written (bounded memory per connection).

use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::time::Instant;

use socket2::Socket;

use super::{STOP_CHECK, ServerCounters};
use crate::cli::ServerKind;
use crate::poller::{self, Event, Poller};
use crate::sockets::would_block;

const LISTENER: u64 = u64::MAX;
const BUFFER: usize = 256 * 1024;

struct Connection {
    socket: Socket,
    /// Echo bytes the peer has not accepted yet.
    backlog: Vec<u8>,
}

pub fn serve(
    kind: ServerKind,
    listener: Socket,
    stop_at: Option<Instant>,
    counters: &ServerCounters,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut poller = Poller::new(1024)?;
    poller.add(listener.as_raw_fd(), LISTENER, poller::READABLE)?;
    let mut table: Vec<Option<Connection>> = Vec::new();
    let mut buffer = vec![0u8; BUFFER];
    if kind == ServerKind::TcpSource {
        buffer.iter_mut().enumerate().for_each(|(i, b)| *b = b'a' + (i % 26) as u8);
    }
    let mut ready: Vec<Event> = Vec::with_capacity(1024);
    loop {
        if stop_at.is_some_and(|stop| Instant::now() >= stop) {
            return Ok(());
        }
        ready.clear();
        poller.wait(STOP_CHECK, |event| ready.push(event))?;
        for event in &ready {
            if event.token == LISTENER {
                accept_all(kind, &listener, &poller, &mut table, counters);
                continue;
            }
            let fd = event.token as usize;
            let Some(Some(connection)) = table.get_mut(fd) else { continue };
            let keep = match kind {
                ServerKind::TcpEcho => echo(connection, event.flags, &poller, &mut buffer, counters),
                ServerKind::TcpSink => read_discard(connection, &mut buffer, counters),
                _ => source(connection, event.flags, &mut buffer, counters),
            };
            if !keep {
                table[fd] = None;
            }
        }
    }
}

fn accept_all(
    kind: ServerKind,
    listener: &Socket,
    poller: &Poller,
    table: &mut Vec<Option<Connection>>,
    counters: &ServerCounters,
) {
    loop {
        let socket = match listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
            Ok((socket, _)) => socket,
            Err(error) if would_block(&error) => return,
            // A handshake aborted before accept concerns only that client.
            Err(error) if error.kind() == io::ErrorKind::ConnectionAborted => continue,
            // Anything else (e.g. fd exhaustion): keep serving established connections, retry later.
            Err(error) => {
                eprintln!("serve: accept failed: {error}");
                return;
            }
        };
        if kind == ServerKind::TcpEcho {
            let _ = socket.set_tcp_nodelay(true);
        }
        let fd = socket.as_raw_fd();
        let interest = if kind == ServerKind::TcpSource {
            poller::READABLE | poller::WRITABLE
        } else {
            poller::READABLE
        };
        if poller.add(fd, fd as u64, interest).is_err() {
            continue;
        }
        let slot = fd as usize;
        if table.len() <= slot {
            table.resize_with(slot + 1, || None);
        }
        table[slot] = Some(Connection { socket, backlog: Vec::new() });
        counters.add(1, 0);
    }
}

/// Returns false when the connection is finished.
fn read_discard(connection: &mut Connection, buffer: &mut [u8], counters: &ServerCounters) -> bool {
    match (&connection.socket).read(buffer) {
        Ok(0) => false,
        Ok(count) => {
            counters.add(0, count as u64);
            true
        }
        Err(error) => would_block(&error),
    }
}

fn source(connection: &mut Connection, flags: u32, buffer: &mut [u8], counters: &ServerCounters) -> bool {
    if flags & (poller::READABLE | poller::BROKEN) != 0 && !read_discard(connection, buffer, counters) {
        return false;
    }
    if flags & poller::WRITABLE != 0
        && let Err(error) = (&connection.socket).write(buffer)
    {
        return would_block(&error);
    }
    true
}

fn echo(
    connection: &mut Connection,
    flags: u32,
    poller: &Poller,
    buffer: &mut [u8],
    counters: &ServerCounters,
) -> bool {
    let fd = connection.socket.as_raw_fd();
    if !connection.backlog.is_empty() {
        if flags & (poller::WRITABLE | poller::BROKEN) == 0 {
            return true;
        }
        match (&connection.socket).write(&connection.backlog) {
            Ok(written) => {
                connection.backlog.drain(..written);
            }
            Err(error) => return would_block(&error),
        }
        if connection.backlog.is_empty() {
            return poller.modify(fd, fd as u64, poller::READABLE).is_ok();
        }
        return true;
    }
    let count = match (&connection.socket).read(buffer) {
        Ok(0) => return false,
        Ok(count) => count,
        Err(error) => return would_block(&error),
    };
    counters.add(0, count as u64);
    let mut written = 0;
    while written < count {
        match (&connection.socket).write(&buffer[written..count]) {
            Ok(n) => written += n,
            Err(error) if would_block(&error) => {
                connection.backlog.extend_from_slice(&buffer[written..count]);
                return poller.modify(fd, fd as u64, poller::WRITABLE).is_ok();
            }
            Err(_) => return false,
        }
    }
    true
}
