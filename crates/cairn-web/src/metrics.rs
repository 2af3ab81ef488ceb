//! A job's Prometheus metrics: one `prometheus-client` registry per job, fed from the job's
//! progress events (one update per batch, per checkpoint write and per recovery, never per
//! record).

use cairn::{
    BatchProgress, CheckpointFailed, CheckpointMaintained, CheckpointWritten, LeaseLost, RecoveryFinished,
    RestartScheduled, StreamingContext, StreamingListener,
};
use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus
/// scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Batches kept for the page's timeline.
const TIMELINE: usize = 600;
/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The `task` label of a scaled-out process's series (the task that produced the figure). A job
/// that runs as one process has no tasks, and its series carry no such label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
struct TaskLabel(Option<u32>);

impl EncodeLabelSet for TaskLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(t) => ("task", t).encode(encoder.encode_label()),
            None => Ok(()),
        }
    }
}

/// The label that tells stateful operators apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct OperatorLabels {
    operator: String,
}

/// The label that tells receivers apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ReceiverLabels {
    receiver: String,
}

/// The labels that tell source partitions apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct PartitionLabels {
    source: String,
    partition: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
/// One series per task (one unlabelled series for a job that runs as one process).
type PerTask<M> = Family<TaskLabel, M>;
type PerTaskHistogram = Family<TaskLabel, Histogram, fn() -> Histogram>;
type PerOperator = Family<(TaskLabel, OperatorLabels), Gauge>;
type PerPartition = Family<(TaskLabel, PartitionLabels), Gauge>;
type PerReceiver<M> = Family<(TaskLabel, ReceiverLabels), M>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Every metric of one job (or of one process of a scaled-out job), each registered once in
/// its own registry.
struct Families {
    batches: PerTask<Counter>,
    replayed_batches: PerTask<Counter>,
    input_records: PerTask<Counter>,
    checkpoints_written: PerTask<Counter>,
    checkpoint_failures: PerTask<Counter>,
    checkpoint_written_bytes: PerTask<Counter>,
    checkpoint_write_retries: PerTask<Counter>,
    checkpoint_deferrals: PerTask<Counter>,
    checkpoint_compactions: PerTask<Counter>,
    checkpoint_retention_deleted: PerTask<Counter>,
    recovery_seconds: PerTask<FloatGauge>,
    checkpoint_backpressure_seconds: PerTask<Counter<f64, AtomicU64>>,
    recovery_warnings: PerTask<Counter>,
    lease_lost: PerTask<Counter>,
    restarts: PerTask<Counter>,
    last_batch_id: PerTask<Gauge>,
    scheduling_delay_seconds: PerTask<FloatGauge>,
    checkpoint_queue_depth: PerTask<Gauge>,
    checkpoint_chain: PerTask<Gauge>,
    checkpoint_restore_estimate_seconds: PerTask<FloatGauge>,
    input_rows_per_second: PerTask<FloatGauge>,
    processed_rows_per_second: PerTask<FloatGauge>,
    state_keys: PerOperator,
    source_lag_records: PerPartition,
    state_checkpoint_bytes: PerOperator,
    receiver_records: PerReceiver<Counter>,
    receiver_refused: PerReceiver<Counter>,
    receiver_rate_limit: PerReceiver<FloatGauge>,
    batch_processing_seconds: PerTaskHistogram,
    checkpoint_write_seconds: PerTaskHistogram,
    /// Scaled-out processes only (not registered for a job that runs as one process).
    tasks: Tasks,
}

/// A scaled-out process's tasks and rebalances.
struct Tasks {
    owned: Gauge,
    epoch: PerTask<Gauge>,
    assignments: Counter,
    fenced: Counter,
    start_seconds: Histogram,
    first_batch_seconds: Histogram,
    stop_seconds: Histogram,
}

impl Default for Families {
    fn default() -> Self {
        Self {
            batches: Family::default(),
            replayed_batches: Family::default(),
            input_records: Family::default(),
            checkpoints_written: Family::default(),
            checkpoint_failures: Family::default(),
            checkpoint_written_bytes: Family::default(),
            checkpoint_write_retries: Family::default(),
            checkpoint_deferrals: Family::default(),
            checkpoint_compactions: Family::default(),
            checkpoint_retention_deleted: Family::default(),
            recovery_seconds: Family::default(),
            checkpoint_backpressure_seconds: Family::default(),
            recovery_warnings: Family::default(),
            lease_lost: Family::default(),
            restarts: Family::default(),
            last_batch_id: Family::default(),
            scheduling_delay_seconds: Family::default(),
            checkpoint_queue_depth: Family::default(),
            checkpoint_chain: Family::default(),
            checkpoint_restore_estimate_seconds: Family::default(),
            input_rows_per_second: Family::default(),
            processed_rows_per_second: Family::default(),
            state_keys: Family::default(),
            source_lag_records: Family::default(),
            state_checkpoint_bytes: Family::default(),
            receiver_records: Family::default(),
            receiver_refused: Family::default(),
            receiver_rate_limit: Family::default(),
            batch_processing_seconds: Family::new_with_constructor(latency_histogram),
            checkpoint_write_seconds: Family::new_with_constructor(latency_histogram),
            tasks: Tasks::default(),
        }
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Self {
            owned: Gauge::default(),
            epoch: Family::default(),
            assignments: Counter::default(),
            fenced: Counter::default(),
            start_seconds: Histogram::new(REBALANCE_BUCKETS),
            first_batch_seconds: Histogram::new(REBALANCE_BUCKETS),
            stop_seconds: Histogram::new(REBALANCE_BUCKETS),
        }
    }
}

