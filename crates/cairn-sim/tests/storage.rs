//! Storage failures and slowness, through a fault-injecting object store under a real local
//! directory: a full disk stops the job with a clear error and loses nothing; slow checkpoint
//! writes become reported backpressure, not lost or duplicated data.

use cairn::checkpoint::object_store::{local::LocalFileSystem, path::Path as ObjPath};
use cairn::checkpoint::CheckpointStore;
use cairn::StreamingContext;
use cairn_sim::{expected_totals, expected_windows, job_on_store, FaultyStore, JobParams};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    _tmp: tempfile::TempDir,
    faulty: Arc<FaultyStore>,
    totals: String,
    windows: String,
}

fn setup(only: &str) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    let local = Arc::new(LocalFileSystem::new_with_prefix(&ckpt).expect("local store"));
    let faulty = FaultyStore::new(local, only);
    let p = |s: &str| tmp.path().join(s).to_str().expect("utf-8").to_string();
    Setup { totals: p("totals"), windows: p("windows"), faulty, _tmp: tmp }
}

fn context(s: &Setup, p: &JobParams) -> StreamingContext {
    context_with(s, p, |b| b)
}

fn context_with(
    s: &Setup,
    p: &JobParams,
    f: impl FnOnce(cairn::StreamingContextBuilder) -> cairn::StreamingContextBuilder,
) -> StreamingContext {
    let store = CheckpointStore::with_store(s.faulty.clone(), ObjPath::from(""), "faulty-local");
    job_on_store(store, p, &s.totals, &s.windows, |b| f(b.parallelism(2))).expect("build")
}

fn check_exact(s: &Setup, p: &JobParams) {
    for (dir, expected) in [(&s.totals, expected_totals(p)), (&s.windows, expected_windows(p))] {
        let got = cairn::read_text_output(dir).expect("read output");
        assert_eq!(got.len(), p.batches as usize, "{dir}: one output per batch");
        for ((b, mut lines), want) in got.into_iter().zip(expected) {
            lines.sort();
            assert!(lines == want, "{dir}: batch {b} differs from the model");
        }
    }
}

#[test]
fn full_disk_stops_with_a_clear_error_and_loses_nothing() {
    let p = JobParams { batches: 20, rate: 150, keys: 23 };
    let s = setup("");
    let ctx = context(&s, &p);
    let faulty = s.faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 7 {
            faulty.set_failing(true);
        }
    });
    let err = ctx.run_available().expect_err("writes fail, so the job must stop");
    let msg = err.to_string();
    assert!(msg.contains("No space left on device"), "the error names the cause: {msg}");
    let done = cairn::read_text_output(&s.totals).expect("read").len();
    assert!((8..20).contains(&done), "the job stopped soon after the disk filled ({done} batches)");

    s.faulty.set_failing(false);
    let summary = context(&s, &p).run_available().expect("restart on a healthy disk");
    assert_eq!(summary.next_batch.0, p.batches, "the restarted job finishes the batches");
    check_exact(&s, &p);
}

#[test]
fn slow_checkpoint_storage_is_backpressure_not_loss() {
    let p = JobParams { batches: 15, rate: 100, keys: 11 };
    let s = setup("state/");
    // Slow enough that eleven batches (ten deferrals, then a due checkpoint) finish before the
    // first write does even when every core is busy with other tests (150 ms was not, once).
    s.faulty.set_delay(Duration::from_millis(500));
    s.faulty.set_spikes(4, Duration::from_millis(600)); // and every 4th write a latency spike
    let ctx = context_with(&s, &p, |b| b.max_checkpoint_deferral(10));
    let waited = Arc::new(AtomicU64::new(0));
    let w = waited.clone();
    ctx.on_batch(move |b| {
        if b.checkpoint_wait_ms > 10.0 {
            w.fetch_add(1, Ordering::SeqCst);
        }
    });
    ctx.run_available().expect("slow storage is not an error");
    assert!(
        waited.load(Ordering::SeqCst) > 0,
        "checkpointing every 10 ms batch on 500 ms writes must report waiting"
    );
    assert!(s.faulty.puts() > 0, "state writes went through the slow store");
    check_exact(&s, &p);
}

