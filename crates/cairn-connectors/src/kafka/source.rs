//! The Kafka direct stream source: every batch's offset range per partition is planned (and
//! logged by cairn) before the batch runs, and the next offsets live in the checkpoint, so a
//! restart resumes at exactly the next record whatever the consumer group says.

use super::plan::{plan_partition, Watermarks};
use cairn::source::{Positions, Source};
use cairn::{OffsetRange, SourcePartition, UserError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a partition starts when the checkpoint has no position for it (the first run, or a
/// partition or topic that appeared since).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record still on the broker.
    Earliest,
    /// Only records produced from now on (the end offset when the partition is first planned).
    Latest,
    /// Explicit offsets per `(topic, partition)`; other partitions start at the earliest.
    Offsets(BTreeMap<(String, i32), i64>),
}

/// Which topics a source reads.
#[derive(Debug, Clone)]
pub enum Topics {
    /// These topics; each must exist.
    Names(Vec<String>),
    /// Every topic whose whole name matches the regular expression, checked at every plan (a
    /// topic created later is picked up). Internal topics (names starting with `__`) are left out.
    Pattern(regex::Regex),
}

impl Topics {
    /// Every topic whose whole name matches `pattern` (e.g. `orders-.*`).
    ///
    /// ```
    /// use cairn_connectors::kafka::Topics;
    /// assert!(Topics::pattern("orders-.*").is_ok());
    /// assert!(Topics::pattern("orders-(").unwrap_err().to_string().contains("orders-("));
    /// ```
    pub fn pattern(pattern: &str) -> Result<Self, UserError> {
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(Topics::Pattern)
            .map_err(|e| format!("invalid topic pattern {pattern:?}: {e}").into())
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Topics::Names(n) => n.iter().any(|t| t == name),
            Topics::Pattern(re) => !name.starts_with("__") && re.is_match(name),
        }
    }
}

impl From<&str> for Topics {
    fn from(t: &str) -> Self {
        Topics::Names(vec![t.to_string()])
    }
}

