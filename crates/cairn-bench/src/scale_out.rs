//! `cairn-bench scale-out`: the seed job (`kafka_to_postgres --scale-out`: Kafka → per-key
//! totals → PostgreSQL and a Kafka topic, a checkpoint every batch) on 1, 2 and 3 processes of
//! this machine, and the failover time of a SIGKILLed process split into detection (the group's
//! session timeout), restore and replay, and the first committed batch of a moved task.
//!
//! One run starts nisshi and PostgreSQL on 127.0.0.1, produces the input once, then for each
//! process count runs the job on a fresh local checkpoint directory (shared by the processes,
//! as a network location would be) until PostgreSQL holds every record's count, and checks the
//! totals. The failover run starts two processes, lets them read everything (so every task has
//! its keys in state), SIGKILLs one and reads the survivor's rebalance events. It prints a table
//! and, as its last line, one JSON object.

use crate::BoxError;
use cairn_sim::kafka::KafkaBroker;
use cairn_sim::postgres::PgServer;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub struct ScaleOutArgs {
    /// Records in the input topic.
    #[arg(long, default_value_t = 240_000)]
    records: u64,
    /// Partitions of the input topic: the job's tasks.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Distinct keys per task (the state a moved task restores).
    #[arg(long, default_value_t = 10_000)]
    keys_per_task: u64,
    /// Records per partition per batch.
    #[arg(long, default_value_t = 5_000)]
    max_per_partition: u64,
    /// Batch interval of the job, in ms.
    #[arg(long, default_value_t = 200)]
    batch_ms: u64,
    /// Process counts to measure throughput with.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    processes: Vec<usize>,
    /// The group's session timeout, in ms (nisshi's shortest is 6 000).
    #[arg(long, default_value_t = 6_000)]
    session_ms: u64,
    /// A small version (60 000 records, 1 and 2 processes).
    #[arg(long)]
    quick: bool,
}

struct World {
    broker: KafkaBroker,
    pg: PgServer,
    exe: PathBuf,
    dir: tempfile::TempDir,
    runs: usize,
}

/// The seed job's binary, next to this one.
fn seed_binary() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?.with_file_name("kafka_to_postgres");
    if !exe.exists() {
        return Err(format!(
            "{} is missing: build it with the same profile first (cargo build --release -p cairn-connectors --bin kafka_to_postgres)",
            exe.display()
        )
        .into());
    }
    Ok(exe)
}

fn produce(brokers: &str, records: u64, keys: u64) -> Result<f64, BoxError> {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let t0 = Instant::now();
    for i in 0..records {
        // Spread the keys over the whole range, so every task gets its share early.
        let key = format!("user-{:07}", (i * 7919) % keys);
        let mut rec = Some(BaseRecord::to("in").key(&key).payload("1"));
        while let Some(r) = rec.take() {
            if let Err((e, back)) = p.send(r) {
                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                    return Err(format!("produce: {e}").into());
                }
                p.poll(Duration::from_millis(5));
                rec = Some(back);
            }
        }
    }
    p.flush(Duration::from_secs(120))?;
    Ok(t0.elapsed().as_secs_f64())
}

