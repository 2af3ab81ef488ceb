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

/// Bytes and objects written by one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes stored, frame included; 0 when an existing object was kept.
    pub bytes: u64,
    /// Objects stored; 0 when an existing object was kept (a replay, or a retried write that
    /// had landed).
    pub objects: u64,
}

/// State restored from the newest usable checkpoint.
#[derive(Debug, Clone)]
pub struct RestoredState {
    /// The batch after which the state was taken.
    pub batch_id: BatchId,
    /// The graph that wrote it.
    pub graph: GraphDescription,
    /// One merged table per id: only live entries, no tombstones.
    pub tables: Vec<TableData>,
    /// The objects that were loaded, oldest first.
    pub chain: Vec<ObjectName>,
}

/// What recovery found.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The job metadata, from whichever copy verifies; `None` on a location never initialised.
    pub metadata: Option<JobMetadata>,
    /// The restored state; `None` when there is no checkpoint, or when none restores and the
    /// whole batch log is replayed from empty state.
    pub state: Option<RestoredState>,
    /// Batches planned after the restored checkpoint, in order, to be re-run with identical input.
    pub replay: Vec<BatchPlan>,
    /// Which of the replayed batches already have a commit record.
    pub committed: BTreeSet<BatchId>,
    /// Replayed batches whose plan object was damaged or missing and was rebuilt from its
    /// successor's copy; the engine rewrites them.
    pub rebuilt_plans: Vec<BatchId>,
    /// A copy of the newest plan, for the next plan to carry.
    pub last_plan: Option<crate::PlanCopy>,
    /// State objects that failed verification. Recovery worked around them; the engine deletes
    /// them and writes a full checkpoint next, so that nothing new builds on them and retention
    /// does not count them as a restore point.
    pub damaged_state: Vec<ObjectName>,
    /// The id the next new batch gets.
    pub next_batch: BatchId,
    /// Problems recovery worked around (a corrupt newest checkpoint, a torn trailing plan...).
    pub warnings: Vec<String>,
    /// Objects recovery did not accept because a newer lease epoch fenced their writer off
    /// (see [`protocol::fenced`]); the lease holder removes them with
    /// [`CheckpointStore::remove_fenced`].
    pub fenced: Vec<ObjectName>,
    /// Time spent reading and merging state objects.
    pub restore_ms: u64,
    /// Bytes of state objects read while restoring, including objects that failed verification.
    pub bytes_read: u64,
    /// State objects read while restoring, including objects that failed verification.
    pub objects_read: u64,
}

/// A copy of a redundant object that is missing or damaged, and what is wrong with it.
pub type DamagedCopy = (ObjectName, String);

