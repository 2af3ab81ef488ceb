//! The seed's job: read a Kafka topic, count records per batch, keep per-key running totals, write
//! them to PostgreSQL and to a Kafka topic, exactly once, checkpointing to a location.
//!
//! ```text
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- BROKERS TOPIC OUT_TOPIC POSTGRES_CONN CHECKPOINT [MAX_PER_PARTITION]
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- produce BROKERS TOPIC N   # a small producer
//! cargo run -p cairn-connectors --bin kafka_to_postgres -- --help                    # every option
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
use clap::{Args, Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::time::Duration;

/// Kafka → per-key running totals → PostgreSQL (table `totals`) and a Kafka topic, exactly
/// once, checkpointing to a location (a directory, s3://, gs://, az://, hdfs://).
#[derive(Parser)]
#[command(name = "kafka_to_postgres", args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    job: Options,
}

#[derive(Subcommand)]
enum Command {
    /// Produce N records to TOPIC (keys `user-0` .. `user-16`, values 0..N): input for a try.
    Produce {
        /// Kafka bootstrap servers, e.g. 127.0.0.1:9092.
        brokers: String,
        /// The topic to write.
        topic: String,
        /// How many records.
        n: u32,
    },
}

#[derive(Args)]
struct Options {
    /// Kafka bootstrap servers, e.g. 127.0.0.1:9092.
    #[arg(required = true)]
    brokers: Option<String>,
    /// The input topic.
    #[arg(required = true)]
    topic: Option<String>,
    /// The output topic: one `batch:key:total` line per updated key and batch.
    #[arg(required = true)]
    out_topic: Option<String>,
    /// PostgreSQL connection string, e.g. "host=127.0.0.1 user=postgres".
    #[arg(required = true)]
    postgres: Option<String>,
    /// The checkpoint location.
    #[arg(required = true)]
    checkpoint: Option<String>,
    /// Records read per partition and batch at most.
    #[arg(default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    max_per_partition: u64,
    /// Stop once the topic is drained.
    #[arg(long)]
    available_now: bool,
    /// Run as one of any number of processes started with the same arguments: they share the
    /// topic's partitions as tasks through a consumer group, and a killed or paused process's
    /// tasks move to the others.
    #[arg(long)]
    scale_out: bool,
    /// The consumer-group session timeout of a scaled-out process: how long a silent process
    /// keeps its tasks.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// The batch interval.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    batch_interval_ms: u64,
    /// Keep totals per record value instead of per key, re-keying the records through TOPIC
    /// (created beforehand with as many partitions as the input topic).
    #[arg(long, value_name = "TOPIC", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    per_value_through: Option<String>,
    /// Serve Prometheus metrics at /metrics and the live page at / on this address (e.g.
    /// 127.0.0.1:8080; no authentication: keep it on a loopback or internal address). A
    /// scaled-out process shows its own tasks.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
}

fn main() {
    // Recovery, replays, fallbacks past damaged checkpoints and outages are logged by the engine;
    // CAIRN_LOG=cairn::progress=info adds one line per batch.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "info,cairn::progress=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::Produce { brokers, topic, n }) = cli.command {
        return produce(&brokers, &topic, n);
    }
    let opts = cli.job;
    let required = |v: &Option<String>| v.clone().unwrap_or_default();
    let job = Job {
        brokers: required(&opts.brokers),
        topic: required(&opts.topic),
        out_topic: required(&opts.out_topic),
        pg: required(&opts.postgres),
        max: opts.max_per_partition,
        batch: Duration::from_millis(opts.batch_interval_ms),
        available_now: opts.available_now,
        scale_out: opts.scale_out,
        per_value_through: opts.per_value_through.clone(),
    };
    let ckpt = required(&opts.checkpoint);
    if let Err(e) = run(job, &ckpt, &opts) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(job: Job, ckpt: &str, opts: &Options) -> Result<(), String> {
    if job.scale_out {
        let (brokers, topic) = (job.brokers.clone(), job.topic.clone());
        let mut process = ScaleOut::new(&brokers, &topic, ckpt)
            .session_timeout(Duration::from_millis(opts.session_timeout_ms))
            // One JSON line per rebalance step on stderr: tasks assigned, started (restore and
            // replay time), first batch, stopped, fenced.
            .on_rebalance(|e| eprintln!("rebalance {}", serde_json::to_string(e).unwrap_or_default()));
        let mut _endpoint = None;
        if let Some(addr) = &opts.http {
            let metrics = cairn_web::Metrics::for_process(APP);
            _endpoint = Some(cairn_web::serve_metrics(&metrics, addr).map_err(|e| e.to_string())?);
            eprintln!("metrics at http://{addr}/metrics, this process's tasks at http://{addr}/");
            process = process.metrics(metrics);
        }
        let summary = process.run(move |builder| job.build(builder)).map_err(|e| e.to_string())?;
        eprintln!("stopped: {summary:?}");
        // For benchmarks: what this process's member log stored.
        eprintln!("member-log {}", serde_json::to_string(&summary.member_log).unwrap_or_default());
        Ok(())
    } else {
        let ctx = StreamingContext::get_or_create(ckpt, |loc| {
            job.build(StreamingContext::builder().checkpoint(loc))
        })
        .map_err(|e| e.to_string())?;
        let _endpoint = match &opts.http {
            Some(addr) => Some(cairn_web::serve(&ctx, addr).map_err(|e| e.to_string())?),
            None => None,
        };
        ctx.run().map(|_| ()).map_err(|e| e.to_string())
    }
}

const APP: &str = "kafka-to-postgres";

struct Job {
    brokers: String,
    topic: String,
    out_topic: String,
    pg: String,
    max: u64,
    batch: Duration,
    available_now: bool,
    scale_out: bool,
    /// Totals per record value instead of per key, re-keyed through this topic.
    per_value_through: Option<String>,
}

impl Job {
    /// The job, on the builder of a single-process run or of one task of a scaled-out one.
    fn build(&self, builder: StreamingContextBuilder) -> cairn::Result<StreamingContext> {
        let (brokers, pg) = (&self.brokers, self.pg.as_str());
        let ctx = builder
            .app_name(APP)
            .batch_interval(self.batch)
            .trigger(if self.available_now { Trigger::AvailableNow } else { Trigger::ProcessingTime })
            // A scaled-out process handles signals itself (it hands its tasks over).
            .stop_on_signals(!self.scale_out)
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
        let ones = match &self.per_value_through {
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
        .record_commits(self.scale_out)
        .attach(&totals);
        KafkaSink::new(brokers, "totals", &self.out_topic, |b: &cairn::BatchInfo, (k, t): &(String, i64)| {
            (Some(k.clone().into_bytes()), format!("{}:{k}:{t}", b.batch_id).into_bytes())
        })
        .timeout(Duration::from_secs(5))
        .attach(&totals);
        Ok(ctx)
    }
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
