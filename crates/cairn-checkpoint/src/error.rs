use std::fmt;

/// Errors from checkpoint storage and formats. Every variant carries the object path or the
/// operator it concerns, so a message alone tells an operator what to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkpoint location string could not be understood.
    #[error("invalid checkpoint location {location:?}: {reason}")]
    InvalidLocation {
        /// The location string as given.
        location: String,
        /// Why it was refused (unknown scheme, not an absolute path, a directory that cannot be
        /// created, a cloud client that cannot be configured).
        reason: String,
    },
    /// An object failed its checksum, was truncated, or had a bad header.
    #[error("corrupt checkpoint object {path}: {reason}")]
    Corrupt {
        /// The object's path in the location.
        path: String,
        /// What failed to verify (checksum, length, magic, kind, a name that does not match the
        /// content, or that the object is missing).
        reason: String,
    },
    /// An object was written by a newer cairn with an unknown format version.
    #[error("object {path} has format version {found}, this build reads up to {supported}")]
    UnsupportedVersion {
        /// The object's path in the location.
        path: String,
        /// The format version in the object's header (0, never written, is refused too).
        found: u16,
        /// The newest format version this build reads ([`crate::FORMAT_VERSION`]).
        supported: u16,
    },
    /// A conditional create found an object with different content: another writer got there first.
    #[error("conflict at {path}: {reason}")]
    Conflict {
        /// The path of the existing object in the location.
        path: String,
        /// How the existing object differs from what this process meant to write.
        reason: String,
    },
    /// Another live process holds the location.
    #[error("checkpoint location {location} is in use by another process ({holder}); stop it first, or wait {wait_s}s for its lease to expire if it died on another host")]
    Locked {
        /// The checkpoint location as given.
        location: String,
        /// The holder: its lease epoch, pid, host and the age of its last heartbeat.
        holder: String,
        /// Seconds (rounded up) until the holder's lease expires by its TTL, if it stops
        /// heartbeating.
        wait_s: u64,
    },
    /// This process lost its lease (another process took the location over).
    #[error("lost the lease on {location}: now held by {holder}")]
    LeaseLost {
        /// The checkpoint location as given.
        location: String,
        /// The new holder: its lease epoch, pid and host (or the epoch alone when its claim
        /// cannot be read).
        holder: String,
    },
    /// An object was written by a lease holder that a newer epoch had fenced off.
    #[error("{path} is not accepted: written by lease epoch {epoch}, but {reason}")]
    Fenced {
        /// The object's path in the location.
        path: String,
        /// The lease epoch that wrote the object.
        epoch: u64,
        /// Which newer epoch fenced that writer off, and from which batch on.
        reason: String,
    },
    /// The stored graph and the code's graph disagree in a way that would mix old and new logic.
    #[error("incompatible change to stateful operator {operator:?}: {difference}")]
    Incompatible {
        /// The operator's stable name.
        operator: String,
        /// What changed, in words (kind, key or state type, state version, or a removed operator).
        difference: String,
    },
    /// Recovery found nothing it can trust.
    #[error("no usable checkpoint in {location}: {reason}")]
    Unrecoverable {
        /// The checkpoint location as given.
        location: String,
        /// What is damaged or missing, and what the operator can do about it.
        reason: String,
    },
    /// The object store failed.
    #[error("storage error on {path}: {source}")]
    Storage {
        /// The path of the object (or the location, for a listing) the request was about.
        path: String,
        /// The object store's error, after retries.
        #[source]
        source: object_store::Error,
    },
    /// A local file-system operation outside the object store failed (sweeping debris).
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The local directory being swept.
        path: String,
        /// The file system's error.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be encoded or decoded.
    #[error("cannot decode {path}: {reason}")]
    Decode {
        /// The object's path in the location; for data that is not an object, what it is
        /// (`table <id>` for an entry of a state table).
        path: String,
        /// What could not be decoded, with the byte position where the decoder stopped when it
        /// knows it.
        reason: String,
    },
}

impl Error {
    /// Whether the failure may heal by itself: the object store was unreachable or failing
    /// (after the store's own retries), not an answer about the data, the configuration or the
    /// lease. A job may wait out such a failure and run the batch again.
    ///
    /// ```
    /// use cairn_checkpoint::Error;
    /// let locked = Error::Locked { location: "l".into(), holder: "pid 1".into(), wait_s: 3 };
    /// assert!(!locked.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Storage { source, .. } => crate::retry::is_transient(source),
            _ => false,
        }
    }

    pub(crate) fn storage(path: impl fmt::Display, source: object_store::Error) -> Self {
        Error::Storage { path: path.to_string(), source }
    }
    pub(crate) fn corrupt(path: impl fmt::Display, reason: impl fmt::Display) -> Self {
        Error::Corrupt { path: path.to_string(), reason: reason.to_string() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
