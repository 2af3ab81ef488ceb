//! Re-keying a stream through a Kafka topic, so a stateful operator downstream sees every record
//! of a key in one task (Kafka Streams' repartition topics, in micro-batches).
//!
//! The upstream half writes each batch's records, keyed by the new key, to the topic in one
//! transaction per batch and task (a [`KafkaSink`], so a replayed batch is not written twice and
//! a task's old owner is fenced), stamping every record with its writer's job id, task batch and
//! position in the batch (`cairn.job`, `cairn.batch`, `cairn.seq`). The downstream half reads
//! the topic as a source. It does not rely on the broker hiding aborted records (the test broker
//! does not): before a batch it scans the new records and plans only those whose writer's batch
//! is committed by that writer's own batch marker, in order, each `(job, batch, seq)` once —
//! a copy of a batch written twice (an aborted attempt, a fenced writer's late commit) is the
//! same records, skipped by position. It stops at the first record whose batch is not
//! committed yet and takes it up in a later batch. How far it accepted each writer's records,
//! per partition, is part of the source's checkpointed positions, so a replay plans and reads
//! exactly the same records.

use super::sink::{KafkaSink, OutRecord};
use super::source::{KafkaRecord, KafkaSource, StartFrom};
use crate::pending::Pending;
use cairn::source::{Positions, Source};
use cairn::{
    BatchContext, BatchWrite, DStream, OffsetRange, Sink, SourcePartition, StreamingContext, UserError,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::Duration;

const JOB: &str = "cairn.job";
const BATCH: &str = "cairn.batch";
const SEQ: &str = "cairn.seq";

/// Where and how a stream is re-keyed: the topic (created beforehand with as many partitions as
/// the job's source topics, so its partitions are the job's tasks) and the clients' settings.
///
/// ```no_run
/// use cairn_connectors::kafka::{KafkaSource, Repartition, RepartitionThrough, StartFrom};
/// # fn main() -> cairn::Result<()> {
/// let ctx = cairn::StreamingContext::builder().checkpoint("ckpt").build()?;
/// let clicks = ctx.source("clicks", KafkaSource::new("127.0.0.1:9092", "clicks", StartFrom::Earliest, 10_000).unwrap())?;
/// // Clicks are keyed by user; count them per page.
/// let pages = clicks.map(|r| String::from_utf8_lossy(&r.value.unwrap_or_default()).into_owned());
/// let per_page = pages
///     .repartition_through(&Repartition::new(&ctx, "127.0.0.1:9092", "clicks-by-page"), |page: &String| page.clone())?
///     .map(|(page, _)| (page, 1u64))
///     .partitioned_like_source()
///     .update_state_by_key("per-page", |_, v: Vec<u64>, old: Option<u64>| Some(old.unwrap_or(0) + v.len() as u64));
/// # let _ = per_page;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Repartition {
    ctx: StreamingContext,
    brokers: String,
    topic: String,
    max_per_partition: u64,
    timeout: Duration,
}

impl Repartition {
    /// Re-keys through `topic` on the brokers `brokers`, in the job of `ctx`.
    pub fn new(ctx: &StreamingContext, brokers: &str, topic: &str) -> Self {
        Self {
            ctx: ctx.clone(),
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            max_per_partition: 100_000,
            timeout: Duration::from_secs(10),
        }
    }

    /// Records of the topic scanned per partition per batch, at most (default 100 000).
    pub fn max_per_partition(mut self, n: u64) -> Self {
        self.max_per_partition = n;
        self
    }

    /// How long one request to the brokers may take (default 10 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    fn sink_name(&self) -> String {
        format!("repartition-{}", self.topic)
    }
}

/// `repartition_through` on any stream whose elements serialize.
pub trait RepartitionThrough<T> {
    /// Writes the stream's records to the repartition topic keyed by `key_fn` and returns the
    /// stream read back from it as `(key, record)` pairs, marked as partitioned like its source
    /// (every record of a key is in one partition of the topic, so in one task). Records of a
    /// batch come back in a later batch (the next one, when the writer keeps up). Keys and
    /// records are written as JSON: a key's JSON must not depend on anything but its value (no
    /// hash maps with unordered keys), or equal keys could land in different partitions.
    fn repartition_through<K>(
        &self,
        through: &Repartition,
        key_fn: impl Fn(&T) -> K + Send + Sync + 'static,
    ) -> cairn::Result<DStream<(K, T)>>
    where
        K: Serialize + DeserializeOwned + cairn::Data;
}

