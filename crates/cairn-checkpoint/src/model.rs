//! The records stored in a checkpoint location. Encodings live in [`crate::codec`]; the layout is
//! documented in `docs/checkpoint-format.md`.

use serde::{Deserialize, Serialize};

/// The version written into every object header. Readers accept any version up to this one.
/// Version 2 added the writer's lease epoch to plans, commits and state checkpoints, and the
/// per-epoch lease objects; version 1 objects read as epoch 0. Version 3 types source
/// partitions ([`SourcePartition`]): a Kafka partition is `{topic, partition}` in plans and in
/// the `$positions/<source>` tables, where versions 1 and 2 kept a `"topic-partition"` string
/// (in `$source/<source>` tables), which a source maps with `Source::legacy_partition`.
/// Version 4 adds the scaled-out layout: a job that runs on several processes keeps one complete
/// location per task under `tasks/<task>/` ([`crate::paths::task_location`]); the objects
/// themselves are laid out as in version 3. Version 5 moves a scaled-out task's plans and deltas
/// into the member logs of the processes that ran it ([`crate::member_log`]); single-process
/// locations are laid out as in version 4.
pub const FORMAT_VERSION: u16 = 5;

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
    /// The [`FORMAT_VERSION`] of the release that created the location. Informational: readers
    /// go by the version in each object's header.
    pub format_version: u16,
    /// The application's name as configured when the job was created.
    pub app_name: String,
    /// Random id given to this job at creation; appears in leases and logs.
    pub job_id: String,
    /// Wall-clock time the location was initialised, in milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The batch interval is pinned: batch times of replays and windows depend on it.
    pub batch_interval_ms: u64,
    /// Batch time of batch 0; batch times are laid on the grid `start_time_ms + k * interval`.
    pub start_time_ms: i64,
    /// The stateful graph when the job was created; later checkpoints carry their own.
    pub graph: GraphDescription,
}

/// The stateful part of a job's graph: what the checkpoint's state means.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphDescription {
    /// Every stateful operator and every source, each once, by its stable name.
    pub operators: Vec<OperatorDescription>,
    /// Partitions of keyed state when written. Informational: state is redistributed on load.
    pub parallelism: u32,
}

/// The kinds of stateful operator (and sources) a checkpoint describes. Stored as a string, so a
/// kind written by a newer release reads back as [`OperatorKind::Other`] rather than failing.
///
/// ```
/// use cairn_checkpoint::OperatorKind;
/// assert_eq!(OperatorKind::from("map_with_state".to_string()), OperatorKind::MapWithState);
/// assert_eq!(OperatorKind::Window.as_str(), "window");
/// assert_eq!(OperatorKind::from("join_with_state".to_string()).as_str(), "join_with_state");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum OperatorKind {
    /// A source's positions.
    Source,
    /// `map_with_state`.
    MapWithState,
    /// `update_state_by_key` (either flavour: both store the same table).
    UpdateStateByKey,
    /// `window`.
    Window,
    /// `reduce_by_key_and_window` (and `count_by_window`, built on it).
    ReduceByKeyAndWindow,
    /// A kind this release does not know.
    Other(String),
}

