//! tcp-rr: request/response ping-pong over persistent connections against an echo server.
//!
//! Each connection keeps `pipeline` requests of `message_size` bytes in flight; a request completes
//! when `message_size` echoed bytes arrive (TCP keeps order, so responses match requests FIFO), and the
//! next one is sent at once. Latency is from queueing the request to its last response byte. A failed
//! connection is counted, closed and replaced (after `RECONNECT_DELAY` when the connect itself failed).

use std::collections::VecDeque;
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::json;
use socket2::Socket;

use crate::cli::TcpRrArgs;
use crate::load::{ClientLoop, TICK, drive, payload};
use crate::poller::{self, Event, Poller};
use crate::report::{Failure, Report};
use crate::run::{Clock, LiveCounters, Tally, client_threads, run_threads};
use crate::sockets::{ConnectOptions, connect_blocking, connect_failure, transfer_failure, would_block};

/// Pause before reconnecting after a failed connect, so a dead target is not hammered in a tight loop.
const RECONNECT_DELAY: Duration = Duration::from_millis(10);

pub fn run(args: &TcpRrArgs) -> anyhow::Result<Report> {
    let connections = args.connections as usize;
    let threads = client_threads(args.run.threads, connections);
    let clock = Clock::starting_now(args.run.warmup, args.run.duration);
    let (totals, _) =
        run_threads(threads, connections, clock, args.run.show_progress(), |_, units, clock, live| {
            Ok((RrThread::new(args, units.len())?.run(clock, live), ()))
        })?;
    let params = json!({
        "connections": args.connections,
        "message_size": args.message_size,
        "pipeline": args.pipeline,
        "timeout_ms": args.timeout.as_millis() as u64,
    });
    Ok(Report::new("tcp-rr", &args.run, params, threads, &totals))
}

struct Connection {
    socket: Option<Socket>,
    /// Queue times of the requests in flight, oldest first.
    in_flight: VecDeque<Instant>,
    /// Request bytes queued but not yet written.
    unwritten: usize,
    /// Response bytes received towards the oldest request in flight.
    received: usize,
    waiting_writable: bool,
    reconnect_at: Instant,
}

struct RrThread<'a> {
    args: &'a TcpRrArgs,
    poller: Poller,
    connections: Vec<Connection>,
    request: Vec<u8>,
    read_buffer: Vec<u8>,
    tally: Tally,
    options: ConnectOptions,
}

impl<'a> RrThread<'a> {
    fn new(args: &'a TcpRrArgs, count: usize) -> io::Result<Self> {
        let window = args.message_size as usize * args.pipeline as usize;
        let now = Instant::now();
        let connections = (0..count)
            .map(|_| Connection {
                socket: None,
                in_flight: VecDeque::with_capacity(args.pipeline as usize),
                unwritten: 0,
                received: 0,
                waiting_writable: false,
                reconnect_at: now,
            })
            .collect();
        Ok(Self {
            args,
            poller: Poller::new(count * 2)?,
            connections,
            request: payload(window),
            read_buffer: vec![0; window.max(64 * 1024)],
            tally: Tally::default(),
            options: ConnectOptions { nodelay: true, ..ConnectOptions::default() },
        })
    }

    fn run(mut self, clock: &Clock, live: &LiveCounters) -> Tally {
        drive(&mut self, clock, live, TICK);
        self.tally
    }

    /// Reconnects what is due and fails responses that exceeded the timeout.
    fn scan_connections(&mut self, clock: &Clock, now: Instant) {
        for index in 0..self.connections.len() {
            let connection = &self.connections[index];
            match &connection.socket {
                None if now >= connection.reconnect_at => self.open(clock, index),
                Some(_) => {
                    let overdue = connection
                        .in_flight
                        .front()
                        .is_some_and(|sent| now.duration_since(*sent) > self.args.timeout);
                    if overdue {
                        self.fail(index, Failure::ResponseTimeout, now);
                    }
                }
                None => {}
            }
        }
    }

