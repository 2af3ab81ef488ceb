//! A job that runs as one task of a scaled-out job: sources see only their task's partition,
//! sinks are told the task and epoch, stateful operators on streams not known to be
//! task-aligned and sinks without a per-task fence are refused at start, naming them, and the
//! lease is taken over from a live holder at once.

use cairn::source::{Positions, Source};
use cairn::{
    BatchContext, BatchWrite, OffsetRange, SourcePartition, StreamingContext, TaskId, Trigger, UserError,
};
use std::sync::{Arc, Mutex};

/// Two partitions of 4 records each, `(partition, offset)`; restricted to a task it plans that
/// partition only.
#[derive(Default)]
struct TwoPartitions {
    task: Option<u32>,
}

impl Source for TwoPartitions {
    type Item = (u32, u64);
    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>, UserError> {
        let mut out = Vec::new();
        for p in 0..2u32 {
            if self.task.is_some_and(|t| t != p) {
                continue;
            }
            let partition = SourcePartition::named(p.to_string());
            let start = positions.get(&partition).copied().unwrap_or(0);
            if start < 4 {
                out.push(OffsetRange { partition, start, end: 4 });
            }
        }
        Ok(out)
    }
    fn read(&self, r: &OffsetRange) -> Result<Vec<(u32, u64)>, UserError> {
        let SourcePartition::Named(p) = &r.partition else { return Err("not named".into()) };
        let p: u32 = p.parse()?;
        Ok((r.start..r.end).map(|o| (p, o)).collect())
    }
    fn restrict_to_task(&mut self, task: TaskId, tasks: u32) -> Result<(), UserError> {
        if tasks != 2 {
            return Err(format!("2 partitions, not {tasks} tasks").into());
        }
        self.task = Some(task.0);
        Ok(())
    }
}

/// One batch as a sink saw it: task, epoch, records.
type Seen = (Option<TaskId>, Option<u64>, Vec<(u32, u64)>);

/// Records what the engine told it about each batch.
#[derive(Clone, Default)]
struct Recording(Arc<Mutex<Vec<Seen>>>);

impl cairn::Sink<(u32, u64)> for Recording {
    fn name(&self) -> &str {
        "recording"
    }
    fn open(&self, b: &BatchContext) -> Result<BatchWrite, UserError> {
        self.0.lock().unwrap().push((b.task, b.epoch, Vec::new()));
        Ok(BatchWrite::Write)
    }
    fn write_partition(&self, _: &BatchContext, _: usize, data: Vec<(u32, u64)>) -> Result<(), UserError> {
        self.0.lock().unwrap().last_mut().unwrap().2.extend(data);
        Ok(())
    }
    fn commit(&self, _: &BatchContext) -> Result<(), UserError> {
        Ok(())
    }
}

fn task_ctx(dir: &std::path::Path, task: u32) -> StreamingContext {
    StreamingContext::builder()
        .checkpoint(dir.to_str().unwrap())
        .trigger(Trigger::AvailableNow)
        .task(TaskId(task), 2)
        .build()
        .unwrap()
}

#[test]
fn a_task_reads_its_partition_and_sinks_see_task_and_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = task_ctx(dir.path(), 1);
    assert_eq!(ctx.task().map(|t| t.id), Some(TaskId(1)));
    let records = ctx.source("two", TwoPartitions::default()).unwrap();
    // A source's own stream is task-aligned: a stateful operator may read a filter of it.
    let kept = records.filter(|(_, o)| o % 2 == 0);
    let keyed = kept.map(|(p, o)| (p, o)).partitioned_like_source();
    keyed
        .update_state_by_key("sums", |_, v: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + v.iter().sum::<u64>())
        })
        .foreach_batch(|_, _| Ok(()));
    let seen = Recording::default();
    records.write_to(seen.clone());
    let progress = Arc::new(Mutex::new(Vec::new()));
    let p = progress.clone();
    ctx.on_batch(move |b| p.lock().unwrap().push((b.task, b.epoch)));
    ctx.run_available().unwrap();
    let progress = progress.lock().unwrap();
    assert!(
        !progress.is_empty() && progress.iter().all(|te| *te == (Some(1), 1)),
        "progress records name task and epoch: {progress:?}"
    );
    let seen = seen.0.lock().unwrap();
    let read: Vec<(u32, u64)> = seen.iter().flat_map(|(_, _, d)| d.clone()).collect();
    assert_eq!(read, vec![(1, 0), (1, 1), (1, 2), (1, 3)], "task 1 reads partition 1 only");
    assert!(seen.iter().all(|(t, e, _)| *t == Some(TaskId(1)) && *e == Some(1)), "{seen:?}");
    assert!(ctx.task_epoch() == Some(1));
}

