//! The checkpoint protocol as pure functions of a listing: which objects restore a checkpoint,
//! which batches must be replayed, and what retention may delete. No I/O happens here; the
//! [`crate::store`] module lists, reads and deletes according to these decisions.

use crate::paths::ObjectName;
use crate::{BatchId, Epoch, LeaseRecord};
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

/// The newest claimed lease epoch of the listing, if any.
pub fn latest_claim(listing: &Listing) -> Option<Epoch> {
    listing.names().filter_map(|n| if let ObjectName::LeaseClaim(e) = n { Some(e) } else { None }).max()
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
    pub accepted: BatchId,
    pub fenced_batch: BatchId,
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
    Held { wait_ms: u64 },
}

/// The takeover rule, without I/O: `holder` is the newest claim with its latest heartbeat,
/// `holder_alive` whether its pid runs on this host (only asked when the hosts match).
///
/// ```
/// use cairn_checkpoint::protocol::{takeover, Takeover};
/// use cairn_checkpoint::LeaseRecord;
/// let r = LeaseRecord { owner: "o".into(), host: "h2".into(), pid: 7, started_ms: 0,
///     heartbeat_ms: 1_000, ttl_ms: 500, epoch: 1, released: false };
/// assert_eq!(takeover(&r, 1_200, "h1", 9, true), Takeover::Held { wait_ms: 300 });
/// assert_eq!(takeover(&r, 1_600, "h1", 9, true), Takeover::Free);
/// ```
pub fn takeover(holder: &LeaseRecord, now_ms: i64, host: &str, pid: u32, holder_alive: bool) -> Takeover {
    let age = now_ms - holder.heartbeat_ms;
    let fresh = age < holder.ttl_ms as i64;
    // Another process of this host: its pid tells whether it still runs. This process's own
    // earlier lease (another context in the same process) is as live as any remote holder.
    let same_host = holder.host == host && holder.pid != pid;
    if holder.released || !fresh {
        return Takeover::Free;
    }
    if same_host && !holder_alive {
        return Takeover::DeadHere;
    }
    if same_host {
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
    fn fence_point_and_latest_claim() {
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
        assert_eq!(latest_claim(&l), Some(4));
        assert_eq!(latest_claim(&Listing::new([Plan(B(1))])), None);
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
        ];
        for (r, now, alive, want) in cases {
            assert_eq!(takeover(&r, now, "me", 10, alive), want, "{r:?} at {now}");
        }
    }
}
