//! What a job's code calls: the context that defines and runs a job, the stream type with its
//! element-wise operators, and the output operations.

pub(crate) mod context;
pub(crate) mod dstream;
mod output;
