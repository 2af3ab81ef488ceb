//! The seed job scaled out, against real parts only: nisshi (Kafka protocol, consumer group),
//! PostgreSQL, and moto as the shared S3 checkpoint location, all on 127.0.0.1. Several
//! processes of `kafka_to_postgres --scale-out` share a 12-partition topic; members are
//! SIGKILLed, added, stopped with SIGTERM, and paused with SIGSTOP past the session timeout then
//! resumed, in a seeded loop while the job runs. At the end the table and the output topic are
//! compared with what the input alone implies, and the commit audit (`cairn_sink_commits`: who
//! committed which task batch in which epoch) shows that every task batch was committed once and
//! that no process committed for a task after a newer owner had.
//!
//! `CAIRN_SCALE_EVENTS` sets the number of events (default 20), `CAIRN_SCALE_SEED` their seed,
//! `CAIRN_SCALE_KEEP_LOGS=1` keeps the members' logs of a run that passed.

mod support;
use cairn_sim::kafka::KafkaBroker;
use cairn_sim::kafka_log::{committed_records, read_partition_log};
use cairn_sim::postgres::PgServer;
use cairn_sim::s3::S3Server;
use cairn_sim::tools::http_get;
use cairn_sim::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::input;

const EXE: &str = env!("CARGO_BIN_EXE_kafka_to_postgres");
const TASKS: i32 = 12;
/// Records per partition per batch: batch `b` of task `p` reads offsets `[b*MAX, (b+1)*MAX)` of
/// partition `p`, whoever runs it, so the output is known in advance.
const MAX: u64 = 3;
const BATCH_MS: u64 = 1000;
/// nisshi's shortest session timeout.
const SESSION_MS: u64 = 6000;

/// The output lines (`<task batch>:<key>:<total>`, for the keys a batch touched) and the final
/// totals. A key lives in one partition, so its lines are those of its task's batches, each
/// with the partition it belongs in.
fn expected(input: &BTreeMap<i32, Vec<String>>) -> (Vec<(String, i32)>, BTreeMap<String, i64>) {
    let mut totals = BTreeMap::new();
    let mut lines = Vec::new();
    for (p, keys) in input {
        for (b, chunk) in keys.chunks(MAX as usize).enumerate() {
            let mut touched = BTreeSet::new();
            for k in chunk {
                *totals.entry(k.clone()).or_insert(0i64) += 1;
                touched.insert(k.clone());
            }
            lines.extend(touched.iter().map(|k| (format!("{b}:{k}:{}", totals[k]), *p)));
        }
    }
    lines.sort();
    (lines, totals)
}

