//! The checkpoint protocol as pure functions of a listing: which objects restore a checkpoint,
//! which batches must be replayed, and what retention may delete. No I/O happens here; the
//! [`crate::store`] module lists, reads and deletes according to these decisions.

use crate::paths::ObjectName;
use crate::{BatchId, BatchPlan};
use std::collections::BTreeSet;

/// The recognised objects of a checkpoint location at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    names: BTreeSet<ObjectName>,
}

impl Listing {
    /// A listing of the given objects.
    pub fn new(names: impl IntoIterator<Item = ObjectName>) -> Self {
        Self { names: names.into_iter().collect() }
    }

    /// Whether the object is present.
    pub fn contains(&self, name: ObjectName) -> bool {
        self.names.contains(&name)
    }

    /// All objects, in a stable order.
    pub fn names(&self) -> impl Iterator<Item = ObjectName> + '_ {
        self.names.iter().copied()
    }

    /// Batches that have a state checkpoint (full or delta), ascending.
    pub fn checkpoints(&self) -> Vec<BatchId> {
        let ids: BTreeSet<BatchId> = self
            .names
            .iter()
            .filter_map(|n| match *n {
                ObjectName::Full(b) | ObjectName::Delta { batch: b, .. } => Some(b),
                _ => None,
            })
            .collect();
        ids.into_iter().collect()
    }

    /// Batches with a logged plan, ascending.
    pub fn plans(&self) -> Vec<BatchId> {
        self.names.iter().filter_map(|n| if let ObjectName::Plan(b) = *n { Some(b) } else { None }).collect()
    }

    /// Batches with a commit record, ascending.
    pub fn commits(&self) -> Vec<BatchId> {
        self.names
            .iter()
            .filter_map(|n| if let ObjectName::Commit(b) = *n { Some(b) } else { None })
            .collect()
    }

    fn delta_of(&self, batch: BatchId) -> Option<ObjectName> {
        // Several deltas for one batch cannot be written by one lease holder; if foreign writers
        // left more, the one with the newest parent is the shortest chain.
        self.names
            .range(
                ObjectName::Delta { batch, parent: BatchId(0) }..=ObjectName::Delta {
                    batch,
                    parent: BatchId(u64::MAX),
                },
            )
            .next_back()
            .copied()
    }
}

/// The objects that restore the checkpoint of `batch`, oldest first (a full snapshot followed by
/// deltas). With `prefer_full`, a full snapshot cuts the chain as soon as one exists; without, the
/// chain follows deltas back to the oldest full (a fallback when a compacted snapshot is damaged).
/// `None` when a link is missing.
///
/// ```
/// use cairn_checkpoint::protocol::{chain, Listing};
/// use cairn_checkpoint::paths::ObjectName::*;
/// use cairn_checkpoint::BatchId as B;
/// let l = Listing::new([Full(B(0)), Delta { batch: B(1), parent: B(0) }, Delta { batch: B(2), parent: B(1) }, Full(B(1))]);
/// assert_eq!(chain(&l, B(2), true).unwrap(), vec![Full(B(1)), Delta { batch: B(2), parent: B(1) }]);
/// assert_eq!(chain(&l, B(2), false).unwrap().len(), 3);
/// ```
pub fn chain(listing: &Listing, batch: BatchId, prefer_full: bool) -> Option<Vec<ObjectName>> {
    let mut out = Vec::new();
    let mut cur = batch;
    loop {
        let full = ObjectName::Full(cur);
        let delta = listing.delta_of(cur);
        let next = match (prefer_full || delta.is_none(), listing.contains(full)) {
            (true, true) => {
                out.push(full);
                break;
            }
            _ => delta?,
        };
        out.push(next);
        let ObjectName::Delta { parent, .. } = next else { unreachable!("delta_of returns deltas") };
        if parent >= cur {
            return None; // a parent must be older; anything else is foreign or corrupt
        }
        cur = parent;
    }
    out.reverse();
    Some(out)
}

/// One way to restore state: the checkpoint's batch and the objects to load, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub batch: BatchId,
    pub chain: Vec<ObjectName>,
}