impl<T: Serialize + DeserializeOwned + cairn::Data> RepartitionThrough<T> for DStream<T> {
    fn repartition_through<K>(
        &self,
        through: &Repartition,
        key_fn: impl Fn(&T) -> K + Send + Sync + 'static,
    ) -> cairn::Result<DStream<(K, T)>>
    where
        K: Serialize + DeserializeOwned + cairn::Data,
    {
        let encoded = self.try_map(move |x| {
            let key = serde_json::to_vec(&key_fn(&x)).map_err(|e| format!("cannot encode a key: {e}"))?;
            let value = serde_json::to_vec(&x).map_err(|e| format!("cannot encode a record: {e}"))?;
            Ok((key, value))
        });
        let sink = KafkaSink::with_headers(
            &through.brokers,
            &through.sink_name(),
            &through.topic,
            |b: &cairn::BatchInfo, (seq, key, value): &(u64, Vec<u8>, Vec<u8>)| OutRecord {
                key: Some(key.clone()),
                value: value.clone(),
                headers: vec![
                    (JOB.into(), b.job_id.as_bytes().to_vec()),
                    (BATCH.into(), b.batch_id.0.to_string().into_bytes()),
                    (SEQ.into(), seq.to_string().into_bytes()),
                ],
            },
        )
        .timeout(through.timeout);
        encoded.write_to(Stamping { name: through.sink_name(), inner: sink, pending: Pending::default() });
        let inner = KafkaSource::builder(&through.brokers, through.topic.as_str())
            .start(StartFrom::Earliest)
            .max_per_partition(through.max_per_partition)
            .timeout(through.timeout)
            // Everything in the log, aborted and open transactions too: the plan decides what
            // counts, the same way on every broker.
            .config("isolation.level", "read_uncommitted")
            .build()
            .map_err(|e| cairn::Error::Config(format!("repartition topic {:?}: {e}", through.topic)))?;
        let source = RepartitionSource::<K, T> {
            inner,
            brokers: through.brokers.clone(),
            sink_name: through.sink_name(),
            topic: through.topic.clone(),
            timeout: through.timeout,
            markers: Mutex::new(HashMap::new()),
            held_back: Mutex::new(HashMap::new()),
            _types: PhantomData,
        };
        Ok(through.ctx.source(&format!("repartition-{}", through.topic), source)?.partitioned_like_source())
    }
}

/// The upstream half: numbers the batch's records in order (their `cairn.seq`) and writes them
/// in one transaction.
struct Stamping {
    name: String,
    inner: KafkaSink<(u64, Vec<u8>, Vec<u8>)>,
    pending: Pending<(Vec<u8>, Vec<u8>)>,
}

impl Sink<(Vec<u8>, Vec<u8>)> for Stamping {
    fn name(&self) -> &str {
        &self.name
    }
    fn open(&self, _: &BatchContext) -> Result<BatchWrite, UserError> {
        self.pending.clear();
        Ok(BatchWrite::Write)
    }
    fn write_partition(
        &self,
        _: &BatchContext,
        partition: usize,
        data: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), UserError> {
        self.pending.push(partition, data);
        Ok(())
    }
    fn commit(&self, batch: &BatchContext) -> Result<(), UserError> {
        let rows: Vec<_> = self
            .pending
            .take_in_order()
            .into_iter()
            .enumerate()
            .map(|(i, (k, v))| (i as u64, k, v))
            .collect();
        self.inner.write(batch, &rows).map(|_| ())
    }
    fn abort(&self, _: &BatchContext) {
        self.pending.clear();
    }
}

/// Where a record came from: its writer's job id, task batch and position in that batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    job: String,
    batch: u64,
    seq: u64,
}

