//! Named crash points for tests: with `CAIRN_FAILPOINT=<name>` (optionally `<name>@<batch>`) in
//! the environment, the process aborts the moment it reaches that point, as a crash would leave it.
//! Unset (the normal case), a failpoint costs one relaxed atomic load.

use std::sync::OnceLock;

/// After a batch's plan is logged, before it runs.
pub const AFTER_PLAN: &str = "after-plan";
/// After state was updated in memory, before sinks ran.
pub const MID_BATCH: &str = "mid-batch";
/// After the sinks wrote, before the commit record.
pub const AFTER_SINK: &str = "after-sink";
/// While writing a checkpoint: a torn (truncated) object is left behind.
pub const MID_CHECKPOINT: &str = "mid-checkpoint";
/// After a checkpoint was written, before retention ran.
pub const AFTER_CHECKPOINT: &str = "after-checkpoint";

/// After a receiver wrote a block of its write-ahead log (`@N`: block `N`), before the records'
/// senders are told they are durable: a crash here leaves records logged but unacknowledged, so
/// their senders retry. Not in [`ALL`]: only jobs with a receiver reach it.
pub const AFTER_WAL_BLOCK: &str = "after-wal-block";

/// Between the lease check and the write of batch `N`'s plan, the process stops itself with
/// SIGSTOP (a paused process: GC pause, VM freeze, `kill -STOP`), so a test can let another
/// process take the location over and then resume it with SIGCONT. Not in [`ALL`]: it does not
/// crash the job.
pub const FREEZE_BEFORE_PLAN: &str = "freeze-before-plan";

/// Every crashing failpoint, for tests that iterate over them.
pub const ALL: [&str; 5] = [AFTER_PLAN, MID_BATCH, AFTER_SINK, MID_CHECKPOINT, AFTER_CHECKPOINT];

struct Armed {
    name: String,
    batch: Option<u64>,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("CAIRN_FAILPOINT").ok()?;
            let (name, batch) = match v.split_once('@') {
                Some((n, b)) => (n.to_string(), b.parse().ok()),
                None => (v, None),
            };
            Some(Armed { name, batch })
        })
        .as_ref()
}

/// The armed failpoint's name, if any.
pub(crate) fn armed_name() -> Option<&'static str> {
    armed().map(|a| a.name.as_str())
}

/// True when the named failpoint is armed for this batch.
pub(crate) fn is_armed(name: &str, batch: u64) -> bool {
    armed().is_some_and(|a| a.name == name && a.batch.is_none_or(|b| b == batch))
}

/// True when the named failpoint is armed for this batch or an earlier one. Checkpoint
/// failpoints use it: under load the writer may merge the checkpoint of the armed batch into a
/// later one, and the failpoint must still fire (at the first checkpoint written after it).
pub(crate) fn is_armed_from(name: &str, batch: u64) -> bool {
    armed().is_some_and(|a| a.name == name && a.batch.is_none_or(|b| b <= batch))
}

/// Aborts the process if the named failpoint is armed for this batch.
pub(crate) fn hit(name: &str, batch: u64) {
    if is_armed(name, batch) {
        crash(name, batch);
    }
}

/// Stops the whole process (every thread) with SIGSTOP if the named failpoint is armed for this
/// batch; returns once something sends SIGCONT. Only the first hit stops: a write retried after
/// the pause must go through.
pub(crate) fn freeze(name: &str, batch: u64) {
    static FROZEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if is_armed(name, batch) && !FROZEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        eprintln!("cairn: failpoint {name} hit at batch {batch}; stopping until SIGCONT");
        if let Err(e) = signal_hook::low_level::raise(signal_hook::consts::SIGSTOP) {
            eprintln!("cairn: failpoint {name}: cannot stop the process: {e}");
        }
        eprintln!("cairn: failpoint {name}: resumed");
    }
}

pub(crate) fn crash(name: &str, batch: u64) -> ! {
    eprintln!("cairn: failpoint {name} hit at batch {batch}; aborting");
    std::process::abort();
}
