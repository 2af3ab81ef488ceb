//! The core every other module builds on: the operator graph and its node types, and the keyed
//! state tables that stateful operators keep and the scheduler checkpoints.

mod node;
pub(crate) mod state;

pub(crate) use node::{BatchCtx, Graph, Node, Output, Shared};
pub use node::{BatchInfo, Partitions};
