//! udp-rr: datagram ping-pong against a UDP echo server, one datagram in flight per flow.
//!
//! Each datagram carries the flow's sequence number in its first 8 bytes, so an answer that arrives
//! after its request was declared lost (`--timeout`) is counted as `late`, not as a round trip. A lost
//! datagram is counted and the flow sends the next one at once; loss is reported, not an error.
//! `refused` (ICMP port unreachable) is an error: the flow pauses until the next scan, then resumes.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::Instant;

use serde_json::json;

use crate::cli::UdpRrArgs;
use crate::load::{ClientLoop, TICK, drive, payload};
use crate::poller::{self, Event, Poller};
use crate::report::{DatagramSummary, Report, per_sec};
use crate::run::{Clock, LiveCounters, Tally, client_threads, run_threads};
use crate::sockets::{transfer_failure, would_block};

#[derive(Default, Clone, Copy)]
struct Counts {
    sent: u64,
    lost: u64,
    late: u64,
}

pub fn run(args: &UdpRrArgs) -> anyhow::Result<Report> {
    let flows = args.flows as usize;
    let threads = client_threads(args.run.threads, flows);
    let clock = Clock::starting_now(args.run.warmup, args.run.duration);
    let (totals, counts) =
        run_threads(threads, flows, clock, args.run.show_progress(), |_, units, clock, live| {
            Ok(RrThread::new(args, units.len())?.run(clock, live))
        })?;
    let seconds = args.run.duration.as_secs_f64();
    let sum = counts.iter().fold(Counts::default(), |a, b| Counts {
        sent: a.sent + b.sent,
        lost: a.lost + b.lost,
        late: a.late + b.late,
    });
    let settled = totals.ops + sum.lost;
    let datagrams = DatagramSummary {
        sent: sum.sent,
        received: totals.ops,
        lost: sum.lost,
        late: sum.late,
        sent_per_sec: per_sec(sum.sent, seconds),
        received_per_sec: per_sec(totals.ops, seconds),
        loss_percent: if settled > 0 { sum.lost as f64 * 100.0 / settled as f64 } else { 0.0 },
    };
    let params = json!({
        "flows": args.flows,
        "message_size": args.message_size,
        "timeout_ms": args.timeout.as_millis() as u64,
    });
    let mut report = Report::new("udp-rr", &args.run, params, threads, &totals);
    report.datagrams = Some(datagrams);
    Ok(report)
}

struct Flow {
    socket: UdpSocket,
    sequence: u64,
    sent_at: Instant,
    outstanding: bool,
}

struct RrThread<'a> {
    args: &'a UdpRrArgs,
    poller: Poller,
    flows: Vec<Flow>,
    request: Vec<u8>,
    read_buffer: Vec<u8>,
    tally: Tally,
    counts: Counts,
}

impl<'a> RrThread<'a> {
    fn new(args: &'a UdpRrArgs, count: usize) -> io::Result<Self> {
        let poller = Poller::new(count * 2)?;
        let target = args.run.target;
        let bind = crate::sockets::any_port_like(target);
        let mut flows = Vec::with_capacity(count);
        let now = Instant::now();
        for index in 0..count {
            let socket = UdpSocket::bind(bind)?;
            socket.connect(target)?;
            socket.set_nonblocking(true)?;
            poller.add(socket.as_raw_fd(), index as u64, poller::READABLE)?;
            flows.push(Flow { socket, sequence: 0, sent_at: now, outstanding: false });
        }
        Ok(Self {
            args,
            poller,
            flows,
            request: payload(args.message_size as usize),
            read_buffer: vec![0; 65_536],
            tally: Tally::default(),
            counts: Counts::default(),
        })
    }

    fn run(mut self, clock: &Clock, live: &LiveCounters) -> (Tally, Counts) {
        // Scan often enough that a loss is declared within a quarter timeout of its deadline.
        let scan_every = TICK.min(self.args.timeout / 4);
        drive(&mut self, clock, live, scan_every);
        (self.tally, self.counts)
    }

    /// Declares overdue datagrams lost and (re)starts idle flows.
    fn scan_flows(&mut self, clock: &Clock, now: Instant) {
        for index in 0..self.flows.len() {
            let flow = &mut self.flows[index];
            if flow.outstanding && now.duration_since(flow.sent_at) > self.args.timeout {
                flow.outstanding = false;
                if clock.in_window(now) {
                    self.counts.lost += 1;
                }
            }
            if !self.flows[index].outstanding {
                self.send(clock, index, now);
            }
        }
    }

    fn send(&mut self, clock: &Clock, index: usize, now: Instant) {
        let flow = &mut self.flows[index];
        flow.sequence += 1;
        self.request[..8].copy_from_slice(&flow.sequence.to_le_bytes());
        match flow.socket.send(&self.request) {
            Ok(count) => {
                flow.outstanding = true;
                flow.sent_at = now;
                if self.tally.sent(clock, now, count) {
                    self.counts.sent += 1;
                }
            }
            // Socket buffer full: retried at the next scan.
            Err(error) if would_block(&error) => {}
            Err(error) => self.tally.fail(transfer_failure(&error)),
        }
    }

    fn receive(&mut self, clock: &Clock, index: usize) {
        let Some(flow) = self.flows.get_mut(index) else { return };
        loop {
            let result = flow.socket.recv(&mut self.read_buffer);
            let now = Instant::now();
            match result {
                Ok(count) => {
                    let sequence =
                        self.read_buffer.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
                    if flow.outstanding && count == self.request.len() && sequence == Some(flow.sequence) {
                        flow.outstanding = false;
                        self.tally.received(clock, now, count);
                        self.tally.complete(clock, now, now.duration_since(flow.sent_at));
                        self.send(clock, index, now);
                        return;
                    }
                    if clock.in_window(now) {
                        self.counts.late += 1;
                    }
                }
                Err(error) if would_block(&error) => return,
                Err(error) => {
                    // The flow stays idle until the next scan, so a closed port is not hammered.
                    flow.outstanding = false;
                    return self.tally.fail(transfer_failure(&error));
                }
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
        self.scan_flows(clock, now);
    }

    fn on_event(&mut self, clock: &Clock, event: Event) {
        self.receive(clock, event.token as usize);
    }
}
