//! What a job's code calls: the context that defines and runs a job, and the stream type.

pub(crate) mod context;
pub(crate) mod dstream;
