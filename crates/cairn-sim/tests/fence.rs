//! The lease fence: a paused holder cannot commit after another process took the location over.
//!
//! Real processes (the crash job) are paused with SIGSTOP — by a failpoint between their last
//! lease check and a plan write, or from outside past the lease TTL — while a second process
//! takes over; resumed, the first must stop with a lease-lost error. An audit then reads every
//! plan, commit and state object of the location and checks its writer's epoch against the fence
//! records (replays are deterministic, so comparing output alone could not tell a stale write
//! from a good one), and the output and final state must equal the model. Each scenario runs on
//! local disk and on S3 (moto). In-process tests cover retried conditional writes whose first
//! attempt landed, and the fence rules on one store.

use cairn::checkpoint::paths::ObjectName;
use cairn::checkpoint::protocol::fenced;
use cairn::checkpoint::{BatchId, BatchPlan, CheckpointStore, Error, OffsetRange, SourcePlan};
use cairn_sim::s3::S3Server;
use cairn_sim::{FaultyStore, JobParams};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Short enough that pausing a holder past it costs the test little.
const TTL_MS: u64 = 1000;

struct Job {
    ckpt: String,
    totals: String,
    windows: String,
    env: Vec<(&'static str, String)>,
    p: JobParams,
    tmp: tempfile::TempDir,
}

impl Job {
    fn new(ckpt: String, env: Vec<(&'static str, String)>, p: JobParams) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = |s: &str| tmp.path().join(s).to_str().expect("utf-8").to_string();
        Self { ckpt, totals: d("totals"), windows: d("windows"), env, p, tmp }
    }

    /// Starts the crash job; its stderr goes to `<tmp>/<name>.err`.
    fn spawn(&self, name: &str, failpoint: Option<&str>, pace_ms: u64) -> Child {
        let err = std::fs::File::create(self.tmp.path().join(format!("{name}.err"))).expect("stderr file");
        let mut c = Command::new(env!("CARGO_BIN_EXE_crash-job"));
        c.args([&self.ckpt, &self.totals, &self.windows])
            .args([self.p.batches, self.p.rate, self.p.keys, 1, 2].map(|n| n.to_string()))
            .envs(self.env.clone())
            .env("CAIRN_LOG", "warn")
            .env("CRASH_JOB_PACE_MS", pace_ms.to_string())
            .env("CRASH_JOB_LEASE_TTL_MS", TTL_MS.to_string())
            .stdout(Stdio::null())
            .stderr(err);
        match failpoint {
            Some(f) => c.env("CAIRN_FAILPOINT", f),
            None => c.env_remove("CAIRN_FAILPOINT"),
        };
        c.spawn().expect("spawn crash-job")
    }

    fn stderr(&self, name: &str) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("{name}.err"))).unwrap_or_default()
    }

    fn store(&self) -> CheckpointStore {
        for (k, v) in &self.env {
            std::env::set_var(k, v);
        }
        CheckpointStore::open(&self.ckpt).expect("open the location")
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().expect("kill");
    assert!(ok.success(), "kill -{sig} {}", child.id());
}

