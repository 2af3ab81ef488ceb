//! What runs a defined job: the batch loop and recovery, the background checkpoint writer, the
//! progress events it reports, and the crash points tests arm.

pub mod failpoint;
pub(crate) mod progress;
pub(crate) mod scheduler;
pub(crate) mod writer;
