//! Background checkpoint writing. The scheduler hands each cut checkpoint to a bounded queue and
//! goes on with the next batch; a writer thread stores it, and a maintenance thread compacts full
//! snapshots and applies retention. When storage falls behind, the queue fills and `submit`
//! blocks: backpressure the scheduler reports, instead of memory growing without bound.

use crate::error::{Error, Result};
use crate::runtime::failpoint;
use crate::runtime::progress::{CheckpointFailed, CheckpointMaintained, CheckpointWritten, Listeners};
use cairn_checkpoint::paths::ObjectName;
use cairn_checkpoint::{codec, BatchId, CheckpointKind, CheckpointStore, StateCheckpoint};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Figures about background checkpoint writes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WriterStats {
    /// Duration of the latest completed write.
    pub last_write_ms: Option<f64>,
    /// Checkpoints written.
    pub written: u64,
    /// Bytes of checkpoint objects written (compacted snapshots included).
    pub bytes: u64,
    /// Objects created (compacted snapshots included).
    pub objects: u64,
}

#[derive(Default)]
struct Shared {
    stats: WriterStats,
    /// The write that failed for good, with the store's error as it was.
    error: Option<(BatchId, Arc<cairn_checkpoint::Error>)>,
    /// Checkpoints submitted and not yet written.
    pending: usize,
    /// The newest full snapshot known to be stored (written, or compacted by maintenance):
    /// later deltas' chains start there.
    newest_full: Option<BatchId>,
    /// Stored bytes of `newest_full`.
    newest_full_bytes: u64,
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct CheckpointWriter {
    tx: Option<SyncSender<StateCheckpoint>>,
    shared: Arc<Mutex<Shared>>,
    threads: Vec<JoinHandle<()>>,
    capacity: usize,
}

impl CheckpointWriter {
    pub(crate) fn start(
        listeners: Listeners,
        store: CheckpointStore,
        capacity: usize,
        full_every: usize,
        keep: usize,
    ) -> Result<Self> {
        // `capacity` checkpoints may be pending: one being written, the rest queued.
        let (tx, rx) = sync_channel::<StateCheckpoint>(capacity.saturating_sub(1));
        let (maint_tx, maint_rx) = channel::<BatchId>();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut threads = Vec::new();
        {
            let (store, shared, listeners) = (store.clone(), shared.clone(), listeners.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("cairn-ckpt-writer".into())
                    .spawn(move || write_loop(&store, rx, &shared, maint_tx, &listeners))
                    .map_err(|e| {
                        Error::Lifecycle(format!("cannot start the checkpoint writer thread: {e}"))
                    })?,
            );
        }
        {
            let (shared, listeners) = (shared.clone(), listeners.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("cairn-ckpt-maintenance".into())
                    .spawn(move || maintenance_loop(&store, maint_rx, &shared, full_every, keep, &listeners))
                    .map_err(|e| {
                        Error::Lifecycle(format!("cannot start the checkpoint maintenance thread: {e}"))
                    })?,
            );
        }
        Ok(Self { tx: Some(tx), shared, threads, capacity: capacity.max(1) })
    }

    /// The newest full snapshot known to be stored by this writer, and its stored bytes.
    pub(crate) fn newest_full(&self) -> Option<(BatchId, u64)> {
        let s = lock(&self.shared);
        s.newest_full.map(|b| (b, s.newest_full_bytes))
    }

    /// Checkpoints submitted and not yet written.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.shared).pending
    }

    /// True when every slot of the queue is taken: a submit now would block.
    pub(crate) fn is_full(&self) -> bool {
        lock(&self.shared).pending >= self.capacity
    }

    /// Queues a checkpoint; blocks while the queue is full. Returns the ms spent blocked.
    pub(crate) fn submit(&self, ckpt: StateCheckpoint) -> Result<f64> {
        self.check()?;
        let t0 = Instant::now();
        let tx = self.tx.as_ref().expect("submit after finish");
        lock(&self.shared).pending += 1;
        tx.send(ckpt).map_err(|_| self.failure())?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }

    /// Fails if a background write failed for good.
    pub(crate) fn check(&self) -> Result<()> {
        match &lock(&self.shared).error {
            Some((batch, source)) => Err(Error::CheckpointWrite { batch: *batch, source: source.clone() }),
            None => Ok(()),
        }
    }

    fn failure(&self) -> Error {
        match self.check() {
            Err(e) => e,
            Ok(()) => Error::Lifecycle("checkpoint writer failed: the writer thread stopped".into()),
        }
    }

    pub(crate) fn stats(&self) -> WriterStats {
        lock(&self.shared).stats
    }

    /// Waits until every queued checkpoint is written and maintenance is done; returns the
    /// final figures and whether every write succeeded.
    pub(crate) fn finish(mut self) -> (WriterStats, Result<()>) {
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (self.stats(), self.check())
    }
}

