//! Encodings of the [`crate::model`] records inside a [`crate::frame`].
//!
//! Small records (metadata, plans, commits, leases) are JSON, so an operator can read them with
//! `cairn` or by hand. State checkpoints are binary and LZ4-compressed:
//!
//! ```text
//! u64 batch id | u8 kind (0 full, 1 delta) | [u64 parent batch id, delta only] | i64 created ms
//! | [u64 writer's lease epoch, format version 2 and later]
//! | u32 n + n bytes graph description (JSON) | u32 table count
//! | per table: u32 n + n bytes id (UTF-8) | u64 entry count | u64 n + n bytes entries (see table.rs)
//! ```

use crate::frame::{self, ObjectKind};
use crate::{BatchId, CheckpointKind, Error, GraphDescription, Result, StateCheckpoint, TableData};
use serde::{de::DeserializeOwned, Serialize};

/// Encodes a JSON-bodied record (metadata, plan, commit, lease).
pub fn encode_json<T: Serialize>(kind: ObjectKind, value: &T) -> Vec<u8> {
    let body = serde_json::to_vec(value).expect("model records always serialize");
    frame::encode(kind, &body, false)
}

/// Decodes a JSON-bodied record, checking frame, checksum and kind.
pub fn decode_json<T: DeserializeOwned>(path: &str, bytes: &[u8], kind: ObjectKind) -> Result<T> {
    let body = frame::decode(path, bytes, kind)?;
    serde_json::from_slice(&body).map_err(|e| Error::Decode { path: path.to_string(), reason: e.to_string() })
}

/// Encodes a state checkpoint.
pub fn encode_state(ckpt: &StateCheckpoint) -> Vec<u8> {
    let size: usize = 64 + ckpt.tables.iter().map(|t| t.data.len() + t.id.len() + 20).sum::<usize>();
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(&ckpt.batch_id.0.to_le_bytes());
    match ckpt.kind {
        CheckpointKind::Full => b.push(0),
        CheckpointKind::Delta { parent } => {
            b.push(1);
            b.extend_from_slice(&parent.0.to_le_bytes());
        }
    }
    b.extend_from_slice(&ckpt.created_ms.to_le_bytes());
    b.extend_from_slice(&ckpt.epoch.to_le_bytes());
    let graph = serde_json::to_vec(&ckpt.graph).expect("graph always serializes");
    b.extend_from_slice(&(graph.len() as u32).to_le_bytes());
    b.extend_from_slice(&graph);
    b.extend_from_slice(&(ckpt.tables.len() as u32).to_le_bytes());
    for t in &ckpt.tables {
        b.extend_from_slice(&(t.id.len() as u32).to_le_bytes());
        b.extend_from_slice(t.id.as_bytes());
        b.extend_from_slice(&t.entries.to_le_bytes());
        b.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
        // Stored in key order so that restores and compaction merge sequentially; a table that
        // does not decode (never written by cairn) is stored as it is.
        let at = b.len();
        if t.write_ordered(&mut b).is_err() {
            b.truncate(at);
            b.extend_from_slice(&t.data);
        }
    }
    let kind = match ckpt.kind {
        CheckpointKind::Full => ObjectKind::StateFull,
        CheckpointKind::Delta { .. } => ObjectKind::StateDelta,
    };
    frame::encode(kind, &b, true)
}

/// Decodes a state checkpoint (full or delta), verifying it completely.
pub fn decode_state(path: &str, bytes: &[u8]) -> Result<StateCheckpoint> {
    let (version, kind, body) = frame::decode_versioned(path, bytes)?;
    if !matches!(kind, ObjectKind::StateFull | ObjectKind::StateDelta) {
        return Err(Error::corrupt(path, format!("holds a {kind:?} object where state was expected")));
    }
    let mut r = Cursor { b: &body, pos: 0, path };
    let batch_id = BatchId(r.u64()?);
    let ckind = match r.u8()? {
        0 => CheckpointKind::Full,
        1 => CheckpointKind::Delta { parent: BatchId(r.u64()?) },
        k => return Err(r.err(format!("unknown checkpoint kind {k}"))),
    };
    let header_full = kind == ObjectKind::StateFull;
    if header_full != matches!(ckind, CheckpointKind::Full) {
        return Err(r.err("frame kind and checkpoint kind disagree".into()));
    }
    let created_ms = r.u64()? as i64;
    // Version 1 had no epochs: its objects were written before any fence existed.
    let epoch = if version >= 2 { r.u64()? } else { 0 };
    let glen = r.u32()? as usize;
    let graph: GraphDescription =
        serde_json::from_slice(r.bytes(glen)?).map_err(|e| r.err(format!("graph description: {e}")))?;
    let ntables = r.u32()? as usize;
    let mut tables = Vec::with_capacity(ntables.min(1024));
    for _ in 0..ntables {
        let idlen = r.u32()? as usize;
        let id = std::str::from_utf8(r.bytes(idlen)?)
            .map_err(|_| r.err("table id is not UTF-8".into()))?
            .to_string();
        let entries = r.u64()?;
        let dlen = r.u64()? as usize;
        let data = r.bytes(dlen)?.to_vec();
        tables.push(TableData { id, entries, data });
    }
    if r.pos != body.len() {
        return Err(r.err(format!("{} trailing bytes", body.len() - r.pos)));
    }
    Ok(StateCheckpoint { batch_id, kind: ckind, created_ms, graph, tables, epoch })
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: String) -> Error {
        Error::Decode { path: self.path.to_string(), reason: format!("{reason} (at byte {})", self.pos) }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.err(format!("needs {n} more bytes")))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }
}
