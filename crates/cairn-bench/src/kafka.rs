//! `cairn-bench kafka`: records per second from Kafka through a stateful job into each sink, with
//! a state checkpoint after every batch (see docs/benchmarks.md, "Kafka → state → sinks").
//!
//! One run starts a nisshi broker and a throwaway PostgreSQL cluster (both on 127.0.0.1),
//! produces keyed records to an input topic once (timed), reads it once with a plain consumer
//! (the read floor), then runs the same job over that input four times, each with a fresh
//! checkpoint location: per-key running totals (`update_state_by_key`) written to (a) nothing,
//! (b) PostgreSQL (`PostgresSink::copy_upsert`), (c) a Kafka topic (`KafkaSink`, transactional),
//! and (a) again, so drift over the run shows. Every run's output is checked against the totals
//! the input implies. After each sink's job, the same rows in the same batches are written again
//! by a plain client (the reference: binary `COPY` into a staging table and one upsert per
//! transaction; a plain transactional producer, one transaction per batch), and the sink's rows/s
//! inside `write_batch` is reported as a ratio to it; the job without a sink is reported as a
//! ratio to the plain consumer (the read floor). It prints a table and, as its last line, one
//! JSON object.

use crate::{dir_objects, percentile, BoxError};
use cairn::checkpoint::CheckpointStore;
use cairn::source::Source;
use cairn::{BatchInfo, BatchProgress, RunSummary, StreamingContext, Trigger};
use cairn_connectors::kafka::{KafkaRecord, KafkaSink, KafkaSource, StartFrom};
use cairn_connectors::postgres::PostgresSink;
use cairn_sim::kafka::KafkaBroker;
use cairn_sim::postgres::PgServer;
use cairn_sim::Rng;
use clap::Args;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INPUT: &str = "bench-in";
const OUTPUT: &str = "bench-out";
/// The sinks' names (PostgreSQL progress row, Kafka transactional id and marker group).
const SINK: &str = "totals";
/// The plain transactional producer's output topic (the Kafka reference).
const OUTPUT_REF: &str = "bench-out-ref";
/// The Kafka sink's output topic when it writes the batches again outside the job.
const OUTPUT_ALONE: &str = "bench-out-alone";
/// Targets: sink rows/s over the plain client's, job without a sink over the plain consumer.
const TARGET_POSTGRES: f64 = 0.8;
const TARGET_KAFKA: f64 = 0.9;
const TARGET_SOURCE: f64 = 0.9;

#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Records produced to the input topic (each job reads all of them).
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Distinct keys (users) in the input.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// The source's limit: records per partition per batch.
    #[arg(long, default_value_t = 5_000)]
    max_per_partition: u64,
    /// A small version (30 000 records, 1 000 per partition per batch).
    #[arg(long)]
    quick: bool,
    /// Seed of the generated input.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Per user: the sum of the amounts in the input.
type Totals = BTreeMap<String, i64>;

/// Counts the producer's delivery reports.
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct Reports(Arc<Deliveries>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => {
                self.0.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                self.0.first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e.to_string());
            }
        }
    }
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers).set("broker.address.family", "v4");
    cfg
}

fn create_topics(brokers: &str, partitions: i32) -> Result<(), BoxError> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers).create()?;
    let topics = [
        NewTopic::new(INPUT, partitions, TopicReplication::Fixed(1)),
        NewTopic::new(OUTPUT, 1, TopicReplication::Fixed(1)),
        NewTopic::new(OUTPUT_REF, 1, TopicReplication::Fixed(1)),
        NewTopic::new(OUTPUT_ALONE, 1, TopicReplication::Fixed(1)),
    ];
    for r in futures::executor::block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
        r.map_err(|(topic, code)| format!("cannot create topic {topic}: {code}"))?;
    }
    Ok(())
}

/// Produces `records` keyed records (key `user-NNNNN`, value a decimal amount 1..=100, partition
/// by the producer's key hash) and returns the totals they imply and the seconds until every
/// record was acknowledged.
fn produce(brokers: &str, a: &KafkaArgs) -> Result<(Totals, f64), BoxError> {
    let reports = Arc::new(Deliveries::default());
    let producer: BaseProducer<Reports> = client_config(brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create_with_context(Reports(reports.clone()))?;
    let mut rng = Rng(a.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut totals = Totals::new();
    let t0 = Instant::now();
    for _ in 0..a.records {
        let x = rng.next_u64();
        let key = format!("user-{:05}", x % a.users.max(1));
        let amount = ((x >> 32) % 100 + 1) as i64;
        let value = amount.to_string();
        let mut rec = Some(BaseRecord::to(INPUT).key(&key).payload(&value));
        while let Some(r) = rec.take() {
            if let Err((e, back)) = producer.send(r) {
                if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                    return Err(format!("produce: {e}").into());
                }
                producer.poll(Duration::from_millis(5));
                rec = Some(back);
            }
        }
        producer.poll(Duration::ZERO);
        *totals.entry(key).or_insert(0) += amount;
    }
    producer.flush(Duration::from_secs(600))?;
    let secs = t0.elapsed().as_secs_f64();
    let (ok, failed) = (reports.ok.load(Ordering::Relaxed), reports.failed.load(Ordering::Relaxed));
    if ok != a.records || failed > 0 {
        let first = reports.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        return Err(format!(
            "produce: {ok} of {} records acknowledged, {failed} failed (first error: {first:?})",
            a.records
        )
        .into());
    }
    Ok((totals, secs))
}

/// Records per partition of a topic (high minus low watermark).
fn partition_sizes(brokers: &str, topic: &str, partitions: i32) -> Result<Vec<i64>, BoxError> {
    let c: BaseConsumer = client_config(brokers).set("group.id", "bench-watermarks").create()?;
    (0..partitions)
        .map(|p| {
            let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(30))?;
            Ok(high - low)
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    None,
    Postgres,
    Kafka,
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Sink::None => "none",
            Sink::Postgres => "postgres",
            Sink::Kafka => "kafka",
        }
    }
}

