//! State tables: the unit of state inside a checkpoint.
//!
//! A table is a flat byte buffer of entries, each `varint key length, key bytes, u8 tag` followed,
//! when the tag is 1 (value), by `varint value length, value bytes`; tag 0 is a tombstone (the key
//! was removed since the parent checkpoint). Lengths are unsigned LEB128 varints (one byte below
//! 128). Keys and values are opaque here: operators encode them,
//! so compaction and recovery can merge tables without knowing any Rust type. Writing appends into
//! one buffer, so checkpointing a million keys costs no allocation per key.
//!
//! Stored tables are ordered by [`key_order`] (checked by readers, never trusted): merging a chain
//! of ordered tables is then one sequential k-way merge instead of a hash-table insert per entry,
//! which for millions of keys is mostly cache misses.

use crate::{Error, Result};

const TAG_TOMBSTONE: u8 = 0;
const TAG_VALUE: u8 = 1;

/// One operator state (or source position set) inside a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableData {
    /// `operator name` or `operator name/sub-table`, unique within a checkpoint.
    pub id: String,
    /// Number of entries in `data`.
    pub entries: u64,
    /// Encoded entries, see the module docs.
    pub data: Vec<u8>,
}

impl TableData {
    /// Iterates over the entries.
    pub fn reader(&self) -> TableReader<'_> {
        TableReader { data: &self.data, pos: 0, table: &self.id }
    }

    /// The entries in `range` of the data's bytes (which must start and end at entries).
    pub(crate) fn reader_of(&self, range: std::ops::Range<usize>) -> TableReader<'_> {
        TableReader { data: &self.data[..range.end], pos: range.start, table: &self.id }
    }

    /// Appends the entries to `out` in [`key_order`], entries of equal keys in their written
    /// order: how tables are stored. Already ordered data (a merge's output) is copied as is.
    pub fn write_ordered(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut spans = Vec::with_capacity(self.entries as usize);
        let mut r = self.reader();
        let mut ordered = true;
        let mut prev: Option<(u64, &[u8])> = None;
        while r.pos < r.data.len() {
            let start = r.pos;
            let (key, _) = r.entry()?;
            let h = key_hash(key);
            ordered &= prev.is_none_or(|p| p <= (h, key));
            prev = Some((h, key));
            spans.push((h, start as u64, r.pos as u64));
        }
        if ordered {
            out.extend_from_slice(&self.data);
            return Ok(());
        }
        radix_sort_by_hash(&mut spans);
        // Equal hashes of different keys (a 64-bit collision) are ordered by the key bytes.
        let key_at = |s: &(u64, u64, u64)| {
            TableReader { data: &self.data, pos: s.1 as usize, table: &self.id }.sized().unwrap_or_default()
        };
        let mut i = 0;
        while i < spans.len() {
            let j = i + spans[i..].iter().take_while(|s| s.0 == spans[i].0).count();
            if j - i > 1 {
                spans[i..j].sort_by(|a, b| key_at(a).cmp(key_at(b)));
            }
            i = j;
        }
        out.reserve(self.data.len());
        for (_, start, end) in spans {
            out.extend_from_slice(&self.data[start as usize..end as usize]);
        }
        Ok(())
    }
}

/// The order of stored tables: by [`key_hash`], then by key bytes.
pub fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    (key_hash(a), a).cmp(&(key_hash(b), b))
}

/// The hash that orders stored tables: 64-bit FNV-1a over the key bytes, then MurmurHash3's
/// 64-bit finalizer so that every bit depends on every byte. Part of the format: documented in
/// docs/checkpoint-format.md, and never to change (a reader finding a table out of this order
/// merges it the slow way).
///
/// ```
/// assert_eq!(cairn_checkpoint::table::key_hash(b""), 0xefd0_1f60_ba99_2926);
/// ```
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Sorts by the first field, keeping equal ones in order: an LSD radix sort on the hash's top 24
/// bits (three passes of 8 bits), which leaves only entries sharing those bits out of order, then
/// a stable sort to finish them. Hashes are uniform, so the entries sharing their top 24 bits
/// come in small groups (two on average at 16 million entries).
fn radix_sort_by_hash(v: &mut Vec<(u64, u64, u64)>) {
    if v.len() < 64 {
        v.sort_by_key(|s| s.0);
        return;
    }
    let mut tmp = vec![(0u64, 0u64, 0u64); v.len()];
    for shift in [40, 48, 56] {
        let mut at = [0usize; 256];
        for s in v.iter() {
            at[((s.0 >> shift) & 0xff) as usize] += 1;
        }
        let mut sum = 0;
        for c in at.iter_mut() {
            let n = *c;
            *c = sum;
            sum += n;
        }
        for s in v.iter() {
            let d = ((s.0 >> shift) & 0xff) as usize;
            tmp[at[d]] = *s;
            at[d] += 1;
        }
        std::mem::swap(v, &mut tmp);
    }
    // The standard stable sort finds the long ordered runs the passes left and merges them: close
    // to one pass here, and never worse than n log n whatever the keys.
    v.sort_by_key(|s| s.0);
}

