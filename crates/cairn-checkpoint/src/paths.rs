//! Every object name in a checkpoint location (and in a file sink's output location) is built
//! and parsed here, and nowhere else.
//!
//! Batch ids are zero-padded to 20 digits so that lexical listing order is numeric order.

use crate::BatchId;
use object_store::path::Path;

/// The kinds of object found under a checkpoint location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectName {
    /// `metadata`: job metadata, written once.
    Metadata,
    /// `metadata.copy`: a second copy of `metadata`, so that one damaged copy loses nothing.
    MetadataCopy,
    /// `_lease`: which process holds the location.
    Lease,
    /// `log/<batch>.plan`: a batch's planned input.
    Plan(BatchId),
    /// `log/<batch>.commit`: a batch's commit record.
    Commit(BatchId),
    /// `state/<batch>-<parent>.delta`: state changed since the checkpoint of batch `parent`. The
    /// parent is in the name so recovery and retention can resolve chains from a listing alone.
    Delta {
        /// The batch after which the delta's state was taken.
        batch: BatchId,
        /// The batch of the checkpoint the delta builds on (older than `batch`).
        parent: BatchId,
    },
    /// `state/<batch>.full`: all state as of the end of the batch.
    Full(BatchId),
    /// `lease/<epoch>.claim`: who took the location in this epoch (created once, never changed).
    LeaseClaim(u64),
    /// `lease/<epoch>.fence`: from which batch older epochs' objects are not accepted.
    LeaseFence(u64),
    /// `lease/<epoch>.heartbeat`: the epoch holder's liveness, rewritten by that holder only.
    LeaseHeartbeat(u64),
}

/// Builds object paths under one root prefix.
///
/// ```
/// use cairn_checkpoint::paths::{Paths, ObjectName};
/// use cairn_checkpoint::BatchId;
/// let p = Paths::new("jobs/a");
/// let plan = p.path(ObjectName::Plan(BatchId(7)));
/// assert_eq!(plan.as_ref(), "jobs/a/log/00000000000000000007.plan");
/// assert_eq!(p.parse(&plan), Some(ObjectName::Plan(BatchId(7))));
/// let claim = p.path(ObjectName::LeaseClaim(3));
/// assert_eq!(claim.as_ref(), "jobs/a/lease/00000000000000000003.claim");
/// assert_eq!(p.parse(&claim), Some(ObjectName::LeaseClaim(3)));
/// ```
#[derive(Debug, Clone)]
pub struct Paths {
    root: Path,
}

impl Paths {
    /// Paths under `root` (may be empty).
    pub fn new(root: impl Into<Path>) -> Self {
        Self { root: root.into() }
    }

    /// The root prefix.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The prefix holding batch logs.
    pub fn log_dir(&self) -> Path {
        self.root.child("log")
    }

    /// The prefix holding the per-epoch lease objects.
    pub fn lease_dir(&self) -> Path {
        self.root.child("lease")
    }

    /// The prefix holding state checkpoints.
    pub fn state_dir(&self) -> Path {
        self.root.child("state")
    }

    /// The prefix holding the write-ahead log of receiver `receiver`.
    pub fn wal_dir(&self, receiver: &str) -> Path {
        self.root.child(RECEIVERS_DIR).child(receiver)
    }

    /// Block `seq` of receiver `receiver`'s write-ahead log: `receivers/<name>/<seq>.wal`, the
    /// number zero-padded to 20 digits so that listings sort numerically.
    ///
    /// ```
    /// use cairn_checkpoint::paths::Paths;
    /// let p = Paths::new("jobs/a");
    /// let block = p.wal_block("lines", 42);
    /// assert_eq!(block.as_ref(), "jobs/a/receivers/lines/00000000000000000042.wal");
    /// assert_eq!(p.parse_wal_block("lines", &block), Some(42));
    /// assert_eq!(p.parse_wal_block("other", &block), None);
    /// ```
    pub fn wal_block(&self, receiver: &str, seq: u64) -> Path {
        self.wal_dir(receiver).child(format!("{seq:020}.wal"))
    }