/// Wraps a source to time its `plan` calls (microseconds, summed until taken) and the span of
/// its `read` calls (ranges are read in parallel: first start and last end, since `epoch`).
struct Timed<S> {
    inner: S,
    epoch: Instant,
    plan_us: Arc<AtomicU64>,
    read_span: Arc<(AtomicU64, AtomicU64)>,
}

impl<S: Source> Source for Timed<S> {
    type Item = S::Item;
    fn plan(
        &self,
        positions: &cairn::source::Positions,
    ) -> Result<Vec<cairn::OffsetRange>, cairn::UserError> {
        let t0 = Instant::now();
        let r = self.inner.plan(positions);
        self.plan_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        r
    }
    fn legacy_partition(&self, key: &str) -> Result<cairn::SourcePartition, cairn::UserError> {
        self.inner.legacy_partition(key)
    }
    fn read(&self, range: &cairn::OffsetRange) -> Result<Vec<S::Item>, cairn::UserError> {
        let us = || self.epoch.elapsed().as_micros() as u64;
        self.read_span.0.fetch_min(us(), Ordering::Relaxed);
        let r = self.inner.read(range);
        self.read_span.1.fetch_max(us(), Ordering::Relaxed);
        r
    }
}

/// One batch's times in ms.
#[derive(Clone, Copy, Default)]
struct BatchTimes {
    /// `BatchProgress::processing_ms`: reading the source, the operators, the sink.
    processing: f64,
    /// `BatchProgress::checkpoint_ms`: planning (it includes the source's `plan`), logging the
    /// plan, cutting the state checkpoint, waiting for the writer.
    on_path: f64,
    /// Of `on_path`, the source's `plan` (topic metadata and watermarks from the broker).
    plan: f64,
    /// Of `processing`, the source's `read` of the batch's ranges (from the first start to the
    /// last end).
    read: f64,
    /// Of `processing`, the sink's `write_batch`.
    sink: f64,
}

/// What one job run measured.
struct JobRun {
    wall_s: f64,
    records_read: u64,
    batches: Vec<BatchTimes>,
    /// Per batch: rows the sink wrote.
    rows: Vec<u64>,
    /// Per batch: the batch id and the rows handed to the sink (copied outside the timer), for
    /// the plain client to write again.
    written: Vec<(u64, Vec<(String, i64)>)>,
    has_sink: bool,
    /// The job id the sink was handed (its progress is keyed by it).
    job_id: String,
    summary: RunSummary,
    objects_end: u64,
    bytes_end: u64,
}

impl JobRun {
    fn records_per_s(&self) -> f64 {
        self.records_read as f64 / self.wall_s.max(1e-9)
    }
    fn batch_ms(&self) -> Vec<f64> {
        self.batches.iter().map(|b| b.processing + b.on_path).collect()
    }
    fn mean(&self, f: impl Fn(&BatchTimes) -> f64) -> f64 {
        self.batches.iter().map(f).sum::<f64>() / self.batches.len().max(1) as f64
    }
    fn rows_written(&self) -> u64 {
        self.rows.iter().sum()
    }
}

