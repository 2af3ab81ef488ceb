//! Crash tests: a real process running a stateful job with the file sink is killed with SIGKILL
//! at seeded random moments and at every named failpoint, restarted each time, and its committed
//! output and final state are compared with an independently computed answer.

use cairn_sim::{JobParams, Rng};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

struct Dirs {
    _tmp: tempfile::TempDir,
    ckpt: String,
    totals: String,
    windows: String,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = |s: &str| tmp.path().join(s).to_str().expect("utf-8 path").to_string();
    Dirs { ckpt: p("ckpt"), totals: p("out-totals"), windows: p("out-windows"), _tmp: tmp }
}

fn job(d: &Dirs, p: &JobParams, every: u64, parallelism: u64, failpoint: Option<&str>) -> Command {
    job_paced(d, p, every, parallelism, failpoint, 0)
}

fn job_paced(
    d: &Dirs,
    p: &JobParams,
    every: u64,
    parallelism: u64,
    failpoint: Option<&str>,
    pace_ms: u64,
) -> Command {
    job_with(d, p, every, parallelism, failpoint, pace_ms, false)
}

fn job_with(
    d: &Dirs,
    p: &JobParams,
    every: u64,
    parallelism: u64,
    failpoint: Option<&str>,
    pace_ms: u64,
    faults: bool,
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_crash-job"));
    c.args([&d.ckpt, &d.totals, &d.windows])
        .args([p.batches, p.rate, p.keys, every, parallelism].map(|n| n.to_string()))
        .env("CAIRN_LOG", "warn")
        .env("CRASH_JOB_PACE_MS", pace_ms.to_string())
        .env("CRASH_JOB_FAULTS", if faults { "1" } else { "0" })
        .stdout(std::process::Stdio::null());
    match failpoint {
        Some(f) => c.env("CAIRN_FAILPOINT", f),
        None => c.env_remove("CAIRN_FAILPOINT"),
    };
    c
}

fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("crash-job did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run_to_end(d: &Dirs, p: &JobParams, every: u64, parallelism: u64) {
    let mut child = job(d, p, every, parallelism, None).spawn().expect("spawn crash-job");
    let status = wait_timeout(&mut child, Duration::from_secs(120));
    assert!(status.success(), "final run failed: {status}");
}

fn sink_batches(dir: &str) -> Vec<(u64, Vec<String>)> {
    if !Path::new(dir).exists() {
        return Vec::new();
    }
    cairn::read_text_output(dir).expect("read sink output").into_iter().map(|(b, l)| (b.0, l)).collect()
}

fn check_output(d: &Dirs, p: &JobParams) {
    cairn_sim::check_sink_output(&d.totals, &d.windows, p);
    cairn_sim::check_final_state(&d.ckpt, p);
}

#[test]
fn survives_random_sigkills() {
    let kills: u64 = std::env::var("CAIRN_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(25);
    let seed: u64 =
        std::env::var("CAIRN_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x00c0_ffee);
    eprintln!("crash test: {kills} kills, seed {seed} (set CAIRN_CRASH_SEED to reproduce)");
    // Enough batches (at ~3 ms each) that the kills all land before the job could finish.
    let p = JobParams { batches: 400 + 60 * kills, rate: 300, keys: 97 };
    let d = dirs();
    let mut rng = Rng(seed | 1);
    let mut killed_running = 0;
    for i in 0..kills {
        let mut child = job_paced(&d, &p, 1 + i % 3, 1 + i % 3, None, 3).spawn().expect("spawn crash-job");
        let delay = 20 + rng.next_u64() % 400;
        std::thread::sleep(Duration::from_millis(delay));
        match child.try_wait().expect("try_wait") {
            None => killed_running += 1,
            Some(status) => {
                assert!(status.success(), "crash-job failed on its own after restart {i}: {status}")
            }
        }
        child.kill().ok(); // SIGKILL
        child.wait().expect("reap");
    }
    eprintln!("crash test: {killed_running} of {kills} kills hit a running job");
    let done = sink_batches(&d.totals).len();
    assert!(
        done < p.batches as usize,
        "the kills must interrupt the job before it finishes (it did {done} batches)"
    );
    run_to_end(&d, &p, 2, 2);
    check_output(&d, &p);
}

#[test]
fn survives_every_failpoint() {
    let p = JobParams { batches: 12, rate: 200, keys: 31 };
    for fp in cairn::failpoint::ALL {
        let d = dirs();
        let mut child = job(&d, &p, 1, 2, Some(&format!("{fp}@5"))).spawn().expect("spawn crash-job");
        let status = wait_timeout(&mut child, Duration::from_secs(60));
        assert!(!status.success(), "failpoint {fp} must crash the job");
        let before = sink_batches(&d.totals).len();
        assert!(
            before < p.batches as usize,
            "failpoint {fp}: the job must not finish before crashing (it did {before} batches)"
        );
        run_to_end(&d, &p, 1, 2);
        check_output(&d, &p);
    }
}

/// The same kill loop with the checkpoint behind the fault injector (latency spikes, a transient
/// error every 7th write): still exact.
#[test]
fn survives_sigkills_on_a_faulty_store() {
    let p = JobParams { batches: 400, rate: 200, keys: 53 };
    let d = dirs();
    let mut rng = Rng(0x5eed);
    for i in 0..8 {
        let mut child = job_with(&d, &p, 1 + i % 2, 2, None, 3, true).spawn().expect("spawn crash-job");
        std::thread::sleep(Duration::from_millis(150 + rng.next_u64() % 300));
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "crash-job failed on its own: {status}");
        }
        child.kill().ok();
        child.wait().expect("reap");
    }
    let mut child = job_with(&d, &p, 2, 2, None, 0, true).spawn().expect("spawn");
    let status = wait_timeout(&mut child, Duration::from_secs(120));
    assert!(status.success(), "final run on the faulty store: {status}");
    check_output(&d, &p);
}
