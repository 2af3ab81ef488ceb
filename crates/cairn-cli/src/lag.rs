//! Lag from the brokers for `cairn checkpoint ls --brokers`: a checkpoint knows where each Kafka
//! partition's next batch starts, the brokers know where the partition ends.

use cairn::checkpoint::admin::Position;
use cairn::checkpoint::SourcePartition;

/// Sets the lag of every Kafka partition among `positions` from the end offsets `brokers` report
/// now; other partitions (files, generators, a repartition topic's per-writer entries) keep none.
#[cfg(feature = "kafka")]
pub(crate) fn fill<'a>(
    brokers: &str,
    positions: impl Iterator<Item = &'a mut Position>,
) -> Result<(), Box<dyn std::error::Error>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::collections::BTreeMap;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .map_err(|e| format!("cannot create a Kafka client for {brokers}: {e}"))?;
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for p in positions {
        let SourcePartition::Topic { topic, partition } = &p.partition else { continue };
        let key = (topic.clone(), *partition);
        let end = match ends.get(&key) {
            Some(end) => *end,
            None => {
                let (_, high) =
                    consumer.fetch_watermarks(topic, key.1, std::time::Duration::from_secs(10)).map_err(
                        |e| format!("cannot read the end offset of {} from {brokers}: {e}", p.partition),
                    )?;
                ends.insert(key, high);
                high
            }
        };
        p.lag = Some((end.max(0) as u64).saturating_sub(p.next));
    }
    Ok(())
}

/// Without Kafka support, asking for lag is an error rather than a table without it.
#[cfg(not(feature = "kafka"))]
pub(crate) fn fill<'a>(
    brokers: &str,
    _positions: impl Iterator<Item = &'a mut Position>,
) -> Result<(), Box<dyn std::error::Error>> {
    Err(format!("--brokers {brokers}: this cairn was built without Kafka support (feature \"kafka\")").into())
}