fn run_job(sink: Sink, a: &KafkaArgs, brokers: &str, pg: &str, dir: &Path) -> Result<JobRun, BoxError> {
    let ctx = StreamingContext::builder()
        .app_name(format!("kafka-bench-{}", sink.name()))
        .batch_interval(Duration::from_secs(1))
        .checkpoint(dir.to_str().unwrap_or_default())
        .trigger(Trigger::AvailableNow)
        // A checkpoint after every batch (the default interval is one batch), never deferred.
        .max_checkpoint_deferral(0)
        .build()?;
    let (plan_us, sink_us) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let read_span = Arc::new((AtomicU64::new(u64::MAX), AtomicU64::new(0)));
    let source = Timed {
        inner: KafkaSource::new(brokers, INPUT, StartFrom::Earliest, a.max_per_partition)?,
        epoch: Instant::now(),
        plan_us: plan_us.clone(),
        read_span: read_span.clone(),
    };
    let totals = ctx
        .source("kafka", source)?
        .map(|r: KafkaRecord| {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let amount = r
                .value
                .as_deref()
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            (key, amount)
        })
        .update_state_by_key(SINK, |_, v: Vec<i64>, old: Option<i64>| {
            Some(old.unwrap_or(0) + v.iter().sum::<i64>())
        });
    let rows_log = Arc::new(Mutex::new(Vec::new()));
    let written = Arc::new(Mutex::new(Vec::new()));
    let job_id = Arc::new(Mutex::new(String::new()));
    let (log, su, job, wr) = (rows_log.clone(), sink_us.clone(), job_id.clone(), written.clone());
    let timed = move |info: &BatchInfo, rows: &[(String, i64)], t0: Instant| {
        su.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        log.lock().expect("lock").push(rows.len() as u64);
        wr.lock().expect("lock").push((info.batch_id.0, rows.to_vec()));
        let mut j = job.lock().expect("lock");
        if j.is_empty() {
            j.push_str(&info.job_id);
        }
    };
    // The sinks' own `attach` is `foreach_batch(write_batch)`; calling `write_batch` here does
    // the same and times it.
    match sink {
        Sink::None => totals.foreach_batch(|_, _| Ok(())),
        Sink::Postgres => {
            let s = PostgresSink::copy_upsert(
                pg,
                SINK,
                "totals",
                &["key", "total"],
                &["key"],
                |_, (k, t): &(String, i64)| vec![Box::new(k.clone()), Box::new(*t)],
            );
            totals.foreach_batch(move |info, rows| {
                let t0 = Instant::now();
                s.write_batch(info, &rows)?;
                timed(info, &rows, t0);
                Ok(())
            });
        }
        Sink::Kafka => {
            let s = KafkaSink::new(brokers, SINK, OUTPUT, |b: &BatchInfo, (k, t): &(String, i64)| {
                (Some(k.clone().into_bytes()), format!("{}:{k}:{t}", b.batch_id).into_bytes())
            });
            totals.foreach_batch(move |info, rows| {
                let t0 = Instant::now();
                s.write_batch(info, &rows)?;
                timed(info, &rows, t0);
                Ok(())
            });
        }
    }
    let progress = Arc::new(Mutex::new(Vec::new()));
    let p = progress.clone();
    let ms = |us: &AtomicU64| us.swap(0, Ordering::Relaxed) as f64 / 1e3;
    ctx.on_batch(move |b: &BatchProgress| {
        let t = BatchTimes {
            processing: b.processing_ms,
            on_path: b.checkpoint_ms,
            plan: ms(&plan_us),
            read: {
                let (first, last) =
                    (read_span.0.swap(u64::MAX, Ordering::Relaxed), read_span.1.swap(0, Ordering::Relaxed));
                last.saturating_sub(first) as f64 / 1e3
            },
            sink: ms(&sink_us),
        };
        p.lock().expect("lock").push((b.records, t));
    });
    let t0 = Instant::now();
    let summary = ctx.run_available()?;
    let wall_s = t0.elapsed().as_secs_f64();
    let progress = progress.lock().expect("lock").clone();
    let (objects_end, bytes_end) = dir_objects(dir);
    let rows = rows_log.lock().expect("lock").clone();
    let written = std::mem::take(&mut *written.lock().expect("lock"));
    let job_id = job_id.lock().expect("lock").clone();
    Ok(JobRun {
        wall_s,
        records_read: progress.iter().map(|b| b.0).sum(),
        batches: progress.iter().map(|b| b.1).collect(),
        rows,
        written,
        has_sink: sink != Sink::None,
        job_id,
        summary,
        objects_end,
        bytes_end,
    })
}

/// The `totals` table of the newest checkpoint in `dir`.
fn checkpointed_totals(dir: &Path) -> Result<Totals, BoxError> {
    let store = CheckpointStore::open(dir.to_str().unwrap_or_default())?;
    let state = store.recover()?.state.ok_or("no checkpoint was written")?;
    let table = state.tables.iter().find(|t| t.id == SINK).ok_or("no totals table in the checkpoint")?;
    let mut m = Totals::new();
    for e in table.reader() {
        let (k, v) = e?;
        let Some(v) = v else { continue };
        let key: String = postcard::from_bytes(k)?;
        let (total, _seen_ms): (i64, i64) = postcard::from_bytes(v)?;
        m.insert(key, total);
    }
    Ok(m)
}

/// What the PostgreSQL table and the sink's progress row hold.
fn postgres_totals(pg: &str, job_id: &str) -> Result<(Totals, i64), BoxError> {
    let mut c = postgres::Client::connect(pg, postgres::NoTls)?;
    let rows = c.query("SELECT key, total FROM totals", &[])?;
    let totals = rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect();
    let done: i64 = c
        .query_one(
            "SELECT batch_id FROM cairn_sink_progress WHERE sink = $1 AND job_id = $2",
            &[&SINK, &job_id],
        )?
        .get(0);
    Ok((totals, done))
}

