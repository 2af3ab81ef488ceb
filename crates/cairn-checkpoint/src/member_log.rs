//! Member logs: the per-batch objects of every task a process runs, written as one object per
//! process and write round instead of one per task.
//!
//! A scaled-out job keeps a complete location per task (`tasks/<task>/`, see
//! [`crate::paths::task_location`]) so that a task moves between processes by the next process
//! taking its lease. Written naively, every task writes its own plan per batch and its own delta
//! per checkpoint, so a process with `n` tasks writes `2n` objects per batch. Here the tasks of one
//! process hand those writes to one [`MemberLog`], which gathers the writes of all its tasks that
//! arrive together (every task plans on the same batch-time grid; deltas, which nobody waits for,
//! wait for the next plans) and stores them as one object,
//! `members/<member>/<seq>-<tasks>.log` ([`crate::paths::Paths::member_log`]): a directory (which
//! task, which object name, which epoch, where) followed by the framed objects, byte for byte as
//! they would have been stored alone.
//!
//! Each task still sees its own location as before, through a [`TaskView`]: an [`ObjectStore`]
//! in which the task's plans and deltas ("virtual" objects) live in member logs and everything
//! else (metadata, lease objects, commits, full snapshots) stays a real object under
//! `tasks/<task>/`. Listing the task lists the member logs too (one LIST of `members/`, then the
//! directories of the objects whose names say they hold the task, each read once per process), so
//! the index of where a task's newest state lives is the listing itself: a new owner finds the old
//! owner's entries the moment they are stored, without copying them. The view keeps the object
//! semantics recovery, retention and fencing were built on:
//!
//! - a conditional create of a name that has a visible version fails with `AlreadyExists`;
//! - every entry carries the lease epoch of its writer (passed with [`WriteEpoch`]); of several
//!   versions of one name the one of the newest epoch is visible (a new owner's rewrite of a plan a
//!   fenced-off owner left), and within an epoch the one written last;
//! - a delete hides every version known at that moment (a later write is visible again).
//!
//! **Retention.** A member log object is deleted (by any process, [`MemberLog::retain`]) once
//! every entry in it concerns a batch at or before its task's second newest full snapshot: no
//! restore point the task's own retention keeps needs such an entry (the newest chain starts at
//! the newest full snapshot, the second restore point at the one before). The view hides those
//! entries from listings for the same reason, so what a task sees never depends on whether
//! retention got to an object yet.

use crate::frame::{self, ObjectKind};
use crate::paths::{ObjectName, Paths};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long the first plan of a round waits for the other tasks' plans before the round is
/// stored without them. Tasks plan on one batch-time grid, so the plans of a round normally all
/// arrive within a few milliseconds and the round is stored as soon as the last one arrives.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(20);
/// How many lingers a round of deltas alone waits for plans to go with. Deltas are written behind
/// the batches (nobody waits for them but the checkpoint writer's queue), so they wait for the
/// next round of plans instead of making rounds of their own.
const DELTA_LINGERS: u32 = 10;
/// The environment variable that turns member log writes off (`0`) for task locations opened by
/// name: plans and deltas are then objects of their own, as in format version 4 (`1`, the
/// default, writes member logs).
pub const WRITES_ENV: &str = "CAIRN_MEMBER_LOGS";
/// Member log objects written between two retention passes of a process.
const RETAIN_EVERY: u64 = 16;
/// Bytes read from the head of a member log object to get its directory in one request.
const DIRECTORY_READ: u64 = 64 * 1024;
/// Directory reads and deletes a process keeps in flight at once.
const CONCURRENCY: usize = 16;

/// The lease epoch a write is made in, passed to a [`TaskView`] in [`PutOptions::extensions`]
/// (the checkpoint store sets it on every write; a write without it is epoch 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteEpoch(pub u64);

/// The directory at the head of a member log object (format version 5): JSON, framed as
/// [`ObjectKind::MemberLog`]. Offsets count from the end of the framed directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Directory {
    member: String,
    seq: u64,
    written_ms: i64,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    task: u32,
    /// The object's name relative to the task's location (`log/<batch>.plan`).
    name: String,
    epoch: u64,
    offset: u64,
    len: u64,
}

/// Orders the versions of one name: newest epoch, then (within the epoch, one writer) the later
/// object of that writer's log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct VersionKey {
    epoch: u64,
    seq: u64,
    member: Arc<str>,
}

#[derive(Debug, Clone)]
struct Version {
    key: VersionKey,
    object: Path,
    /// Where the entry starts in `object`.
    offset: u64,
    len: u64,
    written_ms: i64,
}

/// A member log object this process knows of.
struct Known {
    /// The entries, once the directory was read (`Some(empty)` for a damaged directory).
    entries: Option<Vec<(u32, String)>>,
    /// When this process first learned of it (a listing that started before a write of ours
    /// does not show it, and must not make us forget it).
    learned: Instant,
}

#[derive(Default)]
struct Index {
    objects: BTreeMap<Path, Known>,
    versions: HashMap<u32, BTreeMap<String, Vec<Version>>>,
}

impl Index {
    fn add(&mut self, object: &Path, dir: &Directory, data_start: u64) {
        let member: Arc<str> = Arc::from(dir.member.as_str());
        for e in &dir.entries {
            let v = Version {
                key: VersionKey { epoch: e.epoch, seq: dir.seq, member: member.clone() },
                object: object.clone(),
                offset: data_start + e.offset,
                len: e.len,
                written_ms: dir.written_ms,
            };
            let versions = self.versions.entry(e.task).or_default().entry(e.name.clone()).or_default();
            if !versions.iter().any(|x| x.key == v.key) {
                versions.push(v);
            }
        }
        let entries = dir.entries.iter().map(|e| (e.task, e.name.clone())).collect();
        self.objects.insert(object.clone(), Known { entries: Some(entries), learned: Instant::now() });
    }

    fn forget(&mut self, object: &Path) {
        let Some(known) = self.objects.remove(object) else { return };
        for (task, name) in known.entries.unwrap_or_default() {
            if let Some(by_name) = self.versions.get_mut(&task) {
                if let Some(vs) = by_name.get_mut(&name) {
                    vs.retain(|v| &v.object != object);
                    if vs.is_empty() {
                        by_name.remove(&name);
                    }
                }
            }
        }
    }
}

