#![warn(missing_docs, unreachable_pub)]
//! Connectors between cairn and external systems.
//!
//! - [`postgres::PostgresSink`]: rows and the batch id in one PostgreSQL transaction, so a batch
//!   replayed after a crash is never written twice.
//! - [`kafka::KafkaSource`]: a direct stream whose per-partition offset ranges are planned before
//!   each batch and kept in the checkpoint; [`kafka::Decode`] turns its records into the job's
//!   types, failing the batch or routing bad records to a dead-letter stream.
//! - [`kafka::KafkaSink`]: each batch in one Kafka transaction that also records the batch id,
//!   so a replayed batch is never written twice.

pub mod kafka;
mod pending;
pub mod postgres;
