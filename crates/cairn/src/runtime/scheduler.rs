//! The batch loop: plan → log the plan → run → sinks → commit → (every interval) cut a state
//! checkpoint and hand it to the background writer. Recovery happens in `prepare`.

use crate::api::context::{Inner, Trigger};
use crate::error::{Error, Result};
use crate::graph::state::{decode, encode_into, StatefulOp};
use crate::graph::{BatchCtx, BatchInfo};
use crate::runtime::failpoint;
use crate::runtime::progress::{BatchProgress, BatchStarted, OperatorProgress, RecoveryFinished};
use crate::runtime::writer::{CheckpointWriter, WriterStats};
use crate::sources::Positions;
use cairn_checkpoint::lease::Lease;
use cairn_checkpoint::{
    BatchCommit, BatchId, BatchPlan, CheckpointKind, CheckpointStore, GraphDescription, JobMetadata,
    OperatorDescription, PlanCopy, SourcePlan, StateCheckpoint, TableData, TableWriter, FORMAT_VERSION,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Batches re-run after a restart with their logged input.
    pub replayed_batches: u64,
    /// New batches planned and run.
    pub new_batches: u64,
    /// The id the next batch will get.
    pub next_batch: u64,
    /// Problems recovery worked around (a corrupt checkpoint it skipped, a torn plan).
    pub recovery_warnings: Vec<String>,
    /// State checkpoints cut during this run.
    pub checkpoints: u64,
    /// Bytes and objects of state checkpoints (and compacted snapshots) written by this run.
    pub checkpoint_bytes: u64,
    pub checkpoint_objects: u64,
    /// Batch log objects (plans and commits) written by this run.
    pub log_objects: u64,
}

/// Source positions with change tracking (checkpointed as `$source/<name>` tables).
#[derive(Default)]
struct SourcePositions {
    positions: Positions,
    changed: BTreeSet<String>,
}

/// Everything `prepare` established, handed to the run loop.
pub(crate) struct Prepared {
    store: Option<CheckpointStore>,
    lease: Option<Lease>,
    positions: BTreeMap<String, SourcePositions>,
    replay: Vec<BatchPlan>,
    committed: BTreeSet<BatchId>,
    next_batch: u64,
    last_checkpoint: Option<BatchId>,
    start_time_ms: i64,
    last_batch_time_ms: Option<i64>,
    warnings: Vec<String>,
    graph_desc: GraphDescription,
    /// Handed to sinks with every batch (see `BatchInfo::job_id`).
    job_id: Arc<str>,
    /// The restored state holds tables no current operator took (dropped or removed state): the
    /// next checkpoint is a full one, so those tables leave the chain instead of coming back.
    force_full: bool,
    /// A copy of the newest plan in the log, for the next plan to carry.
    last_plan: Option<PlanCopy>,
}

use cairn_checkpoint::paths::{source_table as source_table_id, table_of_operator};

pub(crate) fn describe_graph(inner: &Inner) -> GraphDescription {
    let g = inner.graph.lock();
    let mut operators: Vec<OperatorDescription> = g.stateful.iter().map(|op| op.describe()).collect();
    for s in &g.sources {
        operators.push(OperatorDescription {
            name: s.name().to_string(),
            kind: cairn_checkpoint::OperatorKind::Source,
            key_type: String::new(),
            state_type: "offsets".into(),
            state_version: 1,
        });
    }
    GraphDescription { operators, parallelism: inner.graph.parallelism as u32 }
}

/// Compares the stored graph with the code's. Removing or retyping a stateful operator would
/// silently drop or misread its state, so it is refused (unless the user drops that state).
/// Returns the operators whose stored state is dropped (removed or retyped, and named in
/// `drop_state`); their tables are not restored.
fn check_compatible(
    stored: &GraphDescription,
    current: &GraphDescription,
    drop: &[String],
) -> Result<Vec<String>> {
    let mut dropped = Vec::new();
    for change in cairn_checkpoint::compat::diff(stored, current) {
        if !change.is_compatible(&[]) && change.is_compatible(drop) {
            dropped.extend(change.operator().map(str::to_string));
        }
        if !change.is_compatible(drop) {
            return Err(Error::Incompatible {
                operator: change.operator().unwrap_or_default().to_string(),
                difference: change.to_string(),
            });
        }
        match change.operator() {
            Some(op) if drop.iter().any(|d| d == op) => {
                tracing::warn!("dropping the state of operator {op:?} as configured ({change})")
            }
            _ => tracing::info!("{change}"),
        }
    }
    Ok(dropped)
}

