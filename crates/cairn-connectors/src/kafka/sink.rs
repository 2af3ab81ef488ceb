//! The transactional Kafka sink: each batch in one transaction that also records the batch id,
//! so a batch replayed after a crash is never written twice.

use super::decode::DeadLetter;
use crate::pending::Pending;
use cairn::{BatchContext, BatchWrite, Sink, UserError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One record for the sink to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutRecord {
    /// The record's key; `None` writes it without one.
    pub key: Option<Vec<u8>>,
    /// The record's value.
    pub value: Vec<u8>,
    /// Headers to write with the record, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What writing a batch to Kafka did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkOutcome {
    /// The batch's records were written in one committed transaction.
    Written {
        /// Records written in the transaction: one per element of the batch.
        records: u64,
    },
    /// An earlier attempt committed this batch; nothing was written.
    AlreadyCommitted,
}

type ToKafka<T> = Arc<dyn Fn(&cairn::BatchInfo, &T) -> OutRecord + Send + Sync>;

/// Writes each batch to a topic in one Kafka transaction, exactly once per batch id.
///
/// The transactional id is stable per job and sink (`cairn-<job id>-<name>`, the job id being
/// fixed by the checkpoint location), so a restarted or duplicate instance of the job fences the
/// old one. With the batch's records, the transaction commits the offset `batch id + 1` for the
/// consumer group `cairn-sink-<job id>-<name>` on partition 0 of the output topic:
/// the sink reads it back before each batch, and a batch at or below it (committed to Kafka just
/// before a crash, replayed by cairn) is skipped — so no batch is ever written twice, even on a
/// broker that does not hide aborted records from `read_committed` consumers.
pub struct KafkaSink<T> {
    name: String,
    brokers: String,
    topic: String,
    to_record: ToKafka<T>,
    timeout: Duration,
    state: Mutex<Option<Connected>>,
    /// The partitions of the batch being written, gathered until commit.
    pending: Pending<T>,
}

/// A sink's clients, for one job.
struct Connected {
    job_id: Arc<str>,
    producer: rdkafka::producer::BaseProducer,
    marker: BaseConsumer,
    /// The committed marker (last batch written + 1), read back once per connection: after that
    /// this producer is the only one that can move it (a newer instance fences it, and its next
    /// commit fails, which reconnects).
    done: Option<i64>,
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
        Self::with_headers(brokers, name, topic, move |b, x| {
            let (key, value) = to_record(b, x);
            OutRecord { key, value, headers: Vec::new() }
        })
    }

    /// Like [`new`](Self::new), with `to_record` also giving each record's headers.
    pub fn with_headers(
        brokers: &str,
        name: &str,
        topic: &str,
        to_record: impl Fn(&cairn::BatchInfo, &T) -> OutRecord + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.to_string(),
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            to_record: Arc::new(to_record),
            timeout: Duration::from_secs(30),
            state: Mutex::new(None),
            pending: Pending::default(),
        }
    }

    /// How long one transactional request (init, flush, commit) may take before the batch fails
    /// (default 30 s). A broker outage longer than this shows as the job's restarts; shorter
    /// ones are waited out inside the request.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Makes the sink an output of `stream`.
    pub fn attach(self, stream: &cairn::DStream<T>) {
        stream.write_to(self);
    }

    fn connect(&self, job_id: &Arc<str>) -> Result<Connected, UserError> {
        use rdkafka::producer::Producer;
        let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("transactional.id", format!("cairn-{job_id}-{}", self.name))
            .set("enable.idempotence", "true")
            .set("broker.address.family", "v4")
            .create()?;
        producer.init_transactions(self.timeout).map_err(|e| {
            super::failure(format_args!("Kafka sink {:?}: cannot init transactions", self.name), e)
        })?;
        let marker: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("cairn-sink-{job_id}-{}", self.name))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("broker.address.family", "v4")
            .create()?;
        Ok(Connected { job_id: job_id.clone(), producer, marker, done: None })
    }

    /// The batch marker committed for this sink and job (0: none yet).
    fn read_marker(&self, marker: &BaseConsumer) -> Result<i64, UserError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, 0);
        let committed = marker.committed_offsets(tpl, self.timeout).map_err(|e| {
            super::failure(format_args!("Kafka sink {:?}: cannot read its batch marker", self.name), e)
        })?;
        Ok(committed
            .elements()
            .first()
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(0))
    }

    /// Writes one batch in one transaction, or skips it if an earlier attempt committed it.
    pub fn write_batch(&self, info: &cairn::BatchInfo, rows: &[T]) -> Result<SinkOutcome, UserError> {
        self.write(&BatchContext::new(info.job_id.clone(), info.batch_id, info.batch_time_ms), rows)
    }

    /// Like [`write_batch`](Self::write_batch), for a batch the engine hands over: right before
    /// the transaction commits, the batch's fence is checked ([`BatchContext::check_fence`]), and
    /// a process that lost its task meanwhile aborts the transaction instead. The new owner's
    /// `init_transactions` fences the old producer too, but a broker's transaction coordinator is
    /// not the only guard (the test broker, nisshi, sometimes accepts a fenced producer's late
    /// commit).
    pub fn write(&self, batch: &BatchContext, rows: &[T]) -> Result<SinkOutcome, UserError> {
        use rdkafka::producer::{BaseRecord, Producer};
        let info = &batch.info();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.as_ref().is_none_or(|c| c.job_id != info.job_id) {
            // A process that lost its task must not init the task's transactional id: that
            // would fence the new owner's producer in the middle of its batch.
            batch.check_fence().map_err(|f| {
                format!("Kafka sink {:?}: batch {} not written: {f}", self.name, info.batch_id)
            })?;
            *state = Some(self.connect(&info.job_id)?);
        }
        let c = state.as_mut().expect("connected above");
        if c.done.is_none() {
            c.done = Some(self.read_marker(&c.marker)?);
        }
        let done = c.done.unwrap_or(0);
        if done > info.batch_id.0 as i64 {
            tracing::info!(
                "Kafka sink {:?}: batch {} was already committed; skipping",
                self.name,
                info.batch_id
            );
            return Ok(SinkOutcome::AlreadyCommitted);
        }
        let Connected { producer, marker, .. } = &*c;
        let fail = |e: rdkafka::error::KafkaError| -> UserError {
            super::failure(format_args!("Kafka sink {:?}: batch {}", self.name, info.batch_id), e)
        };
        producer.begin_transaction().map_err(fail)?;
        let result = (|| {
            for r in rows {
                let out = (self.to_record)(info, r);
                let mut rec = BaseRecord::<Vec<u8>, Vec<u8>>::to(&self.topic).payload(&out.value);
                if let Some(k) = out.key.as_ref() {
                    rec = rec.key(k);
                }
                if !out.headers.is_empty() {
                    let mut h = OwnedHeaders::new_with_capacity(out.headers.len());
                    for (k, v) in &out.headers {
                        h = h.insert(Header { key: k, value: Some(v) });
                    }
                    rec = rec.headers(h);
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
            flush(producer, self.timeout)?;
            // The fence is checked before the batch marker joins the transaction, not between the
            // two: a process paused after its marker was sent and then found fenced leaves a
            // marker the broker may already show (nisshi applies transactional offset commits
            // unreliably), which would make the new owner skip a batch whose records never
            // commit. This narrows that window to the two requests below; on Apache Kafka, where
            // transactional offsets apply only at commit, there is no such window.
            if let Err(fenced) = batch.check_fence() {
                return Ok(Err(fenced));
            }
            let mut marker_tpl = TopicPartitionList::new();
            marker_tpl.add_partition_offset(&self.topic, 0, Offset::Offset(info.batch_id.0 as i64 + 1))?;
            let cgm = marker.group_metadata().ok_or(rdkafka::error::KafkaError::ClientCreation(
                "no consumer group metadata for the sink".into(),
            ))?;
            producer.send_offsets_to_transaction(&marker_tpl, &cgm, self.timeout)?;
            producer.commit_transaction(self.timeout).map(Ok)
        })();
        match result {
            Ok(Err(fenced)) => {
                // No abort: this producer's epoch is stale. Apache Kafka refuses its EndTxn, but
                // a broker that does not check epochs (nisshi) writes the abort marker for the
                // transactional id, which also aborts the records the new owner has in flight
                // (seen: a replayed batch lost from the output while its marker said written).
                // The successor's `init_transactions` or the transaction timeout ends this one.
                *state = None;
                Err(format!("Kafka sink {:?}: batch {} not committed: {fenced}", self.name, info.batch_id)
                    .into())
            }
            Ok(Ok(())) => {
                c.done = Some(info.batch_id.0 as i64 + 1);
                Ok(SinkOutcome::Written { records: rows.len() as u64 })
            }
            Err(e) => {
                // Same reason as above: a process that lost its task leaves the transaction to
                // its successor.
                let still_owner = batch.check_fence().is_ok();
                if still_owner {
                    let _ = producer.abort_transaction(self.timeout);
                }
                *state = None; // start afresh (a fenced producer cannot be reused)
                if still_owner && is_fenced(&e) {
                    // The broker fenced this producer although the task is still ours: a stale
                    // process initialised the transactional id before it noticed it had lost the
                    // task. Reconnecting (a restart in place) fences it back.
                    return Err(cairn::Transient::wrap(format!(
                        "Kafka sink {:?}: batch {}: the producer was fenced by a process that no longer owns the task ({e}); reconnecting",
                        self.name, info.batch_id
                    )));
                }
                Err(fail(e))
            }
        }
    }
}

/// Waits until the broker acknowledged every record sent. Not `BaseProducer::flush`: in rdkafka
/// 0.38 it waits in `poll` steps of up to 100 ms, and `poll` lasts its whole timeout, so every
/// flush took at least 100 ms (about a third of a 7 500-record batch's time in the sink); this
/// looks again every millisecond.
fn flush(producer: &rdkafka::producer::BaseProducer, timeout: Duration) -> rdkafka::error::KafkaResult<()> {
    use rdkafka::producer::Producer;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match producer.flush(Duration::ZERO) {
            Err(e)
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::OperationTimedOut)
                    && std::time::Instant::now() < deadline =>
            {
                producer.poll(Duration::from_millis(1))
            }
            done => return done,
        }
    }
}

