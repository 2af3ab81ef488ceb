//! A defined job as the runtime sees it: its configuration, its graph, and the flags and
//! listeners shared between the context and the threads that run it.

use crate::clock::Clock;
use crate::graph::Graph;
use crate::runtime::progress::Listeners;
use cairn_checkpoint::CheckpointStore;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

/// When batches run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// One batch every batch interval, forever (until stopped).
    ProcessingTime,
    /// Process what the sources have now, batch after batch without waiting, then stop. For
    /// backfills, tests and benchmarks.
    AvailableNow,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub app_name: String,
    pub batch_interval: Duration,
    pub checkpoint: Option<String>,
    pub store: Option<CheckpointStore>,
    pub checkpoint_interval: Option<Duration>,
    pub parallelism: usize,
    pub trigger: Trigger,
    pub keep_checkpoints: usize,
    pub full_snapshot_every: usize,
    pub max_pending_checkpoints: usize,
    pub max_checkpoint_deferral: Option<u64>,
    pub stop_after_batches: Option<u64>,
    pub drop_state: Vec<String>,
    pub stop_on_signals: bool,
    pub lease_ttl: Duration,
    /// How long a job waits out transient failures, restarting in place, before it stops.
    pub max_outage: Duration,
    /// How the checkpoint store retries a transient failure of one request.
    pub storage_retries: cairn_checkpoint::retry::RetryPolicy,
    pub clock: Arc<dyn Clock>,
    /// Set when the job runs as one task of a scaled-out job.
    pub task: Option<crate::api::context::TaskAssignment>,
}

/// What the context hands the runtime: everything about a job except where it is in its
/// lifecycle, which stays with the context.
pub(crate) struct Job {
    pub cfg: Config,
    pub graph: Arc<Graph>,
    pub stop: Arc<AtomicBool>,
    pub listeners: Listeners,
    /// Restarts in place after transient failures since the job started.
    pub restarts: AtomicU64,
    /// When the batch now running (planning included) began: a failure's outage is counted from
    /// there, so time the clients spent retrying inside the batch is part of it.
    pub batch_began: std::sync::Mutex<Option<std::time::Instant>>,
    /// The lease epoch a task of a scaled-out job took last: a restart in place takes the
    /// location again only if nobody took it after that epoch.
    pub task_epoch: std::sync::Mutex<Option<u64>>,
    /// Set when the job's scheduler thread ends (however it ended): receivers stop taking input.
    pub finished: Arc<AtomicBool>,
}

impl Job {
    pub(crate) fn mark_batch_began(&self, at: std::time::Instant) {
        *self.batch_began.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// When the batch that just failed began, if one was running.
    pub(crate) fn take_batch_began(&self) -> Option<std::time::Instant> {
        self.batch_began.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}
