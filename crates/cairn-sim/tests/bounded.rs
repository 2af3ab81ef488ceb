//! A location stays bounded at any storage latency: with every request type delayed (puts,
//! gets, heads, listings, deletes — so compaction and retention cost what they would), the
//! newest checkpoint's chain and the number of objects in the location stay under the bounds
//! the settings give, at every batch of the run, and a restart after the run is exact.
//! The same bounds hold on moto (a real S3 API on 127.0.0.1). Every progress record estimates
//! what a restore would take; the run checks that against a measured restore.
//! `CAIRN_BOUNDED_MATRIX=full` runs every latency of docs/storage.md.

use cairn::checkpoint::object_store::{local::LocalFileSystem, path::Path as ObjPath};
use cairn::checkpoint::{protocol, CheckpointStore};
use cairn::{StreamingContext, Trigger};
use cairn_sim::s3::S3Server;
use cairn_sim::{check_sink_output, define_job, FaultyStore, JobParams, INTERVAL};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `full_snapshot_every` and `keep_checkpoints` of these runs.
const FULL_EVERY: usize = 5;
const KEEP: usize = 4;

#[derive(Debug, Default)]
struct Seen {
    longest_chain: AtomicUsize,
    most_objects: AtomicUsize,
    batches: AtomicU64,
    /// The newest progress record's restore estimate (ms), and the chain it was for.
    estimate: std::sync::Mutex<Option<(f64, u64)>>,
}

#[derive(Debug)]
struct Figures {
    storage: String,
    batches: u64,
    seconds: f64,
    checkpoints: u64,
    longest_chain: usize,
    most_objects: usize,
    restore_ms: f64,
    /// The last batch's estimate of what that restore would take.
    estimate_ms: f64,
}

/// The newest checkpoint's chain length and the objects in the location, read through `direct`
/// (the location without injected delays).
fn measure(direct: &CheckpointStore) -> (usize, usize) {
    let listing = direct.listing().unwrap();
    let chain = listing
        .checkpoints()
        .into_iter()
        .max()
        .and_then(|b| protocol::chain(&listing, b, true))
        .map_or(0, |c| c.len());
    let objects = direct.list_objects().unwrap().len();
    (chain, objects)
}

fn measure_dir(dir: &std::path::Path) -> (usize, usize) {
    measure(&CheckpointStore::open(dir.to_str().unwrap()).unwrap())
}

/// Runs the test job for `batches` batches on `slow` (a checkpoint every batch), sampling the
/// chain and object count through `direct` after every batch, then restores through `slow` and
/// checks the output.
fn run(storage: &str, slow: impl Fn() -> CheckpointStore, direct: CheckpointStore, batches: u64) -> Figures {
    let tmp = tempfile::tempdir().unwrap();
    let (totals, windows) = (tmp.path().join("totals"), tmp.path().join("windows"));
    let (totals, windows) = (totals.to_str().unwrap(), windows.to_str().unwrap());
    let p = JobParams { batches, rate: 100, keys: 11 };
    let ctx = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .checkpoint_store(slow())
        .full_snapshot_every(FULL_EVERY)
        .keep_checkpoints(KEEP)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(p.batches)
        .build()
        .unwrap();
    define_job(&ctx, &p, totals, windows).unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    ctx.on_batch(move |b| {
        let (chain, objects) = measure(&direct);
        s.longest_chain.fetch_max(chain, Ordering::SeqCst);
        s.most_objects.fetch_max(objects, Ordering::SeqCst);
        s.batches.fetch_add(1, Ordering::SeqCst);
        if let Some(ms) = b.checkpoint_restore_estimate_ms {
            *s.estimate.lock().unwrap() = Some((ms, b.checkpoint_chain));
        }
    });
    let t0 = Instant::now();
    let summary = ctx.run_available().unwrap();
    let seconds = t0.elapsed().as_secs_f64();
    assert_eq!(seen.batches.load(Ordering::SeqCst), batches);
    // A restart through the same slow store: what a crash now would cost.
    let t0 = Instant::now();
    let again = slow().recover().unwrap();
    let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
    assert!(again.replay.is_empty());
    check_sink_output(totals, windows, &p);
    let (estimate_ms, chain) =
        seen.estimate.lock().unwrap().expect("every checkpointed batch reports an estimate");
    assert!(chain > 0 && estimate_ms > 0.0, "{estimate_ms} ms for a chain of {chain}");
    Figures {
        storage: storage.into(),
        batches,
        seconds,
        checkpoints: summary.checkpoints,
        longest_chain: seen.longest_chain.load(Ordering::SeqCst),
        most_objects: seen.most_objects.load(Ordering::SeqCst),
        restore_ms,
        estimate_ms,
    }
}

/// A run on the local directory with every request delayed by `delay_ms`.
fn run_delayed(delay_ms: u64, batches: u64) -> Figures {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let local = Arc::new(LocalFileSystem::new_with_prefix(&ckpt).unwrap());
    let faulty = FaultyStore::new(local, "");
    faulty.set_delay_all(Duration::from_millis(delay_ms));
    let slow = || CheckpointStore::with_store(faulty.clone(), ObjPath::from(""), "slow-local");
    let direct = CheckpointStore::open(ckpt.to_str().unwrap()).unwrap();
    run(&format!("{delay_ms} ms per request"), slow, direct, batches)
}

