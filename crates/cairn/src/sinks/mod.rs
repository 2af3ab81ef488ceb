//! Sinks: the [`Sink`] trait every output implements (the file sink here, PostgreSQL and Kafka in
//! `cairn-connectors`, `foreach_batch` as sugar), and the file sink: each batch's output becomes
//! one object named after its batch id, written atomically, so a replayed batch replaces its own
//! output instead of adding to it.

use crate::api::dstream::{DStream, Data, UserError};
use crate::error::{Error, Result};
use crate::graph::BatchInfo;
use crate::io::{block_on, Location};
use cairn_checkpoint::object_store::path::Path as ObjPath;
use cairn_checkpoint::object_store::{ObjectStore, PutPayload};
use cairn_checkpoint::paths::Paths;
use cairn_checkpoint::BatchId;
use futures::TryStreamExt;
use rayon::prelude::*;
use std::fmt::Display;
use std::io::Write;
use std::sync::{Arc, Mutex};

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
}

impl BatchContext {
    /// The batch's identity as operators and closures see it.
    pub fn info(&self) -> BatchInfo {
        BatchInfo {
            job_id: self.job_id.clone(),
            batch_id: self.batch_id.0,
            batch_time_ms: self.batch_time_ms,
        }
    }

    /// A context for calling a sink directly (tests, tools): no task, no epoch.
    ///
    /// ```
    /// let b = cairn::BatchContext::new("clicks-18c2", cairn::checkpoint::BatchId(7), 0);
    /// assert_eq!((b.batch_id.0, b.task, b.epoch), (7, None, None));
    /// ```
    pub fn new(job_id: impl Into<Arc<str>>, batch_id: BatchId, batch_time_ms: i64) -> Self {
        Self { job_id: job_id.into(), batch_id, batch_time_ms, task: None, epoch: None }
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
    fn abort(&self, batch: &BatchContext) {
        (**self).abort(batch)
    }
}

impl<T: Data> DStream<T> {
    /// Writes every batch to `sink`: open, each partition, commit (see [`Sink`]). A sink error
    /// fails the batch, which is not committed and replays with the same id after a restart.
    pub fn write_to(&self, sink: impl Sink<T>) {
        self.output(move |parts, ctx| {
            let batch = BatchContext {
                job_id: ctx.info.job_id.clone(),
                batch_id: BatchId(ctx.info.batch_id),
                batch_time_ms: ctx.info.batch_time_ms,
                task: None,
                epoch: ctx.epoch,
            };
            let fail = |e: UserError| Error::Sink {
                sink: sink.name().to_string(),
                batch: ctx.info.batch_id,
                message: e.to_string(),
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
        });
    }

    /// Calls `f` with every batch's id, time and elements (in partition order). An error fails
    /// the batch: it is not committed, and replays with the same id after a restart. Sugar for
    /// [`write_to`](Self::write_to) with a sink that gathers the partitions and calls `f` at
    /// commit.
    pub fn foreach_batch(
        &self,
        f: impl FnMut(&BatchInfo, Vec<T>) -> std::result::Result<(), UserError> + Send + 'static,
    ) {
        let name = format!("foreach_batch#{}", self.output_count());
        self.write_to(ForeachBatch { name, f: Mutex::new(f), parts: Mutex::new(Vec::new()) });
    }
}

/// The sink behind [`DStream::foreach_batch`].
struct ForeachBatch<T, F> {
    name: String,
    f: Mutex<F>,
    parts: Mutex<Vec<(usize, Vec<T>)>>,
}

impl<T, F> ForeachBatch<T, F> {
    fn take_parts(&self) -> Vec<(usize, Vec<T>)> {
        std::mem::take(&mut *self.parts.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<T: Data, F> Sink<T> for ForeachBatch<T, F>
where
    F: FnMut(&BatchInfo, Vec<T>) -> std::result::Result<(), UserError> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn open(&self, _: &BatchContext) -> std::result::Result<BatchWrite, UserError> {
        self.take_parts();
        Ok(BatchWrite::Write)
    }
    fn write_partition(
        &self,
        _: &BatchContext,
        i: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).push((i, data));
        Ok(())
    }
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError> {
        let mut parts = self.take_parts();
        parts.sort_by_key(|(i, _)| *i);
        let data: Vec<T> = parts.into_iter().flat_map(|(_, p)| p).collect();
        let mut f = self.f.lock().unwrap_or_else(|e| e.into_inner());
        f(&batch.info(), data)
    }
    fn abort(&self, _: &BatchContext) {
        self.take_parts();
    }
}

impl<T: Data + Display> DStream<T> {
    /// Writes every batch as `part-<batch id>.txt` (one element per line, partition order) under
    /// `location` (a local directory or object-store URL). Together with the batch log this is
    /// exactly-once: a batch replayed after a crash rewrites the same object with the same lines.
    /// Partitions are formatted in parallel. Read the output back with [`read_text_output`].
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let out = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<u32>("in").unwrap();
    /// s.map(|x| x * 10).save_as_text_files(out.path().to_str().unwrap()).unwrap();
    /// # q.push(vec![1, 2]);
    /// # ctx.run_available().unwrap();
    /// let batches = cairn::read_text_output(out.path().to_str().unwrap()).unwrap();
    /// assert_eq!(batches, vec![(0, vec!["10".to_string(), "20".to_string()])]);
    /// ```
    pub fn save_as_text_files(&self, location: &str) -> Result<()> {
        self.write_to(TextFileSink::open(location)?);
        Ok(())
    }
}

/// A storage request of the file sink failed; the object store's error is kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}: {source}")]
struct StorageFailed {
    what: &'static str,
    path: String,
    #[source]
    source: cairn_checkpoint::object_store::Error,
}

/// The file sink: one `part-<batch>.txt` per batch under a location (see
/// [`DStream::save_as_text_files`]).
pub struct TextFileSink {
    loc: Location,
    paths: Paths,
    /// The formatted partitions of the batch being written.
    parts: Mutex<Vec<(usize, Vec<u8>)>>,
}

impl TextFileSink {
    /// A file sink writing under `location`; staged writes a crashed earlier run left in a local
    /// directory are removed first.
    pub fn open(location: &str) -> Result<Self> {
        let loc = Location::open(location)?;
        let paths = Paths::new(loc.root.clone());
        if let Some(dir) = &loc.local_dir {
            #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
            let now = std::time::SystemTime::now();
            let removed = cairn_checkpoint::debris::sweep(dir, cairn_checkpoint::debris::DEBRIS_GRACE, now)
                .map_err(|e| Error::Sink {
                sink: location.to_string(),
                batch: 0,
                message: format!("cannot remove staging debris: {e}"),
            })?;
            for f in removed {
                tracing::info!("removed {} (left by a crashed writer)", f.display());
            }
        }
        Ok(Self { loc, paths, parts: Mutex::new(Vec::new()) })
    }

