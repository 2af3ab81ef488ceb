//! Sources: where batches come from. A source plans offset ranges before a batch runs (they are
//! logged, so a replay reads exactly the same input) and reads a planned range on demand.

use crate::api::dstream::{DStream, Data, UserError};
use crate::error::{Error, Result};
use crate::graph::{BatchCtx, Graph, Node, Partitions};
use crate::io::{block_on, Location};
use cairn_checkpoint::object_store::ObjectStore;
use cairn_checkpoint::OffsetRange;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// The next offset to read of every partition a source has planned so far.
pub type Positions = BTreeMap<String, u64>;

/// A replayable input. `plan` proposes the next ranges given the current positions; `read` must
/// return the same records every time it is given the same range (that is what makes replays
/// exact). Per-partition offset ranges fit a Kafka direct stream as well as files.
///
/// ```
/// use cairn::source::{Positions, Source};
/// use cairn::{OffsetRange, UserError};
/// /// Ten numbers per batch, forever.
/// struct Counter;
/// impl Source for Counter {
///     type Item = u64;
///     fn plan(&self, pos: &Positions) -> Result<Vec<OffsetRange>, UserError> {
///         let start = pos.get("0").copied().unwrap_or(0);
///         Ok(vec![OffsetRange { partition: "0".into(), start, end: start + 10 }])
///     }
///     fn read(&self, r: &OffsetRange) -> Result<Vec<u64>, UserError> {
///         Ok((r.start..r.end).collect())
///     }
/// }
/// let ctx = cairn::StreamingContext::builder().build().unwrap();
/// let s = ctx.source("counter", Counter).unwrap();
/// ```
pub trait Source: Send + Sync + 'static {
    /// The records this source produces.
    type Item: Data;
    /// Ranges to read in the next batch (empty: nothing new).
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError>;
    /// The records of one planned range.
    fn read(&self, range: &OffsetRange) -> std::result::Result<Vec<Self::Item>, UserError>;
}

/// The scheduler's view of a source.
pub(crate) trait SourceDyn: Send + Sync {
    fn name(&self) -> &str;
    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>>;
}

struct SourceNode<S> {
    name: String,
    source: Arc<S>,
}

impl<S: Source> SourceDyn for SourceNode<S> {
    fn name(&self) -> &str {
        &self.name
    }
    fn plan(&self, positions: &Positions) -> Result<Vec<OffsetRange>> {
        let ranges = self.source.plan(positions).map_err(|e| Error::source(&self.name, e))?;
        for r in &ranges {
            if r.end < r.start {
                return Err(Error::source(&self.name, format!("planned an inverted range {r:?}")));
            }
        }
        Ok(ranges)
    }
}

impl<S: Source> Node<S::Item> for SourceNode<S> {
    fn compute(&self, ctx: &BatchCtx<'_>) -> Result<Partitions<S::Item>> {
        let parts: Result<Partitions<S::Item>> = ctx
            .ranges(&self.name)
            .par_iter()
            .map(|r| {
                self.source.read(r).map_err(|e| {
                    Error::source(
                        &self.name,
                        format!("reading {} [{}, {}): {e}", r.partition, r.start, r.end),
                    )
                })
            })
            .collect();
        let parts = parts?;
        ctx.records.fetch_add(parts.iter().map(|p| p.len() as u64).sum(), Ordering::Relaxed);
        Ok(parts)
    }
}

pub(crate) fn register<S: Source>(graph: &Arc<Graph>, name: &str, source: S) -> Result<DStream<S::Item>> {
    graph.claim_name(name)?;
    let source = Arc::new(source);
    graph.lock().sources.push(Arc::new(SourceNode { name: name.to_string(), source: source.clone() }));
    Ok(DStream::from_node(graph.clone(), SourceNode { name: name.to_string(), source }))
}

/// A deterministic generator: `rate` records per batch spread over `partitions`, record `o` of
/// partition `p` being `f(p, o)`. Replayable by offset, so it is the demo's and the crash tests'
/// input. With a `limit`, each partition stops after that many records.
pub struct Generator<F> {
    partitions: u32,
    rate: u64,
    limit: Option<u64>,
    f: F,
}

