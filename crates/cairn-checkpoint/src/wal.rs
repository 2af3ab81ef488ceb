//! The write-ahead log of receivers: push-based input (a TCP stream, HTTP requests) made durable
//! in the checkpoint location before it is acknowledged or processed, so that batches can plan
//! and replay it like any replayable source.
//!
//! A receiver's log is a sequence of **blocks**, `receivers/<name>/<seq>.wal`, each holding the
//! records received since the previous block, written once with a conditional create. A batch's
//! plan names a range of block sequence numbers; a replay reads the same blocks. Block numbers
//! only grow: a writer always continues past the highest block it can list, so a range that was
//! planned never gains a block later (a block a fenced-off process wrote is simply another
//! durable block, read once like the others).
//!
//! ```
//! use cairn_checkpoint::{wal::WalBlock, CheckpointStore};
//! let dir = tempfile::tempdir().unwrap();
//! let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
//! let block = WalBlock { records: vec![b"a".to_vec(), b"b".to_vec()], ..WalBlock::default() };
//! assert!(store.write_wal_block("lines", 0, &block).unwrap());
//! let other = WalBlock { records: vec![b"c".to_vec()], ..WalBlock::default() };
//! assert!(!store.write_wal_block("lines", 0, &other).unwrap(), "a block is written once");
//! assert_eq!(store.wal_blocks("lines").unwrap(), vec![0]);
//! assert_eq!(store.read_wal_block("lines", 0).unwrap(), Some(block));
//! store.delete_wal_blocks_below("lines", 1).unwrap();
//! assert!(store.wal_blocks("lines").unwrap().is_empty());
//! ```

use crate::frame::{self, ObjectKind};
use crate::store::Created;
use crate::{CheckpointStore, Error, Result};
use futures::TryStreamExt;
use object_store::PutMode;

/// One block of a receiver's log. Encoded inside the frame as
/// `i64 sealed_ms | u32 n | n × (u32 len | len bytes) | u32 k | k × (u32 len | len bytes)`,
/// little-endian: the records, then the idempotency keys of the requests they came in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalBlock {
    /// The records, in the order they were received.
    pub records: Vec<Vec<u8>>,
    /// When the block was sealed, milliseconds since the Unix epoch.
    pub sealed_ms: i64,
    /// Idempotency keys of the requests whose records the block holds (HTTP ingest): a retry
    /// with one of these keys is known to be in the log already, across restarts.
    pub keys: Vec<String>,
}

impl WalBlock {
    fn encode(&self) -> Vec<u8> {
        let size: usize = self.records.iter().map(|r| 4 + r.len()).sum();
        let mut out = Vec::with_capacity(16 + size);
        out.extend_from_slice(&self.sealed_ms.to_le_bytes());
        let keys = self.keys.iter().map(|k| k.as_bytes());
        for list in [self.records.iter().map(Vec::as_slice).collect::<Vec<_>>(), keys.collect()] {
            out.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for r in list {
                out.extend_from_slice(&(r.len() as u32).to_le_bytes());
                out.extend_from_slice(r);
            }
        }
        out
    }

    fn decode(mut b: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (b.get(..n)?, b.get(n..)?);
            *b = rest;
            Some(head)
        }
        fn list(b: &mut &[u8]) -> Option<Vec<Vec<u8>>> {
            let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
            let mut out = Vec::with_capacity(n.min(b.len() / 4));
            for _ in 0..n {
                let len = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
                out.push(take(b, len)?.to_vec());
            }
            Some(out)
        }
        let sealed_ms = i64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
        let records = list(&mut b)?;
        let keys = list(&mut b)?.into_iter().map(String::from_utf8).collect::<Result<Vec<_>, _>>().ok()?;
        b.is_empty().then_some(Self { records, sealed_ms, keys })
    }
}

impl CheckpointStore {
    /// Writes block `seq` of `receiver`'s log if it does not exist yet: `Ok(true)` when this call
    /// wrote it, `Ok(false)` when a block with that number was already there (written by
    /// another process, or by this call's earlier attempt: compare before trusting it).
    pub fn write_wal_block(&self, receiver: &str, seq: u64, block: &WalBlock) -> Result<bool> {
        let path = self.paths().wal_block(receiver, seq);
        let body = block.encode();
        let bytes = frame::encode(ObjectKind::WalBlock, &body, body.len() > 4096);
        match self.put(&path, bytes.clone(), PutMode::Create)? {
            Created::New => Ok(true),
            // Identical bytes (the same records, sealed at the same millisecond): a retried
            // create of ours that had landed.
            Created::Exists(old) => Ok(old == bytes),
        }
    }

    /// Block `seq` of `receiver`'s log (`None` when there is none), its checksum verified.
    pub fn read_wal_block(&self, receiver: &str, seq: u64) -> Result<Option<WalBlock>> {
        let path = self.paths().wal_block(receiver, seq);
        let Some(bytes) = self.get(&path)? else { return Ok(None) };
        let body = frame::decode(path.as_ref(), &bytes, ObjectKind::WalBlock)?;
        WalBlock::decode(&body).map(Some).ok_or_else(|| Error::Decode {
            path: path.to_string(),
            reason: "not a WAL block (its records do not add up to its length)".into(),
        })
    }

    /// The block numbers of `receiver`'s log, ascending.
    pub fn wal_blocks(&self, receiver: &str) -> Result<Vec<u64>> {
        Ok(self.wal_blocks_written(receiver)?.into_iter().map(|(s, _)| s).collect())
    }

    /// The block numbers of `receiver`'s log with when the store says each was written
    /// (milliseconds since the Unix epoch), ascending.
    pub fn wal_blocks_written(&self, receiver: &str) -> Result<Vec<(u64, i64)>> {
        let dir = self.paths().wal_dir(receiver);
        let metas: Vec<object_store::ObjectMeta> = self
            .block_on(self.object_store().list(Some(&dir)).try_collect::<Vec<_>>())
            .map_err(|e| Error::storage(&dir, e))?;
        let mut seqs: Vec<(u64, i64)> = metas
            .iter()
            .filter_map(|m| {
                let seq = self.paths().parse_wal_block(receiver, &m.location)?;
                Some((seq, m.last_modified.timestamp_millis()))
            })
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Deletes the blocks of `receiver`'s log numbered below `seq` (no restorable checkpoint and
    /// no logged plan needs them any more); returns how many.
    pub fn delete_wal_blocks_below(&self, receiver: &str, seq: u64) -> Result<usize> {
        let mut deleted = 0;
        for s in self.wal_blocks(receiver)?.into_iter().filter(|s| *s < seq) {
            let path = self.paths().wal_block(receiver, s);
            match self.block_on(self.object_store().delete(&path)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(Error::storage(&path, e)),
            }
        }
        Ok(deleted)
    }
}
