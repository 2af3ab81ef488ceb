//! The demo binary end to end: SIGTERM stops it gracefully (final checkpoint, exit 0), SIGKILL
//! loses nothing, and a restart resumes where it left off.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn demo(dir: &std::path::Path, batches: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "--rate", "2000", "--users", "50", "--interval-ms", "50"])
        .args(["--batches", &batches.to_string()])
        .arg("--checkpoint")
        .arg(dir.join("ckpt"))
        .arg("--output")
        .arg(dir.join("out"))
        .env("CAIRN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cairn demo")
}

/// Reads progress lines until `n` batches were printed; returns their ids and replay flags.
fn read_batches(child: &mut Child, n: usize) -> Vec<(u64, bool)> {
    let out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.expect("line");
        let mut words = line.split_whitespace();
        if words.next() == Some("batch") {
            let id: u64 = words.next().and_then(|w| w.parse().ok()).expect("batch id");
            seen.push((id, line.contains("(replayed)")));
            if seen.len() == n {
                break;
            }
        }
    }
    seen
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "demo did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_gracefully_and_sigkill_resumes() {
    let dir = tempfile::tempdir().unwrap();
    // Run until stopped; SIGTERM after 5 batches.
    let mut first = demo(dir.path(), 0);
    let seen = read_batches(&mut first, 5);
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    let status = Command::new("kill").args(["-TERM", &first.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = wait(&mut first);
    assert!(status.success(), "a graceful stop exits 0, got {status}");

    // The restart replays nothing (the final checkpoint covers every batch) and continues.
    let mut second = demo(dir.path(), 0);
    let seen = read_batches(&mut second, 3);
    assert!(seen[0].0 >= 5, "resumes after the batches already done: {seen:?}");
    assert!(seen.iter().all(|s| !s.1), "nothing to replay after a graceful stop: {seen:?}");
    second.kill().unwrap(); // SIGKILL
    wait(&mut second);

    // After SIGKILL the next run finishes the job; every batch's output exists exactly once.
    let mut third = demo(dir.path(), 20);
    let status = wait(&mut third);
    assert!(status.success(), "{status}");
    let out = cairn::read_text_output(dir.path().join("out").to_str().unwrap()).unwrap();
    assert_eq!(out.iter().map(|(b, _)| b.0).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
    assert!(out.iter().all(|(_, lines)| lines.len() == 2000), "every batch has one line per record");
}
