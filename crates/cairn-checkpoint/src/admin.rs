//! Operator tools over a checkpoint location: list, show, verify, collect garbage, dump state,
//! and diff a new build's graph. The `cairn checkpoint` command is a thin layer over this module.
//! Every function reads through [`CheckpointStore`], so it works on any supported location.

use crate::compat::{self, Change};
use crate::frame::ObjectKind;
use crate::paths::{self, ObjectName};
use crate::protocol::{self, Listing};
use crate::{
    codec, merge, BatchCommit, BatchId, BatchPlan, CheckpointKind, CheckpointStore, Error, GraphDescription,
    JobMetadata, LeaseRecord, Result, SourcePartition,
};
use serde::Serialize;

/// One planned batch still in the log.
#[derive(Debug, Clone, Serialize)]
pub struct BatchRow {
    /// The batch id.
    pub batch: u64,
    /// The batch's time on the job's grid, in milliseconds since the Unix epoch; `None` when its
    /// plan cannot be read.
    pub batch_time_ms: Option<i64>,
    /// Whether the batch committed: it has a commit record, or the next batch was planned.
    pub committed: bool,
    /// Source ranges planned (0 when the plan cannot be read).
    pub ranges: usize,
    /// Records read, when the commit record says (from the commit object, or the copy the next
    /// plan carries); `None` when no readable commit record is found.
    pub records: Option<u64>,
}

/// One state checkpoint object.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRow {
    /// The batch after which the state was taken.
    pub batch: u64,
    /// `full` or `delta`.
    pub kind: &'static str,
    /// The batch of the checkpoint a delta builds on; `None` for a full snapshot.
    pub parent: Option<u64>,
    /// The object's path in the location.
    pub path: String,
    /// The object's size in bytes, as listed.
    pub bytes: u64,
    /// Objects recovery reads to restore this checkpoint (its chain through full snapshots);
    /// `None` when a link of the chain is missing.
    pub chain_objects: Option<usize>,
    /// Whether retention with the given `keep` would keep it.
    pub retained: bool,
    /// Why it is kept, or that `gc` would delete it.
    pub reason: String,
}

/// What `cairn checkpoint ls` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The checkpoint location as given.
    pub location: String,
    /// The job metadata; `None` when neither copy can be read.
    pub metadata: Option<JobMetadata>,
    /// The holder of the newest lease epoch (released or not); `None` when no lease object can
    /// be read.
    pub lease: Option<LeaseRecord>,
    /// Every planned batch still in the log, ascending.
    pub batches: Vec<BatchRow>,
    /// Every state object, by batch (a full snapshot before a delta of the same batch).
    pub checkpoints: Vec<CheckpointRow>,
    /// Recognised objects in the location (lease objects included; foreign files are not).
    pub total_objects: usize,
    /// Total size of those objects, in bytes.
    pub total_bytes: u64,
    /// Where the sources stand after the newest planned batch.
    pub positions: Vec<Position>,
}

/// Where one source partition stands after a location's newest planned batch.
#[derive(Debug, Clone, Serialize)]
pub struct Position {
    /// The source.
    pub source: String,
    /// The partition.
    pub partition: SourcePartition,
    /// The next offset to read: the newest planned batch's range end.
    pub next: u64,
    /// Records past `next` in the partition (its end offset minus `next`), when someone asked
    /// the source's system (`cairn checkpoint ls --brokers`); `None` otherwise.
    pub lag: Option<u64>,
}

