//! The job graph: nodes that compute one batch's partitions, the outputs that pull them, the
//! stateful operators whose state is checkpointed, and the sources whose offsets are.

use super::data::Partitions;
use crate::error::{Error, Result};
use cairn_checkpoint::{BatchId, BatchPlan, OffsetRange, OperatorDescription, SourcePartition, TableData};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Identity of a batch, handed to user functions and sinks.
///
/// A sink that deduplicates on `batch_id` must key its progress by `job_id` too: a job started
/// afresh on a new checkpoint location numbers its batches from 0 again, and must not find its
/// output "already written" by another job.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchInfo {
    /// The job's id, fixed when its checkpoint location was created (`<app name>-<hex time>`);
    /// without a checkpoint location, new at every start.
    pub job_id: Arc<str>,
    /// 0, 1, 2, ...; a replayed batch keeps its id, so sinks can deduplicate on it.
    pub batch_id: BatchId,
    /// The batch's logical time in milliseconds since the Unix epoch (on the batch-interval grid).
    pub batch_time_ms: i64,
}

impl BatchInfo {
    /// A batch's identity, for calling a sink directly (tests, tools).
    ///
    /// ```
    /// let b = cairn::BatchInfo::new("clicks-18c2", cairn::BatchId(7), 0);
    /// assert_eq!((&*b.job_id, b.batch_id.0), ("clicks-18c2", 7));
    /// ```
    pub fn new(job_id: &str, batch_id: BatchId, batch_time_ms: i64) -> Self {
        Self { job_id: job_id.into(), batch_id, batch_time_ms }
    }
}

/// Everything a node needs to compute its part of a batch.
pub(crate) struct BatchCtx<'a> {
    pub info: BatchInfo,
    pub plan: &'a BatchPlan,
    pub parallelism: usize,
    /// Batch time of batch 0: windows slide on the grid that starts here.
    pub start_time_ms: i64,
    /// Records read from sources in this batch.
    pub records: std::sync::atomic::AtomicU64,
    /// The writer's ownership epoch, handed to sinks (see `BatchContext::epoch`).
    pub epoch: Option<u64>,
    /// The task of a scaled-out job this batch belongs to (see `BatchContext::task`).
    pub task: Option<crate::sinks::TaskId>,
    /// See `BatchContext::fence`.
    pub fence: Option<crate::sinks::FenceCheck>,
    /// Unique per execution of a batch: a batch run again after a failure has a new one, so
    /// nothing computed by the failed attempt is served to it.
    pub run: u64,
}

/// The next [`BatchCtx::run`].
pub(crate) fn next_run() -> u64 {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    RUNS.fetch_add(1, Ordering::Relaxed)
}

impl BatchCtx<'_> {
    pub(crate) fn ranges(&self, source: &str) -> &[OffsetRange] {
        self.plan.sources.iter().find(|s| s.source == source).map(|s| s.ranges.as_slice()).unwrap_or(&[])
    }
}

/// Computes a batch's partitions for one stream.
pub(crate) trait Node<T>: Send + Sync {
    fn compute(&self, ctx: &BatchCtx<'_>) -> Result<Partitions<T>>;
}

struct Cached<T> {
    run: u64,
    served: usize,
    data: Partitions<T>,
}

/// A node plus the bookkeeping that lets several downstream streams share one computation per
/// batch: with one consumer the output is moved, with more it is computed once and cloned.
pub(crate) struct Shared<T> {
    node: Box<dyn Node<T>>,
    consumers: AtomicUsize,
    cache: Mutex<Option<Cached<T>>>,
}

impl<T: Clone + Send + Sync + 'static> Shared<T> {
    pub(crate) fn new(node: impl Node<T> + 'static) -> Arc<Self> {
        Arc::new(Self { node: Box::new(node), consumers: AtomicUsize::new(0), cache: Mutex::new(None) })
    }

