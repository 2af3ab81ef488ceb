//! One job on several processes: every process runs [`ScaleOut::run`] with the same program and
//! checkpoint location, joins the job's consumer group ([`Membership`]) and runs the tasks the
//! group assigns it. A task is one partition number of the job's Kafka topics; it runs as a
//! complete cairn job of its own (the graph built by the user's function, its sources restricted
//! to the task's partitions) on its own checkpoint location under the job's
//! ([`cairn::checkpoint::paths::task_location`]), so everything the single-process engine
//! guarantees (recovery, replay with identical input, damage tolerance, retention) holds per
//! task, and a task moves to another process by that process taking its location over.
//!
//! Fencing: a process given a task takes the task location's lease in a new epoch at once
//! ([`cairn::checkpoint::CheckpointStore::take_over_lease`]); the previous owner's every later
//! write (plans, checkpoints) checks for that epoch and stops, its PostgreSQL writes are refused
//! on the progress row's epoch, and its Kafka producer is fenced by the new owner's
//! `init_transactions` on the task's transactional id.

use super::membership::{Membership, MembershipConfig, Task, TaskChange};
use cairn::checkpoint::member_log::{MemberLog, MemberLogStats};
use cairn::checkpoint::paths::task_location;
use cairn::checkpoint::CheckpointStore;
use cairn::{StreamingContext, StreamingContextBuilder, TaskId};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds the job of one task from a builder already set to the task's checkpoint location
/// and task ([`StreamingContextBuilder::task`]); called every time this process is given a task.
pub type BuildTask = dyn Fn(StreamingContextBuilder) -> cairn::Result<StreamingContext> + Send + Sync;

/// Why a scaled-out process stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScaleOutError {
    /// The consumer group or the brokers failed (joining, polling, the anchor topic's metadata).
    #[error("scale-out membership: {0}")]
    Membership(String),
    /// The location cannot hold a scaled-out job.
    #[error("scale-out location {location}: {reason}")]
    Location {
        /// The job's checkpoint location.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A task failed in a way no other process would fix (the job stops on every process that
    /// takes the task: a bad record, an incompatible change, a sink's schema).
    #[error("task {task}: {error}")]
    Task {
        /// The task.
        task: Task,
        /// How it failed.
        error: cairn::Error,
    },
}

/// What one process did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScaleOutSummary {
    /// Times the group gave this process tasks.
    pub assignments: u64,
    /// Tasks started, per task.
    pub started: BTreeMap<Task, u64>,
    /// Tasks this process stopped running because another process took them over (fenced).
    pub fenced: BTreeMap<Task, u64>,
    /// What this process's member log stored: its tasks' plans and deltas (`entries`) in
    /// `objects` objects ([`cairn::checkpoint::member_log`]).
    pub member_log: MemberLogStats,
}

/// What happened to this process's tasks, reported to [`ScaleOut::on_rebalance`] as it
/// happens. Times are wall-clock milliseconds since the Unix epoch (`at_ms`) and durations in
/// milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RebalanceEvent {
    /// The group gave this process tasks.
    Assigned {
        /// The tasks.
        tasks: Vec<Task>,
        /// When the assignment arrived.
        at_ms: i64,
    },
    /// The tasks restored their state and replayed their logged batches and now run.
    Started {
        /// The tasks.
        tasks: Vec<Task>,
        /// From the assignment to running: restore and replay, for all of them at once.
        took_ms: u64,
    },
    /// A started task committed its first batch since the assignment.
    FirstBatch {
        /// The task.
        task: Task,
        /// The task batch.
        batch: u64,
        /// From the assignment to that commit.
        since_assigned_ms: u64,
    },
    /// Tasks stopped: handed over (`revoked`), lost with the session (`lost`), or this process
    /// stopping.
    Stopped {
        /// The tasks.
        tasks: Vec<Task>,
        /// `handed over`, `lost`, `stopping`, ...
        why: String,
        /// Finishing the batch and the final checkpoint.
        took_ms: u64,
    },
    /// A task this process ran was taken over by another process (its writes were fenced).
    Fenced {
        /// The task.
        task: Task,
        /// The fenced error the task stopped with.
        error: String,
    },
}

type OnRebalance = Arc<dyn Fn(&RebalanceEvent) + Send + Sync>;
type AttachHook = Box<dyn FnOnce(&StreamingContext) -> cairn::Result<()> + Send>;

