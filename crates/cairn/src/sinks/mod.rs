//! Sinks: the [`Sink`] trait every output implements (the file sink and `foreach_batch` here,
//! PostgreSQL and Kafka in `cairn-connectors`), what a sink is told about a batch, and the
//! protocol that drives a sink through one batch.

mod foreach_batch;
mod text_file;

pub(crate) use foreach_batch::ForeachBatch;
pub use text_file::{read_text_output, TextFileSink};

use crate::error::{Error, Result};
use crate::graph::{BatchCtx, BatchInfo, Partitions, UserError};
use cairn_checkpoint::BatchId;
use rayon::prelude::*;
use std::sync::Arc;

/// The partitions of the batch being written, gathered from parallel `write_partition` calls
/// until the commit concatenates them in partition order (a sink that writes one object or
/// calls one closure per batch).
pub(crate) struct Gathered<P>(std::sync::Mutex<Vec<(usize, P)>>);

impl<P> Default for Gathered<P> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }
}

impl<P: IntoIterator> Gathered<P> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, P)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Adds partition `i`.
    pub(crate) fn push(&self, i: usize, part: P) {
        self.lock().push((i, part));
    }
    /// Forgets what an earlier, abandoned attempt gathered.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
    /// Everything gathered, in partition order; empties the buffer.
    pub(crate) fn take(&self) -> Vec<P::Item> {
        let mut parts = std::mem::take(&mut *self.lock());
        parts.sort_by_key(|(i, _)| *i);
        parts.into_iter().flat_map(|(_, p)| p).collect()
    }
}

/// A task of a job: the unit of work that a scaled-out job assigns to one process (one input
/// partition number). A job running as one process is one task and carries none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u32);

/// What a sink is told about the batch it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchContext {
    /// The job's id (see [`BatchInfo::job_id`]): sinks key their progress by it.
    pub job_id: Arc<str>,
    /// The batch; a replayed batch keeps its id, so a sink deduplicates on it.
    pub batch_id: BatchId,
    /// The batch's logical time in milliseconds since the Unix epoch.
    pub batch_time_ms: i64,
    /// The task the batch belongs to; `None` while the job runs as a single task.
    pub task: Option<TaskId>,
    /// The ownership epoch of the process writing the batch, for sinks that fence a writer that
    /// lost its right to write; `None` when the job has no checkpoint location (no lease).
    pub epoch: Option<u64>,
    /// Checks, with one read of the checkpoint location, that no newer epoch has taken the
    /// job (or task) over; `None` without a checkpoint location. See [`BatchContext::check_fence`].
    pub fence: Option<FenceCheck>,
}

/// The check behind [`BatchContext::check_fence`].
#[derive(Clone)]
pub struct FenceCheck(Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>);

impl FenceCheck {
    /// A check that runs `f` (tests, tools).
    pub fn new(f: impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for FenceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FenceCheck")
    }
}

impl PartialEq for FenceCheck {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for FenceCheck {}

impl BatchContext {
    /// The batch's identity as operators and closures see it.
    pub fn info(&self) -> BatchInfo {
        BatchInfo { job_id: self.job_id.clone(), batch_id: self.batch_id, batch_time_ms: self.batch_time_ms }
    }

    /// A context for calling a sink directly (tests, tools): no task, no epoch.
    ///
    /// ```
    /// let b = cairn::BatchContext::new("clicks-18c2", cairn::checkpoint::BatchId(7), 0);
    /// assert_eq!((b.batch_id.0, b.task, b.epoch), (7, None, None));
    /// ```
    pub fn new(job_id: impl Into<Arc<str>>, batch_id: BatchId, batch_time_ms: i64) -> Self {
        Self { job_id: job_id.into(), batch_id, batch_time_ms, task: None, epoch: None, fence: None }
    }