impl Stamp {
    fn of(r: &KafkaRecord) -> Result<Self, UserError> {
        let header = |name: &str| {
            r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice()).ok_or_else(|| {
                UserError::from(format!(
                    "{}[{}] offset {} has no {name} header: the repartition topic holds a record cairn did not write",
                    r.topic, r.partition, r.offset
                ))
            })
        };
        let number = |name: &str| -> Result<u64, UserError> {
            std::str::from_utf8(header(name)?).ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
                format!("{}[{}] offset {}: header {name} is not a number", r.topic, r.partition, r.offset)
                    .into()
            })
        };
        let job = String::from_utf8(header(JOB)?.to_vec()).map_err(|_| {
            format!("{}[{}] offset {}: header {JOB} is not UTF-8", r.topic, r.partition, r.offset)
        })?;
        Ok(Self { job, batch: number(BATCH)?, seq: number(SEQ)? })
    }

    /// The stamp as one number that grows with (batch, seq); 0 means nothing accepted yet.
    fn rank(&self) -> Result<u64, UserError> {
        if self.batch >= 1 << 31 || self.seq >= 1 << 32 {
            return Err(format!(
                "batch {} record {} is past what a repartition topic tracks",
                self.batch, self.seq
            )
            .into());
        }
        Ok((self.batch << 32 | self.seq) + 1)
    }
}

/// The position under which a partition's progress through one writer's records is kept.
fn accepted_key(topic: &str, partition: i32, job: &str) -> SourcePartition {
    SourcePartition::named(format!("{topic}[{partition}] {job}"))
}

/// The downstream half.
struct RepartitionSource<K, T> {
    inner: KafkaSource,
    brokers: String,
    sink_name: String,
    topic: String,
    timeout: Duration,
    /// Per writer (job id): its marker consumer and the batches it has committed (one past the
    /// last), as last read.
    markers: Mutex<HashMap<String, (BaseConsumer, u64)>>,
    /// Per partition, offsets scanned by the latest plan but left for a later batch.
    held_back: Mutex<HashMap<SourcePartition, u64>>,
    _types: PhantomData<fn() -> (K, T)>,
}

impl<K, T> RepartitionSource<K, T> {
    /// Whether writer `job` has committed `batch`; asks the broker only when the last answer
    /// did not cover it.
    fn committed(&self, job: &str, batch: u64) -> Result<bool, UserError> {
        let mut markers = self.markers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, done)) = markers.get(job) {
            if batch < *done {
                return Ok(true);
            }
        }
        if !markers.contains_key(job) {
            // The writer's sink commits its batch marker for this group, with each batch.
            let c =
                super::source::client(&self.brokers, &format!("cairn-sink-{job}-{}", self.sink_name), &[])?;
            markers.insert(job.to_string(), (c, 0));
        }
        let (c, done) = markers.get_mut(job).expect("inserted above");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, 0);
        let committed = c.committed_offsets(tpl, self.timeout).map_err(|e| {
            super::failure(
                format_args!("repartition topic {:?}: cannot read the batch marker of {job}", self.topic),
                e,
            )
        })?;
        if let Some(Offset::Offset(o)) = committed.elements().first().map(|e| e.offset()) {
            *done = (*done).max(o.max(0) as u64);
        }
        Ok(batch < *done)
    }

    /// The ranges of one scanned partition range that hold records to accept, in order, then
    /// one empty range at the scan's stop (so the partition's position moves past skipped
    /// copies), then the new progress per writer.
    fn plan_partition(
        &self,
        positions: &Positions,
        scanned: &OffsetRange,
    ) -> Result<Vec<OffsetRange>, UserError> {
        let SourcePartition::Topic { topic, partition } = &scanned.partition else {
            return Ok(Vec::new());
        };
        let records = self.inner.read(scanned)?;
        let mut accepted: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut out = Vec::new();
        let mut run: Option<u64> = None;
        let mut stop = scanned.end;
        let range = |start: u64, end: u64| OffsetRange { partition: scanned.partition.clone(), start, end };
        for r in &records {
            let stamp = Stamp::of(r)?;
            let rank = stamp.rank()?;
            let offset = r.offset as u64;
            let entry = accepted.entry(stamp.job.clone()).or_insert_with(|| {
                let before =
                    positions.get(&accepted_key(topic, *partition, &stamp.job)).copied().unwrap_or(0);
                (before, before)
            });
            if rank <= entry.1 {
                // A copy of records already accepted (another attempt at the same batch).
                if let Some(start) = run.take() {
                    out.push(range(start, offset));
                }
                continue;
            }
            if !self.committed(&stamp.job, stamp.batch)? {
                stop = offset;
                break;
            }
            entry.1 = rank;
            run.get_or_insert(offset);
        }
        if let Some(start) = run {
            out.push(range(start, stop));
        }
        self.held_back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(scanned.partition.clone(), scanned.end - stop);
        if out.last().is_none_or(|r| r.end < stop) {
            out.push(range(stop, stop));
        }
        for (job, (before, after)) in accepted {
            if after > before {
                out.push(OffsetRange {
                    partition: accepted_key(topic, *partition, &job),
                    start: before,
                    end: after,
                });
            }
        }
        Ok(out)
    }
}

