//! A Kafka direct stream source: every batch's offset range per partition is planned (and logged
//! by cairn) before the batch runs, and the next offsets live in the checkpoint, so a restart
//! resumes at exactly the next record whatever the consumer group says.

use cairn::source::{Positions, Source};
use cairn::{OffsetRange, UserError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a partition starts when the checkpoint has no position for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record still on the broker.
    Earliest,
    /// Only records produced from now on.
    Latest,
    /// Explicit offsets per partition (others start at the earliest).
    Offsets(BTreeMap<i32, i64>),
}

/// One Kafka record, with everything the broker keeps about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Reads one topic. Build with [`KafkaSource::new`], add it with `StreamingContext::source`.
pub struct KafkaSource {
    brokers: String,
    topic: String,
    start: StartFrom,
    max_per_partition: u64,
    skip_lost: bool,
    timeout: Duration,
    metadata: Mutex<BaseConsumer>,
    readers: Mutex<HashMap<i32, BaseConsumer>>,
    /// Next offset per partition after the ranges read so far (for consumer-group commits).
    read_upto: Arc<Mutex<BTreeMap<i32, i64>>>,
}

/// Commits a source's read offsets to a consumer group after every completed batch, so the usual
/// lag tools see the job's progress. Recovery never reads them: the checkpoint is the truth.
pub struct GroupCommitter {
    topic: String,
    read_upto: Arc<Mutex<BTreeMap<i32, i64>>>,
    consumer: BaseConsumer,
}

impl cairn::StreamingListener for GroupCommitter {
    fn on_batch_completed(&self, p: &cairn::BatchProgress) {
        let upto = self.read_upto.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if upto.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (part, next) in upto {
            if let Err(e) = tpl.add_partition_offset(&self.topic, part, Offset::Offset(next)) {
                tracing::warn!("consumer-group commit after batch {}: {e}", p.batch_id);
                return;
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
            tracing::warn!(
                "consumer-group commit after batch {} failed (progress is unaffected): {e}",
                p.batch_id
            );
        }
    }
}

fn consumer(brokers: &str) -> Result<BaseConsumer, UserError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cairn-direct")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("broker.address.family", "v4")
        .create()?)
}

impl KafkaSource {
    /// Reads `topic` from `brokers`, at most `max_per_partition` records per partition per batch.
    pub fn new(
        brokers: &str,
        topic: &str,
        start: StartFrom,
        max_per_partition: u64,
    ) -> Result<Self, UserError> {
        Ok(Self {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            start,
            max_per_partition: max_per_partition.max(1),
            skip_lost: false,
            timeout: Duration::from_secs(30),
            metadata: Mutex::new(consumer(brokers)?),
            readers: Mutex::new(HashMap::new()),
            read_upto: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    /// A listener that commits what this source read to the consumer group `group` after every
    /// completed batch (register it with `StreamingContext::add_listener`).
    pub fn group_committer(&self, group: &str) -> Result<GroupCommitter, UserError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("broker.address.family", "v4")
            .create()?;
        Ok(GroupCommitter { topic: self.topic.clone(), read_upto: self.read_upto.clone(), consumer })
    }

    /// When the broker no longer has records the checkpoint says are next (retention deleted
    /// them), skip to the oldest available and log how many were lost, instead of failing.
    pub fn skip_lost_records(mut self, yes: bool) -> Self {
        self.skip_lost = yes;
        self
    }

    fn key(&self, p: i32) -> String {
        format!("{}-{p}", self.topic)
    }

    fn partition_of(&self, key: &str) -> Result<i32, UserError> {
        key.strip_prefix(&format!("{}-", self.topic))
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("{key:?} is not a partition of topic {}", self.topic).into())
    }
}

impl Source for KafkaSource {
    type Item = KafkaRecord;

    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>, UserError> {
        let md = self.metadata.lock().unwrap_or_else(|e| e.into_inner());
        let meta = md.fetch_metadata(Some(&self.topic), self.timeout)?;
        let topic = meta
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| format!("topic {} not found on {}", self.topic, self.brokers))?;
        let mut out = Vec::new();
        // New partitions are picked up at every plan.
        for p in topic.partitions() {
            let id = p.id();
            let (low, high) = md.fetch_watermarks(&self.topic, id, self.timeout)?;
            let key = self.key(id);
            let mut start = match positions.get(&key) {
                Some(&next) => next as i64,
                None => match &self.start {
                    StartFrom::Earliest => low,
                    StartFrom::Latest => high,
                    StartFrom::Offsets(m) => m.get(&id).copied().unwrap_or(low),
                },
            };
            if start < low {
                let lost = low - start;
                if !self.skip_lost {
                    return Err(format!(
                        "partition {key}: offsets {start}..{low} were deleted by the broker's retention ({lost} records lost); \
                         use skip_lost_records(true) to go on from offset {low}"
                    )
                    .into());
                }
                tracing::warn!(
                    "partition {key}: skipping {lost} records deleted by retention ({start}..{low})"
                );
                start = low;
            }
            let end = high.min(start + self.max_per_partition as i64);
            if end > start {
                out.push(OffsetRange { partition: key, start: start as u64, end: end as u64 });
            }
        }
        Ok(out)
    }