    /// `Err` when another process has taken this batch's job or task over since this process
    /// took it (a newer lease epoch exists): a sink whose target cannot fence a writer by
    /// itself, or cannot be trusted to, calls it right before it makes a batch visible, so a
    /// process that lost its task while paused does not commit after the new owner started. A
    /// context without a checkpoint location has nothing to check.
    ///
    /// ```
    /// let b = cairn::BatchContext::new("j", cairn::checkpoint::BatchId(7), 0);
    /// assert!(b.check_fence().is_ok());
    /// let fenced = b.with_fence(cairn::FenceCheck::new(|| Err("epoch 3 took over".into())));
    /// assert_eq!(fenced.check_fence().unwrap_err(), "epoch 3 took over");
    /// ```
    pub fn check_fence(&self) -> std::result::Result<(), String> {
        self.fence.as_ref().map_or(Ok(()), |f| (f.0)())
    }

    /// The same batch with another fence check (tests, tools).
    pub fn with_fence(self, fence: FenceCheck) -> Self {
        Self { fence: Some(fence), ..self }
    }

    /// The same batch as written by `task` in ownership epoch `epoch` (tests, tools).
    ///
    /// ```
    /// let b = cairn::BatchContext::new("j", cairn::checkpoint::BatchId(7), 0).as_task(cairn::TaskId(3), 2);
    /// assert_eq!((b.task, b.epoch), (Some(cairn::TaskId(3)), Some(2)));
    /// ```
    pub fn as_task(self, task: TaskId, epoch: u64) -> Self {
        Self { task: Some(task), epoch: Some(epoch), ..self }
    }
}

/// Whether a batch still has to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchWrite {
    /// Write the partitions, then commit.
    Write,
    /// An earlier attempt committed this batch (the job crashed after the sink committed and
    /// before cairn did): nothing is written.
    AlreadyCommitted,
}

/// An output of a job. For every batch the engine calls [`open`](Sink::open), then
/// [`write_partition`](Sink::write_partition) once per partition (concurrently when
/// [`parallel`](Sink::parallel) says so), then [`commit`](Sink::commit), which must make the
/// batch visible exactly once: a batch id that was committed before (a replay after a crash)
/// must not be committed twice. Any error fails the batch; it is not committed by cairn either,
/// and replays with the same id and input after a restart, after [`abort`](Sink::abort).
///
/// ```
/// use cairn::{BatchContext, BatchWrite, Sink, StreamingContext, UserError};
/// use std::sync::Mutex;
///
/// /// Keeps the sum of every batch, once per batch id.
/// #[derive(Default)]
/// struct Sums { pending: Mutex<i64>, committed: Mutex<Vec<(u64, i64)>> }
///
/// impl Sink<i64> for Sums {
///     fn name(&self) -> &str { "sums" }
///     fn open(&self, b: &BatchContext) -> Result<BatchWrite, UserError> {
///         *self.pending.lock().unwrap() = 0;
///         let done = self.committed.lock().unwrap().iter().any(|(id, _)| *id == b.batch_id.0);
///         Ok(if done { BatchWrite::AlreadyCommitted } else { BatchWrite::Write })
///     }
///     fn write_partition(&self, _: &BatchContext, _: usize, data: Vec<i64>) -> Result<(), UserError> {
///         *self.pending.lock().unwrap() += data.iter().sum::<i64>();
///         Ok(())
///     }
///     fn commit(&self, b: &BatchContext) -> Result<(), UserError> {
///         let sum = *self.pending.lock().unwrap();
///         self.committed.lock().unwrap().push((b.batch_id.0, sum));
///         Ok(())
///     }
/// }
///
/// let ctx = StreamingContext::builder().build().unwrap();
/// let (q, s) = ctx.queue_stream::<i64>("in").unwrap();
/// let sums = std::sync::Arc::new(Sums::default());
/// s.write_to(sums.clone());
/// q.push(vec![1, 2, 3]);
/// q.push(vec![10]);
/// ctx.run_available().unwrap();
/// assert_eq!(*sums.committed.lock().unwrap(), vec![(0, 6), (1, 10)]);
/// ```
pub trait Sink<T>: Send + Sync + 'static {
    /// The sink's name, in errors and logs.
    fn name(&self) -> &str;

    /// Prepares a batch (connects, begins a transaction, checks whether the batch was already
    /// committed).
    fn open(&self, batch: &BatchContext) -> std::result::Result<BatchWrite, UserError>;

    /// Writes (or stages) one partition of the batch. Partition numbers run from 0.
    fn write_partition(
        &self,
        batch: &BatchContext,
        partition: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError>;

    /// Makes the batch visible, exactly once per batch id.
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError>;

    /// Whether [`write_partition`](Sink::write_partition) may run for several partitions at once
    /// (one connection per partition where the target allows it). Sequential unless a sink says
    /// otherwise.
    fn parallel(&self) -> bool {
        false
    }

    /// Whether the sink keeps the tasks of a scaled-out job apart and fences a writer that lost
    /// its task: it deduplicates on `(task, batch id)` ([`BatchContext::task`]) and refuses a
    /// write whose [`BatchContext::epoch`] is older than one it already saw for the task. A
    /// scaled-out job refuses to start with a sink that says no. Sinks written for one process
    /// say yes by default: their output is keyed by batch id per job, and each task of a
    /// scaled-out job has its own job id.
    fn fences_tasks(&self) -> bool {
        true
    }

    /// Called instead of [`commit`](Sink::commit) when writing the batch failed, to release what
    /// it holds (roll back a transaction, drop staged data). Sinks that hold nothing between
    /// calls need not implement it.
    fn abort(&self, _batch: &BatchContext) {}
}