impl OperatorKind {
    /// The stored name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Source => "source",
            Self::MapWithState => "map_with_state",
            Self::UpdateStateByKey => "update_state_by_key",
            Self::Window => "window",
            Self::ReduceByKeyAndWindow => "reduce_by_key_and_window",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for OperatorKind {
    fn from(s: String) -> Self {
        match s.as_str() {
            "source" => Self::Source,
            "map_with_state" => Self::MapWithState,
            "update_state_by_key" => Self::UpdateStateByKey,
            "window" => Self::Window,
            "reduce_by_key_and_window" => Self::ReduceByKeyAndWindow,
            _ => Self::Other(s),
        }
    }
}

impl From<OperatorKind> for String {
    fn from(k: OperatorKind) -> Self {
        k.as_str().to_string()
    }
}

impl std::fmt::Display for OperatorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stateful operator (or source) as the checkpoint knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorDescription {
    /// The stable, user-given name: the operator's id in checkpoints.
    pub name: String,
    /// What the operator is (stored as its name: `map_with_state`, `window`, `source`, ...).
    pub kind: OperatorKind,
    /// Identity of the key type: [`StateSchema::type_text`](crate::schema::StateSchema::type_text)
    /// (`name#fingerprint rust::type::path`). Checkpoints written before schema identities hold
    /// the Rust type path alone; sources hold an empty string.
    pub key_type: String,
    /// Identity of the stored state value, in the same form (`offsets` for a source).
    pub state_type: String,
    /// User-controlled schema version of the state value (`OpName::with_version`).
    pub state_version: u32,
    /// The key type's structure, for tools that read and write state as data
    /// ([`crate::typed`]); absent in checkpoints written before it was stored and for sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_shape: Option<crate::schema::TypeShape>,
    /// The state type's structure, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_shape: Option<crate::schema::TypeShape>,
    /// How state values are encoded (`compact`, the default, absent; or `json`).
    #[serde(default, skip_serializing_if = "StateEncoding::is_compact")]
    pub state_encoding: StateEncoding,
    /// Names this operator had before (`OpName::renamed_from`): a stored operator of such a
    /// name is this one, its state restored under the new name. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renamed_from: Vec<String>,
    /// Older state versions the code can convert from (`OpName::migrate_from`). Describes the
    /// code, not the stored state: a job's printed graph carries it so that `cairn checkpoint
    /// diff` can tell a migrated operator from a refused one. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<MigrationSource>,
}

/// How a keyed operator's state values are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateEncoding {
    /// postcard: small and fast, but positional: a changed type is a migration.
    #[default]
    Compact,
    /// JSON with field names: a field added with `#[serde(default)]` (or removed) reads old
    /// values as they are, so such a change needs no migration.
    Json,
}

impl StateEncoding {
    /// Whether this is the default encoding.
    pub fn is_compact(&self) -> bool {
        *self == StateEncoding::Compact
    }
}

impl std::fmt::Display for StateEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateEncoding::Compact => "compact",
            StateEncoding::Json => "json",
        })
    }
}

/// What a declared state migration reads: an older state version and that version's state type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSource {
    /// The state version it converts from.
    pub from_version: u32,
    /// The identity of the state type at that version (as [`OperatorDescription::state_type`]).
    pub state_type: String,
}

impl MigrationSource {
    /// Whether this migration reads the state `stored` describes: the same version, and a state
    /// type of the same shape.
    pub fn reads(&self, stored: &OperatorDescription) -> bool {
        stored.state_version == self.from_version
            && stored.state_identity().matches(&crate::schema::TypeIdentity::parse(&self.state_type))
    }
}

impl OperatorDescription {
    /// The key type's identity, parsed.
    ///
    /// ```
    /// use cairn_checkpoint::{schema::TypeIdentity, OperatorDescription};
    /// let d = OperatorDescription { name: "in".into(), kind: cairn_checkpoint::OperatorKind::Source, key_type: String::new(),
    ///     state_type: "offsets".into(), state_version: 1, key_shape: None, state_shape: None, state_encoding: Default::default(), renamed_from: vec![], migrations: vec![] };
    /// assert_eq!(d.key_identity(), TypeIdentity::Legacy(""));
    /// assert_eq!(d.state_identity(), TypeIdentity::Legacy("offsets"));
    /// ```
    pub fn key_identity(&self) -> crate::schema::TypeIdentity<'_> {
        crate::schema::TypeIdentity::parse(&self.key_type)
    }

    /// The state type's identity, parsed.
    pub fn state_identity(&self) -> crate::schema::TypeIdentity<'_> {
        crate::schema::TypeIdentity::parse(&self.state_type)
    }

    /// The state's schema with its version, when the description has one (not for sources and
    /// checkpoints written before schema identities).
    ///
    /// ```
    /// use cairn_checkpoint::{schema::StateSchema, OperatorDescription};
    /// let schema = StateSchema::of::<(u64, i64)>();
    /// let d = OperatorDescription { name: "totals".into(), kind: cairn_checkpoint::OperatorKind::MapWithState,
    ///     key_type: StateSchema::of::<u64>().type_text("u64"),
    ///     state_type: schema.type_text("(u64, i64)"), state_version: 2, key_shape: None, state_shape: None, state_encoding: Default::default(), renamed_from: vec![], migrations: vec![] };
    /// assert_eq!(d.state_schema(), Some(schema.with_version(2)));
    /// ```
    pub fn state_schema(&self) -> Option<crate::schema::StateSchema> {
        match self.state_identity() {
            crate::schema::TypeIdentity::Schema { name, fingerprint, .. } => {
                Some(crate::schema::StateSchema {
                    name: name.to_string(),
                    version: self.state_version,
                    fingerprint,
                })
            }
            crate::schema::TypeIdentity::Legacy(_) => None,
        }
    }
}