/// A family with one series per task, so that a task's series are created and removed together.
trait TaskSeries {
    fn create(&self, t: TaskLabel);
    fn remove(&self, t: TaskLabel);
}

impl<M, C> TaskSeries for Family<TaskLabel, M, C>
where
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    fn create(&self, t: TaskLabel) {
        // Creating the series is the point: it then shows 0 until the first event.
        drop(self.get_or_create(&t));
    }
    fn remove(&self, t: TaskLabel) {
        Family::remove(self, &t);
    }
}

impl Families {
    /// Registers every metric in `r`; the scale-out ones only for a process of a scaled-out job.
    fn register(&self, r: &mut Registry, scaled_out: bool) {
        let f = self;
        r.register("batches", "Batches completed (replays included)", f.batches.clone());
        r.register("replayed_batches", "Batches re-run after a restart", f.replayed_batches.clone());
        r.register("input_records", "Records read from sources", f.input_records.clone());
        r.register("checkpoints_written", "State checkpoints stored", f.checkpoints_written.clone());
        r.register(
            "checkpoint_failures",
            "State checkpoints that could not be stored after every retry (the job stops)",
            f.checkpoint_failures.clone(),
        );
        r.register_with_unit(
            "checkpoint_written",
            "Bytes of state checkpoints stored",
            Unit::Bytes,
            f.checkpoint_written_bytes.clone(),
        );
        r.register(
            "checkpoint_write_retries",
            "Storage requests of checkpoint writes retried after a transient failure (the store's one retry budget)",
            f.checkpoint_write_retries.clone(),
        );
        r.register(
            "checkpoint_deferrals",
            "Due checkpoints put off because storage was still writing earlier ones",
            f.checkpoint_deferrals.clone(),
        );
        r.register(
            "checkpoint_compactions",
            "Full snapshots compacted from a long delta chain off the batch path",
            f.checkpoint_compactions.clone(),
        );
        r.register(
            "checkpoint_retention_deleted",
            "Objects retention deleted (checkpoints, plans and commits no kept checkpoint needs)",
            f.checkpoint_retention_deleted.clone(),
        );
        r.register_with_unit(
            "recovery",
            "Time the latest recovery took (metadata, log, restoring the checkpoint; replays run after it)",
            Unit::Seconds,
            f.recovery_seconds.clone(),
        );
        r.register_with_unit(
            "checkpoint_backpressure",
            "Time batches spent blocked waiting for room in the checkpoint queue",
            Unit::Seconds,
            f.checkpoint_backpressure_seconds.clone(),
        );
        r.register(
            "recovery_warnings",
            "Problems recovery worked around (a damaged checkpoint fallen back past, a torn last plan)",
            f.recovery_warnings.clone(),
        );
        r.register(
            "lease_lost",
            "Times another process took the checkpoint location over (the job stops)",
            f.lease_lost.clone(),
        );
        r.register(
            "restarts",
            "Restarts in place from the checkpoint after a transient failure (a dependency briefly down)",
            f.restarts.clone(),
        );
        r.register("last_batch_id", "Id of the latest completed batch", f.last_batch_id.clone());
        r.register_with_unit(
            "scheduling_delay",
            "How late the latest batch started",
            Unit::Seconds,
            f.scheduling_delay_seconds.clone(),
        );
        r.register(
            "checkpoint_queue_depth",
            "Checkpoints waiting to be written",
            f.checkpoint_queue_depth.clone(),
        );
        r.register(
            "checkpoint_chain",
            "Objects a restore of the newest checkpoint would read (its chain through a full snapshot)",
            f.checkpoint_chain.clone(),
        );
        r.register(
            "checkpoint_restore_estimate_seconds",
            "What a restore of the newest checkpoint would take now: its chain at the measured read latency and bandwidth",
            f.checkpoint_restore_estimate_seconds.clone(),
        );
        r.register(
            "input_rows_per_second",
            "Input rate of the latest batch (records per second since the previous batch started)",
            f.input_rows_per_second.clone(),
        );
        r.register(
            "processed_rows_per_second",
            "Records per second of processing time in the latest batch",
            f.processed_rows_per_second.clone(),
        );
        r.register("state_keys", "Live keys per stateful operator", f.state_keys.clone());
        r.register(
            "source_lag_records",
            "Records of a source partition left unread after the latest batch's plan (Kafka: end offset minus planned end)",
            f.source_lag_records.clone(),
        );
        r.register_with_unit(
            "state_checkpoint",
            "Uncompressed bytes of each stateful operator's state in the latest checkpoint cut",
            Unit::Bytes,
            f.state_checkpoint_bytes.clone(),
        );
        r.register(
            "receiver_records",
            "Records a receiver took into its write-ahead log",
            f.receiver_records.clone(),
        );
        r.register(
            "receiver_refused",
            "Pushes a receiver refused: its buffer was full or it was over its rate bound",
            f.receiver_refused.clone(),
        );
        r.register(
            "receiver_rate_limit",
            "A receiver's ingest rate bound in records per second (0: unbounded)",
            f.receiver_rate_limit.clone(),
        );
        r.register_with_unit(
            "batch_processing",
            "Time to run a batch's operators and sinks",
            Unit::Seconds,
            f.batch_processing_seconds.clone(),
        );
        r.register_with_unit(
            "checkpoint_write",
            "Time to store a state checkpoint (retries included)",
            Unit::Seconds,
            f.checkpoint_write_seconds.clone(),
        );
        if scaled_out {
            let t = &f.tasks;
            r.register("tasks", "Tasks this process runs now", t.owned.clone());
            r.register(
                "task_epoch",
                "The checkpoint lease epoch under which this process runs each task (it grows each time a task moves)",
                t.epoch.clone(),
            );
            r.register(
                "task_assignments",
                "Task assignments this process received from the group",
                t.assignments.clone(),
            );
            r.register(
                "tasks_fenced",
                "Tasks this process stopped because another process was given them",
                t.fenced.clone(),
            );
            r.register_with_unit(
                "task_start",
                "From an assignment to its tasks running: restore and replay",
                Unit::Seconds,
                t.start_seconds.clone(),
            );
            r.register_with_unit(
                "task_first_batch",
                "From an assignment to a task's first committed batch",
                Unit::Seconds,
                t.first_batch_seconds.clone(),
            );
            r.register_with_unit(
                "task_stop",
                "From a stop (handover, lost session, process stopping) to the tasks' final batch, checkpoint and lease release",
                Unit::Seconds,
                t.stop_seconds.clone(),
            );
        }
    }

