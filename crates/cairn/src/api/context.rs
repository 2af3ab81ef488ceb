//! `StreamingContext`: configuration, the graph's entry points (sources), and the job lifecycle.
//! The runtime sees the job through [`Job`]; where the job is in its lifecycle stays here.

use crate::api::dstream::DStream;
use crate::clock::{self, Clock};
use crate::error::{Error, Result};
use crate::graph::{Data, Graph};
use crate::runtime::job::{Config, Job, Trigger};
use crate::runtime::progress::{BatchProgress, JsonLines, Listeners, StreamingListener};
use crate::runtime::recovery::{self, Prepared};
use crate::runtime::restart;
use crate::runtime::scheduler::{self, RunSummary};
use crate::sources::{self, Generator, QueueHandle, ReceiverHandle, Source, TextFiles};
use cairn_checkpoint::CheckpointStore;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Builds a [`StreamingContext`].
///
/// ```
/// use cairn::{StreamingContext, Trigger};
/// use std::time::Duration;
/// let ctx = StreamingContext::builder()
///     .app_name("clicks")
///     .batch_interval(Duration::from_secs(1))
///     .checkpoint_interval(Duration::from_secs(10))
///     .parallelism(4)
///     .trigger(Trigger::ProcessingTime)
///     .build()
///     .unwrap();
/// ```
#[must_use]
pub struct StreamingContextBuilder {
    cfg: Config,
}

