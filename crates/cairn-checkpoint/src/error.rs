use std::fmt;

/// Errors from checkpoint storage and formats. Every variant carries the object path or the
/// operator it concerns, so a message alone tells an operator what to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkpoint location string could not be understood.
    #[error("invalid checkpoint location {location:?}: {reason}")]
    InvalidLocation { location: String, reason: String },
    /// An object failed its checksum, was truncated, or had a bad header.
    #[error("corrupt checkpoint object {path}: {reason}")]
    Corrupt { path: String, reason: String },
    /// An object was written by a newer cairn with an unknown format version.
    #[error("object {path} has format version {found}, this build reads up to {supported}")]
    UnsupportedVersion { path: String, found: u16, supported: u16 },
    /// A conditional create found an object with different content: another writer got there first.
    #[error("conflict at {path}: {reason}")]
    Conflict { path: String, reason: String },
    /// Another live process holds the location.
    #[error("checkpoint location {location} is in use by another process ({holder}); stop it first, or wait {wait_s}s for its lease to expire if it died on another host")]
    Locked { location: String, holder: String, wait_s: u64 },
    /// This process lost its lease (another process took the location over).
    #[error("lost the lease on {location}: now held by {holder}")]
    LeaseLost { location: String, holder: String },
    /// An object was written by a lease holder that a newer epoch had fenced off.
    #[error("{path} is not accepted: written by lease epoch {epoch}, but {reason}")]
    Fenced { path: String, epoch: u64, reason: String },
    /// The stored graph and the code's graph disagree in a way that would mix old and new logic.
    #[error("incompatible change to stateful operator {operator:?}: {difference}")]
    Incompatible { operator: String, difference: String },
    /// Recovery found nothing it can trust.
    #[error("no usable checkpoint in {location}: {reason}")]
    Unrecoverable { location: String, reason: String },
    /// The object store failed.
    #[error("storage error on {path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: object_store::Error,
    },
    /// A local file-system operation outside the object store failed (sweeping debris).
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A record could not be encoded or decoded.
    #[error("cannot decode {path}: {reason}")]
    Decode { path: String, reason: String },
}

impl Error {
    pub(crate) fn storage(path: impl fmt::Display, source: object_store::Error) -> Self {
        Error::Storage { path: path.to_string(), source }
    }
    pub(crate) fn corrupt(path: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Error::Corrupt { path: path.to_string(), reason: reason.to_string() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