/// Where the sources stand after the newest planned batch (in `listing`) of `store`.
fn newest_positions(store: &CheckpointStore, listing: &Listing) -> Vec<Position> {
    match listing.plans().last().map(|b| store.read_plan(*b)) {
        Some(Ok(plan)) => plan
            .sources
            .iter()
            .flat_map(|s| {
                s.ranges.iter().map(|r| Position {
                    source: s.source.clone(),
                    partition: r.partition.clone(),
                    next: r.end,
                    lag: None,
                })
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn kind_and_parent(n: ObjectName) -> Option<(u64, &'static str, Option<u64>)> {
    match n {
        ObjectName::Full(b) => Some((b.0, "full", None)),
        ObjectName::Delta { batch, parent } => Some((batch.0, "delta", Some(parent.0))),
        _ => None,
    }
}

/// Fails with a clear error when the location holds no cairn checkpoint at all.
fn require_checkpoint(store: &CheckpointStore, listing: &Listing) -> Result<()> {
    if listing.names().next().is_none() {
        return Err(Error::Unrecoverable {
            location: store.location().to_string(),
            reason: "no cairn checkpoint here (no metadata, batch log or state objects); check the path"
                .into(),
        });
    }
    Ok(())
}

/// Lists batches and checkpoints, with what retention keeping `keep` checkpoints would keep.
pub fn list(store: &CheckpointStore, keep: usize) -> Result<Overview> {
    let objects = store.list_objects()?;
    let listing = Listing::new(objects.iter().map(|(n, _)| *n));
    require_checkpoint(store, &listing)?;
    let plan = protocol::plan_retention(&listing, keep);
    let commits: std::collections::BTreeSet<BatchId> = listing.commits().into_iter().collect();
    let plans = listing.plans();
    let mut batches = Vec::new();
    for b in &plans {
        let p = store.read_plan(*b).ok();
        let next_plan =
            if plans.contains(&BatchId(b.0 + 1)) { store.read_plan(BatchId(b.0 + 1)).ok() } else { None };
        let commit: Option<BatchCommit> = if commits.contains(b) {
            store.read_commit(*b).ok()
        } else {
            next_plan.and_then(|n| n.previous_commit)
        };
        batches.push(BatchRow {
            batch: b.0,
            batch_time_ms: p.as_ref().map(|p| p.batch_time_ms),
            // Plans are only written once the previous batch committed.
            committed: protocol::is_committed(&listing, *b),
            ranges: p.as_ref().map_or(0, |p| p.sources.iter().map(|s| s.ranges.len()).sum()),
            records: commit.map(|c| c.input_records),
        });
    }
    let mut checkpoints = Vec::new();
    for (name, bytes) in &objects {
        let Some((batch, kind, parent)) = kind_and_parent(*name) else { continue };
        let kept = plan.keep_checkpoints.contains(&BatchId(batch));
        let needed_by: Vec<u64> = plan
            .keep_checkpoints
            .iter()
            .filter(|k| protocol::chain(&listing, **k, true).is_some_and(|c| c.contains(name)))
            .map(|k| k.0)
            .collect();
        let deleted = plan.delete.contains(name);
        let reason = if kept && needed_by.contains(&batch) {
            format!("one of the newest {keep} checkpoints")
        } else if !needed_by.is_empty() {
            format!("needed by the chain of checkpoint {}", needed_by[0])
        } else if deleted {
            "not needed: gc deletes it".to_string()
        } else {
            "kept as a fallback of the newest checkpoint".to_string()
        };
        checkpoints.push(CheckpointRow {
            batch,
            kind,
            parent,
            path: store.paths().path(*name).to_string(),
            bytes: *bytes,
            chain_objects: protocol::chain(&listing, BatchId(batch), true).map(|c| c.len()),
            retained: !deleted,
            reason,
        });
    }
    checkpoints.sort_by_key(|c| (c.batch, c.kind == "delta"));
    Ok(Overview {
        location: store.location().to_string(),
        metadata: store.read_metadata().ok().flatten(),
        lease: store.read_lease().ok().flatten(),
        batches,
        checkpoints,
        total_objects: objects.len(),
        total_bytes: objects.iter().map(|(_, b)| b).sum(),
        positions: newest_positions(store, &listing),
    })
}

/// One task of a scaled-out job, as `cairn checkpoint ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRow {
    /// The task (its input partition number).
    pub task: u32,
    /// The task's own location ([`paths::task_location`]).
    pub location: String,
    /// The holder of the task's newest epoch (its owner now, or the last one if it released the
    /// task); `None` before the task ever ran.
    pub owner: Option<LeaseRecord>,
    /// The newest planned task batch.
    pub last_planned: Option<u64>,
    /// Whether that batch is committed.
    pub last_committed: bool,
    /// The newest state checkpoint's batch.
    pub last_checkpoint: Option<u64>,
    /// Where the task's sources stand after its newest planned batch.
    pub positions: Vec<Position>,
}

/// The tasks of a scaled-out job at `store` (empty for a job that runs as one process).
pub fn tasks(store: &CheckpointStore) -> Result<Vec<TaskRow>> {
    let mut out = Vec::new();
    for task in store.tasks()? {
        let location = paths::task_location(store.location(), task);
        let t = CheckpointStore::open(&location)?;
        let listing = t.listing()?;
        let last_planned = listing.plans().last().copied();
        let positions = newest_positions(&t, &listing);
        out.push(TaskRow {
            task,
            location,
            owner: t.read_lease()?,
            last_planned: last_planned.map(|b| b.0),
            last_committed: last_planned.is_some_and(|b| protocol::is_committed(&listing, b)),
            last_checkpoint: listing.checkpoints().last().map(|b| b.0),
            positions,
        });
    }
    Ok(out)
}

/// Size of one state table.
#[derive(Debug, Clone, Serialize)]
pub struct TableStat {
    /// The table id (`<operator>`, `<operator>/<part>` or `$source/<source>`).
    pub id: String,
    /// Entries in the merged table (live keys: a merged table has no tombstones).
    pub keys: u64,
    /// Size of the table's encoded entries, in bytes (uncompressed).
    pub bytes: u64,
}

/// One stateful operator (or source) with the size of its state.
#[derive(Debug, Clone, Serialize)]
pub struct OperatorStat {
    /// The operator's (or source's) stable name.
    pub name: String,
    /// Its kind as stored (`map_with_state`, `window`, `source`, ...).
    pub kind: String,
    /// The key type's identity as stored (empty for a source).
    pub key_type: String,
    /// The state type's identity as stored (`offsets` for a source).
    pub state_type: String,
    /// The user's state version (`OpName::with_version`).
    pub state_version: u32,
    /// Its tables in the described checkpoint; empty when no checkpoint was loaded.
    pub tables: Vec<TableStat>,
}

/// What `cairn checkpoint show` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Details {
    /// The job metadata; `None` on a location without it.
    pub metadata: Option<JobMetadata>,
    /// The checkpoint described (the newest restorable one unless a batch was asked for).
    pub checkpoint_batch: Option<u64>,
    /// The graph of that checkpoint, else the metadata's; `None` when there is neither.
    pub graph: Option<GraphDescription>,
    /// Every operator and source of `graph`, with its state sizes.
    pub operators: Vec<OperatorStat>,
    /// The plan of the requested batch, or of the newest planned batch.
    pub plan: Option<BatchPlan>,
}

/// Loads the state of the checkpoint after `batch` (merged from its chain).
pub fn load_checkpoint(store: &CheckpointStore, batch: BatchId) -> Result<crate::StateCheckpoint> {
    let listing = store.listing()?;
    let chain = protocol::chain(&listing, batch, true).ok_or_else(|| Error::Unrecoverable {
        location: store.location().to_string(),
        reason: format!("there is no complete checkpoint after batch {batch}"),
    })?;
    let loaded = chain.iter().map(|n| store.read_state(*n)).collect::<Result<Vec<_>>>()?;
    merge::merge_chain(loaded)
}

/// Describes a checkpoint: metadata, graph, state sizes per operator, and a batch's plan.
pub fn show(store: &CheckpointStore, batch: Option<BatchId>) -> Result<Details> {
    let listing = store.listing()?;
    require_checkpoint(store, &listing)?;
    let metadata = store.read_metadata()?;
    let ckpt_batch = match batch {
        Some(b) => listing.checkpoints().into_iter().filter(|c| *c <= b).max(),
        None => store.recover().ok().and_then(|r| r.state.map(|s| s.batch_id)),
    };
    let state = match ckpt_batch {
        Some(b) => Some(load_checkpoint(store, b)?),
        None => None,
    };
    let graph =
        state.as_ref().map(|s| s.graph.clone()).or_else(|| metadata.as_ref().map(|m| m.graph.clone()));
    let mut operators = Vec::new();
    for op in graph.iter().flat_map(|g| g.operators.iter()) {
        let is_source = op.kind == crate::OperatorKind::Source;
        let tables = state
            .iter()
            .flat_map(|s| s.tables.iter())
            .filter(|t| {
                if is_source {
                    paths::table_source(&t.id) == Some(op.name.as_str())
                } else {
                    paths::table_of_operator(&t.id, &op.name)
                }
            })
            .map(|t| TableStat { id: t.id.clone(), keys: t.entries, bytes: t.data.len() as u64 })
            .collect();
        operators.push(OperatorStat {
            name: op.name.clone(),
            kind: op.kind.to_string(),
            key_type: op.key_type.clone(),
            state_type: op.state_type.clone(),
            state_version: op.state_version,
            tables,
        });
    }
    let plan_batch = batch.or_else(|| listing.plans().last().copied());
    let plan = plan_batch.and_then(|b| store.read_plan(b).ok());
    Ok(Details { metadata, checkpoint_batch: ckpt_batch.map(|b| b.0), graph, operators, plan })
}

/// An object that failed verification.
#[derive(Debug, Clone, Serialize)]
pub struct BadObject {
    /// The object's path in the location.
    pub path: String,
    /// The verification error.
    pub reason: String,
}

/// What `cairn checkpoint verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Recognised objects read and verified.
    pub objects_checked: usize,
    /// The objects that failed verification.
    pub bad: Vec<BadObject>,
    /// The checkpoint recovery would restore, if any.
    pub restorable_batch: Option<u64>,
    /// The newest checkpoint present.
    pub newest_batch: Option<u64>,
    /// Batches a restart would replay.
    pub replay_batches: usize,
    /// Why recovery fails, when it does.
    pub recovery_error: Option<String>,
    /// What recovery would work around (empty when it fails).
    pub warnings: Vec<String>,
    /// True only when every object verifies and the newest checkpoint restores end to end.
    pub ok: bool,
}

/// Checks every object's checksum and format, then restores the newest checkpoint end to end.
pub fn verify(store: &CheckpointStore) -> Result<Verification> {
    let objects = store.list_objects()?;
    let listing = Listing::new(objects.iter().map(|(n, _)| *n));
    require_checkpoint(store, &listing)?;
    let mut bad = Vec::new();
    for (name, _) in &objects {
        let path = store.paths().path(*name);
        let check = match *name {
            ObjectName::Metadata | ObjectName::MetadataCopy => store.read_raw(*name).and_then(|b| {
                codec::decode_json::<JobMetadata>(path.as_ref(), &b, ObjectKind::Metadata).map(|_| ())
            }),
            ObjectName::Lease | ObjectName::LeaseClaim(_) | ObjectName::LeaseHeartbeat(_) => {
                store.read_raw(*name).and_then(|b| {
                    codec::decode_json::<LeaseRecord>(path.as_ref(), &b, ObjectKind::Lease).map(|_| ())
                })
            }
            ObjectName::LeaseFence(_) => store.read_raw(*name).and_then(|b| {
                codec::decode_json::<crate::FenceRecord>(path.as_ref(), &b, ObjectKind::Fence).map(|_| ())
            }),
            ObjectName::Plan(b) => store.read_plan(b).map(|_| ()),
            ObjectName::Commit(b) => store.read_commit(b).map(|_| ()),
            ObjectName::Full(_) | ObjectName::Delta { .. } => store.read_state(*name).and_then(|c| {
                let mut all = Ok(());
                for t in &c.tables {
                    if let Some(Err(e)) = t.reader().find(|e| e.is_err()) {
                        all = Err(e);
                    }
                }
                if let (CheckpointKind::Delta { parent }, ObjectName::Delta { parent: p, .. }) =
                    (c.kind, *name)
                {
                    debug_assert_eq!(parent, p);
                }
                all
            }),
        };
        if let Err(e) = check {
            bad.push(BadObject { path: path.to_string(), reason: e.to_string() });
        }
    }
    let newest = listing.checkpoints().last().map(|b| b.0);
    let (restorable, replay, error, warnings) = match store.recover() {
        Ok(r) => (r.state.map(|s| s.batch_id.0), r.replay.len(), None, r.warnings),
        Err(e) => (None, 0, Some(e.to_string()), Vec::new()),
    };
    let ok = bad.is_empty() && error.is_none() && restorable == newest;
    Ok(Verification {
        objects_checked: objects.len(),
        bad,
        restorable_batch: restorable,
        newest_batch: newest,
        replay_batches: replay,
        recovery_error: error,
        warnings,
        ok,
    })
}

/// What `cairn checkpoint gc` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// The checkpoints kept (batches after which they were taken), newest first.
    pub kept_checkpoints: Vec<u64>,
    /// Paths deleted (or, in a dry run, that would be): objects, then crashed writers' staging
    /// files (never listed by a dry run).
    pub deleted: Vec<String>,
    /// Whether this was a dry run: nothing was deleted, `deleted` is what gc would delete.
    pub dry_run: bool,
}

