//! Progress events: what a running job reports to listeners, logs, metrics and the web page.

use cairn_checkpoint::BatchId;
use serde::Serialize;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// State size of one stateful operator.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OperatorProgress {
    /// The operator's stable name.
    pub name: String,
    /// Live keys (for windows: buffered batches).
    pub keys: u64,
    /// Bytes of its state in the latest checkpoint cut (uncompressed; a delta holds changed keys).
    pub checkpoint_bytes: u64,
}

/// What a receiver (push-based input kept in a write-ahead log) did so far, and its rate bound.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReceiverStatus {
    /// The receiver's (source's) name.
    pub name: String,
    /// Records taken since the job started.
    pub records: u64,
    /// Pushes refused since the job started: buffer full or over the rate bound.
    pub refused: u64,
    /// Write-ahead log blocks written since the job started.
    pub blocks: u64,
    /// The ingest rate bound in records per second (the lower of the configured maximum and
    /// the automatic bound), `None` when unbounded.
    pub rate_limit: Option<f64>,
}

/// Input not yet read from one source partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceLag {
    /// The source's stable name.
    pub source: String,
    /// The partition (`topic[p]` for Kafka).
    pub partition: String,
    /// Records available past what the batch planned, as of its plan: for Kafka, the
    /// partition's end offset minus the planned end offset.
    pub records: u64,
}

/// One structured record per batch (in the spirit of Spark's StreamingQueryProgress).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchProgress {
    /// The batch (a replay keeps its id).
    pub batch_id: BatchId,
    /// The batch's logical time, milliseconds since the Unix epoch.
    pub batch_time_ms: i64,
    /// Wall-clock time the batch started.
    pub started_at_ms: i64,
    /// Records read from sources.
    pub records: u64,
    /// Records per second of wall time since the previous batch started.
    pub input_rows_per_s: f64,
    /// Records per second of processing time.
    pub processed_rows_per_s: f64,
    /// Time to run the batch's operators and sinks.
    pub processing_ms: f64,
    /// How late the batch started relative to its batch time (processing-time trigger).
    pub scheduling_delay_ms: f64,
    /// Time the scheduler spent outside the batch's processing for this batch: asking the
    /// sources for their plan (for Kafka, broker round trips), logging the plan, cutting a state
    /// snapshot, and waiting for room in the checkpoint queue.
    pub checkpoint_ms: f64,
    /// Of `checkpoint_ms`, time spent blocked because storage fell behind (backpressure).
    pub checkpoint_wait_ms: f64,
    /// Whether a state checkpoint was cut after this batch.
    pub checkpointed: bool,
    /// A checkpoint was due but put off because storage is still writing earlier ones.
    pub checkpoint_deferred: bool,
    /// Uncompressed bytes of the checkpoint cut after this batch (0 if none).
    pub checkpoint_bytes: u64,
    /// Checkpoints waiting to be written.
    pub checkpoint_queue_depth: u64,
    /// Duration of the most recent completed background checkpoint write.
    pub last_checkpoint_write_ms: Option<f64>,
    /// Live keys over all stateful operators.
    pub state_keys: u64,
    /// Per stateful operator.
    pub operators: Vec<OperatorProgress>,
    /// True for a batch re-run after a restart with its logged input.
    pub replayed: bool,
    /// Restarts in place after transient failures since the job started.
    pub restarts: u64,
    /// Objects a restore of the newest checkpoint cut would read (its chain through a full
    /// snapshot; 0 before the first checkpoint): what a crash now costs to recover.
    pub checkpoint_chain: u64,
    /// What a restore of that checkpoint would take on this storage now, in milliseconds: its
    /// chain's objects at the measured read latency plus its bytes at the measured read bandwidth
    /// (reads of recovery, compaction and the log so far). `None` before the first checkpoint or
    /// the first read. Decoding is not counted.
    pub checkpoint_restore_estimate_ms: Option<f64>,
    /// Per source partition, the records left unread after this batch's plan (sources that can
    /// tell: Kafka). Empty for a replayed batch (its plan was logged earlier).
    pub source_lag: Vec<SourceLag>,
    /// In a scaled-out job: the task this batch belongs to (its batch ids are the task's own).
    pub task: Option<u32>,
    /// The ownership epoch this process holds its checkpoint location (or task) in: it grows by
    /// one at every takeover, so a change shows that the task moved.
    pub epoch: u64,
    /// The batch's plan as logged: each source's offset ranges.
    pub plan: Vec<cairn_checkpoint::SourcePlan>,
    /// The job's receivers, as of the end of the batch.
    pub receivers: Vec<ReceiverStatus>,
}

/// A batch is about to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchStarted {
    /// The batch (a replay keeps its id).
    pub batch_id: BatchId,
    /// The batch's logical time, milliseconds since the Unix epoch.
    pub batch_time_ms: i64,
    /// Whether it re-runs a logged plan after a restart.
    pub replayed: bool,
}

/// A state checkpoint was stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointWritten {
    /// The batch after which the checkpoint was cut.
    pub batch_id: BatchId,
    /// Bytes stored.
    pub bytes: u64,
    /// Time to store it, retries included.
    pub write_ms: f64,
    /// A full snapshot rather than a delta.
    pub full: bool,
    /// Objects stored.
    pub objects: u64,
    /// Storage requests of this write that were retried after a transient failure (0 when every
    /// request succeeded at once).
    pub retries: u32,
}