    fn read(&self, range: &OffsetRange) -> Result<Vec<KafkaRecord>, UserError> {
        let p = self.partition_of(&range.partition)?;
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let c = match readers.entry(p) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(consumer(&self.brokers)?),
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(range.start as i64))?;
        c.assign(&tpl)?;
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        let deadline = Instant::now() + self.timeout;
        let mut next = range.start as i64;
        while next < range.end as i64 {
            if Instant::now() > deadline {
                return Err(format!(
                    "partition {}: read only up to offset {next} of [{}, {}) within {:?}",
                    range.partition, range.start, range.end, self.timeout
                )
                .into());
            }
            let Some(m) = c.poll(Duration::from_millis(200)) else {
                // Transaction markers occupy offsets but are never delivered: once the consumer's
                // position has passed the range's end, nothing more is coming for it.
                let at = c
                    .position()?
                    .elements_for_topic(&self.topic)
                    .iter()
                    .find(|e| e.partition() == p)
                    .map(|e| e.offset());
                if let Some(Offset::Offset(pos)) = at {
                    if pos >= range.end as i64 {
                        break;
                    }
                }
                continue;
            };
            let m = m.map_err(|e| format!("partition {} at offset {next}: {e}", range.partition))?;
            if m.offset() < next || m.offset() >= range.end as i64 {
                continue;
            }
            next = m.offset() + 1;
            out.push(KafkaRecord {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                timestamp_ms: m.timestamp().to_millis(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        let mut upto = self.read_upto.lock().unwrap_or_else(|e| e.into_inner());
        let e = upto.entry(p).or_insert(0);
        *e = (*e).max(range.end as i64);
        Ok(out)
    }
}

/// What writing a batch to Kafka did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkOutcome {
    /// The batch's records were written in one committed transaction.
    Written { records: u64 },
    /// An earlier attempt committed this batch; nothing was written.
    AlreadyCommitted,
}

type ToKafka<T> = Arc<dyn Fn(&cairn::BatchInfo, &T) -> (Option<Vec<u8>>, Vec<u8>) + Send + Sync>;

/// Writes each batch to a topic in one Kafka transaction, exactly once per batch id.
///
/// The transactional id is stable per sink (`cairn-<name>`), so a restarted or duplicate
/// instance fences the old one. With the batch's records, the transaction commits the offset
/// `batch id + 1` for the consumer group `cairn-sink-<name>` on partition 0 of the output topic:
/// the sink reads it back before each batch, and a batch at or below it (committed to Kafka just
/// before a crash, replayed by cairn) is skipped — so no batch is ever written twice, even on a
/// broker that does not hide aborted records from `read_committed` consumers.
pub struct KafkaSink<T> {
    name: String,
    brokers: String,
    topic: String,
    to_record: ToKafka<T>,
    timeout: Duration,
    state: Mutex<Option<(rdkafka::producer::BaseProducer, BaseConsumer)>>,
}

impl<T: cairn::Data> KafkaSink<T> {
    /// A sink named `name` (stable across restarts) writing to `topic` with `to_record` giving
    /// each element's key and value.
    pub fn new(
        brokers: &str,
        name: &str,
        topic: &str,
        to_record: impl Fn(&cairn::BatchInfo, &T) -> (Option<Vec<u8>>, Vec<u8>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            to_record: Arc::new(to_record),
            timeout: Duration::from_secs(30),
            state: Mutex::new(None),
        }
    }

    /// Makes the sink an output of `stream`.
    pub fn attach(self, stream: &cairn::DStream<T>) {
        stream.foreach_batch(move |info, rows| self.write_batch(info, &rows).map(|_| ()));
    }

    fn group(&self) -> String {
        format!("cairn-sink-{}", self.name)
    }

    fn connect(&self) -> Result<(rdkafka::producer::BaseProducer, BaseConsumer), UserError> {
        use rdkafka::producer::Producer;
        let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("transactional.id", format!("cairn-{}", self.name))
            .set("enable.idempotence", "true")
            .set("broker.address.family", "v4")
            .create()?;
        producer
            .init_transactions(self.timeout)
            .map_err(|e| format!("Kafka sink {:?}: cannot init transactions: {e}", self.name))?;
        let marker: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", self.group())
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("broker.address.family", "v4")
            .create()?;
        Ok((producer, marker))
    }

    /// Writes one batch in one transaction, or skips it if an earlier attempt committed it.
    pub fn write_batch(&self, info: &cairn::BatchInfo, rows: &[T]) -> Result<SinkOutcome, UserError> {
        use rdkafka::producer::{BaseRecord, Producer};
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.is_none() {
            *state = Some(self.connect()?);
        }
        let (producer, marker) = state.as_ref().expect("connected above");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, 0);
        let committed = marker.committed_offsets(tpl, self.timeout)?;
        let done = committed
            .elements()
            .first()
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(0);
        if done > info.batch_id as i64 {
            tracing::info!(
                "Kafka sink {:?}: batch {} was already committed; skipping",
                self.name,
                info.batch_id
            );
            return Ok(SinkOutcome::AlreadyCommitted);
        }
        let fail = |e: rdkafka::error::KafkaError| -> UserError {
            format!("Kafka sink {:?}: batch {}: {e}", self.name, info.batch_id).into()
        };
        producer.begin_transaction().map_err(fail)?;
        let result = (|| {
            for r in rows {
                let (key, value) = (self.to_record)(info, r);
                let mut rec = BaseRecord::<Vec<u8>, Vec<u8>>::to(&self.topic).payload(&value);
                if let Some(k) = key.as_ref() {
                    rec = rec.key(k);
                }
                let mut rec = Some(rec);
                while let Some(r) = rec.take() {
                    if let Err((e, back)) = producer.send(r) {
                        if matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull))
                        {
                            producer.poll(Duration::from_millis(10));
                            rec = Some(back);
                        } else {
                            return Err(e);
                        }
                    }
                }
                producer.poll(Duration::ZERO);
            }
            producer.flush(self.timeout)?;
            let mut marker_tpl = TopicPartitionList::new();
            marker_tpl.add_partition_offset(&self.topic, 0, Offset::Offset(info.batch_id as i64 + 1))?;
            let cgm = marker.group_metadata().ok_or(rdkafka::error::KafkaError::ClientCreation(
                "no consumer group metadata for the sink".into(),
            ))?;
            producer.send_offsets_to_transaction(&marker_tpl, &cgm, self.timeout)?;
            producer.commit_transaction(self.timeout)
        })();
        match result {
            Ok(()) => Ok(SinkOutcome::Written { records: rows.len() as u64 }),
            Err(e) => {
                let _ = producer.abort_transaction(self.timeout);
                *state = None; // start afresh (a fenced producer cannot be reused)
                Err(fail(e))
            }
        }
    }
}