impl World {
    fn member(&mut self, a: &ScaleOutArgs, location: &Path, log: &Path) -> Result<Child, BoxError> {
        self.runs += 1;
        Ok(Command::new(&self.exe)
            .args([
                &self.broker.bootstrap,
                "in",
                "out",
                &self.pg.conn(),
                location.to_str().ok_or("location is not UTF-8")?,
                &a.max_per_partition.to_string(),
                "--scale-out",
                &format!("--session-timeout-ms={}", a.session_ms),
                &format!("--batch-interval-ms={}", a.batch_ms),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?)
    }

    fn db(&self) -> Result<postgres::Client, BoxError> {
        Ok(postgres::Client::connect(&self.pg.conn(), postgres::NoTls)?)
    }

    /// Records counted in PostgreSQL so far (the table holds a count per key).
    fn counted(&self) -> i64 {
        self.db()
            .and_then(|mut c| {
                Ok(c.query_one("SELECT coalesce(sum(total), 0)::BIGINT FROM totals", &[])?.get(0))
            })
            .unwrap_or(0)
    }

    fn reset(&self) -> Result<(), BoxError> {
        let mut c = self.db()?;
        c.batch_execute("CREATE TABLE IF NOT EXISTS totals (key TEXT PRIMARY KEY, total BIGINT NOT NULL); TRUNCATE totals")?;
        Ok(())
    }
}

fn stop(children: &mut [Child]) {
    for c in children.iter() {
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// The last lines of a member's stderr.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The rebalance events (JSON lines after `rebalance `) in a member's stderr.
fn events(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("rebalance "))
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect()
}

#[allow(clippy::disallowed_methods)] // compared with the members' wall-clock event times
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What the members' logs stored (`member-log {..}` lines in their stderr): (objects, task
/// objects in them).
fn member_logs(logs: &[PathBuf]) -> (u64, u64) {
    let mut sum = (0, 0);
    for log in logs {
        for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
            if let Some(v) = line
                .strip_prefix("member-log ")
                .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            {
                sum.0 += v["objects"].as_u64().unwrap_or(0);
                sum.1 += v["entries"].as_u64().unwrap_or(0);
            }
        }
    }
    sum
}

/// One throughput run.
struct Run {
    /// Seconds from start to the first commit.
    first: f64,
    /// Seconds from the first commit to the last.
    run: f64,
    /// Member log objects the processes stored, and the task objects (plans, deltas) in them.
    log_objects: u64,
    log_entries: u64,
}

/// Runs `n` processes until every record is counted.
fn throughput(w: &mut World, a: &ScaleOutArgs, n: usize) -> Result<Run, BoxError> {
    w.reset()?;
    let loc = w.dir.path().join(format!("ckpt-{n}-{}", w.runs));
    let mut children = Vec::new();
    let logs: Vec<PathBuf> =
        (0..n).map(|i| w.dir.path().join(format!("tp-{n}-{}-{i}.log", w.runs))).collect();
    for log in &logs {
        children.push(w.member(a, &loc, log)?);
    }
    let t0 = Instant::now();
    let mut first = None;
    let (mut last, mut moved_at) = (0, Instant::now());
    loop {
        let c = w.counted();
        if c > 0 && first.is_none() {
            first = Some(t0.elapsed().as_secs_f64());
        }
        if c >= a.records as i64 {
            break;
        }
        if c != last {
            (last, moved_at) = (c, Instant::now());
        }
        if moved_at.elapsed() > Duration::from_secs(60) {
            stop(&mut children);
            let logs: Vec<String> = logs.iter().map(|l| tail(l)).collect();
            return Err(format!(
                "{n} process(es): stuck at {c} of {} records counted for 60 s; the members' last lines:\n{}",
                a.records,
                logs.join("\n---\n")
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let total = t0.elapsed().as_secs_f64();
    stop(&mut children);
    let c = w.counted();
    if c != a.records as i64 {
        return Err(format!("{n} process(es): {c} records counted, {} in the input", a.records).into());
    }
    let first = first.unwrap_or(total);
    let (log_objects, log_entries) = member_logs(&logs);
    Ok(Run { first, run: total - first, log_objects, log_entries })
}

/// Failover split, in ms: (detection, restore and replay, kill to first committed batch of a
/// moved task).
fn failover(w: &mut World, a: &ScaleOutArgs) -> Result<(u64, u64, u64, usize), BoxError> {
    w.reset()?;
    let loc = w.dir.path().join("ckpt-failover");
    let (log_a, log_b) = (w.dir.path().join("fo-a.log"), w.dir.path().join("fo-b.log"));
    let mut survivor = w.member(a, &loc, &log_a)?;
    let mut victim = w.member(a, &loc, &log_b)?;
    let t0 = Instant::now();
    while w.counted() < a.records as i64 {
        if t0.elapsed() > Duration::from_secs(900) {
            stop(&mut [survivor, victim]);
            return Err("failover: the input was not processed in 15 min".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Both members hold tasks once the group settled.
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = wall_ms();
    victim.kill()?;
    victim.wait()?;
    let deadline = Instant::now() + Duration::from_millis(a.session_ms) + Duration::from_secs(60);
    let result = loop {
        let ev = events(&log_a);
        let after: Vec<&serde_json::Value> = ev
            .iter()
            .skip_while(|e| {
                !(e["event"] == "assigned" && e["at_ms"].as_i64().is_some_and(|t| t >= killed_at))
            })
            .collect();
        let assigned = after.first().and_then(|e| e["at_ms"].as_i64());
        let started = after.iter().find(|e| e["event"] == "started").and_then(|e| e["took_ms"].as_u64());
        let moved: Vec<i64> = after
            .first()
            .and_then(|e| e["tasks"].as_array())
            .map(|t| t.iter().filter_map(|x| x.as_i64()).collect())
            .unwrap_or_default();
        let firsts: Vec<u64> = after
            .iter()
            .filter(|e| e["event"] == "first_batch" && e["task"].as_i64().is_some_and(|t| moved.contains(&t)))
            .filter_map(|e| e["since_assigned_ms"].as_u64())
            .collect();
        if let (Some(at), Some(took), false) =
            (assigned, started, moved.is_empty() || firsts.len() < moved.len())
        {
            let first = firsts.iter().copied().max().unwrap_or(0);
            break Ok(((at - killed_at) as u64, took, (at - killed_at) as u64 + first, moved.len()));
        }
        if Instant::now() > deadline {
            break Err(format!("failover: the survivor did not report the moved tasks; its events: {ev:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop(std::slice::from_mut(&mut survivor));
    Ok(result?)
}

pub fn scale_out(mut a: ScaleOutArgs) -> Result<(), BoxError> {
    if a.quick {
        a.records = a.records.min(60_000);
        a.processes.retain(|n| *n <= 2);
    }
    let exe = seed_binary()?;
    let broker = KafkaBroker::start();
    broker.create_topic("in", a.partitions);
    broker.create_topic("out", 1);
    let keys = a.keys_per_task * a.partitions as u64;
    let produce_s = produce(&broker.bootstrap, a.records, keys)?;
    let mut w = World { broker, pg: PgServer::start(), exe, dir: tempfile::tempdir()?, runs: 0 };
    println!(
        "input: {} records, {} partitions (tasks), {} keys per task; produced in {produce_s:.1} s ({:.0} records/s)",
        a.records,
        a.partitions,
        a.keys_per_task,
        a.records as f64 / produce_s
    );
    println!(
        "\nPROCESSES  TO FIRST COMMIT  PROCESSING  RECORDS/S  RATIO TO 1  LOG OBJECTS  TASK OBJECTS PER LOG OBJECT  LOG OBJECTS PER PROCESS-BATCH"
    );
    let mut rows = BTreeMap::new();
    let mut objects = BTreeMap::new();
    for &n in &a.processes {
        let r = throughput(&mut w, &a, n)?;
        let rate = a.records as f64 / r.run;
        let ratio = rows.get(&1).map_or(1.0, |r1: &f64| rate / r1);
        rows.insert(n, rate);
        // Every process plans a batch per interval from its start to its stop.
        let process_batches = n as f64 * (r.first + r.run) * 1e3 / a.batch_ms as f64;
        let per_object = r.log_entries as f64 / r.log_objects.max(1) as f64;
        let per_batch = r.log_objects as f64 / process_batches.max(1.0);
        objects.insert(n, (r.log_objects, r.log_entries, per_batch));
        println!(
            "{n:<10} {:<16.1} {:<11.1} {rate:<10.0} {ratio:<11.2} {:<12} {per_object:<29.1} {per_batch:.2}",
            r.first, r.run, r.log_objects
        );
    }
    let (detect, restore, first, moved) = failover(&mut w, &a)?;
    println!(
        "\nfailover after SIGKILL (1 of 2 processes, {moved} task(s) moved, {} keys each): detection {:.2} s \
         (session timeout {:.1} s), restore + replay {:.2} s, first committed batch of every moved task {:.2} s after the kill",
        a.keys_per_task,
        detect as f64 / 1e3,
        a.session_ms as f64 / 1e3,
        restore as f64 / 1e3,
        first as f64 / 1e3
    );
    let json = serde_json::json!({
        "records": a.records, "partitions": a.partitions, "keys_per_task": a.keys_per_task,
        "records_per_s": rows.iter().map(|(n, r)| (n.to_string(), r.round())).collect::<BTreeMap<_, _>>(),
        "member_logs": objects.iter().map(|(n, (o, e, pb))| (n.to_string(), serde_json::json!({"objects": o, "task_objects": e, "objects_per_process_batch": (pb * 100.0).round() / 100.0}))).collect::<BTreeMap<_, _>>(),
        "failover_ms": {"detection": detect, "restore_replay": restore, "kill_to_first_batch": first, "moved_tasks": moved},
    });
    println!("{json}");
    Ok(())
}