/// A failed write of a round, told to each of its writers: the message and an I/O error kind
/// that keeps the failure transient or final as the original was (see [`crate::retry`]).
#[derive(Debug, Clone)]
struct Failed(String, std::io::ErrorKind);

impl Failed {
    fn new(path: &Path, e: &object_store::Error) -> Self {
        use std::io::ErrorKind;
        let mut kind = None;
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
                break;
            }
            cur = err.source();
        }
        let transient = crate::retry::is_transient(e);
        let message = format!("member log object {path}: {e}");
        let failed = Self(message.clone(), kind.unwrap_or(ErrorKind::Other));
        // The rebuilt error must be judged as the original was (a final answer that is not an
        // I/O error becomes one that is final too).
        if crate::retry::is_transient(&failed.error()) == transient {
            return failed;
        }
        Self(message, if transient { ErrorKind::Other } else { ErrorKind::InvalidInput })
    }

    fn error(&self) -> object_store::Error {
        object_store::Error::Generic {
            store: "cairn member log",
            source: Box::new(std::io::Error::new(self.1, self.0.clone())),
        }
    }
}

struct Pending {
    task: u32,
    /// A plan (the task waits for it before running the batch) rather than a delta (written
    /// behind the batches by the checkpoint writer).
    plan: bool,
    name: String,
    epoch: u64,
    bytes: Bytes,
    done: tokio::sync::oneshot::Sender<Result<(), Failed>>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    first_at: Option<Instant>,
    first_plan_at: Option<Instant>,
    /// Tasks whose views have written and are still open, with how many such views.
    writers: BTreeMap<u32, usize>,
}

/// What a member log wrote so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemberLogStats {
    /// Member log objects stored.
    pub objects: u64,
    /// Task objects (plans, deltas) stored in them.
    pub entries: u64,
    /// Bytes stored, directories included.
    pub bytes: u64,
    /// Member log objects retention deleted.
    pub deleted: u64,
}

struct Shared {
    store: Arc<dyn ObjectStore>,
    paths: Paths,
    /// `members/` on a local directory, where a writer killed mid-write leaves a staging file
    /// that retention sweeps (object stores leave none).
    local_members: std::sync::OnceLock<std::path::PathBuf>,
    member: String,
    /// See [`MemberLog::set_linger`], in microseconds.
    linger_us: AtomicU64,
    queue: Mutex<Queue>,
    wake: Arc<tokio::sync::Notify>,
    index: Mutex<Index>,
    next_seq: AtomicU64,
    retaining: AtomicBool,
    /// Whether plans and deltas go to this log; when off they are written as objects of their
    /// own, and entries already in member logs are still read.
    writes: AtomicBool,
    objects: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    deleted: AtomicU64,
}

/// One process's log of its tasks' plans and deltas under a scaled-out job's location (see the
/// module documentation). Cheap to clone; every clone writes to the same log.
///
/// ```
/// use cairn_checkpoint::member_log::MemberLog;
/// use cairn_checkpoint::{BatchId, CheckpointStore};
/// let log = MemberLog::open("memory://").unwrap();
/// let task = CheckpointStore::with_store(log.view(3), log.task_root(3), "memory://tasks/00003");
/// assert!(task.listing().unwrap().plans().is_empty());
/// ```
#[derive(Clone)]
pub struct MemberLog(Arc<Shared>);

impl std::fmt::Debug for MemberLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberLog").field("member", &self.0.member).finish()
    }
}

/// The member logs of every job location this process writes to, so that all the tasks of one
/// job in this process share one log (and one object per write round).
static SHARED: Mutex<BTreeMap<String, Weak<Shared>>> = Mutex::new(BTreeMap::new());

impl MemberLog {
    /// A new log of this process under a job's location (see [`crate::store::open_location`]).
    pub fn open(location: &str) -> crate::Result<Self> {
        let opened = crate::store::open_location(location)?;
        let log = Self::new(opened.store, opened.root)?;
        if let Some(dir) = &opened.local_dir {
            log.set_local_dir(dir);
        }
        Ok(log)
    }

    /// The log of this process under the job's location `location`, shared with every other
    /// caller in this process (the checkpoint store of a task location uses it).
    pub fn shared(location: &str) -> crate::Result<Self> {
        let key = location.trim_end_matches('/').to_string();
        let mut logs = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = logs.get(&key).and_then(Weak::upgrade) {
            return Ok(Self(s));
        }
        logs.retain(|_, w| w.strong_count() > 0);
        let writes = writes_setting(std::env::var(WRITES_ENV).ok().as_deref())
            .map_err(|reason| crate::Error::InvalidLocation { location: key.clone(), reason })?;
        let log = Self::open(&key)?;
        log.set_writes(writes);
        logs.insert(key, Arc::downgrade(&log.0));
        Ok(log)
    }

    /// A log of this process in `store` under `root` (the job's location).
    pub fn new(store: Arc<dyn ObjectStore>, root: Path) -> crate::Result<Self> {
        Self::with_linger(store, root, DEFAULT_LINGER)
    }