/// The engine's retention, on demand.
///
/// On a scaled-out job's location (one that holds tasks) it applies member log retention
/// ([`crate::member_log::MemberLog::retain`]); each task's own objects are collected by `gc` on the
/// task's location.
pub fn gc(store: &CheckpointStore, keep: usize, dry_run: bool) -> Result<GcReport> {
    if store.read_metadata()?.is_none() && !store.tasks()?.is_empty() {
        let log =
            crate::member_log::MemberLog::new(store.object_store().clone(), store.paths().root().clone())?;
        if let Some(dir) = store.local_dir() {
            log.set_local_dir(dir);
        }
        let (objects, debris) = log.retain_all(dry_run)?;
        let mut deleted: Vec<String> = objects.iter().map(|p| p.to_string()).collect();
        deleted.extend(debris.iter().map(|f| f.display().to_string()));
        return Ok(GcReport { kept_checkpoints: Vec::new(), deleted, dry_run });
    }
    let listing = store.listing()?;
    require_checkpoint(store, &listing)?;
    if dry_run {
        let plan = protocol::plan_retention(&listing, keep);
        return Ok(GcReport {
            kept_checkpoints: plan.keep_checkpoints.iter().map(|b| b.0).collect(),
            deleted: plan.delete.iter().map(|n| store.paths().path(*n).to_string()).collect(),
            dry_run,
        });
    }
    let r = store.apply_retention(keep)?;
    let mut deleted: Vec<String> = r.deleted.iter().map(|n| store.paths().path(*n).to_string()).collect();
    deleted.extend(r.debris.iter().map(|f| f.display().to_string()));
    Ok(GcReport { kept_checkpoints: r.kept_checkpoints.iter().map(|b| b.0).collect(), deleted, dry_run })
}