/// Appends entries to a table buffer.
///
/// ```
/// use cairn_checkpoint::{TableWriter, TableData};
/// let mut w = TableWriter::new();
/// w.put(b"k1", b"v1");
/// w.delete(b"k2");
/// let t: TableData = w.finish("op");
/// let got: Vec<_> = t.reader().map(|e| e.unwrap()).collect();
/// assert_eq!(got, vec![(&b"k1"[..], Some(&b"v1"[..])), (&b"k2"[..], None)]);
/// ```
#[derive(Debug, Default)]
pub struct TableWriter {
    data: Vec<u8>,
    entries: u64,
}

impl TableWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `key = value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.put_with(|b| b.extend_from_slice(key), |b| b.extend_from_slice(value));
    }

    /// Records a removal of `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.delete_with(|b| b.extend_from_slice(key));
    }

    /// Records `key = value`, letting the caller encode both straight into the buffer.
    pub fn put_with(&mut self, key: impl FnOnce(&mut Vec<u8>), value: impl FnOnce(&mut Vec<u8>)) {
        self.write_sized(key);
        self.data.push(TAG_VALUE);
        self.write_sized(value);
        self.entries += 1;
    }

    /// Records a removal, letting the caller encode the key straight into the buffer.
    pub fn delete_with(&mut self, key: impl FnOnce(&mut Vec<u8>)) {
        self.write_sized(key);
        self.data.push(TAG_TOMBSTONE);
        self.entries += 1;
    }

    /// Appends every entry of another writer (used to join per-partition buffers).
    pub fn append(&mut self, other: TableWriter) {
        self.data.extend_from_slice(&other.data);
        self.entries += other.entries;
    }

    /// Number of entries written so far.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Closes the table under the given id.
    pub fn finish(self, id: impl Into<String>) -> TableData {
        TableData { id: id.into(), entries: self.entries, data: self.data }
    }

    fn write_sized(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        // One byte is reserved for the length; the rare longer item moves to make room.
        let at = self.data.len();
        self.data.push(0);
        f(&mut self.data);
        let len = self.data.len() - at - 1;
        if len < 0x80 {
            self.data[at] = len as u8;
        } else {
            let mut varint = Vec::with_capacity(10);
            let mut v = len as u64;
            while v >= 0x80 {
                varint.push((v as u8) | 0x80);
                v >>= 7;
            }
            varint.push(v as u8);
            self.data.splice(at..at + 1, varint);
        }
    }
}

/// Iterator over a table's `(key, Some(value) | None for a tombstone)` entries.
pub struct TableReader<'a> {
    data: &'a [u8],
    pos: usize,
    table: &'a str,
}

impl<'a> TableReader<'a> {
    /// The byte offset of the next entry.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    fn sized(&mut self) -> Result<&'a [u8]> {
        let mut len: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self.data.get(self.pos).ok_or_else(|| self.malformed())?;
            self.pos += 1;
            len |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                break;
            }
            shift += 7;
            if shift > 56 {
                return Err(self.malformed());
            }
        }
        let start = self.pos;
        let end =
            usize::try_from(len).ok().and_then(|l| start.checked_add(l)).ok_or_else(|| self.malformed())?;
        let bytes = self.data.get(start..end).ok_or_else(|| self.malformed())?;
        self.pos = end;
        Ok(bytes)
    }

    fn malformed(&self) -> Error {
        Error::Decode {
            path: format!("table {}", self.table),
            reason: format!("entry at byte {} runs past the end of the table", self.pos),
        }
    }

    fn entry(&mut self) -> Result<(&'a [u8], Option<&'a [u8]>)> {
        let key = self.sized()?;
        let tag = *self.data.get(self.pos).ok_or_else(|| self.malformed())?;
        self.pos += 1;
        match tag {
            TAG_TOMBSTONE => Ok((key, None)),
            TAG_VALUE => Ok((key, Some(self.sized()?))),
            other => Err(Error::Decode {
                path: format!("table {}", self.table),
                reason: format!("unknown entry tag {other} at byte {}", self.pos - 1),
            }),
        }
    }
}

impl<'a> Iterator for TableReader<'a> {
    type Item = Result<(&'a [u8], Option<&'a [u8]>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.data.len() {
            return None;
        }
        let r = self.entry();
        if r.is_err() {
            self.pos = self.data.len();
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::radix_sort_by_hash;
    use proptest::prelude::*;

    proptest! {
        /// Equal to a stable sort by hash, whatever the hashes share: small and large inputs,
        /// hashes equal in their top bits only, and equal hashes.
        #[test]
        fn the_radix_sort_is_a_stable_sort_by_hash(
            hashes in prop::collection::vec((any::<u64>(), 0u8..4), 0..3000),
        ) {
            let v: Vec<(u64, u64, u64)> = hashes
                .iter()
                .enumerate()
                .map(|(i, &(h, kind))| {
                    let h = match kind {
                        0 => h,
                        1 => h & 0xffff_ff00_0000_0000 | (h & 0x3),
                        2 => h & 0xf,
                        _ => h & 0xffff_0000_0000_0000,
                    };
                    (h, i as u64, 0)
                })
                .collect();
            let mut want = v.clone();
            want.sort_by_key(|s| s.0);
            let mut got = v;
            radix_sort_by_hash(&mut got);
            prop_assert_eq!(got, want);
        }
    }
}
