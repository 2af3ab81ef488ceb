#![warn(missing_docs, unreachable_pub)]
//! cairn: micro-batch stream processing whose checkpoints never lose a record and never count
//! one twice.
//!
//! Build a [`StreamingContext`], add sources and [`DStream`] operators, give stateful operators
//! stable names, point the context at a checkpoint location, and run it. Killed at any instant,
//! the job restarts from its checkpoint, replays the batches that were planned but not committed
//! with identical input and batch ids, and carries on.
//!
//! ```
//! use cairn::StreamingContext;
//! let dir = tempfile::tempdir().unwrap();
//! let ctx = StreamingContext::builder()
//!     .app_name("totals")
//!     .checkpoint(dir.path().to_str().unwrap())
//!     .stop_after_batches(5)
//!     .build()
//!     .unwrap();
//! let events = ctx.generator("events", 2, 1000, |_, o| (o % 10, 1u64)).unwrap();
//! let totals = events.update_state_by_key("totals", |_, vs: Vec<u64>, old: Option<u64>| {
//!     Some(old.unwrap_or(0) + vs.iter().sum::<u64>())
//! });
//! let seen = cairn::testing::collect(&totals);
//! ctx.run_available().unwrap();
//! let last = seen.lock().unwrap().last().unwrap().clone();
//! assert_eq!(last.iter().map(|(_, c)| c).sum::<u64>(), 5 * 1000);
//! ```

// Layers, each using only the ones after it: `api` and `ops` (what job code calls) → `runtime`
// (recovery, the batch loop, checkpoint writing) → `sources` and `sinks` → `graph` (the operator
// graph, element and key traits, state tables) → `io`, `error`, `clock`. `ops` extends `api`'s
// `DStream` with more methods, and nothing in `api` uses `ops`. `scripts/module-deps.py` checks it.
mod api;
mod clock;
mod error;
mod graph;
mod io;
mod ops;
mod runtime;
mod sinks;
mod sources;
pub mod testing;

pub use runtime::failpoint;

/// Sources: where batches come from. A source plans offset ranges before a batch runs (they are
/// logged, so a replay reads exactly the same input) and reads a planned range on demand.
pub mod source {
    pub use crate::sources::{
        Durable, Generator, LineParser, Malformed, NotDurable, Positions, QueueHandle, ReceiverHandle,
        Refused, Source, TextFiles,
    };
}

pub use api::context::{StopHandle, StreamingContext, StreamingContextBuilder, TaskAssignment};
pub use api::dstream::DStream;
pub use cairn_checkpoint as checkpoint;
pub use cairn_checkpoint::schema::StateSchema;
pub use cairn_checkpoint::{BatchId, OffsetRange, SourcePartition};
pub use clock::{Clock, SystemClock};
pub use error::{Error, Result};
pub use graph::state::StateData;
pub use graph::{is_transient, BatchInfo, Data, Key, Partitions, Transient, UserError};
pub use ops::stateful::{OpName, State, StateSpec};
pub use runtime::job::Trigger;
pub use runtime::progress::{
    BatchProgress, BatchStarted, CheckpointFailed, CheckpointMaintained, CheckpointWritten, LeaseLost,
    OperatorProgress, ReceiverStatus, RecoveryFinished, RestartScheduled, SourceLag, StreamingListener,
};
pub use runtime::scheduler::RunSummary;
pub use runtime::writer::WriterStats;
pub use sinks::{read_text_output, BatchContext, BatchWrite, FenceCheck, Sink, TaskId, TextFileSink};
// Listed once more at the top for short paths; documented under `source`.
#[doc(no_inline)]
pub use source::{Generator, Malformed, QueueHandle, Source, TextFiles};

/// The README's example is compiled as a doc test, so it cannot drift from the API.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