/// Whether the process is stopped (state `T` in /proc).
fn stopped(child: &Child) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("crash-job did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads every plan, commit and state object of the location: none may carry an epoch that a
/// newer epoch's fence excludes, and every object of `stale` (the paused holder's epoch) must
/// concern a batch below the fence of the epoch that took over from it. Returns how many objects
/// of the stale epoch remain (legitimately, below the fence).
fn audit(store: &CheckpointStore, stale: u64) -> usize {
    let fences = store.read_fences().expect("fences");
    let takeover = *fences.get(&(stale + 1)).expect("the epoch after the paused one wrote its fence");
    let mut stale_left = 0;
    let mut audited = 0;
    // While the new holder runs, retention may delete an object between the listing and its
    // read: a vanished object is skipped, any other read error fails the audit.
    let vanished = |r: &cairn::checkpoint::Error| matches!(r, Error::Corrupt { reason, .. } if reason == "object is missing");
    for (name, _) in store.list_objects().expect("list") {
        let read = match name {
            ObjectName::Plan(b) => store.read_plan(b).map(|p| (p.epoch, b)),
            ObjectName::Commit(b) => store.read_commit(b).map(|c| (c.epoch, b)),
            ObjectName::Full(b) | ObjectName::Delta { batch: b, .. } => {
                store.read_state(name).map(|c| (c.epoch, b))
            }
            _ => continue,
        };
        let (epoch, batch) = match read {
            Ok(r) => r,
            Err(e) if vanished(&e) => continue,
            Err(e) => panic!("{name:?} unreadable: {e}"),
        };
        audited += 1;
        if let Some(f) = fenced(&fences, epoch, batch) {
            panic!("{name:?} of lease epoch {epoch} is fenced off ({f}) but still in the location");
        }
        if epoch == stale {
            assert!(
                batch < takeover,
                "{name:?} of the paused epoch {stale} lies past its fence at batch {takeover}"
            );
            stale_left += 1;
        }
        assert!(epoch <= stale + 1, "{name:?}: only two processes ran, found epoch {epoch}");
    }
    assert!(audited > 0, "the audit read nothing");
    stale_left
}

fn check_result(job: &Job) {
    cairn_sim::check_sink_output(&job.totals, &job.windows, &job.p);
    cairn_sim::check_final_state(&job.ckpt, &job.p);
}

/// Both processes stop at the same failpoint (between the lease check and the write of batch
/// 8's plan). The paused first holder is resumed while the new holder is paused there too, so
/// its stale plan lands first; it must notice the takeover right after and stop, and the new
/// holder must replace that plan and finish exactly.
fn frozen_holder_resumes_after_a_takeover(job: &Job) {
    const AT: u64 = 8;
    let fp = format!("freeze-before-plan@{AT}");
    let mut first = job.spawn("first", Some(&fp), 0);
    wait_for("the first process to freeze", Duration::from_secs(30), || stopped(&first));
    let store = job.store();
    assert_eq!(store.read_lease().unwrap().expect("a holder").epoch, 1);
    // Past the TTL its heartbeat is stale: a second process may take over.
    std::thread::sleep(Duration::from_millis(TTL_MS + 300));
    let mut second = job.spawn("second", Some(&fp), 30);
    wait_for("the second process to take over and freeze", Duration::from_secs(30), || stopped(&second));
    assert_eq!(store.read_lease().unwrap().expect("a holder").epoch, 2);
    assert_eq!(store.read_fences().unwrap().get(&2), Some(&BatchId(AT)), "the takeover point");

    signal(&first, "CONT");
    let status = wait_exit(&mut first, Duration::from_secs(20));
    let err = job.stderr("first");
    assert!(!status.success(), "the stale holder must fail: {err}");
    assert!(
        err.contains("lost the lease") && err.contains("epoch 2"),
        "a clear error naming the new holder: {err}"
    );
    // Its plan did land (the new holder had not written batch 8 yet) — and is not accepted.
    let stale_plan = store.read_plan(BatchId(AT)).expect("the stale plan landed");
    assert_eq!(stale_plan.epoch, 1);
    assert!(fenced(&store.read_fences().unwrap(), stale_plan.epoch, BatchId(AT)).is_some());
    assert!(
        cairn::read_text_output(&job.totals).unwrap().iter().all(|(b, _)| b.0 < AT),
        "no sink ran past the fence"
    );
    // Recovery (read-only here) does not accept the stale plan: it is reported, not replayed.
    let rec = store.recover().expect("recover");
    assert_eq!(rec.fenced, vec![ObjectName::Plan(BatchId(AT))], "only the stale plan is fenced off");
    assert!(rec.replay.iter().all(|p| p.batch_id.0 < AT) && rec.next_batch.0 <= AT, "{:?}", rec.next_batch);
    let mid = rec.state.map_or(0, |_| 1);

    signal(&second, "CONT");
    // The new holder replaces the stale plan with its own (it is paced, so retention removes
    // batch 8's log only a few batches later, after this saw it).
    wait_for("the new holder to replace the stale plan", Duration::from_secs(20), || {
        match store.read_plan(BatchId(AT)) {
            Ok(p) => p.epoch == 2,
            Err(e) => panic!("plan {AT} unreadable before it was seen replaced: {e}"),
        }
    });
    let status = wait_exit(&mut second, Duration::from_secs(60));
    assert!(status.success(), "the new holder finishes: {}", job.stderr("second"));
    let left = audit(&store, 1);
    eprintln!(
        "{}: frozen holder: stale plan fenced off (restorable checkpoint meanwhile: {mid}); objects of the paused epoch at the end: {left}",
        job.ckpt
    );
    check_result(job);
}

/// The first process is stopped from outside at an arbitrary moment and kept stopped past the
/// TTL; a second takes over and runs; the first is resumed while the second still runs.
fn sigstopped_holder_resumes_while_the_new_one_runs(job: &Job) {
    let mut first = job.spawn("first", None, 15);
    wait_for("the first process to make progress", Duration::from_secs(30), || {
        cairn::read_text_output(&job.totals).is_ok_and(|o| o.len() >= 5)
    });
    signal(&first, "STOP");
    wait_for("the first process to stop", Duration::from_secs(5), || stopped(&first));
    std::thread::sleep(Duration::from_millis(TTL_MS + 300));
    let mut second = job.spawn("second", None, 15);
    let store = job.store();
    // The takeover writes its claim, then its fence: wait for both (on S3 the fence can lag the
    // claim by a request).
    wait_for("the second process to take over", Duration::from_secs(30), || {
        store.read_lease().ok().flatten().is_some_and(|r| r.epoch == 2)
            && store.read_fences().ok().is_some_and(|f| f.contains_key(&2))
    });
    let fence = *store.read_fences().unwrap().get(&2).expect("the fence of epoch 2");
    // Let the new holder commit past its fence, then wake the old one while it still runs.
    wait_for("the second process to plan past its fence", Duration::from_secs(30), || {
        store.read_plan(BatchId(fence.0 + 2)).is_ok()
    });
    assert!(second.try_wait().unwrap().is_none(), "the second process must still run when the first wakes");
    signal(&first, "CONT");
    let status = wait_exit(&mut first, Duration::from_secs(20));
    let err = job.stderr("first");
    assert!(!status.success(), "the stale holder must fail: {err}");
    assert!(
        err.contains("lost the lease") && err.contains("epoch 2"),
        "a clear error naming the new holder: {err}"
    );
    // Audited once right away, while the paused epoch's objects are still around (the new
    // holder's retention removes old ones as it goes), and once at the end.
    let mid = audit(&store, 1);
    let status = wait_exit(&mut second, Duration::from_secs(60));
    assert!(status.success(), "the new holder finishes: {}", job.stderr("second"));
    let left = audit(&store, 1);
    eprintln!(
        "{}: SIGSTOP past the TTL: fence at batch {fence}; objects of the paused epoch (all below it): {mid} when it stopped, {left} at the end",
        job.ckpt
    );
    check_result(job);
}

fn params() -> JobParams {
    JobParams { batches: 40, rate: 90, keys: 13 }
}

#[test]
fn local_disk_fence() {
    let dir = tempfile::tempdir().unwrap();
    let at = |s: &str| format!("file://{}", dir.path().join(s).display());
    frozen_holder_resumes_after_a_takeover(&Job::new(at("frozen"), Vec::new(), params()));
    sigstopped_holder_resumes_while_the_new_one_runs(&Job::new(at("stopped"), Vec::new(), params()));
}

#[test]
fn s3_fence() {
    let s = S3Server::start();
    s.set_env();
    s.create_bucket("fence");
    frozen_holder_resumes_after_a_takeover(&Job::new("s3://fence/frozen".into(), s.env(), params()));
    sigstopped_holder_resumes_while_the_new_one_runs(&Job::new(
        "s3://fence/stopped".into(),
        s.env(),
        params(),
    ));
}

fn plan(b: u64, end: u64) -> BatchPlan {
    BatchPlan {
        batch_id: BatchId(b),
        batch_time_ms: b as i64,
        planned_at_ms: 0,
        sources: vec![SourcePlan {
            source: "s".into(),
            ranges: vec![OffsetRange { partition: "0".into(), start: b, end }],
        }],
        previous_commit: None,
        previous_plan: None,
        epoch: 0,
    }
}

/// A write whose first attempt landed but reported an error is retried by the store; the retry
/// finds the object and must recognise it as its own (same owner or content), not report a lost
/// race, a conflict or a lost lease.
#[test]
fn retried_conditional_writes_that_landed_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let (inner, root) = cairn::checkpoint::store::open_store(dir.path().to_str().unwrap()).unwrap();
    let faulty = FaultyStore::new(inner, "");
    let store = CheckpointStore::with_store(faulty.clone(), root, "faulty");
    // The claim of epoch 1, then its fence record: both land, both replies are lost.
    faulty.land_then_fail_next(1);
    let lease = store.acquire_lease(Duration::from_secs(5)).expect("a claim that landed is ours");
    assert_eq!(lease.epoch(), 1);
    drop(lease);
    let before = faulty.puts();
    // Epoch 2: the fence put is the 2nd affected put after the claim; make both land-then-fail.
    faulty.land_then_fail_next(2);
    let lease = store.acquire_lease(Duration::from_secs(5)).expect("claim and fence that landed are ours");
    assert_eq!(lease.epoch(), 2);
    assert!(faulty.puts() >= before + 4, "both writes were retried");
    for (what, f) in [
        (
            "plan",
            Box::new(|| store.write_plan(&plan(0, 5)).map(|_| ()))
                as Box<dyn Fn() -> cairn::checkpoint::Result<()>>,
        ),
        (
            "commit",
            Box::new(|| {
                store
                    .write_commit(&cairn::checkpoint::BatchCommit {
                        batch_id: BatchId(0),
                        committed_at_ms: 0,
                        input_records: 5,
                        processing_ms: 0,
                        epoch: 0,
                    })
                    .map(|_| ())
            }),
        ),
    ] {
        faulty.land_then_fail_next(1);
        f().unwrap_or_else(|e| panic!("{what}: a retried write that landed must succeed: {e}"));
    }
    assert_eq!(store.read_plan(BatchId(0)).unwrap().epoch, 2, "stamped with the holder's epoch");
    assert_eq!(store.read_commit(BatchId(0)).unwrap().epoch, 2);
    // Control: another writer's different plan is still a conflict.
    assert!(matches!(store.write_plan(&plan(0, 6)), Err(Error::Conflict { .. })));
    lease.release().unwrap();
}

