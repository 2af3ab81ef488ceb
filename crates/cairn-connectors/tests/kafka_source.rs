//! The Kafka direct source's options against a real Kafka-protocol broker (nisshi) on 127.0.0.1:
//! topic lists and patterns, new topics, start positions, retention gaps, and
//! records that do not decode (failing the batch, or to a dead-letter topic).

use cairn::source::Source;
use cairn::{StreamingContext, Trigger};
use cairn_connectors::kafka::{Decode, KafkaRecord, KafkaSink, KafkaSource, StartFrom, Topics};
use cairn_sim::kafka::KafkaBroker;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::collections::BTreeMap;
use std::time::Duration;

fn admin(broker: &KafkaBroker) -> AdminClient<DefaultClientContext> {
    let cfg = broker.client_config();
    cfg.create().unwrap()
}

/// Produces `values` to one partition of `topic`, keyed by the value.
fn produce(broker: &KafkaBroker, topic: &str, partition: i32, values: &[String]) {
    let cfg = broker.client_config();
    let producer: BaseProducer = cfg.create().unwrap();
    for v in values {
        producer.send(BaseRecord::to(topic).key(v).payload(v).partition(partition)).unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn numbers(prefix: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// A context checkpointing to `dir` that runs until the input is drained (or `batches` exist).
fn context(dir: &str, batches: Option<u64>) -> StreamingContext {
    let mut b =
        StreamingContext::builder().checkpoint(dir).trigger(Trigger::AvailableNow).max_checkpoint_deferral(0);
    if let Some(n) = batches {
        b = b.stop_after_batches(n);
    }
    b.build().unwrap()
}

/// Runs a job over `source` until the input is drained; returns every value it saw per topic.
fn drain(dir: &str, source: KafkaSource) -> cairn::Result<BTreeMap<String, Vec<String>>> {
    let ctx = context(dir, None);
    let records = ctx.source("kafka", source)?;
    let seen = cairn::testing::collect(
        &records.map(|r: KafkaRecord| (r.topic, String::from_utf8(r.value.unwrap_or_default()).unwrap())),
    );
    ctx.run_available()?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, v) in seen.lock().unwrap().concat() {
        out.entry(t).or_default().push(v);
    }
    for v in out.values_mut() {
        v.sort();
    }
    Ok(out)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn a_pattern_reads_matching_topics_and_picks_up_new_topics() {
    let broker = KafkaBroker::start();
    broker.create_topic("orders-eu", 2);
    broker.create_topic("orders-us", 1);
    broker.create_topic("payments", 1);
    produce(&broker, "orders-eu", 0, &numbers("eu", 0..10));
    produce(&broker, "orders-eu", 1, &numbers("eu", 10..15));
    produce(&broker, "orders-us", 0, &numbers("us", 0..7));
    produce(&broker, "payments", 0, &numbers("pay", 0..5));
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let source = || {
        KafkaSource::builder(&broker.bootstrap, Topics::pattern("orders-.*").unwrap())
            .max_per_partition(4)
            .build()
            .unwrap()
    };
    let first = drain(loc, source()).unwrap();
    assert_eq!(first.keys().collect::<Vec<_>>(), ["orders-eu", "orders-us"], "payments does not match");
    assert_eq!(first["orders-eu"], sorted(numbers("eu", 0..15)));
    assert_eq!(first["orders-us"], sorted(numbers("us", 0..7)));

    // A topic created later and more records: only the new ones. (Adding partitions to an
    // existing topic is not exercised here: neither nisshi nor librdkafka's mock cluster
    // implements CreatePartitions; a partition without a position is planned like a new topic's,
    // see the planning unit tests.)
    broker.create_topic("orders-asia", 1);
    produce(&broker, "orders-asia", 0, &numbers("asia", 0..3));
    produce(&broker, "orders-eu", 1, &numbers("eu", 15..17));
    let second = drain(loc, source()).unwrap();
    assert_eq!(second["orders-asia"], sorted(numbers("asia", 0..3)));
    assert!(!second.contains_key("orders-us"), "nothing new there: {second:?}");
    assert_eq!(second["orders-eu"], sorted(numbers("eu", 15..17)));
}

#[test]
fn a_topic_list_is_read_and_a_missing_topic_is_an_error() {
    let broker = KafkaBroker::start();
    broker.create_topic("a", 1);
    broker.create_topic("b.events", 1);
    produce(&broker, "a", 0, &numbers("a", 0..3));
    produce(&broker, "b.events", 0, &numbers("b", 0..2));
    let dir = tempfile::tempdir().unwrap();
    let got = drain(
        dir.path().to_str().unwrap(),
        KafkaSource::builder(&broker.bootstrap, ["a", "b.events"]).build().unwrap(),
    )
    .unwrap();
    assert_eq!(got["a"], numbers("a", 0..3));
    assert_eq!(got["b.events"], numbers("b", 0..2));
    let dir = tempfile::tempdir().unwrap();
    let err = drain(
        dir.path().to_str().unwrap(),
        KafkaSource::builder(&broker.bootstrap, ["a", "nope"]).build().unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("topic nope not found"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err =
        drain(dir.path().to_str().unwrap(), KafkaSource::builder(&broker.bootstrap, "nope").build().unwrap())
            .unwrap_err()
            .to_string();
    assert!(err.contains("topic nope not found"), "{err}");
}

#[test]
fn start_positions_latest_and_explicit_offsets() {
    let broker = KafkaBroker::start();
    broker.create_topic("t", 2);
    produce(&broker, "t", 0, &numbers("old", 0..5));
    produce(&broker, "t", 1, &numbers("p1-", 0..5));
    // Explicit: partition 0 from offset 3; partition 1 has no entry and starts at the earliest.
    let explicit = StartFrom::Offsets([(("t".to_string(), 0), 3)].into());
    let dir = tempfile::tempdir().unwrap();
    let got = drain(
        dir.path().to_str().unwrap(),
        KafkaSource::builder(&broker.bootstrap, "t").start(explicit).build().unwrap(),
    )
    .unwrap();
    assert_eq!(got["t"], sorted([numbers("old", 3..5), numbers("p1-", 0..5)].concat()));

    // Latest, under a processing-time trigger: the first batch pins the end offsets (an empty
    // batch, logged), and records produced afterwards are all read.
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder()
        .checkpoint(dir.path().to_str().unwrap())
        .stop_after_batches(1)
        .build()
        .unwrap();
    let records = ctx
        .source(
            "kafka",
            KafkaSource::builder(&broker.bootstrap, "t").start(StartFrom::Latest).build().unwrap(),
        )
        .unwrap();
    let first = cairn::testing::collect(&records);
    ctx.run().unwrap();
    assert!(first.lock().unwrap().concat().is_empty(), "nothing old is read");
    produce(&broker, "t", 0, &numbers("new", 0..4));
    let got = drain(
        dir.path().to_str().unwrap(),
        KafkaSource::builder(&broker.bootstrap, "t").start(StartFrom::Latest).build().unwrap(),
    )
    .unwrap();
    assert_eq!(got["t"], numbers("new", 0..4));
}

#[test]
fn deleted_offsets_stop_the_job_unless_skipping_is_asked_for() {
    let broker = KafkaBroker::start();
    broker.create_topic("r", 1);
    produce(&broker, "r", 0, &numbers("v", 0..40));
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    // Read 20 of 40, then let "retention" delete everything below offset 30.
    let ctx = context(loc, Some(2));
    let records = ctx
        .source("kafka", KafkaSource::new(&broker.bootstrap, "r", StartFrom::Earliest, 10).unwrap())
        .unwrap();
    let _ = cairn::testing::collect(&records);
    ctx.run_available().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("r", 0, rdkafka::Offset::Offset(30)).unwrap();
    futures::executor::block_on(admin(&broker).delete_records(&tpl, &AdminOptions::new()))
        .expect("the broker deletes records (DeleteRecords)");
    let probe = KafkaSource::new(&broker.bootstrap, "r", StartFrom::Earliest, 100).unwrap();
    let low = probe.plan(&Default::default()).unwrap()[0].start;
    assert_eq!(low, 30, "the broker's low watermark after DeleteRecords");

    let err = drain(loc, KafkaSource::new(&broker.bootstrap, "r", StartFrom::Earliest, 10).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("partition r[0]") && err.contains("10 records lost"), "{err}");
    let got = drain(
        loc,
        KafkaSource::builder(&broker.bootstrap, "r")
            .max_per_partition(10)
            .skip_lost_records(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(got["r"], sorted(numbers("v", 30..40)), "goes on from the oldest record left");
}

/// Values are numbers; "oops" is not. Both policies: the batch fails naming the record, or the
/// record goes to a dead-letter topic (exactly once, with headers saying where it came from).
#[test]
fn records_that_do_not_decode_fail_the_batch_or_go_to_a_dead_letter_topic() {
    let broker = KafkaBroker::start();
    broker.create_topic("nums", 1);
    broker.create_topic("nums-dlq", 1);
    let values: Vec<String> = (0..12).map(|i| if i == 7 { "oops".into() } else { i.to_string() }).collect();
    produce(&broker, "nums", 0, &values);
    let parse = |r: &KafkaRecord| -> Result<u64, cairn::UserError> {
        Ok(std::str::from_utf8(r.value.as_deref().unwrap_or_default())?.parse::<u64>()?)
    };
    let job = |dir: &str, dead_letters: bool| {
        let ctx = context(dir, None);
        let records = ctx
            .source("kafka", KafkaSource::new(&broker.bootstrap, "nums", StartFrom::Earliest, 5).unwrap())
            .unwrap();
        let nums = if dead_letters {
            let (nums, dead) = records.decode_or_dead_letter(parse);
            KafkaSink::dead_letters(&broker.bootstrap, "nums-dlq", "nums-dlq").attach(&dead);
            nums
        } else {
            records.decode(parse)
        };
        let seen = cairn::testing::collect(&nums);
        (ctx, seen)
    };

    let dir = tempfile::tempdir().unwrap();
    let (ctx, seen) = job(dir.path().to_str().unwrap(), false);
    let err = ctx.run_available().unwrap_err().to_string();
    assert!(err.contains("batch 1") && err.contains("topic nums partition 0 offset 7"), "{err}");
    assert_eq!(seen.lock().unwrap().concat(), (0..5).collect::<Vec<u64>>(), "batch 0 only");
    // Nothing of the failed batch was committed: a restart fails on the same record again.
    let (ctx, _) = job(dir.path().to_str().unwrap(), false);
    let err = ctx.run_available().unwrap_err().to_string();
    assert!(err.contains("offset 7"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let (ctx, seen) = job(dir.path().to_str().unwrap(), true);
    ctx.run_available().unwrap();
    let good: Vec<u64> = seen.lock().unwrap().concat();
    assert_eq!(good, (0..12).filter(|i| *i != 7).collect::<Vec<u64>>());
    let dlq = KafkaSource::new(&broker.bootstrap, "nums-dlq", StartFrom::Earliest, 100).unwrap();
    let dead: Vec<KafkaRecord> =
        dlq.plan(&Default::default()).unwrap().iter().flat_map(|r| dlq.read(r).unwrap()).collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].value.as_deref(), Some(&b"oops"[..]));
    let header = |k: &str| {
        dead[0].headers.iter().find(|(n, _)| n == k).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("cairn.offset").as_deref(), Some("7"));
    assert_eq!(header("cairn.partition").as_deref(), Some("0"));
    assert_eq!(header("cairn.topic").as_deref(), Some("nums"));
    assert!(header("cairn.error").unwrap().contains("invalid digit"), "{:?}", header("cairn.error"));
}

/// Each progress record says, per partition, how many records the plan left unread: the lag
/// falls by the per-partition limit every batch and is zero once the backlog is read.
#[test]
fn progress_records_report_the_lag_per_partition() {
    let broker = KafkaBroker::start();
    broker.create_topic("backlog", 2);
    produce(&broker, "backlog", 0, &numbers("a", 0..10));
    produce(&broker, "backlog", 1, &numbers("b", 0..4));
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path().to_str().unwrap(), None);
    let source = KafkaSource::builder(&broker.bootstrap, "backlog")
        .start(StartFrom::Earliest)
        .max_per_partition(3)
        .build()
        .unwrap();
    ctx.source("kafka", source).unwrap().count().foreach_batch(|_, _| Ok(()));
    let lags = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = lags.clone();
    ctx.on_batch(move |b| {
        let by_partition: BTreeMap<String, u64> =
            b.source_lag.iter().map(|x| (format!("{}/{}", x.source, x.partition), x.records)).collect();
        l.lock().unwrap().push(by_partition);
    });
    ctx.run_available().unwrap();
    let lags = lags.lock().unwrap();
    let of = |p: &str| lags.iter().map(|m| m[&format!("kafka/backlog[{p}]")]).collect::<Vec<u64>>();
    assert_eq!(of("0"), vec![7, 4, 1, 0], "{lags:?}");
    assert_eq!(of("1"), vec![1, 0, 0, 0], "{lags:?}");
}