    /// The families with one series per task.
    fn per_task(&self) -> [&dyn TaskSeries; 25] {
        [
            &self.batches,
            &self.replayed_batches,
            &self.input_records,
            &self.checkpoints_written,
            &self.checkpoint_failures,
            &self.checkpoint_written_bytes,
            &self.checkpoint_write_retries,
            &self.checkpoint_deferrals,
            &self.checkpoint_compactions,
            &self.checkpoint_retention_deleted,
            &self.recovery_seconds,
            &self.checkpoint_backpressure_seconds,
            &self.recovery_warnings,
            &self.lease_lost,
            &self.restarts,
            &self.last_batch_id,
            &self.scheduling_delay_seconds,
            &self.checkpoint_queue_depth,
            &self.checkpoint_chain,
            &self.checkpoint_restore_estimate_seconds,
            &self.input_rows_per_second,
            &self.processed_rows_per_second,
            &self.batch_processing_seconds,
            &self.checkpoint_write_seconds,
            &self.tasks.epoch,
        ]
    }
}

/// Rebalance events, checkpoint history rows and recoveries kept for the page.
const REBALANCES: usize = 100;
const CHECKPOINT_HISTORY: usize = 100;
const RECOVERIES: usize = 20;
/// Upper bounds (seconds) of the rebalance histograms' buckets: restores and handovers take
/// from milliseconds to minutes.
const REBALANCE_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0];

/// What the live page shows besides the metrics.
#[derive(Default)]
struct Page {
    timeline: VecDeque<BatchProgress>,
    last_checkpoint: Option<serde_json::Value>,
    last_restart: Option<RestartScheduled>,
    /// The tasks this process runs (scaled out): restored and running.
    owned: BTreeSet<u32>,
    /// Each task's latest batch.
    latest: BTreeMap<u32, BatchProgress>,
    rebalances: VecDeque<serde_json::Value>,
    /// Checkpoints written, compacted, deferred or failed, and retention runs, newest last.
    checkpoints: VecDeque<serde_json::Value>,
    recoveries: VecDeque<serde_json::Value>,
    /// The per-operator and per-partition series created for each task, so that they can be
    /// removed with it.
    seen: BTreeMap<TaskLabel, (BTreeSet<OperatorLabels>, BTreeSet<PartitionLabels>)>,
}

struct Shared {
    app: String,
    scaled_out: bool,
    registry: Registry,
    families: Families,
    page: Mutex<Page>,
}

/// One job's metrics and page data: a [`StreamingListener`] with its own Prometheus registry,
/// so several jobs in one process never mix their figures. Every series carries the label
/// `app` (the job's app name).
///
/// [`serve`](crate::serve) creates and registers one; to expose the figures through a server
/// of your own, create it with [`Metrics::for_context`], add it as a listener before the job
/// starts, and answer scrapes with [`Metrics::encode`].
///
/// ```
/// use std::sync::Arc;
/// let ctx = cairn::StreamingContext::builder().app_name("orders").build().unwrap();
/// let metrics = cairn_web::Metrics::for_context(&ctx);
/// ctx.add_listener(Arc::new(metrics.clone()));
/// assert!(metrics.encode().contains("cairn_batches_total{app=\"orders\"} 0"));
/// ```
///
/// A process of a scaled-out job runs several tasks, each its own job: [`Metrics::for_process`]
/// gives the process one registry in which every series carries the label `task`, each task is
/// added with [`attach`](Metrics::attach), and the rebalance steps (`tasks_assigned`,
/// `tasks_started`, ...) feed the `cairn_task*` metrics and the page's task table. A task's
/// series go when the process stops running it.
///
/// ```
/// use std::time::Duration;
/// let metrics = cairn_web::Metrics::for_process("orders");
/// metrics.tasks_assigned(&[3]);
/// let ctx = cairn::StreamingContext::builder().app_name("orders").task(cairn::TaskId(3), 12).build().unwrap();
/// metrics.attach(&ctx).unwrap();
/// metrics.tasks_started(&[3], Duration::from_millis(40));
/// let text = metrics.encode();
/// assert!(text.contains("cairn_batches_total{app=\"orders\",task=\"3\"} 0"), "{text}");
/// assert!(text.contains("cairn_tasks{app=\"orders\"} 1"), "{text}");
/// metrics.tasks_stopped(&[3], "handed over", Duration::from_millis(300));
/// assert!(!metrics.encode().contains("task=\"3\""));
/// ```
#[derive(Clone)]
pub struct Metrics(Arc<Shared>);

