#![warn(missing_docs, unreachable_pub)]
//! Checkpoint formats, the recovery and retention protocol, and checkpoint storage for cairn.
//!
//! Layering: [`model`] holds the records that live in a checkpoint location, [`frame`] and
//! [`codec`] turn them into checksummed bytes, [`paths`] names every object, [`protocol`] decides
//! (without I/O) what recovery loads and what retention deletes, and [`store`] is the only module
//! that talks to an [`object_store::ObjectStore`].

pub mod admin;
pub mod codec;
pub mod compat;
pub mod debris;
mod error;
pub mod frame;
pub mod lease;
pub mod member_log;
pub mod merge;
pub mod model;
pub mod paths;
pub mod protocol;
pub mod retry;
pub mod savepoint;
pub mod schema;
pub mod store;
pub mod table;
pub mod typed;
pub mod wal;

pub use error::{Error, Result};
pub use model::*;
pub use object_store;
pub use store::{CheckpointStore, Recovered, RetentionReport, WriteStats};
pub use table::{TableData, TableReader, TableWriter};