/// A state checkpoint could not be stored (after retries); the job stops.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointFailed {
    /// The batch after which the checkpoint was cut.
    pub batch_id: BatchId,
    /// The store's error, rendered (the job's own error keeps it typed).
    pub error: String,
    /// Storage requests of this write that were retried before it failed for good.
    pub retries: u32,
}

/// Another process took the checkpoint location over (its lease was lost); the job stops
/// without writing anything more there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaseLost {
    /// Who holds the location now.
    pub holder: String,
}

/// A batch failed for a reason that may heal by itself; the job restarts in place from its
/// checkpoint after a wait.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartScheduled {
    /// Restarts since the job started (1, 2, ...).
    pub restart: u64,
    /// Attempts in this outage (1, 2, ...); a batch that goes through ends the outage.
    pub attempt: u32,
    /// The failure, naming the dependency and the batch.
    pub cause: String,
    /// How long the job waits before restarting.
    pub wait_ms: u64,
    /// How long this outage has lasted so far.
    pub outage_ms: u64,
    /// How long the job rides out one outage before it stops.
    pub max_outage_ms: u64,
}

/// Recovery finished; batches are about to run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryFinished {
    /// The checkpoint restored, if any.
    pub restored_batch: Option<BatchId>,
    /// Batches that will be replayed with their logged input.
    pub replay_batches: u64,
    /// The id the next batch will get (a replayed one first, if any).
    pub next_batch: BatchId,
    /// Damage recovery worked around (fallbacks, rebuilt plans, repaired copies).
    pub warnings: Vec<String>,
    /// When recovery finished, milliseconds since the Unix epoch (the job's clock).
    pub at_ms: i64,
    /// Time recovery took: reading the metadata and the log, restoring the checkpoint (the
    /// batches to replay run after it).
    pub restore_ms: f64,
}

/// The checkpoint maintenance that follows a stored checkpoint (on its own thread, off the batch
/// path): a full snapshot compacted from the delta chain when it had grown long, and retention.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointMaintained {
    /// The newest checkpoint when maintenance ran.
    pub batch_id: BatchId,
    /// Bytes of the full snapshot compacted at that batch, when one was.
    pub compacted_bytes: Option<u64>,
    /// Objects retention deleted (checkpoints, plans and commits no kept checkpoint needs).
    pub deleted: u64,
    /// What failed (compaction or retention; both are retried after the next checkpoint).
    pub error: Option<String>,
}

/// Receives a job's events. Every method has an empty default; implement the ones you need.
/// Listeners run on the job's threads: keep them quick.
///
/// ```
/// use cairn::{BatchProgress, StreamingListener};
/// struct Log;
/// impl StreamingListener for Log {
///     fn on_batch_completed(&self, p: &BatchProgress) {
///         eprintln!("batch {} took {:.1} ms", p.batch_id, p.processing_ms);
///     }
/// }
/// let ctx = cairn::StreamingContext::builder().build().unwrap();
/// ctx.add_listener(std::sync::Arc::new(Log));
/// ```
pub trait StreamingListener: Send + Sync {
    /// Recovery finished; the first batch is about to be planned or replayed.
    fn on_recovery_finished(&self, _e: &RecoveryFinished) {}
    /// A batch is about to run.
    fn on_batch_started(&self, _e: &BatchStarted) {}
    /// A batch ran and its sinks committed.
    fn on_batch_completed(&self, _p: &BatchProgress) {}
    /// A state checkpoint was stored.
    fn on_checkpoint_written(&self, _e: &CheckpointWritten) {}
    /// A state checkpoint could not be stored; the job stops.
    fn on_checkpoint_failed(&self, _e: &CheckpointFailed) {}
    /// Maintenance ran after a stored checkpoint (compaction, retention).
    fn on_checkpoint_maintained(&self, _e: &CheckpointMaintained) {}
    /// Another process took the location over; the job stops.
    fn on_lease_lost(&self, _e: &LeaseLost) {}
    /// A transient failure; the job restarts in place after a wait.
    fn on_restart_scheduled(&self, _e: &RestartScheduled) {}
}

/// The registered listeners, shared with the checkpoint writer's thread.
#[derive(Clone, Default)]
pub(crate) struct Listeners(Arc<Mutex<Vec<Arc<dyn StreamingListener>>>>);

impl Listeners {
    pub(crate) fn add(&self, l: Arc<dyn StreamingListener>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(l);
    }
    pub(crate) fn each(&self, f: impl Fn(&dyn StreamingListener)) {
        let ls = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for l in ls {
            f(&*l);
        }
    }
}

/// Appends each batch's progress as a JSON line to a file.
pub(crate) struct JsonLines(Mutex<std::fs::File>);

impl JsonLines {
    pub(crate) fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)))
    }
}

impl StreamingListener for JsonLines {
    fn on_batch_completed(&self, p: &BatchProgress) {
        if let Ok(line) = serde_json::to_string(p) {
            let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = writeln!(f, "{line}") {
                tracing::warn!("cannot append to the progress file: {e}");
            }
        }
    }
}
