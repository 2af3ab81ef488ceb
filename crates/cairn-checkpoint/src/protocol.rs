//! The checkpoint protocol as pure functions of a listing: which objects restore a checkpoint,
//! which batches must be replayed, and what retention may delete. No I/O happens here; the
//! [`crate::store`] module lists, reads and deletes according to these decisions.

use crate::paths::ObjectName;
use crate::{BatchId, BatchPlan, Epoch, LeaseRecord};
use std::collections::{BTreeMap, BTreeSet};

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

    /// The listing without `excluded` (objects recovery did not accept).
    pub fn without(&self, excluded: &[ObjectName]) -> Self {
        Self::new(self.names().filter(|n| !excluded.contains(n)))
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
    /// The batch after which the checkpoint to restore was taken.
    pub batch: BatchId,
    /// The state objects to read and merge, oldest first: a full snapshot, then its deltas.
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
pub fn replay_batches(listing: &Listing, after: Option<BatchId>) -> Result<Vec<BatchId>, LogDamage> {
    let first = after.map_or(0, |b| b.0 + 1);
    let plans: BTreeSet<u64> = listing.plans().into_iter().map(|b| b.0).filter(|b| *b >= first).collect();
    let Some(&last) = plans.iter().next_back() else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity((last + 1 - first) as usize);
    for b in first..=last {
        if !plans.contains(&b) && !plans.contains(&(b + 1)) {
            return Err(match after {
                None if b == 0 => {
                    LogDamage::StartsLate { first: BatchId(plans.iter().next().copied().unwrap_or(last)) }
                }
                _ => LogDamage::Gap { missing: BatchId(b), last: BatchId(last) },
            });
        }
        out.push(BatchId(b));
    }
    Ok(out)
}

/// How recovery goes on when no checkpoint could be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WithoutCheckpoint {
    /// The location never had a checkpoint: the batch log (possibly empty) is replayed from 0.
    Fresh(Vec<BatchId>),
    /// Checkpoints exist but none restores; the batch log still starts at batch 0 (retention
    /// keeps it whole until an independent checkpoint exists), so everything is replayed.
    ReplayWholeLog(Vec<BatchId>),
    /// Checkpoints exist, none restores, and the log no longer starts at batch 0: starting
    /// empty would silently lose state, so recovery must refuse.
    NoRestorePoint,
}

/// The decision when no checkpoint restores (none exists, or every one failed to load or has an
/// incomplete chain).
///
/// ```
/// use cairn_checkpoint::protocol::{restore_without_checkpoint as r, Listing, WithoutCheckpoint::*};
/// use cairn_checkpoint::paths::ObjectName::*;
/// use cairn_checkpoint::BatchId as B;
/// assert_eq!(r(&Listing::new([])).unwrap(), Fresh(vec![]));
/// assert_eq!(r(&Listing::new([Full(B(3)), Plan(B(0)), Plan(B(1))])).unwrap(), ReplayWholeLog(vec![B(0), B(1)]));
/// // A checkpoint that does not restore and no log to replay: refused, never an empty start.
/// assert_eq!(r(&Listing::new([Delta { batch: B(5), parent: B(3) }])).unwrap(), NoRestorePoint);
/// ```
pub fn restore_without_checkpoint(listing: &Listing) -> Result<WithoutCheckpoint, LogDamage> {
    if listing.checkpoints().is_empty() {
        return replay_batches(listing, None).map(WithoutCheckpoint::Fresh);
    }
    Ok(match replay_batches(listing, None) {
        Ok(replay) if replay.first() == Some(&BatchId(0)) => WithoutCheckpoint::ReplayWholeLog(replay),
        _ => WithoutCheckpoint::NoRestorePoint,
    })
}

