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
///     graph: GraphDescription::default(), tables: table(a) };
/// let delta = StateCheckpoint { batch_id: BatchId(1), kind: CheckpointKind::Delta { parent: BatchId(0) },
///     created_ms: 0, graph: GraphDescription::default(), tables: table(b) };
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
        let mut only = chain.into_iter().next().expect("one element");
        // A full snapshot written by the engine has no tombstones, but normalise anyway.
        only.tables =
            only.tables.iter().map(|t| merge_tables(std::iter::once(t), &t.id)).collect::<Result<_>>()?;
        return Ok(only);
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
    })
}

fn merge_tables<'a>(parts: impl Iterator<Item = &'a TableData>, id: &str) -> Result<TableData> {
    let parts: Vec<&TableData> = parts.collect();
    let capacity = parts.iter().map(|t| t.entries as usize).max().unwrap_or(0);
    let mut live: FxHashMap<&[u8], Option<&[u8]>> =
        FxHashMap::with_capacity_and_hasher(capacity, Default::default());
    for t in &parts {
        for e in t.reader() {
            let (k, v) = e?;
            live.insert(k, v);
        }
    }
    let mut w = TableWriter::new();
    for (k, v) in live {
        if let Some(v) = v {
            w.put(k, v);
        }
    }
    Ok(w.finish(id))
}