impl<T: Data, F: Fn(u32, u64) -> T + Send + Sync + 'static> Generator<F> {
    /// `rate` records per batch over `partitions` partitions.
    pub fn new(partitions: u32, rate: u64, f: F) -> Self {
        Self { partitions: partitions.max(1), rate, limit: None, f }
    }
    /// Stops each partition after `per_partition` records in total.
    pub fn limit(mut self, per_partition: u64) -> Self {
        self.limit = Some(per_partition);
        self
    }
}

impl<T: Data, F: Fn(u32, u64) -> T + Send + Sync + 'static> Source for Generator<F> {
    type Item = T;
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError> {
        let n = self.partitions as u64;
        let mut out = Vec::new();
        for p in 0..self.partitions {
            let key = p.to_string();
            let start = positions.get(&key).copied().unwrap_or(0);
            let share = self.rate / n + u64::from((p as u64) < self.rate % n);
            let mut end = start + share;
            if let Some(l) = self.limit {
                end = end.min(l.max(start));
            }
            if end > start {
                out.push(OffsetRange { partition: key, start, end });
            }
        }
        Ok(out)
    }
    fn read(&self, r: &OffsetRange) -> std::result::Result<Vec<T>, UserError> {
        let p: u32 =
            r.partition.parse().map_err(|_| format!("not a generator partition: {:?}", r.partition))?;
        Ok((r.start..r.end).map(|o| (self.f)(p, o)).collect())
    }
}

/// Pushes batches into a [`queue_stream`](crate::StreamingContext::queue_stream); each pushed
/// `Vec` becomes one batch. In memory only: for tests and examples.
pub struct QueueHandle<T> {
    chunks: Arc<Mutex<Vec<Vec<T>>>>,
}

impl<T> Clone for QueueHandle<T> {
    fn clone(&self) -> Self {
        Self { chunks: self.chunks.clone() }
    }
}

impl<T: Data> QueueHandle<T> {
    /// Queues one batch of records.
    pub fn push(&self, batch: Vec<T>) {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
    }
}

pub(crate) struct QueueSource<T> {
    chunks: Arc<Mutex<Vec<Vec<T>>>>,
}

pub(crate) fn queue<T: Data>() -> (QueueHandle<T>, QueueSource<T>) {
    let chunks = Arc::new(Mutex::new(Vec::new()));
    (QueueHandle { chunks: chunks.clone() }, QueueSource { chunks })
}

impl<T: Data> Source for QueueSource<T> {
    type Item = T;
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError> {
        let next = positions.get("queue").copied().unwrap_or(0);
        let len = self.chunks.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        Ok(if next < len {
            vec![OffsetRange { partition: "queue".into(), start: next, end: next + 1 }]
        } else {
            vec![]
        })
    }
    fn read(&self, r: &OffsetRange) -> std::result::Result<Vec<T>, UserError> {
        let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for i in r.start..r.end {
            out.extend(
                chunks
                    .get(i as usize)
                    .ok_or("queue chunk no longer available (the queue is not durable)")?
                    .iter()
                    .cloned(),
            );
        }
        Ok(out)
    }
}

/// What a text source does with a line its parser rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Malformed {
    /// Fail the batch with an error naming the file and byte offset (the default: nothing is
    /// silently lost; fix the input or switch to `Skip`, then restart).
    #[default]
    Fail,
    /// Drop the line, log a warning with its location, and count it.
    Skip,
}

/// New text files of a directory (local path or object-store URL), taken in name order, at most
/// `max_files` per batch; every line is parsed into a record. Large files are split into byte
/// ranges read in parallel (a line belongs to the range holding its first byte). The set of
/// files already taken is part of the checkpoint. Files must appear atomically (write elsewhere,
/// then move in); names starting with `.` or `_` are ignored.
pub struct TextFiles<F> {
    location: Location,
    max_files: usize,
    split_bytes: u64,
    parse: F,
    malformed: Malformed,
    skipped: std::sync::atomic::AtomicU64,
}

/// The parser of a plain line source: every line as a `String`.
pub type LineParser = fn(&str) -> std::result::Result<String, String>;

impl TextFiles<LineParser> {
    /// Every line of new files in `location`, as a `String`.
    pub fn new(location: &str, max_files: usize) -> Result<Self> {
        Self::parsed(location, max_files, |l: &str| Ok(l.to_string()))
    }
}

