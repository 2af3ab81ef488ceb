//! Sources: where batches come from. A source plans offset ranges before a batch runs (they are
//! logged, so a replay reads exactly the same input) and reads a planned range on demand. The
//! built-in ones: a deterministic generator, new text files of a directory, an in-memory queue,
//! and receivers (push-based input kept in a write-ahead log), such as a TCP socket.

mod generator;
mod queue;
pub(crate) mod receiver;
mod socket;
mod text_files;

pub use crate::graph::Positions;
pub use generator::Generator;
pub(crate) use queue::queue;
pub use queue::QueueHandle;
pub use receiver::{Durable, NotDurable, ReceiverHandle, Refused};
pub(crate) use socket::spawn_reader as spawn_socket_reader;
pub use text_files::{LineParser, Malformed, TextFiles};

use crate::error::{Error, Result};
use crate::graph::{BatchCtx, Data, Graph, Node, Partitions, SourceDyn, UserError};
use cairn_checkpoint::{OffsetRange, SourcePartition};
use rayon::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A replayable input. `plan` proposes the next ranges given the current positions; `read` must
/// return the same records every time it is given the same range (that is what makes replays
/// exact). Per-partition offset ranges fit a Kafka direct stream as well as files.
///
/// ```
/// use cairn::source::{Positions, Source};
/// use cairn::{OffsetRange, SourcePartition, UserError};
/// /// Ten numbers per batch, forever.
/// struct Counter;
/// impl Source for Counter {
///     type Item = u64;
///     fn plan(&self, pos: &Positions) -> Result<Vec<OffsetRange>, UserError> {
///         let partition = SourcePartition::named("0");
///         let start = pos.get(&partition).copied().unwrap_or(0);
///         Ok(vec![OffsetRange { partition, start, end: start + 10 }])
///     }
///     fn read(&self, r: &OffsetRange) -> Result<Vec<u64>, UserError> {
///         Ok((r.start..r.end).collect())
///     }
/// }
/// let ctx = cairn::StreamingContext::builder().build().unwrap();
/// let s = ctx.source("counter", Counter).unwrap();
/// ```
pub trait Source: Send + Sync + 'static {
    /// The records this source produces.
    type Item: Data;
    /// Ranges to read in the next batch (empty: nothing new).
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError>;
    /// The records of one planned range.
    fn read(&self, range: &OffsetRange) -> std::result::Result<Vec<Self::Item>, UserError>;
    /// The partition that checkpoint format versions 1 and 2 stored as the string `key` (they
    /// had no typed partitions). Positions and logged plans of such a location pass through it
    /// when a job restarts on it, so a source whose partitions are not plain names (Kafka's
    /// `"topic-partition"`) says how to read its old keys. The default keeps the name.
    fn legacy_partition(&self, key: &str) -> std::result::Result<SourcePartition, UserError> {
        Ok(SourcePartition::named(key))
    }
    /// The input lag as of the most recent [`plan`](Source::plan): per partition, the records
    /// known to be available past the planned end (for Kafka, the end offset minus the planned
    /// end). It goes into each batch's progress record and `/metrics`. Sources that cannot tell
    /// return nothing (the default).
    fn backlog(&self) -> Vec<(SourcePartition, u64)> {
        Vec::new()
    }
    /// What a receiver (push-based input kept in a write-ahead log) did so far; it goes into
    /// each batch's progress record. Other sources return `None` (the default).
    fn receiver_status(&self) -> Option<crate::ReceiverStatus> {
        None
    }
    /// Restricts the source to task `task` of `tasks` of a scaled-out job: from now on it plans
    /// only that task's partitions (partition number `task` of each of its topics), and refuses
    /// when its partitions do not divide into `tasks` tasks that way. Called once, before the
    /// source joins the graph. The default refuses: only sources whose partitions the consumer
    /// group assigns (Kafka topics) scale out.
    fn restrict_to_task(&mut self, task: crate::TaskId, tasks: u32) -> std::result::Result<(), UserError> {
        let _ = (task, tasks);
        Err("only Kafka sources divide into tasks; run a job with this source as one process".into())
    }
}

struct SourceNode<S> {
    name: String,
    source: Arc<S>,
}

impl<S: Source> SourceDyn for SourceNode<S> {
    fn name(&self) -> &str {
        &self.name
    }
    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>> {
        let ranges = self.source.plan(positions).map_err(|e| Error::source_failed(&self.name, None, &e))?;
        for r in &ranges {
            if r.end < r.start {
                return Err(Error::source(&self.name, format!("planned an inverted range {r:?}")));
            }
        }
        Ok(ranges)
    }
    fn legacy_partition(&self, key: &str) -> Result<SourcePartition> {
        self.source.legacy_partition(key).map_err(|e| Error::source(&self.name, e))
    }
    fn backlog(&self) -> Vec<(SourcePartition, u64)> {
        self.source.backlog()
    }
    fn receiver_status(&self) -> Option<crate::ReceiverStatus> {
        self.source.receiver_status()
    }
}

impl<S: Source> Node<S::Item> for SourceNode<S> {
    fn compute(&self, ctx: &BatchCtx<'_>) -> Result<Partitions<S::Item>> {
        let parts: Result<Partitions<S::Item>> = ctx
            .ranges(&self.name)
            .par_iter()
            .map(|r| {
                self.source.read(r).map_err(|e| {
                    let doing = format!("reading {} [{}, {})", r.partition, r.start, r.end);
                    Error::source_failed(&self.name, Some(doing), &e)
                })
            })
            .collect();
        let parts = parts?;
        ctx.records.fetch_add(parts.iter().map(|p| p.len() as u64).sum(), Ordering::Relaxed);
        Ok(parts)
    }
}

/// Adds a source to the graph under `name` (unique: its offsets are checkpointed under it) and
/// returns the node that reads its planned ranges, for the caller to make a stream of.
pub(crate) fn register<S: Source>(graph: &Graph, name: &str, source: S) -> Result<impl Node<S::Item>> {
    graph.claim_name(name)?;
    let source = Arc::new(source);
    graph.lock().sources.push(Arc::new(SourceNode { name: name.to_string(), source: source.clone() }));
    Ok(SourceNode { name: name.to_string(), source })
}
