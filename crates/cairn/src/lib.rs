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

mod clock;
mod context;
mod dstream;
mod error;
pub mod failpoint;
mod graph;
mod io;
mod keyed;
mod progress;
mod scheduler;
mod sink;
pub mod source;
mod state;
mod stateful;
pub mod testing;
mod window;
mod writer;

pub use cairn_checkpoint as checkpoint;
pub use cairn_checkpoint::schema::StateSchema;
pub use cairn_checkpoint::OffsetRange;
pub use clock::{Clock, SystemClock};
pub use context::{StopHandle, StreamingContext, StreamingContextBuilder, Trigger};
pub use dstream::{DStream, Data, UserError};
pub use error::{Error, Result};
pub use graph::{BatchInfo, Partitions};
pub use keyed::Key;
pub use progress::{
    BatchProgress, BatchStarted, CheckpointFailed, CheckpointWritten, LeaseLost, OperatorProgress,
    RecoveryFinished, StreamingListener,
};
pub use scheduler::RunSummary;
pub use sink::{read_text_output, BatchContext, BatchWrite, Sink, TaskId, TextFileSink};
pub use source::{Generator, Malformed, QueueHandle, Source, TextFiles};
pub use state::StateData;
pub use stateful::{OpName, State, StateSpec};
pub use writer::WriterStats;

/// The README's example is compiled as a doc test, so it cannot drift from the API.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
