//! The records stored in a checkpoint location. Encodings live in [`crate::codec`]; the layout is
//! documented in `docs/checkpoint-format.md`.

use serde::{Deserialize, Serialize};

/// The version written into every object header. Readers accept any version up to this one.
/// Version 2 added the writer's lease epoch to plans, commits and state checkpoints, and the
/// per-epoch lease objects; version 1 objects read as epoch 0.
pub const FORMAT_VERSION: u16 = 2;

/// A lease epoch: every process that takes the location gets the next one (1, 2, ...). Objects
/// written before epochs existed (format version 1) carry epoch 0.
pub type Epoch = u64;

/// A batch's id: 0, 1, 2, ... Replays reuse the id, so sinks can deduplicate on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchId(pub u64);

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Written once, when a job first starts on an empty location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMetadata {
    pub format_version: u16,
    pub app_name: String,
    /// Random id given to this job at creation; appears in leases and logs.
    pub job_id: String,
    pub created_ms: i64,
    /// The batch interval is pinned: batch times of replays and windows depend on it.
    pub batch_interval_ms: u64,
    /// Batch time of batch 0; batch times are laid on the grid `start_time_ms + k * interval`.
    pub start_time_ms: i64,
    pub graph: GraphDescription,
}

/// The stateful part of a job's graph: what the checkpoint's state means.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphDescription {
    pub operators: Vec<OperatorDescription>,
    /// Partitions of keyed state when written. Informational: state is redistributed on load.
    pub parallelism: u32,
}

/// One stateful operator (or source) as the checkpoint knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorDescription {
    /// The stable, user-given name: the operator's id in checkpoints.
    pub name: String,
    /// e.g. `map_with_state`, `window`, `source`.
    pub kind: String,
    /// Rust type name of the key (empty when the operator is not keyed).
    pub key_type: String,
    /// Rust type name of the stored state value.
    pub state_type: String,
    /// User-controlled schema version of the state value.
    pub state_version: u32,
}

/// A half-open range of offsets `[start, end)` of one source partition. For a file source the
/// partition is the file's name and the range its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRange {
    pub partition: String,
    pub start: u64,
    pub end: u64,
}

/// What one source contributes to a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePlan {
    pub source: String,
    pub ranges: Vec<OffsetRange>,
}

/// The planned input of a batch, logged durably before the batch runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    pub batch_id: BatchId,
    pub batch_time_ms: i64,
    pub planned_at_ms: i64,
    pub sources: Vec<SourcePlan>,
    /// The commit record of the previous batch. A plan is only written once the previous batch's
    /// sinks have finished, so carrying that batch's commit here saves one object per batch; a
    /// standalone `.commit` object is written only for the last batch before a stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_commit: Option<BatchCommit>,
    /// The lease epoch of the writer (stamped by the store; 0 in format version 1).
    #[serde(default)]
    pub epoch: Epoch,
}

/// Logged after every sink of a batch has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCommit {
    pub batch_id: BatchId,
    pub committed_at_ms: i64,
    pub input_records: u64,
    pub processing_ms: u64,
    /// The lease epoch of the writer (stamped by the store; 0 in format version 1).
    #[serde(default)]
    pub epoch: Epoch,
}

/// Whether a state checkpoint holds everything, or only the keys changed since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointKind {
    Full,
    /// Changes since the checkpoint taken after batch `parent`.
    Delta {
        parent: BatchId,
    },
}

/// State as of the end of batch `batch_id`, for every stateful operator and source, in one object.
#[derive(Debug, Clone, PartialEq)]
pub struct StateCheckpoint {
    pub batch_id: BatchId,
    pub kind: CheckpointKind,
    pub created_ms: i64,
    /// The graph that wrote it; compared with the code's graph at restart.
    pub graph: GraphDescription,
    /// One table per operator state (and per source's positions), identified by `TableData::id`.
    pub tables: Vec<crate::TableData>,
    /// The lease epoch of the writer (stamped by the store; 0 in format version 1).
    pub epoch: Epoch,
}

/// Who holds a checkpoint location in one epoch. Stored as `lease/<epoch>.claim` (created once)
/// and `lease/<epoch>.heartbeat` (rewritten by its holder only); format version 1 kept one
/// `_lease` object, which is no longer read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Unique per acquisition: tells a retried claim that landed from another process's claim.
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    pub ttl_ms: u64,
    /// The epoch this record claims (0 in format version 1).
    #[serde(default)]
    pub epoch: Epoch,
    /// Set by a holder that gave the location back: the next process need not wait for the TTL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

/// Written once by a new holder right after its claim (`lease/<epoch>.fence`): objects of older
/// epochs about batch `from_batch` or later are not accepted (see [`crate::protocol::fenced`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub epoch: Epoch,
    /// One past the newest batch any object of the location concerned when the holder listed it
    /// (after its claim existed).
    pub from_batch: BatchId,
    /// The claim's owner, so a retried create that landed is recognised.
    pub owner: String,
}