/// Whether the broker refused the producer because another one took its transactional id.
fn is_fenced(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{Fenced, InvalidProducerEpoch, ProducerFenced};
    matches!(e.rdkafka_error_code(), Some(Fenced | InvalidProducerEpoch | ProducerFenced))
}

impl KafkaSink<DeadLetter> {
    /// A dead-letter sink: each rejected record is written to `topic` with its original key,
    /// value and headers, plus the headers `cairn.error`, `cairn.topic`, `cairn.partition` and
    /// `cairn.offset` saying why it was rejected and where it came from. Exactly once per batch,
    /// like any Kafka sink.
    pub fn dead_letters(brokers: &str, name: &str, topic: &str) -> Self {
        Self::with_headers(brokers, name, topic, |_, d: &DeadLetter| {
            let r = &d.record;
            let mut headers = r.headers.clone();
            headers.push(("cairn.error".into(), d.error.clone().into_bytes()));
            headers.push(("cairn.topic".into(), r.topic.clone().into_bytes()));
            headers.push(("cairn.partition".into(), r.partition.to_string().into_bytes()));
            headers.push(("cairn.offset".into(), r.offset.to_string().into_bytes()));
            OutRecord { key: r.key.clone(), value: r.value.clone().unwrap_or_default(), headers }
        })
    }
}

/// The batch's transaction (its records and the batch marker) is one unit written at commit; the
/// partitions are gathered first, one producer per job.
impl<T: cairn::Data> Sink<T> for KafkaSink<T> {
    fn name(&self) -> &str {
        &self.name
    }
    fn open(&self, _: &BatchContext) -> Result<BatchWrite, UserError> {
        self.pending.clear();
        Ok(BatchWrite::Write)
    }
    fn write_partition(&self, _: &BatchContext, partition: usize, data: Vec<T>) -> Result<(), UserError> {
        self.pending.push(partition, data);
        Ok(())
    }
    fn commit(&self, batch: &BatchContext) -> Result<(), UserError> {
        let rows = self.pending.take_in_order();
        self.write(batch, &rows).map(|_| ())
    }
    fn abort(&self, _: &BatchContext) {
        self.pending.clear();
    }
}