/// The output topic read in full: lines, the last total per key, the batch ids seen, and the
/// sink's committed marker (`last batch id + 1`).
struct KafkaOutput {
    lines: u64,
    last: Totals,
    batch_ids: BTreeSet<u64>,
    committed_marker: i64,
}

fn kafka_output(brokers: &str, job_id: &str) -> Result<KafkaOutput, BoxError> {
    let src = KafkaSource::new(brokers, OUTPUT, StartFrom::Earliest, u32::MAX as u64)?;
    let mut out =
        KafkaOutput { lines: 0, last: Totals::new(), batch_ids: BTreeSet::new(), committed_marker: -1 };
    let mut latest: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for range in src.plan(&Default::default())? {
        for r in src.read(&range)? {
            let line = String::from_utf8(r.value.unwrap_or_default())?;
            let mut it = line.splitn(3, ':');
            let (Some(b), Some(k), Some(t)) = (it.next(), it.next(), it.next()) else {
                return Err(format!("unexpected output line {line:?}").into());
            };
            let (b, t) = (b.parse::<u64>()?, t.parse::<i64>()?);
            out.lines += 1;
            out.batch_ids.insert(b);
            let e = latest.entry(k.to_string()).or_insert((b, t));
            if b >= e.0 {
                *e = (b, t);
            }
        }
    }
    out.last = latest.into_iter().map(|(k, (_, t))| (k, t)).collect();
    let marker: BaseConsumer = client_config(brokers)
        .set("group.id", format!("cairn-sink-{job_id}-{SINK}"))
        .set("isolation.level", "read_committed")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(OUTPUT, 0);
    let committed = marker.committed_offsets(tpl, Duration::from_secs(30))?;
    if let Some(Offset::Offset(o)) = committed.elements().first().map(|e| e.offset()) {
        out.committed_marker = o;
    }
    Ok(out)
}

/// What a plain client took to write the sink's batches again: seconds in total (each batch
/// timed from its transaction's start to its commit) and rows.
struct Reference {
    secs: f64,
    rows: u64,
}

impl Reference {
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.secs.max(1e-9)
    }
}

/// For information: the sink writes the batches it wrote in the job again, outside the job (a
/// new job id, its own table or topic), right before the reference: what the sink costs with
/// nothing else running, to tell its own overhead from the job's load on the machine.
fn sink_alone(
    sink: Sink,
    pg: &str,
    brokers: &str,
    batches: &[(u64, Vec<(String, i64)>)],
) -> Result<Reference, BoxError> {
    let mut r = Reference { secs: 0.0, rows: 0 };
    let info = |b: u64| BatchInfo::new("bench-alone", cairn::BatchId(b), 0);
    match sink {
        Sink::Postgres => {
            postgres::Client::connect(pg, postgres::NoTls)?
                .batch_execute("CREATE TABLE totals_alone (key TEXT PRIMARY KEY, total BIGINT NOT NULL)")?;
            let s = PostgresSink::copy_upsert(
                pg,
                "alone",
                "totals_alone",
                &["key", "total"],
                &["key"],
                |_, (k, t): &(String, i64)| vec![Box::new(k.clone()), Box::new(*t)],
            );
            for (b, rows) in batches {
                let t0 = Instant::now();
                s.write_batch(&info(*b), rows)?;
                r.secs += t0.elapsed().as_secs_f64();
                r.rows += rows.len() as u64;
            }
        }
        Sink::Kafka => {
            let s =
                KafkaSink::new(brokers, "alone", OUTPUT_ALONE, |b: &BatchInfo, (k, t): &(String, i64)| {
                    (Some(k.clone().into_bytes()), format!("{}:{k}:{t}", b.batch_id).into_bytes())
                });
            for (b, rows) in batches {
                let t0 = Instant::now();
                s.write_batch(&info(*b), rows)?;
                r.secs += t0.elapsed().as_secs_f64();
                r.rows += rows.len() as u64;
            }
        }
        Sink::None => {}
    }
    Ok(r)
}

