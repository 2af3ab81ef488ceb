//! Tasks of a scaled-out job keep their plans and deltas in the member logs of the process that
//! runs them: one object per process and write round, whatever the number of tasks. A task moves
//! to another process (another member log) and goes on exactly from the first one's entries,
//! and retention keeps the member logs bounded.

use cairn::checkpoint::member_log::MemberLog;
use cairn::checkpoint::object_store::{path::Path as ObjPath, ObjectStore};
use cairn::checkpoint::paths::task_location;
use cairn::checkpoint::store::open_location;
use cairn::checkpoint::CheckpointStore;
use cairn::source::{Positions, Source};
use cairn::{OffsetRange, SourcePartition, StreamingContext, TaskId, Trigger, UserError};
use futures::TryStreamExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TASKS: u32 = 3;
const PER_BATCH: u64 = 5;

/// `TASKS` partitions of `len` records each, `PER_BATCH` per batch; record `o` of partition `p`
/// is `(p, o)`.
struct Counting {
    task: Option<u32>,
    len: u64,
}

impl Source for Counting {
    type Item = (u32, u64);
    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>, UserError> {
        let mut out = Vec::new();
        for p in (0..TASKS).filter(|p| self.task.is_none_or(|t| t == *p)) {
            let partition = SourcePartition::named(p.to_string());
            let start = positions.get(&partition).copied().unwrap_or(0);
            out.push(OffsetRange { partition, start, end: (start + PER_BATCH).min(self.len) });
        }
        Ok(out)
    }
    fn read(&self, r: &OffsetRange) -> Result<Vec<(u32, u64)>, UserError> {
        let SourcePartition::Named(p) = &r.partition else { return Err("not named".into()) };
        let p: u32 = p.parse()?;
        Ok((r.start..r.end).map(|o| (p, o)).collect())
    }
    fn restrict_to_task(&mut self, task: TaskId, _tasks: u32) -> Result<(), UserError> {
        self.task = Some(task.0);
        Ok(())
    }
}

type Totals = Arc<Mutex<BTreeMap<(u32, u64), u64>>>;
/// The batches each run ran, per task.
type Batches = Arc<Mutex<BTreeMap<u32, Vec<u64>>>>;

/// Sums of offsets per `(partition, offset % 7)`, the newest value of each key kept in `totals`.
fn task_job(
    store: CheckpointStore,
    task: u32,
    len: u64,
    stop_after: Option<u64>,
    totals: &Totals,
    batches: &Batches,
) -> StreamingContext {
    let mut b = StreamingContext::builder()
        .app_name("member-logs")
        .checkpoint_store(store)
        .trigger(Trigger::AvailableNow)
        .full_snapshot_every(3)
        .keep_checkpoints(3)
        .task(TaskId(task), TASKS);
    if let Some(n) = stop_after {
        b = b.stop_after_batches(n);
    }
    let ctx = b.build().unwrap();
    let records = ctx.source("counting", Counting { task: None, len }).unwrap();
    let (totals, batches) = (totals.clone(), batches.clone());
    records
        .map(|(p, o)| ((p, o % 7), o))
        .partitioned_like_source()
        .update_state_by_key("sums", |_, v: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + v.iter().sum::<u64>())
        })
        .foreach_batch(move |b, kv| {
            totals.lock().unwrap().extend(kv);
            batches.lock().unwrap().entry(task).or_default().push(b.batch_id.0);
            Ok(())
        });
    ctx
}

fn expected(len: u64) -> BTreeMap<(u32, u64), u64> {
    let mut want = BTreeMap::new();
    for p in 0..TASKS {
        for o in 0..len {
            *want.entry((p, o % 7)).or_insert(0) += o;
        }
    }
    want
}

/// One process: its member log and the checkpoint stores of its tasks.
struct Process {
    log: MemberLog,
    location: String,
}