impl StreamingContextBuilder {
    /// Name shown in logs and stored in the checkpoint's metadata.
    pub fn app_name(mut self, name: impl Into<String>) -> Self {
        self.cfg.app_name = name.into();
        self
    }
    /// Time between batches (default 1 s). Pinned in the checkpoint: batch times and windows
    /// depend on it, so a restart with a different interval is refused.
    pub fn batch_interval(mut self, d: Duration) -> Self {
        self.cfg.batch_interval = d;
        self
    }
    /// Checkpoint location: a local directory or `file://` URL (or `memory://` for tests).
    pub fn checkpoint(mut self, location: impl Into<String>) -> Self {
        self.cfg.checkpoint = Some(location.into());
        self
    }
    /// Uses an already opened checkpoint store (for example one wrapped to inject latency).
    pub fn checkpoint_store(mut self, store: CheckpointStore) -> Self {
        self.cfg.checkpoint = Some(store.location().to_string());
        self.cfg.store = Some(store);
        self
    }
    /// How often state is checkpointed (default: every batch). Should be a multiple of the batch
    /// interval; a longer interval writes less but replays more batches after a crash.
    pub fn checkpoint_interval(mut self, d: Duration) -> Self {
        self.cfg.checkpoint_interval = Some(d);
        self
    }
    /// Partitions of keyed operators (default: the number of cores).
    pub fn parallelism(mut self, n: usize) -> Self {
        self.cfg.parallelism = n.max(1);
        self
    }
    /// When batches run (default [`Trigger::ProcessingTime`]).
    pub fn trigger(mut self, t: Trigger) -> Self {
        self.cfg.trigger = t;
        self
    }
    /// State checkpoints kept by retention (default 10, at least 1). Older checkpoints, and batch
    /// logs nothing needs any more, are deleted after each checkpoint.
    pub fn keep_checkpoints(mut self, n: usize) -> Self {
        self.cfg.keep_checkpoints = n.max(1);
        self
    }
    /// A full snapshot is compacted in the background every `k` checkpoints (default 10),
    /// bounding the deltas recovery must read.
    pub fn full_snapshot_every(mut self, k: usize) -> Self {
        self.cfg.full_snapshot_every = k.max(1);
        self
    }
    /// Checkpoints that may be waiting for storage at once (default 2).
    pub fn max_pending_checkpoints(mut self, n: usize) -> Self {
        self.cfg.max_pending_checkpoints = n.max(1);
        self
    }
    /// When all pending slots are taken, a due checkpoint is put off for up to this many batches
    /// (default: 10 checkpoint intervals or one minute of batches, whichever is longer) rather
    /// than stalling the batch; its changes go into the
    /// next checkpoint. Past that, the scheduler waits for storage (reported as
    /// `checkpoint_wait_ms`). 0 always waits.
    pub fn max_checkpoint_deferral(mut self, batches: u64) -> Self {
        self.cfg.max_checkpoint_deferral = Some(batches);
        self
    }
    /// Stops (gracefully) once batch `n - 1` is done, counting batches before any restart.
    pub fn stop_after_batches(mut self, n: u64) -> Self {
        self.cfg.stop_after_batches = Some(n);
        self
    }
    /// Allows a restart to discard the state of an operator removed from the code.
    pub fn drop_state(mut self, operator: impl Into<String>) -> Self {
        self.cfg.drop_state.push(operator.into());
        self
    }
    /// Stops gracefully on SIGINT/SIGTERM (finish the batch, write a final checkpoint); a
    /// second signal exits at once.
    pub fn stop_on_signals(mut self, yes: bool) -> Self {
        self.cfg.stop_on_signals = yes;
        self
    }
    /// How long the job rides out a failure that may heal by itself (a broker, database or
    /// object store briefly down: see [`crate::is_transient`]) before it stops (default one
    /// minute). Meanwhile it restarts in place from its checkpoint with a backoff of 0.2 s
    /// doubling to 5 s, and reports each restart ([`crate::StreamingListener::on_restart_scheduled`]).
    /// Final errors stop the job at once; zero turns restarts off. Needs a checkpoint location.
    pub fn max_outage(mut self, d: Duration) -> Self {
        self.cfg.max_outage = d;
        self
    }
    /// How the checkpoint store retries one request that failed transiently before the failure
    /// reaches the job (default: 6 retries, 50 ms doubling to at most 2 s apart, about 3 s in
    /// all). The time counts in [`max_outage`](Self::max_outage). Applies to a location given by
    /// [`checkpoint`](Self::checkpoint); a store given by
    /// [`checkpoint_store`](Self::checkpoint_store) keeps its own.
    pub fn storage_retries(mut self, policy: cairn_checkpoint::retry::RetryPolicy) -> Self {
        self.cfg.storage_retries = policy;
        self
    }
    /// How long a crashed holder of the checkpoint location on another host keeps it (default
    /// 10 s). A holder on this host that died is detected at once.
    pub fn lease_ttl(mut self, d: Duration) -> Self {
        self.cfg.lease_ttl = d;
        self
    }
    /// Replaces the wall clock (tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.cfg.clock = clock;
        self
    }

    /// Runs the job as task `task` of `tasks` of a scaled-out job (set by the scale-out
    /// runner, `cairn_connectors::kafka::ScaleOut`, which also picks the checkpoint location of
    /// the task). Sources read only their task's partitions, sinks are told the task, every
    /// stateful operator must read a task-aligned stream
    /// ([`DStream::partitioned_like_source`]), and the checkpoint lease is taken over at once
    /// instead of waiting for the previous holder's TTL: the consumer group has already decided
    /// that the previous holder lost the task, and its writes from now on are fenced.
    pub fn task(mut self, task: crate::TaskId, tasks: u32) -> Self {
        self.cfg.task = Some(TaskAssignment { id: task, tasks });
        self
    }

    /// Checks the configuration and creates the context.
    pub fn build(self) -> Result<StreamingContext> {
        let cfg = self.cfg;
        if cfg.batch_interval.is_zero() {
            return Err(Error::Config("batch interval must be greater than zero".into()));
        }
        if cfg.app_name.trim().is_empty() {
            return Err(Error::Config("app name must not be empty".into()));
        }
        if let Some(ci) = cfg.checkpoint_interval {
            let (c, b) = (ci.as_millis(), cfg.batch_interval.as_millis());
            if c < b {
                tracing::warn!(
                    "checkpoint interval {c} ms is shorter than the batch interval {b} ms; checkpointing every batch instead"
                );
            } else if c % b != 0 {
                tracing::warn!(
                    "checkpoint interval {c} ms is not a multiple of the batch interval {b} ms; checkpointing every {} batches",
                    c / b
                );
            }
        }
        let graph = Graph::new(cfg.parallelism, cfg.batch_interval.as_millis() as u64);
        Ok(StreamingContext {
            job: Arc::new(Job {
                cfg,
                graph,
                stop: Arc::new(AtomicBool::new(false)),
                listeners: Listeners::default(),
                restarts: Default::default(),
                batch_began: Default::default(),
                task_epoch: Default::default(),
                finished: Default::default(),
            }),
            phase: Arc::new(Mutex::new(Phase::Defining)),
        })
    }
}