pub(crate) fn prepare(inner: &Inner) -> Result<Prepared> {
    let cfg = &inner.cfg;
    let (errors, stateful_names, sources) = {
        let g = inner.graph.lock();
        (
            g.errors.clone(),
            g.stateful.iter().map(|o| o.describe().name).collect::<Vec<_>>(),
            g.sources.iter().map(|s| s.name().to_string()).collect::<Vec<_>>(),
        )
    };
    if !errors.is_empty() {
        return Err(Error::Config(errors.join("; ")));
    }
    if inner.graph.lock().outputs.is_empty() {
        return Err(Error::Config(
            "the job has no output operation (foreach_batch, print, save_as_text_files): nothing would run"
                .into(),
        ));
    }
    let graph_desc = describe_graph(inner);
    let positions: BTreeMap<String, SourcePositions> =
        sources.iter().map(|s| (s.clone(), SourcePositions::default())).collect();
    let now = cfg.clock.now_ms();
    let interval = cfg.batch_interval.as_millis() as i64;
    let aligned_now = now - now.rem_euclid(interval);

    let Some(location) = cfg.checkpoint.clone() else {
        if !stateful_names.is_empty() {
            return Err(Error::Config(format!(
                "stateful operators {stateful_names:?} need a checkpoint location to be exactly-once across restarts; set one with .checkpoint(\"dir\")"
            )));
        }
        return Ok(Prepared {
            store: None,
            lease: None,
            positions,
            replay: Vec::new(),
            committed: BTreeSet::new(),
            next_batch: 0,
            last_checkpoint: None,
            start_time_ms: aligned_now,
            last_batch_time_ms: None,
            warnings: Vec::new(),
            graph_desc,
            job_id: format!("{}-{now:x}", cfg.app_name).into(),
            force_full: false,
            last_plan: None,
        });
    };
    let store = match &cfg.store {
        Some(s) => s.clone(),
        None => CheckpointStore::open(&location)?,
    };
    let lease = store.acquire_lease(cfg.lease_ttl)?;
    if failpoint::armed_name() == Some(failpoint::FREEZE_BEFORE_PLAN) {
        store.set_commit_hook(Some(Arc::new(|name| {
            if let cairn_checkpoint::paths::ObjectName::Plan(b) = name {
                failpoint::freeze(failpoint::FREEZE_BEFORE_PLAN, b.0);
            }
        })));
    }
    // Whatever fails from here on, this process gives the location back: a caller that fixes
    // the problem and retries in the same process must not find its own stale lease.
    match restore(inner, &store, &location, positions, graph_desc, now, aligned_now) {
        Ok(mut p) => {
            p.store = Some(store);
            p.lease = Some(lease);
            Ok(p)
        }
        Err(e) => {
            if let Err(le) = lease.release() {
                tracing::warn!("could not release the checkpoint lease: {le}");
            }
            Err(e)
        }
    }
}

