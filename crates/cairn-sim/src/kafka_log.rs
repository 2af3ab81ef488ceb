//! A partition's raw log, transaction markers included, and the read_committed view those markers
//! imply: the oracle for exactly-once output to Kafka on a broker (nisshi) that writes commit and
//! abort markers but does not hide aborted records from `read_committed` consumers.
//!
//! librdkafka never hands control records to its user, so [`read_partition_log`] talks the Kafka
//! protocol itself (the `kafka-protocol` crate's typed messages and record-batch decoder) over one
//! TCP connection to a broker on the loopback interface: Fetch from offset 0 up to the high
//! watermark with isolation level READ_UNCOMMITTED. [`committed_view`] then applies the markers
//! the way a read_committed consumer must, independently of what the broker filters.

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, BrokerId, FetchRequest, FetchResponse, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::records::RecordBatchDecoder;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What a control record marks (the type in its key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlType {
    /// Type 0: the producer's open transaction was aborted.
    Abort,
    /// Type 1: the producer's open transaction was committed.
    Commit,
    /// Any other type (none is written to a topic's partitions).
    Other(i16),
}

/// One record of a partition's log, as the broker stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub offset: i64,
    /// -1 for a producer without an id (neither idempotent nor transactional).
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// Its batch is part of a transaction.
    pub transactional: bool,
    /// `Some` for a control record (a transaction marker), with the type from its key.
    pub control: Option<ControlType>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// The Fetch versions this reader speaks: v4 has isolation levels and v2 record batches; from v13
/// on topics are named by id only.
const FETCH_VERSIONS: (i16, i16) = (4, 12);
const CLIENT_ID: &str = "cairn-sim-kafka-log";
const TIMEOUT: Duration = Duration::from_secs(30);

/// Every record of `topic`'s `partition`, in offset order, from offset 0 to the high watermark,
/// control records included. `bootstrap` is `127.0.0.1:PORT` (a loopback address: this is a test
/// tool) of the broker leading the partition. Fails on a broker error, a log that no longer
/// starts at offset 0, a batch that is not magic v2, a bad CRC or a compressed batch.
pub fn read_partition_log(bootstrap: &str, topic: &str, partition: i32) -> Result<Vec<LogRecord>, String> {
    let addr: SocketAddr =
        bootstrap.parse().map_err(|e| format!("{bootstrap:?} is not an IP address and port: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{bootstrap}: only a broker on the loopback interface is read"));
    }
    let mut conn = Conn::open(addr)?;
    let version = conn.fetch_version()?;
    let deadline = Instant::now() + TIMEOUT;
    let mut out = Vec::new();
    let mut next = 0i64;
    loop {
        let req = FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(16 << 20)
            .with_isolation_level(0) // READ_UNCOMMITTED: aborted and open transactions too
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(partition)
                    .with_fetch_offset(next)
                    .with_partition_max_bytes(8 << 20)])]);
        let resp: FetchResponse = conn.call(ApiKey::Fetch, version, &req)?;
        if resp.error_code != 0 {
            return Err(format!("fetch {topic}-{partition} at {next}: error code {}", resp.error_code));
        }
        let part = resp
            .responses
            .iter()
            .filter(|t| t.topic.0.as_str() == topic)
            .flat_map(|t| t.partitions.iter())
            .find(|p| p.partition_index == partition)
            .ok_or_else(|| format!("fetch {topic}-{partition}: the response has no such partition"))?;
        if part.error_code != 0 {
            return Err(format!("fetch {topic}-{partition} at {next}: error code {}", part.error_code));
        }
        if part.log_start_offset > 0 {
            return Err(format!(
                "{topic}-{partition}: the log starts at offset {}, not 0 (records were deleted)",
                part.log_start_offset
            ));
        }
        let high = part.high_watermark;
        if next >= high {
            return Ok(out);
        }
        let before = next;
        let mut data = part.records.clone().unwrap_or_default();
        // A response may end in a truncated batch; it is fetched again from its start.
        while data.len() >= 12 {
            let len = i32::from_be_bytes(data[8..12].try_into().expect("4 bytes"));
            if len < 0 {
                return Err(format!("{topic}-{partition}: negative batch length {len}"));
            }
            let total = 12 + len as usize;
            if data.len() < total {
                break;
            }
            let mut batch = data.split_to(total);
            next =
                decode_batch(&mut batch, next, &mut out).map_err(|e| format!("{topic}-{partition}: {e}"))?;
        }
        if next == before {
            if Instant::now() > deadline {
                return Err(format!(
                    "{topic}-{partition}: no complete batch at offset {next} (high watermark {high}) within {TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Decodes one complete batch, appending its records at or after `from`; returns the offset after
/// the batch.
fn decode_batch(batch: &mut Bytes, from: i64, out: &mut Vec<LogRecord>) -> Result<i64, String> {
    // Batch header: baseOffset i64, batchLength i32, partitionLeaderEpoch i32, magic i8, crc u32,
    // attributes i16, lastOffsetDelta i32, ... (the decoder below checks magic and CRC).
    if batch.len() < 27 {
        return Err(format!("a batch of {} bytes is too short", batch.len()));
    }
    let base = i64::from_be_bytes(batch[0..8].try_into().expect("8 bytes"));
    let magic = batch[16] as i8;
    if magic != 2 {
        return Err(format!("batch at offset {base} has magic v{magic}; only v2 is read"));
    }
    let last_delta = i32::from_be_bytes(batch[23..27].try_into().expect("4 bytes"));
    let set = RecordBatchDecoder::decode(batch).map_err(|e| format!("batch at offset {base}: {e}"))?;
    for r in set.records {
        if r.offset < from {
            continue; // the broker returns the whole batch holding the fetch offset
        }
        let control = if r.control {
            let key = r.key.as_deref().unwrap_or_default();
            if key.len() < 4 {
                return Err(format!("control record at offset {} has a {}-byte key", r.offset, key.len()));
            }
            Some(match i16::from_be_bytes([key[2], key[3]]) {
                0 => ControlType::Abort,
                1 => ControlType::Commit,
                t => ControlType::Other(t),
            })
        } else {
            None
        };
        out.push(LogRecord {
            offset: r.offset,
            producer_id: r.producer_id,
            producer_epoch: r.producer_epoch,
            transactional: r.transactional,
            control,
            key: r.key.map(|b| b.to_vec()),
            value: r.value.map(|b| b.to_vec()),
        });
    }
    Ok((base + i64::from(last_delta) + 1).max(from))
}

/// One connection to the broker, one request at a time.
struct Conn {
    stream: TcpStream,
    correlation: i32,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream =
            TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        Ok(Self { stream, correlation: 0 })
    }

    /// The highest Fetch version both the broker (ApiVersions) and this reader speak.
    fn fetch_version(&mut self) -> Result<i16, String> {
        let resp: ApiVersionsResponse = self.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
        if resp.error_code != 0 {
            return Err(format!("ApiVersions: error code {}", resp.error_code));
        }
        let fetch = resp
            .api_keys
            .iter()
            .find(|k| k.api_key == ApiKey::Fetch as i16)
            .ok_or("the broker does not list the Fetch API")?;
        let (lo, hi) = (fetch.min_version.max(FETCH_VERSIONS.0), fetch.max_version.min(FETCH_VERSIONS.1));
        if lo > hi {
            return Err(format!(
                "the broker speaks Fetch v{}..v{}, this reader v{}..v{}",
                fetch.min_version, fetch.max_version, FETCH_VERSIONS.0, FETCH_VERSIONS.1
            ));
        }
        Ok(hi)
    }

    fn call<Req, Resp>(&mut self, key: ApiKey, version: i16, req: &Req) -> Result<Resp, String>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        self.correlation += 1;
        let what = format!("{key:?} v{version}");
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
        let mut buf = BytesMut::new();
        header.encode(&mut buf, Req::header_version(version)).map_err(|e| format!("{what}: {e}"))?;
        req.encode(&mut buf, version).map_err(|e| format!("{what}: {e}"))?;
        let mut frame = (buf.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&buf);
        self.stream.write_all(&frame).map_err(|e| format!("{what}: send: {e}"))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(|e| format!("{what}: receive: {e}"))?;
        let len = i32::from_be_bytes(len);
        if !(0..=256 << 20).contains(&len) {
            return Err(format!("{what}: response of {len} bytes"));
        }
        let mut body = vec![0u8; len as usize];
        self.stream.read_exact(&mut body).map_err(|e| format!("{what}: receive: {e}"))?;
        let mut body = Bytes::from(body);
        let rh = ResponseHeader::decode(&mut body, Resp::header_version(version))
            .map_err(|e| format!("{what}: response header: {e}"))?;
        if rh.correlation_id != self.correlation {
            return Err(format!("{what}: correlation id {} != {}", rh.correlation_id, self.correlation));
        }
        Resp::decode(&mut body, version).map_err(|e| format!("{what}: response: {e}"))
    }
}

/// Record values, in offset order.
pub type Values = Vec<Vec<u8>>;

/// What a read_committed consumer must see in a log, and what it must not.
///
/// Transactional records of a producer id are held until that producer's next control record:
/// kept on COMMIT, dropped into `aborted` on ABORT. Non-transactional records pass through. Both
/// lists hold values in offset order (a null value as empty bytes). Errors: a transaction still
/// open at the end of the log, a control record of another type, a non-transactional control
/// record, or a transactional record without a producer id. A marker with nothing held (a
/// transaction that wrote no record to this partition) is allowed.
///
/// Markers are applied by producer id, whatever their epoch: nisshi 0.7.0 sometimes writes the
/// marker that completes a transaction with the producer's bumped epoch. It also does not
/// always abort a fenced producer's open transaction on `init_transactions`, nor refuse that
/// producer's late commit, so the same values can end up in two committed transactions of
/// different epochs of one producer id; [`committed_records`] shows the epochs.
pub fn committed_view(log: &[LogRecord]) -> Result<(Values, Values), String> {
    let (mut committed, mut aborted) = (Vec::new(), Vec::new());
    for (i, kept) in fates(log)? {
        let v = log[i].value.clone().unwrap_or_default();
        if kept {
            committed.push(v);
        } else {
            aborted.push(v);
        }
    }
    Ok((committed, aborted))
}

/// The records [`committed_view`] keeps, whole (offsets, producer ids and epochs included).
pub fn committed_records(log: &[LogRecord]) -> Result<Vec<LogRecord>, String> {
    Ok(fates(log)?.into_iter().filter(|(_, kept)| *kept).map(|(i, _)| log[i].clone()).collect())
}

/// Per data record's index: kept (committed or not transactional) or aborted.
fn fates(log: &[LogRecord]) -> Result<BTreeMap<usize, bool>, String> {
    // Per producer id: indices into `log` of its open transaction's records.
    let mut open: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    // Per index: kept (true) or aborted (false); control records get no entry.
    let mut fate: BTreeMap<usize, bool> = BTreeMap::new();
    for (i, r) in log.iter().enumerate() {
        match (r.transactional, r.control) {
            (false, Some(_)) => {
                return Err(format!("offset {}: a control record outside a transactional batch", r.offset))
            }
            (false, None) => {
                fate.insert(i, true);
            }
            (true, _) if r.producer_id < 0 => {
                return Err(format!("offset {}: a transactional record without a producer id", r.offset))
            }
            (true, None) => open.entry(r.producer_id).or_default().push(i),
            (true, Some(ControlType::Other(t))) => {
                return Err(format!("offset {}: control record of unknown type {t}", r.offset))
            }
            (true, Some(c)) => {
                for j in open.remove(&r.producer_id).unwrap_or_default() {
                    fate.insert(j, c == ControlType::Commit);
                }
            }
        }
    }
    if let Some((pid, held)) = open.iter().find(|(_, held)| !held.is_empty()) {
        return Err(format!(
            "producer {pid}: a transaction from offset {} ({} records) is still open at the end of the log",
            log[held[0]].offset,
            held.len()
        ));
    }
    Ok(fate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: i64, pid: i64, value: &str) -> LogRecord {
        LogRecord {
            offset,
            producer_id: pid,
            producer_epoch: 0,
            transactional: pid >= 0,
            control: None,
            key: None,
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn marker(offset: i64, pid: i64, c: ControlType) -> LogRecord {
        LogRecord {
            offset,
            producer_id: pid,
            producer_epoch: 0,
            transactional: true,
            control: Some(c),
            key: None,
            value: None,
        }
    }

    fn strings(v: Vec<Vec<u8>>) -> Vec<String> {
        v.into_iter().map(|b| String::from_utf8(b).unwrap()).collect()
    }

    fn view(log: &[LogRecord]) -> (Vec<String>, Vec<String>) {
        let (c, a) = committed_view(log).unwrap();
        (strings(c), strings(a))
    }

    #[test]
    fn a_committed_transaction_is_kept() {
        let log = [data(0, 7, "a"), data(1, 7, "b"), marker(2, 7, ControlType::Commit)];
        assert_eq!(view(&log), (vec!["a".into(), "b".into()], vec![]));
    }

    #[test]
    fn an_aborted_transaction_is_dropped_and_the_next_one_kept() {
        let log = [
            data(0, 7, "a"),
            marker(1, 7, ControlType::Abort),
            data(2, 7, "a"),
            data(3, 7, "b"),
            marker(4, 7, ControlType::Commit),
        ];
        assert_eq!(view(&log), (vec!["a".into(), "b".into()], vec!["a".into()]));
    }

    #[test]
    fn interleaved_producers_are_resolved_by_their_own_markers() {
        let log = [
            data(0, 1, "p1-a"),
            data(1, 2, "p2-a"),
            data(2, -1, "plain"),
            data(3, 1, "p1-b"),
            marker(4, 2, ControlType::Abort),
            data(5, 2, "p2-b"),
            marker(6, 1, ControlType::Commit),
            marker(7, 2, ControlType::Commit),
        ];
        assert_eq!(
            view(&log),
            (vec!["p1-a".into(), "plain".into(), "p1-b".into(), "p2-b".into()], vec!["p2-a".into()])
        );
    }

    #[test]
    fn a_marker_with_nothing_open_is_harmless() {
        let log = [marker(0, 3, ControlType::Abort), data(1, 3, "x"), marker(2, 3, ControlType::Commit)];
        assert_eq!(view(&log), (vec!["x".into()], vec![]));
    }

    #[test]
    fn a_transaction_open_at_the_end_is_an_error() {
        let log = [data(0, 1, "a"), marker(1, 1, ControlType::Commit), data(2, 1, "b"), data(3, 2, "c")];
        let e = committed_view(&log).unwrap_err();
        assert!(e.contains("producer 1") && e.contains("offset 2") && e.contains("still open"), "{e}");
    }

    #[test]
    fn malformed_logs_are_errors() {
        let mut plain_marker = marker(0, 1, ControlType::Commit);
        plain_marker.transactional = false;
        assert!(committed_view(&[plain_marker]).unwrap_err().contains("outside a transactional batch"));
        let mut no_pid = data(0, 1, "a");
        no_pid.producer_id = -1;
        assert!(committed_view(&[no_pid]).unwrap_err().contains("without a producer id"));
        let other = [data(0, 1, "a"), marker(1, 1, ControlType::Other(2))];
        assert!(committed_view(&other).unwrap_err().contains("unknown type 2"));
    }
}