/// A holder paused between its fence check and its write (the commit hook plays the pause) whose
/// write then fails (here: the disk is full; in the wild, the new holder's objects are there or
/// already gone) hears that it lost the lease, naming the new holder, not the storage error.
#[test]
fn a_write_failing_after_a_takeover_reports_the_lost_lease() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let (inner, root) = cairn::checkpoint::store::open_store(loc).unwrap();
    let faulty = FaultyStore::new(inner, "");
    let old = CheckpointStore::with_store(faulty.clone(), root, "faulty");
    let lease = old.acquire_lease(Duration::from_secs(5)).unwrap();
    old.write_plan(&plan(0, 1)).unwrap();
    let new = CheckpointStore::open(loc).unwrap();
    let taken = std::sync::Arc::new(std::sync::Mutex::new(None));
    {
        let (new, taken, faulty) = (new.clone(), taken.clone(), faulty.clone());
        let lease = std::sync::Mutex::new(Some(lease));
        old.set_commit_hook(Some(std::sync::Arc::new(move |name| {
            if name == ObjectName::Plan(BatchId(1)) {
                drop(lease.lock().unwrap().take());
                *taken.lock().unwrap() = Some(new.acquire_lease(Duration::from_secs(5)).unwrap());
                faulty.set_failing(true);
            }
        })));
    }
    let err = old.write_plan(&plan(1, 2)).expect_err("the old holder must stop");
    assert!(matches!(&err, Error::LeaseLost { holder, .. } if holder.contains("epoch 2")), "{err}");
    // Control: the same failing write with the lease still held is the storage error.
    old.set_commit_hook(None);
    taken.lock().unwrap().take().expect("the new holder").release().unwrap();
    faulty.set_failing(false);
    let lease = old.acquire_lease(Duration::from_secs(5)).unwrap();
    old.write_plan(&plan(1, 2)).unwrap();
    faulty.set_failing(true);
    let err = old.write_plan(&plan(2, 3)).expect_err("a full disk");
    assert!(!matches!(err, Error::LeaseLost { .. }), "{err}");
    faulty.set_failing(false);
    lease.release().unwrap();
}

