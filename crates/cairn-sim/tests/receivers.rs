//! A socket receiver under SIGKILL: a TCP server (this test) sends numbered lines without end
//! while the job (`receiver-job`: `socket_text_stream` into the file sink) is SIGKILLed at seeded
//! moments and restarted, 20 times (`CAIRN_RECEIVER_KILLS` for more; `CAIRN_RECEIVER_SEED`).
//! At the end:
//!
//! - the committed output holds every line of the write-ahead log exactly once, and nothing
//!   else: what the log accepted is processed exactly once;
//! - on each connection, what reached the output is a prefix of what the server sent on it: lines
//!   are lost only at the end of a connection the kill cut (in flight, or received but not yet in
//!   the log), never in the middle; the last connection, stopped gracefully, loses nothing. The
//!   losses are counted and printed, compared with what the server sent, not with the log.

use cairn::checkpoint::CheckpointStore;
use cairn_sim::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_receiver-job");

/// The numbers sent on each connection, in order (a number is recorded before it is written).
type Sent = Arc<Mutex<Vec<Vec<u64>>>>;

/// Accepts connections and sends each one numbered lines (one global sequence) until `stop`;
/// then keeps connections open and idle.
fn serve(listener: TcpListener, sent: Sent, stop: Arc<AtomicBool>, done: Arc<AtomicBool>) {
    let next = Arc::new(AtomicU64::new(0));
    listener.set_nonblocking(true).unwrap();
    while !done.load(Ordering::SeqCst) {
        let Ok((mut conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        conn.set_nonblocking(false).unwrap();
        let (sent, stop, done, next) = (sent.clone(), stop.clone(), done.clone(), next.clone());
        std::thread::spawn(move || {
            let me = {
                let mut s = sent.lock().unwrap();
                s.push(Vec::new());
                s.len() - 1
            };
            while !stop.load(Ordering::SeqCst) {
                let mut chunk = String::new();
                let mut numbers = Vec::new();
                for _ in 0..40 {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    numbers.push(n);
                    chunk.push_str(&format!("{n}\n"));
                }
                sent.lock().unwrap()[me].extend(&numbers);
                if conn.write_all(chunk.as_bytes()).is_err() {
                    return; // the job was killed: this connection is over
                }
                std::thread::sleep(Duration::from_millis(4));
            }
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }
}

fn output_numbers(dir: &std::path::Path) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("part-") && name.ends_with(".txt") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            out.extend(text.lines().map(|l| l.parse::<u64>().unwrap_or_else(|_| panic!("{name}: {l:?}"))));
        }
    }
    out
}

fn start(addr: &str, ckpt: &str, out: &str, log: &std::path::Path) -> Child {
    Command::new(EXE)
        .args([addr, ckpt, out])
        .env("CAIRN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn every_line_the_log_accepted_is_processed_exactly_once_across_sigkills() {
    let kills: usize = std::env::var("CAIRN_RECEIVER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed: u64 = std::env::var("CAIRN_RECEIVER_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x7ec);
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, out) = (dir.path().join("ckpt"), dir.path().join("out"));
    let (ckpt, out) = (ckpt.to_str().unwrap(), out.to_str().unwrap());
    let log = dir.path().join("job.log");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sent: Sent = Arc::default();
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let server = {
        let (sent, stop, done) = (sent.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || serve(listener, sent, stop, done))
    };

    let mut rng = Rng(seed);
    for _ in 0..kills {
        let mut job = start(&addr, ckpt, out, &log);
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 1200));
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job died on its own:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        job.kill().unwrap(); // SIGKILL
        job.wait().unwrap();
    }
    // The last run: it receives a while longer, the server stops sending, and everything sent
    // on its connection must come out before it is stopped gracefully.
    let mut job = start(&addr, ckpt, out, &log);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let last: Vec<u64> = sent.lock().unwrap().last().cloned().unwrap_or_default();
    assert!(!last.is_empty(), "the last run received lines");
    let t0 = Instant::now();
    loop {
        let have: BTreeSet<u64> = output_numbers(std::path::Path::new(out)).into_iter().collect();
        if last.iter().all(|n| have.contains(n)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the last connection's lines never all came out:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(Command::new("kill").args(["-TERM", &job.id().to_string()]).status().unwrap().success());
    let status = job.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM stops the job cleanly: {status}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    done.store(true, Ordering::SeqCst);
    server.join().unwrap();

    // Exactly once: the output is the write-ahead log's lines, each once.
    let output = output_numbers(std::path::Path::new(out));
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for n in &output {
        *counts.entry(*n).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "lines output more than once: {twice:?}");
    let store = CheckpointStore::open(ckpt).unwrap();
    let mut logged = Vec::new();
    for seq in store.wal_blocks("lines").unwrap() {
        for r in store.read_wal_block("lines", seq).unwrap().unwrap().records {
            logged.push(String::from_utf8(r).unwrap().parse::<u64>().unwrap());
        }
    }
    let (mut logged_sorted, mut output_sorted) = (logged.clone(), output.clone());
    logged_sorted.sort_unstable();
    output_sorted.sort_unstable();
    assert_eq!(output_sorted, logged_sorted, "the output is exactly the write-ahead log's lines");

    // Per connection: a prefix reached the output; losses only at the end of killed connections.
    let have: BTreeSet<u64> = output.iter().copied().collect();
    let sent = sent.lock().unwrap();
    let mut lost = 0;
    for (i, conn) in sent.iter().enumerate() {
        let delivered = conn.iter().take_while(|n| have.contains(n)).count();
        assert!(
            conn[delivered..].iter().all(|n| !have.contains(n)),
            "connection {i}: a line after a lost one came out (lost in the middle)"
        );
        lost += conn.len() - delivered;
    }
    let total: usize = sent.iter().map(Vec::len).sum();
    assert!(output.len() > total / 2, "most lines came through: {} of {total}", output.len());
    eprintln!(
        "{kills} SIGKILLs: {total} lines sent on {} connections, {} in the write-ahead log and processed exactly once, {lost} lost at the end of killed connections",
        sent.len(),
        output.len()
    );
}
