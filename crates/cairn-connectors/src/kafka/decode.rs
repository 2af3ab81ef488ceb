//! Decoding Kafka records into the job's types, with the two policies for a record that does not
//! decode: fail the batch (naming the record), or send it to a dead-letter stream.
//!
//! Decoding is a stream operator rather than part of the source so that dead letters are an
//! ordinary output with a batch id: written by an exactly-once sink, they are neither lost nor
//! duplicated when a batch replays.

use super::source::KafkaRecord;
use cairn::{DStream, Data, UserError};

/// A record the decoder rejected, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The record as it was read (topic, partition, offset, key, value, headers).
    pub record: KafkaRecord,
    /// The decoder's error message.
    pub error: String,
}

/// Where a record came from, for error messages.
fn locate(r: &KafkaRecord) -> String {
    format!("topic {} partition {} offset {}", r.topic, r.partition, r.offset)
}

/// Decoding for a stream of Kafka records (implemented for `DStream<KafkaRecord>`).
pub trait Decode {
    /// Decodes every record with `decoder`; a record it rejects fails the batch with an error
    /// naming its topic, partition and offset (nothing of the batch is committed; after a
    /// restart it replays with the same records).
    ///
    /// ```
    /// use cairn_connectors::kafka::{Decode, KafkaRecord};
    /// let ctx = cairn::StreamingContext::builder().build().unwrap();
    /// let (q, records) = ctx.queue_stream::<KafkaRecord>("kafka").unwrap();
    /// let amounts = records.decode(|r| {
    ///     let v = std::str::from_utf8(r.value.as_deref().unwrap_or_default())?;
    ///     Ok(v.parse::<i64>()?)
    /// });
    /// let _seen = cairn::testing::collect(&amounts);
    /// let rec = |offset: i64, v: &str| KafkaRecord {
    ///     topic: "payments".into(), partition: 2, offset, key: None,
    ///     value: Some(v.as_bytes().to_vec()), timestamp_ms: None, headers: vec![],
    /// };
    /// q.push(vec![rec(7, "12"), rec(8, "twelve")]);
    /// let err = ctx.run_available().unwrap_err().to_string();
    /// assert!(err.contains("topic payments partition 2 offset 8"), "{err}");
    /// ```
    fn decode<T: Data>(
        &self,
        decoder: impl Fn(&KafkaRecord) -> Result<T, UserError> + Send + Sync + 'static,
    ) -> DStream<T>;

    /// Decodes every record with `decoder`; records it rejects go, with the error, to the second
    /// stream (attach a sink to it, e.g. [`KafkaSink::dead_letters`](super::KafkaSink::dead_letters)),
    /// and each is logged with its topic, partition and offset.
    ///
    /// ```
    /// use cairn_connectors::kafka::{Decode, KafkaRecord};
    /// let ctx = cairn::StreamingContext::builder().build().unwrap();
    /// let (q, records) = ctx.queue_stream::<KafkaRecord>("kafka").unwrap();
    /// let (amounts, dead) = records.decode_or_dead_letter(|r| {
    ///     Ok(std::str::from_utf8(r.value.as_deref().unwrap_or_default())?.parse::<i64>()?)
    /// });
    /// let good = cairn::testing::collect(&amounts);
    /// let bad = cairn::testing::collect(&dead);
    /// let rec = |offset: i64, v: &str| KafkaRecord {
    ///     topic: "payments".into(), partition: 0, offset, key: None,
    ///     value: Some(v.as_bytes().to_vec()), timestamp_ms: None, headers: vec![],
    /// };
    /// q.push(vec![rec(0, "12"), rec(1, "twelve"), rec(2, "30")]);
    /// ctx.run_available().unwrap();
    /// assert_eq!(good.lock().unwrap().concat(), vec![12, 30]);
    /// let bad = bad.lock().unwrap().concat();
    /// assert_eq!((bad.len(), bad[0].record.offset), (1, 1));
    /// ```
    fn decode_or_dead_letter<T: Data>(
        &self,
        decoder: impl Fn(&KafkaRecord) -> Result<T, UserError> + Send + Sync + 'static,
    ) -> (DStream<T>, DStream<DeadLetter>);
}

impl Decode for DStream<KafkaRecord> {
    fn decode<T: Data>(
        &self,
        decoder: impl Fn(&KafkaRecord) -> Result<T, UserError> + Send + Sync + 'static,
    ) -> DStream<T> {
        self.try_map(move |r| {
            decoder(&r).map_err(|e| format!("cannot decode the record at {}: {e}", locate(&r)).into())
        })
    }

    fn decode_or_dead_letter<T: Data>(
        &self,
        decoder: impl Fn(&KafkaRecord) -> Result<T, UserError> + Send + Sync + 'static,
    ) -> (DStream<T>, DStream<DeadLetter>) {
        // One decoding pass; the two outputs read it (cairn computes a shared node once a batch).
        let decoded = self.map(move |r| match decoder(&r) {
            Ok(v) => Ok(v),
            Err(e) => {
                tracing::warn!("dead letter: cannot decode the record at {}: {e}", locate(&r));
                Err(Box::new(DeadLetter { record: r, error: e.to_string() }))
            }
        });
        (decoded.flat_map(Result::ok), decoded.flat_map(|d| d.err().map(|b| *b)))
    }
}
