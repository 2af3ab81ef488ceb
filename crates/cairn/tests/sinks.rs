//! The `Sink` trait as the engine drives it: open, every partition (in parallel when the sink
//! allows), commit exactly once per batch id, abort on failure, replay after a restart.

use cairn::{BatchContext, BatchWrite, Sink, StreamingContext, UserError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An idempotent "table": committed batch id → sorted elements. Fails the commit of one batch
/// once when asked, after its partitions were written.
#[derive(Default)]
struct Table {
    pending: Mutex<Vec<(usize, Vec<u64>)>>,
    committed: Mutex<BTreeMap<u64, Vec<u64>>>,
    commits: AtomicUsize,
    aborts: AtomicUsize,
    fail_commit_of: Mutex<Option<u64>>,
    max_concurrent: AtomicUsize,
    running: AtomicUsize,
    /// The writer's ownership epoch of every commit, in order.
    epochs: Mutex<Vec<Option<u64>>>,
}

impl Sink<u64> for Table {
    fn name(&self) -> &str {
        "table"
    }
    fn open(&self, b: &BatchContext) -> Result<BatchWrite, UserError> {
        self.pending.lock().unwrap().clear();
        let done = self.committed.lock().unwrap().contains_key(&b.batch_id.0);
        Ok(if done { BatchWrite::AlreadyCommitted } else { BatchWrite::Write })
    }
    fn write_partition(&self, _: &BatchContext, i: usize, data: Vec<u64>) -> Result<(), UserError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20)); // long enough for partitions to overlap
        self.pending.lock().unwrap().push((i, data));
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn parallel(&self) -> bool {
        true
    }
    fn commit(&self, b: &BatchContext) -> Result<(), UserError> {
        if self.fail_commit_of.lock().unwrap().take_if(|f| *f == b.batch_id.0).is_some() {
            return Err("the database refused the commit".into());
        }
        let mut all: Vec<u64> = self.pending.lock().unwrap().drain(..).flat_map(|(_, p)| p).collect();
        all.sort();
        let previous = self.committed.lock().unwrap().insert(b.batch_id.0, all);
        assert!(previous.is_none(), "batch {} committed twice", b.batch_id);
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.epochs.lock().unwrap().push(b.epoch);
        Ok(())
    }
    fn abort(&self, _: &BatchContext) {
        self.pending.lock().unwrap().clear();
        self.aborts.fetch_add(1, Ordering::SeqCst);
    }
}

fn run(dir: &std::path::Path, table: &Arc<Table>, batches: u64) -> cairn::Result<cairn::RunSummary> {
    let ctx = StreamingContext::builder()
        .checkpoint(dir.to_str().unwrap())
        .batch_interval(Duration::from_millis(10))
        .parallelism(4)
        .stop_after_batches(batches)
        .build()?;
    let s = ctx.generator("g", 4, 40, |p, o| o * 10 + p as u64)?;
    s.repartition(4).write_to(table.clone());
    ctx.run_available()
}

#[test]
fn partitions_write_in_parallel_and_each_batch_commits_once_across_a_failed_commit() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(Table::default());
    *table.fail_commit_of.lock().unwrap() = Some(2);
    let err = run(dir.path(), &table, 5).unwrap_err().to_string();
    assert!(err.contains("sink \"table\" failed in batch 2") && err.contains("refused the commit"), "{err}");
    assert_eq!(table.aborts.load(Ordering::SeqCst), 1, "the failed batch was aborted");
    assert_eq!(table.committed.lock().unwrap().keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    assert!(table.max_concurrent.load(Ordering::SeqCst) > 1, "partitions were written concurrently");

    // The restart replays batch 2 with its logged input and goes on.
    let summary = run(dir.path(), &table, 5).unwrap();
    assert_eq!(summary.replayed_batches, 1);
    let committed = table.committed.lock().unwrap().clone();
    assert_eq!(committed.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    for (b, got) in committed {
        let mut want: Vec<u64> =
            (0..4).flat_map(|p| (b * 10..b * 10 + 10).map(move |o| o * 10 + p)).collect();
        want.sort();
        assert_eq!(got, want, "batch {b}");
    }
    assert_eq!(table.commits.load(Ordering::SeqCst), 5);
    // Each start holds the location in a new lease epoch, and the sink is told which.
    assert_eq!(*table.epochs.lock().unwrap(), [Some(1), Some(1), Some(2), Some(2), Some(2)]);
}

#[test]
fn a_batch_the_sink_already_committed_is_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let table = Arc::new(Table::default());
    run(dir.path(), &table, 3).unwrap();
    // A crash after the sink committed and before cairn did: the engine replays, the sink skips.
    std::fs::remove_file(dir.path().join("log/00000000000000000002.commit")).unwrap();
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let summary = run(dir.path(), &table, 3).unwrap();
    assert_eq!(summary.replayed_batches, 3, "every batch replays from the start of the log");
    assert_eq!(table.commits.load(Ordering::SeqCst), 3, "and none is committed twice");
}
