//! The I/O edge: reads and writes checkpoint objects through an [`ObjectStore`], following the
//! decisions of [`crate::protocol`]. Everything is exposed as blocking calls (the engine's
//! scheduler is synchronous); a small private tokio runtime drives the async object store.

use crate::frame::ObjectKind;
use crate::paths::{ObjectName, Paths};
use crate::protocol::{self, Listing};
use crate::retry::{RetryPolicy, Retrying};
use crate::{codec, merge};
use crate::{
    BatchCommit, BatchId, BatchPlan, CheckpointKind, Epoch, Error, GraphDescription, JobMetadata, Result,
    StateCheckpoint, TableData,
};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

mod open;
mod reads;
mod recovery;

/// Deletes a retention pass keeps in flight at once.
const RETENTION_CONCURRENCY: usize = 16;

pub use open::{block_on_io, io_runtime, open_location, open_location_with, open_store, OpenedLocation};
pub use reads::ReadRates;
pub use recovery::{DamagedCopy, Recovered, RestoredState};

/// Bytes and objects written by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes stored, frame included; 0 when an existing object was kept.
    pub bytes: u64,
    /// Objects stored; 0 when an existing object was kept (a replay, or a retried write that
    /// had landed).
    pub objects: u64,
}

/// What a retention pass did.
#[derive(Debug, Clone, Default)]
pub struct RetentionReport {
    /// The checkpoints kept (batches after which they were taken), newest first.
    pub kept_checkpoints: Vec<BatchId>,
    /// Objects deleted (or already gone), in the order they were deleted.
    pub deleted: Vec<ObjectName>,
    /// Staging files of crashed writers removed (local locations only).
    pub debris: Vec<std::path::PathBuf>,
}

/// A checkpoint location.
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    paths: Paths,
    location: String,
    /// The directory of a location on the local file system, swept for crashed writers' debris.
    local_dir: Option<std::path::PathBuf>,
    /// The lease epoch this store writes in (shared by clones: the writer and maintenance
    /// threads commit under the scheduler's lease).
    held: Arc<RwLock<Option<Held>>>,
    hook: Arc<RwLock<Option<CommitHook>>>,
    /// How long this store's reads took (shared by clones).
    reads: Arc<reads::ReadTimes>,
}

/// The lease epoch a store holds, and the batch it took the location over from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Held {
    pub epoch: Epoch,
    pub from_batch: BatchId,
}

/// Called with the object's name after the lease check and before the write of every committed
/// object (plans, commits, state checkpoints, compacted snapshots): tests use it to pause a
/// process exactly where a stale holder could slip a write in.
pub type CommitHook = Arc<dyn Fn(ObjectName) + Send + Sync>;

impl Clone for CheckpointStore {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            paths: self.paths.clone(),
            location: self.location.clone(),
            local_dir: self.local_dir.clone(),
            held: self.held.clone(),
            hook: self.hook.clone(),
            reads: self.reads.clone(),
        }
    }
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointStore").field("location", &self.location).finish()
    }
}

pub(crate) enum Created {
    New,
    Exists(Vec<u8>),
}

impl CheckpointStore {
    /// Opens a location (see [`open_store`]).
    ///
    /// ```
    /// use cairn_checkpoint::CheckpointStore;
    /// let store = CheckpointStore::open("memory://").unwrap();
    /// assert!(store.read_metadata().unwrap().is_none());
    /// ```
    pub fn open(location: &str) -> Result<Self> {
        Self::open_with(location, RetryPolicy::default())
    }

    /// [`CheckpointStore::open`] with another policy for retrying transient storage failures.
    ///
    /// ```
    /// use cairn_checkpoint::{retry::RetryPolicy, CheckpointStore};
    /// let none = RetryPolicy { max_retries: 0, ..RetryPolicy::default() };
    /// assert!(CheckpointStore::open_with("memory://", none).is_ok());
    /// ```
    pub fn open_with(location: &str, policy: RetryPolicy) -> Result<Self> {
        if let Some((job, task)) = crate::paths::split_task_location(location) {
            return Self::open_task(location, job, task);
        }
        let opened = open::open_location_with(location, policy)?;
        let mut s = Self::unwrapped(opened.store, opened.root, location);
        s.local_dir = opened.local_dir;
        Ok(s)
    }

