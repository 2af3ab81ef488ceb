//! The checkpoint protocol as pure functions of a listing: which objects restore a checkpoint,
//! which batches must be replayed, and what retention may delete. No I/O happens here; the
//! [`crate::store`] module lists, reads and deletes according to these decisions.

use crate::paths::ObjectName;
use crate::BatchId;
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

/// The planned batches to replay after restoring the checkpoint of `after` (or from nothing).
/// They must follow it without a gap; a gap means the log was damaged and the error says where.
pub fn replay_batches(listing: &Listing, after: Option<BatchId>) -> Result<Vec<BatchId>, String> {
    let first = after.map_or(0, |b| b.0 + 1);
    let plans: Vec<BatchId> = listing.plans().into_iter().filter(|b| b.0 >= first).collect();
    if after.is_none() {
        if let Some(first_plan) = listing.plans().first() {
            if first_plan.0 != 0 {
                return Err(format!(
                    "no state checkpoint, and the batch log starts at batch {first_plan} instead of 0"
                ));
            }
        }
    }
    for (i, b) in plans.iter().enumerate() {
        let want = first + i as u64;
        if b.0 != want {
            return Err(format!(
                "batch log has a gap: plan of batch {want} is missing but batch {} was planned",
                b.0
            ));
        }
    }
    Ok(plans)
}

/// What retention keeps and deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Checkpoints kept, newest first.
    pub keep_checkpoints: Vec<BatchId>,
    /// Objects to delete, in an order that never leaves a kept checkpoint unusable if interrupted:
    /// batch logs (oldest first), then state objects (oldest first).
    pub delete: Vec<ObjectName>,
}

/// Plans retention keeping the newest `keep` checkpoints (at least one), everything their chains
/// need, and the batch log after the oldest kept one. Unknown objects are never touched.
///
/// ```
/// use cairn_checkpoint::protocol::{plan_retention, Listing};
/// use cairn_checkpoint::paths::ObjectName::*;
/// use cairn_checkpoint::BatchId as B;
/// let l = Listing::new([Plan(B(0)), Commit(B(0)), Full(B(0)), Plan(B(1)), Commit(B(1)), Full(B(1))]);
/// let p = plan_retention(&l, 1);
/// // Replay after the kept checkpoint (batch 1) starts at batch 2: no log entry is needed.
/// assert_eq!(p.delete, vec![Commit(B(0)), Plan(B(0)), Commit(B(1)), Plan(B(1)), Full(B(0))]);
/// assert_eq!(p.keep_checkpoints, vec![B(1)]);
/// ```
pub fn plan_retention(listing: &Listing, keep: usize) -> RetentionPlan {
    let keep = keep.max(1);
    let mut kept = Vec::new();
    let mut needed = BTreeSet::new();
    for batch in listing.checkpoints().into_iter().rev() {
        if kept.len() == keep {
            break;
        }
        if let Some(c) = chain(listing, batch, true) {
            needed.extend(c);
            kept.push(batch);
        }
    }
    let Some(&oldest) = kept.last() else {
        return RetentionPlan::default();
    };
    let mut logs = Vec::new();
    let mut state = Vec::new();
    for n in listing.names() {
        match n {
            ObjectName::Plan(b) | ObjectName::Commit(b) if b <= oldest => logs.push(n),
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
    RetentionPlan { keep_checkpoints: kept, delete: logs }
}
