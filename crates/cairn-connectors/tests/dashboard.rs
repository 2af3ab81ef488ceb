//! The Grafana dashboard (`deploy/grafana/cairn.json`) queries only metrics that exist: every
//! `cairn_*` name in it must be served at `/metrics` by a running job: the seed job reading a
//! Kafka topic with a backlog (nisshi and PostgreSQL on 127.0.0.1), run as one process and as a
//! process of a scaled-out job, and a job with a receiver. And every metric they serve is on the dashboard, so a new metric
//! cannot be forgotten there.

use cairn_sim::kafka::KafkaBroker;
use cairn_sim::postgres::PgServer;
use cairn_sim::tools::{free_port, http_get};
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_kafka_to_postgres");

/// Runs the seed job with `--http` (and `extra` flags) until its `/metrics` has `ready` in it.
fn scrape_running_job(
    broker: &KafkaBroker,
    pg: &PgServer,
    ckpt: &str,
    extra: &[&str],
    ready: &str,
) -> String {
    let port = free_port();
    let mut job: Child = Command::new(EXE)
        .args([&broker.bootstrap, "in", "out", &pg.conn(), ckpt, "20", "--batch-interval-ms=200"])
        .arg(format!("--http=127.0.0.1:{port}"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let text = loop {
        if let Some(text) = http_get(port, "/metrics").filter(|m| m.contains(ready)) {
            break text;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the job's /metrics never showed {ready}");
        std::thread::sleep(Duration::from_millis(300));
    };
    job.kill().unwrap();
    job.wait().unwrap();
    text
}

/// The metric families of an OpenMetrics exposition (from its `# TYPE` lines), with their types.
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The sample names a family has: a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`.
fn sample_names(family: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{family}_total")],
        "histogram" => ["_bucket", "_sum", "_count"].iter().map(|s| format!("{family}{s}")).collect(),
        _ => vec![family.to_string()],
    }
}

/// Every `cairn_...` name in the dashboard's queries.
fn queried(dashboard: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = dashboard;
    while let Some(at) = rest.find("cairn_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_exists_and_every_metric_is_on_it() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/grafana/cairn.json");
    let dashboard = std::fs::read_to_string(path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() > 10), "the dashboard has panels");

    let broker = KafkaBroker::start();
    let pg = PgServer::start();
    broker.create_topic("in", 2);
    broker.create_topic("out", 2);
    let produced = Command::new(EXE).args(["produce", &broker.bootstrap, "in", "5000"]).status().unwrap();
    assert!(produced.success());
    let dir = tempfile::tempdir().unwrap();
    let loc = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // Lag is reported once a batch planned: wait for it (and, scaled out, for both tasks).
    let single = scrape_running_job(&broker, &pg, &loc("single"), &[], "cairn_source_lag_records{");
    let scaled = scrape_running_job(
        &broker,
        &pg,
        &loc("scaled"),
        &["--scale-out", "--session-timeout-ms=6000"],
        "cairn_tasks{app=\"kafka-to-postgres\"} 2",
    );

    // A job with a receiver, for the receiver panels.
    let receiving = {
        let ctx = cairn::StreamingContext::builder()
            .checkpoint(loc("receiving"))
            .trigger(cairn::Trigger::AvailableNow)
            .build()
            .unwrap();
        let (input, events) = ctx.receiver_stream("events", 100).unwrap();
        events.foreach_batch(|_, _| Ok(()));
        let endpoint = cairn_web::serve(&ctx, "127.0.0.1:0").unwrap();
        let _ = input.push(vec![b"x".to_vec()]).unwrap();
        ctx.run_available().unwrap();
        http_get(endpoint.addr().port(), "/metrics").unwrap()
    };
    let served: Vec<(String, String)> =
        families(&single).into_iter().chain(families(&scaled)).chain(families(&receiving)).collect();
    let names = queried(&dashboard);
    for name in &names {
        assert!(
            served.iter().any(|(f, k)| sample_names(f, k).iter().any(|s| s == name)),
            "the dashboard queries {name}, which the job does not serve:\n{single}\n{scaled}"
        );
    }
    for (family, kind) in &served {
        assert!(
            sample_names(family, kind).iter().any(|s| names.contains(s)),
            "{family} ({kind}) is served but not on the dashboard"
        );
    }
    eprintln!("{} metric names on the dashboard, all served", names.len());
}