/// Which task of a scaled-out job a context runs (see [`StreamingContextBuilder::task`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskAssignment {
    /// The task: the input partition number it reads.
    pub id: crate::TaskId,
    /// How many tasks the job has (its source topics' partition count).
    pub tasks: u32,
}

enum Phase {
    Defining,
    Prepared(Box<Prepared>),
    Running(JoinHandle<Result<RunSummary>>),
    Finished,
}

/// Stops a running context from another thread: the running batch finishes, a final checkpoint
/// is written, then `await_termination` returns.
#[derive(Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Requests a graceful stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The entry point of a streaming job: define sources and operators on it, then `start` it.
///
/// ```
/// use cairn::StreamingContext;
/// let dir = tempfile::tempdir().unwrap();
/// let loc = dir.path().to_str().unwrap().to_string();
/// for _run in 0..2 {
///     // The second run restores from the checkpoint instead of starting over.
///     let ctx = StreamingContext::get_or_create(&loc, |loc| {
///         let ctx = StreamingContext::builder().checkpoint(loc).stop_after_batches(3).build()?;
///         let nums = ctx.generator("nums", 1, 10, |_, o| (o % 3, 1u64))?;
///         nums.update_state_by_key("count", |_, vs: Vec<u64>, old: Option<u64>| {
///             Some(old.unwrap_or(0) + vs.len() as u64)
///         })
///         .foreach_batch(|_, _| Ok(()));
///         Ok(ctx)
///     })
///     .unwrap();
///     let summary = ctx.run_available().unwrap();
///     assert_eq!(summary.next_batch, cairn::BatchId(3));
/// }
/// ```
#[derive(Clone)]
pub struct StreamingContext {
    job: Arc<Job>,
    phase: Arc<Mutex<Phase>>,
}

impl StreamingContext {
    /// A builder with defaults: app `cairn`, 1 s batches, no checkpoint location, checkpoint
    /// every batch, parallelism = cores, processing-time trigger.
    pub fn builder() -> StreamingContextBuilder {
        StreamingContextBuilder {
            cfg: Config {
                app_name: "cairn".into(),
                batch_interval: Duration::from_secs(1),
                checkpoint: None,
                store: None,
                checkpoint_interval: None,
                parallelism: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
                trigger: Trigger::ProcessingTime,
                keep_checkpoints: 10,
                full_snapshot_every: 10,
                max_pending_checkpoints: 2,
                max_checkpoint_deferral: None,
                stop_after_batches: None,
                drop_state: Vec::new(),
                stop_on_signals: false,
                lease_ttl: Duration::from_secs(10),
                max_outage: Duration::from_secs(60),
                storage_retries: Default::default(),
                clock: clock::system(),
                task: None,
            },
        }
    }

    /// Spark's `getOrCreate`: `setup(location)` builds the context and its graph (always — Rust
    /// closures are code, not data); if `location` holds a checkpoint, the context then restores
    /// from it, checking the graph against the stored one. Errors (an incompatible change, a
    /// location held by another process, an unusable checkpoint) surface here, before `start`.
    pub fn get_or_create(
        location: &str,
        setup: impl FnOnce(&str) -> Result<StreamingContext>,
    ) -> Result<StreamingContext> {
        let ctx = setup(location)?;
        match ctx.job.cfg.checkpoint.as_deref() {
            Some(l) if l == location => {}
            other => {
                return Err(Error::Config(format!(
                    "get_or_create({location:?}) built a context whose checkpoint location is {other:?}; use .checkpoint(location) in the setup function"
                )))
            }
        }
        ctx.prepare()?;
        Ok(ctx)
    }

