//! Where a source hands its snapshots: the [`SnapshotSink`] trait and the implementations ringlb and
//! its tests use (an `ArcSwap` the datapath loads from, and channels).
//!
//! A sink must return quickly and never block on the datapath: `publish` runs on the control thread
//! between reloads. Sources only publish snapshots that differ from the previous one, with a higher
//! version, so a sink may treat every call as a real change.

use std::sync::Arc;

use arc_swap::ArcSwap;
use lb_core::Snapshot;

/// Receives each new snapshot a source builds.
pub trait SnapshotSink: Send + Sync + 'static {
    fn publish(&self, snapshot: Arc<Snapshot>);
}

impl<S: SnapshotSink> SnapshotSink for Arc<S> {
    fn publish(&self, snapshot: Arc<Snapshot>) {
        S::publish(self, snapshot);
    }
}

/// The datapath's shared table: readers `load()` it without locks.
impl SnapshotSink for ArcSwap<Snapshot> {
    fn publish(&self, snapshot: Arc<Snapshot>) {
        self.store(snapshot);
    }
}

/// A closed receiver only means nobody listens any more (e.g. a test that finished); not an error.
impl SnapshotSink for tokio::sync::mpsc::UnboundedSender<Arc<Snapshot>> {
    fn publish(&self, snapshot: Arc<Snapshot>) {
        if self.send(snapshot).is_err() {
            tracing::debug!("snapshot receiver dropped; snapshot discarded");
        }
    }
}

impl SnapshotSink for std::sync::mpsc::Sender<Arc<Snapshot>> {
    fn publish(&self, snapshot: Arc<Snapshot>) {
        if self.send(snapshot).is_err() {
            tracing::debug!("snapshot receiver dropped; snapshot discarded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arc_swap_sink_replaces_the_served_snapshot() {
        let table = Arc::new(ArcSwap::from_pointee(Snapshot::empty()));
        table.publish(Arc::new(Snapshot::from_entries(7, [])));
        assert_eq!(table.load().version, 7);
    }

    #[test]
    fn channel_sink_survives_a_dropped_receiver() {
        let (sender, receiver) = std::sync::mpsc::channel();
        drop(receiver);
        sender.publish(Arc::new(Snapshot::empty()));
    }
}
