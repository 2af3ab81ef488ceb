//! The seed's job: read a Kafka topic, count records per batch, keep per-key running totals, write
//! them to PostgreSQL and to a Kafka topic, exactly once, checkpointing to a location.
//!
//! ```text
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- BROKERS TOPIC OUT_TOPIC POSTGRES_CONN CHECKPOINT [MAX_PER_PARTITION]
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- produce BROKERS TOPIC N   # a small producer
//! ```
//! The PostgreSQL table `totals (key TEXT PRIMARY KEY, total BIGINT)` is created if missing.
//! With `--available-now` it stops when the topic is drained. With `--scale-out` the process is
//! one of any number started with the same arguments: they share the topic's partitions as tasks
//! through a consumer group, and a killed or paused process's tasks move to the others. With
//! `--per-value-through=TOPIC` it keeps totals per record value instead of per key, re-keying
//! the records through TOPIC (created beforehand with as many partitions as TOPIC).

use cairn::{StreamingContext, StreamingContextBuilder, Trigger};
use cairn_connectors::kafka::{KafkaSink, KafkaSource, Repartition, RepartitionThrough, ScaleOut, StartFrom};
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
    let mut opts = Options {
        available_now: false,
        scale_out: false,
        session_timeout: Duration::from_secs(10),
        batch: Duration::from_millis(200),
        per_value_through: None,
    };
    while let Some(flag) = args.last().filter(|a| a.starts_with("--")).cloned() {
        args.pop();
        match flag.split_once('=') {
            None if flag == "--available-now" => opts.available_now = true,
            None if flag == "--scale-out" => opts.scale_out = true,
            Some(("--session-timeout-ms", ms)) => opts.session_timeout = Duration::from_millis(number(ms)),
            Some(("--batch-interval-ms", ms)) => opts.batch = Duration::from_millis(number(ms)),
            Some(("--per-value-through", topic)) if !topic.is_empty() => {
                opts.per_value_through = Some(topic.to_string())
            }
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    if !(5..=6).contains(&args.len()) {
        usage("expected 5 or 6 arguments");
    }
    let max: u64 = match args.get(5).map(|m| m.parse()) {
        None => 1000,
        Some(Ok(m)) if m > 0 => m,
        Some(_) => usage("MAX_PER_PARTITION must be a whole number above 0"),
    };
    let job = Job {
        brokers: args[0].clone(),
        topic: args[1].clone(),
        out_topic: args[2].clone(),
        pg: args[3].clone(),
        max,
        opts,
    };
    let ckpt = args[4].clone();
    let result = if job.opts.scale_out {
        let (brokers, topic) = (job.brokers.clone(), job.topic.clone());
        ScaleOut::new(&brokers, &topic, &ckpt)
            .session_timeout(job.opts.session_timeout)
            // One JSON line per rebalance step on stderr: tasks assigned, started (restore and
            // replay time), first batch, stopped, fenced.
            .on_rebalance(|e| eprintln!("rebalance {}", serde_json::to_string(e).unwrap_or_default()))
            .run(move |builder| job.build(builder))
            .map(|s| eprintln!("stopped: {s:?}"))
            .map_err(|e| e.to_string())
    } else {
        StreamingContext::get_or_create(&ckpt, |loc| job.build(StreamingContext::builder().checkpoint(loc)))
            .and_then(|ctx| ctx.run())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

struct Options {
    available_now: bool,
    scale_out: bool,
    session_timeout: Duration,
    batch: Duration,
    /// Totals per record value instead of per key, re-keyed through this topic.
    per_value_through: Option<String>,
}

struct Job {
    brokers: String,
    topic: String,
    out_topic: String,
    pg: String,
    max: u64,
    opts: Options,
}

impl Job {
    /// The job, on the builder of a single-process run or of one task of a scaled-out one.
    fn build(&self, builder: StreamingContextBuilder) -> cairn::Result<StreamingContext> {
        let (brokers, pg) = (&self.brokers, self.pg.as_str());
        let ctx = builder
            .app_name("kafka-to-postgres")
            .batch_interval(self.opts.batch)
            .trigger(if self.opts.available_now { Trigger::AvailableNow } else { Trigger::ProcessingTime })
            // A scaled-out process handles signals itself (it hands its tasks over).
            .stop_on_signals(!self.opts.scale_out)
            .build()?;
        // A short request timeout: a broker outage then shows as the engine's restarts (reported
        // below) instead of a silent wait inside one read.
        let source = KafkaSource::builder(brokers, self.topic.as_str())
            .start(StartFrom::Earliest)
            .max_per_partition(self.max)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| cairn::Error::User(e.to_string()))?;
        let records = ctx.source("kafka", source)?;
        records.count().print(1);
        let ones = match &self.opts.per_value_through {
            None => records
                .map(|r| (String::from_utf8_lossy(&r.key.unwrap_or_default()).into_owned(), 1i64))
                // The key is the record's Kafka key, so each key's total lives in one task.
                .partitioned_like_source(),
            // Values are spread over every partition: through a topic keyed by value, so each
            // value's total lives in one task.
            Some(topic) => records
                .map(|r| String::from_utf8_lossy(&r.value.unwrap_or_default()).into_owned())
                .repartition_through(&Repartition::new(&ctx, brokers, topic), |v: &String| v.clone())?
                .map(|(v, _)| (v, 1i64))
                .partitioned_like_source(),
        };
        let totals = ones.update_state_by_key("totals", |_, v: Vec<i64>, old: Option<i64>| {
            Some(old.unwrap_or(0) + v.iter().sum::<i64>())
        });
        PostgresSink::new(
            pg,
            "totals",
            "INSERT INTO totals (key, total) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET total = EXCLUDED.total",
            |_, (k, t): &(String, i64)| vec![Box::new(k.clone()), Box::new(*t)],
        )
        .setup("CREATE TABLE IF NOT EXISTS totals (key TEXT PRIMARY KEY, total BIGINT NOT NULL)")
        // Scaled out, every commit is recorded with its task and epoch: who wrote what.
        .record_commits(self.opts.scale_out)
        .attach(&totals);
        KafkaSink::new(brokers, "totals", &self.out_topic, |b: &cairn::BatchInfo, (k, t): &(String, i64)| {
            (Some(k.clone().into_bytes()), format!("{}:{k}:{t}", b.batch_id).into_bytes())
        })
        .timeout(Duration::from_secs(5))
        .attach(&totals);
        ctx.add_listener(std::sync::Arc::new(ReportRestarts));
        Ok(ctx)
    }
}

fn number(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| usage(&format!("{s:?} is not a whole number")))
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
    eprintln!(
        "       [--scale-out [--session-timeout-ms=N]] [--batch-interval-ms=N] [--per-value-through=TOPIC]"
    );
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
