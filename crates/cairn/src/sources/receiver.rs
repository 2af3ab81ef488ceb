//! Receivers: push-based input made replayable by a write-ahead log in the checkpoint location
//! (see [`cairn_checkpoint::wal`]). What a receiver hands over through its [`ReceiverHandle`] is
//! buffered until the next batch plans; the plan first writes the buffer as one WAL block (one
//! object per receiver per batch, whatever the record count), then names the blocks not read yet.
//! A record is acknowledged ([`Durable::wait`]) once its block is written, so a crash at any
//! instant loses nothing that was acknowledged, and a replay reads the same blocks.

use super::{Positions, Source};
use crate::graph::UserError;
use cairn_checkpoint::wal::WalBlock;
use cairn_checkpoint::{CheckpointStore, OffsetRange, SourcePartition};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Plans between two retention passes over a receiver's log.
const RETENTION_EVERY: u64 = 16;

/// Why records were not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// The receiver holds as many unwritten records as it may (`max_pending`): the batches do
    /// not keep up. Retry later.
    #[error("the receiver's buffer is full ({0} records wait for the next batch)")]
    Full(usize),
    /// The receiver takes records faster than its rate bound (records per second: the
    /// configured maximum, or the automatic bound while batches take longer than the batch
    /// interval). Retry later.
    #[error("the receiver is over its rate bound of {0} records/s")]
    RateLimited(u64),
    /// The job stopped: nothing will write these records.
    #[error("the job stopped")]
    Stopped,
}

/// A token bucket: up to one second of the rate bound may be taken at once.
#[derive(Debug)]
struct Rate {
    /// The configured maximum, records per second.
    configured: Option<f64>,
    /// The automatic bound from batch processing time.
    auto: Option<f64>,
    tokens: f64,
    last: Instant,
}

impl Rate {
    fn limit(&self) -> Option<f64> {
        match (self.configured, self.auto) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes `n` tokens if there are enough (a bucket that is full takes any `n`: a request
    /// larger than one second of the bound is not refused for ever); the bound, when refused.
    fn take(&mut self, n: usize) -> Result<(), f64> {
        let Some(limit) = self.limit() else { return Ok(()) };
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * limit).min(limit);
        self.last = now;
        if self.tokens >= n as f64 || self.tokens >= limit {
            self.tokens -= n as f64;
            Ok(())
        } else {
            Err(limit)
        }
    }
}

/// Why acknowledged-to-be records did not become durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotDurable {
    /// They were not written in time (the job is slow, restarting or stopped); they may still
    /// be written later.
    #[error("not written to the write-ahead log within {0:?}")]
    Timeout(Duration),
    /// The job stopped before writing them.
    #[error("the job stopped before writing them to the write-ahead log")]
    Stopped,
}

#[derive(Default)]
struct Pending {
    records: Vec<Vec<u8>>,
    /// Idempotency keys of the requests whose records are in `records`.
    keys: Vec<String>,
    /// Generation of the records in `records`; every generation below `durable` is written.
    generation: u64,
    durable: u64,
}

struct Shared {
    name: String,
    pending: Mutex<Pending>,
    written: Condvar,
    room: Condvar,
    max_pending: usize,
    /// The source was dropped.
    stopped: AtomicBool,
    /// The job's scheduler ended.
    job_finished: Arc<AtomicBool>,
    received: AtomicU64,
    refused: AtomicU64,
    blocks: AtomicU64,
    rate: Mutex<Rate>,
    /// Whether the automatic bound follows batch processing time.
    backpressure: AtomicBool,
    store: CheckpointStore,
    /// How long blocks holding idempotency keys are kept (0: only as long as plans need them).
    key_window_ms: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) || self.job_finished.load(Ordering::SeqCst)
    }
}

/// Hands records to a receiver. Cheap to clone; every clone feeds the same log.
#[derive(Clone)]
pub struct ReceiverHandle {
    shared: Arc<Shared>,
}

/// Records handed over with [`ReceiverHandle::push`]: [`wait`](Durable::wait) returns once they
/// are in the write-ahead log.
#[must_use = "records are acknowledged only once durable"]
pub struct Durable {
    shared: Arc<Shared>,
    generation: u64,
}

