//! The raw-log reader against a real broker (nisshi): committed, aborted and non-transactional
//! records, and the markers that tell them apart.

use cairn_sim::kafka::KafkaBroker;
use cairn_sim::kafka_log::{committed_view, read_partition_log, ControlType};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn send(p: &BaseProducer, values: &[&str]) {
    for v in values {
        p.send(BaseRecord::<str, str>::to("t").key("k").payload(*v)).unwrap();
    }
    p.flush(T).unwrap();
}

fn strings(v: Vec<Vec<u8>>) -> Vec<String> {
    v.into_iter().map(|b| String::from_utf8(b).unwrap()).collect()
}

#[test]
fn committed_view_of_a_real_log_keeps_committed_and_drops_aborted_transactions() {
    let broker = KafkaBroker::start();
    broker.create_topic("t", 1);
    let cfg = broker.client_config();

    let tx: BaseProducer = cfg.clone().set("transactional.id", "kafka-log-test").create().unwrap();
    tx.init_transactions(T).unwrap();
    tx.begin_transaction().unwrap();
    send(&tx, &["c1", "c2"]);
    tx.commit_transaction(T).unwrap();
    tx.begin_transaction().unwrap();
    send(&tx, &["a1", "a2", "a3"]);
    tx.abort_transaction(T).unwrap();
    let plain: BaseProducer = cfg.create().unwrap();
    send(&plain, &["plain"]);
    tx.begin_transaction().unwrap();
    send(&tx, &["c3"]);
    tx.commit_transaction(T).unwrap();

    let log = read_partition_log(&broker.bootstrap, "t", 0).unwrap();
    for r in &log {
        eprintln!(
            "{:>3} pid {:>3} epoch {} txn {:<5} {:?} {:?}",
            r.offset,
            r.producer_id,
            r.producer_epoch,
            r.transactional,
            r.control,
            r.value.as_deref().map(String::from_utf8_lossy)
        );
    }
    // 7 data records and 3 markers, every offset from 0 present once.
    let offsets: Vec<i64> = log.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>(), "the whole log, in order");
    let markers: Vec<ControlType> = log.iter().filter_map(|r| r.control).collect();
    assert_eq!(markers, [ControlType::Commit, ControlType::Abort, ControlType::Commit]);
    let tx_pid = log[0].producer_id;
    assert!(tx_pid >= 0 && log[0].transactional, "{:?}", log[0]);
    assert!(log.iter().filter(|r| r.control.is_some()).all(|r| r.producer_id == tx_pid && r.transactional));
    let plain_rec = log.iter().find(|r| r.value.as_deref() == Some(b"plain")).unwrap();
    assert!(!plain_rec.transactional, "{plain_rec:?}");

    let (committed, aborted) = committed_view(&log).unwrap();
    assert_eq!(strings(committed), ["c1", "c2", "plain", "c3"]);
    assert_eq!(strings(aborted), ["a1", "a2", "a3"]);

    // Cut before the last marker, the last transaction is open: an error, not a guess.
    let e = committed_view(&log[..log.len() - 1]).unwrap_err();
    assert!(e.contains("still open"), "{e}");
}

#[test]
fn an_empty_partition_has_an_empty_log_and_other_addresses_are_refused() {
    let broker = KafkaBroker::start();
    broker.create_topic("e", 1);
    assert_eq!(read_partition_log(&broker.bootstrap, "e", 0).unwrap(), vec![]);
    let e = read_partition_log("192.0.2.1:9092", "e", 0).unwrap_err();
    assert!(e.contains("loopback"), "{e}");
}