    fn take_parts(&self) -> Vec<(usize, Vec<u8>)> {
        std::mem::take(&mut *self.parts.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<T: Data + Display> Sink<T> for TextFileSink {
    fn name(&self) -> &str {
        &self.loc.label
    }
    fn open(&self, _: &BatchContext) -> std::result::Result<BatchWrite, UserError> {
        // Replays rewrite the same object with the same lines: never "already committed".
        self.take_parts();
        Ok(BatchWrite::Write)
    }
    fn write_partition(
        &self,
        _: &BatchContext,
        i: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError> {
        let mut buf = Vec::new();
        for x in &data {
            writeln!(buf, "{x}")?;
        }
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).push((i, buf));
        Ok(())
    }
    fn parallel(&self) -> bool {
        true
    }
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError> {
        let mut parts = self.take_parts();
        parts.sort_by_key(|(i, _)| *i);
        let buf: Vec<u8> = parts.into_iter().flat_map(|(_, b)| b).collect();
        let path = self.paths.sink_part(batch.batch_id);
        // Object stores put atomically. A local directory gets a staging file next to the
        // target from object_store, which a reader would take as data: write under `_staging/`
        // and rename into place instead.
        let put =
            |to: &ObjPath| {
                block_on(self.loc.store.put(to, PutPayload::from(buf.clone())))
                    .map_err(|source| StorageFailed { what: "write", path: to.to_string(), source })
            };
        match self.loc.local_dir {
            None => {
                put(&path)?;
            }
            Some(_) => {
                let staged = self.paths.sink_staging(batch.batch_id);
                put(&staged)?;
                block_on(self.loc.store.rename(&staged, &path)).map_err(|source| StorageFailed {
                    what: "move into place",
                    path: staged.to_string(),
                    source,
                })?;
            }
        };
        Ok(())
    }
    fn abort(&self, _: &BatchContext) {
        self.take_parts();
    }
}

/// Reads a file sink's output: `(batch id, lines)` for every batch written, in batch order.
pub fn read_text_output(location: &str) -> Result<Vec<(u64, Vec<String>)>> {
    let loc = Location::open(location)?;
    let paths = Paths::new(loc.root.clone());
    let objects: Vec<_> = block_on(loc.store.list(Some(&loc.root)).try_collect::<Vec<_>>())
        .map_err(|e| Error::Lifecycle(format!("cannot list {location}: {e}")))?;
    let mut out = Vec::new();
    for o in objects {
        let Some(batch) = paths.parse_sink_part(&o.location) else { continue };
        let bytes = block_on(async { loc.store.get(&o.location).await?.bytes().await })
            .map_err(|e| Error::Lifecycle(format!("cannot read {}: {e}", o.location)))?;
        let text = String::from_utf8_lossy(&bytes);
        out.push((batch.0, text.lines().map(str::to_string).collect()));
    }
    out.sort_by_key(|(b, _)| *b);
    Ok(out)
}