    /// A task location of a scaled-out job ([`crate::paths::task_location`]): the task's plans
    /// and deltas live in the member logs under the job's location
    /// ([`crate::member_log`]), shared by every task of the job this process opens.
    fn open_task(location: &str, job: &str, task: u32) -> Result<Self> {
        let log = crate::member_log::MemberLog::shared(job)?;
        let mut s = Self::unwrapped(log.view(task), log.task_root(task), location);
        // Opened for its directory only (a local task location's crashed writers' debris).
        s.local_dir = open::open_location(location)?.local_dir;
        Ok(s)
    }

    /// Uses an existing object store (e.g. wrapped to inject latency or faults) under `root`.
    /// Every request goes through [`Retrying`] with the default [`RetryPolicy`].
    pub fn with_store(store: Arc<dyn ObjectStore>, root: Path, location: impl Into<String>) -> Self {
        Self::with_store_retrying(store, root, location, RetryPolicy::default())
    }

    /// [`CheckpointStore::with_store`] with another retry policy.
    pub fn with_store_retrying(
        store: Arc<dyn ObjectStore>,
        root: Path,
        location: impl Into<String>,
        policy: RetryPolicy,
    ) -> Self {
        Self::unwrapped(Arc::new(Retrying::new(store, policy)), root, location)
    }

    /// A store over `store` as given (it already retries).
    fn unwrapped(store: Arc<dyn ObjectStore>, root: Path, location: impl Into<String>) -> Self {
        Self {
            store,
            paths: Paths::new(root),
            location: location.into(),
            local_dir: None,
            held: Arc::new(RwLock::new(None)),
            hook: Arc::new(RwLock::new(None)),
            reads: Arc::default(),
        }
    }

    pub(crate) fn held(&self) -> Option<Held> {
        *self.held.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_held(&self, h: Option<Held>) {
        *self.held.write().unwrap_or_else(|e| e.into_inner()) = h;
    }

    /// The lease epoch this store writes in (0 without a lease: tools and tests).
    pub fn epoch(&self) -> Epoch {
        self.held().map_or(0, |h| h.epoch)
    }

    /// Installs (or removes) the [`CommitHook`].
    pub fn set_commit_hook(&self, hook: Option<CommitHook>) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    /// Whether an existing object written in `epoch` about `batch` was left by a holder this
    /// store's epoch fenced off: it may be replaced.
    fn is_stale(&self, epoch: Epoch, batch: BatchId) -> bool {
        self.held().is_some_and(|h| epoch < h.epoch && batch >= h.from_batch)
    }

    /// The write of a committed object: the lease is checked first (a taken-over process stops
    /// with `LeaseLost` instead of writing), and again after a new object landed, so a process
    /// that lost the lease meanwhile stops before acting on what it wrote (running sinks on a
    /// plan the new holder may not accept).
    fn commit_put(&self, name: ObjectName, bytes: Vec<u8>, mode: PutMode) -> Result<Created> {
        self.check_lease()?;
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(name);
        }
        let created = self.put(&self.paths.path(name), bytes, mode).or_else(|e| self.lease_lost_or(e))?;
        self.check_lease()?;
        Ok(created)
    }

    /// A write that failed may have failed because another process took over meanwhile (a
    /// process paused between its fence check and its write finds the new holder's objects, or
    /// finds them gone); that is what the caller must hear, not the storage error it caused.
    fn lease_lost_or<T>(&self, e: Error) -> Result<T> {
        self.check_lease()?;
        Err(e)
    }

    /// [`commit_put`](Self::commit_put) of a new object whose stored size is then checked, so a
    /// store that reports success for a torn write is caught at once. The fence check after the
    /// write and the size check (a HEAD) are both reads, so they go out together: on slow
    /// storage the pair costs one round trip, not two. A torn object is rewritten only once the
    /// fence check passed.
    fn commit_create_whole(&self, name: ObjectName, bytes: Vec<u8>) -> Result<Created> {
        self.check_lease()?;
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(name);
        }
        let path = self.paths.path(name);
        let created = self.put(&path, bytes.clone(), PutMode::Create).or_else(|e| self.lease_lost_or(e))?;
        if !matches!(created, Created::New) {
            self.check_lease()?;
            return Ok(created);
        }
        let (fence, stored) = std::thread::scope(|sc| {
            let head = sc.spawn(|| self.block_on(self.store.head(&path)));
            let fence = self.check_lease();
            (fence, head.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        });
        fence?;
        let stored = stored.map_err(|e| Error::storage(&path, e))?.size;
        self.rewrite_if_torn(&path, bytes, stored)?;
        Ok(Created::New)
    }