/// The PostgreSQL reference: the sink's batches written again into `totals_ref` (same schema) the
/// fastest plain way that does the same work: per batch one transaction with a binary `COPY` into
/// a temporary staging table (`ON COMMIT DELETE ROWS`, created once) and one `INSERT ... SELECT
/// ... ON CONFLICT DO UPDATE`. No progress row: that is the sink's exactly-once cost.
fn postgres_reference(pg: &str, batches: &[(u64, Vec<(String, i64)>)]) -> Result<Reference, BoxError> {
    let mut c = postgres::Client::connect(pg, postgres::NoTls)?;
    c.batch_execute(
        "CREATE TABLE totals_ref (key TEXT PRIMARY KEY, total BIGINT NOT NULL); \
         CREATE TEMP TABLE stage_ref (key TEXT, total BIGINT) ON COMMIT DELETE ROWS",
    )?;
    let mut r = Reference { secs: 0.0, rows: 0 };
    for (_, rows) in batches {
        let t0 = Instant::now();
        let mut tx = c.transaction()?;
        let mut w = tx.copy_in("COPY stage_ref (key, total) FROM STDIN (FORMAT binary)")?;
        w.write_all(&binary_copy(rows))?;
        w.finish()?;
        tx.execute(
            "INSERT INTO totals_ref (key, total) SELECT key, total FROM stage_ref \
             ON CONFLICT (key) DO UPDATE SET total = EXCLUDED.total",
            &[],
        )?;
        tx.commit()?;
        r.secs += t0.elapsed().as_secs_f64();
        r.rows += rows.len() as u64;
    }
    Ok(r)
}

