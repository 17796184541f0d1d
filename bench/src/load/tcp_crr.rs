//! tcp-crr: connect → request → response → close, over and over, `connections` transactions in flight.
//!
//! A transaction's latency runs from the connect call to the last response byte. Connect failures are
//! counted by kind (refused, timeout, other) and the slot immediately starts a new transaction, so a
//! closed port yields a stream of `connect_refused` errors until the deadline, never a hang.
//! Sockets are non-blocking and edge-triggered: one epoll registration per connection, no re-arming.

use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::time::Instant;

use serde_json::json;
use socket2::Socket;

use crate::cli::{CloseStyle, TcpCrrArgs};
use crate::load::{ClientLoop, TICK, drive, payload};
use crate::poller::{self, Event, Poller};
use crate::report::{Failure, Report};
use crate::run::{Clock, LiveCounters, Tally, client_threads, run_threads};
use crate::sockets::{
    ConnectOptions, connect_failure, finish_connect, loopback_source, start_connect, transfer_failure,
    would_block,
};

pub fn run(args: &TcpCrrArgs) -> anyhow::Result<Report> {
    let connections = args.connections as usize;
    let threads = client_threads(args.run.threads, connections);
    let spread = args.source_ips > 0 && args.run.target.ip().is_loopback() && args.run.target.is_ipv4();
    let clock = Clock::starting_now(args.run.warmup, args.run.duration);
    let (totals, _) =
        run_threads(threads, connections, clock, args.run.show_progress(), |_, units, clock, live| {
            let slots = units.len();
            Ok((
                CrrThread::new(args, slots, spread, units.first().copied().unwrap_or(0))?.run(clock, live),
                (),
            ))
        })?;
    let params = json!({
        "connections": args.connections,
        "message_size": args.message_size,
        "close": format!("{:?}", args.close).to_lowercase(),
        "source_ips": if spread { args.source_ips } else { 0 },
        "timeout_ms": args.timeout.as_millis() as u64,
        "connect_timeout_ms": args.connect_timeout.as_millis() as u64,
    });
    Ok(Report::new("tcp-crr", &args.run, params, threads, &totals))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Connecting,
    Writing,
    Reading,
}

struct Slot {
    socket: Option<Socket>,
    phase: Phase,
    started: Instant,
    /// Connect deadline while connecting, response deadline afterwards.
    deadline: Instant,
    written: usize,
    received: usize,
    /// Bumped per transaction; events carrying an older generation belong to a closed socket.
    generation: u32,
}

struct CrrThread<'a> {
    args: &'a TcpCrrArgs,
    poller: Poller,
    slots: Vec<Slot>,
    /// Slots waiting to start their next transaction.
    idle: Vec<usize>,
    /// The slots being started in this round (kept to reuse its allocation).
    starting: Vec<usize>,
    request: Vec<u8>,
    read_buffer: Vec<u8>,
    tally: Tally,
    spread: bool,
    next_source: u32,
}

fn token(slot: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | slot as u64
}

impl<'a> CrrThread<'a> {
    fn new(args: &'a TcpCrrArgs, count: usize, spread: bool, first_unit: usize) -> io::Result<Self> {
        let now = Instant::now();
        let slots = (0..count)
            .map(|_| Slot {
                socket: None,
                phase: Phase::Idle,
                started: now,
                deadline: now,
                written: 0,
                received: 0,
                generation: 0,
            })
            .collect();
        Ok(Self {
            args,
            poller: Poller::new(count * 2)?,
            slots,
            idle: (0..count).collect(),
            starting: Vec::with_capacity(count),
            request: payload(args.message_size as usize),
            read_buffer: vec![0; (args.message_size as usize).clamp(4096, 256 * 1024)],
            tally: Tally::default(),
            spread,
            next_source: first_unit as u32,
        })
    }

    fn run(mut self, clock: &Clock, live: &LiveCounters) -> Tally {
        drive(&mut self, clock, live, TICK);
        self.tally
    }

    /// Starts the slots that are idle. Slots whose start fails at once go back to `idle` and are
    /// retried next round, so a synchronous connect error never keeps the loop from the clock.
    fn start_idle(&mut self) -> bool {
        std::mem::swap(&mut self.idle, &mut self.starting);
        for position in 0..self.starting.len() {
            self.start(self.starting[position]);
        }
        self.starting.clear();
        !self.idle.is_empty()
    }

    fn options(&mut self) -> ConnectOptions {
        let source = if self.spread {
            let host = self.next_source % self.args.source_ips;
            self.next_source = self.next_source.wrapping_add(1);
            Some(loopback_source(host))
        } else {
            None
        };
        ConnectOptions { nodelay: true, reset_on_close: self.args.close == CloseStyle::Reset, source }
    }

