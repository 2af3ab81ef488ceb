//! The checkpoint store on a real local directory: conditional creates, recovery with damaged
//! objects, compaction, retention and the lease.

use cairn_checkpoint::paths::ObjectName;
use cairn_checkpoint::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn open(dir: &Path) -> CheckpointStore {
    CheckpointStore::open(dir.to_str().expect("utf-8")).expect("open")
}

fn plan(b: u64) -> BatchPlan {
    BatchPlan {
        batch_id: BatchId(b),
        batch_time_ms: 1000 * b as i64,
        planned_at_ms: 0,
        sources: vec![SourcePlan {
            source: "s".into(),
            ranges: vec![OffsetRange { partition: "0".into(), start: b * 10, end: b * 10 + 10 }],
        }],
        previous_commit: None,
        // As the engine writes them: each plan carries a copy of its predecessor.
        previous_plan: b.checked_sub(1).map(|p| plan(p).copy()),
        epoch: 0,
    }
}

fn commit(b: u64) -> BatchCommit {
    BatchCommit { batch_id: BatchId(b), committed_at_ms: 0, input_records: 10, processing_ms: 1, epoch: 0 }
}

/// State after batch `b`: key `k` holds `b` for every k <= b; a delta only carries key b and
/// removes key "gone".
fn ckpt(b: u64, parent: Option<u64>) -> StateCheckpoint {
    let mut w = TableWriter::new();
    match parent {
        None => {
            for k in 0..=b {
                w.put(&k.to_le_bytes(), &b.to_le_bytes());
            }
            w.put(b"gone", b"x");
        }
        Some(_) => {
            w.put(&b.to_le_bytes(), &b.to_le_bytes());
            w.delete(b"gone");
        }
    }
    // As stored: in key order.
    let mut table = w.finish("op");
    let mut data = Vec::new();
    table.write_ordered(&mut data).unwrap();
    table.data = data;
    StateCheckpoint {
        batch_id: BatchId(b),
        kind: parent.map_or(CheckpointKind::Full, |p| CheckpointKind::Delta { parent: BatchId(p) }),
        created_ms: 0,
        graph: GraphDescription::default(),
        tables: vec![table],
        epoch: 0,
    }
}

/// Runs batches 0..n with a checkpoint after each.
fn job(store: &CheckpointStore, n: u64) {
    for b in 0..n {
        store.write_plan(&plan(b)).unwrap();
        store.write_commit(&commit(b)).unwrap();
        store.write_checkpoint(&ckpt(b, b.checked_sub(1))).unwrap();
    }
}

fn state_file(dir: &Path, name: ObjectName) -> PathBuf {
    let p = Paths::new("").path(name);
    dir.join(p.as_ref())
}

fn keys(r: &Recovered) -> Vec<Vec<u8>> {
    let s = r.state.as_ref().expect("state");
    let mut k: Vec<Vec<u8>> = s.tables[0].reader().map(|e| e.unwrap().0.to_vec()).collect();
    k.sort();
    k
}

use cairn_checkpoint::paths::Paths;

#[test]
fn conditional_creates() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let m = JobMetadata {
        format_version: FORMAT_VERSION,
        app_name: "a".into(),
        job_id: "j".into(),
        created_ms: 1,
        batch_interval_ms: 1000,
        start_time_ms: 0,
        graph: GraphDescription::default(),
    };
    s.create_metadata(&m).unwrap();
    s.create_metadata(&m).unwrap();
    let other = JobMetadata { app_name: "b".into(), ..m.clone() };
    assert!(matches!(s.create_metadata(&other), Err(Error::Conflict { .. })));
    assert_eq!(s.read_metadata().unwrap(), Some(m.clone()));
    // Two copies: either one damaged or missing is read from the other and repaired.
    let primary = dir.path().join("metadata");
    let copy = dir.path().join("metadata.copy");
    let good = std::fs::read(&primary).unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), good);
    std::fs::write(&primary, &good[..good.len() - 3]).unwrap();
    let (found, bad) = s.inspect_metadata().unwrap();
    assert_eq!((found.as_ref(), bad.len()), (Some(&m), 1));
    assert_eq!(s.repair_metadata().unwrap().len(), 1);
    assert_eq!(std::fs::read(&primary).unwrap(), good, "the primary is rewritten from the copy");
    std::fs::remove_file(&copy).unwrap();
    assert_eq!(s.read_metadata().unwrap(), Some(m.clone()));
    assert_eq!(s.repair_metadata().unwrap().len(), 1);
    assert_eq!(std::fs::read(&copy).unwrap(), good, "the missing copy is written again");
    assert!(s.repair_metadata().unwrap().is_empty(), "nothing left to repair");

    assert_eq!(s.write_plan(&plan(0)).unwrap().objects, 1);
    assert_eq!(s.write_plan(&plan(0)).unwrap().objects, 0, "a replay re-logs the same plan");
    let mut different = plan(0);
    different.sources[0].ranges[0].end += 1;
    let err = s.write_plan(&different).unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    // The same input at another batch time is another batch too: windows and timeouts use it.
    let mut later = plan(0);
    later.batch_time_ms += 1000;
    let err = s.write_plan(&later).unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert_eq!(s.write_commit(&commit(0)).unwrap().objects, 1);
    assert_eq!(s.write_commit(&commit(0)).unwrap().objects, 0);
}