    /// [`MemberLog::new`] with another wait for the other tasks' writes of a round.
    pub fn with_linger(store: Arc<dyn ObjectStore>, root: Path, linger: Duration) -> crate::Result<Self> {
        let member: String = crate::lease::unique_owner()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
            .collect();
        let shared = Arc::new(Shared {
            store,
            paths: Paths::new(root),
            local_members: std::sync::OnceLock::new(),
            member,
            linger_us: AtomicU64::new(linger.as_micros() as u64),
            queue: Mutex::new(Queue::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            index: Mutex::new(Index::default()),
            next_seq: AtomicU64::new(0),
            retaining: AtomicBool::new(false),
            writes: AtomicBool::new(true),
            objects: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
        });
        let rt = crate::store::io_runtime()
            .map_err(|e| crate::Error::Io { path: "member log".into(), source: e })?;
        rt.spawn(flusher(Arc::downgrade(&shared), shared.wake.clone()));
        Ok(Self(shared))
    }

    /// How long the first plan of a round waits for the plans of the other tasks this log writes
    /// for ([`DEFAULT_LINGER`] unless set; deltas wait ten times as long for plans to go with):
    /// longer makes fewer objects when tasks run out of step, at the price of that much latency
    /// for the early planners.
    pub fn set_linger(&self, linger: Duration) {
        self.0.linger_us.store(linger.as_micros() as u64, Ordering::Relaxed);
    }

    /// Whether the tasks' plans and deltas are written to this log (the default; for
    /// [`MemberLog::shared`] `CAIRN_MEMBER_LOGS=0` turns it off). Off, they
    /// are written as objects of their own under the task's location; entries already in member
    /// logs are read either way.
    pub fn set_writes(&self, on: bool) {
        self.0.writes.store(on, Ordering::SeqCst);
    }

    /// This process's member name in the log's object names.
    pub fn member(&self) -> &str {
        &self.0.member
    }

    /// The job location's prefix in the store.
    pub fn root(&self) -> &Path {
        self.0.paths.root()
    }

    /// The prefix of task `task`'s location in the store (see [`crate::paths::task_location`]).
    pub fn task_root(&self, task: u32) -> Path {
        self.0.paths.tasks_dir().child(format!("{task:05}"))
    }

    /// The object store a task's checkpoint store uses: task `task`'s location as seen through
    /// the member logs.
    pub fn view(&self, task: u32) -> Arc<dyn ObjectStore> {
        Arc::new(TaskView::new(self.clone(), task))
    }

    /// What this log wrote so far.
    pub fn stats(&self) -> MemberLogStats {
        let s = &self.0;
        MemberLogStats {
            objects: s.objects.load(Ordering::Relaxed),
            entries: s.entries.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            deleted: s.deleted.load(Ordering::Relaxed),
        }
    }

    /// Deletes the member log objects (of every member) that no task needs any more: every
    /// entry concerns a batch at or before its task's second newest full snapshot. Returns how
    /// many were deleted. Runs on its own every 16 objects this log writes.
    pub fn retain(&self) -> crate::Result<u64> {
        Ok(self.retain_objects(false)?.len() as u64)
    }

    /// [`MemberLog::retain`], returning the objects deleted; with `dry_run`, the objects it would
    /// delete, deleting nothing.
    pub fn retain_objects(&self, dry_run: bool) -> crate::Result<Vec<Path>> {
        Ok(self.retain_all(dry_run)?.0)
    }

    /// [`MemberLog::retain_objects`], also returning the staging files killed writers left under
    /// `members/` on a local directory that it removed (none on a dry run).
    pub(crate) fn retain_all(&self, dry_run: bool) -> crate::Result<(Vec<Path>, Vec<std::path::PathBuf>)> {
        let root = self.0.paths.root().to_string();
        crate::store::block_on_io(retain(self.0.clone(), dry_run)).map_err(|e| crate::Error::storage(root, e))
    }

    /// Sweeps staging files under `members/` when the location is a local directory given here
    /// (see [`MemberLog::open`]).
    pub(crate) fn set_local_dir(&self, dir: &std::path::Path) {
        let _ = self.0.local_members.set(dir.join(self.0.paths.members_dir().as_ref()));
    }
}

/// Whether member log writes are on, given the value of [`WRITES_ENV`].
fn writes_setting(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(format!("{WRITES_ENV}={other:?}: use 1 (member logs, the default) or 0")),
    }
}

/// Stores the rounds of a log until the log is dropped. It holds the log only while it writes: a
/// flusher that held it throughout and left when it was the last holder could leave just as
/// [`MemberLog::shared`] handed the log out again, and that log's writes would wait forever.
async fn flusher(log: Weak<Shared>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let Some(s) = log.upgrade() else { return };
        let wait = {
            let q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            match q.first_at {
                None => None,
                Some(first) => {
                    // Stored at once when every writing task has planned; otherwise when the first
                    // plan waited a linger, or the first delta ten.
                    let planned: BTreeSet<u32> =
                        q.pending.iter().filter(|p| p.plan).map(|p| p.task).collect();
                    let all = !planned.is_empty() && q.writers.keys().all(|t| planned.contains(t));
                    let linger = Duration::from_micros(s.linger_us.load(Ordering::Relaxed));
                    let mut left = (linger * DELTA_LINGERS).saturating_sub(first.elapsed());
                    if let Some(first_plan) = q.first_plan_at {
                        left = left.min(linger.saturating_sub(first_plan.elapsed()));
                    }
                    (!all && !left.is_zero()).then_some(left).or(Some(Duration::ZERO))
                }
            }
        };
        match wait {
            // Nothing pending: sleep until a write arrives (checking now and then that the log
            // is still held).
            None => {
                drop(s);
                let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            }
            Some(left) if !left.is_zero() => {
                drop(s);
                let _ = tokio::time::timeout(left, wake.notified()).await;
            }
            Some(_) => {
                let round = {
                    let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                    q.first_at = None;
                    q.first_plan_at = None;
                    std::mem::take(&mut q.pending)
                };
                write_round(&s, round).await;
            }
        }
    }
}

