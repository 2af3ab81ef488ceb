//! Re-keying through a Kafka topic, scaled out, against real parts: the seed job with
//! `--per-value-through` keeps totals per record *value* while its input is keyed (and
//! partitioned) by user, so every value's records arrive in every task and must move through the
//! repartition topic to the one task that owns the value. Two processes share four tasks on
//! nisshi, one is SIGKILLed, a third starts, one is paused past the session timeout and resumed;
//! the PostgreSQL table must then hold each value's exact count. nisshi leaves aborted and
//! fenced copies of repartition batches readable, so a downstream that trusted the broker would
//! count records twice here.

use cairn_sim::kafka::KafkaBroker;
use cairn_sim::postgres::PgServer;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_kafka_to_postgres");
const TASKS: i32 = 4;
const RECORDS: u32 = 4000;
const VALUES: u32 = 23;
const SESSION_MS: u64 = 6000;

struct Member {
    child: Child,
    log: PathBuf,
}

impl Member {
    fn signal(&self, sig: &str) {
        assert!(Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success());
    }
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_re_keyed_job_counts_every_record_once_across_kills_and_pauses() {
    let broker = KafkaBroker::start();
    let pg = PgServer::start();
    broker.create_topic("in", TASKS);
    broker.create_topic("by-value", TASKS);
    broker.create_topic("out", 1);
    // Keyed by user (17 users), valued by page (23 pages): a page's records are in every
    // partition.
    let producer: BaseProducer = broker.client_config().create().unwrap();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..RECORDS {
        let (key, value) = (format!("user-{}", i % 17), format!("page-{}", (i * 7) % VALUES));
        *expected.entry(value.clone()).or_default() += 1;
        while let Err((e, _)) = producer.send(BaseRecord::to("in").key(&key).payload(&value)) {
            assert!(format!("{e}").contains("Queue full"), "{e}");
            producer.poll(Duration::from_millis(20));
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let dir = tempfile::Builder::new().prefix("cairn-repartition-").tempdir().unwrap();
    let location = dir.path().join("ckpt");
    let mut started = 0;
    let mut member = || {
        started += 1;
        let log = dir.path().join(format!("member-{started}.log"));
        let mut c = Command::new(EXE);
        c.args([&broker.bootstrap, "in", "out", &pg.conn(), location.to_str().unwrap(), "40"])
            .args(["--scale-out", "--batch-interval-ms=500", "--per-value-through=by-value"])
            .arg(format!("--session-timeout-ms={SESSION_MS}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Member { child: c.spawn().unwrap(), log }
    };
    let db = || postgres::Client::connect(&pg.conn(), postgres::NoTls).unwrap();
    let totals = || -> BTreeMap<String, i64> {
        match db().query("SELECT key, total FROM totals", &[]) {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(_) => BTreeMap::new(),
        }
    };
    // No value is ever counted past its number of records, at any moment of the run.
    let check = |t: &BTreeMap<String, i64>, what: &str| {
        for (k, n) in t {
            assert!(n <= &expected[k], "{what}: {k} counted {n} times, it has {} records", expected[k]);
        }
    };
    let counted = |t: &BTreeMap<String, i64>| t.values().sum::<i64>();

    let mut members = vec![member(), member()];
    let t0 = Instant::now();
    let wait_for = |members: &[Member], at_least: i64, limit: Duration| loop {
        let t = totals();
        check(&t, "while running");
        if counted(&t) >= at_least {
            return;
        }
        assert!(t0.elapsed() < limit, "only {} of {RECORDS} counted:\n{}", counted(&t), members[0].tail());
        std::thread::sleep(Duration::from_millis(300));
    };
    wait_for(&members, 200, Duration::from_secs(60));
    let killed = members.remove(0);
    killed.signal("-KILL");
    eprintln!("SIGKILL after {:.1} s, {} counted", t0.elapsed().as_secs_f64(), counted(&totals()));
    members.push(member());
    wait_for(&members, 1200, Duration::from_secs(120));
    members[0].signal("-STOP");
    std::thread::sleep(Duration::from_millis(SESSION_MS + 3000));
    members[0].signal("-CONT");
    eprintln!("SIGSTOP/SIGCONT after {:.1} s, {} counted", t0.elapsed().as_secs_f64(), counted(&totals()));
    wait_for(&members, RECORDS as i64, Duration::from_secs(240));
    // A few more batches: nothing is counted again.
    std::thread::sleep(Duration::from_secs(3));
    let got = totals();
    check(&got, "at the end");
    for m in &members {
        m.signal("-TERM");
    }
    for m in &mut members {
        let status = m.child.wait().unwrap();
        assert!(status.success(), "SIGTERM: {status}\n{}", m.tail());
    }
    assert_eq!(got, expected, "every page counted exactly once");
    eprintln!("{RECORDS} records re-keyed exactly in {:.1} s", t0.elapsed().as_secs_f64());
}
