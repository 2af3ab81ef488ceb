//! Receivers in one process: what they refuse, backpressure, acknowledgement, and retention of
//! the write-ahead log. (Kills of a real process are in cairn-sim's `receivers` test.)

use cairn::checkpoint::CheckpointStore;
use cairn::source::{NotDurable, Refused};
use cairn::{StreamingContext, TaskId, Trigger};
use std::time::Duration;

fn lines(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| i.to_string().into_bytes()).collect()
}

#[test]
fn a_receiver_needs_a_checkpoint_location_and_refuses_to_scale_out() {
    let ctx = StreamingContext::builder().build().unwrap();
    let e = ctx.receiver_stream("events", 10).err().expect("no location: refused").to_string();
    assert!(e.contains("\"events\"") && e.contains("write-ahead log") && e.contains("checkpoint"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder()
        .checkpoint(dir.path().to_str().unwrap())
        .task(TaskId(0), 2)
        .build()
        .unwrap();
    let e = ctx.socket_text_stream("lines", "127.0.0.1:1").err().expect("scaled out: refused").to_string();
    assert!(e.contains("\"lines\"") && e.contains("task 0"), "{e}");
}

/// A job on `dir` that runs until its input is drained.
fn drained_job(dir: &std::path::Path) -> StreamingContext {
    StreamingContext::builder()
        .checkpoint(dir.to_str().unwrap())
        .trigger(Trigger::AvailableNow)
        .build()
        .unwrap()
}

#[test]
fn a_full_buffer_refuses_and_records_are_acknowledged_only_once_written() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = drained_job(dir.path());
    let (input, stream) = ctx.receiver_stream("events", 10).unwrap();
    let seen = cairn::testing::collect(&stream);
    let first = input.push(lines(0..10)).unwrap();
    assert_eq!(input.push(lines(10..11)).err(), Some(Refused::Full(10)), "the 11th record waits for room");
    // Nothing planned yet: not durable.
    assert_eq!(first.wait(Duration::from_millis(50)), Err(NotDurable::Timeout(Duration::from_millis(50))));
    ctx.run_available().unwrap();
    first.wait(Duration::ZERO).expect("written by the batch's plan");
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(store.wal_blocks("events").unwrap(), vec![0], "one block for the batch");
    let got: Vec<String> = seen.lock().unwrap().concat();
    assert_eq!(got, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
    drop(ctx);
    assert_eq!(input.push(lines(0..1)).err(), Some(Refused::Stopped), "a stopped job takes nothing");
}

/// Runs a job on `loc` that pushes `pushes` chunks of 5 records, one per batch (each chunk
/// acknowledged before the next), and returns what it output.
fn run(loc: &str, first: u32, pushes: u32) -> Vec<String> {
    let ctx = StreamingContext::builder()
        .checkpoint(loc)
        .batch_interval(Duration::from_millis(20))
        .keep_checkpoints(2)
        .build()
        .unwrap();
    let (input, stream) = ctx.receiver_stream("events", 1000).unwrap();
    // Every push must be taken: no automatic rate bound if a loaded machine slows the batches.
    input.set_backpressure(false);
    let seen = cairn::testing::collect(&stream);
    ctx.start().unwrap();
    for i in first..first + pushes {
        let d = input.push(lines(i * 5..i * 5 + 5)).unwrap();
        d.wait(Duration::from_secs(10)).unwrap();
    }
    // The last chunk's batch has run once a later batch planned.
    std::thread::sleep(Duration::from_millis(100));
    ctx.stop();
    ctx.await_termination().unwrap();
    let out = seen.lock().unwrap().concat();
    out
}

#[test]
fn retention_deletes_the_blocks_no_plan_needs_and_a_restart_goes_on_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let mut out = run(loc, 0, 40);
    let store = CheckpointStore::open(loc).unwrap();
    let blocks = store.wal_blocks("events").unwrap();
    // Blocks are kept back to the oldest restorable checkpoint's plans. With 2 checkpoints kept
    // and a full snapshot every 10 that is about 10–20 batches back; when compaction lags on a
    // loaded machine a chain may grow to 2 × 10 before a full is cut, so up to 22 may be left.
    assert!(
        blocks.first() > Some(&0) && blocks.len() <= 22 && blocks.last() >= Some(&39),
        "old blocks deleted, new kept: {blocks:?}"
    );
    // A restart continues the numbering past what is listed and reads nothing twice.
    out.extend(run(loc, 40, 10));
    assert_eq!(out, (0..250).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[test]
fn a_configured_rate_bound_refuses_what_is_over_it_and_shows_in_the_progress() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = drained_job(dir.path());
    let (input, stream) = ctx.receiver_stream("events", 10_000).unwrap();
    stream.foreach_batch(|_, _| Ok(()));
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = progress.clone();
    ctx.on_batch(move |b| p.lock().unwrap().push(b.receivers.clone()));
    input.set_max_rate(Some(100.0));
    assert!(input.push(lines(0..100)).is_ok(), "a second's worth at once");
    assert_eq!(input.push(lines(0..1)).err(), Some(Refused::RateLimited(100)));
    std::thread::sleep(Duration::from_millis(120));
    assert!(input.push(lines(0..5)).is_ok(), "the bucket refills at the bound");
    ctx.run_available().unwrap();
    let seen = progress.lock().unwrap();
    let r = &seen[0][0];
    assert_eq!(
        (r.name.as_str(), r.records, r.refused, r.blocks, r.rate_limit),
        ("events", 105, 1, 1, Some(100.0))
    );
}

#[test]
fn batches_slower_than_the_interval_bound_the_ingest_rate() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder()
        .checkpoint(dir.path().to_str().unwrap())
        .batch_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let (input, stream) = ctx.receiver_stream("events", 1_000_000).unwrap();
    // Every batch takes 150 ms: three intervals.
    stream.foreach_batch(|_, _| {
        std::thread::sleep(Duration::from_millis(150));
        Ok(())
    });
    assert_eq!(input.rate_limit(), None, "unbounded until the batches fall behind");
    ctx.start().unwrap();
    let t0 = std::time::Instant::now();
    let mut refused = 0;
    while input.rate_limit().is_none() && t0.elapsed() < Duration::from_secs(10) {
        if input.push(lines(0..1000)).is_err() {
            refused += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bound = input.rate_limit().expect("a bound within 10 s");
    // 1000 records every 20 ms arrive (~50 000/s); batches of ~3 intervals' worth take 150 ms.
    assert!(bound < 50_000.0, "bounded below the offered rate: {bound}");
    let mut limited = false;
    for _ in 0..50 {
        if let Err(Refused::RateLimited(_)) = input.push(lines(0..1000)) {
            limited = true;
            break;
        }
    }
    assert!(limited, "pushes over the bound are refused (after {refused} earlier refusals)");
    ctx.stop();
    ctx.await_termination().unwrap();
}
