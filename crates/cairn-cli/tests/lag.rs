//! `cairn checkpoint ls --brokers` against nisshi on 127.0.0.1: the lag of each Kafka partition
//! (its end offset now minus where the newest planned batch ends), for a job that runs as one
//! process and per task for a scaled-out one.

mod support;
use cairn::checkpoint::paths::task_location;
use cairn::{StreamingContext, TaskId, Trigger};
use cairn_connectors::kafka::{KafkaSource, StartFrom};
use cairn_sim::kafka::KafkaBroker;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::time::Duration;
use support::{cairn, json, text};

const PER_PARTITION: u64 = 30;
const MAX: u64 = 5;
const BATCHES: u64 = 2;

fn produce(broker: &KafkaBroker) {
    let producer: BaseProducer = broker.client_config().create().unwrap();
    for p in 0..2 {
        for i in 0..PER_PARTITION {
            let v = format!("{p}-{i}");
            producer.send(BaseRecord::to("clicks").key(&v).payload(&v).partition(p)).unwrap();
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Runs `BATCHES` batches of `MAX` records per partition at `loc` (as task `task` of 2 when given).
fn run(broker: &KafkaBroker, loc: &str, task: Option<u32>) {
    let mut b = StreamingContext::builder()
        .checkpoint(loc)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(BATCHES)
        .max_checkpoint_deferral(0);
    if let Some(t) = task {
        b = b.task(TaskId(t), 2);
    }
    let ctx = b.build().unwrap();
    let source = KafkaSource::new(&broker.bootstrap, "clicks", StartFrom::Earliest, MAX).unwrap();
    ctx.source("kafka", source).unwrap().count().foreach_batch(|_, _| Ok(()));
    ctx.run_available().unwrap();
}

#[test]
fn ls_shows_each_kafka_partitions_lag_from_the_brokers() {
    let broker = KafkaBroker::start();
    broker.create_topic("clicks", 2);
    produce(&broker);
    let dir = tempfile::tempdir().unwrap();
    let want_next = MAX * BATCHES;
    let want_lag = PER_PARTITION - want_next;

    // One process: both partitions.
    let single = dir.path().join("single");
    let single = single.to_str().unwrap();
    run(&broker, single, None);
    let without = json(&cairn(&["checkpoint", "ls", single, "--json"]));
    assert!(without["positions"].as_array().unwrap().iter().all(|p| p["lag"].is_null()), "{without}");
    let out = cairn(&["checkpoint", "ls", single, "--brokers", &broker.bootstrap, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let positions = json(&out)["positions"].as_array().unwrap().clone();
    assert_eq!(positions.len(), 2, "{positions:?}");
    for (i, p) in positions.iter().enumerate() {
        assert_eq!(p["partition"], serde_json::json!({"topic": "clicks", "partition": i}));
        assert_eq!(p["next"], want_next);
        assert_eq!(p["lag"], want_lag, "{positions:?}");
    }
    let table = text(&cairn(&["checkpoint", "ls", single, "--brokers", &broker.bootstrap]));
    let row = [String::from("kafka"), "clicks[1]".into(), want_next.to_string(), want_lag.to_string()];
    assert!(table.lines().any(|l| l.split_whitespace().map(String::from).eq(row.iter().cloned())), "{table}");

    // Scaled out: task 1 of 2 read only partition 1; task 0 never ran.
    let root = dir.path().join("scaled");
    let root = root.to_str().unwrap();
    run(&broker, &task_location(root, 1), Some(1));
    let tasks = json(&cairn(&["checkpoint", "ls", root, "--brokers", &broker.bootstrap, "--json"]));
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["task"], 1);
    let p = &tasks[0]["positions"];
    assert_eq!(p.as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p[0]["partition"]["partition"], 1);
    assert_eq!(p[0]["lag"], want_lag);
    let table = text(&cairn(&["checkpoint", "ls", root, "--brokers", &broker.bootstrap]));
    let row = table.lines().find(|l| l.starts_with("1 ")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(&format!(" {want_lag} ")) && row.contains("clicks[1]=10"), "{table}");

    // Brokers that do not answer: an error naming the partition, not a table without lag.
    let nobody = format!("127.0.0.1:{}", cairn_sim::tools::free_port());
    let out = cairn(&["checkpoint", "ls", single, "--brokers", &nobody]);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot read the end offset of clicks[0]"), "{}", text(&out));
}