/// `(key, total)` rows in PostgreSQL's binary `COPY` format (`TEXT`, `BIGINT`), encoded by hand
/// into one buffer: the cheapest encoding a plain client can do.
fn binary_copy(rows: &[(String, i64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(19 + rows.len() * 32);
    b.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    b.extend_from_slice(&0i32.to_be_bytes()); // flags
    b.extend_from_slice(&0i32.to_be_bytes()); // header extension
    for (k, t) in rows {
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&(k.len() as i32).to_be_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&t.to_be_bytes());
    }
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b
}

/// For information: the same batches with a plain binary `COPY` each (one transaction per batch)
/// into a fresh table without a key, no upsert: the most PostgreSQL takes in.
fn postgres_plain_copy(pg: &str, batches: &[(u64, Vec<(String, i64)>)]) -> Result<Reference, BoxError> {
    let mut c = postgres::Client::connect(pg, postgres::NoTls)?;
    c.batch_execute("CREATE TABLE totals_copy (key TEXT NOT NULL, total BIGINT NOT NULL)")?;
    let mut r = Reference { secs: 0.0, rows: 0 };
    for (_, rows) in batches {
        let t0 = Instant::now();
        let mut w = c.copy_in("COPY totals_copy (key, total) FROM STDIN (FORMAT binary)")?;
        w.write_all(&binary_copy(rows))?;
        w.finish()?;
        r.secs += t0.elapsed().as_secs_f64();
        r.rows += rows.len() as u64;
    }
    Ok(r)
}

/// The Kafka reference: a plain transactional producer writes the sink's lines (same key, same
/// `"<batch>:<key>:<total>"` value, same batches) to `OUTPUT_REF`: `init_transactions` once, then
/// per batch begin, send every record, commit (which waits for every delivery). No batch marker:
/// that is the sink's exactly-once cost. Librdkafka defaults, as the sink's producer
/// (`linger.ms=0`, or waiting for the deliveries before the commit, made no difference beyond the
/// noise: the broker is the limit).
fn kafka_reference(brokers: &str, batches: &[(u64, Vec<(String, i64)>)]) -> Result<Reference, BoxError> {
    let producer: BaseProducer = client_config(brokers)
        .set("transactional.id", "bench-reference")
        .set("enable.idempotence", "true")
        .create()?;
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout)?;
    let mut r = Reference { secs: 0.0, rows: 0 };
    for (batch, rows) in batches {
        let t0 = Instant::now();
        producer.begin_transaction()?;
        for (k, t) in rows {
            let value = format!("{batch}:{k}:{t}");
            let mut rec = Some(BaseRecord::to(OUTPUT_REF).key(k.as_bytes()).payload(value.as_bytes()));
            while let Some(x) = rec.take() {
                if let Err((e, back)) = producer.send(x) {
                    if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                        return Err(format!("reference producer: {e}").into());
                    }
                    producer.poll(Duration::from_millis(1));
                    rec = Some(back);
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.commit_transaction(timeout)?;
        r.secs += t0.elapsed().as_secs_f64();
        r.rows += rows.len() as u64;
    }
    Ok(r)
}

/// The read floor: one plain consumer, no engine, reads the whole input topic (all partitions
/// assigned at once from the start, librdkafka defaults). Returns seconds.
fn read_floor(brokers: &str, partitions: i32, records: u64) -> Result<f64, BoxError> {
    let c: BaseConsumer = client_config(brokers)
        .set("group.id", "bench-read-floor")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(INPUT, p, Offset::Beginning)?;
    }
    let t0 = Instant::now();
    c.assign(&tpl)?;
    let mut n = 0;
    while n < records {
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(format!("read floor: only {n} of {records} records within 600 s").into());
        }
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            m?;
            n += 1;
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn job_row(w: &mut impl Write, label: &str, run: &JobRun, base: f64) -> Result<serde_json::Value, BoxError> {
    let n = run.summary.new_batches.max(1) as f64;
    let bm = run.batch_ms();
    let mean_ms = bm.iter().sum::<f64>() / bm.len().max(1) as f64;
    let p99 = percentile(&bm, 0.99);
    let ckpt_bytes = run.summary.checkpoint_bytes as f64 / n;
    let objects = (run.summary.checkpoint_objects + run.summary.log_objects) as f64 / n;
    let ratio = run.records_per_s() / base;
    let (read, sink, plan) = (run.mean(|b| b.read), run.mean(|b| b.sink), run.mean(|b| b.plan));
    let operators = run.mean(|b| b.processing - b.read - b.sink);
    let ckpt = run.mean(|b| b.on_path - b.plan);
    let rows_per_batch = run.rows_written() as f64 / n;
    let sink_text = if run.has_sink {
        format!("{sink:.1} ({:.0} rows/s in the sink)", rows_per_batch / (sink / 1e3).max(1e-9))
    } else {
        "-".to_string()
    };
    let rows = [
        (
            format!("[{label}] records/s (wall {:.2} s)", run.wall_s),
            format!("{:.0} (ratio {ratio:.3})", run.records_per_s()),
        ),
        (
            format!("[{label}] batches / checkpoints / rows out"),
            format!("{} / {} / {}", run.summary.new_batches, run.summary.checkpoints, run.rows_written()),
        ),
        (format!("[{label}] batch ms mean / p99"), format!("{mean_ms:.1} / {p99:.1}")),
        (
            format!("[{label}] mean ms: source read / operators / sink"),
            format!("{read:.1} / {operators:.1} / {sink_text}"),
        ),
        (format!("[{label}] mean ms: source plan / checkpoint on path"), format!("{plan:.1} / {ckpt:.1}")),
        (
            format!("[{label}] ckpt bytes/batch, objects/batch, at end"),
            format!("{ckpt_bytes:.0}, {objects:.2}, {} ({} bytes)", run.objects_end, run.bytes_end),
        ),
    ];
    for (k, v) in rows {
        writeln!(w, "{k:<55} {v}")?;
    }
    Ok(serde_json::json!({
        "records_per_s": run.records_per_s().round(),
        "wall_s": run.wall_s,
        "ratio_to_none": ratio,
        "batches": run.summary.new_batches,
        "checkpoints": run.summary.checkpoints,
        "rows_out": run.rows_written(),
        "mean_batch_ms": mean_ms,
        "p99_batch_ms": p99,
        "mean_read_ms": read,
        "mean_operators_ms": operators,
        "mean_sink_ms": run.has_sink.then_some(sink),
        "mean_plan_ms": plan,
        "mean_ckpt_ms": ckpt,
        "ckpt_bytes_per_batch": ckpt_bytes.round(),
        "objects_per_batch": objects,
        "ckpt_objects_end": run.objects_end,
        "ckpt_bytes_end": run.bytes_end,
    }))
}

pub fn kafka(mut a: KafkaArgs) -> Result<(), BoxError> {
    if a.quick {
        a.records = a.records.min(30_000);
        a.max_per_partition = a.max_per_partition.min(1_000);
    }
    let start = Instant::now();
    let say = |what: &str| eprintln!("[{:6.1} s] {what}", start.elapsed().as_secs_f64());
    say("starting nisshi and PostgreSQL on 127.0.0.1...");
    let broker = KafkaBroker::start();
    let pg_server = PgServer::start();
    let (brokers, pg) = (broker.bootstrap.clone(), pg_server.conn());
    create_topics(&brokers, a.partitions)?;
    postgres::Client::connect(&pg, postgres::NoTls)?
        .batch_execute("CREATE TABLE totals (key TEXT PRIMARY KEY, total BIGINT NOT NULL)")?;

    say(&format!("producing {} records over {} users to {} partitions...", a.records, a.users, a.partitions));
    let (expected, produce_s) = produce(&brokers, &a)?;
    let sizes = partition_sizes(&brokers, INPUT, a.partitions)?;
    if sizes.iter().sum::<i64>() != a.records as i64 {
        return Err(
            format!("the input topic holds {sizes:?} records per partition, not {}", a.records).into()
        );
    }
    let produce_rps = a.records as f64 / produce_s;
    say("read floor: one plain consumer reads the topic...");
    let floor_s = read_floor(&brokers, a.partitions, a.records)?;

    // The baseline runs first and again last, so drift over the run shows, and the sinks'
    // ratios are to the mean of the two.
    let tmp = tempfile::tempdir()?;
    let mut runs = Vec::new();
    let (mut pg_ref, mut pg_copy, mut kafka_ref) = (None, None, None);
    let (mut pg_alone, mut kafka_alone) = (None, None);
    for (label, sink) in [
        ("none", Sink::None),
        ("postgres", Sink::Postgres),
        ("kafka", Sink::Kafka),
        ("none again", Sink::None),
    ] {
        say(&format!("job: Kafka -> update_state_by_key -> {label} ..."));
        let dir = tmp.path().join(label.replace(' ', "-"));
        std::fs::create_dir_all(&dir)?;
        let run = run_job(sink, &a, &brokers, &pg, &dir)?;
        match sink {
            Sink::Postgres => {
                say("for information: the sink alone, the same batches...");
                pg_alone = Some(sink_alone(sink, &pg, &brokers, &run.written)?);
                say("reference: plain COPY into a staging table + one upsert per batch...");
                pg_ref = Some(postgres_reference(&pg, &run.written)?);
                say("for information: plain COPY, no upsert...");
                pg_copy = Some(postgres_plain_copy(&pg, &run.written)?);
            }
            Sink::Kafka => {
                say("for information: the sink alone, the same batches...");
                kafka_alone = Some(sink_alone(sink, &pg, &brokers, &run.written)?);
                say("reference: plain transactional producer, one transaction per batch...");
                kafka_ref = Some(kafka_reference(&brokers, &run.written)?);
            }
            Sink::None => {}
        }
        runs.push((label, sink, run, dir));
    }
    let (pg_ref, pg_copy, kafka_ref) = (
        pg_ref.ok_or("no PostgreSQL reference")?,
        pg_copy.ok_or("no plain COPY")?,
        kafka_ref.ok_or("no Kafka reference")?,
    );
    let (pg_alone, kafka_alone) =
        (pg_alone.ok_or("no PostgreSQL sink alone")?, kafka_alone.ok_or("no Kafka sink alone")?);

    say("read floor again...");
    let floor2_s = read_floor(&brokers, a.partitions, a.records)?;
    let (floor1_rps, floor2_rps) = (a.records as f64 / floor_s, a.records as f64 / floor2_s);
    // Like the baseline, the mean of a measurement at the start and one at the end.
    let floor_rps = (floor1_rps + floor2_rps) / 2.0;
    say("checking the output...");
    // Correctness: every run read every record once, its final checkpoint holds the input's
    // totals, and each sink's output agrees.
    let mut problems = Vec::new();
    for (label, _, run, dir) in &runs {
        if run.records_read != a.records {
            problems.push(format!("{label}: read {} records, not {}", run.records_read, a.records));
        }
        if checkpointed_totals(dir)? != expected {
            problems.push(format!("{label}: checkpointed totals differ from the input's"));
        }
    }
    let run_of = |s: Sink| &runs.iter().find(|r| r.1 == s).expect("every sink ran").2;
    let (pg_run, kafka_run) = (run_of(Sink::Postgres), run_of(Sink::Kafka));
    let (pg_totals, pg_done) = postgres_totals(&pg, &pg_run.job_id)?;
    if pg_totals != expected {
        problems.push(format!(
            "postgres: the table's {} totals differ from the input's {}",
            pg_totals.len(),
            expected.len()
        ));
    }
    if pg_done != pg_run.summary.new_batches as i64 - 1 {
        problems.push(format!("postgres: progress row says batch {pg_done}"));
    }
    let out = kafka_output(&brokers, &kafka_run.job_id)?;
    let kafka_batches = kafka_run.summary.new_batches;
    if out.last != expected {
        problems.push("kafka: the last total per key in the output topic differs from the input's".into());
    }
    if out.committed_marker != kafka_batches as i64 {
        problems
            .push(format!("kafka: committed marker {} after {kafka_batches} batches", out.committed_marker));
    }
    if out.batch_ids.len() as u64 != kafka_batches || out.lines != kafka_run.rows_written() {
        problems.push(format!(
            "kafka: {} lines from {} batches in the topic, the sink wrote {} lines in {kafka_batches} batches",
            out.lines,
            out.batch_ids.len(),
            kafka_run.rows_written()
        ));
    }
    let correct = problems.is_empty();
    say("done");

    let (none1, none2) = (runs[0].2.records_per_s(), runs[3].2.records_per_s());
    let base = (none1 + none2) / 2.0;
    let mut w = std::io::stdout().lock();
    let rows = [
        ("records (input topic)", format!("{} over {} users", a.records, expected.len())),
        ("partitions / records per partition", format!("{} / {sizes:?}", a.partitions)),
        ("max_per_partition (records per partition per batch)", a.max_per_partition.to_string()),
        ("produce: records/s (all acknowledged)", format!("{produce_rps:.0} ({produce_s:.2} s)")),
        (
            "read floor: records/s (one plain consumer): first / last / mean",
            format!("{floor1_rps:.0} / {floor2_rps:.0} / {floor_rps:.0}"),
        ),
        ("baseline records/s: first / last / mean", format!("{none1:.0} / {none2:.0} / {base:.0}")),
    ];
    for (k, v) in &rows {
        writeln!(w, "{k:<55} {v}")?;
    }
    let mut json_runs = serde_json::Map::new();
    for (label, _, run, _) in &runs {
        json_runs.insert(label.replace(' ', "_"), job_row(&mut w, label, run, base)?);
    }
    let ratio_pg = pg_run.records_per_s() / base;
    let ratio_kafka = kafka_run.records_per_s() / base;
    let sink_rps = |run: &JobRun| {
        run.rows_written() as f64 / (run.mean(|b| b.sink) * run.batches.len() as f64 / 1e3).max(1e-9)
    };
    let (pg_sink_rps, kafka_sink_rps) = (sink_rps(pg_run), sink_rps(kafka_run));
    let vs_pg = pg_sink_rps / pg_ref.rows_per_s();
    let vs_kafka = kafka_sink_rps / kafka_ref.rows_per_s();
    let vs_floor = base / floor_rps;
    let verdict = |r: f64, t: f64| if r >= t { "met" } else { "missed" };
    let rows = [
        ("ratio postgres / none, kafka / none", format!("{ratio_pg:.3}, {ratio_kafka:.3}")),
        (
            "postgres reference (COPY + upsert): rows/s",
            format!(
                "{:.0} ({:.1} ms per batch)",
                pg_ref.rows_per_s(),
                pg_ref.secs * 1e3 / pg_run.written.len().max(1) as f64
            ),
        ),
        ("  for information: plain COPY, no upsert: rows/s", format!("{:.0}", pg_copy.rows_per_s())),
        (
            "  for information: the sink alone: rows/s (/ reference)",
            format!("{:.0} ({:.3})", pg_alone.rows_per_s(), pg_alone.rows_per_s() / pg_ref.rows_per_s()),
        ),
        (
            "postgres sink / reference (target 0.8)",
            format!(
                "{pg_sink_rps:.0} / {:.0} = {vs_pg:.3} ({})",
                pg_ref.rows_per_s(),
                verdict(vs_pg, TARGET_POSTGRES)
            ),
        ),
        (
            "kafka reference (transactional producer): rows/s",
            format!(
                "{:.0} ({:.1} ms per batch)",
                kafka_ref.rows_per_s(),
                kafka_ref.secs * 1e3 / kafka_run.written.len().max(1) as f64
            ),
        ),
        (
            "  for information: the sink alone: rows/s (/ reference)",
            format!(
                "{:.0} ({:.3})",
                kafka_alone.rows_per_s(),
                kafka_alone.rows_per_s() / kafka_ref.rows_per_s()
            ),
        ),
        (
            "kafka sink / reference (target 0.9)",
            format!(
                "{kafka_sink_rps:.0} / {:.0} = {vs_kafka:.3} ({})",
                kafka_ref.rows_per_s(),
                verdict(vs_kafka, TARGET_KAFKA)
            ),
        ),
        (
            "source: job without sink / read floor (target 0.9)",
            format!("{base:.0} / {floor_rps:.0} = {vs_floor:.3} ({})", verdict(vs_floor, TARGET_SOURCE)),
        ),
        (
            "kafka output: lines / batches / committed marker",
            format!("{} / {} / {}", out.lines, out.batch_ids.len(), out.committed_marker),
        ),
        ("postgres table: keys / progress batch id", format!("{} / {pg_done}", pg_totals.len())),
        ("correct", correct.to_string()),
    ];
    for (k, v) in &rows {
        writeln!(w, "{k:<55} {v}")?;
    }
    for p in &problems {
        writeln!(w, "  problem: {p}")?;
    }
    let json = serde_json::json!({
        "records": a.records,
        "users": expected.len(),
        "partitions": a.partitions,
        "max_per_partition": a.max_per_partition,
        "produce_records_per_s": produce_rps.round(),
        "produce_s": produce_s,
        "read_floor_records_per_s": floor_rps.round(),
        "read_floor_first_records_per_s": floor1_rps.round(),
        "read_floor_last_records_per_s": floor2_rps.round(),
        "baseline_records_per_s": base.round(),
        "runs": json_runs,
        "ratio_postgres_to_none": ratio_pg,
        "ratio_kafka_to_none": ratio_kafka,
        "postgres_sink_rows_per_s": pg_sink_rps.round(),
        "postgres_reference_rows_per_s": pg_ref.rows_per_s().round(),
        "postgres_plain_copy_rows_per_s": pg_copy.rows_per_s().round(),
        "ratio_postgres_sink_to_reference": vs_pg,
        "target_postgres_sink_to_reference": TARGET_POSTGRES,
        "kafka_sink_rows_per_s": kafka_sink_rps.round(),
        "kafka_reference_rows_per_s": kafka_ref.rows_per_s().round(),
        "kafka_sink_alone_rows_per_s": kafka_alone.rows_per_s().round(),
        "postgres_sink_alone_rows_per_s": pg_alone.rows_per_s().round(),
        "ratio_kafka_sink_to_reference": vs_kafka,
        "target_kafka_sink_to_reference": TARGET_KAFKA,
        "ratio_source_to_read_floor": vs_floor,
        "target_source_to_read_floor": TARGET_SOURCE,
        "correct": correct,
    });
    writeln!(w, "{json}")?;
    drop(w);
    drop(broker);
    drop(pg_server);
    if !correct {
        return Err(format!("incorrect output: {}", problems.join("; ")).into());
    }
    Ok(())
}