impl Metrics {
    fn with(app: &str, scaled_out: bool) -> Self {
        let labels = [("app".into(), app.to_string().into())];
        let mut registry = Registry::with_prefix_and_labels("cairn", labels.into_iter());
        let families = Families::default();
        families.register(&mut registry, scaled_out);
        Self(Arc::new(Shared {
            app: app.to_string(),
            scaled_out,
            registry,
            families,
            page: Mutex::default(),
        }))
    }

    /// Metrics for a job named `app` that runs as one process, every one registered at zero.
    pub fn new(app: &str) -> Self {
        let m = Self::with(app, false);
        m.create_series(TaskLabel(None), &[]);
        m
    }

    /// Metrics for `ctx`'s job: its app name, and `cairn_state_keys` and
    /// `cairn_state_checkpoint_bytes` at zero for each of its stateful operators.
    pub fn for_context(ctx: &StreamingContext) -> Self {
        let m = Self::with(ctx.app_name(), false);
        m.create_series(TaskLabel(None), &operators(ctx));
        m
    }

    /// Metrics for one process of a scaled-out job named `app`: no series until a task is
    /// [attached](Self::attach); the `cairn_task*` metrics of rebalances at zero.
    pub fn for_process(app: &str) -> Self {
        Self::with(app, true)
    }

    /// Adds `ctx` (one task of a scaled-out job, or a job that runs as one process) to these
    /// metrics: its series are created at zero, labelled with its task, and a listener is
    /// added to it. Call it before `ctx` starts.
    pub fn attach(&self, ctx: &StreamingContext) -> Result<(), crate::Error> {
        if ctx.is_started() {
            return Err(crate::Error::AlreadyStarted);
        }
        let t = TaskLabel(ctx.task().map(|a| a.id.0));
        self.create_series(t, &operators(ctx));
        ctx.add_listener(Arc::new(TaskMetrics { m: self.clone(), t }));
        Ok(())
    }

    fn create_series(&self, t: TaskLabel, operators: &[String]) {
        let f = self.f();
        for fam in f.per_task() {
            fam.create(t);
        }
        let mut page = self.page();
        let (ops, _) = page.seen.entry(t).or_default();
        for op in operators {
            let l = OperatorLabels { operator: op.clone() };
            drop(f.state_keys.get_or_create(&(t, l.clone())));
            drop(f.state_checkpoint_bytes.get_or_create(&(t, l.clone())));
            ops.insert(l);
        }
    }

    /// Removes every series of task `t`.
    fn forget(&self, t: TaskLabel) {
        let f = self.f();
        for fam in f.per_task() {
            fam.remove(t);
        }
        let (ops, parts) = self.page().seen.remove(&t).unwrap_or_default();
        for l in ops {
            f.state_keys.remove(&(t, l.clone()));
            f.state_checkpoint_bytes.remove(&(t, l));
        }
        for l in parts {
            f.source_lag_records.remove(&(t, l));
        }
    }

    fn f(&self) -> &Families {
        &self.0.families
    }

    fn page(&self) -> MutexGuard<'_, Page> {
        self.0.page.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job's app name.
    pub fn app(&self) -> &str {
        &self.0.app
    }

    /// Every metric in the OpenMetrics text exposition format (see [`CONTENT_TYPE`]), ending
    /// with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric type.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.0.registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }

    /// The data behind the live page: the app name, the latest batches' progress records (up
    /// to 600, every task's), the latest checkpoint written (with its task) and the number
    /// written, the restarts after transient failures (their number and the latest), and for
    /// a scaled-out process the tasks it runs (each with its epoch and latest batch) and its
    /// latest rebalance steps.
    pub fn progress_json(&self) -> serde_json::Value {
        let page = self.page();
        let sum = |fam: &PerTask<Counter>| page.seen.keys().map(|t| fam.get_or_create(t).get()).sum::<u64>();
        let tasks: Vec<_> = page
            .owned
            .iter()
            .map(|task| {
                let last = page.latest.get(task);
                serde_json::json!({
                    "task": task,
                    "epoch": last.map(|p| p.epoch),
                    "last_batch": last.map(|p| p.batch_id),
                    "records": last.map(|p| p.records),
                    "lag": last.map(|p| p.source_lag.iter().map(|l| l.records).sum::<u64>()),
                })
            })
            .collect();
        serde_json::json!({
            "app": self.0.app,
            "scaled_out": self.0.scaled_out,
            "batches": page.timeline,
            "last_checkpoint": page.last_checkpoint,
            "checkpoints_written": sum(&self.f().checkpoints_written),
            "restarts": sum(&self.f().restarts),
            "last_restart": page.last_restart,
            "tasks": tasks,
            "rebalances": page.rebalances,
            "checkpoint_history": page.checkpoints,
            "recoveries": page.recoveries,
        })
    }