impl Process {
    fn start(location: &str) -> Self {
        let opened = open_location(location).unwrap();
        Self { log: MemberLog::new(opened.store, opened.root).unwrap(), location: location.to_string() }
    }
    fn task_store(&self, task: u32) -> CheckpointStore {
        CheckpointStore::with_store(
            self.log.view(task),
            self.log.task_root(task),
            task_location(&self.location, task),
        )
    }
    /// Runs every task at once, as a process runs the tasks the group gave it; returns the
    /// batches each task ran.
    fn run(&self, len: u64, stop_after: Option<u64>, totals: &Totals) -> BTreeMap<u32, Vec<u64>> {
        let batches = Batches::default();
        std::thread::scope(|sc| {
            for t in 0..TASKS {
                let batches = &batches;
                sc.spawn(move || {
                    let ctx = task_job(self.task_store(t), t, len, stop_after, totals, batches);
                    ctx.run_available().unwrap()
                });
            }
        });
        let ran = batches.lock().unwrap().clone();
        ran
    }
}

fn objects_under(location: &str, dir: &str) -> Vec<String> {
    let opened = open_location(location).unwrap();
    let prefix = ObjPath::from(dir);
    let listed: Vec<_> =
        cairn::checkpoint::store::block_on_io(opened.store.list(Some(&prefix)).try_collect::<Vec<_>>())
            .unwrap();
    listed.into_iter().map(|m| m.location.to_string()).collect()
}

#[test]
fn a_process_writes_one_object_per_round_for_all_its_tasks_and_a_task_moves_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap().to_string();
    let totals = Totals::default();
    let first = Process::start(&location);
    let ran = first.run(200, Some(12), &totals);
    assert!(ran.values().all(|b| *b == (0..12).collect::<Vec<_>>()), "{ran:?}");
    let stats = first.log.stats();
    // 12 batches of 3 tasks: 36 plans, and deltas (the first checkpoint is a full snapshot, a
    // real object; the writer may merge checkpoints it falls behind on).
    assert!(stats.entries >= 36 + 3 * 6, "{stats:?}");
    assert!(stats.objects * 2 <= stats.entries, "the tasks' plans and deltas share objects: {stats:?}");
    let per_task = objects_under(&location, "tasks");
    assert!(
        per_task.iter().all(|p| !p.ends_with(".plan") && !p.ends_with(".delta")),
        "no plan or delta is an object of its own: {per_task:?}"
    );
    drop(first);

    // Another process takes every task over and goes on from the first one's entries (a task
    // that found only its first full snapshot would run batches 1..12 again).
    let second = Process::start(&location);
    let ran = second.run(200, None, &totals);
    assert!(ran.values().all(|b| *b == (12..40).collect::<Vec<_>>()), "{ran:?}");
    assert_eq!(*totals.lock().unwrap(), expected(200));
}

#[test]
fn member_log_retention_keeps_the_logs_bounded_and_a_restart_goes_on_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap().to_string();
    let totals = Totals::default();
    let first = Process::start(&location);
    first.log.set_linger(Duration::from_millis(50));
    let ran = first.run(600, None, &totals);
    assert!(ran.values().all(|b| b.len() == 120), "{ran:?}");
    let written = first.log.stats();
    // What `cairn checkpoint gc` does on the job's location.
    let root = CheckpointStore::open(&location).unwrap();
    let report = cairn::checkpoint::admin::gc(&root, 10, false).unwrap();
    assert!(report.deleted.iter().all(|d| d.starts_with("members/")), "{report:?}");
    assert!(
        cairn::checkpoint::admin::gc(&root, 10, true).unwrap().deleted.is_empty(),
        "nothing left to collect"
    );
    let left = objects_under(&location, "members");
    assert!(written.objects > 100, "{written:?}");
    assert!(
        left.len() * 4 < written.objects as usize,
        "{} of {} member log objects left: {left:?}",
        left.len(),
        written.objects
    );
    assert_eq!(*totals.lock().unwrap(), expected(600));

    // Everything a restart needs is still there: it goes on exactly, replaying nothing twice.
    drop(first);
    let second = Process::start(&location);
    let ran = second.run(700, None, &totals);
    assert!(ran.values().all(|b| *b == (120..140).collect::<Vec<_>>()), "{ran:?}");
    assert_eq!(*totals.lock().unwrap(), expected(700));
}