impl Durable {
    /// Blocks until the records are durable (at most `timeout`).
    pub fn wait(&self, timeout: Duration) -> Result<(), NotDurable> {
        let deadline = Instant::now() + timeout;
        let mut p = self.shared.lock();
        while p.durable <= self.generation {
            if self.shared.is_stopped() {
                return Err(NotDurable::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NotDurable::Timeout(timeout));
            }
            p = self
                .shared
                .written
                .wait_timeout(p, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

impl ReceiverHandle {
    /// Hands `records` over for the next batch, or refuses at once when the buffer is full.
    pub fn push(&self, records: Vec<Vec<u8>>) -> Result<Durable, Refused> {
        self.offer(records, None, None)
    }

    /// Like [`push`](Self::push), recording `key` (a request's idempotency key) in the block
    /// that holds the records, so that [`logged_keys`](Self::logged_keys) finds it after a
    /// restart.
    pub fn push_keyed(&self, records: Vec<Vec<u8>>, key: String) -> Result<Durable, Refused> {
        self.offer(records, Some(key), None)
    }

    /// Keeps the log's blocks at least `window` after they were written (beyond what plans
    /// need), so the idempotency keys in them outlive a restart for that long.
    pub fn keep_keys_for(&self, window: Duration) {
        self.shared.key_window_ms.store(window.as_millis() as u64, Ordering::Relaxed);
    }

    /// The idempotency keys in the log's blocks written in the last `window`: what a restarted
    /// server must still recognise.
    pub fn logged_keys(&self, window: Duration) -> Result<Vec<String>, String> {
        let s = &self.shared;
        let since = wall_ms() - window.as_millis() as i64;
        let blocks = s.store.wal_blocks_written(&s.name).map_err(|e| e.to_string())?;
        let mut keys = Vec::new();
        for (seq, _) in blocks.into_iter().filter(|(_, at)| *at >= since) {
            if let Some(b) = s.store.read_wal_block(&s.name, seq).map_err(|e| e.to_string())? {
                keys.extend(b.keys);
            }
        }
        Ok(keys)
    }

    /// Like [`push`](Self::push), waiting up to `wait` for room (a socket reader slows its
    /// sender this way).
    pub fn push_waiting(&self, records: Vec<Vec<u8>>, wait: Duration) -> Result<Durable, Refused> {
        self.offer(records, None, Some(Instant::now() + wait))
    }

    fn offer(
        &self,
        records: Vec<Vec<u8>>,
        key: Option<String>,
        until: Option<Instant>,
    ) -> Result<Durable, Refused> {
        let s = &self.shared;
        let mut p = s.lock();
        loop {
            if s.is_stopped() {
                return Err(Refused::Stopped);
            }
            // One oversized push into an empty buffer is taken: it could never fit otherwise.
            if p.records.is_empty() || p.records.len() + records.len() <= s.max_pending {
                break;
            }
            let left = until.map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                s.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Full(p.records.len()));
            }
            p = s
                .room
                .wait_timeout(p, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        loop {
            let taken = s.rate.lock().unwrap_or_else(|e| e.into_inner()).take(records.len());
            match taken {
                Ok(()) => break,
                Err(limit) => {
                    let left = until.map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now()));
                    if left.is_zero() {
                        s.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Refused::RateLimited(limit as u64));
                    }
                    drop(p);
                    std::thread::sleep(left.min(Duration::from_millis(20)));
                    p = s.lock();
                    if s.is_stopped() {
                        return Err(Refused::Stopped);
                    }
                }
            }
        }
        s.received.fetch_add(records.len() as u64, Ordering::Relaxed);
        p.records.extend(records);
        p.keys.extend(key);
        Ok(Durable { shared: s.clone(), generation: p.generation })
    }

    /// Records handed over so far, and WAL blocks written.
    pub fn counts(&self) -> (u64, u64) {
        (self.shared.received.load(Ordering::Relaxed), self.shared.blocks.load(Ordering::Relaxed))
    }

    /// Bounds the ingest rate to `records_per_s` (`None`: no configured maximum). Pushes over
    /// the bound are refused with [`Refused::RateLimited`] (or wait, with
    /// [`push_waiting`](Self::push_waiting)); up to one second's worth may arrive at once.
    pub fn set_max_rate(&self, records_per_s: Option<f64>) {
        let mut rate = self.shared.rate.lock().unwrap_or_else(|e| e.into_inner());
        rate.configured = records_per_s.filter(|r| *r > 0.0);
        // A new bound starts with a full second's worth.
        rate.tokens = rate.limit().unwrap_or(0.0);
        rate.last = Instant::now();
    }

    /// Whether the automatic bound follows the batches (on by default): while a batch takes
    /// longer than the batch interval, the rate is bounded to what the batches processed, and
    /// the bound is relaxed again as they catch up (Spark's `backpressure.enabled`).
    pub fn set_backpressure(&self, on: bool) {
        self.shared.backpressure.store(on, Ordering::Relaxed);
        if !on {
            self.shared.rate.lock().unwrap_or_else(|e| e.into_inner()).auto = None;
        }
    }

    /// The rate bound now (records per second), `None` when unbounded.
    pub fn rate_limit(&self) -> Option<f64> {
        self.shared.rate.lock().unwrap_or_else(|e| e.into_inner()).limit()
    }

    /// Whether the job stopped (receivers stop reading then).
    pub fn is_stopped(&self) -> bool {
        self.shared.is_stopped()
    }

    /// The receiver's name (its source name).
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

/// The source side of a receiver: plans and reads its write-ahead log.
pub(crate) struct WalSource {
    shared: Arc<Shared>,
    store: CheckpointStore,
    /// The next block number to write: above every block listed so far.
    next_block: Mutex<u64>,
    plans: AtomicU64,
}

impl Drop for WalSource {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.written.notify_all();
        self.shared.room.notify_all();
    }
}

/// A receiver named `name` whose log lives in `store`, holding at most `max_pending` unwritten
/// records: the handle to feed it and the source to register. It stops taking input when
/// `job_finished` is set.
pub(crate) fn receiver(
    name: &str,
    store: CheckpointStore,
    max_pending: usize,
    job_finished: Arc<AtomicBool>,
) -> (ReceiverHandle, WalSource) {
    let shared = Arc::new(Shared {
        name: name.to_string(),
        pending: Mutex::default(),
        written: Condvar::new(),
        room: Condvar::new(),
        max_pending: max_pending.max(1),
        stopped: AtomicBool::new(false),
        job_finished,
        received: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        blocks: AtomicU64::new(0),
        rate: Mutex::new(Rate { configured: None, auto: None, tokens: 0.0, last: Instant::now() }),
        backpressure: AtomicBool::new(true),
        store: store.clone(),
        key_window_ms: AtomicU64::new(0),
    });
    let source =
        WalSource { shared: shared.clone(), store, next_block: Mutex::new(0), plans: AtomicU64::new(0) };
    (ReceiverHandle { shared }, source)
}

impl WalSource {
    fn partition(&self) -> SourcePartition {
        SourcePartition::named("wal")
    }

