//! Keyed state with change tracking, and its encoding into checkpoint tables.
//!
//! State lives in one hash map per partition. Every write marks the key dirty once per checkpoint
//! interval (a flag in the slot plus one pushed key), so a checkpoint serializes only the keys
//! changed since the previous one, without scanning the whole map.

use super::data::{partition_of, Key};
use crate::error::{Error, Result};
use cairn_checkpoint::schema::{StateSchema, TypeShape};
use cairn_checkpoint::{OperatorDescription, TableData, TableWriter};
use cairn_checkpoint::{OperatorKind, StateEncoding};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

/// What checkpointed state values (and keys) must be: serializable with serde.
pub trait StateData: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> StateData for T {}

/// The first encoding error of a snapshot; a `Cell` so the key and value closures of one entry
/// can both record into it.
pub(crate) type EncodeError = std::cell::Cell<Option<String>>;

pub(crate) fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>, err: &EncodeError) {
    let taken = std::mem::take(buf);
    match postcard::to_extend(value, taken) {
        Ok(v) => *buf = v,
        Err(e) => {
            let first = err.take().unwrap_or_else(|| e.to_string());
            err.set(Some(first));
        }
    }
}

/// Encodes a stored value in the operator's encoding (keys are always compact: they must be
/// the same bytes for the same key).
pub(crate) fn encode_value_into<T: Serialize + ?Sized>(
    encoding: StateEncoding,
    value: &T,
    buf: &mut Vec<u8>,
    err: &EncodeError,
) {
    match encoding {
        StateEncoding::Compact => encode_into(value, buf, err),
        StateEncoding::Json => {
            if let Err(e) = serde_json::to_writer(&mut *buf, value) {
                let first = err.take().unwrap_or_else(|| e.to_string());
                err.set(Some(first));
            }
        }
    }
}