impl<S: AsRef<str>> From<&[S]> for Topics {
    fn from(t: &[S]) -> Self {
        Topics::Names(t.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

impl<S: AsRef<str>, const N: usize> From<[S; N]> for Topics {
    fn from(t: [S; N]) -> Self {
        Topics::Names(t.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

/// One Kafka record, with everything the broker keeps about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaRecord {
    /// The topic the record was read from.
    pub topic: String,
    /// The partition of `topic` the record was read from.
    pub partition: i32,
    /// The record's offset in its partition.
    pub offset: i64,
    /// The record's key; `None` when it has none.
    pub key: Option<Vec<u8>>,
    /// The record's value; `None` for a null value (a tombstone on a compacted topic).
    pub value: Option<Vec<u8>>,
    /// Milliseconds since the epoch, as the producer or the broker set it.
    pub timestamp_ms: Option<i64>,
    /// The record's headers, in order; a header without a value reads as empty bytes.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// `(topic, partition)`
type Tp = (String, i32);

/// Reads Kafka topics as a direct stream. Build with [`KafkaSource::builder`] (or
/// [`KafkaSource::new`] for one topic), add it with `StreamingContext::source`.
///
/// Before each batch the source fetches the topics' metadata (new partitions and, with a
/// pattern, new topics are picked up) and each partition's watermarks, and plans
/// `[next, min(end, next + max_per_partition))` per partition. cairn logs that plan before the
/// batch runs and keeps the next offsets in the checkpoint under `"<topic>-<partition>"`.
///
/// ```no_run
/// use cairn_connectors::kafka::{KafkaSource, StartFrom, Topics};
/// let ctx = cairn::StreamingContext::builder().checkpoint("ckpt").build().unwrap();
/// let source = KafkaSource::builder("127.0.0.1:9092", Topics::pattern("orders-.*").unwrap())
///     .start(StartFrom::Earliest)
///     .max_per_partition(10_000)
///     .build()
///     .unwrap();
/// let records = ctx.source("orders", source).unwrap();
/// records.count().print(1);
/// ```
pub struct KafkaSource {
    brokers: String,
    topics: Topics,
    start: StartFrom,
    max_per_partition: u64,
    skip_lost: bool,
    timeout: Duration,
    config: Vec<(String, String)>,
    metadata: Mutex<BaseConsumer>,
    /// One consumer per partition, each behind its own lock so partitions are read in parallel.
    readers: Mutex<HashMap<Tp, Arc<Mutex<BaseConsumer>>>>,
    /// Next offset per partition after the ranges read so far (for consumer-group commits).
    read_upto: Arc<Mutex<BTreeMap<Tp, i64>>>,
    /// Per partition, records past the end of the latest plan (its high watermark minus the
    /// planned end), as of that plan.
    backlog: Mutex<Vec<(SourcePartition, u64)>>,
    /// In a scaled-out job: the task's partition number and the job's task count.
    task: Option<(i32, u32)>,
}

/// Settings of a [`KafkaSource`]; [`build`](Self::build) checks them.
pub struct KafkaSourceBuilder {
    brokers: String,
    topics: Topics,
    start: StartFrom,
    max_per_partition: u64,
    skip_lost: bool,
    timeout: Duration,
    config: Vec<(String, String)>,
}

impl KafkaSourceBuilder {
    /// Where partitions without a checkpointed position start (default [`StartFrom::Earliest`]).
    pub fn start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }
    /// At most this many records per partition per batch (default 10 000): bounds a batch's size
    /// after downtime.
    pub fn max_per_partition(mut self, n: u64) -> Self {
        self.max_per_partition = n;
        self
    }
    /// When the broker no longer has records the checkpoint says are next (retention deleted
    /// them), skip to the oldest available and log how many were lost, instead of failing
    /// (default: fail).
    pub fn skip_lost_records(mut self, yes: bool) -> Self {
        self.skip_lost = yes;
        self
    }
    /// How long a metadata request may take, or a range read may go without receiving a record,
    /// before the batch fails (default 30 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// An extra librdkafka setting for every client of the source (e.g. `security.protocol`).
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.config.push((key.to_string(), value.to_string()));
        self
    }

    /// The source, or an error naming the first setting that is wrong.
    pub fn build(self) -> Result<KafkaSource, UserError> {
        if self.brokers.trim().is_empty() {
            return Err("Kafka source: no bootstrap brokers given".into());
        }
        if let Topics::Names(names) = &self.topics {
            if names.is_empty() {
                return Err("Kafka source: no topics given".into());
            }
            if let Some(bad) = names.iter().find(|t| !valid_topic_name(t)) {
                return Err(format!(
                    "Kafka source: {bad:?} is not a valid topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
                )
                .into());
            }
        }
        if self.max_per_partition == 0 {
            return Err("Kafka source: max_per_partition must be at least 1".into());
        }
        if let StartFrom::Offsets(m) = &self.start {
            if let Some(((t, p), o)) = m.iter().find(|(_, o)| **o < 0) {
                return Err(format!("Kafka source: start offset {o} for {t}-{p} is negative").into());
            }
        }
        let metadata = client(&self.brokers, "cairn-direct", &self.config)?;
        Ok(KafkaSource {
            brokers: self.brokers,
            topics: self.topics,
            start: self.start,
            max_per_partition: self.max_per_partition,
            skip_lost: self.skip_lost,
            timeout: self.timeout,
            config: self.config,
            metadata: Mutex::new(metadata),
            readers: Mutex::new(HashMap::new()),
            read_upto: Arc::new(Mutex::new(BTreeMap::new())),
            backlog: Mutex::new(Vec::new()),
            task: None,
        })
    }
}

fn valid_topic_name(t: &str) -> bool {
    (1..=249).contains(&t.len())
        && t != "."
        && t != ".."
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Commits a source's read offsets to a consumer group after every completed batch, so the usual
/// lag tools see the job's progress. Recovery never reads them: the checkpoint is the truth.
pub struct GroupCommitter {
    read_upto: Arc<Mutex<BTreeMap<Tp, i64>>>,
    consumer: BaseConsumer,
}

impl cairn::StreamingListener for GroupCommitter {
    fn on_batch_completed(&self, p: &cairn::BatchProgress) {
        let upto = self.read_upto.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if upto.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, part), next) in upto {
            if let Err(e) = tpl.add_partition_offset(&topic, part, Offset::Offset(next)) {
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

/// A consumer that never commits on its own and only talks IPv4 (the brokers listen on
/// 127.0.0.1 in tests; librdkafka would otherwise also try `::1`).
pub(super) fn client(
    brokers: &str,
    group: &str,
    extra: &[(String, String)],
) -> Result<BaseConsumer, UserError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("broker.address.family", "v4");
    for (k, v) in extra {
        cfg.set(k, v);
    }
    cfg.create().map_err(|e| format!("Kafka source: cannot create a client for {brokers}: {e}").into())
}

/// Reads the `<topic>-<partition>` strings of checkpoint formats 1 and 2; topic names may
/// contain `-`, the partition is the last field.
fn parse_legacy_key(key: &str) -> Result<Tp, UserError> {
    key.rsplit_once('-')
        .and_then(|(t, p)| Some((t.to_string(), p.parse().ok()?)))
        .ok_or_else(|| format!("{key:?} is not a <topic>-<partition> position").into())
}

impl KafkaSource {
    /// Settings for a source reading `topics` (a name, a list of names, or
    /// [`Topics::pattern`]) from `brokers` (comma-separated `host:port`).
    pub fn builder(brokers: &str, topics: impl Into<Topics>) -> KafkaSourceBuilder {
        KafkaSourceBuilder {
            brokers: brokers.to_string(),
            topics: topics.into(),
            start: StartFrom::Earliest,
            max_per_partition: 10_000,
            skip_lost: false,
            timeout: Duration::from_secs(30),
            config: Vec::new(),
        }
    }

    /// Reads `topic` from `brokers`, at most `max_per_partition` records per partition per batch.
    pub fn new(
        brokers: &str,
        topic: &str,
        start: StartFrom,
        max_per_partition: u64,
    ) -> Result<Self, UserError> {
        Self::builder(brokers, topic).start(start).max_per_partition(max_per_partition).build()
    }

    /// A listener that commits what this source read to the consumer group `group` after every
    /// completed batch (register it with `StreamingContext::add_listener`).
    pub fn group_committer(&self, group: &str) -> Result<GroupCommitter, UserError> {
        Ok(GroupCommitter {
            read_upto: self.read_upto.clone(),
            consumer: client(&self.brokers, group, &self.config)?,
        })
    }

    /// The partitions of the topics this source reads, as the broker lists them now.
    fn partitions(&self, md: &BaseConsumer) -> Result<Vec<Tp>, UserError> {
        let one = match &self.topics {
            Topics::Names(n) if n.len() == 1 => Some(n[0].as_str()),
            _ => None,
        };
        let meta = md.fetch_metadata(one, self.timeout).map_err(|e| {
            super::failure(format_args!("cannot fetch topic metadata from {}", self.brokers), e)
        })?;
        let mut out = Vec::new();
        for t in meta.topics().iter().filter(|t| self.topics.matches(t.name())) {
            match t.error() {
                None => {}
                Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                    return Err(format!("topic {} not found on {}", t.name(), self.brokers).into())
                }
                Some(e) => return Err(format!("topic {}: {e:?}", t.name()).into()),
            }
            if let Some((task, tasks)) = self.task {
                // Co-partitioned topics only: task p reads partition p of every topic, which
                // puts a key's records in one task only when every topic has the same count.
                if t.partitions().len() != tasks as usize {
                    return Err(format!(
                        "topic {} has {} partitions but the job has {tasks} tasks (its first topic's partition \
                         count): a scaled-out job reads co-partitioned topics only",
                        t.name(),
                        t.partitions().len()
                    )
                    .into());
                }
                out.extend(
                    t.partitions().iter().filter(|p| p.id() == task).map(|p| (t.name().to_string(), p.id())),
                );
                continue;
            }
            out.extend(t.partitions().iter().map(|p| (t.name().to_string(), p.id())));
        }
        if let Topics::Names(names) = &self.topics {
            if let Some(missing) = names.iter().find(|n| !out.iter().any(|(t, _)| t == *n)) {
                return Err(format!("topic {missing} not found on {}", self.brokers).into());
            }
        }
        out.sort();
        Ok(out)
    }

    /// A consumer for reading one partition's ranges: it prefetches about one range (not
    /// librdkafka's default of 100 000 messages), does not hold fetches open for long since it
    /// only asks for records that exist, and does not back off for a second when its small queue
    /// is full (librdkafka's `fetch.queue.backoff.ms` advice for low queue thresholds). Measured
    /// on nisshi (cairn-bench kafka): 4.9k records/s with the defaults, 28k with these.
    fn reader(&self) -> Result<BaseConsumer, UserError> {
        let mut cfg = vec![
            ("queued.min.messages".to_string(), self.max_per_partition.clamp(1_000, 100_000).to_string()),
            ("fetch.wait.max.ms".to_string(), "5".to_string()),
            ("fetch.queue.backoff.ms".to_string(), "5".to_string()),
        ];
        cfg.extend(self.config.iter().cloned());
        client(&self.brokers, "cairn-direct", &cfg)
    }

    fn initial(&self, topic: &str, partition: i32, w: Watermarks) -> i64 {
        match &self.start {
            StartFrom::Earliest => w.low,
            StartFrom::Latest => w.high,
            StartFrom::Offsets(m) => m.get(&(topic.to_string(), partition)).copied().unwrap_or(w.low),
        }
    }
}

impl Source for KafkaSource {
    type Item = KafkaRecord;

    fn legacy_partition(&self, key: &str) -> Result<SourcePartition, UserError> {
        parse_legacy_key(key).map(|(topic, partition)| SourcePartition::topic(topic, partition))
    }

    fn backlog(&self) -> Vec<(SourcePartition, u64)> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn restrict_to_task(&mut self, task: cairn::TaskId, tasks: u32) -> Result<(), UserError> {
        if task.0 >= tasks {
            return Err(format!("task {} is out of range: the job has {tasks} tasks", task.0).into());
        }
        self.task = Some((task.0 as i32, tasks));
        Ok(())
    }

    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>, UserError> {
        let md = self.metadata.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut backlog = Vec::new();
        let mut lost = 0;
        for (topic, partition) in self.partitions(&md)? {
            let (low, high) = md.fetch_watermarks(&topic, partition, self.timeout).map_err(|e| {
                super::failure(format_args!("cannot fetch the offsets of {topic}[{partition}]"), e)
            })?;
            let w = Watermarks { low, high };
            let key = SourcePartition::topic(topic.as_str(), partition);
            let p = plan_partition(
                &key,
                positions.get(&key).copied(),
                self.initial(&topic, partition, w),
                w,
                self.max_per_partition,
                self.skip_lost,
            )?;
            lost += p.lost;
            if let Some(r) = &p.range {
                backlog.push((key.clone(), (high.max(0) as u64).saturating_sub(r.end)));
            } else if let Some(next) = positions.get(&key) {
                backlog.push((key.clone(), (high.max(0) as u64).saturating_sub(*next)));
            }
            out.extend(p.range);
        }
        *self.backlog.lock().unwrap_or_else(|e| e.into_inner()) = backlog;
        if lost > 0 {
            tracing::warn!("this batch skips {lost} record(s) deleted by retention in all");
        }
        tracing::debug!("planned {out:?}");
        Ok(out)
    }

    fn read(&self, range: &OffsetRange) -> Result<Vec<KafkaRecord>, UserError> {
        let SourcePartition::Topic { topic, partition: p } = &range.partition else {
            return Err(format!("{} is not a topic's partition", range.partition).into());
        };
        let (topic, p) = (topic.clone(), *p);
        if range.end == range.start {
            return Ok(Vec::new());
        }
        let reader = {
            let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            match readers.entry((topic.clone(), p)) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Arc::new(Mutex::new(self.reader()?))).clone()
                }
            }
        };
        let c = reader.lock().unwrap_or_else(|e| e.into_inner());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, Offset::Offset(range.start as i64))?;
        c.assign(&tpl)?;
        let result = (|| -> Result<Vec<KafkaRecord>, UserError> {
            let mut out = Vec::with_capacity((range.end - range.start) as usize);
            // The timeout is for a read that stops making progress, not for the whole range: a
            // large range on a loaded broker takes longer than a short timeout while records keep
            // arriving, and failing it then would restart the batch for ever (seen: twelve tasks
            // reading 5000 records each from one broker on two cores, 2 s timeout).
            let mut deadline = Instant::now() + self.timeout;
            let mut next = range.start as i64;
            // librdkafka reports a lost broker connection as an error while it reconnects: a
            // blip shorter than a second is absorbed here; a longer outage fails the read as
            // transient, so the engine's restarts (visible, bounded) wait it out.
            let mut last_error = None;
            let mut failing_since: Option<Instant> = None;
            while next < range.end as i64 {
                if Instant::now() > deadline {
                    // The records are in the log (the plan saw them): a broker that does not
                    // deliver them in time is unreachable or overloaded, which may pass.
                    let why = last_error.map_or(String::new(), |e| format!(" (last error: {e})"));
                    return Err(cairn::Transient::wrap(format!(
                        "read only up to offset {next} of [{}, {}): nothing more arrived within {:?}{why}",
                        range.start, range.end, self.timeout
                    )));
                }
                let Some(m) = c.poll(Duration::from_millis(200)) else {
                    // Transaction markers occupy offsets but are never delivered: once the consumer's
                    // position has passed the range's end, nothing more is coming for it.
                    let at = c
                        .position()?
                        .elements_for_topic(&topic)
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
                let m = match m {
                    Ok(m) => m,
                    Err(e) if super::is_transient(&e) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(1) {
                            return Err(super::failure(format_args!("at offset {next}"), e));
                        }
                        last_error = Some(e);
                        continue;
                    }
                    Err(e) => return Err(super::failure(format_args!("at offset {next}"), e)),
                };
                if m.offset() < next || m.offset() >= range.end as i64 {
                    continue;
                }
                next = m.offset() + 1;
                deadline = Instant::now() + self.timeout;
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
            Ok(out)
        })();
        // Unassigned, the consumer stops fetching ahead between batches (an idle assigned
        // consumer keeps the broker busy with long polls and a read-ahead of the whole log).
        if let Err(e) = c.unassign() {
            tracing::debug!("unassigning {}: {e}", range.partition);
        }
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                // A consumer that failed may hold stale connection state or queued errors: the
                // next read of this partition starts with a new one.
                self.readers.lock().unwrap_or_else(|e| e.into_inner()).remove(&(topic, p));
                return Err(e);
            }
        };
        let mut upto = self.read_upto.lock().unwrap_or_else(|e| e.into_inner());
        let e = upto.entry((topic, p)).or_insert(0);
        *e = (*e).max(range.end as i64);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_keys_read_with_dashes_in_topic_names() {
        let source = |key: &str| parse_legacy_key(key).map(|(t, p)| SourcePartition::topic(t, p));
        for (t, p) in [("in", 0), ("orders-eu-west", 11), ("a.b_c", 3)] {
            assert_eq!(source(&format!("{t}-{p}")).unwrap(), SourcePartition::topic(t, p));
        }
        assert!(parse_legacy_key("nodash").is_err());
        assert!(parse_legacy_key("t-x").is_err());
    }

    #[test]
    fn bad_settings_are_refused_with_what_is_wrong() {
        let err = |b: KafkaSourceBuilder| b.build().err().expect("must be refused").to_string();
        assert!(err(KafkaSource::builder("", "t")).contains("no bootstrap brokers"));
        assert!(err(KafkaSource::builder("h:1", Topics::Names(vec![]))).contains("no topics"));
        assert!(err(KafkaSource::builder("h:1", "bad topic")).contains("not a valid topic name"));
        assert!(err(KafkaSource::builder("h:1", "t").max_per_partition(0)).contains("at least 1"));
        let neg = StartFrom::Offsets([(("t".to_string(), 0), -5)].into());
        assert!(err(KafkaSource::builder("h:1", "t").start(neg)).contains("negative"));
    }

    #[test]
    fn patterns_match_whole_names_and_skip_internal_topics() {
        let t = Topics::pattern("orders-.*").unwrap();
        assert!(t.matches("orders-eu"));
        assert!(!t.matches("old-orders-eu"));
        assert!(!Topics::pattern(".*").unwrap().matches("__consumer_offsets"));
        let names = Topics::from(["a", "b"]);
        assert!(names.matches("b") && !names.matches("c"));
    }
}
