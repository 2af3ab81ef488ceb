//! Property tests of the pure protocol: retention never leaves a kept checkpoint without its
//! chain or its batch log, even when interrupted after any number of deletions.

use cairn_checkpoint::paths::ObjectName::{self, *};
use cairn_checkpoint::protocol::{
    chain, plan_retention, recovery_attempts, replay_batches, Listing, LogDamage,
};
use cairn_checkpoint::BatchId as B;
use proptest::prelude::*;
use std::collections::BTreeSet;

/// A location as a job leaves it: `batches` planned (all but maybe the last committed), a
/// checkpoint after the batches where `ckpt[i]` is true (the first one full), and compacted full
/// snapshots where `compact[i]` is true.
fn location(batches: u64, ckpt: &[bool], compact: &[bool], last_committed: bool) -> BTreeSet<ObjectName> {
    let mut names = BTreeSet::new();
    let mut prev: Option<B> = None;
    for b in 0..batches {
        names.insert(Plan(B(b)));
        if b + 1 < batches || last_committed {
            names.insert(Commit(B(b)));
        }
        if ckpt[b as usize % ckpt.len()] {
            match prev {
                None => names.insert(Full(B(b))),
                Some(p) => names.insert(Delta { batch: B(b), parent: p }),
            };
            if prev.is_some() && compact[b as usize % compact.len()] {
                names.insert(Full(B(b)));
            }
            prev = Some(B(b));
        }
    }
    names
}

fn recoverable(l: &Listing, batch: B) -> bool {
    chain(l, batch, true).is_some() && replay_batches(l, Some(batch)).is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn retention_keeps_what_recovery_needs(batches in 1u64..60, ckpt in prop::collection::vec(any::<bool>(), 1..7),
                                           compact in prop::collection::vec(any::<bool>(), 1..5),
                                           keep in 1usize..5, last_committed in any::<bool>()) {
        let names = location(batches, &ckpt, &compact, last_committed);
        let listing = Listing::new(names.iter().copied());
        let plan = plan_retention(&listing, keep);
        let all: Vec<B> = listing.checkpoints();
        let expect_kept: Vec<B> = all.iter().rev().take(keep).copied().collect();
        prop_assert_eq!(&plan.keep_checkpoints, &expect_kept);
        for name in &plan.delete {
            prop_assert!(names.contains(name), "deletes only what exists");
        }
        // Interrupted after any number of deletions, every kept checkpoint still recovers.
        for done in 0..=plan.delete.len() {
            let left = Listing::new(names.iter().copied().filter(|n| !plan.delete[..done].contains(n)));
            for b in &plan.keep_checkpoints {
                prop_assert!(recoverable(&left, *b), "checkpoint {} lost after {} of {} deletions", b, done, plan.delete.len());
            }
            if let Some(newest) = plan.keep_checkpoints.first() {
                prop_assert_eq!(recovery_attempts(&left).first().map(|a| a.batch), Some(*newest));
            }
        }
        // Retention is idempotent: a second pass on what is left deletes nothing more.
        let left = Listing::new(names.iter().copied().filter(|n| !plan.delete.contains(n)));
        prop_assert!(plan_retention(&left, keep).delete.is_empty());
        // No single object lost after retention loses the job: some checkpoint still restores
        // with a replayable log after it, or the whole log replays from batch 0.
        let kept: Vec<ObjectName> = left.names().collect();
        for lost in &kept {
            let damaged = Listing::new(kept.iter().copied().filter(|n| n != lost));
            let by_checkpoint = recovery_attempts(&damaged)
                .iter()
                .any(|a| replay_batches(&damaged, Some(a.batch)).is_ok());
            let from_start = replay_batches(&damaged, None).is_ok_and(|r| r.first() == Some(&B(0)))
                || damaged.plans().is_empty() && damaged.checkpoints().is_empty();
            prop_assert!(by_checkpoint || from_start, "losing {:?} loses the job (kept {:?}, fallback {:?})", lost, plan.keep_checkpoints, plan.fallback);
        }
    }
}

#[test]
fn replay_needs_an_unbroken_log() {
    // One missing plan is rebuilt from its successor's copy; two in a row are a gap.
    let l = Listing::new([Full(B(3)), Plan(B(4)), Plan(B(6))]);
    assert_eq!(replay_batches(&l, Some(B(3))).unwrap(), vec![B(4), B(5), B(6)]);
    let l = Listing::new([Full(B(3)), Plan(B(4)), Plan(B(7))]);
    let err = replay_batches(&l, Some(B(3))).unwrap_err();
    assert!(matches!(err, LogDamage::Gap { missing: B(5), last: B(7) }), "{err}");
    assert!(err.to_string().contains("batches 5 and 6 are both missing"), "{err}");
    let l = Listing::new([Plan(B(2)), Plan(B(3))]);
    assert!(replay_batches(&l, None).unwrap_err().to_string().contains("starts at batch 2"));
    assert_eq!(replay_batches(&Listing::new([Plan(B(1))]), None).unwrap(), vec![B(0), B(1)]);
    assert_eq!(replay_batches(&Listing::new([Plan(B(0)), Plan(B(1))]), None).unwrap(), vec![B(0), B(1)]);
}

#[test]
fn recovery_prefers_newest_then_falls_back_through_deltas() {
    let l = Listing::new([
        Full(B(0)),
        Delta { batch: B(1), parent: B(0) },
        Delta { batch: B(2), parent: B(1) },
        Full(B(2)),
        Delta { batch: B(3), parent: B(2) },
    ]);
    let attempts: Vec<(B, Vec<ObjectName>)> =
        recovery_attempts(&l).into_iter().map(|a| (a.batch, a.chain)).collect();
    assert_eq!(attempts[0], (B(3), vec![Full(B(2)), Delta { batch: B(3), parent: B(2) }]));
    assert_eq!(attempts[1].0, B(3), "then the same checkpoint through deltas only");
    assert_eq!(attempts[1].1.len(), 4);
    assert_eq!(attempts[2], (B(2), vec![Full(B(2))]));
    // A missing link makes a chain unusable rather than partial.
    let broken = Listing::new([Full(B(0)), Delta { batch: B(2), parent: B(1) }]);
    assert!(chain(&broken, B(2), true).is_none());
}
