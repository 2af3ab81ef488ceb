//! The live page of the seed job (`kafka_to_postgres --http`) in headless Chromium, after the job
//! was SIGKILLed and restarted, reading a Kafka topic with a backlog (nisshi and PostgreSQL on
//! 127.0.0.1). What the page shows is checked against the job's own records: its batch table
//! against the progress records of the batch it rendered, the selected batch's plan against that
//! batch's logged ranges, the checkpoint history (a full snapshot and deltas), the recovery
//! event, and a non-zero lag for every partition, also present in `/metrics`. Screenshots go to
//! the target directory.

use cairn_sim::kafka::KafkaBroker;
use cairn_sim::postgres::PgServer;
use cairn_sim::tools::{element_data, free_port, headless_chromium, http_get, screenshot, table_rows};
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_kafka_to_postgres");
const PARTITIONS: i32 = 3;

fn progress(port: u16) -> Option<Value> {
    serde_json::from_str(&http_get(port, "/api/progress")?).ok()
}

fn start_job(broker: &KafkaBroker, pg: &PgServer, ckpt: &str, port: u16, log: &std::path::Path) -> Child {
    Command::new(EXE)
        .args([&broker.bootstrap, "in", "out", &pg.conn(), ckpt, "40"])
        .args(["--batch-interval-ms=300", &format!("--http=127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits until `ok` holds for the job's progress data.
fn wait_for(port: u16, what: &str, log: &std::path::Path, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(p) = progress(port).filter(|p| ok(p)) {
            return p;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{what} did not happen within 90 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn kinds(p: &Value) -> Vec<String> {
    p["checkpoint_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_page_after_a_kill_and_restart_shows_batches_checkpoints_the_recovery_and_lag() {
    let broker = KafkaBroker::start();
    let pg = PgServer::start();
    broker.create_topic("in", PARTITIONS);
    broker.create_topic("out", PARTITIONS);
    // A backlog the job reads at 40 records per partition per batch: lag stays above zero.
    let produced = Command::new(EXE).args(["produce", &broker.bootstrap, "in", "30000"]).status().unwrap();
    assert!(produced.success());
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let ckpt = ckpt.to_str().unwrap();
    let port = free_port();
    let log = dir.path().join("job.log");

    let mut job = start_job(&broker, &pg, ckpt, port, &log);
    wait_for(port, "five batches", &log, |p| p["batches"].as_array().unwrap().len() >= 5);
    job.kill().unwrap(); // SIGKILL
    job.wait().unwrap();
    let mut job = start_job(&broker, &pg, ckpt, port, &log);
    // After the restart: recovered from a checkpoint, and (full_snapshot_every 10) a compacted
    // full snapshot among the deltas.
    let before = wait_for(port, "recovery, deltas and a full snapshot after the restart", &log, |p| {
        let k = kinds(p);
        p["recoveries"][0]["restored_batch"].is_u64()
            && k.iter().any(|k| k.starts_with("full"))
            && k.iter().any(|k| k == "delta")
            && p["batches"].as_array().unwrap().len() >= 5
    });

    let profile = dir.path().join("chromium-profile");
    let dom = headless_chromium(&profile, "1280,2400")
        .args(["--virtual-time-budget=4000", "--dump-dom", &format!("http://127.0.0.1:{port}/")])
        .output()
        .expect("run chromium");
    let html = String::from_utf8_lossy(&dom.stdout).into_owned();
    let after = progress(port).expect("the job still answers");
    let metrics = http_get(port, "/metrics").unwrap();

    // The batch the page rendered last, and its progress record.
    let rendered: u64 = html
        .split("data-rendered-batch=\"")
        .nth(1)
        .and_then(|r| r.split('"').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the page rendered no batch:\n{html}"));
    let records: BTreeMap<u64, &Value> =
        after["batches"].as_array().unwrap().iter().map(|b| (b["batch_id"].as_u64().unwrap(), b)).collect();
    let record = records[&rendered];

    // The batch table: the newest batches, newest first, each with its record count.
    let rows = table_rows(&html, "batches");
    let rows: Vec<_> = rows.iter().filter(|r| r.contains_key("batch")).collect();
    assert!(rows.len() >= 5, "{rows:?}");
    assert_eq!(rows[0]["batch"], rendered.to_string());
    for r in &rows {
        let b: u64 = r["batch"].parse().unwrap();
        assert_eq!(r["records"], records[&b]["records"].to_string(), "batch {b}");
    }
    // The selected batch's plan: the newest one's logged ranges, one per partition.
    let plan = table_rows(&html, "plantable");
    assert!(
        html.contains(&format!("id=\"plantable\" data-batch=\"{rendered}\"")),
        "plan of batch {rendered}"
    );
    let ranges = record["plan"][0]["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), PARTITIONS as usize);
    assert_eq!(plan.len(), 1 + ranges.len(), "a header and a row per range: {plan:?}");
    for r in ranges {
        let row = format!(
            "<td class=\"num\">{}</td><td class=\"num\">{}</td>",
            r["start"].as_u64().unwrap(),
            r["end"].as_u64().unwrap()
        );
        assert!(html.contains(&row), "range {r} shown");
    }

    // The checkpoint history: deltas and a full snapshot, as the job reported them.
    let shown: Vec<String> =
        table_rows(&html, "history").iter().filter_map(|r| r.get("kind").cloned()).collect();
    assert!(shown.iter().any(|k| k == "delta") && shown.iter().any(|k| k.starts_with("full")), "{shown:?}");
    let reported = kinds(&after);
    assert!(shown.iter().all(|k| reported.contains(k)), "{shown:?} vs {reported:?}");

    // The recovery: from which checkpoint, how many batches replayed.
    let rec = table_rows(&html, "recoveries");
    let rec: Vec<_> = rec.iter().filter(|r| r.contains_key("replayed")).collect();
    assert_eq!(rec.len(), 1, "one recovery since this process started: {rec:?}");
    assert_eq!(rec[0]["restored"], before["recoveries"][0]["restored_batch"].to_string());
    assert_eq!(rec[0]["replayed"], before["recoveries"][0]["replay_batches"].to_string());

    // Lag: every partition behind, as the rendered batch's record says, and in /metrics.
    let lag = table_rows(&html, "lag");
    let lag: BTreeMap<String, u64> = lag
        .iter()
        .filter_map(|r| Some((r.get("partition")?.clone(), r.get("records")?.parse().ok()?)))
        .collect();
    let want: BTreeMap<String, u64> = record["source_lag"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["partition"].as_str().unwrap().to_string(), l["records"].as_u64().unwrap()))
        .collect();
    assert_eq!(lag, want, "the page's lag is the rendered batch's");
    assert_eq!(lag.len(), PARTITIONS as usize);
    for (p, n) in &lag {
        assert!(*n > 0, "partition {p} has a backlog");
        let series = format!(
            "cairn_source_lag_records{{app=\"kafka-to-postgres\",source=\"kafka\",partition=\"{p}\"}} "
        );
        let now: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{metrics}"))
            .trim()
            .parse()
            .unwrap();
        assert!(now > 0, "{series}{now}");
    }
    // The charts drew the timeline.
    for chart in ["rate", "delays", "ckpt", "ckptbytes", "state", "statebytes", "lagchart"] {
        let n: usize = element_data(&html, chart, "points")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("chart {chart} was not drawn"));
        assert!(n >= 5, "chart {chart} drew {n} points");
    }

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cairn-page-after-restart.png");
    screenshot(&profile, "1280,2400", &format!("http://127.0.0.1:{port}/"), &shot, 4000);
    job.kill().unwrap();
    job.wait().unwrap();
}