/// Recovery proper: metadata, compatibility check, state, replay list.
fn restore(
    inner: &Inner,
    store: &CheckpointStore,
    location: &str,
    mut positions: BTreeMap<String, SourcePositions>,
    graph_desc: GraphDescription,
    now: i64,
    aligned_now: i64,
) -> Result<Prepared> {
    let cfg = &inner.cfg;
    let interval = cfg.batch_interval.as_millis() as i64;
    let recovered = store.recover()?;
    for w in &recovered.warnings {
        tracing::warn!("recovery: {w}");
    }
    // Objects a fenced-off holder left: this process holds the lease now, so they go before it
    // writes anything (its own writes would replace most of them anyway).
    store.remove_fenced(&recovered.fenced)?;
    let metadata = match recovered.metadata.clone() {
        Some(m) => {
            if m.batch_interval_ms != cfg.batch_interval.as_millis() as u64 {
                return Err(Error::Config(format!(
                    "the checkpoint at {location} was written with a batch interval of {} ms, the code says {} ms; batch times and windows depend on it, so restore the old interval or use a new checkpoint location",
                    m.batch_interval_ms,
                    cfg.batch_interval.as_millis()
                )));
            }
            for r in store.repair_metadata()? {
                tracing::info!("recovery: {r}");
            }
            m
        }
        None => {
            if recovered.state.is_some() || !recovered.replay.is_empty() {
                return Err(Error::Checkpoint(cairn_checkpoint::Error::Unrecoverable {
                    location: location.to_string(),
                    reason: "the metadata object is missing but batches were logged".into(),
                }));
            }
            let m = JobMetadata {
                format_version: FORMAT_VERSION,
                app_name: cfg.app_name.clone(),
                job_id: format!("{}-{:x}", cfg.app_name, now),
                created_ms: now,
                batch_interval_ms: cfg.batch_interval.as_millis() as u64,
                start_time_ms: aligned_now,
                graph: graph_desc.clone(),
            };
            store.create_metadata(&m)?;
            m
        }
    };
    // Staging files of crashed writers that nobody touched for a while go now (retention
    // sweeps them too).
    store.sweep_debris()?;
    // A plan rebuilt from its successor's copy is stored again, so the log is whole before
    // anything else can be damaged.
    for p in recovered.replay.iter().filter(|p| recovered.rebuilt_plans.contains(&p.batch_id)) {
        store.write_plan(p)?;
    }
    let stored_graph = recovered.state.as_ref().map(|s| &s.graph).unwrap_or(&metadata.graph);
    let dropped = check_compatible(stored_graph, &graph_desc, &cfg.drop_state)?;

    let mut last_checkpoint = None;
    let mut force_full = false;
    // Damaged state objects recovery worked around are removed, and the next checkpoint is a full
    // one: new checkpoints must not chain onto them, nor retention count them as a restore point.
    for name in &recovered.damaged_state {
        store.delete_object(*name)?;
        tracing::warn!("recovery: removed the damaged object {}", store.paths().path(*name));
        force_full = true;
    }
    if let Some(state) = &recovered.state {
        let mut taken = std::collections::HashSet::new();
        let t0 = Instant::now();
        let ops: Vec<Arc<dyn StatefulOp>> = inner.graph.lock().stateful.clone();
        for op in &ops {
            let name = op.describe().name;
            if dropped.contains(&name) {
                continue; // its stored state has another type: start empty, as the user asked
            }
            let tables: Vec<&TableData> =
                state.tables.iter().filter(|t| table_of_operator(&t.id, &name)).collect();
            taken.extend(tables.iter().map(|t| t.id.clone()));
            op.restore(&tables)?;
        }
        for (source, pos) in positions.iter_mut() {
            let Some(t) = state.tables.iter().find(|t| t.id == source_table_id(source)) else { continue };
            taken.insert(t.id.clone());
            for entry in t.reader() {
                let (k, v) = entry.map_err(Error::Checkpoint)?;
                if let Some(v) = v {
                    let partition: String = decode(source, k)?;
                    pos.positions.insert(partition, decode(source, v)?);
                }
            }
        }
        last_checkpoint = Some(state.batch_id);
        force_full |= state.tables.iter().any(|t| !taken.contains(&t.id));
        tracing::info!(
            "restored state after batch {} from {} object(s) in {:.0} ms (+{} ms reading)",
            state.batch_id,
            state.chain.len(),
            t0.elapsed().as_secs_f64() * 1e3,
            recovered.restore_ms
        );
    }
    let last_batch_time_ms = recovered.replay.last().map(|p| p.batch_time_ms);
    let last_batch_time_ms = last_batch_time_ms
        .or_else(|| last_checkpoint.map(|b: BatchId| metadata.start_time_ms + b.0 as i64 * interval));
    Ok(Prepared {
        store: None,
        lease: None,
        positions,
        replay: recovered.replay,
        committed: recovered.committed,
        next_batch: recovered.next_batch.0,
        last_checkpoint,
        start_time_ms: metadata.start_time_ms,
        last_batch_time_ms,
        warnings: recovered.warnings,
        graph_desc,
        job_id: metadata.job_id.as_str().into(),
        force_full,
        last_plan: recovered.last_plan,
    })
}