/// One partition of a source's input: what a source's offsets are positions in.
///
/// In plans (JSON) a named partition is a string and a topic's partition an object
/// `{"topic": .., "partition": ..}`; in positions tables (binary) an enum tag comes first.
///
/// ```
/// use cairn_checkpoint::SourcePartition;
/// let p = SourcePartition::topic("orders-eu", 3);
/// assert_eq!(p.to_string(), "orders-eu[3]");
/// let json = serde_json::to_string(&p).unwrap();
/// assert_eq!(json, r#"{"topic":"orders-eu","partition":3}"#);
/// assert_eq!(serde_json::from_str::<SourcePartition>(&json).unwrap(), p);
/// assert_eq!(serde_json::from_str::<SourcePartition>(r#""in-000.txt""#).unwrap(), SourcePartition::named("in-000.txt"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourcePartition {
    /// A partition a source names itself: a file's name, a generator's key.
    Named(String),
    /// A partition of a topic (Kafka).
    Topic {
        /// The topic's name.
        topic: String,
        /// The partition's number within the topic.
        partition: i32,
    },
}

impl SourcePartition {
    /// A partition the source names itself.
    pub fn named(name: impl Into<String>) -> Self {
        Self::Named(name.into())
    }
    /// Partition `partition` of `topic`.
    pub fn topic(topic: impl Into<String>, partition: i32) -> Self {
        Self::Topic { topic: topic.into(), partition }
    }
    /// The name of a named partition; `None` for a topic's partition.
    pub fn as_named(&self) -> Option<&str> {
        match self {
            Self::Named(n) => Some(n),
            Self::Topic { .. } => None,
        }
    }
}

impl SourcePartition {
    /// The partition as a key of a `$positions/<source>` table: a tag byte, then for a named
    /// partition its UTF-8 name, for a topic's partition the number (i32, little-endian) and
    /// then the topic's UTF-8 name. Keys of one source sort by tag, then as bytes.
    ///
    /// ```
    /// use cairn_checkpoint::SourcePartition;
    /// let p = SourcePartition::topic("t", 2);
    /// assert_eq!(p.key_bytes(), [1, 2, 0, 0, 0, b't']);
    /// assert_eq!(SourcePartition::from_key_bytes(&p.key_bytes()), Some(p));
    /// assert_eq!(SourcePartition::from_key_bytes(&[7]), None);
    /// ```
    pub fn key_bytes(&self) -> Vec<u8> {
        match self {
            Self::Named(n) => [&[0u8][..], n.as_bytes()].concat(),
            Self::Topic { topic, partition } => {
                [&[1u8][..], &partition.to_le_bytes(), topic.as_bytes()].concat()
            }
        }
    }

