//! Helpers shared by the tests that run the seed job.

use cairn::source::Source;
use cairn_connectors::kafka::{KafkaSource, StartFrom};
use std::collections::BTreeMap;

/// Every partition's record keys of topic `in`, in offset order.
pub fn input(brokers: &str) -> BTreeMap<i32, Vec<String>> {
    let src = KafkaSource::new(brokers, "in", StartFrom::Earliest, 1_000_000).unwrap();
    let mut out = BTreeMap::new();
    for r in src.plan(&Default::default()).unwrap() {
        for rec in src.read(&r).unwrap() {
            out.entry(rec.partition)
                .or_insert_with(Vec::new)
                .push(String::from_utf8(rec.key.unwrap()).unwrap());
        }
    }
    out
}