    fn open(&mut self, clock: &Clock, index: usize) {
        // A blocking connect must not carry the thread past the end of the run.
        let timeout = self.args.connect_timeout.min(clock.end.saturating_duration_since(Instant::now()));
        if timeout.is_zero() {
            return;
        }
        let socket = match connect_blocking(self.args.run.target, timeout, &self.options) {
            Ok(socket) => socket,
            Err(error) => {
                self.tally.fail(connect_failure(&error));
                self.connections[index].reconnect_at = Instant::now() + RECONNECT_DELAY;
                return;
            }
        };
        if let Err(error) = self.poller.add(socket.as_raw_fd(), index as u64, poller::READABLE) {
            self.tally.fail(transfer_failure(&error));
            self.connections[index].reconnect_at = Instant::now() + RECONNECT_DELAY;
            return;
        }
        let now = Instant::now();
        let size = self.args.message_size as usize;
        let connection = &mut self.connections[index];
        connection.socket = Some(socket);
        for _ in 0..self.args.pipeline {
            connection.in_flight.push_back(now);
            connection.unwritten += size;
        }
        self.flush(clock, index, now);
    }

    fn fail(&mut self, index: usize, failure: Failure, now: Instant) {
        self.tally.fail(failure);
        let connection = &mut self.connections[index];
        // Dropping the socket closes it, which also removes it from the epoll set.
        connection.socket = None;
        connection.in_flight.clear();
        connection.unwritten = 0;
        connection.received = 0;
        connection.waiting_writable = false;
        connection.reconnect_at = now;
    }

    fn handle_event(&mut self, clock: &Clock, event: Event) {
        let index = event.token as usize;
        if self.connections.get(index).is_none_or(|c| c.socket.is_none()) {
            return;
        }
        if event.flags & poller::WRITABLE != 0 {
            self.flush(clock, index, Instant::now());
        }
        if event.flags & (poller::READABLE | poller::BROKEN) != 0 {
            self.receive(clock, index);
        }
    }

    fn receive(&mut self, clock: &Clock, index: usize) {
        let size = self.args.message_size as usize;
        let Some(socket) = self.connections[index].socket.as_mut() else { return };
        let result = (&*socket).read(&mut self.read_buffer);
        let now = Instant::now();
        let count = match result {
            Ok(0) => return self.fail(index, Failure::UnexpectedEof, now),
            Ok(count) => count,
            Err(error) if would_block(&error) => return,
            Err(error) => return self.fail(index, transfer_failure(&error), now),
        };
        self.tally.received(clock, now, count);
        let connection = &mut self.connections[index];
        connection.received += count;
        while connection.received >= size {
            let Some(sent) = connection.in_flight.pop_front() else {
                // More bytes came back than were sent: the target is not an echo server.
                return self.fail(index, Failure::OtherIo, now);
            };
            connection.received -= size;
            self.tally.complete(clock, now, now.duration_since(sent));
            connection.in_flight.push_back(now);
            connection.unwritten += size;
        }
        self.flush(clock, index, now);
    }

    fn flush(&mut self, clock: &Clock, index: usize, now: Instant) {
        let connection = &mut self.connections[index];
        let Some(socket) = connection.socket.as_ref() else { return };
        while connection.unwritten > 0 {
            let chunk = connection.unwritten.min(self.request.len());
            match (&*socket).write(&self.request[..chunk]) {
                Ok(written) => {
                    connection.unwritten -= written;
                    self.tally.sent(clock, now, written);
                }
                Err(error) if would_block(&error) => {
                    if !connection.waiting_writable {
                        connection.waiting_writable = true;
                        let interest = poller::READABLE | poller::WRITABLE;
                        if let Err(error) = self.poller.modify(socket.as_raw_fd(), index as u64, interest) {
                            return self.fail(index, transfer_failure(&error), now);
                        }
                    }
                    return;
                }
                Err(error) => return self.fail(index, transfer_failure(&error), now),
            }
        }
        if connection.waiting_writable {
            connection.waiting_writable = false;
            if let Err(error) = self.poller.modify(socket.as_raw_fd(), index as u64, poller::READABLE) {
                self.fail(index, transfer_failure(&error), now);
            }
        }
    }
}

impl ClientLoop for RrThread<'_> {
    fn poller(&mut self) -> &mut Poller {
        &mut self.poller
    }

    fn tally(&mut self) -> &mut Tally {
        &mut self.tally
    }

    fn scan(&mut self, clock: &Clock, now: Instant) {
        self.scan_connections(clock, now);
    }

    fn on_event(&mut self, clock: &Clock, event: Event) {
        self.handle_event(clock, event);
    }
}