    fn rebalance(&self, event: serde_json::Value) {
        push_bounded(&mut self.page().rebalances, event, REBALANCES);
    }

    /// A row of the page's checkpoint history (labelled with its task in a scaled-out process).
    fn history(&self, t: TaskLabel, mut row: serde_json::Value) {
        if let (Some(task), Some(obj)) = (t.0, row.as_object_mut()) {
            obj.insert("task".into(), task.into());
        }
        push_bounded(&mut self.page().checkpoints, row, CHECKPOINT_HISTORY);
    }

    fn set_owned(&self, change: impl FnOnce(&mut BTreeSet<u32>)) {
        let mut page = self.page();
        change(&mut page.owned);
        self.f().tasks.owned.set(i64::try_from(page.owned.len()).unwrap_or(i64::MAX));
    }

    /// The group gave this process `tasks`.
    pub fn tasks_assigned(&self, tasks: &[u32]) {
        self.f().tasks.assignments.inc();
        self.rebalance(serde_json::json!({ "event": "assigned", "at_ms": wall_ms(), "tasks": tasks }));
    }

    /// `tasks` restored their state, replayed their logged batches and run, `took` after their
    /// assignment.
    pub fn tasks_started(&self, tasks: &[u32], took: Duration) {
        self.f().tasks.start_seconds.observe(took.as_secs_f64());
        self.set_owned(|owned| owned.extend(tasks));
        self.rebalance(serde_json::json!({
            "event": "started", "at_ms": wall_ms(), "tasks": tasks, "took_ms": took.as_millis() as u64,
        }));
    }

    /// `task` committed its first batch since its assignment, `since_assigned` after it.
    pub fn task_first_batch(&self, task: u32, since_assigned: Duration) {
        self.f().tasks.first_batch_seconds.observe(since_assigned.as_secs_f64());
        self.rebalance(serde_json::json!({
            "event": "first_batch", "at_ms": wall_ms(), "tasks": [task],
            "took_ms": since_assigned.as_millis() as u64,
        }));
    }

    /// This process stopped running `tasks` (`why`: handed over, lost, stopping), `took` to
    /// finish their batches and final checkpoints. Their series go.
    pub fn tasks_stopped(&self, tasks: &[u32], why: &str, took: Duration) {
        self.f().tasks.stop_seconds.observe(took.as_secs_f64());
        self.stop_tasks(tasks);
        self.rebalance(serde_json::json!({
            "event": "stopped", "at_ms": wall_ms(), "tasks": tasks, "why": why,
            "took_ms": took.as_millis() as u64,
        }));
    }

    /// `task` was given to another process while this one ran it (its writes were fenced);
    /// `error` is what it stopped with. Its series go.
    pub fn task_fenced(&self, task: u32, error: &str) {
        self.f().tasks.fenced.inc();
        self.stop_tasks(&[task]);
        self.rebalance(
            serde_json::json!({ "event": "fenced", "at_ms": wall_ms(), "tasks": [task], "why": error }),
        );
    }

    fn stop_tasks(&self, tasks: &[u32]) {
        self.set_owned(|owned| owned.retain(|t| !tasks.contains(t)));
        for &t in tasks {
            self.page().latest.remove(&t);
            self.forget(TaskLabel(Some(t)));
        }
    }

    fn recovery_finished(&self, t: TaskLabel, e: &RecoveryFinished) {
        self.f().recovery_warnings.get_or_create(&t).inc_by(e.warnings.len() as u64);
        self.f().recovery_seconds.get_or_create(&t).set(e.restore_ms / 1e3);
        let mut row = serde_json::to_value(e).unwrap_or_default();
        if let (Some(task), Some(obj)) = (t.0, row.as_object_mut()) {
            obj.insert("task".into(), task.into());
        }
        push_bounded(&mut self.page().recoveries, row, RECOVERIES);
    }

    fn checkpoint_maintained(&self, t: TaskLabel, e: &CheckpointMaintained) {
        let f = self.f();
        f.checkpoint_retention_deleted.get_or_create(&t).inc_by(e.deleted);
        if let Some(bytes) = e.compacted_bytes {
            f.checkpoint_compactions.get_or_create(&t).inc();
            self.history(
                t,
                serde_json::json!({"batch_id": e.batch_id, "kind": "full (compacted)", "bytes": bytes, "deleted": e.deleted}),
            );
        } else if e.deleted > 0 {
            // Retention after a checkpoint shows on that checkpoint's row, not a row of its own.
            let mut page = self.page();
            let same = |r: &serde_json::Value| {
                r["batch_id"] == serde_json::json!(e.batch_id) && r["task"] == serde_json::json!(t.0)
            };
            match page.checkpoints.iter_mut().rev().find(|r| same(r)) {
                Some(row) => {
                    row["deleted"] = serde_json::json!(row["deleted"].as_u64().unwrap_or(0) + e.deleted)
                }
                None => {
                    drop(page);
                    self.history(t, serde_json::json!({"batch_id": e.batch_id, "kind": "retention", "deleted": e.deleted}));
                }
            }
        }
        if let Some(error) = &e.error {
            self.history(
                t,
                serde_json::json!({"batch_id": e.batch_id, "kind": "maintenance failed", "error": error}),
            );
        }
    }