    /// A conflict with an object a newer epoch wrote means this process is the stale one.
    fn newer_epoch_conflict(&self, existing: Epoch, path: &Path, reason: String) -> Error {
        if existing > self.epoch() && self.held().is_some() {
            if let Err(lost) = self.check_lease() {
                return lost;
            }
        }
        Error::Conflict { path: path.to_string(), reason }
    }

    /// The location as given.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Object names under this location.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Runs a future on this store's runtime, blocking the caller.
    pub fn block_on<T>(
        &self,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        block_on_io(f)
    }

    /// Measured read latency and bandwidth of this location over the reads this store (and its
    /// clones) made so far; `None` before the first read.
    pub fn read_rates(&self) -> Option<ReadRates> {
        self.reads.rates()
    }

    pub(crate) fn get(&self, path: &Path) -> Result<Option<Vec<u8>>> {
        let t0 = std::time::Instant::now();
        let r = self.block_on(async { self.store.get(path).await?.bytes().await });
        match r {
            Ok(b) => {
                self.reads.record(b.len() as u64, t0.elapsed());
                Ok(Some(b.to_vec()))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::storage(path, e)),
        }
    }

    pub(crate) fn get_required(&self, path: &Path) -> Result<Vec<u8>> {
        self.get(path)?.ok_or_else(|| Error::corrupt(path, "object is missing"))
    }

