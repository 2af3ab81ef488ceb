//! Connectors between cairn and external systems.
//!
//! - [`postgres::PostgresSink`]: rows and the batch id in one PostgreSQL transaction, so a batch
//!   replayed after a crash is never written twice.
//!
//! Kafka (a direct stream source and a transactional sink) is not built yet.

pub mod postgres;