/// Stores one round as one object and answers its writers.
async fn write_round(s: &Arc<Shared>, round: Vec<Pending>) {
    if round.is_empty() {
        return;
    }
    // A number is never reused, even after a failed write that may have landed.
    let seq = s.next_seq.fetch_add(1, Ordering::SeqCst);
    let mut entries = Vec::with_capacity(round.len());
    let mut offset = 0u64;
    for p in &round {
        entries.push(Entry {
            task: p.task,
            name: p.name.clone(),
            epoch: p.epoch,
            offset,
            len: p.bytes.len() as u64,
        });
        offset += p.bytes.len() as u64;
    }
    let dir = Directory { member: s.member.clone(), seq, written_ms: crate::lease::wall_ms(), entries };
    let head = frame::encode(
        ObjectKind::MemberLog,
        &serde_json::to_vec(&dir).expect("a directory serializes"),
        false,
    );
    let mut body = Vec::with_capacity(head.len() + offset as usize);
    body.extend_from_slice(&head);
    for p in &round {
        body.extend_from_slice(&p.bytes);
    }
    let tasks: Vec<u32> = round.iter().map(|p| p.task).collect::<BTreeSet<_>>().into_iter().collect();
    let path = s.paths.member_log(&s.member, seq, &tasks);
    let len = body.len() as u64;
    let put = s.store.put_opts(&path, PutPayload::from(body), PutOptions::from(PutMode::Create)).await;
    let result = match put {
        // Our own name: an earlier attempt of this very write landed and its reply was lost.
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {
            s.index.lock().unwrap_or_else(|e| e.into_inner()).add(&path, &dir, head.len() as u64);
            s.objects.fetch_add(1, Ordering::Relaxed);
            s.entries.fetch_add(round.len() as u64, Ordering::Relaxed);
            s.bytes.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => Err(Failed::new(&path, &e)),
    };
    for p in round {
        let _ = p.done.send(result.clone());
    }
    if result.is_ok() && (seq + 1) % RETAIN_EVERY == 0 && !s.retaining.swap(true, Ordering::SeqCst) {
        let s = s.clone();
        tokio::spawn(async move {
            if let Err(e) = retain(s.clone(), false).await {
                tracing::warn!("member log retention under {}: {e}", s.paths.root());
            }
            s.retaining.store(false, Ordering::SeqCst);
        });
    }
}

/// Lists `members/` and reads the directories this process does not know yet: of the objects
/// that may hold `task`'s entries, or of all objects for `None`.
async fn refresh(s: &Shared, task: Option<u32>) -> object_store::Result<()> {
    let started = Instant::now();
    let listed: Vec<ObjectMeta> = s.store.list(Some(&s.paths.members_dir())).try_collect().await?;
    let list_ms = started.elapsed().as_millis();
    let mut to_read = Vec::new();
    {
        let mut index = s.index.lock().unwrap_or_else(|e| e.into_inner());
        let present: BTreeSet<&Path> = listed.iter().map(|m| &m.location).collect();
        let gone: Vec<Path> = index
            .objects
            .iter()
            .filter(|(p, k)| k.learned < started && !present.contains(p))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            index.forget(&p);
        }
        for meta in &listed {
            let Some(name) = s.paths.parse_member_log(&meta.location) else { continue };
            let wanted = task.is_none_or(|t| name.holds(t));
            let known = index
                .objects
                .entry(meta.location.clone())
                .or_insert_with(|| Known { entries: None, learned: Instant::now() });
            if wanted && known.entries.is_none() {
                to_read.push(meta.location.clone());
            }
        }
    }
    let reads = to_read.len();
    let read: Vec<_> = futures::stream::iter(to_read.into_iter().map(|path| async move {
        let dir = read_directory(s.store.as_ref(), &path).await;
        (path, dir)
    }))
    .buffer_unordered(CONCURRENCY)
    .collect()
    .await;
    let mut index = s.index.lock().unwrap_or_else(|e| e.into_inner());
    for (path, dir) in read {
        match dir {
            Ok(Some((dir, data_start))) => index.add(&path, &dir, data_start),
            Ok(None) => index.forget(&path), // deleted since the listing
            Err(DirError::Storage(e)) => return Err(e),
            Err(DirError::Damaged(why)) => {
                // Its entries are lost to every reader; the tasks' recovery works around missing
                // plans and deltas as it does around damaged objects.
                tracing::warn!("member log object {path} is damaged, its entries are ignored: {why}");
                if let Some(k) = index.objects.get_mut(&path) {
                    k.entries = Some(Vec::new());
                }
            }
        }
    }
    // A new owner's restore waits for this; say where the time went when it is long.
    let took = started.elapsed();
    let what = format!(
        "member logs under {}: listed {} objects in {list_ms} ms, read {reads} directories, {} ms in all",
        s.paths.members_dir(),
        listed.len(),
        took.as_millis()
    );
    if took > Duration::from_secs(1) {
        tracing::info!("{what}");
    } else {
        tracing::debug!("{what}");
    }
    Ok(())
}

enum DirError {
    Storage(object_store::Error),
    Damaged(String),
}

async fn read_directory(store: &dyn ObjectStore, path: &Path) -> Result<Option<(Directory, u64)>, DirError> {
    let head = match store.get_range(path, 0..DIRECTORY_READ).await {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(DirError::Storage(e)),
    };
    let total =
        frame::framed_len(&head).ok_or_else(|| DirError::Damaged("no directory at its head".into()))?;
    let bytes = if (head.len() as u64) < total {
        match store.get_range(path, 0..total).await {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(DirError::Storage(e)),
        }
    } else {
        head.slice(..total as usize)
    };
    if (bytes.len() as u64) < total {
        return Err(DirError::Damaged(format!("directory cut off at {} of {total} bytes", bytes.len())));
    }
    let payload = frame::decode(path.as_ref(), &bytes, ObjectKind::MemberLog)
        .map_err(|e| DirError::Damaged(e.to_string()))?;
    let dir: Directory = serde_json::from_slice(&payload).map_err(|e| DirError::Damaged(e.to_string()))?;
    Ok(Some((dir, total)))
}

/// The batch a task object's name concerns.
fn batch_of(name: &str) -> Option<u64> {
    match Paths::new("").parse(&Path::from(name))? {
        ObjectName::Plan(b) | ObjectName::Commit(b) | ObjectName::Full(b) => Some(b.0),
        ObjectName::Delta { batch, .. } => Some(batch.0),
        _ => None,
    }
}

/// The batch of the second newest of `fulls`: entries at or before it are needed by no restore
/// point a task's retention keeps.
fn floor_of(fulls: &mut [u64]) -> Option<u64> {
    fulls.sort_unstable_by(|a, b| b.cmp(a));
    fulls.get(1).copied()
}

