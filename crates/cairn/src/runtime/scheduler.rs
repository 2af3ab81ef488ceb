//! The batch loop: plan → log the plan → run → sinks → commit → (every interval) cut a state
//! checkpoint and hand it to the background writer. Recovery happens before, in
//! [`recovery::prepare`](super::recovery::prepare).

use super::failpoint;
use super::job::{Job, Trigger};
use super::progress::{
    BatchProgress, BatchStarted, LeaseLost, OperatorProgress, RecoveryFinished, SourceLag,
};
use super::recovery::Prepared;
use super::writer::{CheckpointWriter, WriterStats};
use crate::error::{Error, Result};
use crate::graph::state::{encode_into, EncodeError};
use crate::graph::{BatchCtx, BatchInfo, StatefulOp};
use cairn_checkpoint::paths::source_table as source_table_id;
use cairn_checkpoint::SourcePartition;
use cairn_checkpoint::{
    BatchCommit, BatchId, BatchPlan, CheckpointKind, SourcePlan, StateCheckpoint, TableWriter,
};
use std::collections::BTreeMap;
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
    pub next_batch: BatchId,
    /// Problems recovery worked around (a corrupt checkpoint it skipped, a torn plan).
    pub recovery_warnings: Vec<String>,
    /// State checkpoints cut during this run.
    pub checkpoints: u64,
    /// Bytes and objects of state checkpoints (and compacted snapshots) written by this run.
    pub checkpoint_bytes: u64,
    /// State objects written by this run (checkpoints and compacted snapshots).
    pub checkpoint_objects: u64,
    /// Batch log objects (plans and commits) written by this run.
    pub log_objects: u64,
    /// Restarts in place after transient failures (see `StreamingContextBuilder::max_outage`).
    pub restarts: u64,
    /// Checkpoints cut as full snapshots on the batch path because background compaction fell
    /// behind (storage too slow for the checkpoint rate).
    pub forced_full_snapshots: u64,
}

impl RunSummary {
    fn empty(next_batch: BatchId, recovery_warnings: Vec<String>) -> Self {
        Self {
            replayed_batches: 0,
            new_batches: 0,
            next_batch,
            recovery_warnings,
            checkpoints: 0,
            checkpoint_bytes: 0,
            checkpoint_objects: 0,
            log_objects: 0,
            restarts: 0,
            forced_full_snapshots: 0,
        }
    }
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
    job: Arc<Job>,
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
    /// Delta checkpoints cut after the newest full snapshot known to be stored, with their
    /// bytes.
    deltas: Vec<(BatchId, u64)>,
    /// Objects in the chain of the newest checkpoint cut.
    last_chain: usize,
    /// Bytes of the chain's base: the restored state, a full snapshot cut on the batch path, or
    /// one compacted in the background (as stored).
    base_bytes: u64,
    /// Per source partition, what the latest plan left unread.
    lag: Vec<SourceLag>,
}

/// Runs the job once from `p`: what it did, and how it ended.
pub(crate) fn run(job: Arc<Job>, p: Prepared, trigger: Trigger) -> (RunSummary, Result<()>) {
    let cfg = &job.cfg;
    let checkpoint_every = cfg
        .checkpoint_interval
        .map(|ci| (ci.as_millis() / cfg.batch_interval.as_millis().max(1)).max(1) as u64)
        .unwrap_or(1);
    let recovery = RecoveryFinished {
        restored_batch: p.last_checkpoint,
        replay_batches: p.replay.len() as u64,
        next_batch: BatchId(p.next_batch),
        warnings: p.warnings.clone(),
        at_ms: cfg.clock.now_ms(),
        restore_ms: p.restore_ms,
    };
    job.listeners.each(|l| l.on_recovery_finished(&recovery));
    let writer = p.store.as_ref().map(|s| {
        CheckpointWriter::start(
            job.listeners.clone(),
            s.clone(),
            cfg.max_pending_checkpoints,
            cfg.full_snapshot_every,
            cfg.keep_checkpoints,
        )
    });
    // Without its writer the job cannot checkpoint: it stops here (the lease is given back as
    // `p` drops).
    let writer = match writer.transpose() {
        Ok(w) => w,
        Err(e) => return (RunSummary::empty(BatchId(p.next_batch), p.warnings.clone()), Err(e)),
    };
    let ops = job.graph.lock().stateful.clone();
    let summary = RunSummary::empty(BatchId(p.next_batch), p.warnings.clone());
    // Default: ten checkpoint intervals, or a minute of batches, whichever is longer.
    let minute = (60_000 / cfg.batch_interval.as_millis().max(1)) as u64;
    let max_deferral = cfg.max_checkpoint_deferral.unwrap_or((checkpoint_every * 10).max(minute));
    let mut r = Runner {
        job: job.clone(),
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
        deltas: Vec::new(),
        last_chain: 0,
        base_bytes: 0,
        lag: Vec::new(),
    };
    r.base_bytes = r.p.restored_bytes;
    let result = r.run_loop(trigger);
    let finish = r.finish(result.is_ok());
    (r.summary, result.and(finish))
}

