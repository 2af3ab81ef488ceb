//! Recovery: before the first batch runs, `prepare` checks the graph, takes the checkpoint
//! location, restores state and source positions from the newest usable checkpoint, and lists
//! the logged batches to replay.

use super::failpoint;
use super::job::Job;
use crate::error::{Error, Result};
use crate::graph::state::decode;
use crate::graph::{Positions, SourceDyn, StatefulOp};
use crate::ops::migration::Migration;
use cairn_checkpoint::lease::Lease;
use cairn_checkpoint::paths::{legacy_source_table, source_table as source_table_id, table_of_operator};
use cairn_checkpoint::{
    BatchId, BatchPlan, CheckpointStore, GraphDescription, JobMetadata, OperatorDescription, PlanCopy,
    SourcePartition, TableData, FORMAT_VERSION,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

/// Source positions with change tracking (checkpointed as `$positions/<name>` tables).
#[derive(Default)]
pub(crate) struct SourcePositions {
    pub positions: Positions,
    pub changed: BTreeSet<SourcePartition>,
}

/// Everything `prepare` established, handed to the run loop.
pub(crate) struct Prepared {
    pub store: Option<CheckpointStore>,
    pub lease: Option<Lease>,
    pub positions: BTreeMap<String, SourcePositions>,
    pub replay: Vec<BatchPlan>,
    pub committed: BTreeSet<BatchId>,
    pub next_batch: u64,
    pub last_checkpoint: Option<BatchId>,
    pub start_time_ms: i64,
    pub last_batch_time_ms: Option<i64>,
    pub warnings: Vec<String>,
    pub graph_desc: GraphDescription,
    /// Handed to sinks with every batch (see `BatchInfo::job_id`).
    pub job_id: Arc<str>,
    /// The restored state holds tables no current operator took (dropped or removed state): the
    /// next checkpoint is a full one, so those tables leave the chain instead of coming back.
    pub force_full: bool,
    /// A copy of the newest plan in the log, for the next plan to carry.
    pub last_plan: Option<PlanCopy>,
    /// Objects in the restored checkpoint's chain (0 without one): the next delta's chain is one
    /// longer.
    pub restored_chain: usize,
    /// Bytes of the restored state (merged, uncompressed): what a restore of it transfers, at
    /// most.
    pub restored_bytes: u64,
    /// Time `prepare` took.
    pub restore_ms: f64,
}

pub(crate) fn describe_graph(job: &Job) -> GraphDescription {
    let g = job.graph.lock();
    let mut operators: Vec<OperatorDescription> = g
        .stateful
        .iter()
        .map(|op| {
            let d = op.describe();
            OperatorDescription {
                renamed_from: g.renamed_from.get(&d.name).cloned().unwrap_or_default(),
                ..d
            }
        })
        .collect();
    for s in &g.sources {
        operators.push(OperatorDescription {
            name: s.name().to_string(),
            kind: cairn_checkpoint::OperatorKind::Source,
            key_type: String::new(),
            state_type: "offsets".into(),
            state_version: 1,
            key_shape: None,
            state_shape: None,
            state_encoding: Default::default(),
            renamed_from: Vec::new(),
            migrations: Vec::new(),
        });
    }
    GraphDescription { operators, parallelism: job.graph.parallelism as u32 }
}

/// What the graph check decided about stored state.
struct Compatibility {
    /// Operators whose stored state is dropped (removed or retyped, and named in `drop_state`);
    /// their tables are not restored.
    dropped: Vec<String>,
    /// Operators whose stored state is converted by a declared migration before it is loaded.
    migrated: BTreeMap<String, Migration>,
    /// Operators whose state is stored under a former name: new name -> stored name.
    renamed: BTreeMap<String, String>,
}

/// Compares the stored graph with the code's. Removing or retyping a stateful operator would
/// silently drop or misread its state, so it is refused, unless a declared migration reads the
/// stored version or the user drops that state.
fn check_compatible(
    stored: &GraphDescription,
    current: &GraphDescription,
    drop: &[String],
    migrations: &BTreeMap<String, Vec<Migration>>,
) -> Result<Compatibility> {
    let mut out = Compatibility { dropped: Vec::new(), migrated: BTreeMap::new(), renamed: BTreeMap::new() };
    for change in cairn_checkpoint::compat::diff(stored, current) {
        if let cairn_checkpoint::compat::Change::Renamed { from, to } = &change {
            out.renamed.insert(to.clone(), from.clone());
        }
        if let cairn_checkpoint::compat::Change::Migrated { operator, from_version, .. } = &change {
            let m =
                migrations.get(operator).and_then(|ms| ms.iter().find(|m| m.from_version == *from_version));
            if let Some(m) = m {
                tracing::info!("{change}");
                out.migrated.insert(operator.clone(), m.clone());
                continue;
            }
        }
        if !change.is_compatible(&[]) && change.is_compatible(drop) {
            out.dropped.extend(change.operator().map(str::to_string));
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
    Ok(out)
}

/// A new batch interval is fine where nothing stored counts in batches of the old one. Window
/// operators do (their buffered batches and slides sit on the old interval's grid), so they
/// refuse it unless their state is dropped; map_with_state timeouts and everything else are
/// durations of batch time, and the next batch time follows the last planned one.
fn check_interval_change(
    m: &JobMetadata,
    cfg: &crate::runtime::job::Config,
    graph: &GraphDescription,
    location: &str,
) -> Result<()> {
    use cairn_checkpoint::OperatorKind::{ReduceByKeyAndWindow, Window};
    let windows: Vec<&str> = graph
        .operators
        .iter()
        .filter(|o| matches!(o.kind, Window | ReduceByKeyAndWindow) && !cfg.drop_state.contains(&o.name))
        .map(|o| o.name.as_str())
        .collect();
    let (old, new) = (m.batch_interval_ms, cfg.batch_interval.as_millis());
    if !windows.is_empty() {
        return Err(Error::Config(format!(
            "the checkpoint at {location} was written with a batch interval of {old} ms, the code says {new} ms; \
             window operator(s) {windows:?} keep batches on the old interval's grid, so restore the old interval, \
             drop their state (drop_state), or use a new checkpoint location"
        )));
    }
    tracing::warn!(
        "the batch interval changed from {old} ms to {new} ms; no stored state depends on it (no window operators), so the job goes on from its last batch time every {new} ms"
    );
    Ok(())
}

/// A job that runs as a task sees only its task's partitions: what would silently be wrong
/// that way is refused before anything is written.
fn check_task_ready(job: &Job, task: crate::TaskAssignment) -> Result<()> {
    let g = job.graph.lock();
    if !g.unaligned.is_empty() {
        return Err(Error::Config(format!(
            "stateful operator(s) {:?} read a stream that is not known to be partitioned like the Kafka source, \
             so task {} would keep only part of a key's state: mark the stream with .partitioned_like_source() \
             when its key is the record's Kafka key, or re-key through a Kafka topic first",
            g.unaligned, task.id.0
        )));
    }
    if !g.unfenced_sinks.is_empty() {
        return Err(Error::Config(format!(
            "sink(s) {:?} cannot keep the tasks of a scaled-out job apart or fence a process that lost its task; \
             write to PostgreSQL or Kafka, or run the job as one process",
            g.unfenced_sinks
        )));
    }
    if job.cfg.checkpoint.is_none() {
        return Err(Error::Config(format!(
            "task {} of a scaled-out job needs a checkpoint location",
            task.id.0
        )));
    }
    Ok(())
}

pub(crate) fn prepare(job: &Job) -> Result<Prepared> {
    let t0 = std::time::Instant::now();
    let mut p = prepare_untimed(job)?;
    p.restore_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(p)
}

fn prepare_untimed(job: &Job) -> Result<Prepared> {
    let cfg = &job.cfg;
    let (errors, stateful_names, sources) = {
        let g = job.graph.lock();
        let mut errors = g.errors.clone();
        let names: BTreeSet<String> = g
            .stateful
            .iter()
            .map(|o| o.describe().name)
            .chain(g.sources.iter().map(|s| s.name().to_string()))
            .collect();
        for (op, old) in &g.renamed_from {
            for o in old.iter().filter(|o| names.contains(*o)) {
                errors.push(format!(
                    "operator {op:?} is renamed from {o:?}, but the job still has an operator named {o:?}: a stored state of that name would be ambiguous"
                ));
            }
        }
        (
            errors,
            g.stateful.iter().map(|o| o.describe().name).collect::<Vec<_>>(),
            g.sources.iter().map(|s| s.name().to_string()).collect::<Vec<_>>(),
        )
    };
    if !errors.is_empty() {
        return Err(Error::Config(errors.join("; ")));
    }
    if let Some(task) = cfg.task {
        check_task_ready(job, task)?;
    }
    if job.graph.lock().outputs.is_empty() {
        return Err(Error::Config(
            "the job has no output operation (foreach_batch, print, save_as_text_files): nothing would run"
                .into(),
        ));
    }
    let graph_desc = describe_graph(job);
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
            restored_chain: 0,
            restored_bytes: 0,
            restore_ms: 0.0,
        });
    };
    let store = match &cfg.store {
        Some(s) => s.clone(),
        None => CheckpointStore::open_with(&location, cfg.storage_retries)?,
    };
    // A task is assigned by the consumer group, which has already decided the previous holder
    // lost it: take it at once (that holder's writes are fenced from here on).
    let lease = if cfg.task.is_some() {
        let mut held = job.task_epoch.lock().unwrap_or_else(|e| e.into_inner());
        let lease = store.take_over_lease(cfg.lease_ttl, *held)?;
        *held = Some(lease.epoch());
        lease
    } else {
        store.acquire_lease(cfg.lease_ttl)?
    };
    if failpoint::armed_name() == Some(failpoint::FREEZE_BEFORE_PLAN) {
        store.set_commit_hook(Some(Arc::new(|name| {
            if let cairn_checkpoint::paths::ObjectName::Plan(b) = name {
                failpoint::freeze(failpoint::FREEZE_BEFORE_PLAN, b.0);
            }
        })));
    }
    // Whatever fails from here on, this process gives the location back: a caller that fixes
    // the problem and retries in the same process must not find its own stale lease.
    match restore(job, &store, &location, positions, graph_desc, now, aligned_now) {
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

/// Maps the string partitions of plans written by format versions 1 and 2 to their sources'
/// typed partitions, so a replay reads what the source now names them.
fn upgrade_partitions(plans: &mut [BatchPlan], sources: &[Arc<dyn SourceDyn>]) -> Result<()> {
    for sp in plans.iter_mut().flat_map(|p| p.sources.iter_mut()) {
        let Some(source) = sources.iter().find(|s| s.name() == sp.source) else { continue };
        for r in &mut sp.ranges {
            if let SourcePartition::Named(key) = &r.partition {
                r.partition = source.legacy_partition(key)?;
            }
        }
    }
    Ok(())
}

/// Recovery proper: metadata, compatibility check, state, replay list.
fn restore(
    job: &Job,
    store: &CheckpointStore,
    location: &str,
    mut positions: BTreeMap<String, SourcePositions>,
    graph_desc: GraphDescription,
    now: i64,
    aligned_now: i64,
) -> Result<Prepared> {
    let cfg = &job.cfg;
    if cfg.task.is_none() {
        let tasks = store.tasks()?;
        if !tasks.is_empty() {
            return Err(Error::Config(format!(
                "{location} holds a scaled-out job ({} task(s) under tasks/): run it scaled out \
                 (cairn_connectors::kafka::ScaleOut), or start this job on another location",
                tasks.len()
            )));
        }
    }
    let mut recovered = store.recover()?;
    let sources = job.graph.lock().sources.clone();
    upgrade_partitions(&mut recovered.replay, &sources)?;
    for w in &recovered.warnings {
        tracing::warn!("recovery: {w}");
    }
    // Objects a fenced-off holder left: this process holds the lease now, so they go before it
    // writes anything (its own writes would replace most of them anyway).
    store.remove_fenced(&recovered.fenced)?;
    let metadata = match recovered.metadata.clone() {
        Some(m) => {
            if m.batch_interval_ms != cfg.batch_interval.as_millis() as u64 {
                check_interval_change(&m, cfg, &graph_desc, location)?;
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
                // A task's own id, stable across its owners: sinks key progress and transactional
                // ids by it.
                job_id: match cfg.task {
                    Some(t) => format!("{}-{:x}-task{}", cfg.app_name, now, t.id.0),
                    None => format!("{}-{:x}", cfg.app_name, now),
                },
                created_ms: now,
                batch_interval_ms: cfg.batch_interval.as_millis() as u64,
                start_time_ms: aligned_now,
                graph: graph_desc.clone(),
            };
            match store.create_metadata(&m) {
                Ok(()) => m,
                // A task's previous holder created it between this process's claim and its
                // listing (it was fenced right after): the task is that job, go on with it.
                Err(e @ cairn_checkpoint::Error::Conflict { .. }) if cfg.task.is_some() => {
                    store.read_metadata()?.ok_or(Error::Checkpoint(e))?
                }
                Err(e) => return Err(e.into()),
            }
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
    let ops: Vec<Arc<dyn StatefulOp>> = job.graph.lock().stateful.clone();
    let migrations: BTreeMap<String, Vec<Migration>> = ops
        .iter()
        .map(|op| (op.describe().name, op.migrations().to_vec()))
        .filter(|(_, m)| !m.is_empty())
        .collect();
    let Compatibility { dropped, migrated, renamed } =
        check_compatible(stored_graph, &graph_desc, &cfg.drop_state, &migrations)?;

    let mut last_checkpoint = None;
    let mut force_full = false;
    let restored_chain = recovered.state.as_ref().map_or(0, |s| s.chain.len());
    let restored_bytes =
        recovered.state.as_ref().map_or(0, |s| s.tables.iter().map(|t| t.data.len() as u64).sum());
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
        for op in &ops {
            let desc = op.describe();
            let name = desc.name.clone();
            if dropped.contains(&name) {
                continue; // its stored state has another type: start empty, as the user asked
            }
            // A renamed operator's tables are stored under its former name; the next checkpoint
            // is full, so the new name replaces the old one in the chain.
            let stored_name = renamed.get(&name).unwrap_or(&name);
            let stored: Vec<&TableData> =
                state.tables.iter().filter(|t| table_of_operator(&t.id, stored_name)).collect();
            taken.extend(stored.iter().map(|t| t.id.clone()));
            let moved: Vec<TableData> = match renamed.get(&name) {
                Some(old) => {
                    force_full = true;
                    stored
                        .iter()
                        .map(|t| TableData { id: format!("{name}{}", &t.id[old.len()..]), ..(*t).clone() })
                        .collect()
                }
                None => Vec::new(),
            };
            let tables: Vec<&TableData> =
                if renamed.contains_key(&name) { moved.iter().collect() } else { stored };
            match migrated.get(&name) {
                Some(m) => {
                    let from = stored_graph
                        .operators
                        .iter()
                        .find(|o| &o.name == stored_name)
                        .map(|o| o.state_encoding)
                        .unwrap_or_default();
                    let to = desc.state_encoding;
                    let converted: Vec<TableData> =
                        tables.iter().map(|t| m.apply(&name, t, from, to)).collect::<Result<_>>()?;
                    op.restore(&converted.iter().collect::<Vec<_>>())?;
                    // The chain below holds the old encoding: new deltas must not build on it.
                    force_full = true;
                }
                None => op.restore(&tables)?,
            }
        }
        for s in &sources {
            let (source, pos) = (s.name(), positions.entry(s.name().to_string()).or_default());
            for t in state.tables.iter().filter(|t| t.id == legacy_source_table(source)) {
                // Format 1 and 2 keys were strings the source reads back; the next checkpoint is
                // full, so the chain it starts holds typed keys only.
                taken.insert(t.id.clone());
                force_full = true;
                for entry in t.reader() {
                    let (k, v) = entry.map_err(Error::Checkpoint)?;
                    if let Some(v) = v {
                        let partition = s.legacy_partition(&decode::<String>(source, k)?)?;
                        pos.positions.insert(partition, decode(source, v)?);
                    }
                }
            }
            for t in state.tables.iter().filter(|t| t.id == source_table_id(source)) {
                taken.insert(t.id.clone());
                for entry in t.reader() {
                    let (k, v) = entry.map_err(Error::Checkpoint)?;
                    if let Some(v) = v {
                        let partition = SourcePartition::from_key_bytes(k).ok_or_else(|| {
                            Error::state(source, format!("position key {k:?} is not a source partition"))
                        })?;
                        pos.positions.insert(partition, decode(source, v)?);
                    }
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
    // The newest plan says when the last batch ran (whatever interval it ran at); without one,
    // the grid of the interval the location was created with.
    let last_batch_time_ms = recovered.replay.last().map(|p| p.batch_time_ms);
    let last_batch_time_ms =
        last_batch_time_ms.or_else(|| recovered.last_plan.as_ref().map(|p| p.batch_time_ms)).or_else(|| {
            last_checkpoint
                .map(|b: BatchId| metadata.start_time_ms + b.0 as i64 * metadata.batch_interval_ms as i64)
        });
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
        restored_chain,
        restored_bytes,
        restore_ms: 0.0,
    })
}
