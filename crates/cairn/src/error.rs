//! The public error type.

/// Errors from building or running a streaming job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job's configuration is invalid; nothing was started.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A checkpoint could not be read, written or trusted.
    #[error(transparent)]
    Checkpoint(#[from] cairn_checkpoint::Error),
    /// A state checkpoint could not be stored, after the store's retries; the job stopped.
    /// Nothing is lost: the previous checkpoint and the batch log still recover everything.
    /// `source` is the store's error as it was (a full disk, a refused credential, a lost lease).
    #[error("checkpoint writer failed: checkpoint after batch {batch}: {source}")]
    CheckpointWrite {
        /// The batch after which the checkpoint was cut.
        batch: cairn_checkpoint::BatchId,
        /// The store's error.
        source: std::sync::Arc<cairn_checkpoint::Error>,
    },
    /// The code's graph is not compatible with the graph stored in the checkpoint.
    #[error("incompatible change to stateful operator {operator:?}: {difference}")]
    Incompatible {
        /// The operator's stable name.
        operator: String,
        /// What changed, and what the user can do about it.
        difference: String,
    },
    /// A source failed to plan or read its input.
    #[error("source {source_name:?}: {message}")]
    Source {
        /// The source's name in the job.
        source_name: String,
        /// What failed.
        message: String,
        /// Whether the failure may heal by itself ([`crate::is_transient`]).
        transient: bool,
    },
    /// A sink failed; the batch was not committed and will be replayed on restart.
    #[error("sink {sink:?} failed in batch {batch}: {message}")]
    Sink {
        /// The sink's name.
        sink: String,
        /// The batch that was not committed.
        batch: cairn_checkpoint::BatchId,
        /// What the sink reported.
        message: String,
        /// Whether the failure may heal by itself ([`crate::is_transient`]).
        transient: bool,
    },
    /// State could not be encoded or decoded.
    #[error("state of operator {operator:?}: {message}")]
    State {
        /// The operator's stable name.
        operator: String,
        /// What failed.
        message: String,
    },
    /// A transient failure lasted longer than the job's outage budget (`max_outage`); the job
    /// stopped. Nothing is lost: a restart resumes from the checkpoint.
    #[error("gave up after {attempts} restart(s) over {:.1} s: {last}", waited.as_secs_f64())]
    Outage {
        /// Restarts made during the outage.
        attempts: u32,
        /// How long the job waited it out.
        waited: std::time::Duration,
        /// The last failure.
        last: Box<Error>,
    },
    /// The context was used in a way its lifecycle does not allow.
    #[error("{0}")]
    Lifecycle(String),
    /// A user function returned an error.
    #[error("user function failed: {0}")]
    User(String),
}

/// Result alias for cairn.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn state(operator: &str, message: impl std::fmt::Display) -> Self {
        Error::State { operator: operator.to_string(), message: message.to_string() }
    }
    pub(crate) fn source(name: &str, message: impl std::fmt::Display) -> Self {
        Error::Source { source_name: name.to_string(), message: message.to_string(), transient: false }
    }
    /// A source's own error, classified, with what the engine was doing (`reading ...`).
    pub(crate) fn source_failed(name: &str, doing: Option<String>, e: &crate::UserError) -> Self {
        let message = match doing {
            Some(d) => format!("{d}: {e}"),
            None => e.to_string(),
        };
        Error::Source { source_name: name.to_string(), message, transient: crate::is_transient(e.as_ref()) }
    }

    /// Whether the failure may heal by itself (a dependency briefly down or unreachable): the
    /// engine may wait and run the batch again from its checkpoint. Configuration, data,
    /// compatibility, state and lease errors are final.
    ///
    /// ```
    /// let e = cairn::Error::Config("bad".into());
    /// assert!(!e.is_transient());
    /// ```
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Source { transient, .. } | Error::Sink { transient, .. } => *transient,
            Error::Checkpoint(e) => e.is_transient(),
            Error::CheckpointWrite { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}
