//! What the datapath tells the control plane about backends: one [`BackendEvent`] per connect
//! outcome or backend reset, batched per worker and fed to the Service's [`super::OutlierDetector`].
//!
//! Plain data (no I/O, no clock): the datapath produces it, the control thread maps the VIP key to
//! its Service through the current snapshot. Events for keys or backends no longer served are simply
//! ignored there, so a late batch can never eject anything that was not eligible.

use crate::model::{BackendId, VipKey};

/// What happened to one backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendOutcome {
    /// The connect succeeded (counts as a success for outlier detection).
    Connected,
    /// The connect was refused, unreachable or timed out.
    ConnectFailed,
    /// The backend reset an established connection.
    Reset,
}

impl BackendOutcome {
    /// Whether this outcome counts towards an ejection.
    pub fn is_failure(self) -> bool {
        !matches!(self, BackendOutcome::Connected)
    }
}

/// One outcome of a connection from VIP `key` to `backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendEvent {
    pub key: VipKey,
    pub backend: BackendId,
    pub outcome: BackendOutcome,
}