/// Decodes a stored value in the operator's encoding.
pub(crate) fn decode_value<T: DeserializeOwned>(
    op: &str,
    encoding: StateEncoding,
    bytes: &[u8],
) -> Result<T> {
    match encoding {
        StateEncoding::Compact => decode(op, bytes),
        StateEncoding::Json => serde_json::from_slice(bytes).map_err(|e| {
            Error::state(
                op,
                format!(
                    "cannot read a stored JSON value as {} ({e}): {}; a field added without #[serde(default)], or a changed field type, needs a migration",
                    std::any::type_name::<T>(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                ),
            )
        }),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(op: &str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| {
        Error::state(
            op,
            format!(
                "cannot decode {} from the checkpoint ({e}); if the type changed, bump the operator's state version",
                std::any::type_name::<T>()
            ),
        )
    })
}

/// One stored value.
pub(crate) struct Slot<S> {
    pub value: S,
    /// The batch time at which the key last received data (drives idle timeouts), shifted left
    /// by one, with the low bit set while the key is listed in the partition's change list since
    /// the last snapshot. One word instead of two: a slot of a 16-byte state with its 8-byte key
    /// is then 32 bytes, not 40, in every bucket of the map.
    stamp: i64,
}

impl<S> Slot<S> {
    #[inline]
    pub(crate) fn new(value: S, seen_ms: i64, dirty: bool) -> Self {
        Self { value, stamp: (seen_ms << 1) | i64::from(dirty) }
    }

    /// The batch time at which the key last received data.
    #[inline]
    pub(crate) fn seen_ms(&self) -> i64 {
        self.stamp >> 1
    }

    #[inline]
    pub(crate) fn set_seen_ms(&mut self, ms: i64) {
        self.stamp = (ms << 1) | (self.stamp & 1);
    }

    /// Listed in the change list since the last snapshot.
    #[inline]
    pub(crate) fn dirty(&self) -> bool {
        self.stamp & 1 == 1
    }

    #[inline]
    pub(crate) fn set_dirty(&mut self, dirty: bool) {
        self.stamp = (self.stamp & !1) | i64::from(dirty);
    }
}

/// One partition of keyed state.
pub(crate) struct StatePart<K, S> {
    pub map: FxHashMap<K, Slot<S>>,
    /// Keys changed since the last snapshot; each listed once while its slot is dirty.
    pub dirty: Vec<K>,
    /// Keys removed since the last snapshot (tombstones, unless re-added meanwhile).
    pub removed: Vec<K>,
    /// `(deadline, key)` in deadline order; stale entries are skipped when they come due.
    pub timers: VecDeque<(i64, K)>,
}

impl<K: Key, S> Default for StatePart<K, S> {
    fn default() -> Self {
        Self { map: FxHashMap::default(), dirty: Vec::new(), removed: Vec::new(), timers: VecDeque::new() }
    }
}

impl<K: Key, S> StatePart<K, S> {
    /// Marks a present key changed.
    #[inline]
    pub(crate) fn touch(dirty: &mut Vec<K>, key: &K, slot: &mut Slot<S>) {
        if !slot.dirty() {
            slot.set_dirty(true);
            dirty.push(key.clone());
        }
    }

    /// Inserts or replaces a value, marking it changed.
    pub(crate) fn put(&mut self, key: K, value: S, seen_ms: i64) {
        match self.map.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let slot = e.get_mut();
                slot.value = value;
                slot.set_seen_ms(seen_ms);
                if !slot.dirty() {
                    slot.set_dirty(true);
                    self.dirty.push(e.key().clone());
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                self.dirty.push(e.key().clone());
                e.insert(Slot::new(value, seen_ms, true));
            }
        }
    }

    /// A new slot for a key known to be absent, marked changed.
    pub(crate) fn new_slot(dirty: &mut Vec<K>, key: &K, value: S, seen_ms: i64) -> Slot<S> {
        dirty.push(key.clone());
        Slot::new(value, seen_ms, true)
    }

    /// Records the removal of a key the caller already took out of the map.
    pub(crate) fn removed(removed: &mut Vec<K>, key: K) {
        removed.push(key);
    }

    fn snapshot(&mut self, full: bool, encoding: StateEncoding, w: &mut TableWriter, err: &EncodeError)
    where
        K: Serialize,
        S: Serialize,
    {
        let mut put = |k: &K, slot: &mut Slot<S>| {
            slot.set_dirty(false);
            w.put_with(
                |b| encode_into(k, b, err),
                |b| encode_value_into(encoding, &(&slot.value, slot.seen_ms()), b, err),
            );
        };
        // When most keys changed, one pass over the map beats a hash lookup per changed key.
        if full || self.dirty.len() * 4 > self.map.len() {
            for (k, slot) in self.map.iter_mut() {
                if full || slot.dirty() {
                    put(k, slot);
                }
            }
        } else {
            for k in &self.dirty {
                if let Some(slot) = self.map.get_mut(k).filter(|s| s.dirty()) {
                    put(k, slot);
                }
            }
        }
        self.dirty.clear();
        if !full {
            for k in &self.removed {
                if !self.map.contains_key(k) {
                    w.delete_with(|b| encode_into(k, b, err));
                }
            }
        }
        self.removed.clear();
    }
}

/// Keyed state split into the context's partitions.
pub(crate) struct KeyedState<K, S> {
    pub name: String,
    pub encoding: StateEncoding,
    parts: Vec<Mutex<StatePart<K, S>>>,
}

impl<K: Key + StateData, S: StateData> KeyedState<K, S> {
    pub(crate) fn new(name: &str, parallelism: usize) -> Self {
        Self {
            name: name.to_string(),
            encoding: StateEncoding::Compact,
            parts: (0..parallelism.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    /// The same state, its values stored in `encoding`.
    pub(crate) fn with_encoding(mut self, encoding: StateEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    pub(crate) fn parallelism(&self) -> usize {
        self.parts.len()
    }

    /// Drops every key, change record and timer.
    pub(crate) fn clear(&self) {
        for p in &self.parts {
            *p.lock().unwrap_or_else(|e| e.into_inner()) = StatePart::default();
        }
    }

    /// Locks one partition. Each partition is touched by one task per batch, so this lock is
    /// never contended; it exists to make the sharing safe, not to arbitrate.
    pub(crate) fn part(&self, i: usize) -> MutexGuard<'_, StatePart<K, S>> {
        self.parts[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn len(&self) -> usize {
        (0..self.parts.len()).map(|i| self.part(i).map.len()).sum()
    }

    /// Serializes changes (or everything) into one table, partitions in parallel.
    pub(crate) fn snapshot(&self, id: &str, full: bool) -> Result<TableData> {
        let writers: Vec<Result<TableWriter>> = (0..self.parts.len())
            .into_par_iter()
            .map(|i| {
                let mut w = TableWriter::new();
                let err = EncodeError::default();
                self.part(i).snapshot(full, self.encoding, &mut w, &err);
                match err.take() {
                    Some(e) => Err(Error::state(&self.name, format!("cannot encode state: {e}"))),
                    None => Ok(w),
                }
            })
            .collect();
        let mut all = TableWriter::new();
        for w in writers {
            all.append(w?);
        }
        Ok(all.finish(id))
    }

    /// Replaces the state with a table's entries; keys go to the partition that owns them now.
    /// Each partition's task reads the whole table and keeps its own keys, decoding and
    /// inserting straight into its map: no list of entries or decoded pairs is built in
    /// between, which for ten million keys was two more copies of the state.
    pub(crate) fn restore(&self, table: &TableData) -> Result<()> {
        let n = self.parts.len();
        let per_part = table.entries as usize / n + 1;
        let parts: Vec<StatePart<K, S>> = (0..n)
            .into_par_iter()
            .map(|i| {
                let mut part = StatePart::default();
                part.map.reserve(per_part);
                for e in table.reader() {
                    let (k, Some(v)) = e? else { continue };
                    let key: K = decode(&self.name, k)?;
                    if n > 1 && partition_of(&key, n) != i {
                        continue;
                    }
                    let (value, seen_ms): (S, i64) = decode_value(&self.name, self.encoding, v)?;
                    part.map.insert(key, Slot::new(value, seen_ms, false));
                }
                Ok(part)
            })
            .collect::<Result<_>>()?;
        for (i, part) in parts.into_iter().enumerate() {
            *self.part(i) = part;
        }
        Ok(())
    }
}

/// What a checkpoint records of a key or state type: its identity text (see
/// `cairn_checkpoint::schema`) and its structure for tools. Tracing a type takes several passes
/// over its `Deserialize` impl, and descriptions are built at every checkpoint, so each type is
/// traced once per process.
fn type_record<T: StateData>() -> (String, Option<TypeShape>) {
    type Cache = FxHashMap<std::any::TypeId, (String, Option<TypeShape>)>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let id = std::any::TypeId::of::<T>();
    if let Some(t) = CACHE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_default().get(&id) {
        return t.clone();
    }
    // The Rust path goes along so that checkpoints from before schema identities, which stored
    // only the path, are still recognised. A `Deserialize` impl that panics on the tracer's
    // minimal values (one that unwraps a parse, say) leaves the type identified by its path
    // alone, as before schema identities, rather than failing the job.
    let path = std::any::type_name::<T>();
    let record = std::panic::catch_unwind(|| (StateSchema::of::<T>(), TypeShape::of::<T>()))
        .map(|(schema, shape)| (schema.type_text(path), Some(shape)))
        .unwrap_or_else(|_| (path.to_string(), None));
    CACHE.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_default().insert(id, record.clone());
    record
}

/// The identity text of a key or state type.
pub(crate) fn type_identity<T: StateData>() -> String {
    type_record::<T>().0
}

/// The description of a keyed operator for the graph check.
pub(crate) fn describe<K: StateData, S: StateData>(
    name: &str,
    kind: OperatorKind,
    version: u32,
) -> OperatorDescription {
    let (key_type, key_shape) = type_record::<K>();
    let (state_type, state_shape) = type_record::<S>();
    OperatorDescription {
        name: name.to_string(),
        kind,
        key_type,
        state_type,
        state_version: version,
        key_shape,
        state_shape,
        state_encoding: Default::default(),
        renamed_from: Vec::new(),
        migrations: Vec::new(),
    }
}

/// Finds the table with exactly this id.
pub(crate) fn table<'a>(tables: &[&'a TableData], id: &str) -> Option<&'a TableData> {
    tables.iter().copied().find(|t| t.id == id)
}