fn object_name(c: &StateCheckpoint) -> ObjectName {
    match c.kind {
        CheckpointKind::Full => ObjectName::Full(c.batch_id),
        CheckpointKind::Delta { parent } => ObjectName::Delta { batch: c.batch_id, parent },
    }
}

fn write_loop(
    store: &CheckpointStore,
    rx: Receiver<StateCheckpoint>,
    shared: &Mutex<Shared>,
    maint: Sender<BatchId>,
    listeners: &Listeners,
) {
    for ckpt in rx {
        let batch = ckpt.batch_id;
        if failpoint::is_armed_from(failpoint::MID_CHECKPOINT, batch.0) {
            // A torn write, as a store without atomic puts could leave it: half the object.
            let bytes = codec::encode_state(&ckpt);
            let _ = store.write_raw(object_name(&ckpt), bytes[..bytes.len() / 2].to_vec());
            failpoint::crash(failpoint::MID_CHECKPOINT, batch.0);
        }
        let t0 = Instant::now();
        // Transient failures are retried inside the store (one budget for every request); what
        // comes back here is final, and so is a lost lease.
        let retries_before = cairn_checkpoint::retry::retries_on_this_thread();
        let stats = store.write_checkpoint(&ckpt);
        let retries = (cairn_checkpoint::retry::retries_on_this_thread() - retries_before) as u32;
        let mut s = lock(shared);
        s.pending = s.pending.saturating_sub(1);
        match stats {
            Ok(w) => {
                let write_ms = t0.elapsed().as_secs_f64() * 1e3;
                s.stats.last_write_ms = Some(write_ms);
                s.stats.written += 1;
                s.stats.bytes += w.bytes;
                s.stats.objects += w.objects;
                if ckpt.kind == CheckpointKind::Full && s.newest_full < Some(batch) {
                    s.newest_full = Some(batch);
                    s.newest_full_bytes = w.bytes;
                }
                drop(s);
                let e = CheckpointWritten {
                    batch_id: batch,
                    bytes: w.bytes,
                    write_ms,
                    full: ckpt.kind == CheckpointKind::Full,
                    objects: w.objects,
                    retries,
                };
                listeners.each(|l| l.on_checkpoint_written(&e));
            }
            Err(e) => {
                tracing::error!("checkpoint after batch {batch} could not be written: {e}");
                let error = e.to_string();
                s.error = Some((batch, Arc::new(e)));
                drop(s);
                let e = CheckpointFailed { batch_id: batch, error, retries };
                listeners.each(|l| l.on_checkpoint_failed(&e));
                return; // dropping rx makes the next submit fail
            }
        }
        if failpoint::is_armed_from(failpoint::AFTER_CHECKPOINT, batch.0) {
            failpoint::crash(failpoint::AFTER_CHECKPOINT, batch.0);
        }
        let _ = maint.send(batch);
    }
}

fn maintenance_loop(
    store: &CheckpointStore,
    rx: Receiver<BatchId>,
    shared: &Mutex<Shared>,
    full_every: usize,
    keep: usize,
    listeners: &Listeners,
) {
    while let Ok(mut batch) = rx.recv() {
        let mut done =
            CheckpointMaintained { batch_id: batch, compacted_bytes: None, deleted: 0, error: None };
        // Coalesce: when checkpoints arrive faster than maintenance runs, work on the newest.
        while let Ok(b) = rx.try_recv() {
            batch = b;
        }
        // The chain length is read from the location, not counted in memory, so restarts
        // (which may come more often than every K checkpoints) still get snapshots cut.
        let chain_len = store
            .listing()
            .ok()
            .and_then(|l| cairn_checkpoint::protocol::chain(&l, batch, true))
            .map_or(0, |c| c.len());
        done.batch_id = batch;
        if cairn_checkpoint::protocol::compaction_due(chain_len, full_every) {
            match store.compact(batch) {
                Ok(Some(w)) => {
                    done.compacted_bytes = Some(w.bytes);
                    let mut s = lock(shared);
                    s.stats.bytes += w.bytes;
                    s.stats.objects += w.objects;
                    if s.newest_full < Some(batch) {
                        s.newest_full = Some(batch);
                        s.newest_full_bytes = w.bytes;
                    }
                }
                Ok(None) => {
                    let mut s = lock(shared);
                    s.newest_full = s.newest_full.max(Some(batch));
                }
                Err(e) => {
                    tracing::warn!("compacting a full snapshot at batch {batch} failed (will retry): {e}");
                    done.error = Some(format!("compaction: {e}"));
                }
            }
        }
        match store.apply_retention(keep) {
            Ok(r) => done.deleted = r.deleted.len() as u64,
            Err(e) => {
                tracing::warn!("checkpoint retention failed (will retry after the next checkpoint): {e}");
                done.error = Some(format!("retention: {e}"));
            }
        }
        listeners.each(|l| l.on_checkpoint_maintained(&done));
    }
}