/// On one location, in process: a holder whose epoch was taken over gets `LeaseLost` before it
/// writes; one that slips a plan in after the check (the commit hook plays the pause) stops right
/// after, recovery does not accept that plan, and the new holder replaces it.
#[test]
fn a_fenced_off_holder_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let old = CheckpointStore::open(loc).unwrap();
    let lease = old.acquire_lease(Duration::from_secs(5)).unwrap();
    for b in 0..3 {
        old.write_plan(&plan(b, b + 1)).unwrap();
    }
    // The new holder takes over the moment the old one has checked its lease for plan 3.
    let new = CheckpointStore::open(loc).unwrap();
    let taken = std::sync::Arc::new(std::sync::Mutex::new(None));
    {
        let (new, taken, lease) = (new.clone(), taken.clone(), std::sync::Mutex::new(Some(lease)));
        old.set_commit_hook(Some(std::sync::Arc::new(move |name| {
            if name == ObjectName::Plan(BatchId(3)) {
                // Dropping gives the location back at once (a paused holder's TTL expiring).
                drop(lease.lock().unwrap().take());
                *taken.lock().unwrap() = Some(new.acquire_lease(Duration::from_secs(5)).unwrap());
            }
        })));
    }
    let err = old.write_plan(&plan(3, 4)).expect_err("the old holder must stop");
    assert!(matches!(&err, Error::LeaseLost { holder, .. } if holder.contains("epoch 2")), "{err}");
    old.set_commit_hook(None);
    assert_eq!(old.read_plan(BatchId(3)).unwrap().epoch, 1, "the stale plan landed");
    // Every later commit is refused before it writes.
    let err = old.write_plan(&plan(4, 5)).expect_err("refused");
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert!(old.read_plan(BatchId(4)).is_err(), "nothing written");

    let rec = new.recover().unwrap();
    assert_eq!(rec.replay.iter().map(|p| p.batch_id.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(rec.fenced, vec![ObjectName::Plan(BatchId(3))]);
    assert_eq!(rec.next_batch, BatchId(3));
    // The new holder's own plan 3 (different input) replaces the stale one.
    new.write_plan(&plan(3, 9)).unwrap();
    let p3 = new.read_plan(BatchId(3)).unwrap();
    assert_eq!((p3.epoch, p3.sources[0].ranges[0].end), (2, 9));
    assert!(new.recover().unwrap().fenced.is_empty());
    let held = taken.lock().unwrap().take().expect("the new holder");
    held.release().unwrap();
}
