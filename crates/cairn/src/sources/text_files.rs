//! The text file source: new files of a directory or object-store location, one record per line.

use super::{Positions, Source};
use crate::error::Result;
use crate::graph::{Data, UserError};
use crate::io::{block_on, Location};
use cairn_checkpoint::object_store::ObjectStore;
use cairn_checkpoint::{OffsetRange, SourcePartition};
use std::sync::atomic::Ordering;

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
                let seen = || positions.contains_key(&SourcePartition::named(name.as_str()));
                (!name.starts_with('.') && !name.starts_with('_') && !seen()).then_some((name, o.size))
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
                out.push(OffsetRange { partition: SourcePartition::named(name.as_str()), start, end });
                if end >= size {
                    break;
                }
                start = end;
            }
        }
        Ok(out)
    }

    fn read(&self, r: &OffsetRange) -> std::result::Result<Vec<T>, UserError> {
        let name = r.partition.as_named().ok_or_else(|| format!("{} is not a file", r.partition))?;
        let path = self.location.root.child(name);
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
        let first: Vec<String> =
            src.plan(&pos).unwrap().into_iter().map(|r| r.partition.to_string()).collect();
        assert_eq!(first, vec!["1.txt", "2.txt"], "name order, max files per batch");
        pos.insert("1.txt".into(), 2);
        pos.insert("2.txt".into(), 2);
        let next: Vec<String> =
            src.plan(&pos).unwrap().into_iter().map(|r| r.partition.to_string()).collect();
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