impl Runner {
    fn stop_requested(&self) -> bool {
        self.job.stop.load(Ordering::SeqCst)
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
        let interval = self.job.cfg.batch_interval.as_millis() as i64;
        loop {
            self.check_health()?;
            if self.stop_requested() {
                tracing::info!(
                    "stop requested: stopping after batch {}",
                    self.p.next_batch.saturating_sub(1)
                );
                return Ok(());
            }
            if let Some(n) = self.job.cfg.stop_after_batches {
                if self.p.next_batch >= n {
                    return Ok(());
                }
            }
            let batch_time = match (trigger, self.p.last_batch_time_ms) {
                (_, None) => self.p.start_time_ms,
                (Trigger::AvailableNow, Some(t)) => t + interval,
                (Trigger::ProcessingTime, Some(t)) => {
                    let now = self.job.cfg.clock.now_ms();
                    // After downtime, resume on the current grid point instead of running every
                    // missed batch time back to back.
                    (t + interval).max(now - (now - self.p.start_time_ms).rem_euclid(interval))
                }
            };
            if trigger == Trigger::ProcessingTime && !self.wait_until(batch_time) {
                continue; // stop requested while waiting
            }
            let t0 = Instant::now();
            self.job.mark_batch_began(t0);
            let mut sources = Vec::new();
            let all_sources = self.job.graph.lock().sources.clone();
            self.lag.clear();
            for s in &all_sources {
                let pos = self.p.positions.entry(s.name().to_string()).or_default();
                let ranges = s.plan(&pos.positions)?;
                sources.push(SourcePlan { source: s.name().to_string(), ranges });
                self.lag.extend(s.backlog().into_iter().map(|(p, records)| SourceLag {
                    source: s.name().to_string(),
                    partition: p.to_string(),
                    records,
                }));
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
                planned_at_ms: self.job.cfg.clock.now_ms(),
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
            let now = self.job.cfg.clock.now_ms();
            if now >= t {
                return true;
            }
            std::thread::sleep(Duration::from_millis((t - now).clamp(1, 50) as u64));
        }
    }

    fn check_health(&self) -> Result<()> {
        if let Some(holder) = self.p.lease.as_ref().and_then(|l| l.lost()) {
            let lost = LeaseLost { holder: holder.clone() };
            self.job.listeners.each(|l| l.on_lease_lost(&lost));
            return Err(Error::Checkpoint(cairn_checkpoint::Error::LeaseLost {
                location: self.job.cfg.checkpoint.clone().unwrap_or_default(),
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
            batch_id: plan.batch_id,
            batch_time_ms: plan.batch_time_ms,
        };
        let ctx =
            BatchCtx {
                info: info.clone(),
                plan,
                parallelism: self.job.graph.parallelism,
                start_time_ms: self.p.start_time_ms,
                records: Default::default(),
                // The lease epoch this process writes in: sinks that fence writers themselves use it.
                epoch: self.p.store.as_ref().map(|s| s.epoch()),
                task: self.job.cfg.task.map(|t| t.id),
                fence: self.p.store.clone().map(|s| {
                    crate::sinks::FenceCheck::new(move || s.check_lease().map_err(|e| e.to_string()))
                }),
                run: crate::graph::next_run(),
            };
        let started_at_ms = self.job.cfg.clock.now_ms();
        let started = BatchStarted { batch_id: info.batch_id, batch_time_ms: info.batch_time_ms, replayed };
        self.job.listeners.each(|l| l.on_batch_started(&started));
        let t0 = Instant::now();
        if replayed {
            self.job.mark_batch_began(t0);
        }
        {
            let g = self.job.graph.lock();
            for out in &g.outputs {
                out.run(&ctx)?;
            }
        }
        let processing_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        if self.p.store.is_some() {
            failpoint::hit(failpoint::AFTER_SINK, info.batch_id.0);
            if !committed {
                // Durable with the next plan, or as its own object when the job stops.
                self.pending_commit = Some(BatchCommit {
                    batch_id: plan.batch_id,
                    committed_at_ms: self.job.cfg.clock.now_ms(),
                    input_records: ctx.records.load(Ordering::Relaxed),
                    processing_ms: processing_ms as u64,
                    // The store stamps it too; known here so that the next plan's copy carries it.
                    epoch: self.p.store.as_ref().map_or(0, |s| s.epoch()),
                });
            }
        }
        self.p.next_batch = info.batch_id.0 + 1;
        self.summary.next_batch = BatchId(self.p.next_batch);
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
            restarts: self.job.restarts.load(Ordering::SeqCst),
            checkpoint_chain: self.last_chain as u64,
            checkpoint_restore_estimate_ms: self.restore_estimate_ms(),
            source_lag: if replayed { Vec::new() } else { self.lag.clone() },
            task: self.job.cfg.task.map(|t| t.id.0),
            epoch: self.p.lease.as_ref().map_or(0, |l| l.epoch()),
            plan: plan.sources.clone(),
            receivers: self.job.graph.lock().sources.iter().filter_map(|s| s.receiver_status()).collect(),
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
        self.job.listeners.each(|l| l.on_batch_completed(&progress));
        Ok(())
    }

    /// Cuts a checkpoint of the state after `batch` and queues it; returns ms spent waiting for
    /// room in the queue, and the checkpoint's uncompressed size.
    fn checkpoint(&mut self, batch: BatchId) -> Result<(f64, u64)> {
        let chain_if_delta = self.chain_if_delta();
        let too_long =
            cairn_checkpoint::protocol::must_cut_full(chain_if_delta, self.job.cfg.full_snapshot_every);
        if too_long && self.p.last_checkpoint.is_some() {
            tracing::warn!(
                "checkpoint storage is too slow for background compaction: the chain of checkpoint {batch} \
                 would be {chain_if_delta} objects, so it is cut as a full snapshot on the batch path; \
                 a longer checkpoint interval or a larger full_snapshot_every makes this rarer"
            );
            self.summary.forced_full_snapshots += 1;
        }
        let full = self.p.last_checkpoint.is_none() || std::mem::take(&mut self.p.force_full) || too_long;
        let mut tables = Vec::new();
        for op in &self.ops {
            let t = op.snapshot(full)?;
            self.op_bytes.insert(op.describe().name, t.iter().map(|t| t.data.len() as u64).sum());
            tables.extend(t);
        }
        for (source, pos) in self.p.positions.iter_mut() {
            let mut w = TableWriter::new();
            let err = EncodeError::default();
            let keys: Vec<SourcePartition> = if full {
                pos.positions.keys().cloned().collect()
            } else {
                pos.changed.iter().cloned().collect()
            };
            for k in keys {
                if let Some(v) = pos.positions.get(&k) {
                    w.put_with(|b| b.extend_from_slice(&k.key_bytes()), |b| encode_into(v, b, &err));
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
            created_ms: self.job.cfg.clock.now_ms(),
            graph: self.p.graph_desc.clone(),
            tables,
            epoch: 0, // stamped by the store
        };
        let bytes = ckpt.tables.iter().map(|t| t.data.len() as u64).sum();
        let writer = self.writer.as_ref().expect("checked by caller");
        let waited = writer.submit(ckpt)?;
        if full {
            self.deltas.clear();
            self.p.restored_chain = 1;
            self.base_bytes = bytes;
        } else {
            self.deltas.push((batch, bytes));
        }
        self.last_chain = if full { 1 } else { chain_if_delta };
        self.p.last_checkpoint = Some(batch);
        self.batches_since_checkpoint = 0;
        self.summary.checkpoints += 1;
        Ok((waited, bytes))
    }

    /// The newest checkpoint's chain length if the next checkpoint were a delta: through the
    /// newest full snapshot stored (by the writer, or compacted in the background), else through
    /// the restored chain.
    fn chain_if_delta(&mut self) -> usize {
        if let Some((f, f_bytes)) = self.writer.as_ref().and_then(|w| w.newest_full()) {
            // A snapshot this run stored is at or after the restored checkpoint: chains of later
            // deltas start there.
            if self.deltas.first().is_some_and(|(d, _)| *d <= f) {
                self.base_bytes = f_bytes;
            }
            self.deltas.retain(|(d, _)| *d > f);
            self.p.restored_chain = 1;
        }
        self.p.restored_chain.max(1) + self.deltas.len() + 1
    }

    /// What restoring the newest checkpoint cut would take on this location now: its chain's
    /// objects at the measured read latency, its bytes at the measured read bandwidth.
    fn restore_estimate_ms(&self) -> Option<f64> {
        if self.last_chain == 0 {
            return None;
        }
        let rates = self.p.store.as_ref()?.read_rates()?;
        let bytes = self.base_bytes + self.deltas.iter().map(|(_, b)| b).sum::<u64>();
        Some(rates.estimate_ms(self.last_chain as u64, bytes))
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