    /// The configured app name (see [`StreamingContextBuilder::app_name`]).
    pub fn app_name(&self) -> &str {
        &self.job.cfg.app_name
    }

    /// Whether [`start`](Self::start) (or a `run` method) was called: listeners added after that
    /// miss the events that came before.
    pub fn is_started(&self) -> bool {
        matches!(*self.phase(), Phase::Running(_) | Phase::Finished)
    }

    /// The configured parallelism.
    pub fn parallelism(&self) -> usize {
        self.job.cfg.parallelism
    }

    /// Adds a source under a stable name (its offsets are checkpointed under that name).
    ///
    /// In a job that runs as a task of a scaled-out job ([`StreamingContextBuilder::task`]) the
    /// source is first restricted to that task ([`Source::restrict_to_task`]); a source that
    /// cannot be is an error here.
    pub fn source<S: Source>(&self, name: &str, mut source: S) -> Result<DStream<S::Item>> {
        self.check_defining()?;
        if let Some(t) = self.job.cfg.task {
            source.restrict_to_task(t.id, t.tasks).map_err(|e| {
                Error::Config(format!(
                    "source {name:?} cannot run as task {} of a scaled-out job: {e}",
                    t.id.0
                ))
            })?;
        }
        let node = sources::register(&self.job.graph, name, source)?;
        Ok(DStream { aligned: true, ..DStream::from_node(self.job.graph.clone(), node) })
    }

    /// The task this context runs, when it is one task of a scaled-out job.
    pub fn task(&self) -> Option<TaskAssignment> {
        self.job.cfg.task
    }

    /// A deterministic generator source: `rate` records per batch over `partitions`, record
    /// `o` of partition `p` being `f(p, o)`.
    pub fn generator<T: Data>(
        &self,
        name: &str,
        partitions: u32,
        rate: u64,
        f: impl Fn(u32, u64) -> T + Send + Sync + 'static,
    ) -> Result<DStream<T>> {
        self.source(name, Generator::new(partitions, rate, f))
    }

    /// An in-memory queue of batches (tests and examples; not durable across restarts).
    pub fn queue_stream<T: Data>(&self, name: &str) -> Result<(QueueHandle<T>, DStream<T>)> {
        let (handle, q) = sources::queue();
        Ok((handle, self.source(name, q)?))
    }

    /// A receiver: input pushed through the returned [`ReceiverHandle`] (by a server of your own,
    /// a device gateway, ...) is kept in a write-ahead log in the checkpoint location before it is
    /// acknowledged ([`Durable::wait`](crate::source::Durable::wait)), one log block per batch, so
    /// that batches plan and replay it exactly like a replayable source. At most `max_pending`
    /// records wait for the next batch; beyond that `push` is refused (backpressure). Needs a
    /// checkpoint location; a scaled-out job refuses it (the log belongs to one process).
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let ctx = cairn::StreamingContext::builder()
    ///     .checkpoint(dir.path().to_str().unwrap())
    ///     .trigger(cairn::Trigger::AvailableNow)
    ///     .build()
    ///     .unwrap();
    /// let (input, lines) = ctx.receiver_stream("events", 10_000).unwrap();
    /// let seen = cairn::testing::collect(&lines);
    /// let durable = input.push(vec![b"a".to_vec(), b"b".to_vec()]).unwrap();
    /// ctx.run_available().unwrap();
    /// durable.wait(std::time::Duration::from_secs(1)).unwrap(); // in the log: acknowledged
    /// assert_eq!(seen.lock().unwrap().concat(), ["a", "b"]);
    /// ```
    pub fn receiver_stream(
        &self,
        name: &str,
        max_pending: usize,
    ) -> Result<(ReceiverHandle, DStream<String>)> {
        let store = match (&self.job.cfg.store, &self.job.cfg.checkpoint) {
            (Some(store), _) => store.clone(),
            (None, Some(location)) => CheckpointStore::open_with(location, self.job.cfg.storage_retries)?,
            (None, None) => {
                return Err(Error::Config(format!(
                    "receiver {name:?} keeps what it receives in a write-ahead log in the checkpoint location; set one with .checkpoint(\"dir\")"
                )))
            }
        };
        let (handle, source) =
            sources::receiver::receiver(name, store, max_pending, self.job.finished.clone());
        self.add_listener(Arc::new(sources::receiver::RateController::new(
            &handle,
            self.job.cfg.batch_interval,
        )));
        Ok((handle, self.source(name, source)?))
    }