async fn retain(s: Arc<Shared>, dry_run: bool) -> object_store::Result<(Vec<Path>, Vec<std::path::PathBuf>)> {
    refresh(&s, None).await?;
    let tasks_dir = s.paths.tasks_dir();
    let listed: Vec<ObjectMeta> = s.store.list(Some(&tasks_dir)).try_collect().await?;
    let mut fulls: HashMap<u32, Vec<u64>> = HashMap::new();
    for meta in &listed {
        let Some(rel) = meta.location.prefix_match(&tasks_dir) else { continue };
        let rel: Vec<_> = rel.collect();
        let [task, dir, file] = rel.as_slice() else { continue };
        let (Some(task), "state") = (crate::paths::parse_task(task.as_ref()), dir.as_ref()) else { continue };
        if let Some(ObjectName::Full(b)) =
            Paths::new("").parse(&Path::from(format!("state/{}", file.as_ref())))
        {
            fulls.entry(task).or_default().push(b.0);
        }
    }
    let floors: HashMap<u32, u64> =
        fulls.iter_mut().filter_map(|(t, f)| floor_of(f).map(|floor| (*t, floor))).collect();
    let dead: Vec<Path> = {
        let index = s.index.lock().unwrap_or_else(|e| e.into_inner());
        index
            .objects
            .iter()
            .filter(|(_, k)| {
                k.entries.as_ref().is_some_and(|entries| {
                    !entries.is_empty()
                        && entries.iter().all(|(task, name)| {
                            matches!((floors.get(task), batch_of(name)), (Some(f), Some(b)) if b <= *f)
                        })
                })
            })
            .map(|(p, _)| p.clone())
            .collect()
    };
    if dry_run {
        return Ok((dead, Vec::new()));
    }
    let results: Vec<(Path, object_store::Result<()>)> = futures::stream::iter(dead.into_iter().map(|p| {
        let s = &s;
        async move {
            let r = s.store.delete(&p).await;
            (p, r)
        }
    }))
    .buffer_unordered(CONCURRENCY)
    .collect()
    .await;
    let mut deleted = Vec::new();
    let mut index = s.index.lock().unwrap_or_else(|e| e.into_inner());
    for (p, r) in results {
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                index.forget(&p);
                deleted.push(p);
            }
            Err(e) => return Err(e),
        }
    }
    s.deleted.fetch_add(deleted.len() as u64, Ordering::Relaxed);
    drop(index);
    let mut debris = Vec::new();
    if let Some(dir) = s.local_members.get() {
        #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts, not batch time
        let now = std::time::SystemTime::now();
        match crate::debris::sweep(dir, crate::debris::DEBRIS_GRACE, now) {
            Ok(removed) => debris = removed,
            Err(e) => tracing::warn!("could not sweep {}: {e}", dir.display()),
        }
        for f in &debris {
            tracing::info!("removed {} (left by a crashed writer)", f.display());
        }
    }
    Ok((deleted, debris))
}

/// One task's location seen through the member logs: its plans and deltas live in member log
/// objects, everything else under the task's prefix (see the module documentation).
pub struct TaskView(Arc<ViewInner>);

struct ViewInner {
    log: MemberLog,
    task: u32,
    paths: Paths,
    /// Per name, the newest version a delete hid (and every older one with it).
    deleted: Mutex<HashMap<String, VersionKey>>,
    /// Entries of batches below this are hidden (see [`floor_of`]); 0 hides nothing.
    hide_below: AtomicU64,
    /// The task location holds plans or deltas as objects of their own (written before member
    /// logs existed): creates must check them too.
    legacy: AtomicBool,
    /// This view has written: the log waits for its writes when gathering a round.
    writer: AtomicBool,
    /// This view has written a plan or delta: see [`ViewInner::list_merged`].
    settled: AtomicBool,
}

impl TaskView {
    fn new(log: MemberLog, task: u32) -> Self {
        let paths = Paths::new(log.task_root(task));
        Self(Arc::new(ViewInner {
            log,
            task,
            paths,
            deleted: Mutex::new(HashMap::new()),
            hide_below: AtomicU64::new(0),
            legacy: AtomicBool::new(false),
            writer: AtomicBool::new(false),
            settled: AtomicBool::new(false),
        }))
    }
}

impl Drop for ViewInner {
    fn drop(&mut self) {
        if self.writer.load(Ordering::SeqCst) {
            let mut q = self.log.0.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = q.writers.get_mut(&self.task) {
                *n -= 1;
                if *n == 0 {
                    q.writers.remove(&self.task);
                }
            }
        }
    }
}

impl std::fmt::Debug for TaskView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskView({}, task {})", self.0.log.0.member, self.0.task)
    }
}

impl std::fmt::Display for TaskView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskView({} via member logs of {})", self.0.paths.root(), self.0.log.0.store)
    }
}

fn not_supported(what: &str) -> object_store::Error {
    object_store::Error::NotSupported { source: format!("{what} of a task's plans and deltas").into() }
}