#[test]
fn recovers_newest_and_merges_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    job(&s, 5);
    s.write_plan(&plan(5)).unwrap(); // planned, not run
    let r = s.recover().unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.state.as_ref().unwrap().batch_id, BatchId(4));
    assert_eq!(r.replay.iter().map(|p| p.batch_id.0).collect::<Vec<_>>(), vec![5]);
    assert!(r.committed.is_empty());
    assert_eq!(r.next_batch, BatchId(6));
    let k = keys(&r);
    assert_eq!(k.len(), 5, "keys 0..=4, and 'gone' was deleted by the deltas");
    assert!(!k.contains(&b"gone".to_vec()));
}

#[test]
fn corrupt_or_truncated_newest_checkpoint_falls_back() {
    for damage in ["flip", "truncate", "delete-middle"] {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        job(&s, 6);
        match damage {
            "flip" => {
                let f = state_file(dir.path(), ObjectName::Delta { batch: BatchId(5), parent: BatchId(4) });
                let mut b = std::fs::read(&f).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x10;
                std::fs::write(&f, b).unwrap();
            }
            "truncate" => {
                let f = state_file(dir.path(), ObjectName::Delta { batch: BatchId(5), parent: BatchId(4) });
                let b = std::fs::read(&f).unwrap();
                std::fs::write(&f, &b[..b.len() - 7]).unwrap();
            }
            _ => std::fs::remove_file(state_file(
                dir.path(),
                ObjectName::Delta { batch: BatchId(3), parent: BatchId(2) },
            ))
            .unwrap(),
        }
        let r = s.recover().unwrap();
        let restored = r.state.as_ref().unwrap().batch_id;
        let replayed: Vec<u64> = r.replay.iter().map(|p| p.batch_id.0).collect();
        if damage == "delete-middle" {
            // Checkpoints 3, 4 and 5 all need delta 3: recovery falls back to 2 and replays 3..=5.
            assert_eq!(restored, BatchId(2), "{damage}");
            assert_eq!(replayed, vec![3, 4, 5]);
        } else {
            assert_eq!(restored, BatchId(4), "{damage}");
            assert_eq!(replayed, vec![5]);
            assert!(r.committed.contains(&BatchId(5)));
            assert!(r.warnings.iter().any(|w| w.contains("batch 5")), "{damage}: {:?}", r.warnings);
        }
        assert!(!r.warnings.is_empty());
        assert_eq!(r.next_batch, BatchId(6));
    }
}

#[test]
fn a_torn_written_checkpoint_is_replaced_on_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    job(&s, 3);
    let c = ckpt(3, Some(2));
    let bytes = codec::encode_state(&c);
    s.write_raw(
        ObjectName::Delta { batch: BatchId(3), parent: BatchId(2) },
        bytes[..bytes.len() / 2].to_vec(),
    )
    .unwrap();
    assert_eq!(s.write_checkpoint(&c).unwrap().objects, 1, "a torn object is overwritten");
    assert_eq!(s.read_state(ObjectName::Delta { batch: BatchId(3), parent: BatchId(2) }).unwrap(), c);
}

#[test]
fn damaged_logs() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    job(&s, 3);
    s.write_plan(&plan(3)).unwrap();
    s.write_plan(&plan(4)).unwrap();
    // A torn last plan without a commit: that batch never ran; it is dropped and planned again.
    std::fs::write(dir.path().join("log/00000000000000000004.plan"), b"CAIR\x01").unwrap();
    let r = s.recover().unwrap();
    assert_eq!(r.replay.iter().map(|p| p.batch_id.0).collect::<Vec<_>>(), vec![3]);
    assert_eq!(r.next_batch, BatchId(4));
    assert!(r.warnings.iter().any(|w| w.contains("planned again")), "{:?}", r.warnings);
    assert_eq!(s.write_plan(&plan(4)).unwrap().objects, 1, "the torn plan is replaced");
    // A missing or damaged plan is rebuilt from the copy its successor carries.
    std::fs::remove_file(dir.path().join("log/00000000000000000003.plan")).unwrap();
    let r = s.recover().unwrap();
    assert_eq!(r.replay, vec![BatchPlan { previous_plan: None, ..plan(3) }, plan(4)]);
    assert_eq!(r.rebuilt_plans, vec![BatchId(3)]);
    assert!(r.warnings.iter().any(|w| w.contains("rebuilt from the copy")), "{:?}", r.warnings);
    std::fs::write(dir.path().join("log/00000000000000000003.plan"), b"CAIR\x01garbage").unwrap();
    assert_eq!(s.recover().unwrap().rebuilt_plans, vec![BatchId(3)]);
    // Two plans lost in a row are a gap recovery cannot bridge, and the error says where.
    s.write_plan(&plan(5)).unwrap();
    std::fs::remove_file(dir.path().join("log/00000000000000000003.plan")).unwrap();
    std::fs::remove_file(dir.path().join("log/00000000000000000004.plan")).unwrap();
    let err = s.recover().unwrap_err().to_string();
    assert!(err.contains("plans of batches 3 and 4 are both missing"), "{err}");
}