    fn batch_completed(&self, t: TaskLabel, p: &BatchProgress) {
        let f = self.f();
        f.batches.get_or_create(&t).inc();
        if p.replayed {
            f.replayed_batches.get_or_create(&t).inc();
        }
        f.input_records.get_or_create(&t).inc_by(p.records);
        f.batch_processing_seconds.get_or_create(&t).observe(p.processing_ms / 1e3);
        if p.checkpoint_deferred {
            f.checkpoint_deferrals.get_or_create(&t).inc();
            self.history(t, serde_json::json!({"batch_id": p.batch_id, "kind": "deferred"}));
        }
        f.checkpoint_backpressure_seconds.get_or_create(&t).inc_by(p.checkpoint_wait_ms / 1e3);
        f.last_batch_id.get_or_create(&t).set(i64::try_from(p.batch_id.0).unwrap_or(i64::MAX));
        f.scheduling_delay_seconds.get_or_create(&t).set(p.scheduling_delay_ms / 1e3);
        f.checkpoint_queue_depth
            .get_or_create(&t)
            .set(i64::try_from(p.checkpoint_queue_depth).unwrap_or(i64::MAX));
        f.checkpoint_chain.get_or_create(&t).set(i64::try_from(p.checkpoint_chain).unwrap_or(i64::MAX));
        if let Some(ms) = p.checkpoint_restore_estimate_ms {
            f.checkpoint_restore_estimate_seconds.get_or_create(&t).set(ms / 1e3);
        }
        f.input_rows_per_second.get_or_create(&t).set(p.input_rows_per_s);
        f.processed_rows_per_second.get_or_create(&t).set(p.processed_rows_per_s);
        if t.0.is_some() {
            f.tasks.epoch.get_or_create(&t).set(i64::try_from(p.epoch).unwrap_or(i64::MAX));
        }
        let mut page = self.page();
        let (ops, parts) = page.seen.entry(t).or_default();
        for lag in &p.source_lag {
            let l = PartitionLabels { source: lag.source.clone(), partition: lag.partition.clone() };
            f.source_lag_records
                .get_or_create(&(t, l.clone()))
                .set(i64::try_from(lag.records).unwrap_or(i64::MAX));
            parts.insert(l);
        }
        for op in &p.operators {
            let l = OperatorLabels { operator: op.name.clone() };
            f.state_keys.get_or_create(&(t, l.clone())).set(i64::try_from(op.keys).unwrap_or(i64::MAX));
            f.state_checkpoint_bytes
                .get_or_create(&(t, l.clone()))
                .set(i64::try_from(op.checkpoint_bytes).unwrap_or(i64::MAX));
            ops.insert(l);
        }
        for r in &p.receivers {
            let l = (t, ReceiverLabels { receiver: r.name.clone() });
            let taken = f.receiver_records.get_or_create(&l);
            taken.inc_by(r.records.saturating_sub(taken.get()));
            let refused = f.receiver_refused.get_or_create(&l);
            refused.inc_by(r.refused.saturating_sub(refused.get()));
            f.receiver_rate_limit.get_or_create(&l).set(r.rate_limit.unwrap_or(0.0));
        }
        if let Some(task) = t.0 {
            page.latest.insert(task, p.clone());
        }
        if page.timeline.len() == TIMELINE {
            page.timeline.pop_front();
        }
        page.timeline.push_back(p.clone());
    }

    fn checkpoint_written(&self, t: TaskLabel, e: &CheckpointWritten) {
        let f = self.f();
        f.checkpoints_written.get_or_create(&t).inc();
        f.checkpoint_written_bytes.get_or_create(&t).inc_by(e.bytes);
        f.checkpoint_write_retries.get_or_create(&t).inc_by(u64::from(e.retries));
        f.checkpoint_write_seconds.get_or_create(&t).observe(e.write_ms / 1e3);
        let mut json = serde_json::to_value(e).unwrap_or_default();
        if let (Some(task), Some(obj)) = (t.0, json.as_object_mut()) {
            obj.insert("task".into(), task.into());
        }
        self.page().last_checkpoint = Some(json);
        self.history(
            t,
            serde_json::json!({
                "batch_id": e.batch_id, "kind": if e.full { "full" } else { "delta" }, "bytes": e.bytes,
                "objects": e.objects, "write_ms": e.write_ms, "retries": e.retries,
            }),
        );
    }

    fn checkpoint_failed(&self, t: TaskLabel, e: &CheckpointFailed) {
        let f = self.f();
        f.checkpoint_failures.get_or_create(&t).inc();
        f.checkpoint_write_retries.get_or_create(&t).inc_by(u64::from(e.retries));
        self.history(
            t,
            serde_json::json!({"batch_id": e.batch_id, "kind": "failed", "error": e.error, "retries": e.retries}),
        );
    }

    fn restart_scheduled(&self, t: TaskLabel, e: &RestartScheduled) {
        self.f().restarts.get_or_create(&t).inc();
        self.page().last_restart = Some(e.clone());
    }
}

fn push_bounded(q: &mut VecDeque<serde_json::Value>, v: serde_json::Value, max: usize) {
    if q.len() == max {
        q.pop_front();
    }
    q.push_back(v);
}

#[allow(clippy::disallowed_methods)] // event times are for people
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The stateful operators of `ctx`'s job.
fn operators(ctx: &StreamingContext) -> Vec<String> {
    ctx.graph_description()
        .operators
        .iter()
        .filter(|o| o.kind != cairn::checkpoint::OperatorKind::Source)
        .map(|o| o.name.clone())
        .collect()
}