/// Moves the process metrics with a rebalance step.
#[cfg(feature = "http")]
fn feed_metrics(m: &cairn_web::Metrics, e: &RebalanceEvent) {
    let ids = |ts: &[Task]| ts.iter().map(|&t| t as u32).collect::<Vec<u32>>();
    match e {
        RebalanceEvent::Assigned { tasks, .. } => m.tasks_assigned(&ids(tasks)),
        RebalanceEvent::Started { tasks, took_ms } => {
            m.tasks_started(&ids(tasks), Duration::from_millis(*took_ms))
        }
        RebalanceEvent::FirstBatch { task, since_assigned_ms, .. } => {
            m.task_first_batch(*task as u32, Duration::from_millis(*since_assigned_ms))
        }
        RebalanceEvent::Stopped { tasks, why, took_ms } => {
            m.tasks_stopped(&ids(tasks), why, Duration::from_millis(*took_ms))
        }
        RebalanceEvent::Fenced { task, error } => m.task_fenced(*task as u32, error),
    }
}

#[allow(clippy::disallowed_methods)] // event times are for people and other processes
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Reports a task's first committed batch after it started.
struct FirstBatch {
    task: Task,
    assigned: Instant,
    done: AtomicBool,
    report: OnRebalance,
}

impl cairn::StreamingListener for FirstBatch {
    fn on_batch_completed(&self, p: &cairn::BatchProgress) {
        if !self.done.swap(true, Ordering::SeqCst) {
            (self.report)(&RebalanceEvent::FirstBatch {
                task: self.task,
                batch: p.batch_id.0,
                since_assigned_ms: self.assigned.elapsed().as_millis() as u64,
            });
        }
    }
}

/// One process of a job that runs on several. See the module documentation.
///
/// ```no_run
/// use cairn_connectors::kafka::{KafkaSource, ScaleOut, StartFrom};
/// use std::time::Duration;
/// ScaleOut::new("127.0.0.1:9092", "clicks", "s3://bucket/jobs/clicks")
///     .run(|builder| {
///         let ctx = builder.app_name("clicks").batch_interval(Duration::from_secs(1)).build()?;
///         let source = KafkaSource::new("127.0.0.1:9092", "clicks", StartFrom::Earliest, 10_000)
///             .map_err(|e| cairn::Error::User(e.to_string()))?;
///         ctx.source("clicks", source)?.count().print(1);
///         Ok(ctx)
///     })
///     .unwrap();
/// ```
pub struct ScaleOut {
    membership: MembershipConfig,
    location: String,
    stop_on_signals: bool,
    stop: Arc<AtomicBool>,
    report: OnRebalance,
    /// Process metrics the tasks and rebalance steps are fed into.
    #[cfg(feature = "http")]
    metrics: Option<cairn_web::Metrics>,
}

/// A task this process runs.
struct Running {
    ctx: StreamingContext,
}

type Engines = Arc<Mutex<BTreeMap<Task, Running>>>;

fn lock(e: &Engines) -> std::sync::MutexGuard<'_, BTreeMap<Task, Running>> {
    e.lock().unwrap_or_else(|e| e.into_inner())
}

/// The default consumer group of a location: `cairn-` and a hash of the location, so that
/// processes started on the same location meet and processes of different jobs never do.
fn default_group(location: &str) -> String {
    let h = location
        .trim_end_matches('/')
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("cairn-{h:016x}")
}

impl ScaleOut {
    /// A process of the job whose tasks are the partitions of `anchor_topic` (the first of its
    /// co-partitioned source topics), checkpointing under `location`. The consumer group is
    /// `cairn-<hash of the location>` unless [`group`](Self::group) names one; the session
    /// timeout is 10 s.
    pub fn new(brokers: &str, anchor_topic: &str, location: &str) -> Self {
        Self {
            membership: MembershipConfig::new(brokers, &default_group(location), anchor_topic),
            location: location.trim_end_matches('/').to_string(),
            stop_on_signals: true,
            stop: Arc::new(AtomicBool::new(false)),
            report: Arc::new(|e: &RebalanceEvent| tracing::info!("rebalance: {e:?}")),
            #[cfg(feature = "http")]
            metrics: None,
        }
    }