/// One entry of an operator's state, as stored (postcard-encoded key and value bytes).
#[derive(Debug, Clone, Serialize)]
pub struct StateRow {
    /// The id of the table the entry is in.
    pub table: String,
    /// The key's bytes as stored.
    pub key: Vec<u8>,
    /// The value's bytes as stored.
    pub value: Vec<u8>,
}

/// Every live entry of an operator's state in the newest restorable checkpoint (or the
/// checkpoint at or before `batch`).
pub fn dump_state(store: &CheckpointStore, operator: &str, batch: Option<BatchId>) -> Result<Vec<StateRow>> {
    let d = show(store, batch)?;
    let known = d.graph.as_ref().is_some_and(|g| g.operators.iter().any(|o| o.name == operator));
    let Some(b) = d.checkpoint_batch else {
        return Err(Error::Unrecoverable {
            location: store.location().to_string(),
            reason: "no restorable checkpoint".into(),
        });
    };
    if !known {
        let names: Vec<String> =
            d.graph.iter().flat_map(|g| g.operators.iter().map(|o| o.name.clone())).collect();
        return Err(Error::Incompatible {
            operator: operator.to_string(),
            difference: format!("no such operator in the checkpoint; it has {names:?}"),
        });
    }
    let state = load_checkpoint(store, BatchId(b))?;
    let mut rows = Vec::new();
    let ours = |t: &&crate::TableData| {
        paths::table_of_operator(&t.id, operator) || paths::table_source(&t.id) == Some(operator)
    };
    for t in state.tables.iter().filter(ours) {
        for e in t.reader() {
            let (k, v) = e?;
            if let Some(v) = v {
                rows.push(StateRow { table: t.id.clone(), key: k.to_vec(), value: v.to_vec() });
            }
        }
    }
    Ok(rows)
}