/// One process of the job, its stderr kept in a file.
struct Member {
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Member {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig} {}", self.child.id());
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.stopped {
            self.signal("-CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    broker: KafkaBroker,
    pg: PgServer,
    s3: S3Server,
    logs: tempfile::TempDir,
    started: usize,
}

impl World {
    fn start(records: u32) -> Self {
        let broker = KafkaBroker::start();
        let pg = PgServer::start();
        let s3 = S3Server::start();
        s3.create_bucket("cairn-scale");
        broker.create_topic("in", TASKS);
        broker.create_topic("out", TASKS);
        let status = Command::new(EXE)
            .args(["produce", &broker.bootstrap, "in", &records.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        Self {
            broker,
            pg,
            s3,
            logs: tempfile::Builder::new().prefix("cairn-scale-out-").tempdir().unwrap(),
            started: 0,
        }
    }

    fn member(&mut self) -> Member {
        self.member_serving(None)
    }

    /// A member, serving its metrics and page on `http` when given.
    fn member_serving(&mut self, http: Option<u16>) -> Member {
        self.started += 1;
        let log = self.logs.path().join(format!("member-{}.log", self.started));
        let mut c = Command::new(EXE);
        c.args([
            &self.broker.bootstrap,
            "in",
            "out",
            &self.pg.conn(),
            "s3://cairn-scale/job",
            &MAX.to_string(),
            "--scale-out",
            &format!("--session-timeout-ms={SESSION_MS}"),
            &format!("--batch-interval-ms={BATCH_MS}"),
        ]);
        if let Some(port) = http {
            c.arg(format!("--http=127.0.0.1:{port}"));
        }
        c.envs(self.s3.env());
        c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        Member { child: c.spawn().unwrap(), log, stopped: false }
    }

    fn db(&self) -> postgres::Client {
        postgres::Client::connect(&self.pg.conn(), postgres::NoTls).unwrap()
    }

    /// The newest committed task batch per task (from the progress rows).
    fn progress(&self) -> BTreeMap<i32, i64> {
        let Ok(rows) =
            self.db().query("SELECT task, batch_id FROM cairn_sink_progress WHERE sink = 'totals'", &[])
        else {
            return BTreeMap::new();
        };
        rows.iter().filter_map(|r| Some((r.get::<_, Option<i32>>(0)?, r.get(1)))).collect()
    }
}

/// Where a copy of an output line is: partition, producer id, producer epoch, offset.
type LineCopy = (i32, i64, i16, i64);

/// A scaled-out member's own view (its `/metrics` and `/api/progress`) agrees with itself: it
/// runs at least one task, `cairn_tasks` counts exactly the tasks whose series it serves, the
/// page lists the same tasks with their epochs, and the rebalance that gave them is counted.
fn check_process_view(port: u16, member: &Member) {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
        let (Some(metrics), Some(page)) = (http_get(port, "/metrics"), http_get(port, "/api/progress"))
        else {
            last = "no answer".into();
            continue;
        };
        let value = |prefix: &str| {
            metrics.lines().find_map(|l| l.strip_prefix(prefix)?.trim().parse::<f64>().ok()).unwrap_or(-1.0)
        };
        let app = "{app=\"kafka-to-postgres\"}";
        let owned = value(&format!("cairn_tasks{app}"));
        let labelled: BTreeSet<u64> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("cairn_task_epoch{app=\"kafka-to-postgres\",task=\""))
            .filter_map(|l| l.split('"').next()?.parse().ok())
            .collect();
        let page: serde_json::Value = serde_json::from_str(&page).unwrap();
        let listed: BTreeSet<u64> =
            page["tasks"].as_array().unwrap().iter().filter_map(|t| t["task"].as_u64()).collect();
        let epochs_known = page["tasks"].as_array().unwrap().iter().all(|t| t["epoch"].as_u64().is_some());
        if owned >= 1.0
            && labelled.len() as f64 == owned
            && labelled == listed
            && epochs_known
            && page["scaled_out"] == true
            && value(&format!("cairn_task_assignments_total{app}")) >= 1.0
            && value(&format!("cairn_task_start_seconds_count{app}")) >= 1.0
        {
            eprintln!("member {} serves its {} task(s): {listed:?}", member.pid(), listed.len());
            return;
        }
        last = format!(
            "cairn_tasks {owned}, series for {labelled:?}, page lists {listed:?}:\n{metrics}\n{page}"
        );
    }
    panic!(
        "member {}'s metrics and page never agreed on its tasks: {last}\n{}",
        member.pid(),
        tail(&member.log)
    );
}

/// What the members' rebalance lines say about task starts: how many, and the median and longest
/// time from an assignment to the tasks running (restore and replay) and to a moved task's first
/// committed batch. Printed, not asserted: a loaded machine stretches them, and timings are for
/// the benchmarks to judge.
fn rebalance_summary(dir: &Path) -> String {
    let mut started = Vec::new();
    let mut first = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let Some(json) = line.strip_prefix("rebalance ") else { continue };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else { continue };
            match v["event"].as_str() {
                Some("started") => started.extend(v["took_ms"].as_u64()),
                Some("first_batch") => first.extend(v["since_assigned_ms"].as_u64()),
                _ => {}
            }
        }
    }
    let stats = |v: &mut Vec<u64>| {
        v.sort_unstable();
        match v.last() {
            Some(max) => format!("{} (median {} ms, longest {max} ms)", v.len(), v[v.len() / 2]),
            None => "0".to_string(),
        }
    };
    format!("task starts {}; first batches {}", stats(&mut started), stats(&mut first))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn scaled_out_job_survives_kills_pauses_and_scaling_exactly() {
    let events: usize = std::env::var("CAIRN_SCALE_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    // Enough input that the job is still busy when the last event happens: about 3 s of the
    // loop per event, each task reading MAX records per second.
    let per_partition = (events as u64 * 4 + 30) * MAX;
    let mut world = World::start((per_partition * TASKS as u64) as u32);
    let input = input(&world.broker.bootstrap);
    let last_batch: BTreeMap<i32, i64> =
        input.iter().map(|(p, keys)| (*p, (keys.len() as u64).div_ceil(MAX) as i64 - 1)).collect();
    let done = |w: &World| {
        let p = w.progress();
        last_batch.iter().all(|(t, last)| p.get(t).is_some_and(|b| b >= last))
    };
    // The first member also serves its metrics and page.
    let port = cairn_sim::tools::free_port();
    let mut members: Vec<Member> = vec![world.member_serving(Some(port)), world.member(), world.member()];
    let t0 = Instant::now();
    while world.progress().len() < TASKS as usize {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "not every task committed a batch in 90 s:\n{}",
            tail(&members[0].log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("all {TASKS} tasks running after {:.1} s", t0.elapsed().as_secs_f64());
    check_process_view(port, &members[0]);

    // The scripted events first (kill one, add a fourth, pause one past the session timeout),
    // then seeded random ones, keeping two to four members.
    let seed = std::env::var("CAIRN_SCALE_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5ca1e);
    let mut rng = Rng(seed);
    let mut log = Vec::new();
    for i in 0..events {
        let kind = match i {
            0 => 0,
            1 => 1,
            2 => 3,
            _ => rng.next_u64() % 4,
        };
        let pick = rng.next_u64() as usize % members.len();
        match kind {
            0 if members.len() > 2 => {
                let m = members.remove(pick);
                m.signal("-KILL");
                log.push(format!("SIGKILL pid {}", m.pid()));
            }
            1 | 0 if members.len() < 4 => {
                let m = world.member();
                log.push(format!("start pid {}", m.pid()));
                members.push(m);
            }
            2 if members.len() > 2 => {
                let mut m = members.remove(pick);
                m.signal("-TERM");
                let status = m.child.wait().unwrap();
                assert!(
                    status.success(),
                    "a member stopped with SIGTERM exits cleanly: {status}\n{}",
                    tail(&m.log)
                );
                log.push(format!("SIGTERM pid {} (exited)", m.pid()));
            }
            _ => {
                let m = &mut members[pick];
                m.signal("-STOP");
                m.stopped = true;
                std::thread::sleep(Duration::from_millis(SESSION_MS + 3000));
                m.signal("-CONT");
                m.stopped = false;
                log.push(format!("SIGSTOP pid {} for {} ms, then SIGCONT", m.pid(), SESSION_MS + 3000));
            }
        }
        for m in &mut members {
            if let Some(status) = m.child.try_wait().unwrap() {
                panic!(
                    "member {} exited on its own ({status}) after events {log:?}:\n{}",
                    m.pid(),
                    tail(&m.log)
                );
            }
        }
        std::thread::sleep(Duration::from_millis(1000 + rng.next_u64() % 3000));
    }
    let busy_at_last_event = !done(&world);
    eprintln!("{} events in {:.0} s: {log:#?}", log.len(), t0.elapsed().as_secs_f64());

    // The members work through the rest of the input at about a batch per second per task, slower
    // while the group settles: wait as long as the tasks keep committing, and fail when none did
    // for a minute (a stuck task) or the whole wait passes ten minutes.
    let t1 = Instant::now();
    let (mut last_progress, mut moved_at) = (world.progress(), Instant::now());
    while !done(&world) {
        let now = world.progress();
        if now != last_progress {
            (last_progress, moved_at) = (now, Instant::now());
        }
        if moved_at.elapsed() > Duration::from_secs(60) || t1.elapsed() > Duration::from_secs(600) {
            let exited: Vec<String> = members
                .iter_mut()
                .filter_map(|m| m.child.try_wait().unwrap().map(|s| format!("pid {} {s}", m.pid())))
                .collect();
            let kept = std::mem::replace(&mut world.logs, tempfile::tempdir().unwrap()).keep();
            panic!(
                "the job stopped making progress (or took over 10 min) after the last event; progress {:?}, wanted {last_batch:?}; exited: {exited:?}; member logs kept in {}\n{}",
                world.progress(),
                kept.display(),
                tail(&members[0].log)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for m in &members {
        m.signal("-TERM");
    }
    for m in &mut members {
        let status = m.child.wait().unwrap();
        assert!(status.success(), "member {} on SIGTERM: {status}\n{}", m.pid(), tail(&m.log));
    }
    assert!(busy_at_last_event, "the input ran out before the last event: make it larger");
    eprintln!("{}", rebalance_summary(world.logs.path()));
    if std::env::var("CAIRN_SCALE_KEEP_LOGS").is_ok_and(|v| v == "1") {
        let kept = std::mem::replace(&mut world.logs, tempfile::tempdir().unwrap()).keep();
        eprintln!("member logs kept in {}", kept.display());
    }

    // The table and the output topic are exactly what the input implies.
    let (lines, totals) = expected(&input);
    let got: BTreeMap<String, i64> = world
        .db()
        .query("SELECT key, total FROM totals", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, totals, "PostgreSQL table");
    // The output topic's committed transactions (raw log, markers applied by producer id): each
    // expected line exactly once, in the partition of its task, and nothing else. The output is
    // keyed like the input and has as many partitions, so each task's producer writes only its
    // own partition: nisshi finishes transactions that overlap in one partition from several
    // producers wrongly (docs/kafka.md), which a real broker does not.
    let mut copies: BTreeMap<String, Vec<LineCopy>> = BTreeMap::new();
    let mut raw = Vec::new();
    for p in 0..TASKS {
        let log = read_partition_log(&world.broker.bootstrap, "out", p).unwrap();
        for r in committed_records(&log).unwrap() {
            let line = String::from_utf8(r.value.clone().unwrap_or_default()).unwrap();
            copies.entry(line).or_default().push((p, r.producer_id, r.producer_epoch, r.offset));
        }
        raw.extend(log.into_iter().map(|r| (p, r)));
    }
    let wanted: BTreeMap<&String, i32> = lines.iter().map(|(l, p)| (l, *p)).collect();
    let missing: Vec<&&String> = wanted.keys().filter(|l| !copies.contains_key(**l)).collect();
    let wrong: Vec<(&String, &Vec<LineCopy>)> =
        copies.iter().filter(|(l, c)| c.len() != 1 || wanted.get(l).is_none_or(|p| c[0].0 != *p)).collect();
    if !missing.is_empty() || !wrong.is_empty() {
        let kept = std::mem::replace(&mut world.logs, tempfile::tempdir().unwrap()).keep();
        // The whole raw log beside the member logs: which producer epoch wrote each copy and
        // which markers ended it is what tells a cairn bug from a broker's.
        let dump: String = raw
            .iter()
            .map(|(p, r)| {
                format!(
                    "{p}@{} pid={} epoch={} txn={} control={:?} {}\n",
                    r.offset,
                    r.producer_id,
                    r.producer_epoch,
                    r.transactional,
                    r.control,
                    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                )
            })
            .collect();
        std::fs::write(kept.join("out-raw-log.txt"), dump).unwrap();
        panic!(
            "output topic: missing {missing:?}; surplus, repeated or misplaced (partition, producer, epoch, offset) {wrong:?}\nevents: {log:?}\nmember logs and the raw log kept in {}",
            kept.display()
        );
    }
    eprintln!("output topic: {} lines, each once, in its task's partition", lines.len());

    // The audit, by epoch: each task batch committed once, and per task the epochs of its
    // commits never go down (a process that lost the task wrote nothing after the new owner).
    let audit = world
        .db()
        .query(
            "SELECT task, batch_id, epoch, writer FROM cairn_sink_commits WHERE sink = 'totals' ORDER BY seq",
            &[],
        )
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut newest: BTreeMap<i32, i64> = BTreeMap::new();
    let mut writers: BTreeMap<i32, BTreeSet<String>> = BTreeMap::new();
    for r in &audit {
        let (task, batch, epoch, writer): (i32, i64, i64, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        assert!(seen.insert((task, batch)), "task {task} batch {batch} committed twice");
        let top = newest.entry(task).or_insert(epoch);
        assert!(epoch >= *top, "task {task} batch {batch}: committed in epoch {epoch} after epoch {top} had");
        *top = epoch;
        writers.entry(task).or_default().insert(writer);
    }
    for (t, last) in &last_batch {
        let missing: Vec<i64> = (0..=*last).filter(|b| !seen.contains(&(*t, *b))).collect();
        assert!(missing.is_empty(), "task {t}: batches {missing:?} have no commit");
    }
    let moved = writers.values().filter(|w| w.len() > 1).count();
    let epochs: BTreeMap<i32, i64> = newest;
    eprintln!(
        "{} commits audited; {moved} of {TASKS} tasks were committed by more than one process; newest epochs {epochs:?}",
        audit.len()
    );
    assert!(moved > 0, "some task moved between processes");
}