/// Why the batch log cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum LogDamage {
    /// There is no checkpoint and the log does not start at batch 0 (retention removed the
    /// beginning after a checkpoint that is now gone).
    #[error("no state checkpoint, and the batch log starts at batch {first} instead of 0")]
    StartsLate {
        /// The oldest batch that still has a plan.
        first: BatchId,
    },
    /// Two plans in a row are missing: the second one's copy of the first is gone too.
    #[error("batch log has a gap: the plans of batches {missing} and {} are both missing but batch {last} was planned", missing.0 + 1)]
    Gap {
        /// The first of the two missing plans.
        missing: BatchId,
        /// The newest planned batch, which cannot be reached without them.
        last: BatchId,
    },
    /// A plan is unusable and its successor carries no copy of it.
    #[error("the plan of batch {batch} is unusable ({cause}) and the plan of batch {} holds no copy of it", batch.0 + 1)]
    NoCopy {
        /// The batch whose plan is unusable.
        batch: BatchId,
        /// Why the plan cannot be used.
        cause: PlanUnusable,
    },
    /// The last plan is unusable although the batch committed: it cannot be planned again.
    #[error("the plan of batch {batch} is unusable ({cause}), and the batch was committed, so it cannot be planned again")]
    Committed {
        /// The last planned batch, which has a commit record.
        batch: BatchId,
        /// Why its plan cannot be used.
        cause: PlanUnusable,
    },
}

