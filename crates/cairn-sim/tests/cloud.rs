//! The checkpoint store and a stateful job against real object-store APIs on 127.0.0.1 — S3
//! (moto) and Azure Blob (Azurite) — with one suite: storage conformance, conditional create
//! racing from 8 writers, a kill/recover cycle with exact results, and two jobs on one location.

use cairn::checkpoint::object_store::{path::Path as ObjPath, ObjectStore, PutMode, PutOptions, PutPayload};
use cairn::checkpoint::{BatchId, BatchPlan, CheckpointStore, OffsetRange, SourcePlan};
use cairn::StreamingContext;
use cairn_sim::azure::AzuriteServer;
use cairn_sim::s3::S3Server;
use cairn_sim::JobParams;
use futures::TryStreamExt;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// S3: object_store reads the server from process-wide AWS_* variables.
#[test]
fn s3_suite() {
    let s = S3Server::start();
    s.set_env();
    s.create_bucket("cairn");
    conformance_and_racing_conditional_creates("s3://cairn");
    a_job_survives_kills_exactly_and_a_second_job_is_refused("s3://cairn", s.env());
    requests_per_batch_against_the_server("s3://cairn/count");
}

/// Requests a job makes against the S3 server, per batch (figures for docs/storage.md).
fn requests_per_batch_against_the_server(loc: &str) {
    let (store, root) = cairn::checkpoint::store::open_store(loc).unwrap();
    let counting = cairn_sim::FaultyStore::new(store, "");
    let ctx = StreamingContext::builder()
        .checkpoint_store(CheckpointStore::with_store(counting.clone(), root, loc))
        .batch_interval(cairn_sim::INTERVAL)
        .trigger(cairn::Trigger::AvailableNow)
        .stop_after_batches(50)
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = JobParams { batches: 50, rate: 100, keys: 11 };
    let (t, w) = (tmp.path().join("t"), tmp.path().join("w"));
    cairn_sim::define_job(&ctx, &p, t.to_str().unwrap(), w.to_str().unwrap()).unwrap();
    let summary = ctx.run_available().unwrap();
    let r = counting.requests();
    let per = |n: u64| n as f64 / 50.0;
    eprintln!(
        "S3 requests per batch (checkpoint every batch, {} checkpoint objects): PUT {:.2}, GET {:.2}, HEAD {:.2}, LIST {:.2}, DELETE {:.2}",
        summary.checkpoint_objects,
        per(r.put),
        per(r.get),
        per(r.head),
        per(r.list),
        per(r.delete)
    );
    // HEAD: the torn-write check of each plan and checkpoint; GET: mostly the fence's lease checks.
    assert!(per(r.put) <= 2.3 && per(r.list) <= 2.1 && per(r.head) <= 2.1 && per(r.get) <= 6.0, "{r:?}");
    cairn_sim::check_sink_output(t.to_str().unwrap(), w.to_str().unwrap(), &p);
}

/// The same suite on local disk (the kill cycle runs against a `file://` URL).
#[test]
fn local_disk_suite() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!("file://{}", dir.path().display());
    conformance_and_racing_conditional_creates(&base);
    a_job_survives_kills_exactly_and_a_second_job_is_refused(&base, Vec::new());
}

/// The storage conformance part on the in-memory store (no processes can share it).
#[test]
fn in_memory_conformance() {
    conformance_and_racing_conditional_creates("memory://");
}

/// Azure Blob: object_store reads the emulator from AZURE_* variables (other names than S3's, so
/// the two tests can run side by side).
#[test]
fn azure_suite() {
    let a = AzuriteServer::start();
    a.set_env();
    a.create_container("cairn");
    conformance_and_racing_conditional_creates("az://cairn");
    a_job_survives_kills_exactly_and_a_second_job_is_refused("az://cairn", a.env());
}

fn plan(b: u64) -> BatchPlan {
    BatchPlan {
        batch_id: BatchId(b),
        batch_time_ms: b as i64,
        planned_at_ms: 0,
        sources: vec![SourcePlan {
            source: "s".into(),
            ranges: vec![OffsetRange { partition: "0".into(), start: b, end: b + 1 }],
        }],
        previous_commit: None,
        previous_plan: None,
        epoch: 0,
    }
}