impl<T: Data, F: Fn(&str) -> std::result::Result<T, String> + Send + Sync + 'static> TextFiles<F> {
    /// New files in `location`, each line turned into a record by `parse`.
    pub fn parsed(location: &str, max_files: usize, parse: F) -> Result<Self> {
        Ok(Self {
            location: Location::open(location)?,
            max_files: max_files.max(1),
            split_bytes: 0,
            parse,
            malformed: Malformed::Fail,
            skipped: Default::default(),
        })
    }
    /// Splits files into byte ranges of about this size (at least 64 KiB). By default a file is
    /// split into one range per core (ranges of 256 KiB to 16 MiB), so one large file per batch
    /// is still parsed on every core.
    pub fn split_bytes(mut self, bytes: u64) -> Self {
        self.split_bytes = bytes.max(64 << 10);
        self
    }
    /// What to do with lines the parser rejects (default [`Malformed::Fail`]).
    pub fn on_malformed(mut self, m: Malformed) -> Self {
        self.malformed = m;
        self
    }
    /// Lines skipped as malformed so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    fn fetch(
        &self,
        path: &cairn_checkpoint::object_store::path::Path,
        r: std::ops::Range<u64>,
    ) -> std::result::Result<bytes::Bytes, UserError> {
        block_on(self.location.store.get_range(path, r))
            .map_err(|e| format!("cannot read {path}: {e}").into())
    }
}