/// Why one plan object cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlanUnusable {
    /// It could not be read or did not verify (the store's error).
    #[error(transparent)]
    Unreadable(Box<crate::Error>),
    /// It verifies but is the plan of another batch.
    #[error("the object holds the plan of batch {0}")]
    HoldsOther(BatchId),
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
/// [`replay_batches`]; `Err` is the store's answer for an unreadable or missing one): a plan that does not
/// verify is rebuilt from the copy its successor carries; a last plan that cannot be read and has
/// no standalone commit record (`committed`) is dropped, and that batch is planned again. Anything
/// else is an error naming the batch.
pub fn resolve_plans(
    ids: &[BatchId],
    read: Vec<Result<BatchPlan, crate::Error>>,
    committed: &BTreeSet<BatchId>,
) -> Result<ResolvedPlans, LogDamage> {
    let mut read: Vec<Option<Result<BatchPlan, PlanUnusable>>> = ids
        .iter()
        .zip(read)
        .map(|(id, r)| {
            Some(match r {
                Ok(p) if p.batch_id != *id => Err(PlanUnusable::HoldsOther(p.batch_id)),
                Ok(p) => Ok(p),
                Err(e) => Err(PlanUnusable::Unreadable(Box::new(e))),
            })
        })
        .collect();
    let mut out = ResolvedPlans::default();
    for (i, id) in ids.iter().enumerate() {
        let this = read[i].take().unwrap_or(Err(PlanUnusable::HoldsOther(*id)));
        match this {
            Ok(p) => out.plans.push(p),
            Err(e) => {
                let copy = read
                    .get(i + 1)
                    .and_then(|n| n.as_ref())
                    .and_then(|n| n.as_ref().ok())
                    .and_then(|n| n.previous_plan.clone());
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
                        out.warnings.push(format!(
                            "the plan of the last batch {id} is unusable ({e}); it will be planned again"
                        ));
                    }
                    None if i + 1 < ids.len() => return Err(LogDamage::NoCopy { batch: *id, cause: e }),
                    None => return Err(LogDamage::Committed { batch: *id, cause: e }),
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
        // Through full snapshots first, over every candidate: an all-delta path back to an old
        // base is independent too, but keeping it keeps every delta since that base, and the
        // location then grows with the run.
        fallback = [true, false].into_iter().find_map(|prefer_full| {
            checkpoints.iter().rev().filter(|b| **b < oldest).find_map(|b| {
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

/// Whether the engine must cut the next checkpoint as a full snapshot from memory: its chain as a
/// delta (`chain_len_if_delta` objects, through the newest full snapshot) would pass twice
/// `full_every`. Background compaction normally keeps chains at `full_every + 1`; on storage too
/// slow for it this keeps every chain, and so restore time, bounded anyway.
///
/// ```
/// use cairn_checkpoint::protocol::must_cut_full;
/// assert!(!must_cut_full(20, 10));
/// assert!(must_cut_full(21, 10));
/// ```
pub fn must_cut_full(chain_len_if_delta: usize, full_every: usize) -> bool {
    chain_len_if_delta > 2 * full_every.max(1)
}

/// The fence points of a location: per lease epoch that wrote a fence record, the first batch
/// that objects of older epochs may no longer concern.
pub type Fences = BTreeMap<Epoch, BatchId>;

/// Why an object is not accepted: a newer epoch fenced its writer off from `from_batch` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The newer epoch whose fence excludes the object.
    pub by_epoch: Epoch,
    /// That epoch's fence point.
    pub from_batch: BatchId,
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} took the location over from batch {}", self.by_epoch, self.from_batch)
    }
}

/// Whether an object written in `epoch` about `batch` is *not* accepted: some newer epoch's
/// fence point is at or before `batch`. A new holder lists the location only after its claim
/// exists, so everything an older writer created before that claim is below the fence; anything
/// at or beyond it was created (or re-created) by a writer that had already lost the lease.
/// The smallest newer fence decides (fences grow with epochs; the minimum is also right if not).
///
/// ```
/// use cairn_checkpoint::protocol::{fenced, Fences};
/// use cairn_checkpoint::BatchId as B;
/// let f = Fences::from([(2, B(10))]);
/// assert!(fenced(&f, 1, B(9)).is_none());
/// assert_eq!(fenced(&f, 1, B(10)).unwrap().by_epoch, 2);
/// assert!(fenced(&f, 2, B(50)).is_none(), "the fencing epoch's own objects are accepted");
/// ```
pub fn fenced(fences: &Fences, epoch: Epoch, batch: BatchId) -> Option<Fenced> {
    fences
        .range(epoch.saturating_add(1)..)
        .map(|(e, b)| Fenced { by_epoch: *e, from_batch: *b })
        .filter(|f| batch >= f.from_batch)
        .min_by_key(|f| (f.from_batch, f.by_epoch))
}

/// The fence point a new holder records: one past the newest batch any plan, commit or state
/// object of the listing concerns (0 on an empty location).
pub fn fence_point(listing: &Listing) -> BatchId {
    listing
        .names()
        .filter_map(|n| match n {
            ObjectName::Plan(b) | ObjectName::Commit(b) | ObjectName::Full(b) => Some(b),
            ObjectName::Delta { batch, .. } => Some(batch),
            _ => None,
        })
        .max()
        .map_or(BatchId(0), |b| BatchId(b.0 + 1))
}

/// The newest lease epoch any lease object of the listing names (claim, fence or heartbeat), if
/// any. A new holder claims the epoch after it, so a lost claim object never lets two processes
/// share an epoch.
pub fn latest_epoch(listing: &Listing) -> Option<Epoch> {
    listing
        .names()
        .filter_map(|n| match n {
            ObjectName::LeaseClaim(e) | ObjectName::LeaseFence(e) | ObjectName::LeaseHeartbeat(e) => Some(e),
            _ => None,
        })
        .max()
}

/// [`split_replay`]'s answer: the accepted plans and the fenced-off ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySplit {
    /// Batches to replay, ascending.
    pub accepted: Vec<BatchId>,
    /// Plans not accepted, with the fence that excludes each.
    pub rejected: Vec<(BatchId, Fenced)>,
}

/// An accepted plan follows a fenced-off one: some writer ignored the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the plan of batch {accepted} is accepted but the earlier plan of batch {fenced_batch} is fenced off ({by})")]
pub struct ReplayAfterFenced {
    /// The batch whose plan is accepted although an earlier one is not.
    pub accepted: BatchId,
    /// The first batch whose plan was fenced off.
    pub fenced_batch: BatchId,
    /// The fence that excludes the plan of `fenced_batch`.
    pub by: Fenced,
}

/// Of the planned batches to replay (ascending, with their writers' epochs), the accepted prefix
/// and the rejected rest. Rejected plans can only be a tail: the fencing holder writes every plan
/// from its fence point on itself, replacing what a fenced writer left. An accepted plan after a
/// rejected one means a writer ignored the protocol, and the error says where.
pub fn split_replay(plans: &[(BatchId, Epoch)], fences: &Fences) -> Result<ReplaySplit, ReplayAfterFenced> {
    let mut out = ReplaySplit::default();
    for &(b, e) in plans {
        match fenced(fences, e, b) {
            Some(f) => out.rejected.push((b, f)),
            None if out.rejected.is_empty() => out.accepted.push(b),
            None => {
                let (fenced_batch, by) = out.rejected[0];
                return Err(ReplayAfterFenced { accepted: b, fenced_batch, by });
            }
        }
    }
    Ok(out)
}

/// What a starting process may do about the current lease holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// The holder released the location, or its heartbeat is older than its TTL: take the next
    /// epoch now.
    Free,
    /// The holder ran on this host and its process is gone: take over at once.
    DeadHere,
    /// The holder runs on this host and is alive, but may be exiting (it was just killed): wait
    /// a little, then look again.
    WaitHere,
    /// A live holder: refuse, telling the user how long until its lease expires.
    Held {
        /// Milliseconds until the holder's latest heartbeat is older than its TTL, when the
        /// location may be taken over unless it heartbeats again.
        wait_ms: u64,
    },
}

/// The takeover rule, without I/O: `holder` is the newest claim with its latest heartbeat,
/// `holder_alive` whether it still runs (asked only when the hosts match: for another pid whether that
/// process exists, for this pid whether this process still holds that lease).
///
/// ```
/// use cairn_checkpoint::protocol::{takeover, Takeover};
/// use cairn_checkpoint::LeaseRecord;
/// let r = LeaseRecord { owner: "o".into(), host: "h2".into(), pid: 7, started_ms: 0,
///     heartbeat_ms: 1_000, ttl_ms: 500, epoch: 1, released: false, fence_from: None };
/// assert_eq!(takeover(&r, 1_200, "h1", 9, true), Takeover::Held { wait_ms: 300 });
/// assert_eq!(takeover(&r, 1_600, "h1", 9, true), Takeover::Free);
/// ```
pub fn takeover(holder: &LeaseRecord, now_ms: i64, host: &str, pid: u32, holder_alive: bool) -> Takeover {
    let age = now_ms - holder.heartbeat_ms;
    let fresh = age < holder.ttl_ms as i64;
    // Another process of this host: its pid tells whether it still runs. This process's own
    // earlier lease (another context in the same process) is as live as any remote holder.
    // On this host, liveness is known rather than guessed: another process's pid either runs or
    // not, and this process knows which leases it still holds (an earlier context that failed
    // without releasing, say on a full disk, is dead; another live context on the same location
    // is a holder like any remote one).
    let same_host = holder.host == host;
    if holder.released || !fresh {
        return Takeover::Free;
    }
    if same_host && !holder_alive {
        return Takeover::DeadHere;
    }
    if same_host && holder.pid != pid {
        return Takeover::WaitHere;
    }
    Takeover::Held { wait_ms: (holder.ttl_ms as i64 - age).max(0) as u64 }
}

#[cfg(test)]
mod fence_tests {
    use super::*;
    use crate::BatchId as B;

    #[test]
    fn fenced_table() {
        let none = Fences::new();
        let one = Fences::from([(2, B(10))]);
        let two = Fences::from([(2, B(10)), (3, B(14))]);
        // (fences, writer epoch, batch, expected fencing epoch)
        let cases: [(&Fences, Epoch, u64, Option<Epoch>); 14] = [
            (&none, 0, 0, None),
            (&none, 5, 99, None),
            (&one, 0, 9, None),     // a format-v1 object below the first fence
            (&one, 0, 10, Some(2)), // a format-v1 object cannot appear beyond it
            (&one, 1, 9, None),
            (&one, 1, 10, Some(2)),
            (&one, 1, 11, Some(2)),
            (&one, 2, 10, None),
            (&one, 3, 10, None), // a newer epoch without a fence record is not fenced by an older
            (&two, 1, 12, Some(2)),
            (&two, 2, 13, None),
            (&two, 2, 14, Some(3)),
            (&two, 1, 20, Some(2)), // the smallest fence reports
            (&two, 3, 1_000, None),
        ];
        for (fences, epoch, batch, want) in cases {
            let got = fenced(fences, epoch, B(batch)).map(|f| f.by_epoch);
            assert_eq!(got, want, "epoch {epoch}, batch {batch}, fences {fences:?}");
        }
        // An epoch that died before writing its fence does not protect anything; the next does.
        let gap = Fences::from([(4, B(7))]);
        assert_eq!(fenced(&gap, 2, B(7)), Some(Fenced { by_epoch: 4, from_batch: B(7) }));
    }

    #[test]
    fn fence_point_and_latest_epoch() {
        use ObjectName::*;
        assert_eq!(fence_point(&Listing::default()), B(0));
        let l = Listing::new([
            Plan(B(3)),
            Commit(B(4)),
            Full(B(2)),
            Delta { batch: B(5), parent: B(2) },
            LeaseClaim(1),
            LeaseClaim(4),
            LeaseFence(1),
            Metadata,
        ]);
        assert_eq!(fence_point(&l), B(6));
        assert_eq!(latest_epoch(&l), Some(4));
        assert_eq!(
            latest_epoch(&Listing::new([LeaseClaim(2), LeaseFence(3)])),
            Some(3),
            "a fence without its claim"
        );
        assert_eq!(latest_epoch(&Listing::new([Plan(B(1))])), None);
        // Lease objects are not checkpoints, plans or commits.
        assert_eq!(l.checkpoints(), vec![B(2), B(5)]);
    }

    #[test]
    fn split_replay_table() {
        let f = Fences::from([(2, B(10))]);
        let s = split_replay(&[(B(8), 1), (B(9), 1), (B(10), 2), (B(11), 2)], &f).unwrap();
        assert_eq!((s.accepted.len(), s.rejected.len()), (4, 0));
        let s = split_replay(&[(B(9), 1), (B(10), 1)], &f).unwrap();
        assert_eq!(s.accepted, vec![B(9)]);
        assert_eq!(s.rejected, vec![(B(10), Fenced { by_epoch: 2, from_batch: B(10) })]);
        let s = split_replay(&[(B(10), 1), (B(11), 1)], &f).unwrap();
        assert!(s.accepted.is_empty());
        assert_eq!(s.rejected.len(), 2);
        let err = split_replay(&[(B(10), 1), (B(11), 2)], &f).unwrap_err();
        assert_eq!((err.accepted, err.fenced_batch), (B(11), B(10)));
        assert!(err.to_string().contains("batch 11"), "{err}");
    }

    #[test]
    fn takeover_table() {
        let rec = |host: &str, pid: u32, hb: i64, released: bool| LeaseRecord {
            owner: "o".into(),
            host: host.into(),
            pid,
            started_ms: 0,
            heartbeat_ms: hb,
            ttl_ms: 1_000,
            epoch: 1,
            released,
            fence_from: None,
        };
        // (record, now, holder alive, expected) from host "me", pid 10
        let cases = [
            (rec("other", 5, 1_000, false), 1_500, true, Takeover::Held { wait_ms: 500 }),
            (rec("other", 5, 1_000, false), 2_000, true, Takeover::Free),
            (rec("other", 5, 1_000, true), 1_100, true, Takeover::Free),
            (rec("me", 5, 1_000, false), 1_100, false, Takeover::DeadHere),
            (rec("me", 5, 1_000, false), 1_100, true, Takeover::WaitHere),
            (rec("me", 5, 1_000, false), 2_500, true, Takeover::Free),
            (rec("me", 10, 1_000, false), 1_100, true, Takeover::Held { wait_ms: 900 }),
            (rec("me", 10, 1_000, false), 1_100, false, Takeover::DeadHere),
        ];
        for (r, now, alive, want) in cases {
            assert_eq!(takeover(&r, now, "me", 10, alive), want, "{r:?} at {now}");
        }
    }
}

#[cfg(test)]
mod resolve_tests {
    use super::*;
    use crate::BatchId as B;

    fn plan(b: u64) -> BatchPlan {
        BatchPlan {
            batch_id: B(b),
            batch_time_ms: b as i64 * 10,
            planned_at_ms: 0,
            sources: Vec::new(),
            previous_commit: None,
            previous_plan: b.checked_sub(1).map(|p| BatchPlan { epoch: 3, ..plan(p) }.copy()),
            epoch: 3,
        }
    }

    fn lost(b: u64) -> Result<BatchPlan, crate::Error> {
        Err(crate::Error::Corrupt { path: format!("log/{b}.plan"), reason: "checksum mismatch".into() })
    }

    #[test]
    fn resolve_plans_table() {
        let ids: Vec<BatchId> = (4..=7).map(B).collect();
        let none = BTreeSet::new();
        // All readable: replayed as read.
        let r = resolve_plans(&ids, (4..=7).map(|b| Ok(plan(b))).collect(), &none).unwrap();
        assert_eq!(r.plans, (4..=7).map(plan).collect::<Vec<_>>());
        assert!(r.rebuilt.is_empty() && r.warnings.is_empty());

        // A damaged middle plan is rebuilt from its successor's copy, epoch included.
        let read = vec![Ok(plan(4)), lost(5), Ok(plan(6)), Ok(plan(7))];
        let r = resolve_plans(&ids, read, &none).unwrap();
        assert_eq!(r.rebuilt, vec![B(5)]);
        assert_eq!((r.plans[1].batch_id, r.plans[1].batch_time_ms, r.plans[1].epoch), (B(5), 50, 3));
        assert!(r.warnings[0].contains("rebuilt from the copy in the plan of batch 6"), "{:?}", r.warnings);

        // A plan naming another batch counts as unusable.
        let read = vec![Ok(plan(4)), Ok(plan(9)), Ok(plan(6)), Ok(plan(7))];
        assert_eq!(resolve_plans(&ids, read, &none).unwrap().rebuilt, vec![B(5)]);

        // A damaged last plan without a commit is planned again; with one it is unrecoverable.
        let read = vec![Ok(plan(4)), Ok(plan(5)), Ok(plan(6)), lost(7)];
        let r = resolve_plans(&ids, read, &none).unwrap();
        assert_eq!(r.plans.len(), 3);
        assert!(r.warnings[0].contains("will be planned again"));
        let read = vec![Ok(plan(4)), Ok(plan(5)), Ok(plan(6)), lost(7)];
        let err = resolve_plans(&ids, read, &BTreeSet::from([B(7)])).unwrap_err();
        assert!(matches!(err, LogDamage::Committed { batch: B(7), .. }), "{err}");

        // A successor without a copy (written before copies existed) cannot rebuild.
        let old = BatchPlan { previous_plan: None, ..plan(6) };
        let read = vec![Ok(plan(4)), lost(5), Ok(old), Ok(plan(7))];
        let err = resolve_plans(&ids, read, &none).unwrap_err();
        assert!(matches!(err, LogDamage::NoCopy { batch: B(5), .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "the cause is kept: {err}");
    }
}