    /// Lines of text from a TCP server at `addr` (`host:port`): cairn connects as a client (as
    /// Spark's `socketTextStream`), reads newline-terminated lines, reconnects with backoff
    /// (logging each disconnect), and keeps them in a write-ahead log ([`receiver_stream`]
    /// (Self::receiver_stream)), so every line written to the log is processed exactly once,
    /// across crashes. Lines received but not yet in the log when the process dies are lost: a
    /// TCP sender gets no acknowledgement (use HTTP ingest for that). While 100 000 lines wait
    /// for a batch the socket is not read, which slows the sender down.
    pub fn socket_text_stream(&self, name: &str, addr: &str) -> Result<DStream<String>> {
        let (handle, stream) = self.receiver_stream(name, 100_000)?;
        sources::spawn_socket_reader(handle, addr.to_string())
            .map_err(|e| Error::Lifecycle(format!("cannot start the reader of receiver {name:?}: {e}")))?;
        Ok(stream)
    }

    /// New text files in a directory, at most `max_files` per batch, one `String` per line;
    /// see [`TextFiles`].
    pub fn text_file_stream(&self, name: &str, location: &str, max_files: usize) -> Result<DStream<String>> {
        self.source(name, TextFiles::new(location, max_files)?)
    }

    /// Like [`text_file_stream`](Self::text_file_stream), parsing every line with `parse`; a line
    /// it rejects fails the batch with the file and byte offset (see [`TextFiles::on_malformed`]
    /// through [`source`](Self::source) to skip instead).
    pub fn text_file_stream_parsed<T: Data>(
        &self,
        name: &str,
        location: &str,
        max_files: usize,
        parse: impl Fn(&str) -> std::result::Result<T, String> + Send + Sync + 'static,
    ) -> Result<DStream<T>> {
        self.source(name, TextFiles::parsed(location, max_files, parse)?)
    }

    /// The stateful part of the graph as the checkpoint records it: print it as JSON from a new
    /// build and give it to `cairn checkpoint diff` to see, before deploying, whether the build
    /// can start on an existing checkpoint.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// let ctx = StreamingContext::builder().parallelism(2).build().unwrap();
    /// let s = ctx.generator("g", 1, 1, |_, o| (o, 1u64)).unwrap();
    /// s.update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| Some(o.unwrap_or(0) + v.len() as u64))
    ///     .print(1);
    /// let g = ctx.graph_description();
    /// assert_eq!(g.operators[0].name, "counts");
    /// assert_eq!(g.operators[1].kind, cairn::checkpoint::OperatorKind::Source);
    /// ```
    pub fn graph_description(&self) -> cairn_checkpoint::GraphDescription {
        recovery::describe_graph(&self.job)
    }

    /// Calls `f` after every batch with its progress.
    pub fn on_batch(&self, f: impl Fn(&BatchProgress) + Send + Sync + 'static) {
        struct OnBatch<F>(F);
        impl<F: Fn(&BatchProgress) + Send + Sync> StreamingListener for OnBatch<F> {
            fn on_batch_completed(&self, p: &BatchProgress) {
                (self.0)(p)
            }
        }
        self.add_listener(Arc::new(OnBatch(f)));
    }

