//! What runs a defined job: recovery and the batch loop, the background checkpoint writer, the
//! progress events they report, and the crash points tests arm.

pub mod failpoint;
pub(crate) mod job;
pub(crate) mod progress;
pub(crate) mod recovery;
pub(crate) mod restart;
pub(crate) mod scheduler;
pub(crate) mod writer;
