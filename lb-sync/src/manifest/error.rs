//! Why a manifest load was refused, and where: every [`ManifestError`] names the file, the document in
//! it, the object (`Service ns/name`) when one could be identified, and the field or YAML position.
//!
//! These errors reject a whole load (the previous snapshot keeps serving); they are distinct from
//! `lb_core::BuildError`, which rejects one object while the rest of the snapshot still builds.
//! Nothing here may hide the reason: messages carry the parser's own text, positions included.

use std::fmt;
use std::io;
use std::path::PathBuf;

use lb_core::ObjectRef;

/// Where in the input an object or document came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based index of the YAML document (or JSON value) within the file, as a reader counts them.
    pub document: usize,
    /// Index into `items` when the object came out of a `kind: List` (or `ServiceList`, ...).
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, ", items[{item}]")?;
        }
        Ok(())
    }
}

/// A manifest file or directory that cannot be read (kept small: it is what the polling path returns).
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read: {reason}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    pub reason: io::Error,
}

/// A reason the manifests at a path cannot be loaded as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The path (or a file in the directory) cannot be read.
    #[error(transparent)]
    Io(#[from] ReadError),

    /// A file with nothing in it. Truncating a file is how an in-place write starts, so an empty file
    /// is taken for a write in progress rather than for "serve nothing" (a comment or `items: []` says
    /// that explicitly).
    #[error("{}: file is empty (a write in progress?); to serve nothing, put a comment or `kind: List` with `items: []` in it", path.display())]
    EmptyFile { path: PathBuf },

    /// Objects, but not one of a kind ringlb reads (`at` is the first): most likely the wrong file
    /// was saved, and loading it would serve nothing. Saying "nothing" explicitly is fine.
    #[error(
        "{at}: a {kind}, and no file holds a Service, EndpointSlice or Endpoints; to serve nothing, put a comment or `kind: List` with `items: []` in a file"
    )]
    OnlyOtherKinds { at: Location, kind: String },

    /// The text is not valid YAML (or JSON for `*.json` files).
    #[error("{at}: invalid {format}: {reason}")]
    Syntax {
        at: Location,
        format: &'static str,
        /// 1-based line and column of the error, when the parser reports one.
        line: Option<usize>,
        column: Option<usize>,
        reason: String,
    },

    /// A document that is not a Kubernetes object (a scalar, a sequence, no `kind`, ...).
    #[error("{at}: not a Kubernetes object: {reason}")]
    NotAnObject { at: Location, reason: String },

    /// A Service or EndpointSlice in an API version ringlb does not read.
    #[error("{at}: {object}: unsupported apiVersion {api_version:?} (ringlb reads {expected:?})")]
    UnsupportedApiVersion { at: Location, object: ObjectRef, api_version: String, expected: &'static str },

    /// A Service or EndpointSlice whose fields do not match the Kubernetes schema.
    #[error("{at}: {object}: field {field}: {reason}")]
    InvalidObject { at: Location, object: ObjectRef, field: String, reason: String },

    /// The same kind, namespace and name defined twice; which one is meant is ambiguous.
    #[error("{second}: {object} is defined twice (first in {first})")]
    Duplicate { object: ObjectRef, first: Location, second: Location },
}

impl ManifestError {
    /// The file the error is about.
    pub fn file(&self) -> &std::path::Path {
        match self {
            ManifestError::Io(error) => &error.path,
            ManifestError::EmptyFile { path } => path,
            ManifestError::Syntax { at, .. }
            | ManifestError::NotAnObject { at, .. }
            | ManifestError::OnlyOtherKinds { at, .. }
            | ManifestError::UnsupportedApiVersion { at, .. }
            | ManifestError::InvalidObject { at, .. } => &at.file,
            ManifestError::Duplicate { second, .. } => &second.file,
        }
    }

    /// The object the error is about, when it could be identified.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            ManifestError::UnsupportedApiVersion { object, .. }
            | ManifestError::InvalidObject { object, .. }
            | ManifestError::Duplicate { object, .. } => Some(object),
            ManifestError::Io(_)
            | ManifestError::EmptyFile { .. }
            | ManifestError::Syntax { .. }
            | ManifestError::NotAnObject { .. }
            | ManifestError::OnlyOtherKinds { .. } => None,
        }
    }
}

/// Displays a list of errors on one line, separated by `; ` (for log lines and [`crate::SyncError`]).
pub(crate) struct ErrorList<'a>(pub &'a [ManifestError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