pub(crate) fn install_signal_handlers(stop: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // Registered first: a second signal, arriving when a stop is already requested, exits.
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .map_err(|e| Error::Lifecycle(format!("cannot install signal handlers: {e}")))?;
    }
    Ok(())
}

struct Runner {
    inner: Arc<Inner>,
    p: Prepared,
    writer: Option<CheckpointWriter>,
    ops: Vec<Arc<dyn StatefulOp>>,
    batches_since_checkpoint: u64,
    checkpoint_every: u64,
    /// Due checkpoints may be put off this many batches while storage is busy.
    max_deferral: u64,
    /// The commit record of the last batch, carried by the next plan (or written at stop).
    pending_commit: Option<BatchCommit>,
    trigger: Trigger,
    /// Wall-clock start of the previous batch (for the input rate).
    prev_start_ms: Option<i64>,
    /// Per operator: uncompressed bytes in the latest checkpoint cut.
    op_bytes: BTreeMap<String, u64>,
    summary: RunSummary,
}

pub(crate) fn run(inner: Arc<Inner>, p: Prepared, trigger: Trigger) -> Result<RunSummary> {
    let cfg = &inner.cfg;
    let checkpoint_every = cfg
        .checkpoint_interval
        .map(|ci| (ci.as_millis() / cfg.batch_interval.as_millis().max(1)).max(1) as u64)
        .unwrap_or(1);
    let restored_batch = p.last_checkpoint.map(|b| b.0);
    let recovery = RecoveryFinished {
        restored_batch,
        replay_batches: p.replay.len() as u64,
        next_batch: p.next_batch,
        warnings: p.warnings.clone(),
    };
    inner.listeners.each(|l| l.on_recovery_finished(&recovery));
    let writer = p.store.as_ref().map(|s| {
        CheckpointWriter::start(
            inner.listeners.clone(),
            s.clone(),
            cfg.max_pending_checkpoints,
            cfg.full_snapshot_every,
            cfg.keep_checkpoints,
        )
    });
    // Without its writer the job cannot checkpoint: it stops here (the lease is given back as
    // `p` drops).
    let writer = writer.transpose()?;
    let ops = inner.graph.lock().stateful.clone();
    let summary = RunSummary {
        replayed_batches: 0,
        new_batches: 0,
        next_batch: p.next_batch,
        recovery_warnings: p.warnings.clone(),
        checkpoints: 0,
        checkpoint_bytes: 0,
        checkpoint_objects: 0,
        log_objects: 0,
    };
    // Default: ten checkpoint intervals, or a minute of batches, whichever is longer.
    let minute = (60_000 / cfg.batch_interval.as_millis().max(1)) as u64;
    let max_deferral = cfg.max_checkpoint_deferral.unwrap_or((checkpoint_every * 10).max(minute));
    let mut r = Runner {
        inner: inner.clone(),
        p,
        writer,
        ops,
        batches_since_checkpoint: 0,
        checkpoint_every,
        max_deferral,
        pending_commit: None,
        trigger,
        prev_start_ms: None,
        op_bytes: BTreeMap::new(),
        summary,
    };
    let result = r.run_loop(trigger);
    let finish = r.finish(result.is_ok());
    result.and(finish)?;
    Ok(r.summary)
}

impl Runner {
    fn stop_requested(&self) -> bool {
        self.inner.stop.load(Ordering::SeqCst)
    }

