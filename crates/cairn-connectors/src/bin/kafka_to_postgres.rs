//! The seed's job: read a Kafka topic, count records per batch, keep per-key running totals, write
//! them to PostgreSQL and to a Kafka topic, exactly once, checkpointing to a location.
//!
//! ```text
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- BROKERS TOPIC OUT_TOPIC POSTGRES_CONN CHECKPOINT [MAX_PER_PARTITION]
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- produce BROKERS TOPIC N   # a small producer
//! ```
//! The PostgreSQL table `totals (key TEXT PRIMARY KEY, total BIGINT)` is created if missing.
//! With `--available-now` as the last argument it stops when the topic is drained.

use cairn::{StreamingContext, Trigger};
use cairn_connectors::kafka::{KafkaSink, KafkaSource, StartFrom};
use cairn_connectors::postgres::PostgresSink;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::time::Duration;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("produce") {
        return match (args.get(1), args.get(2), args.get(3).map(|n| n.parse::<u32>())) {
            (Some(b), Some(t), Some(Ok(n))) => produce(b, t, n),
            _ => usage("produce takes BROKERS TOPIC N (N a whole number)"),
        };
    }
    let available_now = args.last().map(String::as_str) == Some("--available-now");
    if available_now {
        args.pop();
    }
    if !(5..=6).contains(&args.len()) {
        usage("expected 5 or 6 arguments");
    }
    let (brokers, topic, out_topic, pg, ckpt) = (&args[0], &args[1], &args[2], &args[3], &args[4]);
    let max: u64 = match args.get(5).map(|m| m.parse()) {
        None => 1000,
        Some(Ok(m)) if m > 0 => m,
        Some(_) => usage("MAX_PER_PARTITION must be a whole number above 0"),
    };
    let result = StreamingContext::get_or_create(ckpt, |loc| {
        let ctx = StreamingContext::builder()
            .app_name("kafka-to-postgres")
            .batch_interval(Duration::from_millis(200))
            .checkpoint(loc)
            .trigger(if available_now { Trigger::AvailableNow } else { Trigger::ProcessingTime })
            .stop_on_signals(true)
            .build()?;
        // A short request timeout: a broker outage then shows as the engine's restarts (reported
        // below) instead of a silent wait inside one read.
        let source = KafkaSource::builder(brokers, topic.as_str())
            .start(StartFrom::Earliest)
            .max_per_partition(max)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| cairn::Error::User(e.to_string()))?;
        let records = ctx.source("kafka", source)?;
        records.count().print(1);
        let totals = records
            .map(|r| (String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned(), 1i64))
            .update_state_by_key("totals", |_, v: Vec<i64>, old: Option<i64>| Some(old.unwrap_or(0) + v.iter().sum::<i64>()));
        PostgresSink::new(
            pg.as_str(),
            "totals",
            "INSERT INTO totals (key, total) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET total = EXCLUDED.total",
            |_, (k, t): &(String, i64)| vec![Box::new(k.clone()), Box::new(*t)],
        )
        .setup("CREATE TABLE IF NOT EXISTS totals (key TEXT PRIMARY KEY, total BIGINT NOT NULL)")
        .attach(&totals);
        KafkaSink::new(brokers, "totals", out_topic, |b: &cairn::BatchInfo, (k, t): &(String, i64)| {
            (Some(k.clone().into_bytes()), format!("{}:{k}:{t}", b.batch_id).into_bytes())
        })
        .timeout(Duration::from_secs(5))
        .attach(&totals);
        ctx.add_listener(std::sync::Arc::new(ReportRestarts));
        Ok(ctx)
    })
    .and_then(|ctx| ctx.run());
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Says on stderr when the job waits out a broker or database outage.
struct ReportRestarts;

impl cairn::StreamingListener for ReportRestarts {
    fn on_restart_scheduled(&self, e: &cairn::RestartScheduled) {
        eprintln!(
            "waiting out an outage ({:.1} s so far, up to {:.0} s): {}; restarting from the checkpoint in {:.1} s",
            e.outage_ms as f64 / 1e3,
            e.max_outage_ms as f64 / 1e3,
            e.cause,
            e.wait_ms as f64 / 1e3
        );
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("kafka_to_postgres: {problem}");
    eprintln!("usage: kafka_to_postgres BROKERS TOPIC OUT_TOPIC POSTGRES_CONN CHECKPOINT [MAX_PER_PARTITION] [--available-now]");
    eprintln!("       kafka_to_postgres produce BROKERS TOPIC N");
    std::process::exit(2)
}

fn produce(brokers: &str, topic: &str, n: u32) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap_or_else(|e| {
            eprintln!("cannot create a producer for {brokers}: {e}");
            std::process::exit(1)
        });
    for i in 0..n {
        let key = format!("user-{}", i % 17);
        let value = i.to_string();
        while let Err((e, _)) = p.send(BaseRecord::to(topic).key(&key).payload(&value)) {
            eprintln!("retrying send: {e}");
            p.poll(Duration::from_millis(50));
        }
        p.poll(Duration::ZERO);
    }
    if let Err(e) = p.flush(Duration::from_secs(30)) {
        eprintln!("records not acknowledged by {brokers} within 30 s: {e}");
        std::process::exit(1);
    }
}