fn conformance_and_racing_conditional_creates(base: &str) {
    let store = CheckpointStore::open(&format!("{base}/jobs/a")).expect("open the location");
    let os = store.object_store().clone();
    let rt = |f| store.block_on(f);
    // put / get / list / delete under the prefix.
    let p = ObjPath::from("jobs/a/x/one");
    rt(os.put(&p, PutPayload::from_static(b"1"))).unwrap();
    let got = store.block_on(async { os.get(&p).await?.bytes().await }).unwrap();
    assert_eq!(&got[..], b"1");
    let listed: Vec<_> =
        store.block_on(os.list(Some(&ObjPath::from("jobs/a/x"))).try_collect::<Vec<_>>()).unwrap();
    assert_eq!(listed.len(), 1);
    store.block_on(os.delete(&p)).unwrap();
    assert!(store.block_on(os.get(&p)).is_err(), "deleted");

    // The checkpoint protocol's own conditional writes.
    assert_eq!(store.write_plan(&plan(0)).unwrap().objects, 1);
    assert_eq!(store.write_plan(&plan(0)).unwrap().objects, 0, "identical re-log accepted");
    let mut other = plan(0);
    other.sources[0].ranges[0].end = 99;
    assert!(store.write_plan(&other).is_err(), "a different plan for a logged batch is a conflict");

    // 8 writers race a conditional create, 20 rounds: exactly one wins each round.
    for round in 0..20 {
        let path = ObjPath::from(format!("jobs/a/race/{round}"));
        let barrier = Arc::new(Barrier::new(8));
        let results: Vec<(usize, Result<(), String>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|w| {
                    let (os, path, barrier, store) =
                        (os.clone(), path.clone(), barrier.clone(), store.clone());
                    sc.spawn(move || {
                        barrier.wait();
                        let r = store.block_on(os.put_opts(
                            &path,
                            PutPayload::from(format!("writer {w}").into_bytes()),
                            PutOptions::from(PutMode::Create),
                        ));
                        (w, r.map(|_| ()).map_err(|e| e.to_string()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stored = store.block_on(async { os.get(&path).await?.bytes().await }).unwrap();
        let owner: usize =
            std::str::from_utf8(&stored).unwrap().trim_start_matches("writer ").parse().unwrap();
        let winners: Vec<usize> = results.iter().filter(|(_, r)| r.is_ok()).map(|(w, _)| *w).collect();
        // The client retries a create whose reply was lost; the retry then reads "already
        // exists" although that writer won. So: at most one success, it is the stored writer,
        // and every loser was told the object exists.
        assert!(winners.len() <= 1, "round {round}: {} conditional creates succeeded", winners.len());
        assert!(winners.iter().all(|w| *w == owner), "round {round}: the stored object is not the winner's");
        for (w, r) in &results {
            if let Err(e) = r {
                assert!(
                    e.to_lowercase().contains("exist") || e.contains("412") || e.contains("409"),
                    "round {round}: writer {w}: {e}"
                );
            }
        }
        let winners = usize::from(winners.len() == 1 || results.iter().any(|(w, _)| *w == owner));
        assert_eq!(winners, 1, "round {round}: exactly one conditional create wins");
    }
}

fn a_job_survives_kills_exactly_and_a_second_job_is_refused(base: &str, env: Vec<(&'static str, String)>) {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = &format!("{base}/crash");
    let totals = tmp.path().join("totals").to_str().unwrap().to_string();
    let windows = tmp.path().join("windows").to_str().unwrap().to_string();
    let p = JobParams { batches: 300, rate: 120, keys: 13 };
    let job = |pace: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_crash-job"));
        c.args([ckpt, &totals, &windows])
            .args([p.batches, p.rate, p.keys, 1, 2].map(|n| n.to_string()))
            .envs(env.clone())
            .env("CAIRN_LOG", "warn")
            .env("CRASH_JOB_PACE_MS", pace)
            .env_remove("CAIRN_FAILPOINT")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    let mut interrupted = 0;
    for i in 0..6u64 {
        let mut child = job("8").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(400 + 120 * i));
        match child.try_wait().unwrap() {
            Some(status) => assert!(status.success(), "crash-job failed on its own: {status}"),
            None => interrupted += 1,
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
    }
    assert!(interrupted >= 4, "the kills must land while the job runs ({interrupted} of 6 did)");
    let status = job("0").status().unwrap();
    assert!(status.success(), "final run: {status}");
    cairn_sim::check_sink_output(&totals, &windows, &p);
    cairn_sim::check_final_state(ckpt, &p);

    // Two jobs, one location: the second is refused, the first keeps going.
    let make = |l: &str| {
        let ctx =
            StreamingContext::builder().checkpoint(l).batch_interval(Duration::from_millis(50)).build()?;
        let g = ctx.generator("g", 1, 10, |_, o| (o % 3, 1u64))?;
        g.update_state_by_key("c", |_, v: Vec<u64>, o: Option<u64>| Some(o.unwrap_or(0) + v.len() as u64))
            .foreach_batch(|_, _| Ok(()));
        Ok(ctx)
    };
    let loc = &format!("{base}/two-writers");
    let first = StreamingContext::get_or_create(loc, make).unwrap();
    first.start().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let err = StreamingContext::get_or_create(loc, make).err().expect("second job refused").to_string();
    assert!(err.contains("in use by another process"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    first.stop();
    let summary = first.await_termination().unwrap();
    assert!(summary.new_batches >= 5, "the first kept going: {summary:?}");
    let v = cairn::checkpoint::admin::verify(&CheckpointStore::open(loc).unwrap()).unwrap();
    assert!(v.ok, "nothing in the location is corrupted: {v:?}");
}

/// S3 goes away for ~5 s mid-job (a proxy in front of moto drops every connection and refuses
/// new ones; moto itself keeps its data): the same job waits it out, restarting in place, and
/// its output is exactly the model's.
#[test]
fn an_s3_outage_is_ridden_out_exactly() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let s = S3Server::start();
    s.create_bucket("cairn");
    let proxy = Arc::new(cairn_sim::proxy::TcpProxy::start(s.port()));
    s.set_env();
    std::env::set_var("AWS_ENDPOINT", proxy.endpoint());
    let tmp = tempfile::tempdir().unwrap();
    let (totals, windows) = (tmp.path().join("totals"), tmp.path().join("windows"));
    let (totals, windows) = (totals.to_str().unwrap(), windows.to_str().unwrap());
    let p = JobParams { batches: 60, rate: 100, keys: 11 };
    let ctx = StreamingContext::builder()
        .batch_interval(cairn_sim::INTERVAL)
        .checkpoint("s3://cairn/outage")
        .trigger(cairn::Trigger::AvailableNow)
        .stop_after_batches(p.batches)
        .build()
        .unwrap();
    cairn_sim::define_job(&ctx, &p, totals, windows).unwrap();
    #[derive(Default)]
    struct Restarts(AtomicU64);
    impl cairn::StreamingListener for Restarts {
        fn on_restart_scheduled(&self, e: &cairn::RestartScheduled) {
            self.0.fetch_add(1, Ordering::SeqCst);
            eprintln!("restart {}: {}", e.restart, e.cause);
        }
    }
    let seen = Arc::new(Restarts::default());
    ctx.add_listener(seen.clone());
    let (cut, once) = (proxy.clone(), AtomicBool::new(false));
    let back = Arc::new(std::sync::Mutex::new(None));
    let b = back.clone();
    ctx.on_batch(move |batch| {
        if batch.batch_id.0 == 20 && !once.swap(true, Ordering::SeqCst) {
            cut.set_down(true);
            let cut = cut.clone();
            *b.lock().unwrap() = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(5));
                cut.set_down(false);
            }));
        }
    });
    let summary = ctx.run_available().expect("the S3 outage is waited out");
    back.lock().unwrap().take().expect("the proxy went down").join().unwrap();
    assert!(summary.restarts >= 1 && seen.0.load(Ordering::SeqCst) == summary.restarts, "{summary:?}");
    eprintln!("a 5 s S3 outage: {} restart(s)", summary.restarts);
    cairn_sim::check_sink_output(totals, windows, &p);
}