    fn run_loop(&mut self, trigger: Trigger) -> Result<()> {
        let replay = std::mem::take(&mut self.p.replay);
        if !replay.is_empty() {
            tracing::info!(
                "replaying {} batch(es) {}..={} with their logged input",
                replay.len(),
                replay[0].batch_id,
                replay[replay.len() - 1].batch_id
            );
        }
        for plan in replay {
            self.advance_positions(&plan);
            let committed = self.p.committed.contains(&plan.batch_id);
            self.run_batch(&plan, true, committed, 0.0)?;
            self.p.last_plan = Some(plan.copy());
            self.summary.replayed_batches += 1;
        }
        let interval = self.inner.cfg.batch_interval.as_millis() as i64;
        loop {
            self.check_health()?;
            if self.stop_requested() {
                tracing::info!(
                    "stop requested: stopping after batch {}",
                    self.p.next_batch.saturating_sub(1)
                );
                return Ok(());
            }
            if let Some(n) = self.inner.cfg.stop_after_batches {
                if self.p.next_batch >= n {
                    return Ok(());
                }
            }
            let batch_time = match (trigger, self.p.last_batch_time_ms) {
                (_, None) => self.p.start_time_ms,
                (Trigger::AvailableNow, Some(t)) => t + interval,
                (Trigger::ProcessingTime, Some(t)) => {
                    let now = self.inner.cfg.clock.now_ms();
                    // After downtime, resume on the current grid point instead of running every
                    // missed batch time back to back.
                    (t + interval).max(now - (now - self.p.start_time_ms).rem_euclid(interval))
                }
            };
            if trigger == Trigger::ProcessingTime && !self.wait_until(batch_time) {
                continue; // stop requested while waiting
            }
            let t0 = Instant::now();
            let mut sources = Vec::new();
            let all_sources = self.inner.graph.lock().sources.clone();
            for s in &all_sources {
                let pos = self.p.positions.entry(s.name().to_string()).or_default();
                let ranges = s.plan(&pos.positions)?;
                sources.push(SourcePlan { source: s.name().to_string(), ranges });
            }
            if trigger == Trigger::AvailableNow
                && sources.iter().all(|s| s.ranges.iter().all(|r| r.start == r.end))
            {
                tracing::info!("all input processed; stopping");
                return Ok(());
            }
            let plan = BatchPlan {
                batch_id: BatchId(self.p.next_batch),
                batch_time_ms: batch_time,
                planned_at_ms: self.inner.cfg.clock.now_ms(),
                sources,
                previous_commit: self.pending_commit.take(),
                previous_plan: self.p.last_plan.take(),
                // The store stamps it too; known here so that the next plan's copy carries it.
                epoch: self.p.store.as_ref().map_or(0, |s| s.epoch()),
            };
            if let Some(store) = &self.p.store {
                self.summary.log_objects += store.write_plan(&plan)?.objects;
                failpoint::hit(failpoint::AFTER_PLAN, plan.batch_id.0);
            }
            let plan_ms = t0.elapsed().as_secs_f64() * 1e3;
            self.p.last_plan = Some(plan.copy());
            self.advance_positions(&plan);
            self.run_batch(&plan, false, false, plan_ms)?;
            self.summary.new_batches += 1;
        }
    }

    /// Sleeps until the wall clock reaches `t`; false if a stop was requested meanwhile.
    fn wait_until(&self, t: i64) -> bool {
        loop {
            if self.stop_requested() {
                return false;
            }
            let now = self.inner.cfg.clock.now_ms();
            if now >= t {
                return true;
            }
            std::thread::sleep(Duration::from_millis((t - now).clamp(1, 50) as u64));
        }
    }

    fn check_health(&self) -> Result<()> {
        if let Some(holder) = self.p.lease.as_ref().and_then(|l| l.lost()) {
            let lost = crate::runtime::progress::LeaseLost { holder: holder.clone() };
            self.inner.listeners.each(|l| l.on_lease_lost(&lost));
            return Err(Error::Checkpoint(cairn_checkpoint::Error::LeaseLost {
                location: self.inner.cfg.checkpoint.clone().unwrap_or_default(),
                holder,
            }));
        }
        if let Some(w) = &self.writer {
            w.check()?;
        }
        Ok(())
    }

    fn advance_positions(&mut self, plan: &BatchPlan) {
        for s in &plan.sources {
            let pos = self.p.positions.entry(s.source.clone()).or_default();
            for r in &s.ranges {
                pos.positions.insert(r.partition.clone(), r.end);
                pos.changed.insert(r.partition.clone());
            }
        }
    }