/// Why a state object could not be used during recovery.
#[derive(Debug, Clone)]
struct Unusable {
    /// It is present but does not verify (checksum, header, name mismatch) or is missing: never
    /// usable again. Storage errors and objects of a newer format are not damage.
    damaged: bool,
    reason: String,
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

/// Resolves a location string to an object store and a root prefix: a local path (created if
/// missing), a `file:///abs/path` URL, `s3://bucket/prefix` (configured from the AWS_*
/// environment variables), `az://container/prefix` (from the AZURE_* variables),
/// `gs://bucket/prefix` (from the GOOGLE_* variables), or `memory://` (a fresh in-memory store,
/// for tests).
///
/// ```
/// let (_store, root) = cairn_checkpoint::store::open_store("memory://").unwrap();
/// assert_eq!(root.as_ref(), "");
/// assert!(cairn_checkpoint::store::open_store("ftp://host/x").is_err());
/// ```
pub fn open_store(location: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let opened = open_location(location)?;
    Ok((opened.store, opened.root))
}

/// An opened location: its object store, the root prefix in it, and, for a location on the local
/// file system, its directory (where crashed writers can leave staging files, see
/// [`crate::debris`]).
#[derive(Debug, Clone)]
pub struct OpenedLocation {
    /// The object store, wrapped in [`Retrying`].
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside `store` under which the location's objects live (empty for a local
    /// directory and for `memory://`).
    pub root: Path,
    /// The location's directory, canonicalized, when it is on the local file system; `None` for
    /// object stores.
    pub local_dir: Option<std::path::PathBuf>,
}

/// Like [`open_store`], also telling where a local location lives on disk. The store retries
/// transient failures ([`Retrying`], the only retry budget: the cloud clients' own retries are
/// off).
pub fn open_location(location: &str) -> Result<OpenedLocation> {
    let mut opened = open_unretried(location)?;
    opened.store = Arc::new(Retrying::new(opened.store, RetryPolicy::default()));
    Ok(opened)
}

/// The cloud clients' retries, switched off: [`Retrying`] retries every request instead, so one
/// budget covers every backend and every retry is counted.
fn client_retries_off() -> object_store::RetryConfig {
    object_store::RetryConfig { max_retries: 0, ..Default::default() }
}

fn open_unretried(location: &str) -> Result<OpenedLocation> {
    let remote =
        |(store, root): (Arc<dyn ObjectStore>, Path)| OpenedLocation { store, root, local_dir: None };
    let invalid = |reason: String| Error::InvalidLocation { location: location.to_string(), reason };
    let local_dir = if let Some((scheme, rest)) = location.split_once("://") {
        match scheme {
            "memory" => return Ok(remote((Arc::new(object_store::memory::InMemory::new()), Path::from("")))),
            "file" => {
                let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
                url.to_file_path().map_err(|_| invalid(format!("{rest:?} is not an absolute local path")))?
            }
            "s3" | "s3a" => {
                // Credentials, region and endpoint come from the usual AWS_* variables
                // (AWS_ENDPOINT and AWS_ALLOW_HTTP=true for a local S3-compatible server).
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(location)
                    .with_retry(client_retries_off())
                    .build();
                return cloud(location, "S3", store).map(remote);
            }
            "az" | "abfs" | "abfss" | "azure" | "adl" => {
                // Account, key or token from the usual AZURE_* variables (AZURE_STORAGE_USE_EMULATOR
                // and AZURITE_BLOB_STORAGE_URL for a local Azurite).
                let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(location)
                    .with_retry(client_retries_off())
                    .build();
                return cloud(location, "Azure Blob storage", store).map(remote);
            }
            "gs" => {
                // Service account from GOOGLE_SERVICE_ACCOUNT (a key file path) or
                // GOOGLE_SERVICE_ACCOUNT_KEY (its JSON), as object_store reads them.
                let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(location)
                    .with_retry(client_retries_off())
                    .build();
                return cloud(location, "Google Cloud Storage", store).map(remote);
            }
            #[cfg(feature = "hdfs")]
            "hdfs" | "viewfs" => {
                let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
                let namenode = format!("{}://{}", url.scheme(), url.authority());
                let store = hdfs_native_object_store::HdfsObjectStoreBuilder::new()
                    .with_url(&namenode)
                    .build()
                    .map_err(|e| invalid(format!("cannot configure HDFS: {e}")))?;
                let root = Path::from(url.path().trim_matches('/'));
                return Ok(remote((Arc::new(store), root)));
            }
            other => {
                let hdfs = if cfg!(feature = "hdfs") { ", hdfs://namenode/path" } else { "" };
                return Err(invalid(format!(
                    "the {other}:// scheme is not supported in this build; supported: a local path, file:///abs/path, s3://bucket/prefix, az://container/prefix, gs://bucket/prefix{hdfs}, memory:// (hdfs:// needs the `hdfs` cargo feature)"
                )));
            }
        }
    } else {
        if location.trim().is_empty() {
            return Err(invalid("empty location".into()));
        }
        std::path::PathBuf::from(location)
    };
    std::fs::create_dir_all(&local_dir).map_err(|e| invalid(format!("cannot create directory: {e}")))?;
    let dir = local_dir.canonicalize().map_err(|e| invalid(format!("cannot resolve directory: {e}")))?;
    let fs =
        object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| invalid(e.to_string()))?;
    Ok(OpenedLocation { store: Arc::new(fs), root: Path::from(""), local_dir: Some(dir) })
}

/// A cloud store built from a URL: the URL's path is the root prefix.
fn cloud<S: ObjectStore>(
    location: &str,
    what: &str,
    built: object_store::Result<S>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let invalid = |reason: String| Error::InvalidLocation { location: location.to_string(), reason };
    let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
    let store = built.map_err(|e| invalid(format!("cannot configure {what}: {e}")))?;
    Ok((Arc::new(store), Path::from(url.path().trim_matches('/'))))
}

/// The one runtime that drives every object-store request of the process (checkpoints, sources,
/// file sinks), started on first use. Starting it can fail (no threads or file descriptors left);
/// that is an error for the request, not a panic.
pub fn io_runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cairn-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    rt.as_ref().map_err(|e| std::io::Error::other(format!("cannot start the I/O runtime: {e}")))
}