/// Restoration attempts in order of preference: newest checkpoint first; for each, the chain
/// through full snapshots, then (if different) the chain through deltas only.
pub fn recovery_attempts(listing: &Listing) -> Vec<Attempt> {
    let mut out = Vec::new();
    for batch in listing.checkpoints().into_iter().rev() {
        let preferred = chain(listing, batch, true);
        let deltas_only = chain(listing, batch, false);
        if let Some(c) = &preferred {
            out.push(Attempt { batch, chain: c.clone() });
        }
        if let Some(c) = deltas_only {
            if preferred.as_ref() != Some(&c) {
                out.push(Attempt { batch, chain: c });
            }
        }
    }
    out
}

/// The planned batches to replay after restoring the checkpoint of `after` (or from nothing),
/// in order. A single missing plan followed by a present one is listed too: its successor
/// carries a copy of it ([`resolve_plans`] rebuilds it). Two missing plans in a row (or a missing
/// first plan with nothing after it) are a damaged log, and the error says where.
///
/// ```
/// use cairn_checkpoint::protocol::{replay_batches, Listing};
/// use cairn_checkpoint::paths::ObjectName::*;
/// use cairn_checkpoint::BatchId as B;
/// let l = Listing::new([Full(B(3)), Plan(B(4)), Plan(B(6))]);
/// assert_eq!(replay_batches(&l, Some(B(3))).unwrap(), vec![B(4), B(5), B(6)]);
/// let l = Listing::new([Full(B(3)), Plan(B(4)), Plan(B(7))]);
/// assert!(replay_batches(&l, Some(B(3))).is_err());
/// ```
pub fn replay_batches(listing: &Listing, after: Option<BatchId>) -> Result<Vec<BatchId>, String> {
    let first = after.map_or(0, |b| b.0 + 1);
    let plans: BTreeSet<u64> = listing.plans().into_iter().map(|b| b.0).filter(|b| *b >= first).collect();
    let Some(&last) = plans.iter().next_back() else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity((last + 1 - first) as usize);
    for b in first..=last {
        if !plans.contains(&b) && !plans.contains(&(b + 1)) {
            return Err(match after {
                None if b == 0 => {
                    format!("no state checkpoint, and the batch log starts at batch {} instead of 0", plans.iter().next().copied().unwrap_or(last))
                }
                _ => format!(
                    "batch log has a gap: the plans of batches {b} and {} are both missing but batch {last} was planned",
                    b + 1
                ),
            });
        }
        out.push(BatchId(b));
    }
    Ok(out)
}

/// The plans recovery replays, and what it had to work around to get them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedPlans {
    /// The plans to replay, in order.
    pub plans: Vec<BatchPlan>,
    /// Batches whose plan was rebuilt from its successor's copy (their plan object should be
    /// rewritten).
    pub rebuilt: Vec<BatchId>,
    /// What was worked around, for the recovery warnings.
    pub warnings: Vec<String>,
}