impl<K, T> Source for RepartitionSource<K, T>
where
    K: DeserializeOwned + cairn::Data,
    T: DeserializeOwned + cairn::Data,
{
    type Item = (K, T);

    fn restrict_to_task(&mut self, task: cairn::TaskId, tasks: u32) -> Result<(), UserError> {
        self.inner.restrict_to_task(task, tasks)
    }

    /// The topic's records past the scan, plus those scanned but left for a later batch (their
    /// writer's batch was not committed yet).
    fn backlog(&self) -> Vec<(SourcePartition, u64)> {
        let held = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        self.inner
            .backlog()
            .into_iter()
            .map(|(p, n)| (p.clone(), n + held.get(&p).copied().unwrap_or(0)))
            .collect()
    }

    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>, UserError> {
        let mut out = Vec::new();
        for scanned in self.inner.plan(positions)? {
            out.extend(self.plan_partition(positions, &scanned)?);
        }
        Ok(out)
    }

    fn read(&self, range: &OffsetRange) -> Result<Vec<(K, T)>, UserError> {
        if matches!(range.partition, SourcePartition::Named(_)) {
            return Ok(Vec::new()); // progress per writer: nothing to read
        }
        self.inner
            .read(range)?
            .into_iter()
            .map(|r| {
                let decoded =
                    serde_json::from_slice::<K>(r.key.as_deref().unwrap_or_default()).and_then(|k| {
                        serde_json::from_slice::<T>(r.value.as_deref().unwrap_or_default()).map(|v| (k, v))
                    });
                decoded.map_err(|e| {
                    format!("{}[{}] offset {}: not a record cairn wrote: {e}", r.topic, r.partition, r.offset)
                        .into()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)]) -> KafkaRecord {
        KafkaRecord {
            topic: "t".into(),
            partition: 3,
            offset: 7,
            key: None,
            value: None,
            timestamp_ms: None,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
        }
    }

    #[test]
    fn stamps_rank_by_batch_then_position() {
        let s = |batch, seq| Stamp { job: "j".into(), batch, seq }.rank().unwrap();
        assert!(s(0, 0) > 0);
        assert!(s(0, 1) > s(0, 0));
        assert!(s(1, 0) > s(0, u32::MAX as u64));
        assert!(Stamp { job: "j".into(), batch: 1 << 31, seq: 0 }.rank().is_err());
    }

    #[test]
    fn records_without_stamps_are_refused_by_name() {
        let ok = record(&[(JOB, "job-task3"), (BATCH, "12"), (SEQ, "4")]);
        assert_eq!(Stamp::of(&ok).unwrap(), Stamp { job: "job-task3".into(), batch: 12, seq: 4 });
        let e = Stamp::of(&record(&[(JOB, "j"), (SEQ, "1")])).unwrap_err().to_string();
        assert!(e.contains("t[3] offset 7") && e.contains(BATCH), "{e}");
        let e = Stamp::of(&record(&[(JOB, "j"), (BATCH, "x"), (SEQ, "1")])).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
    }
}