    fn run_batch(&mut self, plan: &BatchPlan, replayed: bool, committed: bool, plan_ms: f64) -> Result<()> {
        let info = BatchInfo {
            job_id: self.p.job_id.clone(),
            batch_id: plan.batch_id.0,
            batch_time_ms: plan.batch_time_ms,
        };
        let ctx = BatchCtx {
            info: info.clone(),
            plan,
            parallelism: self.inner.graph.parallelism,
            start_time_ms: self.p.start_time_ms,
            records: Default::default(),
            // The lease epoch this process writes in: sinks that fence writers themselves use it.
            epoch: self.p.store.as_ref().map(|s| s.epoch()),
        };
        let started_at_ms = self.inner.cfg.clock.now_ms();
        let started = BatchStarted { batch_id: info.batch_id, batch_time_ms: info.batch_time_ms, replayed };
        self.inner.listeners.each(|l| l.on_batch_started(&started));
        let t0 = Instant::now();
        {
            let g = self.inner.graph.lock();
            for out in &g.outputs {
                out.run(&ctx)?;
            }
        }
        let processing_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        if self.p.store.is_some() {
            failpoint::hit(failpoint::AFTER_SINK, info.batch_id);
            if !committed {
                // Durable with the next plan, or as its own object when the job stops.
                self.pending_commit = Some(BatchCommit {
                    batch_id: plan.batch_id,
                    committed_at_ms: self.inner.cfg.clock.now_ms(),
                    input_records: ctx.records.load(Ordering::Relaxed),
                    processing_ms: processing_ms as u64,
                    // The store stamps it too; known here so that the next plan's copy carries it.
                    epoch: self.p.store.as_ref().map_or(0, |s| s.epoch()),
                });
            }
        }
        self.p.next_batch = info.batch_id + 1;
        self.summary.next_batch = self.p.next_batch;
        self.p.last_batch_time_ms = Some(info.batch_time_ms);
        self.batches_since_checkpoint += 1;
        let mut wait_ms = 0.0;
        let mut checkpointed = false;
        let mut deferred = false;
        let mut checkpoint_bytes = 0;
        if let Some(w) = &self.writer {
            use cairn_checkpoint::protocol::{checkpoint_decision, CheckpointDecision};
            match checkpoint_decision(
                self.batches_since_checkpoint,
                self.checkpoint_every,
                self.max_deferral,
                w.is_full(),
            ) {
                CheckpointDecision::NotDue => {}
                CheckpointDecision::Defer => deferred = true,
                CheckpointDecision::Write => {
                    (wait_ms, checkpoint_bytes) = self.checkpoint(plan.batch_id)?;
                    checkpointed = true;
                }
            }
        }
        let stats: WriterStats = self.writer.as_ref().map(|w| w.stats()).unwrap_or_default();
        let records = ctx.records.load(Ordering::Relaxed);
        let operators: Vec<OperatorProgress> = self
            .ops
            .iter()
            .map(|o| {
                let name = o.describe().name;
                let checkpoint_bytes = self.op_bytes.get(&name).copied().unwrap_or(0);
                OperatorProgress { name, keys: o.key_count() as u64, checkpoint_bytes }
            })
            .collect();
        let since_prev = self.prev_start_ms.map(|p| (started_at_ms - p) as f64 / 1e3);
        self.prev_start_ms = Some(started_at_ms);
        let progress = BatchProgress {
            batch_id: info.batch_id,
            batch_time_ms: info.batch_time_ms,
            started_at_ms,
            records,
            input_rows_per_s: since_prev.filter(|s| *s > 0.0).map_or(0.0, |s| records as f64 / s),
            processed_rows_per_s: if processing_ms > 0.0 {
                records as f64 / (processing_ms / 1e3)
            } else {
                0.0
            },
            processing_ms,
            // Only meaningful on the wall-clock grid: replays and available-now batches run late
            // by design.
            scheduling_delay_ms: if replayed || self.trigger == Trigger::AvailableNow {
                0.0
            } else {
                (started_at_ms - info.batch_time_ms).max(0) as f64
            },
            checkpoint_ms: plan_ms + t1.elapsed().as_secs_f64() * 1e3,
            checkpoint_wait_ms: wait_ms,
            checkpointed,
            checkpoint_deferred: deferred,
            checkpoint_bytes,
            checkpoint_queue_depth: self.writer.as_ref().map_or(0, |w| w.pending() as u64),
            last_checkpoint_write_ms: stats.last_write_ms,
            state_keys: operators.iter().map(|o| o.keys).sum(),
            operators,
            replayed,
        };
        if wait_ms > 50.0 {
            tracing::warn!(
                "checkpoint storage is falling behind: batch {} waited {:.0} ms for the checkpoint queue",
                info.batch_id,
                wait_ms
            );
        }
        if tracing::enabled!(target: "cairn::progress", tracing::Level::INFO) {
            if let Ok(json) = serde_json::to_string(&progress) {
                tracing::info!(target: "cairn::progress", "{json}");
            }
        }
        self.inner.listeners.each(|l| l.on_batch_completed(&progress));
        Ok(())
    }