    /// The consumer group the processes of the job meet in.
    pub fn group(mut self, group: &str) -> Self {
        self.membership.group = group.to_string();
        self
    }

    /// How long the group waits for a silent process before giving its tasks to the others
    /// (default 10 s; brokers allow 6 s at least by default): the detection part of failover.
    pub fn session_timeout(mut self, d: Duration) -> Self {
        self.membership.session_timeout = d;
        self
    }

    /// Extra librdkafka settings of the membership consumer (security, client id).
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.membership.config.push((key.to_string(), value.to_string()));
        self
    }

    /// Whether SIGINT and SIGTERM stop the process gracefully (default yes): every task
    /// finishes its batch and checkpoints, then the process leaves the group, and the tasks
    /// move to the other processes with nothing to replay.
    pub fn stop_on_signals(mut self, yes: bool) -> Self {
        self.stop_on_signals = yes;
        self
    }

    /// Called with every [`RebalanceEvent`] (default: logged at info level). The seed job prints
    /// them as JSON lines on stderr.
    pub fn on_rebalance(mut self, f: impl Fn(&RebalanceEvent) + Send + Sync + 'static) -> Self {
        self.report = Arc::new(f);
        self
    }

    /// Feeds this process's tasks and rebalance steps into `metrics` (made with
    /// [`cairn_web::Metrics::for_process`]; serve them with [`cairn_web::serve_metrics`]): every
    /// task's series labelled with the task while this process runs it, the tasks it runs, and
    /// how long rebalances took.
    #[cfg(feature = "http")]
    pub fn metrics(mut self, metrics: cairn_web::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The rebalance reporter: the user's, after the process metrics when there are any.
    fn reporter(&self) -> OnRebalance {
        #[cfg(feature = "http")]
        if let Some(m) = self.metrics.clone() {
            let user = self.report.clone();
            return Arc::new(move |e: &RebalanceEvent| {
                feed_metrics(&m, e);
                user(e)
            });
        }
        self.report.clone()
    }

    /// A flag that stops [`run`](Self::run) gracefully when set (from another thread).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The consumer group this process joins.
    pub fn group_name(&self) -> &str {
        &self.membership.group
    }

    /// Runs this process's share of the job until it is stopped (signal or
    /// [`stop_flag`](Self::stop_flag)) or a task fails for good. `build` makes the job of one
    /// task; it must use the builder it is given (which carries the task's location and task).
    pub fn run(
        mut self,
        build: impl Fn(StreamingContextBuilder) -> cairn::Result<StreamingContext> + Send + Sync + 'static,
    ) -> Result<ScaleOutSummary, ScaleOutError> {
        self.report = self.reporter();
        let build: Arc<BuildTask> = Arc::new(build);
        let root = CheckpointStore::open(&self.location).map_err(|e| self.location_error(e.to_string()))?;
        if root.read_metadata().map_err(|e| self.location_error(e.to_string()))?.is_some() {
            return Err(self.location_error(
                "it holds a job that ran as one process; its state cannot be split into tasks yet, so start \
                 the scaled-out job on a new location (or keep running it as one process)"
                    .into(),
            ));
        }
        // Held for the whole run, so that every task this process runs shares one log.
        let member_log = MemberLog::shared(&self.location).map_err(|e| self.location_error(e.to_string()))?;
        let tasks = self.task_count()?;
        if self.stop_on_signals {
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, self.stop.clone()).map_err(|e| {
                    ScaleOutError::Membership(format!("cannot install a signal handler: {e}"))
                })?;
            }
        }
        let engines: Engines = Arc::default();
        let hook_engines = engines.clone();
        let hook_report = self.report.clone();
        let membership = Membership::join(&self.membership, move |revoked: &BTreeSet<Task>| {
            // A handover: checkpoint and release before the group gives the tasks away, so the
            // next owner replays nothing.
            let stopping: Vec<(Task, Running)> =
                revoked.iter().filter_map(|t| lock(&hook_engines).remove(t).map(|r| (*t, r))).collect();
            stop_all(stopping, "handed over", &hook_report);
        })
        .map_err(|e| ScaleOutError::Membership(e.to_string()))?;
        tracing::info!(
            "joined group {} for {} task(s) of {} at {}",
            self.membership.group,
            tasks,
            self.membership.anchor_topic,
            self.location
        );
        let mut summary = ScaleOutSummary::default();
        let result = self.serve(&membership, &engines, &build, tasks, &mut summary);
        // Checkpoint and release every task before leaving: once this process leaves, the
        // group gives its tasks to others, whose takeover would fence a final checkpoint.
        let all: Vec<(Task, Running)> = std::mem::take(&mut *lock(&engines)).into_iter().collect();
        stop_all(all, "stopping", &self.report);
        if let Err(e) = membership.leave() {
            tracing::warn!("leaving group {}: {e}", self.membership.group);
        }
        summary.member_log = member_log.stats();
        result.map(|()| summary)
    }

    fn serve(
        &self,
        membership: &Membership,
        engines: &Engines,
        build: &Arc<BuildTask>,
        tasks: u32,
        summary: &mut ScaleOutSummary,
    ) -> Result<(), ScaleOutError> {
        while !self.stop.load(Ordering::SeqCst) {
            let changes = membership
                .poll(Duration::from_millis(100))
                .map_err(|e| ScaleOutError::Membership(e.to_string()))?;
            for change in changes {
                match &change {
                    TaskChange::Assigned(ts) => {
                        summary.assignments += 1;
                        (self.report)(&RebalanceEvent::Assigned {
                            tasks: ts.iter().copied().collect(),
                            at_ms: wall_ms(),
                        });
                        let started = self.start_tasks(ts, build, tasks)?;
                        for (t, r) in started {
                            *summary.started.entry(t).or_default() += 1;
                            // Given a task it still runs (a loss it was not told about): the
                            // old run is fenced by the new one's epoch; stop it.
                            if let Some(old) = lock(engines).insert(t, r) {
                                stop_all(vec![(t, old)], "assigned again", &self.report);
                            }
                        }
                    }
                    TaskChange::Revoked(ts) | TaskChange::Lost(ts) => {
                        let why = if matches!(change, TaskChange::Lost(_)) { "lost" } else { "revoked" };
                        let stopping: Vec<(Task, Running)> =
                            ts.iter().filter_map(|t| lock(engines).remove(t).map(|r| (*t, r))).collect();
                        stop_all(stopping, why, &self.report);
                    }
                }
            }
            // Tasks that ended on their own: fenced by a new owner, or failed for good.
            let ended: Vec<(Task, Running)> = {
                let mut e = lock(engines);
                let done: Vec<Task> =
                    e.iter().filter(|(_, r)| !r.ctx.is_running()).map(|(t, _)| *t).collect();
                done.into_iter().filter_map(|t| e.remove(&t).map(|r| (t, r))).collect()
            };
            for (t, r) in ended {
                let held = r.ctx.task_epoch();
                match r.ctx.await_termination() {
                    Ok(_) if self.stop.load(Ordering::SeqCst) => {}
                    Ok(s) => tracing::warn!("task {t} stopped on its own after batch {:?}", s.next_batch),
                    Err(e) if self.superseded(t, held) => {
                        *summary.fenced.entry(t).or_default() += 1;
                        tracing::warn!("task {t} was taken over by another process: {e}");
                        (self.report)(&RebalanceEvent::Fenced { task: t, error: e.to_string() });
                    }
                    Err(error) => return Err(ScaleOutError::Task { task: t, error }),
                }
            }
        }
        Ok(())
    }

    /// Builds and starts the given tasks at once (each restores its state and replays its
    /// logged batches while starting).
    fn start_tasks(
        &self,
        ts: &BTreeSet<Task>,
        build: &Arc<BuildTask>,
        tasks: u32,
    ) -> Result<Vec<(Task, Running)>, ScaleOutError> {
        let t0 = Instant::now();
        let results: Vec<(Task, cairn::Result<StreamingContext>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ts
                .iter()
                .map(|&t| {
                    let build = build.clone();
                    let loc = task_location(&self.location, t as u32);
                    let first = Arc::new(FirstBatch {
                        task: t,
                        assigned: t0,
                        done: AtomicBool::new(false),
                        report: self.report.clone(),
                    });
                    let attach = self.attach_hook();
                    (t, s.spawn(move || start_task(&*build, &loc, t, tasks, first, attach)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(t, h)| {
                    (
                        t,
                        h.join().unwrap_or_else(|_| {
                            Err(cairn::Error::Lifecycle("building the task panicked".into()))
                        }),
                    )
                })
                .collect()
        });
        let mut out = Vec::new();
        let mut failed = None;
        for (t, r) in results {
            match r {
                Ok(ctx) => out.push((t, Running { ctx })),
                Err(e) if self.superseded(t, None) => {
                    tracing::warn!("task {t}: taken over while starting: {e}")
                }
                Err(e) => failed = failed.or(Some(ScaleOutError::Task { task: t, error: e })),
            }
        }
        (self.report)(&RebalanceEvent::Started {
            tasks: out.iter().map(|(t, _)| *t).collect(),
            took_ms: t0.elapsed().as_millis() as u64,
        });
        match failed {
            Some(e) => {
                stop_all(out, "a sibling task failed to start", &self.report);
                Err(e)
            }
            None => Ok(out),
        }
    }

    /// Whether task `t`'s location has a lease epoch newer than `held` (the last one this
    /// process took; with `None`, whether any epoch exists that this process does not hold).
    fn superseded(&self, t: Task, held: Option<u64>) -> bool {
        let loc = task_location(&self.location, t as u32);
        let latest = CheckpointStore::open(&loc).and_then(|s| s.latest_epoch());
        match (latest, held) {
            (Ok(Some(latest)), Some(held)) => latest > held,
            (Ok(Some(_)), None) => true,
            (Ok(None), _) => false,
            (Err(e), _) => {
                tracing::warn!("cannot read the lease of task {t}: {e}");
                false
            }
        }
    }

    /// The number of tasks: the anchor topic's partition count, as the brokers say now.
    fn task_count(&self) -> Result<u32, ScaleOutError> {
        let topic = &self.membership.anchor_topic;
        let c: BaseConsumer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &self.membership.brokers)
            .set("broker.address.family", "v4")
            .create()
            .map_err(|e| ScaleOutError::Membership(format!("cannot create a client: {e}")))?;
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| ScaleOutError::Membership(format!("cannot fetch the metadata of {topic}: {e}")))?;
        match md.topics().iter().find(|t| t.name() == topic) {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as u32),
            _ => Err(ScaleOutError::Membership(format!(
                "the anchor topic {topic} does not exist on {}",
                self.membership.brokers
            ))),
        }
    }

    /// What to do with a task's context before it starts: attach it to the process metrics.
    fn attach_hook(&self) -> AttachHook {
        #[cfg(feature = "http")]
        if let Some(m) = self.metrics.clone() {
            return Box::new(move |ctx: &StreamingContext| {
                m.attach(ctx).map_err(|e| cairn::Error::Lifecycle(e.to_string()))
            });
        }
        Box::new(|_: &StreamingContext| Ok(()))
    }

    fn location_error(&self, reason: String) -> ScaleOutError {
        ScaleOutError::Location { location: self.location.clone(), reason }
    }
}