#[test]
fn a_stateful_operator_on_a_re_keyed_stream_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = task_ctx(dir.path(), 0);
    let records = ctx.source("two", TwoPartitions::default()).unwrap();
    records
        .map(|(_, o)| (o % 3, 1u64))
        .update_state_by_key("by_residue", |_, v: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + v.len() as u64)
        })
        .foreach_batch(|_, _| Ok(()));
    let err = ctx.run_available().unwrap_err().to_string();
    assert!(err.contains("by_residue") && err.contains("partitioned_like_source"), "{err}");
    // Nothing was written: the location is still empty.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "refused before anything is written");
}

#[test]
fn sources_and_sinks_that_cannot_split_by_task_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = task_ctx(dir.path(), 0);
    let err = ctx.generator("gen", 2, 10, |p, o| (p, o)).err().expect("a generator has no tasks").to_string();
    assert!(err.contains("\"gen\"") && err.contains("task 0"), "{err}");
    let out = tempfile::tempdir().unwrap();
    let records = ctx.source("two", TwoPartitions::default()).unwrap();
    records.map(|(p, o)| format!("{p}:{o}")).save_as_text_files(out.path().to_str().unwrap()).unwrap();
    let err = ctx.run_available().unwrap_err().to_string();
    assert!(err.contains("cannot keep the tasks of a scaled-out job apart"), "{err}");
}

#[test]
fn a_task_takes_over_a_live_holder_at_once_and_fences_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = task_ctx(dir.path(), 0);
    first.source("two", TwoPartitions::default()).unwrap().write_to(Recording::default());
    // Hold the location in this process the way a running task does.
    let store = cairn::checkpoint::CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    let held = store.acquire_lease(std::time::Duration::from_secs(60)).unwrap();
    // A single-process start would be refused (`Locked`); a task is assigned, so it takes over.
    first.run_available().unwrap();
    assert_eq!(first.task_epoch(), Some(2), "the task took the epoch after the live holder's");
    let err = store.check_lease().unwrap_err().to_string();
    assert!(err.contains("lease"), "the old holder is fenced: {err}");
    drop(held);
    // A process that held epoch 2 and restarts finds epoch 3 taken: it must not take it back.
    let third = store.take_over_lease(std::time::Duration::from_secs(1), None).unwrap();
    assert_eq!(third.epoch(), 3);
    let back = store.take_over_lease(std::time::Duration::from_secs(1), Some(2));
    assert!(matches!(back, Err(cairn::checkpoint::Error::LeaseLost { .. })), "{:?}", back.err());
}

#[test]
fn the_tasks_of_a_location_are_listed_with_owner_epoch_and_positions() {
    use cairn::checkpoint::{admin, paths::task_location, CheckpointStore};
    let root = tempfile::tempdir().unwrap();
    let root = root.path().to_str().unwrap().to_string();
    for t in 0..2 {
        let ctx = task_ctx(std::path::Path::new(&task_location(&root, t)), t);
        ctx.source("two", TwoPartitions::default()).unwrap().write_to(Recording::default());
        ctx.run_available().unwrap();
    }
    let store = CheckpointStore::open(&root).unwrap();
    let rows = admin::tasks(&store).unwrap();
    assert_eq!(rows.iter().map(|r| r.task).collect::<Vec<_>>(), vec![0, 1]);
    for r in &rows {
        let owner = r.owner.as_ref().expect("each task ran once");
        assert_eq!((owner.epoch, owner.pid, owner.released), (1, std::process::id(), true));
        assert!(r.last_committed && r.last_checkpoint.is_some(), "{r:?}");
        let positions: Vec<_> =
            r.positions.iter().map(|p| (p.source.as_str(), p.partition.to_string(), p.next, p.lag)).collect();
        assert_eq!(positions, vec![("two", r.task.to_string(), 4, None)]);
    }
    // A single-process job refuses a location that holds tasks.
    let single =
        StreamingContext::builder().checkpoint(&root).trigger(Trigger::AvailableNow).build().unwrap();
    single.source("two", TwoPartitions::default()).unwrap().write_to(Recording::default());
    let err = single.run_available().unwrap_err().to_string();
    assert!(err.contains("scaled-out job"), "{err}");
}