    /// Cuts a checkpoint of the state after `batch` and queues it; returns ms spent waiting for
    /// room in the queue, and the checkpoint's uncompressed size.
    fn checkpoint(&mut self, batch: BatchId) -> Result<(f64, u64)> {
        let full = self.p.last_checkpoint.is_none() || std::mem::take(&mut self.p.force_full);
        let mut tables = Vec::new();
        for op in &self.ops {
            let t = op.snapshot(full)?;
            self.op_bytes.insert(op.describe().name, t.iter().map(|t| t.data.len() as u64).sum());
            tables.extend(t);
        }
        for (source, pos) in self.p.positions.iter_mut() {
            let mut w = TableWriter::new();
            let err = crate::graph::state::EncodeError::default();
            let keys: Vec<String> = if full {
                pos.positions.keys().cloned().collect()
            } else {
                pos.changed.iter().cloned().collect()
            };
            for k in keys {
                if let Some(v) = pos.positions.get(&k) {
                    w.put_with(|b| encode_into(&k, b, &err), |b| encode_into(v, b, &err));
                }
            }
            pos.changed.clear();
            if let Some(e) = err.take() {
                return Err(Error::state(source, e));
            }
            tables.push(w.finish(source_table_id(source)));
        }
        let kind = match self.p.last_checkpoint {
            Some(parent) if !full => CheckpointKind::Delta { parent },
            _ => CheckpointKind::Full,
        };
        let ckpt = StateCheckpoint {
            batch_id: batch,
            kind,
            created_ms: self.inner.cfg.clock.now_ms(),
            graph: self.p.graph_desc.clone(),
            tables,
            epoch: 0, // stamped by the store
        };
        let bytes = ckpt.tables.iter().map(|t| t.data.len() as u64).sum();
        let writer = self.writer.as_ref().expect("checked by caller");
        let waited = writer.submit(ckpt)?;
        self.p.last_checkpoint = Some(batch);
        self.batches_since_checkpoint = 0;
        self.summary.checkpoints += 1;
        Ok((waited, bytes))
    }

    /// Final checkpoint (on a clean stop), drain the writer, release the lease.
    fn finish(&mut self, clean: bool) -> Result<()> {
        let mut result = Ok(());
        if let (Some(c), Some(store)) = (self.pending_commit.take(), &self.p.store) {
            match store.write_commit(&c) {
                Ok(w) => self.summary.log_objects += w.objects,
                Err(e) if clean => result = Err(e.into()),
                Err(e) => tracing::warn!("could not record the commit of batch {}: {e}", c.batch_id),
            }
        }
        if clean && self.batches_since_checkpoint > 0 && self.writer.is_some() && self.p.next_batch > 0 {
            result = self.checkpoint(BatchId(self.p.next_batch - 1)).map(|_| ());
        }
        if let Some(w) = self.writer.take() {
            let (stats, r) = w.finish();
            self.summary.checkpoint_bytes = stats.bytes;
            self.summary.checkpoint_objects = stats.objects;
            if result.is_ok() {
                result = r;
            }
        }
        // Released on failures too: this process is done with the location either way, and a
        // lease lost to another process is left alone by `release`.
        if let Some(lease) = self.p.lease.take() {
            if let Err(e) = lease.release() {
                tracing::warn!("could not release the checkpoint lease: {e}");
            }
        }
        result
    }
}