    /// Inverse of [`SourcePartition::key_bytes`]; `None` for bytes no version wrote.
    pub fn from_key_bytes(b: &[u8]) -> Option<Self> {
        match b.split_first()? {
            (0, name) => Some(Self::Named(std::str::from_utf8(name).ok()?.to_string())),
            (1, rest) if rest.len() >= 4 => {
                let (p, topic) = rest.split_at(4);
                let partition = i32::from_le_bytes(p.try_into().ok()?);
                Some(Self::Topic { topic: std::str::from_utf8(topic).ok()?.to_string(), partition })
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for SourcePartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Named(n) => f.write_str(n),
            Self::Topic { topic, partition } => write!(f, "{topic}[{partition}]"),
        }
    }
}

impl From<&str> for SourcePartition {
    fn from(name: &str) -> Self {
        Self::named(name)
    }
}

/// How [`SourcePartition`] reads in JSON: a bare string is a named partition (and every
/// partition of format versions 1 and 2), an object a topic's partition.
#[derive(Deserialize)]
#[serde(untagged)]
enum ReadablePartition {
    Named(String),
    Topic { topic: String, partition: i32 },
}

/// How [`SourcePartition`] is stored in binary encodings, which cannot guess a shape.
#[derive(Deserialize)]
enum CompactPartition {
    Named(String),
    Topic(String, i32),
}

impl Serialize for SourcePartition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{SerializeStruct, SerializeTupleVariant};
        // The shapes and variant indices of `ReadablePartition` and `CompactPartition`.
        match (self, s.is_human_readable()) {
            (Self::Named(n), true) => s.serialize_str(n),
            (Self::Named(n), false) => s.serialize_newtype_variant("SourcePartition", 0, "Named", n),
            (Self::Topic { topic, partition }, true) => {
                let mut st = s.serialize_struct("SourcePartition", 2)?;
                st.serialize_field("topic", topic)?;
                st.serialize_field("partition", partition)?;
                st.end()
            }
            (Self::Topic { topic, partition }, false) => {
                let mut tv = s.serialize_tuple_variant("SourcePartition", 1, "Topic", 2)?;
                tv.serialize_field(topic)?;
                tv.serialize_field(partition)?;
                tv.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for SourcePartition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(if d.is_human_readable() {
            match ReadablePartition::deserialize(d)? {
                ReadablePartition::Named(n) => Self::Named(n),
                ReadablePartition::Topic { topic, partition } => Self::Topic { topic, partition },
            }
        } else {
            match CompactPartition::deserialize(d)? {
                CompactPartition::Named(n) => Self::Named(n),
                CompactPartition::Topic(topic, partition) => Self::Topic { topic, partition },
            }
        })
    }
}

/// A half-open range of offsets `[start, end)` of one source partition. For a file source the
/// partition is the file's name and the range its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetRange {
    /// The source partition the range is of (for a file source, the file's name).
    pub partition: SourcePartition,
    /// First offset of the range (inclusive).
    pub start: u64,
    /// One past the last offset of the range (exclusive); `start == end` is an empty range.
    pub end: u64,
}

/// What one source contributes to a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePlan {
    /// The source's stable name, as in the graph description.
    pub source: String,
    /// The offset ranges the batch reads, per partition (a large file may be split into several).
    pub ranges: Vec<OffsetRange>,
}

/// The planned input of a batch, logged durably before the batch runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// The batch this plan is for; a replay reuses it.
    pub batch_id: BatchId,
    /// The batch's time on the job's batch grid, in milliseconds since the Unix epoch; a replay
    /// runs with this time, not the current one.
    pub batch_time_ms: i64,
    /// Wall-clock time the plan was made, in milliseconds since the Unix epoch. Informational.
    pub planned_at_ms: i64,
    /// The input of the batch, per source.
    pub sources: Vec<SourcePlan>,
    /// The commit record of the previous batch. A plan is only written once the previous batch's
    /// sinks have finished, so carrying that batch's commit here saves one object per batch; a
    /// standalone `.commit` object is written only for the last batch before a stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_commit: Option<BatchCommit>,
    /// A copy of the previous batch's plan, so that no single damaged or missing plan object
    /// loses the input of a batch recovery must replay: a plan is rebuilt from its successor's
    /// copy. Absent on batch 0 and in plans written before copies existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_plan: Option<PlanCopy>,
    /// The lease epoch of the writer (stamped by the store; 0 in format version 1).
    #[serde(default)]
    pub epoch: Epoch,
}

