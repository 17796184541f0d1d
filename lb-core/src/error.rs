//! Why an object, or one field of it, was rejected while building a snapshot.
//!
//! Every variant names the object and the field path at fault (`spec.ports[1].port`,
//! `metadata.annotations["ringlb.io/weight"]`, `endpoints[0].addresses[0]`) plus the offending value,
//! so one log line is enough to fix the manifest. A rejection never stops the rest of the snapshot from
//! building; what it costs (a whole Service, one endpoint, one VIP key) is documented per variant.

use serde::ser::SerializeStruct;

use crate::model::{ObjectRef, VipKey};

/// A rejected object or field. See the module doc.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// `metadata.name` is missing or empty: the object cannot be identified and is ignored.
    #[error("{object}: field {field}: missing name")]
    MissingName { object: ObjectRef, field: String },
    /// Two objects of the same kind share a namespace and name; all copies are rejected because no
    /// order-independent choice between them exists.
    #[error("{object}: appears more than once in the input")]
    DuplicateObject { object: ObjectRef },
    /// An address that is not an IP, or one that cannot be served (unspecified, multicast).
    #[error("{object}: field {field}: invalid IP address {value:?}: {reason}")]
    InvalidIp { object: ObjectRef, field: String, value: String, reason: &'static str },
    /// A port outside 1..=65535 (or unset where one is required).
    #[error("{object}: field {field}: invalid port {value} (must be 1..=65535)")]
    InvalidPort { object: ObjectRef, field: String, value: i64 },
    /// A protocol other than TCP, UDP or SCTP.
    #[error("{object}: field {field}: unknown protocol {value:?} (known: TCP, UDP, SCTP)")]
    UnknownProtocol { object: ObjectRef, field: String, value: String },
    /// A ringlb or MetalLB annotation whose value does not parse or is out of range.
    #[error("{object}: annotation {annotation}: invalid value {value:?}: {reason}")]
    InvalidAnnotation { object: ObjectRef, annotation: &'static str, value: String, reason: String },
    /// Any other field whose value Kubernetes would not accept either.
    #[error("{object}: field {field}: invalid value {value:?}: {reason}")]
    InvalidField { object: ObjectRef, field: String, value: String, reason: String },
    /// `key` is claimed by `object` but served by `owner` (which owned it before, or is older). Only
    /// this key of `object` is not served; its other keys are.
    #[error("{object}: {key} is already served by {owner}; not served for this Service")]
    ConflictingVip { object: ObjectRef, owner: ObjectRef, key: VipKey },
    /// `spec.healthCheckNodePort` `port` is claimed by `object` but answered for `owner` (which had
    /// it before, or comes first by namespace/name). Only the health check of `object` is lost; its
    /// VIPs are served.
    #[error(
        "{object}: healthCheckNodePort {port} is already answered for {owner}; not answered for this Service"
    )]
    ConflictingHealthCheckNodePort { object: ObjectRef, owner: ObjectRef, port: u16 },
}

impl BuildError {
    /// The object at fault.
    pub fn object(&self) -> &ObjectRef {
        match self {
            BuildError::MissingName { object, .. }
            | BuildError::DuplicateObject { object }
            | BuildError::InvalidIp { object, .. }
            | BuildError::InvalidPort { object, .. }
            | BuildError::UnknownProtocol { object, .. }
            | BuildError::InvalidAnnotation { object, .. }
            | BuildError::InvalidField { object, .. }
            | BuildError::ConflictingVip { object, .. }
            | BuildError::ConflictingHealthCheckNodePort { object, .. } => object,
        }
    }

    /// The field path at fault, as written in the object (`spec.ports[0].port`).
    pub fn field(&self) -> String {
        match self {
            BuildError::MissingName { field, .. }
            | BuildError::InvalidIp { field, .. }
            | BuildError::InvalidPort { field, .. }
            | BuildError::UnknownProtocol { field, .. }
            | BuildError::InvalidField { field, .. } => field.clone(),
            BuildError::DuplicateObject { .. } => "metadata.name".to_owned(),
            BuildError::InvalidAnnotation { annotation, .. } => {
                format!("metadata.annotations[{annotation:?}]")
            }
            BuildError::ConflictingVip { .. } => "spec".to_owned(),
            BuildError::ConflictingHealthCheckNodePort { .. } => "spec.healthCheckNodePort".to_owned(),
        }
    }

    /// A short stable name of the variant, for JSON output and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            BuildError::MissingName { .. } => "missing-name",
            BuildError::DuplicateObject { .. } => "duplicate-object",
            BuildError::InvalidIp { .. } => "invalid-ip",
            BuildError::InvalidPort { .. } => "invalid-port",
            BuildError::UnknownProtocol { .. } => "unknown-protocol",
            BuildError::InvalidAnnotation { .. } => "invalid-annotation",
            BuildError::InvalidField { .. } => "invalid-field",
            BuildError::ConflictingVip { .. } => "conflicting-vip",
            BuildError::ConflictingHealthCheckNodePort { .. } => "conflicting-health-check-node-port",
        }
    }
}

/// JSON shape for `ringlb check --json`: `{kind, object, field, message}`.
impl serde::Serialize for BuildError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("BuildError", 4)?;
        s.serialize_field("kind", self.kind())?;
        s.serialize_field("object", self.object())?;
        s.serialize_field("field", &self.field())?;
        s.serialize_field("message", &self.to_string())?;
        s.end()
    }
}