    /// Writes one object. Transient failures were already retried by [`crate::retry::Retrying`];
    /// an existing object (conditional create) is returned for the caller to judge.
    pub(crate) fn put(&self, path: &Path, bytes: Vec<u8>, mode: PutMode) -> Result<Created> {
        let mut opts = PutOptions::from(mode);
        // A task location seen through member logs keeps each write's epoch with it.
        opts.extensions.insert(crate::member_log::WriteEpoch(self.epoch()));
        match self.block_on(self.store.put_opts(path, PutPayload::from(bytes), opts)) {
            Ok(_) => Ok(Created::New),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Exists(self.get_required(path)?)),
            Err(e) => Err(Error::storage(path, e)),
        }
    }

    /// Reads one copy of the metadata: `Ok(None)` when missing, `Err` when unreadable.
    fn read_metadata_copy(&self, name: ObjectName) -> Result<Option<JobMetadata>> {
        let path = self.paths.path(name);
        match self.get(&path)? {
            None => Ok(None),
            Some(b) => Ok(Some(codec::decode_json(path.as_ref(), &b, ObjectKind::Metadata)?)),
        }
    }

    /// Reads both copies of the metadata: the job's metadata (from whichever copy verifies; the
    /// primary when both do) and the copies that are missing or damaged. Both damaged is an error
    /// naming both problems; both missing is a location without metadata.
    pub fn inspect_metadata(&self) -> Result<(Option<JobMetadata>, Vec<DamagedCopy>)> {
        let mut bad = Vec::new();
        let mut found = None;
        let mut errors = Vec::new();
        for name in [ObjectName::Metadata, ObjectName::MetadataCopy] {
            match self.read_metadata_copy(name) {
                Ok(Some(m)) => {
                    if found.is_none() {
                        found = Some(m);
                    }
                }
                Ok(None) => bad.push((name, "missing".to_string())),
                Err(e @ Error::Storage { .. }) => return Err(e),
                Err(e) => {
                    errors.push(e.to_string());
                    bad.push((name, e.to_string()));
                }
            }
        }
        if found.is_none() && !errors.is_empty() {
            return Err(Error::Unrecoverable {
                location: self.location.clone(),
                reason: format!(
                    "both copies of the job metadata are damaged or missing ({}); the job's identity, batch interval and start time are gone: start the job on a new location, or restore `metadata` from a backup",
                    bad.iter().map(|(n, e)| format!("{}: {e}", self.paths.path(*n))).collect::<Vec<_>>().join("; ")
                ),
            });
        }
        if found.is_none() {
            bad.clear(); // an empty location: nothing is damaged
        }
        Ok((found, bad))
    }

    /// The job metadata, if the location has been initialised: the primary copy, or the second
    /// copy when the primary is missing or damaged.
    pub fn read_metadata(&self) -> Result<Option<JobMetadata>> {
        Ok(self.inspect_metadata()?.0)
    }

    /// Rewrites a missing or damaged copy of the metadata from the good one (and creates the
    /// second copy on locations written before it existed). Returns what was repaired.
    pub fn repair_metadata(&self) -> Result<Vec<String>> {
        let (Some(m), bad) = self.inspect_metadata()? else { return Ok(Vec::new()) };
        let bytes = codec::encode_json(ObjectKind::Metadata, &m);
        let mut repaired = Vec::new();
        for (name, problem) in bad {
            let path = self.paths.path(name);
            self.put(&path, bytes.clone(), PutMode::Overwrite)?;
            repaired.push(format!("{path} was {problem}; rewritten from the other copy"));
        }
        Ok(repaired)
    }

    /// Writes the job metadata once, as two copies; an identical existing object is accepted.
    pub fn create_metadata(&self, m: &JobMetadata) -> Result<()> {
        let bytes = codec::encode_json(ObjectKind::Metadata, m);
        for name in [ObjectName::Metadata, ObjectName::MetadataCopy] {
            let path = self.paths.path(name);
            match self.put(&path, bytes.clone(), PutMode::Create)? {
                Created::New => {}
                Created::Exists(old) if old == bytes => {}
                Created::Exists(_) => {
                    return Err(Error::Conflict {
                        path: path.to_string(),
                        reason: "another job initialised this location first".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Logs a batch's plan with a conditional create. Re-logging the same plan (a replay) is
    /// accepted; a different plan for the same batch means another writer: a conflict.
    /// The plan and every object the store writes carry the store's lease epoch; a plan left by a
    /// fenced-off holder at or beyond this epoch's fence point is replaced.
    pub fn write_plan(&self, plan: &BatchPlan) -> Result<WriteStats> {
        let name = ObjectName::Plan(plan.batch_id);
        let path = self.paths.path(name);
        let plan = &BatchPlan { epoch: self.epoch(), ..plan.clone() };
        let bytes = codec::encode_json(ObjectKind::Plan, plan);
        let len = bytes.len() as u64;
        match self.commit_create_whole(name, bytes.clone())? {
            Created::New => Ok(WriteStats { bytes: len, objects: 1 }),
            Created::Exists(old) => {
                match codec::decode_json::<BatchPlan>(path.as_ref(), &old, ObjectKind::Plan) {
                    Ok(existing) if self.is_stale(existing.epoch, existing.batch_id) => {
                        tracing::warn!(
                            "replacing the plan of batch {} left by fenced-off lease epoch {}",
                            plan.batch_id,
                            existing.epoch
                        );
                        self.commit_put(name, bytes, PutMode::Overwrite)?;
                        Ok(WriteStats { bytes: len, objects: 1 })
                    }
                    // A replay, or a retried create whose first attempt landed (same content).
                    Ok(existing)
                        if existing.batch_id == plan.batch_id
                            && existing.batch_time_ms == plan.batch_time_ms
                            && existing.sources == plan.sources =>
                    {
                        Ok(WriteStats::default())
                    }
                    Ok(existing) => Err(self.newer_epoch_conflict(
                        existing.epoch,
                        &path,
                        format!(
                            "batch {} was already planned with different input by another writer (lease epoch {})",
                            plan.batch_id, existing.epoch
                        ),
                    )),
                    Err(e) => {
                        tracing::warn!("replacing a corrupt plan object ({e})");
                        self.commit_put(name, bytes, PutMode::Overwrite)?;
                        Ok(WriteStats { bytes: len, objects: 1 })
                    }
                }
            }
        }
    }

    /// Reads a batch's plan.
    pub fn read_plan(&self, batch: BatchId) -> Result<BatchPlan> {
        let path = self.paths.path(ObjectName::Plan(batch));
        codec::decode_json(path.as_ref(), &self.get_required(&path)?, ObjectKind::Plan)
    }

    /// Reads a batch's commit record.
    pub fn read_commit(&self, batch: BatchId) -> Result<BatchCommit> {
        let path = self.paths.path(ObjectName::Commit(batch));
        codec::decode_json(path.as_ref(), &self.get_required(&path)?, ObjectKind::Commit)
    }

    /// Writes a batch's commit record; an existing one (from an earlier attempt) is kept.
    /// A commit left by a fenced-off holder is replaced.
    pub fn write_commit(&self, c: &BatchCommit) -> Result<WriteStats> {
        let name = ObjectName::Commit(c.batch_id);
        let path = self.paths.path(name);
        let c = &BatchCommit { epoch: self.epoch(), ..c.clone() };
        let bytes = codec::encode_json(ObjectKind::Commit, c);
        let len = bytes.len() as u64;
        match self.commit_put(name, bytes.clone(), PutMode::Create)? {
            Created::New => Ok(WriteStats { bytes: len, objects: 1 }),
            Created::Exists(old) => {
                let stale = codec::decode_json::<BatchCommit>(path.as_ref(), &old, ObjectKind::Commit)
                    .is_ok_and(|e| self.is_stale(e.epoch, e.batch_id));
                if stale {
                    self.commit_put(name, bytes, PutMode::Overwrite)?;
                    return Ok(WriteStats { bytes: len, objects: 1 });
                }
                Ok(WriteStats::default())
            }
        }
    }

    /// Writes a state checkpoint as one object, by conditional create. An existing valid
    /// checkpoint of the same batch is kept (a replay recomputed it); a corrupt one (a torn
    /// earlier write) is replaced.
    pub fn write_checkpoint(&self, ckpt: &StateCheckpoint) -> Result<WriteStats> {
        let name = match ckpt.kind {
            CheckpointKind::Full => ObjectName::Full(ckpt.batch_id),
            CheckpointKind::Delta { parent } => ObjectName::Delta { batch: ckpt.batch_id, parent },
        };
        let path = self.paths.path(name);
        let ckpt = &StateCheckpoint { epoch: self.epoch(), ..ckpt.clone() };
        let bytes = codec::encode_state(ckpt);
        let len = bytes.len() as u64;
        match self.commit_create_whole(name, bytes.clone())? {
            Created::New => Ok(WriteStats { bytes: len, objects: 1 }),
            Created::Exists(old) if old == bytes => Ok(WriteStats::default()),
            Created::Exists(old) => match codec::decode_state(path.as_ref(), &old) {
                Ok(existing) if self.is_stale(existing.epoch, existing.batch_id) => {
                    tracing::warn!("replacing {path}, left by fenced-off lease epoch {}", existing.epoch);
                    self.commit_put(name, bytes, PutMode::Overwrite)?;
                    Ok(WriteStats { bytes: len, objects: 1 })
                }
                Ok(existing) if existing.batch_id == ckpt.batch_id && existing.kind == ckpt.kind => {
                    Ok(WriteStats::default())
                }
                Ok(_) => Err(Error::Conflict {
                    path: path.to_string(),
                    reason: "a different checkpoint already exists under this name".into(),
                }),
                Err(e) => {
                    tracing::warn!("replacing a torn checkpoint object ({e})");
                    self.commit_put(name, bytes, PutMode::Overwrite)?;
                    Ok(WriteStats { bytes: len, objects: 1 })
                }
            },
        }
    }

    /// Deletes an object; a missing one is not an error.
    pub fn delete_object(&self, name: ObjectName) -> Result<()> {
        let path = self.paths.path(name);
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::storage(&path, e)),
        }
    }

    /// A store without atomic puts can report success for a torn object, and later objects would
    /// build on it (a checkpoint chained onto a torn one, a batch run from a torn plan). `stored`
    /// is the size a HEAD found right after the write: a short object is rewritten once, then the
    /// write fails.
    fn rewrite_if_torn(&self, path: &Path, bytes: Vec<u8>, stored: u64) -> Result<()> {
        let len = bytes.len() as u64;
        if stored != len {
            tracing::warn!("{path} was stored torn ({stored} of {len} bytes); rewriting");
            self.put(path, bytes, PutMode::Overwrite)?;
            let again = self.block_on(self.store.head(path)).map_err(|e| Error::storage(path, e))?.size;
            if again != len {
                return Err(Error::corrupt(path, format!("stored {again} of {len} bytes twice")));
            }
        }
        Ok(())
    }

    /// Writes raw bytes (failpoints use it to leave a torn object behind).
    pub fn write_raw(&self, name: ObjectName, bytes: Vec<u8>) -> Result<()> {
        self.put(&self.paths.path(name), bytes, PutMode::Overwrite).map(|_| ())
    }

    /// Every recognised object of the location with its size in bytes.
    pub fn list_objects(&self) -> Result<Vec<(ObjectName, u64)>> {
        let root = self.paths.root().clone();
        let prefix = if root.as_ref().is_empty() { None } else { Some(&root) };
        let metas: Vec<ObjectMeta> = self
            .block_on(self.store.list(prefix).try_collect::<Vec<_>>())
            .map_err(|e| Error::storage(&self.location, e))?;
        let mut out: Vec<(ObjectName, u64)> =
            metas.iter().filter_map(|m| self.paths.parse(&m.location).map(|n| (n, m.size))).collect();
        out.sort();
        Ok(out)
    }

    /// The raw bytes of an object.
    pub fn read_raw(&self, name: ObjectName) -> Result<Vec<u8>> {
        self.get_required(&self.paths.path(name))
    }

    /// The tasks of a scaled-out job stored under this location
    /// ([`crate::paths::task_location`]), ascending; empty for a job that runs as one process.
    pub fn tasks(&self) -> Result<Vec<u32>> {
        let dir = self.paths.tasks_dir();
        let listed = self
            .block_on(self.store.list_with_delimiter(Some(&dir)))
            .map_err(|e| Error::storage(&self.location, e))?;
        let mut tasks: Vec<u32> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(crate::paths::parse_task))
            .collect();
        tasks.sort_unstable();
        Ok(tasks)
    }

    /// Every recognised object of the location.
    pub fn listing(&self) -> Result<Listing> {
        let root = self.paths.root().clone();
        let prefix = if root.as_ref().is_empty() { None } else { Some(&root) };
        let metas: Vec<ObjectMeta> = self
            .block_on(self.store.list(prefix).try_collect::<Vec<_>>())
            .map_err(|e| Error::storage(&self.location, e))?;
        Ok(Listing::new(metas.iter().filter_map(|m| self.paths.parse(&m.location))))
    }

    /// Reads and verifies a state checkpoint object.
    pub fn read_state(&self, name: ObjectName) -> Result<StateCheckpoint> {
        let path = self.paths.path(name);
        self.decode_state_at(name, &self.get_required(&path)?)
    }

    /// Decodes a state object and checks it is what its name says.
    fn decode_state_at(&self, name: ObjectName, bytes: &[u8]) -> Result<StateCheckpoint> {
        let path = self.paths.path(name);
        let ckpt = codec::decode_state(path.as_ref(), bytes)?;
        let expected = match name {
            ObjectName::Full(b) => (b, CheckpointKind::Full),
            ObjectName::Delta { batch, parent } => (batch, CheckpointKind::Delta { parent }),
            _ => return Err(Error::corrupt(&path, "not a state object name")),
        };
        if (ckpt.batch_id, ckpt.kind) != expected {
            return Err(Error::corrupt(
                &path,
                format!(
                    "holds the checkpoint of batch {} ({:?}), not what its name says",
                    ckpt.batch_id, ckpt.kind
                ),
            ));
        }
        Ok(ckpt)
    }

    /// Writes a full snapshot of the checkpoint of `batch`, merged from its chain, unless one
    /// exists; reads it back to verify before it counts. Returns what was written.
    pub fn compact(&self, batch: BatchId) -> Result<Option<WriteStats>> {
        let listing = self.listing()?;
        if listing.contains(ObjectName::Full(batch)) {
            return Ok(None);
        }
        let chain = protocol::chain(&listing, batch, true).ok_or_else(|| Error::Unrecoverable {
            location: self.location.clone(),
            reason: format!("cannot compact batch {batch}: its checkpoint chain is incomplete"),
        })?;
        let loaded = chain.iter().map(|n| self.read_state(*n)).collect::<Result<Vec<_>>>()?;
        let fences = self.read_fences()?;
        for (name, c) in chain.iter().zip(&loaded) {
            if let Some(f) = protocol::fenced(&fences, c.epoch, c.batch_id) {
                return Err(Error::Fenced {
                    path: self.paths.path(*name).to_string(),
                    epoch: c.epoch,
                    reason: f.to_string(),
                });
            }
        }
        let mut merged = merge::merge_chain(loaded)?;
        merged.epoch = self.epoch();
        let path = self.paths.path(ObjectName::Full(batch));
        let bytes = codec::encode_state(&merged);
        let len = bytes.len() as u64;
        if let Created::Exists(_) =
            self.commit_put(ObjectName::Full(batch), bytes.clone(), PutMode::Create)?
        {
            return Ok(None);
        }
        // Read back before it counts: a snapshot that does not verify is removed, and the deltas
        // it would have replaced stay in use.
        if self.get(&path)?.as_deref() != Some(bytes.as_slice()) {
            let _ = self.block_on(self.store.delete(&path));
            return Err(Error::corrupt(
                &path,
                "the compacted snapshot did not read back identically; removed",
            ));
        }
        Ok(Some(WriteStats { bytes: len, objects: 1 }))
    }

    /// The location's directory when it is on the local filesystem.
    pub(crate) fn local_dir(&self) -> Option<&std::path::Path> {
        self.local_dir.as_deref()
    }

    /// Removes staging files that crashed writers left in a local location and that nobody has
    /// touched for [`crate::debris::DEBRIS_GRACE`]; returns them. Object stores leave none.
    pub fn sweep_debris(&self) -> Result<Vec<std::path::PathBuf>> {
        let Some(dir) = &self.local_dir else { return Ok(Vec::new()) };
        #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts, not batch time
        let now = std::time::SystemTime::now();
        let removed = crate::debris::sweep(dir, crate::debris::DEBRIS_GRACE, now)
            .map_err(|e| Error::Io { path: dir.display().to_string(), source: e })?;
        for f in &removed {
            tracing::info!("removed {} (left by a crashed writer)", f.display());
        }
        Ok(removed)
    }

    /// Removes objects recovery did not accept (see [`Recovered::fenced`]). Only the lease
    /// holder calls it: it fenced their writer off, so nothing else wants them.
    pub fn remove_fenced(&self, names: &[ObjectName]) -> Result<()> {
        self.check_lease()?;
        for name in names {
            let path = self.paths.path(*name);
            match self.block_on(self.store.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                    tracing::info!("removed {path}, written by a fenced-off lease holder")
                }
                Err(e) => return Err(Error::storage(&path, e)),
            }
        }
        Ok(())
    }

    /// Keeps the newest `keep` checkpoints and what they need; deletes the rest in an order that
    /// never breaks recovery if interrupted. Crashed writers' staging files go with them.
    pub fn apply_retention(&self, keep: usize) -> Result<RetentionReport> {
        let debris = self.sweep_debris()?;
        let plan = protocol::plan_retention(&self.listing()?, keep);
        // Deletes run concurrently: no kept checkpoint needs any object in the list, so whatever
        // subset an interruption leaves deleted is safe. On slow storage one delete at a time
        // fell behind the objects a job adds, and the location grew without bound.
        let results: Vec<(ObjectName, object_store::Result<()>)> = block_on_io(async {
            use futures::StreamExt;
            let deletes = futures::stream::iter(plan.delete.iter().map(|&name| async move {
                let path = self.paths.path(name);
                (name, self.store.delete(&path).await)
            }));
            Ok(deletes.buffered(RETENTION_CONCURRENCY).collect().await)
        })
        .unwrap_or_default();
        let mut deleted = Vec::new();
        for (name, r) in results {
            match r {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(name),
                Err(e) => return Err(Error::storage(self.paths.path(name), e)),
            }
        }
        Ok(RetentionReport { kept_checkpoints: plan.keep_checkpoints, deleted, debris })
    }
}