/// A reading of a stored key for people: a source's partition in a positions table, else
/// [`guess`].
///
/// ```
/// use cairn_checkpoint::{admin::describe_key, SourcePartition};
/// let key = SourcePartition::topic("t", 2).key_bytes();
/// assert_eq!(describe_key("$positions/orders", &key).as_deref(), Some("t[2]"));
/// assert_eq!(describe_key("totals", &[3, b'a', b'b', b'c']).as_deref(), Some("\"abc\""));
/// ```
pub fn describe_key(table: &str, key: &[u8]) -> Option<String> {
    // Only the current positions tables hold typed keys; legacy ones hold postcard strings.
    let typed = paths::table_source(table).is_some_and(|source| paths::source_table(source) == table);
    match typed.then(|| crate::SourcePartition::from_key_bytes(key)).flatten() {
        Some(p) => Some(p.to_string()),
        None => guess(key),
    }
}

/// A best-effort reading of postcard bytes for people: a UTF-8 string (length-prefixed), or the
/// sequence of unsigned varints the bytes consist of (integers, tuples and structs of integers
/// encode that way; signed ones are zigzag-encoded). `None` when neither fits.
///
/// ```
/// use cairn_checkpoint::admin::guess;
/// assert_eq!(guess(&[3, b'a', b'b', b'c']).as_deref(), Some("\"abc\""));
/// assert_eq!(guess(&[5, 0x96, 0x01]).as_deref(), Some("[5, 150]"));
/// ```
pub fn guess(bytes: &[u8]) -> Option<String> {
    if let Some((&len, rest)) = bytes.split_first() {
        if len < 0x80 && rest.len() == len as usize && !rest.is_empty() {
            if let Ok(s) = std::str::from_utf8(rest) {
                if s.chars().all(|c| !c.is_control()) {
                    return Some(format!("{s:?}"));
                }
            }
        }
    }
    let mut out = Vec::new();
    let (mut v, mut shift) = (0u64, 0u32);
    for &b in bytes {
        if shift > 63 {
            return None;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            out.push(v.to_string());
            v = 0;
            shift = 0;
        } else {
            shift += 7;
        }
    }
    (shift == 0 && !out.is_empty()).then(|| format!("[{}]", out.join(", ")))
}