#[test]
fn compaction_and_retention_keep_recovery_identical() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    job(&s, 12);
    let before = keys(&s.recover().unwrap());
    let w = s.compact(BatchId(11)).unwrap().expect("a full snapshot is written");
    assert_eq!(w.objects, 1);
    assert!(s.compact(BatchId(11)).unwrap().is_none(), "already compacted");
    let r = s.recover().unwrap();
    assert_eq!(r.state.as_ref().unwrap().chain, vec![ObjectName::Full(BatchId(11))]);
    assert_eq!(keys(&r), before);
    let report = s.apply_retention(2).unwrap();
    assert_eq!(report.kept_checkpoints, vec![BatchId(11), BatchId(10)]);
    let listing = s.listing().unwrap();
    assert_eq!(listing.plans(), vec![BatchId(11)], "only the log after the oldest kept checkpoint stays");
    // Checkpoint 10 has no full snapshot, so its whole delta chain back to 0 must stay.
    assert_eq!(
        listing.checkpoints(),
        (0..12).map(BatchId).collect::<Vec<_>>(),
        "10's chain still runs from 0"
    );
    s.compact(BatchId(10)).unwrap();
    s.apply_retention(2).unwrap();
    let state: Vec<ObjectName> = s
        .listing()
        .unwrap()
        .names()
        .filter(|n| matches!(n, ObjectName::Full(_) | ObjectName::Delta { .. }))
        .collect();
    // The newest checkpoint's own delta stays as a fallback should its snapshot be damaged.
    let delta11 = ObjectName::Delta { batch: BatchId(11), parent: BatchId(10) };
    assert_eq!(
        state,
        vec![delta11, ObjectName::Full(BatchId(10)), ObjectName::Full(BatchId(11))],
        "the old chain goes"
    );
    assert_eq!(keys(&s.recover().unwrap()), before);
}

#[test]
fn lease_guards_the_location() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let lease = s.acquire_lease(Duration::from_secs(5)).unwrap();
    assert_eq!(lease.epoch(), 1);
    let err = s.acquire_lease(Duration::from_secs(5)).err().expect("a second holder is refused");
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains(&format!("pid {}", std::process::id())), "{err}");
    assert!(lease.lost().is_none());
    lease.release().unwrap();
    assert!(s.read_lease().unwrap().unwrap().released, "a released epoch says so");
    // Released: the next start takes the next epoch at once.
    let again = s.acquire_lease(Duration::from_secs(5)).unwrap();
    assert_eq!(again.epoch(), 2);
    assert!(dir.path().join("lease/00000000000000000002.fence").exists());
    again.release().unwrap();

    // A holder on this host whose process is gone is taken over at once.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let claim = |epoch: u64, host: String, pid: u32| LeaseRecord {
        owner: format!("x{epoch}"),
        host,
        pid,
        started_ms: i64::MAX / 2,
        heartbeat_ms: i64::MAX / 2,
        ttl_ms: 60_000,
        epoch,
        released: false,
        fence_from: None,
    };
    let dead = claim(3, host, u32::MAX - 1);
    s.write_raw(ObjectName::LeaseClaim(3), codec::encode_json(frame::ObjectKind::Lease, &dead)).unwrap();
    let taken = s.acquire_lease(Duration::from_secs(5)).unwrap();
    assert_eq!(taken.epoch(), 4, "the dead holder's epoch is followed, never reused");
    taken.release().unwrap();

    // A live holder elsewhere (pid 1 on another host, fresh heartbeat) keeps it.
    let other = claim(5, "elsewhere".into(), 1);
    s.write_raw(ObjectName::LeaseClaim(5), codec::encode_json(frame::ObjectKind::Lease, &other)).unwrap();
    let err = s.acquire_lease(Duration::from_secs(5)).err().expect("refused").to_string();
    assert!(err.contains("host elsewhere") && err.contains("epoch 5"), "{err}");
}

#[test]
fn locations() {
    assert!(CheckpointStore::open("memory://").is_ok());
    let err = CheckpointStore::open("hdfs://namenode/prefix").unwrap_err().to_string();
    assert!(err.contains("hdfs://") && err.contains("file://") && err.contains("s3://"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("nested/ckpt").display());
    let s = CheckpointStore::open(&url).unwrap();
    s.write_plan(&plan(0)).unwrap();
    assert!(dir.path().join("nested/ckpt/log/00000000000000000000.plan").exists());
}

/// Checkpoints exist but none has a complete chain, and the batch log is gone too: starting with
/// empty state at batch 0 would silently lose the job's state, so the restart is refused.
#[test]
fn checkpoints_without_a_complete_chain_and_no_log_are_refused_not_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.write_checkpoint(&ckpt(5, Some(3))).unwrap(); // a delta whose parent is not there
    let err = s.recover().unwrap_err().to_string();
    assert!(err.contains("no checkpoint has a complete chain"), "{err}");
    assert!(err.contains("from scratch on a new one"), "says what the user can do: {err}");
}