    /// Registers a listener for batch, checkpoint and recovery events.
    pub fn add_listener(&self, l: Arc<dyn StreamingListener>) {
        self.job.listeners.add(l);
    }

    /// Appends every batch's progress record to `path` as one JSON object per line.
    pub fn progress_json_lines(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let l = JsonLines::create(path.as_ref())
            .map_err(|e| Error::Config(format!("cannot open {}: {e}", path.as_ref().display())))?;
        self.add_listener(Arc::new(l));
        Ok(())
    }

    /// A handle that stops the job gracefully from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.job.stop.clone())
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_defining(&self) -> Result<()> {
        match *self.phase() {
            Phase::Defining => Ok(()),
            _ => Err(Error::Lifecycle(
                "the graph cannot change after the context was prepared or started".into(),
            )),
        }
    }

    /// Validates the graph, takes the checkpoint location and restores state (idempotent).
    fn prepare(&self) -> Result<()> {
        let mut phase = self.phase();
        if let Phase::Defining = *phase {
            let prepared = recovery::prepare(&self.job)?;
            *phase = Phase::Prepared(Box::new(prepared));
        }
        Ok(())
    }

    /// Starts processing on a background thread: replays the batches a crash left uncommitted,
    /// then takes new input.
    pub fn start(&self) -> Result<()> {
        self.start_with(self.job.cfg.trigger)
    }

    fn start_with(&self, trigger: Trigger) -> Result<()> {
        self.prepare()?;
        let mut phase = self.phase();
        let prepared = match std::mem::replace(&mut *phase, Phase::Finished) {
            Phase::Prepared(p) => p,
            other => {
                *phase = other;
                return Err(Error::Lifecycle("the context was already started".into()));
            }
        };
        if self.job.cfg.stop_on_signals {
            scheduler::install_signal_handlers(&self.job.stop)?;
        }
        let job = self.job.clone();
        let handle = std::thread::Builder::new()
            .name("cairn-scheduler".into())
            .spawn(move || {
                let result = restart::run(job.clone(), *prepared, trigger);
                job.finished.store(true, Ordering::SeqCst);
                result
            })
            .map_err(|e| Error::Lifecycle(format!("cannot start the scheduler thread: {e}")))?;
        *phase = Phase::Running(handle);
        Ok(())
    }

    /// Whether the job was started and its scheduler has not finished yet (it may have stopped
    /// on its own: an error, a signal, the end of input); [`await_termination`](Self::await_termination)
    /// then says how it ended.
    pub fn is_running(&self) -> bool {
        matches!(&*self.phase(), Phase::Running(h) if !h.is_finished())
    }

    /// The checkpoint lease epoch this job took last, when it runs as a task of a scaled-out
    /// job (`None` before it started): a newer epoch at its location means another process was
    /// given the task.
    pub fn task_epoch(&self) -> Option<u64> {
        *self.job.task_epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests a graceful stop (see [`StopHandle`]).
    pub fn stop(&self) {
        self.stop_handle().stop();
    }

    /// Waits until the job stops (by `stop`, a signal, `stop_after_batches`, or the end of
    /// input under [`Trigger::AvailableNow`]) and returns how it went.
    pub fn await_termination(&self) -> Result<RunSummary> {
        let handle = match std::mem::replace(&mut *self.phase(), Phase::Finished) {
            Phase::Running(h) => h,
            _ => return Err(Error::Lifecycle("the context is not running".into())),
        };
        handle.join().map_err(|_| Error::Lifecycle("the scheduler thread panicked".into()))?
    }

    /// `start` then `await_termination`.
    pub fn run(&self) -> Result<RunSummary> {
        self.start()?;
        self.await_termination()
    }

    /// Runs with [`Trigger::AvailableNow`] whatever the configured trigger, and waits.
    pub fn run_available(&self) -> Result<RunSummary> {
        self.start_with(Trigger::AvailableNow)?;
        self.await_termination()
    }
}
