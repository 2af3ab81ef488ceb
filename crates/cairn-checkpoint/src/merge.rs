//! Merging a chain of state checkpoints (a full snapshot and the deltas after it) into one full
//! snapshot. Pure: used by recovery and by background compaction. Keys and values stay opaque
//! bytes, so merging needs no knowledge of any operator's types.

use crate::{CheckpointKind, Error, Result, StateCheckpoint, TableData, TableWriter};
use rustc_hash::FxHashMap;

/// Merges `chain` (oldest first: a full snapshot, then deltas each naming the previous element as
/// parent) into a full snapshot as of the last element. Later entries win; tombstones remove.
/// Entry order is unspecified.
///
/// ```
/// use cairn_checkpoint::merge::merge_chain;
/// use cairn_checkpoint::*;
/// let table = |w: TableWriter| vec![w.finish("op")];
/// let mut a = TableWriter::new();
/// a.put(b"k1", b"1");
/// a.put(b"k2", b"2");
/// let mut b = TableWriter::new();
/// b.put(b"k1", b"10");
/// b.delete(b"k2");
/// let full = StateCheckpoint { batch_id: BatchId(0), kind: CheckpointKind::Full, created_ms: 0,
///     graph: GraphDescription::default(), tables: table(a), epoch: 0 };
/// let delta = StateCheckpoint { batch_id: BatchId(1), kind: CheckpointKind::Delta { parent: BatchId(0) },
///     created_ms: 0, graph: GraphDescription::default(), tables: table(b), epoch: 0 };
/// let merged = merge_chain(vec![full, delta]).unwrap();
/// let entries: Vec<_> = merged.tables[0].reader().map(|e| e.unwrap()).collect();
/// assert_eq!(entries, vec![(&b"k1"[..], Some(&b"10"[..]))]);
/// ```
pub fn merge_chain(chain: Vec<StateCheckpoint>) -> Result<StateCheckpoint> {
    let Some(first) = chain.first() else {
        return Err(Error::Decode { path: "checkpoint chain".into(), reason: "empty chain".into() });
    };
    if first.kind != CheckpointKind::Full {
        return Err(Error::corrupt(
            format!("checkpoint of batch {}", first.batch_id),
            "a chain must start with a full snapshot",
        ));
    }
    for pair in chain.windows(2) {
        let want = CheckpointKind::Delta { parent: pair[0].batch_id };
        if pair[1].kind != want {
            return Err(Error::corrupt(
                format!("checkpoint of batch {}", pair[1].batch_id),
                format!("expected a delta on batch {}, found {:?}", pair[0].batch_id, pair[1].kind),
            ));
        }
    }
    if chain.len() == 1 {
        // A full snapshot has no tombstones and one entry per key (the engine and compaction
        // write it so): it is already merged. Skipping the copy matters for restore time.
        return Ok(chain.into_iter().next().expect("one element"));
    }
    let mut ids: Vec<&str> = Vec::new();
    for c in &chain {
        for t in &c.tables {
            if !ids.contains(&t.id.as_str()) {
                ids.push(&t.id);
            }
        }
    }
    let mut tables = Vec::with_capacity(ids.len());
    for id in ids {
        let parts = chain.iter().flat_map(|c| c.tables.iter().filter(move |t| t.id == id));
        tables.push(merge_tables(parts, id)?);
    }
    let last = chain.last().expect("non-empty");
    Ok(StateCheckpoint {
        batch_id: last.batch_id,
        kind: CheckpointKind::Full,
        created_ms: last.created_ms,
        graph: last.graph.clone(),
        tables,
        // The compacting writer stamps its own epoch when it stores the snapshot.
        epoch: last.epoch,
    })
}

fn merge_tables<'a>(parts: impl Iterator<Item = &'a TableData>, id: &str) -> Result<TableData> {
    let parts: Vec<&TableData> = parts.collect();
    let total: u64 = parts.iter().map(|t| t.entries).sum();
    // Large merges (restoring millions of keys) run in shards by key hash, one per core; every
    // shard scans all entries (cheap) and keeps its own keys, so shards never share a key.
    let shards =
        if total < 200_000 { 1 } else { std::thread::available_parallelism().map_or(2, |n| n.get()).min(8) };
    let merged: Vec<Result<TableWriter>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..shards)
            .map(|shard| {
                let parts = &parts;
                sc.spawn(move || merge_shard(parts, shard, shards, total as usize / shards + 1))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Decode { path: "merge".into(), reason: "a merge thread panicked".into() })
                })
            })
            .collect()
    });
    let mut w = TableWriter::new();
    for m in merged {
        w.append(m?);
    }
    Ok(w.finish(id))
}

fn merge_shard(parts: &[&TableData], shard: usize, shards: usize, capacity: usize) -> Result<TableWriter> {
    use std::hash::BuildHasher;
    let hasher = rustc_hash::FxBuildHasher;
    let mut live: FxHashMap<&[u8], Option<&[u8]>> =
        FxHashMap::with_capacity_and_hasher(capacity, Default::default());
    for t in parts {
        for e in t.reader() {
            let (k, v) = e?;
            if shards == 1 || (hasher.hash_one(k) >> 7) as usize % shards == shard {
                live.insert(k, v);
            }
        }
    }
    let mut w = TableWriter::new();
    for (k, v) in live {
        if let Some(v) = v {
            w.put(k, v);
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BatchId, GraphDescription};
    use std::collections::BTreeMap;

    /// The sharded path (large merges) against a map model.
    #[test]
    fn large_merges_are_sharded_and_exact() {
        let ckpt = |b: u64, kind, w: TableWriter| StateCheckpoint {
            batch_id: BatchId(b),
            kind,
            created_ms: 0,
            graph: GraphDescription::default(),
            tables: vec![w.finish("t")],
            epoch: 0,
        };
        let mut model = BTreeMap::new();
        let mut full = TableWriter::new();
        for k in 0u32..250_000 {
            full.put(&k.to_le_bytes(), &[1]);
            model.insert(k.to_le_bytes().to_vec(), vec![1]);
        }
        let mut delta = TableWriter::new();
        for k in (0u32..300_000).step_by(3) {
            if k % 2 == 0 {
                delta.delete(&k.to_le_bytes());
                model.remove(k.to_le_bytes().as_slice());
            } else {
                delta.put(&k.to_le_bytes(), &[2]);
                model.insert(k.to_le_bytes().to_vec(), vec![2]);
            }
        }
        let merged = merge_chain(vec![
            ckpt(0, CheckpointKind::Full, full),
            ckpt(1, CheckpointKind::Delta { parent: BatchId(0) }, delta),
        ])
        .unwrap();
        let got: BTreeMap<Vec<u8>, Vec<u8>> = merged.tables[0]
            .reader()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.to_vec(), v.unwrap().to_vec())
            })
            .collect();
        assert_eq!(merged.tables[0].entries as usize, model.len(), "no key twice");
        assert_eq!(got, model);
    }
}