    /// Writes what was handed over since the last plan as one block; returns the blocks there
    /// are now (ascending).
    fn seal(&self) -> Result<Vec<u64>, UserError> {
        let s = &self.shared;
        let name = &s.name;
        let listed = self.store.wal_blocks(name).map_err(|e| format!("receiver {name}: {e}"))?;
        let mut next = self.next_block.lock().unwrap_or_else(|e| e.into_inner());
        *next = (*next).max(listed.last().map_or(0, |b| b + 1));
        let (records, keys, generation) = {
            let mut p = s.lock();
            let taken = (std::mem::take(&mut p.records), std::mem::take(&mut p.keys), p.generation);
            p.generation += 1;
            taken
        };
        s.room.notify_all();
        if records.is_empty() {
            s.lock().durable = generation + 1;
            s.written.notify_all();
            return Ok(listed);
        }
        let block = WalBlock { records, sealed_ms: wall_ms(), keys };
        // A block number another process took meanwhile is skipped: its block is read like ours.
        let mut written = None;
        for _ in 0..8 {
            match self.store.write_wal_block(name, *next, &block) {
                Ok(true) => {
                    written = Some(*next);
                    *next += 1;
                    break;
                }
                Ok(false) => *next += 1,
                Err(e) => {
                    self.put_back(block);
                    return Err(format!("receiver {name}: writing its write-ahead log: {e}").into());
                }
            }
        }
        let Some(seq) = written else {
            self.put_back(block);
            return Err(
                format!("receiver {name}: 8 block numbers in a row were taken by another writer").into()
            );
        };
        s.blocks.fetch_add(1, Ordering::Relaxed);
        crate::runtime::failpoint::hit(crate::runtime::failpoint::AFTER_WAL_BLOCK, seq);
        {
            let mut p = s.lock();
            p.durable = p.durable.max(generation + 1);
        }
        s.written.notify_all();
        let mut blocks = listed;
        blocks.push(seq);
        Ok(blocks)
    }

    /// Records whose block could not be written wait for the next plan, in front of newer ones.
    fn put_back(&self, mut block: WalBlock) {
        let mut p = self.shared.lock();
        block.records.append(&mut p.records);
        p.records = block.records;
        block.keys.append(&mut p.keys);
        p.keys = block.keys;
    }

