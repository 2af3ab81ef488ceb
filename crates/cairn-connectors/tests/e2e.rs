//! End to end, exactly once: Kafka → state → PostgreSQL and Kafka, the job process killed with
//! SIGKILL at seeded random moments and restarted; the table and the output topic are then
//! compared with what the input implies. The test broker, nisshi, does not hide aborted
//! transactional records, so the output topic is checked on its raw log with the transaction
//! markers applied (`cairn_sim::kafka_log`).

mod support;
use cairn_sim::kafka::KafkaBroker;
use cairn_sim::kafka_log::{committed_view, read_partition_log, ControlType};
use cairn_sim::postgres::PgServer;
use cairn_sim::Rng;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::input;

const MAX: u64 = 5;
const RECORDS: u32 = 450;

fn topics(broker: &KafkaBroker) {
    broker.create_topic("in", 3);
    broker.create_topic("out", 1);
}

/// Batch b takes offsets [b*MAX, (b+1)*MAX) of every partition: the output lines per batch and
/// the final totals.
fn expected(input: &BTreeMap<i32, Vec<String>>) -> (Vec<String>, BTreeMap<String, i64>) {
    let mut totals = BTreeMap::new();
    let mut lines = Vec::new();
    let longest = input.values().map(Vec::len).max().unwrap_or(0) as u64;
    for b in 0..longest.div_ceil(MAX) {
        let mut touched = std::collections::BTreeSet::new();
        for keys in input.values() {
            for k in keys.iter().skip((b * MAX) as usize).take(MAX as usize) {
                *totals.entry(k.clone()).or_insert(0i64) += 1;
                touched.insert(k.clone());
            }
        }
        lines.extend(touched.iter().map(|k| format!("{b}:{k}:{}", totals[k])));
    }
    lines.sort();
    (lines, totals)
}

/// The seed job's world: a broker whose `in` topic holds the input, PostgreSQL, and a
/// checkpoint directory.
struct Seed {
    broker: KafkaBroker,
    pg: PgServer,
    dir: tempfile::TempDir,
}

const EXE: &str = env!("CARGO_BIN_EXE_kafka_to_postgres");

impl Seed {
    fn start() -> Self {
        let broker = KafkaBroker::start();
        let pg = PgServer::start();
        topics(&broker);
        let status = Command::new(EXE)
            .args(["produce", &broker.bootstrap, "in", &RECORDS.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        Self { broker, pg, dir: tempfile::tempdir().unwrap() }
    }

    /// The seed job on this world, output discarded unless the caller says otherwise.
    fn job(&self, available_now: bool) -> Command {
        let ckpt = self.dir.path().join("ckpt");
        let mut c = Command::new(EXE);
        c.args([
            &self.broker.bootstrap,
            "in",
            "out",
            &self.pg.conn(),
            ckpt.to_str().unwrap(),
            &MAX.to_string(),
        ]);
        if available_now {
            c.arg("--available-now");
        }
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c
    }
}

#[test]
fn kafka_to_postgres_and_kafka_survive_sigkills_exactly() {
    let seed = Seed::start();
    let job = |available_now| seed.job(available_now);
    let kills: u64 = std::env::var("CAIRN_E2E_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut rng = Rng(0xe2e);
    let mut landed = 0;
    for _ in 0..kills {
        let mut child = job(false).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(250 + rng.next_u64() % 500));
        if child.try_wait().unwrap().is_none() {
            landed += 1;
        }
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
    }
    assert!(landed >= kills * 8 / 10, "the kills must land while the job runs ({landed} of {kills})");
    let status = job(true).status().unwrap();
    assert!(status.success(), "final run: {status}");
    check_outputs(&seed.broker, &seed.pg);
}

/// The table and the output topic hold exactly what the input implies.
fn check_outputs(broker: &KafkaBroker, pg: &PgServer) {
    let (lines, totals) = expected(&input(&broker.bootstrap));
    let mut c = postgres::Client::connect(&pg.conn(), postgres::NoTls).unwrap();
    let got: BTreeMap<String, i64> =
        c.query("SELECT key, total FROM totals", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, totals, "PostgreSQL table");
    // The output topic's raw log, transaction markers included (nisshi does not hide aborted
    // records from read_committed consumers, so the markers are applied here): the records of
    // committed transactions are exactly the expected lines, each once; every other record lies in
    // a transaction the broker marked aborted (a kill inside a Kafka transaction, whose batch the
    // replay wrote again), and none is left open.
    let log = read_partition_log(&broker.bootstrap, "out", 0).unwrap();
    let (committed, aborted) = committed_view(&log).unwrap();
    let text =
        |v: Vec<Vec<u8>>| -> Vec<String> { v.into_iter().map(|b| String::from_utf8(b).unwrap()).collect() };
    let (mut committed, aborted) = (text(committed), text(aborted));
    committed.sort();
    if committed != lines {
        let mut diff: BTreeMap<&String, i64> = BTreeMap::new();
        committed.iter().for_each(|l| *diff.entry(l).or_default() += 1);
        lines.iter().for_each(|l| *diff.entry(l).or_default() -= 1);
        diff.retain(|_, n| *n != 0);
        panic!(
            "output topic, committed transactions: {} lines, expected {}; surplus (+) and missing (-): {diff:?}",
            committed.len(),
            lines.len()
        );
    }
    let strays: Vec<&String> = aborted.iter().filter(|l| lines.binary_search(l).is_err()).collect();
    assert!(strays.is_empty(), "aborted records that are no expected line: {strays:?}");
    let markers = |t| log.iter().filter(|r| r.control == Some(t)).count();
    eprintln!(
        "output topic: {} records in {} committed transactions, {} in {} aborted ones",
        committed.len(),
        markers(ControlType::Commit),
        aborted.len(),
        markers(ControlType::Abort)
    );
}

/// The broker is SIGKILLed mid-job and started again 5 s later on the same data: the same job
/// process waits it out (restarting in place from its checkpoint, its transactional producer
/// rebuilt), exits normally, and the table and the output topic are exact.
#[test]
fn a_broker_outage_is_ridden_out_by_the_same_process_exactly() {
    let seed = Seed::start();
    let (broker, pg) = (&seed.broker, &seed.pg);
    let mut child = seed.job(true).stderr(Stdio::piped()).spawn().unwrap();
    // Crash the broker once a few batches are committed in PostgreSQL.
    let committed = || -> i64 {
        postgres::Client::connect(&pg.conn(), postgres::NoTls)
            .and_then(|mut c| c.query("SELECT coalesce(max(batch_id), -1) FROM cairn_sink_progress", &[]))
            .map_or(-1, |rows| rows[0].get(0))
    };
    let t0 = std::time::Instant::now();
    while committed() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the job made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the job ended before the outage");
        std::thread::sleep(Duration::from_millis(20));
    }
    broker.crash();
    let down_at = committed();
    std::thread::sleep(Duration::from_secs(5));
    assert!(child.try_wait().unwrap().is_none(), "the job died during the outage");
    broker.restart();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    assert!(status.success(), "the job rode the outage out: {status}\n{log}");
    // The engine's log line for each restart in place.
    let restarts = log.matches("restarting from the checkpoint in").count();
    assert!(restarts >= 1, "the job reported how it waited:\n{log}");
    eprintln!("broker down 5 s after batch {down_at}: {restarts} restart(s) reported");
    check_outputs(broker, pg);
}
