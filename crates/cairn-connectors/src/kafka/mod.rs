//! Kafka in and out, exactly once.
//!
//! - [`KafkaSource`]: a direct stream over topics (names or a pattern) whose per-partition offset
//!   ranges are planned before each batch, logged by cairn and kept in the checkpoint.
//! - [`Decode`]: records into the job's types; a record that does not decode fails the batch or
//!   goes to a dead-letter stream.
//! - [`Membership`]: one process's place in a job that runs on several: the consumer group
//!   assigns it tasks (partitions of the anchor topic) and reports every change.
//! - [`KafkaSink`]: each batch in one Kafka transaction that also records the batch id, so a
//!   replayed batch is never written twice.
//!
//! The protocol and what is tested against which broker: `docs/kafka.md`.

mod decode;
mod membership;
mod plan;
mod sink;
mod source;

pub use decode::{DeadLetter, Decode};
pub use membership::{Membership, MembershipConfig, Task, TaskChange};
pub use sink::{KafkaSink, OutRecord, SinkOutcome};
pub use source::{GroupCommitter, KafkaRecord, KafkaSource, KafkaSourceBuilder, StartFrom, Topics};