impl<T, S: Sink<T>> Sink<T> for Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn open(&self, batch: &BatchContext) -> std::result::Result<BatchWrite, UserError> {
        (**self).open(batch)
    }
    fn write_partition(
        &self,
        batch: &BatchContext,
        partition: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError> {
        (**self).write_partition(batch, partition, data)
    }
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError> {
        (**self).commit(batch)
    }
    fn parallel(&self) -> bool {
        (**self).parallel()
    }
    fn fences_tasks(&self) -> bool {
        (**self).fences_tasks()
    }
    fn abort(&self, batch: &BatchContext) {
        (**self).abort(batch)
    }
}

/// Runs the sink protocol for one batch: open, every partition, then commit, or abort on any
/// error. A sink error fails the batch, which is not committed and replays with the same id.
pub(crate) fn write_batch<T: Send>(
    sink: &impl Sink<T>,
    parts: Partitions<T>,
    ctx: &BatchCtx<'_>,
) -> Result<()> {
    let batch = BatchContext {
        job_id: ctx.info.job_id.clone(),
        batch_id: ctx.info.batch_id,
        batch_time_ms: ctx.info.batch_time_ms,
        task: ctx.task,
        epoch: ctx.epoch,
        fence: ctx.fence.clone(),
    };
    let fail = |e: UserError| match batch.check_fence() {
        // A process that lost its job or task meets the new holder's writes (a staging file
        // moved, a row locked, a producer fenced): that loss is the cause to report, and it
        // does not heal by retrying.
        Err(fenced) => Error::Sink {
            sink: sink.name().to_string(),
            batch: ctx.info.batch_id,
            message: format!("{fenced} (the write failed after that: {e})"),
            transient: false,
        },
        Ok(()) => Error::Sink {
            sink: sink.name().to_string(),
            batch: ctx.info.batch_id,
            message: e.to_string(),
            transient: crate::is_transient(e.as_ref()),
        },
    };
    if sink.open(&batch).map_err(fail)? == BatchWrite::AlreadyCommitted {
        return Ok(());
    }
    let written = if sink.parallel() {
        parts.into_par_iter().enumerate().try_for_each(|(i, p)| sink.write_partition(&batch, i, p))
    } else {
        parts.into_iter().enumerate().try_for_each(|(i, p)| sink.write_partition(&batch, i, p))
    };
    match written.and_then(|()| sink.commit(&batch)) {
        Ok(()) => Ok(()),
        Err(e) => {
            sink.abort(&batch);
            Err(fail(e))
        }
    }
}