impl<T: Data, F: Fn(&str) -> std::result::Result<T, String> + Send + Sync + 'static> Source for TextFiles<F> {
    type Item = T;
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError> {
        let listing = block_on(self.location.store.list_with_delimiter(Some(&self.location.root)))
            .map_err(|e| format!("cannot list {}: {e}", self.location.label))?;
        let mut files: Vec<(String, u64)> = listing
            .objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.filename()?.to_string();
                (!name.starts_with('.') && !name.starts_with('_') && !positions.contains_key(&name))
                    .then_some((name, o.size))
            })
            .collect();
        files.sort();
        files.truncate(self.max_files);
        let mut out = Vec::new();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
        for (name, size) in files {
            let split = match self.split_bytes {
                0 => size.div_ceil(cores).clamp(256 << 10, 16 << 20),
                fixed => fixed,
            };
            let mut start = 0;
            loop {
                let end = (start + split).min(size);
                out.push(OffsetRange { partition: name.clone(), start, end });
                if end >= size {
                    break;
                }
                start = end;
            }
        }
        Ok(out)
    }

    fn read(&self, r: &OffsetRange) -> std::result::Result<Vec<T>, UserError> {
        let path = self.location.root.child(r.partition.as_str());
        if r.start == r.end {
            return Ok(Vec::new());
        }
        // Fetch from one byte before the range (to know whether a line starts at `start`) to a
        // little past it (to finish the range's last line), extending until that line ends.
        let from = r.start.saturating_sub(1);
        let size =
            block_on(self.location.store.head(&path)).map_err(|e| format!("cannot stat {path}: {e}"))?.size;
        if size < r.end {
            return Err(format!(
                "{path} shrank from at least {} to {size} bytes since it was planned",
                r.end
            )
            .into());
        }
        let mut to = (r.end + (64 << 10)).min(size);
        let mut buf = self.fetch(&path, from..to)?.to_vec();
        let skip_first = r.start > 0 && buf.first() != Some(&b'\n');
        let mut pos = if r.start == 0 { 0 } else { 1 };
        if skip_first {
            match buf[pos..].iter().position(|&c| c == b'\n') {
                Some(i) => pos += i + 1,
                None => pos = buf.len(),
            }
        }
        let mut out = Vec::new();
        // Lines whose first byte lies before `end` belong to this range.
        let limit = (r.end - from) as usize;
        while pos < limit && pos < buf.len() {
            let nl = loop {
                if let Some(i) = buf[pos..].iter().position(|&c| c == b'\n') {
                    break pos + i;
                }
                if to >= size {
                    break buf.len();
                }
                let more_to = (to + (1 << 20)).min(size);
                buf.extend_from_slice(&self.fetch(&path, to..more_to)?);
                to = more_to;
            };
            let raw = &buf[pos..nl];
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let at = from + pos as u64;
            let parsed = std::str::from_utf8(raw)
                .map_err(|e| format!("not UTF-8: {e}"))
                .and_then(|line| (self.parse)(line));
            match parsed {
                Ok(x) => out.push(x),
                Err(e) if self.malformed == Malformed::Skip => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("skipping malformed line in {path} at byte {at}: {e}");
                }
                Err(e) => {
                    return Err(format!(
                        "malformed line in {path} at byte {at}: {e} (fix the file, or use Malformed::Skip to drop such lines)"
                    )
                    .into())
                }
            }
            pos = nl + 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn read_all<T: Data, F: Fn(&str) -> std::result::Result<T, String> + Send + Sync + 'static>(
        src: &TextFiles<F>,
    ) -> std::result::Result<Vec<T>, UserError> {
        let mut out = Vec::new();
        for r in src.plan(&Positions::new())? {
            out.extend(src.read(&r)?);
        }
        Ok(out)
    }

    /// Every line comes out exactly once whatever the split size, even when lines straddle range
    /// boundaries or are longer than a range.
    #[test]
    fn split_ranges_yield_every_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        let mut x = 7u64;
        for i in 0..20_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = if i == 777 { 200_000 } else { (x >> 58) as usize };
            lines.push(format!("{i}:{}", "y".repeat(len)));
        }
        let text = lines.join("\n") + "\n";
        write(dir.path(), "a.txt", &text);
        write(dir.path(), "b.txt", "crlf 1\r\ncrlf 2\r\nno newline at end");
        for split in [64 << 10, 100_000, 1 << 20, 0] {
            let mut src = TextFiles::new(dir.path().to_str().unwrap(), 10).unwrap();
            if split > 0 {
                src = src.split_bytes(split);
            }
            let plan = src.plan(&Positions::new()).unwrap();
            if split == 64 << 10 {
                assert!(plan.len() > 10, "the big file is split into many ranges");
            }
            let got = read_all(&src).unwrap();
            let mut want = lines.clone();
            want.extend(["crlf 1", "crlf 2", "no newline at end"].map(String::from));
            assert_eq!(got.len(), want.len(), "split {split}");
            assert!(got == want, "split {split}: lines differ");
        }
    }

    #[test]
    fn taken_files_and_hidden_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["2.txt", "1.txt", ".tmp", "_SUCCESS", "3.txt"] {
            write(dir.path(), name, "x\n");
        }
        let src = TextFiles::new(dir.path().to_str().unwrap(), 2).unwrap();
        let mut pos = Positions::new();
        let first: Vec<String> = src.plan(&pos).unwrap().into_iter().map(|r| r.partition).collect();
        assert_eq!(first, vec!["1.txt", "2.txt"], "name order, max files per batch");
        pos.insert("1.txt".into(), 2);
        pos.insert("2.txt".into(), 2);
        let next: Vec<String> = src.plan(&pos).unwrap().into_iter().map(|r| r.partition).collect();
        assert_eq!(next, vec!["3.txt"]);
    }

    #[test]
    fn malformed_lines_fail_with_their_place_or_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "in.csv", "1,2\n3,x\n5,6\n");
        let parse = |l: &str| -> std::result::Result<(u64, i64), String> {
            let (k, v) = l.split_once(',').ok_or("no comma")?;
            Ok((
                k.parse().map_err(|e| format!("{e}"))?,
                v.parse().map_err(|e| format!("bad value {v:?}: {e}"))?,
            ))
        };
        let strict = TextFiles::parsed(dir.path().to_str().unwrap(), 1, parse).unwrap();
        let err = read_all(&strict).unwrap_err().to_string();
        assert!(err.contains("in.csv") && err.contains("at byte 4") && err.contains("bad value"), "{err}");
        let lenient =
            TextFiles::parsed(dir.path().to_str().unwrap(), 1, parse).unwrap().on_malformed(Malformed::Skip);
        assert_eq!(read_all(&lenient).unwrap(), vec![(1, 2), (5, 6)]);
        assert_eq!(lenient.skipped(), 1);
        std::fs::write(dir.path().join("in.csv"), b"1,2\n\xff\xfe\n").unwrap();
        let err = read_all(&strict).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }
}