    fn start(&mut self, index: usize) {
        let options = self.options();
        let now = Instant::now();
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        (slot.started, slot.deadline, slot.written, slot.received) =
            (now, now + self.args.connect_timeout, 0, 0);
        let socket = match start_connect(self.args.run.target, &options) {
            Ok(socket) => socket,
            Err(error) => return self.finish(index, Some(connect_failure(&error))),
        };
        let interest = poller::READABLE | poller::WRITABLE | poller::EDGE;
        if let Err(error) = self.poller.add(socket.as_raw_fd(), token(index, slot.generation), interest) {
            return self.finish(index, Some(transfer_failure(&error)));
        }
        slot.socket = Some(socket);
        slot.phase = Phase::Connecting;
    }

    /// Ends the slot's transaction (closing its socket) and queues the next one.
    fn finish(&mut self, index: usize, failure: Option<Failure>) {
        if let Some(failure) = failure {
            self.tally.fail(failure);
        }
        let slot = &mut self.slots[index];
        slot.socket = None;
        slot.phase = Phase::Idle;
        self.idle.push(index);
    }

    fn expire(&mut self, now: Instant) {
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.phase == Phase::Idle || now < slot.deadline {
                continue;
            }
            let failure = if slot.phase == Phase::Connecting {
                Failure::ConnectTimeout
            } else {
                Failure::ResponseTimeout
            };
            self.finish(index, Some(failure));
        }
    }

    fn handle_event(&mut self, clock: &Clock, event: Event) {
        let index = (event.token & u64::from(u32::MAX)) as usize;
        let generation = (event.token >> 32) as u32;
        let Some(slot) = self.slots.get(index) else { return };
        if slot.generation != generation || slot.phase == Phase::Idle {
            return;
        }
        if slot.phase == Phase::Connecting {
            let Some(socket) = slot.socket.as_ref() else { return };
            if let Err(error) = finish_connect(socket) {
                return self.finish(index, Some(connect_failure(&error)));
            }
            if event.flags & (poller::WRITABLE | poller::BROKEN) == 0 {
                return;
            }
            let slot = &mut self.slots[index];
            slot.phase = Phase::Writing;
            slot.deadline = Instant::now() + self.args.timeout;
        }
        if self.slots[index].phase == Phase::Writing {
            self.write_request(clock, index);
        }
        if self.slots[index].phase == Phase::Reading {
            self.read_response(clock, index);
        }
    }

    fn write_request(&mut self, clock: &Clock, index: usize) {
        let slot = &mut self.slots[index];
        let Some(socket) = slot.socket.as_ref() else { return };
        while slot.written < self.request.len() {
            match (&*socket).write(&self.request[slot.written..]) {
                Ok(written) => {
                    slot.written += written;
                    self.tally.sent(clock, Instant::now(), written);
                }
                Err(error) if would_block(&error) => return,
                Err(error) => return self.finish(index, Some(transfer_failure(&error))),
            }
        }
        slot.phase = Phase::Reading;
    }

    fn read_response(&mut self, clock: &Clock, index: usize) {
        let expected = self.request.len();
        loop {
            let slot = &mut self.slots[index];
            let Some(socket) = slot.socket.as_ref() else { return };
            let want = (expected - slot.received).min(self.read_buffer.len());
            let result = (&*socket).read(&mut self.read_buffer[..want]);
            let now = Instant::now();
            match result {
                Ok(0) => return self.finish(index, Some(Failure::UnexpectedEof)),
                Ok(count) => {
                    slot.received += count;
                    self.tally.received(clock, now, count);
                    if slot.received == expected {
                        let latency = now.duration_since(slot.started);
                        self.tally.complete(clock, now, latency);
                        return self.finish(index, None);
                    }
                }
                Err(error) if would_block(&error) => return,
                Err(error) => return self.finish(index, Some(transfer_failure(&error))),
            }
        }
    }
}

impl ClientLoop for CrrThread<'_> {
    fn poller(&mut self) -> &mut Poller {
        &mut self.poller
    }

    fn tally(&mut self) -> &mut Tally {
        &mut self.tally
    }

    fn scan(&mut self, _clock: &Clock, now: Instant) {
        self.expire(now);
    }

    fn on_event(&mut self, clock: &Clock, event: Event) {
        self.handle_event(clock, event);
    }

    fn before_wait(&mut self) -> bool {
        self.start_idle()
    }
}