    /// Deletes the blocks no logged plan and no restorable checkpoint needs: those below the
    /// first range of this source in the oldest plans still logged (plans are kept back to the
    /// oldest restorable checkpoint), or below `next` when none has one; and none written within
    /// the idempotency-key window.
    fn apply_retention(&self, next: u64) -> Result<usize, String> {
        let listing = self.store.listing().map_err(|e| e.to_string())?;
        let mut keep_from = next;
        for b in listing.plans() {
            let plan = self.store.read_plan(b).map_err(|e| e.to_string())?;
            let starts = plan
                .sources
                .iter()
                .filter(|s| s.source == self.shared.name)
                .flat_map(|s| s.ranges.iter().map(|r| r.start));
            if let Some(start) = starts.min() {
                keep_from = keep_from.min(start);
                break;
            }
        }
        let window = self.shared.key_window_ms.load(Ordering::Relaxed) as i64;
        if window > 0 {
            let since = wall_ms() - window;
            let blocks = self.store.wal_blocks_written(&self.shared.name).map_err(|e| e.to_string())?;
            if let Some((first_recent, _)) = blocks.iter().find(|(_, at)| *at >= since) {
                keep_from = keep_from.min(*first_recent);
            }
        }
        self.store.delete_wal_blocks_below(&self.shared.name, keep_from).map_err(|e| e.to_string())
    }
}

/// Follows batch processing time for a receiver's automatic rate bound: a batch that took
/// longer than the interval bounds the rate to 90% of what it processed per second of
/// processing; each batch that took under 70% of the interval relaxes the bound by half, and it
/// is lifted once it is far above what the receiver takes.
pub(crate) struct RateController {
    shared: Arc<Shared>,
    interval_ms: f64,
}

impl RateController {
    pub(crate) fn new(handle: &ReceiverHandle, interval: Duration) -> Self {
        Self { shared: handle.shared.clone(), interval_ms: interval.as_secs_f64() * 1e3 }
    }
}

impl crate::StreamingListener for RateController {
    fn on_batch_completed(&self, p: &crate::BatchProgress) {
        if p.replayed || !self.shared.backpressure.load(Ordering::Relaxed) {
            return;
        }
        let mut rate = self.shared.rate.lock().unwrap_or_else(|e| e.into_inner());
        if p.processing_ms > self.interval_ms && p.records > 0 {
            let sustained = p.records as f64 / (p.processing_ms / 1e3);
            let bound = (0.9 * sustained).max(100.0);
            if rate.auto.is_none_or(|a| bound < a) {
                tracing::info!(
                    "receiver {}: batches take {:.0} ms of a {:.0} ms interval; bounding ingest to {bound:.0} records/s",
                    self.shared.name, p.processing_ms, self.interval_ms
                );
            }
            rate.auto = Some(bound);
        } else if let Some(a) = rate.auto {
            if p.processing_ms < 0.7 * self.interval_ms {
                let taking = p.input_rows_per_s.max(1.0);
                rate.auto = if a * 1.5 > 10.0 * taking { None } else { Some(a * 1.5) };
            }
        }
    }
}

impl Source for WalSource {
    type Item = String;

    fn receiver_status(&self) -> Option<crate::ReceiverStatus> {
        let s = &self.shared;
        Some(crate::ReceiverStatus {
            name: s.name.clone(),
            records: s.received.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            blocks: s.blocks.load(Ordering::Relaxed),
            rate_limit: s.rate.lock().unwrap_or_else(|e| e.into_inner()).limit(),
        })
    }

    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>, UserError> {
        let blocks = self.seal()?;
        let partition = self.partition();
        let start = positions.get(&partition).copied().or(blocks.first().copied()).unwrap_or(0);
        if self.plans.fetch_add(1, Ordering::Relaxed) % RETENTION_EVERY == RETENTION_EVERY - 1 {
            if let Err(e) = self.apply_retention(start) {
                tracing::warn!(
                    "receiver {}: retention of its write-ahead log failed (will retry): {e}",
                    self.shared.name
                );
            }
        }
        let end = blocks.last().map_or(0, |b| b + 1);
        Ok(if end > start { vec![OffsetRange { partition, start, end }] } else { Vec::new() })
    }

    fn read(&self, range: &OffsetRange) -> Result<Vec<String>, UserError> {
        let name = &self.shared.name;
        let mut out = Vec::new();
        // Every number below a planned end was written before the plan (writers continue past
        // the highest listed block), so a missing one was lost or deleted: an error, not a gap.
        for seq in range.start..range.end {
            let block = self
                .store
                .read_wal_block(name, seq)
                .map_err(|e| format!("receiver {name}: {e}"))?
                .ok_or_else(|| format!("receiver {name}: block {seq} of its write-ahead log is missing"))?;
            for r in block.records {
                out.push(String::from_utf8(r).map_err(|e| {
                    format!("receiver {name}: block {seq} holds a record that is not UTF-8: {e}")
                })?);
            }
        }
        Ok(out)
    }
}

#[allow(clippy::disallowed_methods)] // block and key times are wall-clock times
fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