/// Runs an object-store request on [`io_runtime`], blocking the caller (the engine's scheduler is
/// synchronous). A runtime that cannot start is reported as the request's error.
pub fn block_on_io<T>(
    f: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    match io_runtime() {
        Ok(rt) => rt.block_on(f),
        Err(e) => Err(object_store::Error::Generic { store: "cairn", source: Box::new(e) }),
    }
}

impl Clone for CheckpointStore {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            paths: self.paths.clone(),
            location: self.location.clone(),
            local_dir: self.local_dir.clone(),
            held: self.held.clone(),
            hook: self.hook.clone(),
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
        let opened = open_location(location)?;
        let mut s = Self::unwrapped(opened.store, opened.root, location);
        s.local_dir = opened.local_dir;
        Ok(s)
    }

    /// Uses an existing object store (e.g. wrapped to inject latency or faults) under `root`.
    /// Every request goes through [`Retrying`] with the default [`RetryPolicy`].
    pub fn with_store(store: Arc<dyn ObjectStore>, root: Path, location: impl Into<String>) -> Self {
        Self::unwrapped(Arc::new(Retrying::new(store, RetryPolicy::default())), root, location)
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
        let created = self.put(&self.paths.path(name), bytes, mode)?;
        self.check_lease()?;
        Ok(created)
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

    pub(crate) fn get(&self, path: &Path) -> Result<Option<Vec<u8>>> {
        let r = self.block_on(async { self.store.get(path).await?.bytes().await });
        match r {
            Ok(b) => Ok(Some(b.to_vec())),
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
        match self.block_on(self.store.put_opts(path, PutPayload::from(bytes), PutOptions::from(mode))) {
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
        match self.commit_put(name, bytes.clone(), PutMode::Create)? {
            Created::New => {
                self.ensure_whole(&path, bytes)?;
                Ok(WriteStats { bytes: len, objects: 1 })
            }
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
                        if existing.batch_id == plan.batch_id && existing.sources == plan.sources =>
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
        match self.commit_put(name, bytes.clone(), PutMode::Create)? {
            Created::New => {
                self.ensure_whole(&path, bytes)?;
                Ok(WriteStats { bytes: len, objects: 1 })
            }
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
    /// build on it (a checkpoint chained onto a torn one, a batch run from a torn plan). A HEAD
    /// catches a short object at once; it is rewritten once, then the write fails.
    fn ensure_whole(&self, path: &Path, bytes: Vec<u8>) -> Result<()> {
        let len = bytes.len() as u64;
        let stored = self.block_on(self.store.head(path)).map_err(|e| Error::storage(path, e))?.size;
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

    /// Every recognised object of the location.
    pub fn listing(&self) -> Result<Listing> {
        let root = self.paths.root().clone();
        let prefix = if root.as_ref().is_empty() { None } else { Some(&root) };
        let metas: Vec<ObjectMeta> = self
            .block_on(self.store.list(prefix).try_collect::<Vec<_>>())
            .map_err(|e| Error::storage(&self.location, e))?;
        Ok(Listing::new(metas.iter().filter_map(|m| self.paths.parse(&m.location))))
    }

    /// Reads and verifies a state object: (name, bytes read, checkpoint or why it is unusable).
    fn fetch_state(
        &self,
        name: ObjectName,
    ) -> (ObjectName, u64, std::result::Result<StateCheckpoint, Unusable>) {
        let path = self.paths.path(name);
        let unusable =
            |e: Error| Unusable { damaged: matches!(e, Error::Corrupt { .. }), reason: e.to_string() };
        match self.get_required(&path) {
            Ok(bytes) => (name, bytes.len() as u64, self.decode_state_at(name, &bytes).map_err(unusable)),
            Err(e) => (name, 0, Err(unusable(e))),
        }
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

    /// Finds what to restore: the newest checkpoint whose objects all verify, and the planned
    /// batches after it. Damage is worked around where possible and reported in `warnings`.
    pub fn recover(&self) -> Result<Recovered> {
        let t0 = std::time::Instant::now();
        let (metadata, bad_metadata) = self.inspect_metadata()?;
        let listing = self.listing()?;
        let mut warnings: Vec<String> = bad_metadata
            .iter()
            // A missing second copy is a location written before copies existed: repaired quietly.
            .filter(|(n, e)| !(*n == ObjectName::MetadataCopy && e == "missing"))
            .map(|(n, e)| format!("{} is {e}; the other copy is used", self.paths.path(*n)))
            .collect();
        let fences = self.read_fences()?;
        // Only objects about a batch at or past some fence point can be fenced off.
        let min_fence = fences.values().min().copied();
        let mut fenced = Vec::new();
        let mut seen: BTreeSet<ObjectName> = BTreeSet::new();
        let mut failures = Vec::new();
        let mut cache: HashMap<ObjectName, std::result::Result<StateCheckpoint, Unusable>> = HashMap::new();
        let mut damaged = BTreeSet::new();
        let (mut bytes_read, mut objects_read) = (0u64, 0u64);
        let mut restored = None;
        let attempts = protocol::recovery_attempts(&listing);
        // The newest checkpoint's objects are read and decoded in parallel: they are what
        // recovery almost always loads, and restore time is what a restart waits for.
        if let Some(first) = attempts.first() {
            let loaded: Vec<(ObjectName, u64, std::result::Result<StateCheckpoint, Unusable>)> =
                std::thread::scope(|sc| {
                    let handles: Vec<_> =
                        first.chain.iter().map(|n| sc.spawn(move || self.fetch_state(*n))).collect();
                    handles.into_iter().filter_map(|h| h.join().ok()).collect()
                });
            for (name, bytes, r) in loaded {
                objects_read += 1;
                bytes_read += bytes;
                cache.insert(name, r);
            }
        }
        for attempt in attempts {
            let mut chain = Vec::with_capacity(attempt.chain.len());
            let mut failure = None;
            for name in &attempt.chain {
                let entry = match cache.remove(name) {
                    Some(e) => e,
                    None => {
                        let (_, bytes, r) = self.fetch_state(*name);
                        objects_read += 1;
                        bytes_read += bytes;
                        r
                    }
                };
                seen.insert(*name);
                let entry = entry.and_then(|c| match protocol::fenced(&fences, c.epoch, c.batch_id) {
                    Some(f) => {
                        if !fenced.contains(name) {
                            fenced.push(*name);
                        }
                        Err(Unusable {
                            damaged: false,
                            reason: format!(
                                "{} was written by lease epoch {} after {f}",
                                self.paths.path(*name),
                                c.epoch
                            ),
                        })
                    }
                    None => Ok(c),
                });
                match entry {
                    Ok(c) => chain.push(c),
                    Err(e) => {
                        if e.damaged {
                            damaged.insert(*name);
                        }
                        cache.insert(*name, Err(e.clone()));
                        failure = Some(e.reason);
                        break;
                    }
                }
            }
            let outcome = match failure {
                Some(e) => Err(e),
                None => merge::merge_chain(chain).map_err(|e| e.to_string()).and_then(|merged| {
                    let replay =
                        protocol::replay_batches(&listing, Some(attempt.batch)).map_err(|e| e.to_string())?;
                    Ok((merged, replay))
                }),
            };
            match outcome {
                Ok((merged, replay)) => {
                    restored = Some((merged, attempt.chain.clone(), replay));
                    break;
                }
                Err(e) => {
                    let w = format!("checkpoint after batch {} unusable: {e}; falling back", attempt.batch);
                    tracing::warn!("{w}");
                    warnings.push(w);
                    failures.push(format!("batch {}: {e}", attempt.batch));
                }
            }
        }
        let (state, replay_ids) = match restored {
            Some((merged, chain, replay)) => (
                Some(RestoredState {
                    batch_id: merged.batch_id,
                    graph: merged.graph,
                    tables: merged.tables,
                    chain,
                }),
                replay,
            ),
            None => {
                // No checkpoint restores (or none exists): replaying the whole log from the
                // start is the last restore point, kept by retention until an independent
                // checkpoint exists.
                let unrecoverable =
                    |reason: String| Error::Unrecoverable { location: self.location.clone(), reason };
                match protocol::restore_without_checkpoint(&listing) {
                    Ok(protocol::WithoutCheckpoint::Fresh(replay)) => (None, replay),
                    Ok(protocol::WithoutCheckpoint::ReplayWholeLog(replay)) => {
                        let w = "no checkpoint could be restored; replaying the batch log from batch 0"
                            .to_string();
                        tracing::warn!("{w}");
                        warnings.push(w);
                        (None, replay)
                    }
                    Ok(protocol::WithoutCheckpoint::NoRestorePoint) => {
                        let why = if failures.is_empty() {
                            "no checkpoint has a complete chain of objects".to_string()
                        } else {
                            format!("every checkpoint failed to load ({})", failures.join("; "))
                        };
                        return Err(unrecoverable(format!(
                            "{why}, and the batch log no longer starts at batch 0; start from an older copy of the location, or from scratch on a new one"
                        )));
                    }
                    Err(damage) => return Err(unrecoverable(damage.to_string())),
                }
            }
        };
        if let (Some(s), Some(newest)) = (&state, listing.checkpoints().last()) {
            if s.batch_id < *newest {
                let w = format!(
                    "restored the checkpoint after batch {} although checkpoints up to batch {newest} exist: the newer ones are damaged or incomplete",
                    s.batch_id
                );
                tracing::warn!("{w}");
                warnings.push(w);
            }
        }
        // State objects no attempt read but a fence may exclude (a stale holder's late write
        // next to a usable snapshot): found now, so the holder can remove them.
        if let Some(min) = min_fence {
            for name in listing.names().filter(|n| !seen.contains(n)) {
                let (ObjectName::Full(b) | ObjectName::Delta { batch: b, .. }) = name else { continue };
                if b < min {
                    continue;
                }
                if let (_, _, Ok(c)) = self.fetch_state(name) {
                    if protocol::fenced(&fences, c.epoch, c.batch_id).is_some() {
                        fenced.push(name);
                    }
                }
            }
        }
        let restore_ms = t0.elapsed().as_millis() as u64;
        let mut commits: BTreeSet<BatchId> = listing.commits().into_iter().collect();
        if let Some(min) = min_fence {
            for b in listing.commits().into_iter().filter(|b| *b >= min) {
                if let Ok(c) = self.read_commit(b) {
                    if protocol::fenced(&fences, c.epoch, c.batch_id).is_some() {
                        commits.remove(&b);
                        fenced.push(ObjectName::Commit(b));
                    }
                }
            }
        }
        let read = replay_ids.iter().map(|id| self.read_plan(*id)).collect();
        let resolved = protocol::resolve_plans(&replay_ids, read, &commits).map_err(|damage| {
            Error::Unrecoverable { location: self.location.clone(), reason: damage.to_string() }
        })?;
        for w in &resolved.warnings {
            tracing::warn!("{w}");
        }
        warnings.extend(resolved.warnings);
        let mut replay = resolved.plans;
        let epochs: Vec<(BatchId, crate::Epoch)> = replay.iter().map(|p| (p.batch_id, p.epoch)).collect();
        let protocol::ReplaySplit { accepted, rejected } = protocol::split_replay(&epochs, &fences)
            .map_err(|e| Error::Unrecoverable { location: self.location.clone(), reason: e.to_string() })?;
        for (b, f) in &rejected {
            let w = format!("the plan of batch {b} is not accepted: its writer was fenced off ({f}); it will be planned again");
            tracing::warn!("{w}");
            warnings.push(w);
            fenced.push(ObjectName::Plan(*b));
        }
        replay.truncate(accepted.len());
        let rebuilt_plans = resolved.rebuilt.into_iter().filter(|b| accepted.contains(b)).collect();
        let next_batch = match (replay.last(), &state) {
            (Some(p), _) => BatchId(p.batch_id.0 + 1),
            (None, Some(s)) => BatchId(s.batch_id.0 + 1),
            (None, None) => BatchId(0),
        };
        // Committedness is judged on the objects recovery accepted: a fenced writer's commit or
        // plan proves nothing.
        let accepted_listing = listing.without(&fenced);
        let committed = replay
            .iter()
            .map(|p| p.batch_id)
            .filter(|b| protocol::is_committed(&accepted_listing, *b))
            .collect();
        // The next plan carries a copy of the newest one; without a replay it was not read yet.
        let last_plan = match replay.last() {
            Some(p) => Some(p.copy()),
            None => next_batch
                .0
                .checked_sub(1)
                .filter(|b| accepted_listing.contains(ObjectName::Plan(BatchId(*b))))
                .and_then(|b| self.read_plan(BatchId(b)).ok())
                .map(|p| p.copy()),
        };
        // Only objects present in the listing: a missing one needs no clean-up.
        let damaged_state = damaged.into_iter().filter(|n| listing.contains(*n)).collect();
        Ok(Recovered {
            damaged_state,
            last_plan,
            rebuilt_plans,
            metadata,
            state,
            replay,
            committed,
            next_batch,
            warnings,
            fenced,
            restore_ms,
            bytes_read,
            objects_read,
        })
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
        let mut deleted = Vec::new();
        for name in plan.delete {
            let path = self.paths.path(name);
            match self.block_on(self.store.delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(name),
                Err(e) => return Err(Error::storage(&path, e)),
            }
        }
        Ok(RetentionReport { kept_checkpoints: plan.keep_checkpoints, deleted, debris })
    }
}
