//! The core every other module builds on: the operator graph and its node types, what elements
//! and keys must be and how keys are partitioned, and the keyed state tables that stateful
//! operators keep and the scheduler checkpoints.

mod data;
mod node;
pub(crate) mod state;

pub use data::{is_transient, Data, Key, Partitions, Transient, UserError};
pub(crate) use data::{partition_of, shuffle};
pub(crate) use node::{next_run, BatchCtx, Graph, Node, Output, Shared, SourceDyn, StatefulOp};
pub use node::{BatchInfo, Positions};
