//! `cairn-bench ingest`: HTTP ingest on loopback. Clients POST requests of records to a job's
//! `http_ingest_stream` as fast as the answers come back (each client one request at a time on
//! a kept-alive connection), and the benchmark reports the records acknowledged per second and
//! the acknowledgement latency (p50, p99), with the write-ahead log on a local directory and in
//! memory (the same path without the disk), measured in one run.

use crate::BoxError;
use cairn::StreamingContext;
use cairn_web::{HttpIngest, IngestConfig};
use clap::Args;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub(crate) struct IngestArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Records per request.
    #[arg(long, default_value_t = 100)]
    records: usize,
    /// Batch interval of the job, in milliseconds (an acknowledgement waits for the next batch).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Seconds each configuration is measured.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A short run (2 s each).
    #[arg(long)]
    quick: bool,
}

struct Measured {
    records_per_s: f64,
    requests: usize,
    p50_ms: f64,
    p99_ms: f64,
    refused: usize,
}

/// One request on a kept-alive connection; the status code.
fn request(conn: &mut TcpStream, body: &[u8]) -> Result<u16, BoxError> {
    let head = format!(
        "POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    // Headers, then a Content-Length body.
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err("the server closed the connection".into());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok(status)
}

fn measure(location: &str, a: &IngestArgs, seconds: u64) -> Result<Measured, BoxError> {
    let ctx = StreamingContext::builder()
        .checkpoint(location)
        .app_name("ingest-bench")
        .batch_interval(Duration::from_millis(a.interval_ms))
        .build()?;
    let cfg = IngestConfig { max_pending: 1_000_000, ..IngestConfig::default() };
    let (server, events) = ctx.http_ingest_stream_with("events", "127.0.0.1:0", cfg)?;
    events.count().foreach_batch(|_, _| Ok(()));
    ctx.start()?;
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let body: String = (0..a.records).map(|i| format!("event-{i:08}\n")).collect();
    let clients: Vec<_> = (0..a.clients)
        .map(|_| {
            let (stop, body) = (stop.clone(), body.clone());
            std::thread::spawn(move || -> Result<(Vec<f64>, usize), String> {
                let mut conn = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                conn.set_nodelay(true).map_err(|e| e.to_string())?;
                let (mut latencies, mut refused) = (Vec::new(), 0);
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    match request(&mut conn, body.as_bytes()).map_err(|e| e.to_string())? {
                        200 => latencies.push(t0.elapsed().as_secs_f64() * 1e3),
                        _ => refused += 1,
                    }
                }
                Ok((latencies, refused))
            })
        })
        .collect();
    // The first second is warm-up (recovery, first batches); only what follows is counted.
    std::thread::sleep(Duration::from_secs(1));
    let before = server.counts().0;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let accepted = server.counts().0 - before;
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut refused) = (Vec::new(), 0);
    for c in clients {
        let (l, r) = c.join().map_err(|_| "a client panicked")??;
        latencies.extend(l);
        refused += r;
    }
    ctx.stop();
    ctx.await_termination()?;
    drop(server);
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Measured {
        records_per_s: accepted as f64 / elapsed,
        requests: latencies.len(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        refused,
    })
}

pub(crate) fn ingest(a: IngestArgs) -> Result<(), BoxError> {
    let seconds = if a.quick { 2 } else { a.seconds };
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("ckpt");
    println!(
        "HTTP ingest on loopback: {} clients, {} records per request (~16 bytes each), one request at a time per client on a kept-alive connection; batch interval {} ms; {seconds} s per row after 1 s of warm-up",
        a.clients, a.records, a.interval_ms
    );
    let on = measure(disk.to_str().ok_or("temp dir is not UTF-8")?, &a, seconds)?;
    let off = measure("memory://", &a, seconds)?;
    println!(
        "{:<28} {:>14} {:>10} {:>10} {:>10} {:>9}",
        "write-ahead log", "records/s", "requests", "p50 ms", "p99 ms", "refused"
    );
    for (name, m) in [("on (local directory)", &on), ("off (in memory)", &off)] {
        println!(
            "{name:<28} {:>14.0} {:>10} {:>10.1} {:>10.1} {:>9}",
            m.records_per_s, m.requests, m.p50_ms, m.p99_ms, m.refused
        );
    }
    println!("ratio log on / off: {:.2}", on.records_per_s / off.records_per_s.max(1e-9));
    println!(
        "{}",
        serde_json::json!({
            "clients": a.clients, "records_per_request": a.records, "interval_ms": a.interval_ms,
            "wal_on": {"records_per_s": on.records_per_s, "p50_ms": on.p50_ms, "p99_ms": on.p99_ms, "requests": on.requests},
            "wal_off": {"records_per_s": off.records_per_s, "p50_ms": off.p50_ms, "p99_ms": off.p99_ms, "requests": off.requests},
        })
    );
    Ok(())
}