#[test]
fn transient_errors_and_a_failed_write_are_retried_without_loss() {
    let p = JobParams { batches: 20, rate: 100, keys: 11 };
    let s = setup("");
    s.faulty.fail_nth_put(7); // one write fails once
    let ctx = context(&s, &p);
    let faulty = s.faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 4 {
            faulty.fail_next(2); // two transient errors in a row
        }
    });
    ctx.run_available().expect("transient errors are retried, not fatal");
    check_exact(&s, &p);
}

#[test]
fn a_torn_checkpoint_write_is_caught_and_rewritten() {
    let p = JobParams { batches: 16, rate: 100, keys: 11 };
    let s = setup("state/");
    let ctx = context(&s, &p);
    let faulty = s.faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 5 {
            faulty.tear_next_put();
        }
    });
    ctx.run_available().unwrap();
    let store = CheckpointStore::with_store(s.faulty.clone(), ObjPath::from(""), "faulty-local");
    let v = cairn::checkpoint::admin::verify(&store).unwrap();
    assert!(v.ok, "every object verifies after the torn write was redone: {v:?}");
    check_exact(&s, &p);
}

#[test]
fn a_torn_plan_write_is_caught_and_rewritten() {
    let p = JobParams { batches: 12, rate: 100, keys: 11 };
    let s = setup("log/");
    let ctx = context(&s, &p);
    let faulty = s.faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 5 {
            faulty.tear_next_put();
        }
    });
    ctx.run_available().unwrap();
    let store = CheckpointStore::with_store(s.faulty.clone(), ObjPath::from(""), "faulty-local");
    let v = cairn::checkpoint::admin::verify(&store).unwrap();
    assert!(v.ok, "every object verifies after the torn plan was redone: {v:?}");
    check_exact(&s, &p);
}

/// Requests per batch and per checkpoint on a counting store (figures for docs/storage.md).
#[test]
fn requests_per_batch_stay_small() {
    let p = JobParams { batches: 100, rate: 100, keys: 11 };
    let s = setup("");
    context(&s, &p).run_available().unwrap();
    let r = s.faulty.requests();
    let per = |n: u64| n as f64 / p.batches as f64;
    eprintln!(
        "requests per batch (checkpoint every batch): PUT {:.2}, GET {:.2}, HEAD {:.2}, LIST {:.2}, DELETE {:.2}",
        per(r.put),
        per(r.get),
        per(r.head),
        per(r.list),
        per(r.delete)
    );
    // Plan + checkpoint, a full snapshot every 10 checkpoints, the lease's heartbeat.
    assert!(per(r.put) <= 2.3, "PUTs per batch: {}", per(r.put));
    // The HEADs that check each plan and each checkpoint for a torn write; listings by
    // maintenance (compaction check, retention), whose share moves with the writer's timing
    // (2.05 idle, up to 2.19 with every core busy).
    assert!(per(r.head) <= 2.1 && per(r.list) <= 2.3, "{r:?}");
    // Retention deletes about what each batch adds.
    assert!(per(r.delete) <= 2.2, "{r:?}");
}

/// Counts the restarts the job announced.
#[derive(Default)]
struct Restarts(AtomicU64, std::sync::Mutex<Vec<String>>);

impl cairn::StreamingListener for Restarts {
    fn on_restart_scheduled(&self, e: &cairn::RestartScheduled) {
        self.0.fetch_add(1, Ordering::SeqCst);
        self.1.lock().unwrap().push(e.cause.clone());
    }
}

