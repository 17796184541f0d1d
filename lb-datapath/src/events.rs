//! Backend events (connect outcomes, backend resets) a worker reports to the control plane for
//! passive outlier detection.
//!
//! Must never block a worker: events are pushed into a per-worker buffer (bounded) and flushed as
//! one batch per housekeeping tick through a bounded `sync_channel` with `try_send`; a full buffer
//! or channel drops the events and counts them (`WorkerStats::backend_events_dropped`). Nothing is
//! collected until the control side took the receiver ([`crate::Engine::take_backend_events`]).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use lb_core::health::BackendEvent;

use crate::shared::Shared;
use crate::stats::{self, WorkerCounters};

/// Batches (one per worker per tick at most) the channel holds before workers drop.
pub(crate) const CHANNEL_BATCHES: usize = 256;
/// Events one worker buffers between two ticks before it drops.
const BUFFER_EVENTS: usize = 8192;

/// The control side's end: batches of events in the order each worker saw them.
pub type BackendEvents = Receiver<Vec<BackendEvent>>;

/// One worker's buffer of events not yet flushed.
pub(crate) struct EventBuffer {
    pending: Vec<BackendEvent>,
    sender: SyncSender<Vec<BackendEvent>>,
}

impl EventBuffer {
    pub fn new(sender: SyncSender<Vec<BackendEvent>>) -> Self {
        EventBuffer { pending: Vec::new(), sender }
    }

    /// Buffers `event` if someone listens; drops and counts it when the buffer is full.
    pub fn record(&mut self, shared: &Shared, counters: &WorkerCounters, event: BackendEvent) {
        if !shared.backend_events_wanted.load(Ordering::Relaxed) {
            return;
        }
        if self.pending.len() >= BUFFER_EVENTS {
            stats::add(&counters.backend_events_dropped, 1);
            return;
        }
        self.pending.push(event);
    }

    /// Sends the buffered events as one batch without waiting; drops and counts them if the
    /// channel is full or closed.
    pub fn flush(&mut self, counters: &WorkerCounters) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        match self.sender.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(mut batch) | TrySendError::Disconnected(mut batch)) => {
                stats::add(&counters.backend_events_dropped, batch.len() as u64);
                batch.clear();
                // Keeps the allocation for the next tick.
                self.pending = batch;
            }
        }
    }
}
