//! Why an object (or one field of it) was rejected while building a snapshot. (TODO: helper fills in)

use crate::model::ObjectRef;

/// A rejected object or field. Rejections never stop the rest of the snapshot from building.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("{object}: field {field}: {reason}")]
    InvalidField { object: ObjectRef, field: String, reason: String },
}