/// What a plan carries of its predecessor: everything needed to re-run that batch exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanCopy {
    /// The original plan's [`BatchPlan::batch_time_ms`].
    pub batch_time_ms: i64,
    /// The original plan's [`BatchPlan::planned_at_ms`].
    pub planned_at_ms: i64,
    /// The original plan's input, per source.
    pub sources: Vec<SourcePlan>,
    /// The epoch that wrote the original plan: a rebuilt plan is accepted or fenced off like the
    /// original would have been.
    #[serde(default)]
    pub epoch: Epoch,
}

impl BatchPlan {
    /// The copy of this plan that its successor carries.
    pub fn copy(&self) -> PlanCopy {
        PlanCopy {
            batch_time_ms: self.batch_time_ms,
            planned_at_ms: self.planned_at_ms,
            sources: self.sources.clone(),
            epoch: self.epoch,
        }
    }

    /// Rebuilds the plan of batch `batch_id` from the copy its successor carried. The rebuilt plan
    /// has no `previous_commit` (committedness is decided from the listing) and no copy of its own
    /// predecessor.
    pub fn from_copy(batch_id: BatchId, copy: PlanCopy) -> Self {
        Self {
            batch_id,
            batch_time_ms: copy.batch_time_ms,
            planned_at_ms: copy.planned_at_ms,
            sources: copy.sources,
            previous_commit: None,
            previous_plan: None,
            epoch: copy.epoch,
        }
    }
}

/// Logged after every sink of a batch has finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCommit {
    /// The batch that committed.
    pub batch_id: BatchId,
    /// Wall-clock time the batch's sinks finished, in milliseconds since the Unix epoch.
    pub committed_at_ms: i64,
    /// Records the batch read from its sources.
    pub input_records: u64,
    /// Time the batch took to run its outputs (computation and sinks), in whole milliseconds.
    pub processing_ms: u64,
    /// The lease epoch of the writer (stamped by the store; 0 in format version 1).
    #[serde(default)]
    pub epoch: Epoch,
}

/// Whether a state checkpoint holds everything, or only the keys changed since its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckpointKind {
    /// Every live key of every table, without tombstones: restores on its own.
    Full,
    /// Changes since the checkpoint taken after batch `parent`.
    Delta {
        /// The batch of the checkpoint this delta builds on; always older than the delta's own.
        parent: BatchId,
    },
}

/// State as of the end of batch `batch_id`, for every stateful operator and source, in one object.
#[derive(Debug, Clone, PartialEq)]
pub struct StateCheckpoint {
    /// The batch after which the state was taken.
    pub batch_id: BatchId,
    /// Full snapshot, or delta on an older checkpoint.
    pub kind: CheckpointKind,
    /// Wall-clock time the state was cut, in milliseconds since the Unix epoch (a compacted
    /// snapshot keeps the time of the newest checkpoint it merged).
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
    /// Host name of the holder's machine; with `pid`, how a starter on the same host tells
    /// whether the holder still runs.
    pub host: String,
    /// Process id of the holder on `host`.
    pub pid: u32,
    /// Wall-clock time the holder took the epoch, in milliseconds since the Unix epoch.
    pub started_ms: i64,
    /// Wall-clock time of the holder's latest heartbeat, in milliseconds since the Unix epoch (in
    /// a claim, the time of the claim).
    pub heartbeat_ms: i64,
    /// How long after `heartbeat_ms` another process may take the location over, in
    /// milliseconds.
    pub ttl_ms: u64,
    /// The epoch this record claims (0 in format version 1).
    #[serde(default)]
    pub epoch: Epoch,
    /// Set by a holder that gave the location back: the next process need not wait for the TTL.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    /// In heartbeats: a copy of this epoch's fence point, so that a damaged or lost fence object
    /// is not the end of the location. Absent in claims (written before the fence point is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_from: Option<BatchId>,
}

/// Written once by a new holder right after its claim (`lease/<epoch>.fence`): objects of older
/// epochs about batch `from_batch` or later are not accepted (see [`crate::protocol::fenced`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// The epoch whose holder wrote this fence: it excludes objects of older epochs only.
    pub epoch: Epoch,
    /// One past the newest batch any object of the location concerned when the holder listed it
    /// (after its claim existed).
    pub from_batch: BatchId,
    /// The claim's owner, so a retried create that landed is recognised.
    pub owner: String,
}