/// Decides which plans recovery replays from what it read for each of `ids` (from
/// [`replay_batches`]; `Err` holds why an object is unreadable or missing): a plan that does not
/// verify is rebuilt from the copy its successor carries; a last plan that cannot be read and has
/// no standalone commit record (`committed`) is dropped, and that batch is planned again. Anything
/// else is an error naming the batch.
pub fn resolve_plans(
    ids: &[BatchId],
    read: Vec<Result<BatchPlan, String>>,
    committed: &BTreeSet<BatchId>,
) -> Result<ResolvedPlans, String> {
    let read: Vec<Result<BatchPlan, String>> = ids
        .iter()
        .zip(read)
        .map(|(id, r)| match r {
            Ok(p) if p.batch_id != *id => Err(format!("the object holds the plan of batch {}", p.batch_id)),
            other => other,
        })
        .collect();
    let mut out = ResolvedPlans::default();
    for (i, id) in ids.iter().enumerate() {
        match &read[i] {
            Ok(p) => out.plans.push(p.clone()),
            Err(e) => {
                let copy =
                    read.get(i + 1).and_then(|n| n.as_ref().ok()).and_then(|n| n.previous_plan.clone());
                match copy {
                    Some(copy) => {
                        out.warnings.push(format!(
                            "the plan of batch {id} is unusable ({e}); rebuilt from the copy in the plan of batch {}",
                            id.0 + 1
                        ));
                        out.plans.push(BatchPlan::from_copy(*id, copy));
                        out.rebuilt.push(*id);
                    }
                    None if i + 1 == ids.len() && !committed.contains(id) => {
                        out.warnings
                            .push(format!("the plan of the last batch {id} is unusable ({e}); it will be planned again"));
                    }
                    None if i + 1 < ids.len() => {
                        return Err(format!(
                            "the plan of batch {id} is unusable ({e}) and the plan of batch {} holds no copy of it",
                            id.0 + 1
                        ))
                    }
                    None => {
                        return Err(format!(
                            "the plan of batch {id} is unusable ({e}), and the batch was committed, so it cannot be planned again"
                        ))
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What retention keeps and deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Checkpoints kept, newest first.
    pub keep_checkpoints: Vec<BatchId>,
    /// An older checkpoint kept (with its chain and the batch log after it) only because none of
    /// the kept ones restores without an object of the newest checkpoint's chain: the second,
    /// independent restore point.
    pub fallback: Option<BatchId>,
    /// No independent checkpoint exists yet (every checkpoint builds on the job's first full
    /// snapshot): the whole batch log is kept, so that replaying from the start is the second
    /// restore point.
    pub keeps_whole_log: bool,
    /// Objects to delete, in an order that never leaves a kept checkpoint unusable if interrupted:
    /// batch logs (oldest first), then state objects (oldest first).
    pub delete: Vec<ObjectName>,
}

/// Plans retention keeping the newest `keep` checkpoints (at least one), everything their chains
/// need, and the batch log after the oldest kept one. Unknown objects are never touched.
///
/// No single damaged object may lose the job, so there is always a second restore point that
/// shares no object with the newest checkpoint's chain: one of the kept checkpoints, else an
/// older checkpoint kept for that purpose ([`RetentionPlan::fallback`]), else the whole batch
/// log (a replay from the start, [`RetentionPlan::keeps_whole_log`]).
///
/// ```
/// use cairn_checkpoint::protocol::{plan_retention, Listing};
/// use cairn_checkpoint::paths::ObjectName::*;
/// use cairn_checkpoint::BatchId as B;
/// let l = Listing::new([Plan(B(0)), Commit(B(0)), Full(B(0)), Plan(B(1)), Commit(B(1)), Full(B(1))]);
/// let p = plan_retention(&l, 1);
/// // Checkpoint 0 is the independent second restore point of checkpoint 1: both stay, and the
/// // log after batch 0 stays for the replay from it.
/// assert_eq!(p.delete, vec![Commit(B(0)), Plan(B(0))]);
/// assert_eq!((p.keep_checkpoints, p.fallback), (vec![B(1)], Some(B(0))));
/// ```
pub fn plan_retention(listing: &Listing, keep: usize) -> RetentionPlan {
    let keep = keep.max(1);
    let mut kept = Vec::new();
    let mut needed = BTreeSet::new();
    let mut newest_chain = BTreeSet::new();
    let mut independent = false;
    let checkpoints = listing.checkpoints();
    for batch in checkpoints.iter().rev() {
        if kept.len() == keep {
            break;
        }
        if let Some(c) = chain(listing, *batch, true) {
            if kept.is_empty() {
                newest_chain = c.iter().copied().collect();
            } else if c.iter().all(|n| !newest_chain.contains(n)) {
                independent = true;
            }
            needed.extend(c);
            kept.push(*batch);
        }
    }
    let Some(&oldest) = kept.last() else {
        return RetentionPlan::default();
    };
    let mut fallback = None;
    if !independent {
        fallback = checkpoints.iter().rev().filter(|b| **b < oldest).find_map(|b| {
            [true, false].into_iter().find_map(|prefer_full| {
                chain(listing, *b, prefer_full)
                    .filter(|c| c.iter().all(|n| !newest_chain.contains(n)))
                    .map(|c| (*b, c))
            })
        });
        if let Some((_, c)) = &fallback {
            needed.extend(c.iter().copied());
        }
    }
    let keeps_whole_log = !independent && fallback.is_none();
    let log_floor = if keeps_whole_log { None } else { Some(fallback.as_ref().map_or(oldest, |f| f.0)) };
    let mut logs = Vec::new();
    let mut state = Vec::new();
    for n in listing.names() {
        match n {
            ObjectName::Plan(b) | ObjectName::Commit(b) if log_floor.is_some_and(|f| b <= f) => logs.push(n),
            ObjectName::Full(b) | ObjectName::Delta { batch: b, .. }
                if !needed.contains(&n) && b < kept[0] =>
            {
                state.push(n)
            }
            _ => {}
        }
    }
    logs.sort_by_key(|n| match n {
        ObjectName::Plan(b) | ObjectName::Commit(b) => (*b, matches!(n, ObjectName::Plan(_))),
        _ => unreachable!("only logs"),
    });
    state.sort_by_key(|n| match n {
        ObjectName::Full(b) | ObjectName::Delta { batch: b, .. } => *b,
        _ => unreachable!("only state"),
    });
    logs.extend(state);
    RetentionPlan { keep_checkpoints: kept, fallback: fallback.map(|f| f.0), keeps_whole_log, delete: logs }
}

/// Whether a batch is committed: it has a commit record, or the next batch was planned (a plan
/// is only written once the previous batch's sinks finished, and carries its commit record).
///
/// ```
/// use cairn_checkpoint::protocol::{is_committed, Listing};
/// use cairn_checkpoint::paths::ObjectName::*;
/// use cairn_checkpoint::BatchId as B;
/// let l = Listing::new([Plan(B(4)), Plan(B(5)), Plan(B(6)), Commit(B(6)), Plan(B(7))]);
/// assert!(is_committed(&l, B(4)) && is_committed(&l, B(6)));
/// assert!(!is_committed(&l, B(7)));
/// ```
pub fn is_committed(listing: &Listing, batch: BatchId) -> bool {
    listing.contains(ObjectName::Commit(batch)) || listing.contains(ObjectName::Plan(BatchId(batch.0 + 1)))
}

/// What to do about the state checkpoint after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointDecision {
    /// Fewer batches than the checkpoint interval since the last checkpoint.
    NotDue,
    /// Cut a checkpoint now (waiting for room in the writer's queue if need be).
    Write,
    /// Due, but the writer is busy: put it off (the changes go into the next one) rather than
    /// stall the batch.
    Defer,
}

/// Decides the checkpoint after a batch: due every `every` batches; while the writer's queue is
/// full a due checkpoint is deferred, for at most `max_deferral` batches, after which the
/// scheduler waits (bounding what a crash can make it replay).
///
/// ```
/// use cairn_checkpoint::protocol::{checkpoint_decision, CheckpointDecision::*};
/// assert_eq!(checkpoint_decision(1, 2, 5, false), NotDue);
/// assert_eq!(checkpoint_decision(2, 2, 5, false), Write);
/// assert_eq!(checkpoint_decision(2, 2, 5, true), Defer);
/// assert_eq!(checkpoint_decision(7, 2, 5, true), Write); // overdue: wait for the writer
/// ```
pub fn checkpoint_decision(
    since_last: u64,
    every: u64,
    max_deferral: u64,
    writer_full: bool,
) -> CheckpointDecision {
    if since_last < every.max(1) {
        return CheckpointDecision::NotDue;
    }
    let overdue = since_last - every.max(1) >= max_deferral;
    if writer_full && !overdue {
        CheckpointDecision::Defer
    } else {
        CheckpointDecision::Write
    }
}

/// Whether the newest checkpoint's chain (`chain_len` objects through full snapshots) is long
/// enough that a full snapshot should be compacted from it: more than `full_every` objects. The
/// length comes from the location, not from memory, so restarts still get snapshots cut.
///
/// ```
/// use cairn_checkpoint::protocol::compaction_due;
/// assert!(!compaction_due(4, 4));
/// assert!(compaction_due(5, 4));
/// ```
pub fn compaction_due(chain_len: usize, full_every: usize) -> bool {
    chain_len > full_every
}
