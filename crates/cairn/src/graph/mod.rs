//! The core every other module builds on: the operator graph and its node types, what elements
//! and keys must be and how keys are partitioned, and the keyed state tables that stateful
//! operators keep and the scheduler checkpoints.

mod data;
mod node;
pub(crate) mod state;

pub(crate) use data::{partition_of, shuffle};
pub use data::{Data, Key, Partitions, UserError};
pub(crate) use node::{BatchCtx, Graph, Node, Output, Shared, SourceDyn, StatefulOp};
pub use node::{BatchInfo, Positions};
