//! tcp-stream: bulk throughput over N parallel connections, in one direction or both.
//!
//! `up` writes `--size` bytes per call to a sink, `down` reads from a source, `both` writes to an echo
//! server and reads the echo back. Every byte written or read inside the measured window is counted
//! once, per stream and in total, so the per-stream figures add up to the total. A stream that fails is
//! counted as an error and stays closed (no silent reconnect that would blur the byte counts).

use std::io::{self, Read as _, Write as _};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::time::Instant;

use serde_json::json;
use socket2::Socket;

use crate::cli::{Direction, TcpStreamArgs};
use crate::load::{payload, wait_budget};
use crate::poller::{self, Event, Poller};
use crate::report::{Failure, Report, StreamSummary, gbit_per_sec};
use crate::run::{Clock, LiveCounters, Tally, client_threads, run_threads};
use crate::sockets::{ConnectOptions, connect_blocking, connect_failure, transfer_failure, would_block};

pub fn run(args: &TcpStreamArgs) -> anyhow::Result<Report> {
    let streams = args.streams as usize;
    let threads = client_threads(args.run.threads, streams);
    let clock = Clock::starting_now(args.run.warmup, args.run.duration);
    let (totals, per_thread) =
        run_threads(threads, streams, clock, args.run.show_progress(), |_, units, clock, live| {
            Ok(run_streams(args, units, clock, live)?)
        })?;
    let seconds = args.run.duration.as_secs_f64();
    let mut summaries: Vec<StreamSummary> = per_thread
        .into_iter()
        .flatten()
        .map(|(stream, sent, received)| StreamSummary {
            stream,
            bytes_sent: sent,
            bytes_received: received,
            gbit_per_sec: gbit_per_sec(sent + received, seconds),
        })
        .collect();
    summaries.sort_by_key(|summary| summary.stream);
    let params = json!({
        "streams": args.streams,
        "size": args.size,
        "direction": format!("{:?}", args.direction).to_lowercase(),
    });
    let mut report = Report::new("tcp-stream", &args.run, params, threads, &totals);
    report.streams = Some(summaries);
    Ok(report)
}

/// (stream index, bytes sent, bytes received) inside the measured window.
type StreamBytes = (usize, u64, u64);

struct Stream {
    index: usize,
    socket: Option<Socket>,
    sent: u64,
    received: u64,
}

/// Drives this thread's streams until the end; returns (stream index, bytes sent, bytes received).
fn run_streams(
    args: &TcpStreamArgs,
    units: Vec<usize>,
    clock: &Clock,
    live: &LiveCounters,
) -> io::Result<(Tally, Vec<StreamBytes>)> {
    let mut tally = Tally::default();
    let mut poller = Poller::new(units.len() * 2)?;
    let interest = match args.direction {
        Direction::Up => poller::WRITABLE,
        Direction::Down => poller::READABLE,
        Direction::Both => poller::READABLE | poller::WRITABLE,
    };
    let mut streams: Vec<Stream> = Vec::with_capacity(units.len());
    for (slot, index) in units.into_iter().enumerate() {
        let mut stream = Stream { index, socket: None, sent: 0, received: 0 };
        // A blocking connect must not carry the thread past the end of the run.
        let timeout = args.connect_timeout.min(clock.end.saturating_duration_since(Instant::now()));
        if timeout.is_zero() {
            streams.push(stream);
            continue;
        }
        match connect_blocking(args.run.target, timeout, &ConnectOptions::default()) {
            Ok(socket) => match poller.add(socket.as_raw_fd(), slot as u64, interest) {
                Ok(()) => stream.socket = Some(socket),
                Err(error) => tally.fail(transfer_failure(&error)),
            },
            Err(error) => tally.fail(connect_failure(&error)),
        }
        streams.push(stream);
    }
    let write_buffer = payload(args.size as usize);
    let mut read_buffer = vec![0u8; args.size as usize];
    let mut ready: Vec<Event> = Vec::with_capacity(streams.len().max(16));
    let mut next_publish = Instant::now();
    loop {
        let now = Instant::now();
        if now >= clock.end || streams.iter().all(|stream| stream.socket.is_none()) {
            break;
        }
        if now >= next_publish {
            tally.publish(live);
            next_publish = now + crate::load::TICK;
        }
        ready.clear();
        if let Err(error) = poller.wait(wait_budget(now, clock.end), |e| ready.push(e)) {
            eprintln!("tcp-stream: epoll_wait failed: {error}");
            tally.fail(Failure::OtherIo);
            break;
        }
        let now = Instant::now();
        if now >= clock.end {
            break;
        }
        for event in &ready {
            let Some(stream) = streams.get_mut(event.token as usize) else { continue };
            let Some(socket) = stream.socket.as_ref() else { continue };
            let mut outcome = Ok(());
            if event.flags & poller::WRITABLE != 0 {
                outcome = match (&*socket).write(&write_buffer) {
                    Ok(count) => {
                        if tally.sent(clock, now, count) {
                            stream.sent += count as u64;
                        }
                        tally.count_op(clock, now);
                        Ok(())
                    }
                    Err(error) if would_block(&error) => Ok(()),
                    Err(error) => Err(transfer_failure(&error)),
                };
            }
            if outcome.is_ok() && event.flags & (poller::READABLE | poller::BROKEN) != 0 {
                outcome = match (&*socket).read(&mut read_buffer) {
                    Ok(0) => Err(Failure::UnexpectedEof),
                    Ok(count) => {
                        if tally.received(clock, now, count) {
                            stream.received += count as u64;
                        }
                        tally.count_op(clock, now);
                        Ok(())
                    }
                    Err(error) if would_block(&error) => Ok(()),
                    Err(error) => Err(transfer_failure(&error)),
                };
            }
            if let Err(failure) = outcome {
                tally.fail(failure);
                stream.socket = None;
            }
        }
    }
    for stream in &mut streams {
        // A clean FIN lets a sink count every byte that was written; what was written is in flight.
        if let Some(socket) = stream.socket.take() {
            let _ = socket.shutdown(Shutdown::Write);
        }
    }
    tally.publish(live);
    Ok((tally, streams.into_iter().map(|stream| (stream.index, stream.sent, stream.received)).collect()))
}