    pub(crate) fn add_consumer(&self) {
        self.consumers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn compute(&self, ctx: &BatchCtx<'_>) -> Result<Partitions<T>> {
        let consumers = self.consumers.load(Ordering::Relaxed);
        if consumers <= 1 {
            return self.node.compute(ctx);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = !matches!(&*cache, Some(c) if c.run == ctx.run);
        if fresh {
            let data = self.node.compute(ctx)?;
            *cache = Some(Cached { run: ctx.run, served: 0, data });
        }
        let c = cache.as_mut().expect("filled above");
        c.served += 1;
        if c.served >= consumers {
            Ok(cache.take().expect("filled above").data)
        } else {
            Ok(c.data.clone())
        }
    }
}

/// The next offset to read of every partition a source has planned so far.
pub type Positions = BTreeMap<SourcePartition, u64>;

/// The scheduler's view of a source.
pub(crate) trait SourceDyn: Send + Sync {
    fn name(&self) -> &str;
    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>>;
    /// This source's partition that format versions 1 and 2 stored as `key`.
    fn legacy_partition(&self, key: &str) -> Result<SourcePartition>;
    /// Records left past the most recent plan, per partition.
    fn backlog(&self) -> Vec<(SourcePartition, u64)>;
    /// A receiver's figures (`None` for other sources).
    fn receiver_status(&self) -> Option<crate::ReceiverStatus>;
}

/// The scheduler's view of an operator with checkpointed state.
pub(crate) trait StatefulOp: Send + Sync {
    fn describe(&self) -> OperatorDescription;
    /// Changes since the previous snapshot (`full == false`) or everything (`full == true`);
    /// either way, change tracking restarts from here.
    fn snapshot(&self, full: bool) -> Result<Vec<TableData>>;
    /// Loads the tables this operator wrote (ids `name` or `name/...`), redistributing keys over
    /// the current parallelism.
    fn restore(&self, tables: &[&TableData]) -> Result<()>;
    /// Number of live keys (for progress reports).
    fn key_count(&self) -> usize;
    /// Conversions from older state versions this operator accepts at restore.
    fn migrations(&self) -> &[crate::ops::migration::Migration] {
        &[]
    }
    /// Forgets everything, back to the state of a job that starts without a checkpoint: a
    /// restart in the same process then restores into it exactly as a new process would.
    fn reset(&self);
}

/// An output operation: runs once per batch, pulling its stream.
pub(crate) trait Output: Send + Sync {
    fn run(&self, ctx: &BatchCtx<'_>) -> Result<()>;
}

#[derive(Default)]
pub(crate) struct GraphInner {
    pub sources: Vec<Arc<dyn SourceDyn>>,
    pub outputs: Vec<Box<dyn Output>>,
    pub stateful: Vec<Arc<dyn StatefulOp>>,
    names: BTreeSet<String>,
    /// Mistakes found while building the graph, reported together when the job starts.
    pub errors: Vec<String>,
    /// Stateful operators whose input is not known to be partitioned like the job's Kafka
    /// partitions: refused when the job runs as a task of a scaled-out job.
    pub unaligned: Vec<String>,
    /// Sinks that cannot fence a writer per task (refused in a scaled-out job).
    pub unfenced_sinks: Vec<String>,
    /// Stateful operators' former names (`OpName::renamed_from`), by current name.
    pub renamed_from: std::collections::BTreeMap<String, Vec<String>>,
}

/// Shared by every DStream of a context.
pub(crate) struct Graph {
    pub parallelism: usize,
    pub batch_interval_ms: u64,
    pub inner: Mutex<GraphInner>,
}

impl Graph {
    pub(crate) fn new(parallelism: usize, batch_interval_ms: u64) -> Arc<Self> {
        Arc::new(Self { parallelism, batch_interval_ms, inner: Mutex::new(GraphInner::default()) })
    }

    /// Records a graph-building mistake; `start` refuses to run a graph that has any.
    pub(crate) fn defer_error(&self, message: String) {
        self.lock().errors.push(message);
    }

    /// Claims a name for a stateful operator, deferring any error to `start` so operator
    /// methods stay chainable.
    pub(crate) fn claim_stateful(&self, op: &crate::OpName, aligned: bool) {
        let name = op.name();
        if let Err(e) = self.claim_name(name) {
            self.defer_error(e.to_string());
        }
        if !aligned {
            self.lock().unaligned.push(name.to_string());
        }
        if !op.old_names().is_empty() {
            self.lock().renamed_from.insert(name.to_string(), op.old_names().to_vec());
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, GraphInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims a stable name; names identify state in checkpoints, so they must be unique.
    pub(crate) fn claim_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name.contains('/') || name.starts_with('$') {
            return Err(Error::Config(format!(
                "operator name {name:?} is not allowed: use a non-empty name without '/' or a leading '$'"
            )));
        }
        if !self.lock().names.insert(name.to_string()) {
            return Err(Error::Config(format!(
                "two stateful operators or sources are named {name:?}; names identify state in checkpoints and must be unique"
            )));
        }
        Ok(())
    }

    pub(crate) fn add_output(&self, o: impl Output + 'static) {
        self.lock().outputs.push(Box::new(o));
    }

    pub(crate) fn add_stateful(&self, op: Arc<dyn StatefulOp>) {
        self.lock().stateful.push(op);
    }
}