/// What a new build changes relative to the checkpoint's graph (newest restorable checkpoint,
/// else the metadata's), and whether it can start on it.
#[derive(Debug, Clone, Serialize)]
pub struct GraphDiff {
    /// Every difference, removed and retyped operators first.
    pub changes: Vec<Change>,
    /// Stateful operators and sources found unchanged: their state is kept as it is.
    pub kept: Vec<String>,
    /// Operators whose stored state the new build would drop (`drop_state`, given as `dropped`):
    /// removed or retyped ones named there.
    pub dropped: Vec<String>,
    /// Whether the new build can start on the checkpoint (dropping only what `dropped` names).
    pub compatible: bool,
}

/// Compares the checkpoint's graph with `new` (e.g. printed by a job's `--print-graph`); `drop`
/// lists the operators the new build drops the state of (its `drop_state` settings).
pub fn diff(store: &CheckpointStore, new: &GraphDescription, drop: &[String]) -> Result<GraphDiff> {
    let d = show(store, None)?;
    let stored = d.graph.ok_or_else(|| Error::Unrecoverable {
        location: store.location().to_string(),
        reason: "the location has no graph description (no metadata and no checkpoint)".into(),
    })?;
    let changes = compat::diff(&stored, new);
    let compatible = changes.iter().all(|c| c.is_compatible(drop));
    let dropped = changes
        .iter()
        .filter(|c| !c.is_compatible(&[]) && c.is_compatible(drop))
        .filter_map(|c| c.operator().map(str::to_string))
        .collect();
    let touched: Vec<&str> = changes
        .iter()
        .flat_map(|c| match c {
            Change::Renamed { from, to } => vec![from.as_str(), to.as_str()],
            c => c.operator().into_iter().collect(),
        })
        .collect();
    let kept =
        stored.operators.iter().map(|o| o.name.clone()).filter(|n| !touched.contains(&n.as_str())).collect();
    Ok(GraphDiff { changes, kept, dropped, compatible })
}
