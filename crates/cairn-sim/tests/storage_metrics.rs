//! The event-only metrics of cairn-web under real storage trouble, injected by the faulty store:
//! slow checkpoint writes show as deferrals and backpressure time, transient errors as retries,
//! a dead disk as a failure; each figure equals what the progress events reported.

use cairn::checkpoint::object_store::{local::LocalFileSystem, path::Path as ObjPath};
use cairn::checkpoint::CheckpointStore;
use cairn::{CheckpointFailed, CheckpointWritten, StreamingContext, StreamingListener};
use cairn_sim::{job_on_store, FaultyStore, JobParams};
use cairn_web::Metrics;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the events said, to compare with the metrics.
#[derive(Default)]
struct Seen {
    deferred: AtomicU64,
    wait_ms: Mutex<f64>,
    retries: AtomicU64,
    failed: AtomicU64,
}

impl StreamingListener for Seen {
    fn on_batch_completed(&self, p: &cairn::BatchProgress) {
        self.deferred.fetch_add(u64::from(p.checkpoint_deferred), Ordering::SeqCst);
        *self.wait_ms.lock().unwrap() += p.checkpoint_wait_ms;
    }
    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        self.retries.fetch_add(u64::from(e.retries), Ordering::SeqCst);
    }
    fn on_checkpoint_failed(&self, e: &CheckpointFailed) {
        self.retries.fetch_add(u64::from(e.retries), Ordering::SeqCst);
        self.failed.fetch_add(1, Ordering::SeqCst);
    }
}

struct Job {
    _tmp: tempfile::TempDir,
    faulty: Arc<FaultyStore>,
    ctx: StreamingContext,
    metrics: Metrics,
    seen: Arc<Seen>,
}

/// The crash job on a faulty store whose faults hit only state objects.
fn job(p: &JobParams, max_deferral: u64) -> Job {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    let local = Arc::new(LocalFileSystem::new_with_prefix(&ckpt).expect("local store"));
    let faulty = FaultyStore::new(local, "state/");
    let store = CheckpointStore::with_store(faulty.clone(), ObjPath::from(""), "faulty-local");
    let out = |s: &str| tmp.path().join(s).to_str().expect("utf-8").to_string();
    let ctx = job_on_store(store, p, &out("totals"), &out("windows"), |b| {
        b.app_name("faulty").parallelism(2).max_checkpoint_deferral(max_deferral)
    })
    .expect("build");
    let metrics = Metrics::for_context(&ctx);
    ctx.add_listener(Arc::new(metrics.clone()));
    let seen = Arc::new(Seen::default());
    ctx.add_listener(seen.clone());
    Job { _tmp: tmp, faulty, ctx, metrics, seen }
}

/// The value of the one sample `name{app="faulty"}` in the exposition.
fn value(metrics: &Metrics, name: &str) -> f64 {
    let text = metrics.encode();
    let prefix = format!("{name}{{app=\"faulty\"}} ");
    let found: Vec<f64> =
        text.lines().filter_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().expect("a number")).collect();
    assert_eq!(found.len(), 1, "{name} in\n{text}");
    found[0]
}

#[test]
fn slow_storage_shows_as_deferrals_and_backpressure_time() {
    let j = job(&JobParams { batches: 15, rate: 100, keys: 11 }, 2);
    assert_eq!(value(&j.metrics, "cairn_checkpoint_deferrals_total"), 0.0);
    assert_eq!(value(&j.metrics, "cairn_checkpoint_backpressure_seconds_total"), 0.0);
    j.faulty.set_delay(Duration::from_millis(150));
    j.ctx.run_available().expect("slow storage is not an error");
    let deferred = j.seen.deferred.load(Ordering::SeqCst);
    assert!(deferred > 0, "150 ms writes behind 10 ms batches put checkpoints off");
    assert_eq!(value(&j.metrics, "cairn_checkpoint_deferrals_total"), deferred as f64);
    let waited_s = *j.seen.wait_ms.lock().unwrap() / 1e3;
    assert!(waited_s > 0.05, "past two deferred batches the scheduler waits ({waited_s} s)");
    let got = value(&j.metrics, "cairn_checkpoint_backpressure_seconds_total");
    assert!((got - waited_s).abs() < 1e-9, "{got} s counted, {waited_s} s reported");
    assert_eq!(value(&j.metrics, "cairn_checkpoint_write_retries_total"), 0.0);
}

#[test]
fn transient_errors_count_as_retries_and_a_full_disk_as_a_failure_at_once() {
    let j = job(&JobParams { batches: 12, rate: 100, keys: 11 }, 0);
    let faulty = j.faulty.clone();
    j.ctx.on_batch(move |b| {
        if b.batch_id.0 == 4 {
            // Four transient errors in a row on the next checkpoint's put: the store's one retry
            // budget absorbs them.
            faulty.fail_next(4);
        }
    });
    j.ctx.run_available().expect("transient errors are retried, not fatal");
    let retries = j.seen.retries.load(Ordering::SeqCst);
    assert_eq!(retries, 4, "the events report each retried request");
    assert_eq!(value(&j.metrics, "cairn_checkpoint_write_retries_total"), retries as f64);
    assert_eq!(value(&j.metrics, "cairn_checkpoint_failures_total"), 0.0);

    let j = job(&JobParams { batches: 12, rate: 100, keys: 11 }, 0);
    let faulty = j.faulty.clone();
    j.ctx.on_batch(move |b| {
        if b.batch_id.0 == 3 {
            faulty.set_failing(true);
        }
    });
    j.ctx.run_available().expect_err("a checkpoint that cannot be stored stops the job");
    assert_eq!(j.seen.failed.load(Ordering::SeqCst), 1);
    assert_eq!(value(&j.metrics, "cairn_checkpoint_failures_total"), 1.0);
    // A full disk is an answer, not a blip: neither the store nor the engine retries it.
    assert_eq!(j.seen.retries.load(Ordering::SeqCst), 0);
    assert_eq!(value(&j.metrics, "cairn_checkpoint_write_retries_total"), 0.0);
    assert_eq!(value(&j.metrics, "cairn_restarts_total"), 0.0);
}