/// Feeds one task's (or a single-process job's) events into its process's [`Metrics`].
struct TaskMetrics {
    m: Metrics,
    t: TaskLabel,
}

impl StreamingListener for TaskMetrics {
    fn on_recovery_finished(&self, e: &RecoveryFinished) {
        self.m.recovery_finished(self.t, e);
    }
    fn on_batch_completed(&self, p: &BatchProgress) {
        self.m.batch_completed(self.t, p);
    }
    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        self.m.checkpoint_written(self.t, e);
    }
    fn on_checkpoint_failed(&self, e: &CheckpointFailed) {
        self.m.checkpoint_failed(self.t, e);
    }
    fn on_checkpoint_maintained(&self, e: &CheckpointMaintained) {
        self.m.checkpoint_maintained(self.t, e);
    }
    fn on_lease_lost(&self, _e: &LeaseLost) {
        self.m.f().lease_lost.get_or_create(&self.t).inc();
    }
    fn on_restart_scheduled(&self, e: &RestartScheduled) {
        self.m.restart_scheduled(self.t, e);
    }
}

/// A job that runs as one process: its series carry no task.
impl StreamingListener for Metrics {
    fn on_recovery_finished(&self, e: &RecoveryFinished) {
        self.recovery_finished(TaskLabel(None), e);
    }
    fn on_batch_completed(&self, p: &BatchProgress) {
        self.batch_completed(TaskLabel(None), p);
    }
    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        self.checkpoint_written(TaskLabel(None), e);
    }
    fn on_checkpoint_failed(&self, e: &CheckpointFailed) {
        self.checkpoint_failed(TaskLabel(None), e);
    }
    fn on_checkpoint_maintained(&self, e: &CheckpointMaintained) {
        self.checkpoint_maintained(TaskLabel(None), e);
    }
    fn on_lease_lost(&self, _e: &LeaseLost) {
        self.f().lease_lost.get_or_create(&TaskLabel(None)).inc();
    }
    fn on_restart_scheduled(&self, e: &RestartScheduled) {
        self.restart_scheduled(TaskLabel(None), e);
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use cairn::OperatorProgress;

    const N: TaskLabel = TaskLabel(None);

    fn batch(id: u64) -> BatchProgress {
        BatchProgress {
            batch_id: cairn::BatchId(id),
            batch_time_ms: 0,
            started_at_ms: 0,
            records: 10,
            input_rows_per_s: 100.0,
            processed_rows_per_s: 1000.0,
            processing_ms: 10.0,
            scheduling_delay_ms: 250.0,
            checkpoint_ms: 0.0,
            checkpoint_wait_ms: 0.0,
            checkpointed: false,
            checkpoint_deferred: false,
            checkpoint_bytes: 0,
            checkpoint_queue_depth: 2,
            last_checkpoint_write_ms: None,
            state_keys: 3,
            operators: vec![OperatorProgress { name: "op".into(), keys: 3, checkpoint_bytes: 40 }],
            replayed: false,
            restarts: 0,
            checkpoint_chain: 1,
            checkpoint_restore_estimate_ms: Some(30.0),
            source_lag: vec![cairn::SourceLag { source: "in".into(), partition: "in[0]".into(), records: 7 }],
            task: None,
            epoch: 1,
            plan: Vec::new(),
            receivers: Vec::new(),
        }
    }

    #[test]
    fn each_event_moves_its_metrics_once() {
        let m = Metrics::new("unit");
        let f = m.f();
        m.on_batch_completed(&BatchProgress { checkpoint_deferred: true, ..batch(0) });
        m.on_batch_completed(&BatchProgress { checkpoint_wait_ms: 1500.0, replayed: true, ..batch(1) });
        m.on_checkpoint_written(&CheckpointWritten {
            batch_id: cairn::BatchId(1),
            bytes: 64,
            write_ms: 2.0,
            full: true,
            objects: 1,
            retries: 2,
        });
        m.on_checkpoint_failed(&CheckpointFailed {
            batch_id: cairn::BatchId(2),
            error: "disk".into(),
            retries: 3,
        });
        m.on_lease_lost(&LeaseLost { holder: "pid 7".into() });
        m.on_restart_scheduled(&RestartScheduled {
            restart: 1,
            attempt: 1,
            cause: "sink \"db\" failed in batch 2: connection refused".into(),
            wait_ms: 200,
            outage_ms: 1500,
            max_outage_ms: 60_000,
        });
        m.on_recovery_finished(&RecoveryFinished {
            restored_batch: Some(cairn::BatchId(0)),
            replay_batches: 1,
            next_batch: cairn::BatchId(1),
            warnings: vec!["a".into(), "b".into()],
            at_ms: 0,
            restore_ms: 12.0,
        });
        assert_eq!(f.batches.get_or_create(&N).get(), 2);
        assert_eq!(f.replayed_batches.get_or_create(&N).get(), 1);
        assert_eq!(f.input_records.get_or_create(&N).get(), 20);
        assert_eq!(f.checkpoint_deferrals.get_or_create(&N).get(), 1);
        assert_eq!(f.checkpoint_backpressure_seconds.get_or_create(&N).get(), 1.5);
        assert_eq!(f.checkpoints_written.get_or_create(&N).get(), 1);
        assert_eq!(f.checkpoint_written_bytes.get_or_create(&N).get(), 64);
        assert_eq!(f.checkpoint_write_retries.get_or_create(&N).get(), 5);
        assert_eq!(f.checkpoint_failures.get_or_create(&N).get(), 1);
        assert_eq!(f.lease_lost.get_or_create(&N).get(), 1);
        assert_eq!(f.restarts.get_or_create(&N).get(), 1);
        let page = m.progress_json();
        assert_eq!(page["restarts"], 1);
        assert!(page["last_restart"]["cause"].as_str().unwrap().contains("connection refused"));
        assert_eq!(f.recovery_warnings.get_or_create(&N).get(), 2);
        assert_eq!(f.last_batch_id.get_or_create(&N).get(), 1);
        assert_eq!(f.scheduling_delay_seconds.get_or_create(&N).get(), 0.25);
        assert_eq!(f.checkpoint_queue_depth.get_or_create(&N).get(), 2);
        assert_eq!(f.checkpoint_chain.get_or_create(&N).get(), 1);
        assert_eq!(f.checkpoint_restore_estimate_seconds.get_or_create(&N).get(), 0.03);
        let l = OperatorLabels { operator: "op".into() };
        assert_eq!(f.state_keys.get_or_create(&(N, l.clone())).get(), 3);
        let lag = PartitionLabels { source: "in".into(), partition: "in[0]".into() };
        assert_eq!(f.source_lag_records.get_or_create(&(N, lag)).get(), 7);
        assert_eq!(f.state_checkpoint_bytes.get_or_create(&(N, l)).get(), 40);
        m.on_checkpoint_maintained(&CheckpointMaintained {
            batch_id: cairn::BatchId(1),
            compacted_bytes: Some(99),
            deleted: 4,
            error: None,
        });
        assert_eq!(f.checkpoint_compactions.get_or_create(&N).get(), 1);
        assert_eq!(f.checkpoint_retention_deleted.get_or_create(&N).get(), 4);
        assert_eq!(f.recovery_seconds.get_or_create(&N).get(), 0.012);
        let page = m.progress_json();
        let kinds: Vec<_> =
            page["checkpoint_history"].as_array().unwrap().iter().map(|r| r["kind"].clone()).collect();
        assert_eq!(kinds, ["deferred", "full", "failed", "full (compacted)"]);
        assert_eq!(page["checkpoint_history"][1]["objects"], 1);
        assert_eq!(page["recoveries"][0]["restored_batch"], 0);
        assert_eq!(page["recoveries"][0]["replay_batches"], 1);
        let text = m.encode();
        assert!(text.contains("cairn_checkpoint_backpressure_seconds_total{app=\"unit\"} 1.5"), "{text}");
        assert!(text.contains("cairn_batch_processing_seconds_count{app=\"unit\"} 2"), "{text}");
        assert!(text.contains("cairn_checkpoint_write_seconds_count{app=\"unit\"} 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_scaled_out_process_labels_each_task_and_drops_the_tasks_it_stops_running() {
        let m = Metrics::for_process("so");
        m.tasks_assigned(&[1, 4]);
        for t in [1, 4] {
            let l = TaskMetrics { m: m.clone(), t: TaskLabel(Some(t)) };
            l.on_batch_completed(&BatchProgress { task: Some(t), epoch: 3, ..batch(u64::from(t)) });
        }
        m.tasks_started(&[1, 4], Duration::from_millis(120));
        m.task_first_batch(4, Duration::from_millis(900));
        let text = m.encode();
        for needle in [
            "cairn_tasks{app=\"so\"} 2",
            "cairn_batches_total{app=\"so\",task=\"1\"} 1",
            "cairn_batches_total{app=\"so\",task=\"4\"} 1",
            "cairn_last_batch_id{app=\"so\",task=\"4\"} 4",
            "cairn_task_epoch{app=\"so\",task=\"1\"} 3",
            "cairn_state_keys{app=\"so\",task=\"4\",operator=\"op\"} 3",
            "cairn_source_lag_records{app=\"so\",task=\"1\",source=\"in\",partition=\"in[0]\"} 7",
            "cairn_task_assignments_total{app=\"so\"} 1",
            "cairn_task_start_seconds_count{app=\"so\"} 1",
            "cairn_task_first_batch_seconds_sum{app=\"so\"} 0.9",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        // No unlabelled series in a scaled-out process: every figure belongs to a task.
        assert!(!text.contains("cairn_batches_total{app=\"so\"}"), "{text}");
        let page = m.progress_json();
        assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
        assert_eq!(page["tasks"][1]["lag"], 7);
        m.tasks_stopped(&[1], "handed over", Duration::from_millis(50));
        m.task_fenced(4, "task 4 was taken over");
        let text = m.encode();
        assert!(!text.contains("task=\""), "{text}");
        assert!(text.contains("cairn_tasks{app=\"so\"} 0"), "{text}");
        assert!(text.contains("cairn_tasks_fenced_total{app=\"so\"} 1"), "{text}");
        assert!(text.contains("cairn_task_stop_seconds_count{app=\"so\"} 1"), "{text}");
        let events: Vec<_> =
            m.progress_json()["rebalances"].as_array().unwrap().iter().map(|e| e["event"].clone()).collect();
        assert_eq!(events, ["assigned", "started", "first_batch", "stopped", "fenced"]);
    }
}
