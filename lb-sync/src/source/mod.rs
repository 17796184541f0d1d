//! Where the objects come from. A [`Source`] watches its objects (files, the Kubernetes API) and
//! reports what changed, in batches, to the control loop ([`crate::ControlLoop`]) through a
//! [`SourceHandle`]; it never builds, versions or publishes anything itself.
//!
//! Contract: the first batch is the source's complete view (the control loop publishes the first
//! snapshot from it, and `/readyz` turns ready); a source that cannot produce it returns an error
//! instead, and the control loop fails with it. After that, a source keeps reporting until the
//! handle says the control loop is gone; trouble it can recover from (an unreadable edit, a watch
//! cut) is its own to log and retry, while the table keeps serving.

mod kube;
mod manifest;
mod watch;

use std::future::Future;
use std::path::PathBuf;

pub use kube::KubeSource;
pub use manifest::{DEFAULT_DEBOUNCE, DEFAULT_MAX_DELAY, DEFAULT_POLL_INTERVAL, ManifestSource};

use crate::control::SourceHandle;
use crate::manifest::{ErrorList, ManifestError};

/// A source of Service, EndpointSlice and Endpoints objects. See the module doc.
pub trait Source {
    /// Reports the first complete view, then every change, until the control loop is gone.
    fn run(self, handle: SourceHandle) -> impl Future<Output = Result<(), SyncError>>;
}

/// Why a source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The manifests could not be loaded at start-up; there is no previous snapshot to keep.
    #[error("initial load of manifests from {} failed: {}", path.display(), ErrorList(errors))]
    InitialLoad { path: PathBuf, errors: Vec<ManifestError> },
    /// The start-up load did not complete (the blocking task was lost, e.g. it panicked).
    #[error("initial load of manifests from {} did not complete: {reason}", path.display())]
    LoaderFailed { path: PathBuf, reason: String },
}