fn start_task(
    build: &BuildTask,
    loc: &str,
    t: Task,
    tasks: u32,
    first: Arc<FirstBatch>,
    attach: AttachHook,
) -> cairn::Result<StreamingContext> {
    let ctx = build(StreamingContext::builder().checkpoint(loc).task(TaskId(t as u32), tasks))?;
    ctx.add_listener(first);
    attach(&ctx)?;
    if ctx.task().map(|a| a.id) != Some(TaskId(t as u32)) {
        return Err(cairn::Error::Config(format!(
            "the job built for task {t} does not run as that task: build it from the builder ScaleOut::run passes"
        )));
    }
    ctx.start()?;
    Ok(ctx)
}

/// Stops tasks gracefully (each finishes its batch and checkpoints; one whose lease is gone
/// just stops), all at once.
fn stop_all(tasks: Vec<(Task, Running)>, why: &str, report: &OnRebalance) {
    if tasks.is_empty() {
        return;
    }
    let t0 = Instant::now();
    let names: Vec<Task> = tasks.iter().map(|(t, _)| *t).collect();
    for (_, r) in &tasks {
        r.ctx.stop();
    }
    for (t, r) in tasks {
        if let Err(e) = r.ctx.await_termination() {
            tracing::info!("task {t} ended with: {e}");
        }
    }
    report(&RebalanceEvent::Stopped {
        tasks: names,
        why: why.to_string(),
        took_ms: t0.elapsed().as_millis() as u64,
    });
}