/// The documented bounds (docs/storage.md): a chain never passes 2K objects (compaction keeps
/// it at K + 1; when compaction falls behind, the engine cuts a full snapshot itself), and the
/// location holds at most 4 (keep + 2K) + 5 objects: the newest chain, the kept checkpoints,
/// the independent second restore point's chain and the log since it, each at most keep + 2K,
/// plus the metadata copies and one start's lease objects.
fn check_bounds(f: &Figures) {
    let (chain_bound, object_bound) = (2 * FULL_EVERY, 4 * (KEEP + 2 * FULL_EVERY) + 5);
    eprintln!(
        "| {} | {} | {:.1} | {} | {} | {} | {:.0} | {:.0} |",
        f.storage,
        f.batches,
        f.seconds,
        f.checkpoints,
        f.longest_chain,
        f.most_objects,
        f.restore_ms,
        f.estimate_ms
    );
    assert!(f.longest_chain <= chain_bound, "{f:?}");
    assert!(f.most_objects <= object_bound, "{f:?}");
}

const TABLE_HEAD: &str =
    "| storage | batches | s | checkpoints | longest chain | most objects | restore ms | estimated ms |";

#[test]
fn chains_and_object_counts_stay_bounded_at_any_latency() {
    let full = std::env::var("CAIRN_BOUNDED_MATRIX").is_ok_and(|v| v == "full");
    let matrix: &[(u64, u64)] =
        if full { &[(5, 600), (20, 400), (50, 300), (200, 150)] } else { &[(5, 300), (50, 120)] };
    eprintln!("{TABLE_HEAD}");
    for &(delay, batches) in matrix {
        let f = run_delayed(delay, batches);
        check_bounds(&f);
        // Restoring reads the chain plus a few small objects (listing, metadata, the log since
        // the checkpoint), so the estimate of the chain alone is below the measured restore but
        // of its order; a wrong unit or a missing latency would be off by far more.
        let ratio = f.restore_ms / f.estimate_ms;
        assert!(
            (0.8..6.0).contains(&ratio),
            "restore {:.0} ms vs estimate {:.0} ms",
            f.restore_ms,
            f.estimate_ms
        );
    }
}

/// The same bounds on a real S3 API (moto on 127.0.0.1): batches back to back, as fast as the
/// server takes their plans, for several hundred batches.
#[test]
fn chains_and_object_counts_stay_bounded_on_s3() {
    let server = S3Server::start();
    server.set_env();
    server.create_bucket("bounded");
    let location = "s3://bounded/job";
    let direct = CheckpointStore::open(location).unwrap();
    eprintln!("{TABLE_HEAD}");
    let f = run("moto", || CheckpointStore::open(location).unwrap(), direct, 300);
    check_bounds(&f);
}

/// The crash job on storage delayed 20 ms per request, SIGKILLed mid-run and restarted: the
/// chain and the object count stay bounded the whole time (sampled from another process while
/// it runs), and the output is exact. Its settings: full_snapshot_every 4, keep_checkpoints 3.
#[test]
fn a_sigkilled_job_on_slow_storage_stays_bounded_and_recovers_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    let (totals, windows) = (tmp.path().join("totals"), tmp.path().join("windows"));
    let (totals, windows) = (totals.to_str().unwrap().to_string(), windows.to_str().unwrap().to_string());
    let p = JobParams { batches: 150, rate: 100, keys: 11 };
    let job = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_crash-job"));
        c.args([ckpt.to_str().unwrap(), &totals, &windows])
            .args([p.batches, p.rate, p.keys, 1, 2].map(|n| n.to_string()))
            .env("CRASH_JOB_DELAY_MS", "20")
            .env("CAIRN_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let (full_every, keep) = (4, 3);
    let (mut longest, mut most, mut starts) = (0, 0, 0);
    let sample = |longest: &mut usize, most: &mut usize| {
        if ckpt.join("metadata").exists() {
            let (c, o) = measure_dir(&ckpt);
            *longest = (*longest).max(c);
            *most = (*most).max(o);
        }
    };
    let mut child = job().spawn().unwrap();
    starts += 1;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        sample(&mut longest, &mut most);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.try_wait().unwrap().is_none(), "the kill must land mid-run");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut child = job().spawn().unwrap();
    starts += 1;
    let status = loop {
        sample(&mut longest, &mut most);
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the restart finished: {status}");
    sample(&mut longest, &mut most);
    // Every start leaves its three lease objects (they are not collected yet).
    let object_bound = 4 * (keep + 2 * full_every) + 2 + 3 * starts;
    eprintln!("SIGKILLed on 20 ms storage: longest chain {longest}, most objects {most} (bounds {}, {object_bound})", 2 * full_every);
    assert!(longest <= 2 * full_every && most <= object_bound, "chain {longest}, objects {most}");
    check_sink_output(&totals, &windows, &p);
}

/// Storage so slow that writing a batch's plan takes longer than the batch interval (100 ms per
/// request, 10 ms batches, processing-time trigger): batches run late rather than queue up, each
/// on the grid point current when it starts (missed points are skipped, not run back to back),
/// and every progress record reports the delay.
#[test]
fn planning_slower_than_the_interval_runs_batches_late_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let faulty = FaultyStore::new(Arc::new(LocalFileSystem::new_with_prefix(&ckpt).unwrap()), "");
    faulty.set_delay_all(Duration::from_millis(100));
    let ctx = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .checkpoint_store(CheckpointStore::with_store(faulty, ObjPath::from(""), "slow-local"))
        .trigger(Trigger::ProcessingTime)
        .stop_after_batches(8)
        .build()
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    ctx.generator("g", 1, 10, |_, o| o).unwrap().foreach_batch(|_, _| Ok(()));
    ctx.on_batch(move |b| s.lock().unwrap().push((b.batch_time_ms, b.scheduling_delay_ms)));
    ctx.run().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 8);
    let interval = INTERVAL.as_millis() as i64;
    for w in seen.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(gap % interval == 0 && gap > interval, "later grid points, missed ones skipped: {seen:?}");
    }
    assert!(seen[1..].iter().all(|(_, delay)| *delay >= interval as f64), "the delay is reported: {seen:?}");
}