    /// The block number of `path`, if it is a block of `receiver`'s write-ahead log.
    pub fn parse_wal_block(&self, receiver: &str, path: &Path) -> Option<u64> {
        let rel: Vec<_> = path.prefix_match(&self.wal_dir(receiver))?.collect();
        let [file] = rel.as_slice() else { return None };
        batch_number(file.as_ref().strip_suffix(".wal")?).map(|b| b.0)
    }

    /// The prefix holding the tasks of a scaled-out job (each a location of its own).
    pub fn tasks_dir(&self) -> Path {
        self.root.child(TASKS_DIR)
    }

    /// The prefix holding the member logs of a scaled-out job's processes.
    pub fn members_dir(&self) -> Path {
        self.root.child(MEMBERS_DIR)
    }

    /// Object `seq` of member `member`'s log, holding entries of `tasks` (ascending):
    /// `members/<member>/<seq>-<tasks>.log`, the number zero-padded to 20 digits so that listings
    /// sort numerically, the tasks written as ranges (`0-3_7`) so that a reader looking for one
    /// task's entries can skip the objects that hold none; `all` when the list would be long.
    ///
    /// ```
    /// use cairn_checkpoint::paths::Paths;
    /// let p = Paths::new("jobs/a");
    /// let log = p.member_log("h-12-ab", 7, &[0, 1, 2, 3, 7, 9, 10]);
    /// assert_eq!(log.as_ref(), "jobs/a/members/h-12-ab/00000000000000000007-0-3_7_9-10.log");
    /// let parsed = p.parse_member_log(&log).unwrap();
    /// assert_eq!((parsed.member.as_str(), parsed.seq), ("h-12-ab", 7));
    /// assert!(parsed.holds(9) && !parsed.holds(8));
    /// ```
    pub fn member_log(&self, member: &str, seq: u64, tasks: &[u32]) -> Path {
        self.members_dir().child(member).child(format!("{seq:020}-{}.log", task_ranges(tasks)))
    }

    /// Recognises an object of a member log (see [`Paths::member_log`]).
    pub fn parse_member_log(&self, path: &Path) -> Option<MemberLogName> {
        let rel: Vec<_> = path.prefix_match(&self.members_dir())?.collect();
        let [member, file] = rel.as_slice() else { return None };
        let (seq, tasks) = file.as_ref().strip_suffix(".log")?.split_once('-')?;
        let seq = batch_number(seq)?.0;
        let tasks = if tasks == "all" { None } else { Some(parse_task_ranges(tasks)?) };
        Some(MemberLogName { member: member.as_ref().to_string(), seq, tasks })
    }

    /// The path of an object.
    pub fn path(&self, name: ObjectName) -> Path {
        match name {
            ObjectName::Metadata => self.root.child("metadata"),
            ObjectName::MetadataCopy => self.root.child("metadata.copy"),
            ObjectName::Lease => self.root.child("_lease"),
            ObjectName::Plan(b) => self.log_dir().child(format!("{:020}.plan", b.0)),
            ObjectName::Commit(b) => self.log_dir().child(format!("{:020}.commit", b.0)),
            ObjectName::Delta { batch, parent } => {
                self.state_dir().child(format!("{:020}-{:020}.delta", batch.0, parent.0))
            }
            ObjectName::Full(b) => self.state_dir().child(format!("{:020}.full", b.0)),
            ObjectName::LeaseClaim(e) => self.lease_dir().child(format!("{e:020}.claim")),
            ObjectName::LeaseFence(e) => self.lease_dir().child(format!("{e:020}.fence")),
            ObjectName::LeaseHeartbeat(e) => self.lease_dir().child(format!("{e:020}.heartbeat")),
        }
    }