fn to_utc(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl ViewInner {
    /// The object's name relative to the task location if it lives in member logs.
    fn virtual_name(&self, path: &Path) -> Option<String> {
        match self.paths.parse(path)? {
            ObjectName::Plan(_) | ObjectName::Delta { .. } => Some(
                path.prefix_match(self.paths.root())?
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
            ),
            _ => None,
        }
    }

    fn visible(&self, name: &str) -> Option<Version> {
        let hidden = self.deleted.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        let index = self.log.0.index.lock().unwrap_or_else(|e| e.into_inner());
        let versions = index.versions.get(&self.task)?.get(name)?;
        versions
            .iter()
            .filter(|v| hidden.as_ref().is_none_or(|h| v.key > *h))
            .max_by(|a, b| a.key.cmp(&b.key))
            .cloned()
    }

    async fn list_merged(&self, prefix: Option<&Path>) -> object_store::Result<Vec<ObjectMeta>> {
        let store = &self.log.0.store;
        let real: Vec<ObjectMeta> = store.list(prefix).try_collect().await?;
        let mut fulls = Vec::new();
        let mut out: BTreeMap<Path, ObjectMeta> = BTreeMap::new();
        for m in real {
            match self.paths.parse(&m.location) {
                Some(ObjectName::Plan(_) | ObjectName::Delta { .. }) => {
                    self.legacy.store(true, Ordering::SeqCst)
                }
                Some(ObjectName::Full(b)) => fulls.push(b.0),
                _ => {}
            }
            out.insert(m.location.clone(), m);
        }
        let covers_state = prefix.is_none_or(|p| self.paths.state_dir().prefix_matches(p));
        if covers_state {
            let floor = floor_of(&mut fulls).map_or(0, |f| f + 1);
            self.hide_below.store(floor, Ordering::SeqCst);
        }
        // Until this view writes, other members' entries for the task are looked for on every
        // listing: a new owner's recovery must see everything the previous owner stored. Once it
        // has written in its epoch it owns the task, and anything another member adds for it is
        // a fenced-off owner's late write, which no listing of this owner needs (recovery's
        // fence rule refuses it when a later owner finds it). That spares a LIST of `members/`
        // per task and checkpoint, which slow stores felt.
        if !self.settled.load(Ordering::SeqCst) {
            refresh(&self.log.0, Some(self.task)).await?;
        }
        let hide_below = self.hide_below.load(Ordering::SeqCst);
        let names: Vec<String> = {
            let index = self.log.0.index.lock().unwrap_or_else(|e| e.into_inner());
            index.versions.get(&self.task).map(|m| m.keys().cloned().collect()).unwrap_or_default()
        };
        for name in names {
            if batch_of(&name).is_none_or(|b| b < hide_below) {
                continue;
            }
            let path = name.split('/').fold(self.paths.root().clone(), |p, part| p.child(part));
            if prefix.is_some_and(|p| !path.prefix_matches(p)) {
                continue;
            }
            if let Some(v) = self.visible(&name) {
                let meta = ObjectMeta {
                    location: path.clone(),
                    last_modified: to_utc(v.written_ms),
                    size: v.len,
                    e_tag: None,
                    version: None,
                };
                out.insert(path, meta);
            }
        }
        Ok(out.into_values().collect())
    }

    async fn put_virtual(
        &self,
        path: &Path,
        name: String,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let epoch = opts.extensions.get::<WriteEpoch>().map_or(0, |e| e.0);
        self.settled.store(true, Ordering::SeqCst);
        match opts.mode {
            PutMode::Overwrite => {}
            PutMode::Create => {
                let exists = self.visible(&name).is_some()
                    || (self.legacy.load(Ordering::SeqCst) && self.log.0.store.head(path).await.is_ok());
                if exists {
                    return Err(object_store::Error::AlreadyExists {
                        path: path.to_string(),
                        source: "the task already has this object".into(),
                    });
                }
            }
            PutMode::Update(_) => return Err(not_supported("a conditional update")),
        }
        let s = &self.log.0;
        if !s.writes.load(Ordering::SeqCst) {
            // An object of its own; creates and deletes then check real objects too.
            self.legacy.store(true, Ordering::SeqCst);
            return s.store.put_opts(path, payload, opts).await;
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            if !self.writer.swap(true, Ordering::SeqCst) {
                *q.writers.entry(self.task).or_default() += 1;
            }
            let plan = matches!(self.paths.parse(path), Some(ObjectName::Plan(_)));
            q.pending.push(Pending { task: self.task, plan, name, epoch, bytes: Bytes::from(payload), done });
            q.first_at.get_or_insert_with(Instant::now);
            if plan {
                q.first_plan_at.get_or_insert_with(Instant::now);
            }
        }
        s.wake.notify_one();
        match answer.await {
            Ok(Ok(())) => Ok(PutResult { e_tag: None, version: None }),
            Ok(Err(failed)) => Err(failed.error()),
            Err(_) => Err(object_store::Error::Generic {
                store: "cairn member log",
                source: "the member log stopped before the write was stored".into(),
            }),
        }
    }
}

#[async_trait]
impl ObjectStore for TaskView {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.0.virtual_name(location) {
            Some(name) => self.0.put_virtual(location, name, payload, opts).await,
            None => self.0.log.0.store.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if self.0.virtual_name(location).is_some() {
            return Err(not_supported("a multipart upload"));
        }
        self.0.log.0.store.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let store = &self.0.log.0.store;
        let Some(v) = self.0.virtual_name(location).and_then(|n| self.0.visible(&n)) else {
            return store.get_opts(location, options).await;
        };
        if options.range.is_some() {
            return Err(not_supported("a ranged read"));
        }
        let meta = ObjectMeta {
            location: location.clone(),
            last_modified: to_utc(v.written_ms),
            size: v.len,
            e_tag: None,
            version: None,
        };
        let bytes = if options.head {
            Bytes::new()
        } else {
            let b = store.get_range(&v.object, v.offset..v.offset + v.len).await.map_err(|e| match e {
                object_store::Error::NotFound { source, .. } => {
                    object_store::Error::NotFound { path: location.to_string(), source }
                }
                e => e,
            })?;
            if b.len() as u64 != v.len {
                // Hand back what is there: the checkpoint store's frame check names the damage.
                tracing::warn!(
                    "{location}: member log object {} holds {} of {} bytes",
                    v.object,
                    b.len(),
                    v.len
                );
            }
            b
        };
        let range = 0..bytes.len() as u64;
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(bytes) }).boxed()),
            meta,
            range,
            attributes: Default::default(),
        })
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        let store = &self.0.log.0.store;
        let Some(name) = self.0.virtual_name(location) else { return store.delete(location).await };
        let newest = {
            let index = self.0.log.0.index.lock().unwrap_or_else(|e| e.into_inner());
            index
                .versions
                .get(&self.0.task)
                .and_then(|m| m.get(&name))
                .and_then(|vs| vs.iter().map(|v| v.key.clone()).max())
        };
        if let Some(key) = newest {
            self.0.deleted.lock().unwrap_or_else(|e| e.into_inner()).insert(name, key);
        }
        if self.0.legacy.load(Ordering::SeqCst) {
            match store.delete(location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (view, prefix) = (self.0.clone(), prefix.cloned());
        futures::stream::once(async move { view.list_merged(prefix.as_ref()).await })
            .map(|r| match r {
                Ok(v) => futures::stream::iter(v.into_iter().map(Ok)).boxed(),
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .flatten()
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let all = self.0.list_merged(prefix).await?;
        let base = prefix.cloned().unwrap_or_default();
        let mut common_prefixes = BTreeSet::new();
        let mut objects = Vec::new();
        for m in all {
            let parts: Vec<_> = m.location.prefix_match(&base).map(|p| p.collect()).unwrap_or_default();
            match parts.as_slice() {
                [] => {}
                [_] => objects.push(m),
                [first, ..] => {
                    common_prefixes.insert(base.child(first.as_ref()));
                }
            }
        }
        Ok(ListResult { common_prefixes: common_prefixes.into_iter().collect(), objects })
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        if self.0.virtual_name(from).is_some() || self.0.virtual_name(to).is_some() {
            return Err(not_supported("a copy"));
        }
        self.0.log.0.store.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        if self.0.virtual_name(from).is_some() || self.0.virtual_name(to).is_some() {
            return Err(not_supported("a copy"));
        }
        self.0.log.0.store.copy_if_not_exists(from, to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::block_on_io;

    fn put(
        view: &Arc<dyn ObjectStore>,
        path: &Path,
        bytes: &[u8],
        mode: PutMode,
        epoch: u64,
    ) -> object_store::Result<()> {
        let mut opts = PutOptions::from(mode);
        opts.extensions.insert(WriteEpoch(epoch));
        block_on_io(view.put_opts(path, PutPayload::from(bytes.to_vec()), opts)).map(|_| ())
    }

    fn get(view: &Arc<dyn ObjectStore>, path: &Path) -> Option<Vec<u8>> {
        match block_on_io(async { view.get(path).await?.bytes().await }) {
            Ok(b) => Some(b.to_vec()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn names(view: &Arc<dyn ObjectStore>, root: &Path) -> Vec<String> {
        let listed: Vec<ObjectMeta> = block_on_io(view.list(Some(root)).try_collect()).unwrap();
        listed
            .iter()
            .map(|m| m.location.as_ref().strip_prefix(&format!("{root}/")).unwrap().to_string())
            .collect()
    }

    fn logs(store: &Arc<dyn ObjectStore>) -> usize {
        let listed: Vec<ObjectMeta> =
            block_on_io(store.list(Some(&Path::from("job/members"))).try_collect()).unwrap();
        listed.len()
    }

    #[test]
    fn member_logs_are_on_unless_turned_off_and_other_settings_are_refused() {
        assert_eq!(writes_setting(None), Ok(true));
        assert_eq!(writes_setting(Some("1")), Ok(true));
        assert_eq!(writes_setting(Some("0")), Ok(false));
        let err = writes_setting(Some("yes")).unwrap_err();
        assert!(err.contains("CAIRN_MEMBER_LOGS=\"yes\"") && err.contains("use 1"), "{err}");
    }

    fn plan(log: &MemberLog, task: u32, batch: u64) -> Path {
        Paths::new(log.task_root(task)).path(ObjectName::Plan(crate::BatchId(batch)))
    }

    #[test]
    fn concurrent_writes_of_several_tasks_are_stored_as_one_object_and_read_back_per_task() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let log = MemberLog::with_linger(store.clone(), Path::from("job"), Duration::ZERO).unwrap();
        let views: Vec<_> = (0..3).map(|t| log.view(t)).collect();
        // Round 1 registers the tasks as writers one at a time; round 2 waits for all three.
        for (t, v) in views.iter().enumerate() {
            put(v, &plan(&log, t as u32, 0), format!("p0-{t}").as_bytes(), PutMode::Create, 1).unwrap();
        }
        let before = logs(&store);
        assert_eq!(before, 3);
        log.set_linger(Duration::from_secs(60));
        std::thread::scope(|sc| {
            for (t, v) in views.iter().enumerate() {
                let log = &log;
                sc.spawn(move || {
                    put(v, &plan(log, t as u32, 1), format!("p1-{t}").as_bytes(), PutMode::Create, 1).unwrap()
                });
            }
        });
        assert_eq!(logs(&store), before + 1, "one object for the round of three tasks");
        assert_eq!(log.stats().entries, 6);
        for (t, v) in views.iter().enumerate() {
            assert_eq!(get(v, &plan(&log, t as u32, 1)).unwrap(), format!("p1-{t}").as_bytes());
            let root = log.task_root(t as u32);
            assert_eq!(
                names(v, &root),
                vec![
                    "log/00000000000000000000.plan".to_string(),
                    "log/00000000000000000001.plan".to_string()
                ]
            );
        }
        // Another process sees the same, from storage alone.
        let other = MemberLog::new(store.clone(), Path::from("job")).unwrap();
        let v1 = other.view(1);
        assert_eq!(names(&v1, &other.task_root(1)).len(), 2);
        assert_eq!(get(&v1, &plan(&other, 1, 0)).unwrap(), b"p0-1");
    }

    /// A log on an in-memory store that stores every write at once, and tasks 0 and 1 that have
    /// each written their plan of batch 0 (so both count as writers of every later round).
    fn two_writing_tasks() -> (Arc<dyn ObjectStore>, MemberLog, Vec<Arc<dyn ObjectStore>>) {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let log = MemberLog::with_linger(store.clone(), Path::from("job"), Duration::ZERO).unwrap();
        let views: Vec<_> = (0..2).map(|t| log.view(t)).collect();
        for (t, v) in views.iter().enumerate() {
            put(v, &plan(&log, t as u32, 0), b"p0", PutMode::Create, 1).unwrap();
        }
        (store, log, views)
    }

    #[test]
    fn deltas_wait_for_the_next_round_of_plans_and_go_with_it() {
        let (store, log, views) = two_writing_tasks();
        let before = logs(&store);
        log.set_linger(Duration::from_secs(60));
        let delta = |t: u32| {
            Paths::new(log.task_root(t))
                .path(ObjectName::Delta { batch: crate::BatchId(0), parent: crate::BatchId(0) })
        };
        std::thread::scope(|sc| {
            // Both tasks' deltas of batch 0: every writer has a write pending, but no plan.
            let waiting: Vec<_> = views
                .iter()
                .enumerate()
                .map(|(t, v)| {
                    let d = delta(t as u32);
                    sc.spawn(move || put(v, &d, b"d0", PutMode::Create, 1).unwrap())
                })
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(logs(&store), before, "deltas alone are not stored before a plan round");
            assert!(waiting.iter().all(|h| !h.is_finished()));
            // The plans of batch 1: the round is complete, stored with the deltas at once.
            for (t, v) in views.iter().enumerate() {
                let log = &log;
                sc.spawn(move || put(v, &plan(log, t as u32, 1), b"p1", PutMode::Create, 1).unwrap());
            }
        });
        assert_eq!(logs(&store), before + 1, "two plans and two deltas in one object");
        for (t, v) in views.iter().enumerate() {
            assert_eq!(get(v, &delta(t as u32)).unwrap(), b"d0");
            assert_eq!(get(v, &plan(&log, t as u32, 1)).unwrap(), b"p1");
        }
    }

    #[test]
    fn versions_follow_object_semantics_by_epoch_and_deletes_hide_what_they_saw() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let a = MemberLog::new(store.clone(), Path::from("job")).unwrap();
        let b = MemberLog::new(store.clone(), Path::from("job")).unwrap();
        let (va, vb) = (a.view(0), b.view(0));
        let p = plan(&a, 0, 5);
        put(&va, &p, b"old owner", PutMode::Create, 1).unwrap();
        names(&vb, &b.task_root(0)); // the new owner lists after taking the task
        let exists = put(&vb, &p, b"new owner", PutMode::Create, 2);
        assert!(matches!(exists, Err(object_store::Error::AlreadyExists { .. })), "{exists:?}");
        // The new owner replaces a fenced-off plan; the old owner's late rewrite loses on epoch.
        put(&vb, &p, b"new owner", PutMode::Overwrite, 2).unwrap();
        put(&va, &p, b"late", PutMode::Overwrite, 1).unwrap();
        names(&vb, &b.task_root(0));
        assert_eq!(get(&vb, &p).unwrap(), b"new owner");
        let third = MemberLog::new(store.clone(), Path::from("job")).unwrap();
        let vc = third.view(0);
        names(&vc, &third.task_root(0));
        assert_eq!(get(&vc, &p).unwrap(), b"new owner", "a third reader resolves the same way");
        // A delete hides every version it saw; a later write shows again.
        block_on_io(vb.delete(&p)).unwrap();
        assert_eq!(get(&vb, &p), None);
        assert!(names(&vb, &b.task_root(0)).is_empty());
        put(&vb, &p, b"again", PutMode::Create, 2).unwrap();
        assert_eq!(get(&vb, &p).unwrap(), b"again");
        // Other objects of the task are real objects under its prefix.
        let meta = Paths::new(b.task_root(0)).path(ObjectName::Metadata);
        put(&vb, &meta, b"m", PutMode::Create, 0).unwrap();
        assert_eq!(block_on_io(store.get(&meta)).unwrap().meta.size, 1);
    }

    #[test]
    fn retention_deletes_objects_whose_entries_precede_every_tasks_second_newest_full_snapshot() {
        let (store, log, views) = two_writing_tasks();
        // Both tasks are writers now: every round below holds one plan of each.
        log.set_linger(Duration::from_secs(60));
        for batch in 1..6 {
            std::thread::scope(|sc| {
                for (t, v) in views.iter().enumerate() {
                    let log = &log;
                    sc.spawn(move || put(v, &plan(log, t as u32, batch), b"p", PutMode::Create, 1).unwrap());
                }
            });
        }
        let objects = logs(&store);
        assert_eq!(objects, 2 + 5);
        let full = |t: u32, b: u64| Paths::new(log.task_root(t)).path(ObjectName::Full(crate::BatchId(b)));
        // Task 0 has fulls at 2 and 4 (floor 2), task 1 only one: nothing of task 1 may go.
        for b in [2, 4] {
            block_on_io(store.put(&full(0, b), PutPayload::from_static(b"f"))).unwrap();
        }
        block_on_io(store.put(&full(1, 4), PutPayload::from_static(b"f"))).unwrap();
        assert_eq!(log.retain().unwrap(), 1, "only task 0's lone plan 0 goes: the others hold task 1's too");
        block_on_io(store.put(&full(1, 3), PutPayload::from_static(b"f"))).unwrap();
        assert_eq!(log.retain_objects(true).unwrap().len(), 3, "a dry run names them");
        assert_eq!(logs(&store), objects - 1, "and deletes nothing");
        let deleted = log.retain().unwrap();
        assert_eq!(deleted, 3, "task 1's plan 0 and the rounds of batches 1 and 2 go (task 0's floor is 2)");
        assert_eq!(logs(&store), objects - 4);
        let left = names(&views[0], &log.task_root(0));
        assert!(
            left.iter().all(|n| !n.starts_with("log/0000000000000000000")
                || n > &"log/00000000000000000002.plan".to_string()),
            "{left:?}"
        );
        assert!(left.contains(&"log/00000000000000000003.plan".to_string()), "{left:?}");
        assert!(left.contains(&"state/00000000000000000004.full".to_string()), "{left:?}");
    }
    #[test]
    #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
    fn retention_on_a_local_directory_sweeps_what_killed_writers_left_under_members() {
        let dir = tempfile::tempdir().unwrap();
        let log = MemberLog::open(dir.path().to_str().unwrap()).unwrap();
        let view = log.view(0);
        put(&view, &plan(&log, 0, 0), b"p", PutMode::Create, 1).unwrap();
        let member_dir = dir.path().join("members").join(log.member());
        let stored: Vec<_> = std::fs::read_dir(&member_dir).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(stored.len(), 1, "{stored:?}");
        // What a writer killed between writing and renaming its staging file leaves: one long
        // ago (swept), one just now (possibly still being written: kept).
        let old = member_dir.join("00000000000000000007-0.log#3");
        let fresh = member_dir.join("00000000000000000008-0.log#4");
        for f in [&old, &fresh] {
            std::fs::write(f, b"partial").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(hour_ago).unwrap();
        assert_eq!(log.retain().unwrap(), 0, "no member log object is old enough to go");
        assert!(!old.exists() && fresh.exists() && stored[0].exists());
        assert_eq!(get(&view, &plan(&log, 0, 0)), Some(b"p".to_vec()), "the entry still reads");
    }
}