/// Storage that fails every write for a while (more failures than the store's own retries
/// absorb) is ridden out: the same context restarts in place from its checkpoint, announces
/// each restart, and ends with exactly the model's output.
#[test]
fn a_storage_outage_is_ridden_out_in_place_exactly() {
    let p = JobParams { batches: 24, rate: 100, keys: 11 };
    let s = setup("");
    let ctx = context(&s, &p);
    let seen = Arc::new(Restarts::default());
    ctx.add_listener(seen.clone());
    let faulty = s.faulty.clone();
    let once = std::sync::atomic::AtomicBool::new(false);
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 9 && !once.swap(true, Ordering::SeqCst) {
            faulty.fail_next(30); // ~4 requests' worth of retries
        }
    });
    let summary = ctx.run_available().expect("the outage is waited out");
    let restarts = seen.0.load(Ordering::SeqCst);
    assert!(restarts >= 1, "the job restarted to ride the outage out");
    assert_eq!(summary.restarts, restarts, "the summary counts what the events announced");
    // Whether a logged batch is replayed depends on which request the outage hits first: the
    // next plan's write (nothing logged, nothing to replay) or the background checkpoint write
    // racing it; either way the output below must be exact.
    assert_eq!(summary.next_batch.0, p.batches);
    let causes = seen.1.lock().unwrap();
    assert!(causes.iter().all(|c| c.contains("503 Slow Down")), "each restart names its cause: {causes:?}");
    check_exact(&s, &p);
}

/// An outage longer than the budget stops the job with an error that says how long it tried
/// and why; a restart once storage is back resumes exactly. A final error (a full disk) is not
/// ridden out at all.
#[test]
fn an_outage_past_the_budget_stops_clearly_and_a_restart_resumes_exactly() {
    let p = JobParams { batches: 20, rate: 100, keys: 11 };
    let s = setup("");
    let ctx = context_with(&s, &p, |b| b.max_outage(Duration::from_millis(1500)));
    let seen = Arc::new(Restarts::default());
    ctx.add_listener(seen.clone());
    let faulty = s.faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 6 {
            faulty.fail_next(u64::MAX / 2); // storage never comes back
        }
    });
    let t0 = std::time::Instant::now();
    let err = ctx.run_available().expect_err("the outage outlasts the budget");
    let msg = err.to_string();
    // The store's own retries (~3 s) inside the failed batch already used the 1.5 s budget: the
    // job gives up without restarting, and says so.
    assert!(matches!(err, cairn::Error::Outage { attempts: 0, .. }), "{msg}");
    assert!(msg.contains("gave up after") && msg.contains("503 Slow Down"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(20), "it stopped near its budget: {:?}", t0.elapsed());
    assert_eq!(seen.0.load(Ordering::SeqCst), 0);

    s.faulty.fail_next(0);
    let summary = context(&s, &p).run_available().expect("storage is back");
    assert_eq!(summary.restarts, 0);
    check_exact(&s, &p);

    // A full disk is final: the job stops at once, without a restart.
    let s = setup("");
    let ctx = context(&s, &p);
    let seen = Arc::new(Restarts::default());
    ctx.add_listener(seen.clone());
    let faulty = s.faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 3 {
            faulty.set_failing(true);
        }
    });
    let err = ctx.run_available().expect_err("a full disk stops the job");
    assert!(!err.is_transient() && err.to_string().contains("No space left"), "{err}");
    assert_eq!(seen.0.load(Ordering::SeqCst), 0, "a final error is not ridden out");
}

/// With the store's own retries off, a single transient failure reaches the job, which restarts
/// in place once instead of stopping, and the output is exact.
#[test]
fn without_store_retries_a_blip_is_one_restart() {
    let p = JobParams { batches: 16, rate: 100, keys: 11 };
    let s = setup("");
    let none = cairn::checkpoint::retry::RetryPolicy { max_retries: 0, ..Default::default() };
    let store =
        CheckpointStore::with_store_retrying(s.faulty.clone(), ObjPath::from(""), "faulty-local", none);
    let ctx = job_on_store(store, &p, &s.totals, &s.windows, |b| b).unwrap();
    let faulty = s.faulty.clone();
    let once = std::sync::atomic::AtomicBool::new(false);
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 5 && !once.swap(true, Ordering::SeqCst) {
            faulty.fail_next(1);
        }
    });
    let summary = ctx.run_available().expect("one blip is ridden out");
    assert_eq!(summary.restarts, 1);
    check_exact(&s, &p);
}