    /// Recognises an object under this root; `None` for anything else (temporary or foreign files).
    pub fn parse(&self, path: &Path) -> Option<ObjectName> {
        let rel: Vec<_> = path.prefix_match(&self.root)?.collect();
        match rel.as_slice() {
            [name] if name.as_ref() == "metadata" => Some(ObjectName::Metadata),
            [name] if name.as_ref() == "metadata.copy" => Some(ObjectName::MetadataCopy),
            [name] if name.as_ref() == "_lease" => Some(ObjectName::Lease),
            [dir, file] => {
                let (stem, ext) = file.as_ref().split_once('.')?;
                match (dir.as_ref(), ext) {
                    ("log", "plan") => Some(ObjectName::Plan(batch_number(stem)?)),
                    ("log", "commit") => Some(ObjectName::Commit(batch_number(stem)?)),
                    ("state", "full") => Some(ObjectName::Full(batch_number(stem)?)),
                    ("lease", "claim") => Some(ObjectName::LeaseClaim(batch_number(stem)?.0)),
                    ("lease", "fence") => Some(ObjectName::LeaseFence(batch_number(stem)?.0)),
                    ("lease", "heartbeat") => Some(ObjectName::LeaseHeartbeat(batch_number(stem)?.0)),
                    ("state", "delta") => {
                        let (b, p) = stem.split_once('-')?;
                        Some(ObjectName::Delta { batch: batch_number(b)?, parent: batch_number(p)? })
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// A file sink's output object for a batch: `part-<batch>.txt` under the sink's root.
    pub fn sink_part(&self, batch: BatchId) -> Path {
        self.root.child(format!("part-{:020}.txt", batch.0))
    }

    /// Where a file sink on the local file system stages a batch's output before renaming it into
    /// place: `_staging/part-<batch>.txt`, a directory readers of the output skip (names starting
    /// with `_`), so a crash mid-write never leaves a partial file under a data name.
    pub fn sink_staging(&self, batch: BatchId) -> Path {
        self.root.child(crate::debris::SINK_STAGING_DIR).child(format!("part-{:020}.txt", batch.0))
    }

    /// The batch id of a file sink's output object, if `path` is one.
    pub fn parse_sink_part(&self, path: &Path) -> Option<BatchId> {
        let rel: Vec<_> = path.prefix_match(&self.root)?.collect();
        let [file] = rel.as_slice() else { return None };
        batch_number(file.as_ref().strip_prefix("part-")?.strip_suffix(".txt")?)
    }
}

const TASKS_DIR: &str = "tasks";
const MEMBERS_DIR: &str = "members";
/// Longest task list written into a member log object's name; longer ones are written `all`.
const MAX_TASK_RANGES: usize = 160;

/// A member log object's name, parsed (see [`Paths::member_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberLogName {
    /// The member (process) that wrote it.
    pub member: String,
    /// Its number in that member's log.
    pub seq: u64,
    /// The tasks it holds entries of; `None` when the name says `all`.
    pub tasks: Option<Vec<u32>>,
}

impl MemberLogName {
    /// Whether the object may hold entries of `task`.
    pub fn holds(&self, task: u32) -> bool {
        self.tasks.as_ref().is_none_or(|t| t.binary_search(&task).is_ok())
    }
}

fn task_ranges(tasks: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < tasks.len() {
        let mut j = i;
        while j + 1 < tasks.len() && tasks[j + 1] == tasks[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push('_');
        }
        if j > i {
            out.push_str(&format!("{}-{}", tasks[i], tasks[j]));
        } else {
            out.push_str(&tasks[i].to_string());
        }
        i = j + 1;
    }
    if out.len() > MAX_TASK_RANGES || out.is_empty() {
        return "all".into();
    }
    out
}

fn parse_task_ranges(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split('_') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 1 << 20 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Splits a task location (see [`task_location`]) into the job's location and the task.
///
/// ```
/// use cairn_checkpoint::paths::split_task_location;
/// assert_eq!(split_task_location("s3://b/jobs/c/tasks/00007"), Some(("s3://b/jobs/c", 7)));
/// assert_eq!(split_task_location("/ckpt/tasks/00011/"), Some(("/ckpt", 11)));
/// assert_eq!(split_task_location("/ckpt/jobs/00011"), None);
/// ```
pub fn split_task_location(location: &str) -> Option<(&str, u32)> {
    let trimmed = location.trim_end_matches('/');
    let (rest, task) = trimmed.rsplit_once('/')?;
    let task = parse_task(task)?;
    let parent = rest.strip_suffix(TASKS_DIR)?.strip_suffix('/')?;
    (!parent.is_empty() && !parent.ends_with("://")).then_some((parent, task))
}
const RECEIVERS_DIR: &str = "receivers";

/// The location of task `task` of a scaled-out job whose location is `root`: a complete
/// checkpoint location of its own (metadata, lease, log, state) under `<root>/tasks/<task>`,
/// the task number zero-padded to 5 digits so that listings sort numerically.
///
/// ```
/// use cairn_checkpoint::paths::task_location;
/// assert_eq!(task_location("s3://bucket/jobs/clicks", 7), "s3://bucket/jobs/clicks/tasks/00007");
/// assert_eq!(task_location("/var/ckpt/", 11), "/var/ckpt/tasks/00011");
/// ```
pub fn task_location(root: &str, task: u32) -> String {
    format!("{}/{TASKS_DIR}/{task:05}", root.trim_end_matches('/'))
}

/// The task number of a task location's last path segment (see [`task_location`]).
///
/// ```
/// assert_eq!(cairn_checkpoint::paths::parse_task("00011"), Some(11));
/// assert_eq!(cairn_checkpoint::paths::parse_task("x"), None);
/// ```
pub fn parse_task(segment: &str) -> Option<u32> {
    (segment.len() == 5 && segment.bytes().all(|b| b.is_ascii_digit()))
        .then(|| segment.parse().ok())
        .flatten()
}

/// The table that holds a source's positions in every state checkpoint: `$positions/<source>`,
/// keyed by [`crate::SourcePartition`].
///
/// ```
/// assert_eq!(cairn_checkpoint::paths::source_table("clicks"), "$positions/clicks");
/// ```
pub fn source_table(source: &str) -> String {
    format!("{SOURCE_TABLE_PREFIX}{source}")
}

/// Where format versions 1 and 2 kept a source's positions: `$source/<source>`, keyed by the
/// partition's string (`"topic-partition"` for Kafka). Read, never written.
///
/// ```
/// assert_eq!(cairn_checkpoint::paths::legacy_source_table("clicks"), "$source/clicks");
/// ```
pub fn legacy_source_table(source: &str) -> String {
    format!("{LEGACY_SOURCE_TABLE_PREFIX}{source}")
}

/// The source a table id belongs to, if it is a source's positions table of any format.
///
/// ```
/// use cairn_checkpoint::paths::table_source;
/// assert_eq!(table_source("$positions/clicks"), Some("clicks"));
/// assert_eq!(table_source("$source/clicks"), Some("clicks"));
/// assert_eq!(table_source("totals"), None);
/// ```
pub fn table_source(table: &str) -> Option<&str> {
    table.strip_prefix(SOURCE_TABLE_PREFIX).or_else(|| table.strip_prefix(LEGACY_SOURCE_TABLE_PREFIX))
}

/// One of an operator's tables when it keeps several: `<operator>/<part>` (a window's `slices`
/// and `agg`); an operator with one table uses its name alone.
///
/// ```
/// assert_eq!(cairn_checkpoint::paths::operator_table("sums", "agg"), "sums/agg");
/// ```
pub fn operator_table(operator: &str, part: &str) -> String {
    format!("{operator}/{part}")
}

/// Whether `table` is one of `operator`'s tables (its own, or `<operator>/<part>`).
///
/// ```
/// use cairn_checkpoint::paths::table_of_operator;
/// assert!(table_of_operator("sums/agg", "sums") && table_of_operator("sums", "sums"));
/// assert!(!table_of_operator("sums2", "sums"));
/// ```
pub fn table_of_operator(table: &str, operator: &str) -> bool {
    table == operator || table.strip_prefix(operator).is_some_and(|rest| rest.starts_with('/'))
}

const SOURCE_TABLE_PREFIX: &str = "$positions/";
const LEGACY_SOURCE_TABLE_PREFIX: &str = "$source/";

fn batch_number(s: &str) -> Option<BatchId> {
    if s.len() != 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().map(BatchId)
}
