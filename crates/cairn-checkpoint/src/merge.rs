//! Merging a chain of state checkpoints (a full snapshot and the deltas after it) into one full
//! snapshot. Pure: used by recovery and by background compaction. Keys and values stay opaque
//! bytes, so merging needs no knowledge of any operator's types.

use crate::table::{key_hash, TableReader};
use crate::{CheckpointKind, Error, Result, StateCheckpoint, TableData, TableWriter};
use rustc_hash::FxHashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

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
    let threads =
        if total < 200_000 { 1 } else { std::thread::available_parallelism().map_or(2, |n| n.get()).min(8) };
    // Stored tables are in key order (table.rs); checked here, since a table from an older
    // writer or a damaged one must still merge correctly, only slower.
    let bounds: Vec<Option<Vec<usize>>> = if threads == 1 {
        // Small tables (positions, small state): threads would cost more than the check.
        parts.iter().map(|t| ordered_bounds(t, 1)).collect()
    } else {
        std::thread::scope(|sc| {
            let handles: Vec<_> =
                parts.iter().map(|t| sc.spawn(move || ordered_bounds(t, threads))).collect();
            handles.into_iter().map(|h| h.join().ok().flatten()).collect()
        })
    };
    let merged: Vec<Result<TableWriter>> = if bounds.iter().all(Option::is_some) {
        let bounds: Vec<Vec<usize>> = bounds.into_iter().flatten().collect();
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|range| {
                    let runs: Vec<TableReader<'_>> =
                        parts.iter().zip(&bounds).map(|(t, b)| t.reader_of(b[range]..b[range + 1])).collect();
                    sc.spawn(move || merge_ordered(runs))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(panicked()))).collect()
        })
    } else {
        // Large merges run in shards by key hash, one per core; every shard scans all entries
        // (cheap) and keeps its own keys, so shards never share a key.
        std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|shard| {
                    let parts = &parts;
                    sc.spawn(move || merge_shard(parts, shard, threads, total as usize / threads + 1))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(panicked()))).collect()
        })
    };
    let mut w = TableWriter::new();
    for m in merged {
        w.append(m?);
    }
    Ok(w.finish(id))
}

fn panicked() -> Error {
    Error::Decode { path: "merge".into(), reason: "a merge thread panicked".into() }
}

/// When `t` is in key order: the byte offsets splitting it into `ranges` runs by key hash (the
/// same hash boundaries for every table), the end included. `None` when it is out of order or
/// does not decode (the hash merge then reports the damage).
fn ordered_bounds(t: &TableData, ranges: usize) -> Option<Vec<usize>> {
    let range_of = |h: u64| ((u128::from(h) * ranges as u128) >> 64) as usize;
    let mut bounds = vec![0usize; ranges + 1];
    let mut r = t.reader();
    let mut prev: Option<(u64, &[u8])> = None;
    let mut current = 0;
    loop {
        let at = r.position();
        let Some(e) = r.next() else { break };
        let (key, _) = e.ok()?;
        let h = key_hash(key);
        if prev.is_some_and(|p| p >= (h, key)) {
            return None;
        }
        prev = Some((h, key));
        let range = range_of(h);
        while current < range {
            current += 1;
            bounds[current] = at;
        }
    }
    let end = t.data.len();
    for b in bounds.iter_mut().skip(current + 1) {
        *b = end;
    }
    Some(bounds)
}

/// A run's next entry in the merge heap: (key hash, key, reversed run index, value).
type Head<'a> = Reverse<(u64, &'a [u8], Reverse<usize>, Option<&'a [u8]>)>;

/// Run `i`'s next entry as a heap element.
fn head_of<'a>(run: &mut TableReader<'a>, i: usize) -> Result<Option<Head<'a>>> {
    run.next().transpose().map(|e| e.map(|(k, v)| Reverse((key_hash(k), k, Reverse(i), v))))
}

/// A k-way merge of ordered runs (oldest first): for each key the newest run's entry, tombstones
/// dropped. Each run holds a key at most once (checked by `ordered_bounds`).
fn merge_ordered(mut runs: Vec<TableReader<'_>>) -> Result<TableWriter> {
    let mut heap: BinaryHeap<Head<'_>> = BinaryHeap::with_capacity(runs.len());
    for (i, run) in runs.iter_mut().enumerate() {
        if let Some(head) = head_of(run, i)? {
            heap.push(head);
        }
    }
    let mut w = TableWriter::new();
    // Equal keys come newest run first (the reversed run index), so the first of a key wins and
    // the rest are skipped.
    let mut last: Option<(u64, &[u8])> = None;
    while let Some(mut top) = heap.peek_mut() {
        let Reverse((h, k, Reverse(i), v)) = *top;
        // Replacing the top in place sifts once, where a pop and a push would sift twice.
        match head_of(&mut runs[i], i)? {
            Some(next) => *top = next,
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        if last == Some((h, k)) {
            continue;
        }
        last = Some((h, k));
        if let Some(v) = v {
            w.put(k, v);
        }
    }
    Ok(w)
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
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A chain of one table `t` per checkpoint, each as stored (in key order) or as written.
    fn chain(tables: Vec<TableWriter>, stored: bool) -> Vec<StateCheckpoint> {
        tables
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                let mut t = w.finish("t");
                if stored {
                    let mut data = Vec::new();
                    t.write_ordered(&mut data).unwrap();
                    t.data = data;
                }
                let kind = if i == 0 {
                    CheckpointKind::Full
                } else {
                    CheckpointKind::Delta { parent: BatchId(i as u64 - 1) }
                };
                StateCheckpoint {
                    batch_id: BatchId(i as u64),
                    kind,
                    created_ms: 0,
                    graph: GraphDescription::default(),
                    tables: vec![t],
                    epoch: 0,
                }
            })
            .collect()
    }

    fn contents(merged: &StateCheckpoint) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let got: BTreeMap<Vec<u8>, Vec<u8>> = merged.tables[0]
            .reader()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.to_vec(), v.expect("a merged table has no tombstones").to_vec())
            })
            .collect();
        assert_eq!(merged.tables[0].entries as usize, got.len(), "no key twice");
        got
    }

    /// Large merges (several threads), from stored tables (the ordered merge) and from tables
    /// as written (the hash merge), against a map model.
    #[test]
    fn large_merges_are_exact_either_way() {
        let build = || {
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
            (vec![full, delta], model)
        };
        for stored in [true, false] {
            let (tables, model) = build();
            let merged = merge_chain(chain(tables, stored)).unwrap();
            assert_eq!(contents(&merged), model, "stored in key order: {stored}");
            if stored {
                let mut again = Vec::new();
                merged.tables[0].write_ordered(&mut again).unwrap();
                assert_eq!(again, merged.tables[0].data, "an ordered merge's output is in key order");
            }
        }
    }

    proptest! {
        /// Any chain of puts and deletes (keys of any length, a key at most once per table as
        /// writers write them) merges to the model, from stored and from written tables, and
        /// mixing the two (a chain begun by an older writer) changes nothing.
        #[test]
        fn merges_equal_the_model(
            ops in prop::collection::vec(
                prop::collection::btree_map(prop::collection::vec(any::<u8>(), 0..20), any::<Option<u8>>(), 0..40),
                1..6,
            ),
            mixed in any::<u64>(),
        ) {
            let mut model = BTreeMap::new();
            let tables = |ops: &Vec<BTreeMap<Vec<u8>, Option<u8>>>| -> Vec<TableWriter> {
                ops.iter().map(|m| {
                    let mut w = TableWriter::new();
                    for (k, v) in m {
                        match v {
                            Some(v) => w.put(k, &[*v]),
                            None => w.delete(k),
                        }
                    }
                    w
                }).collect()
            };
            for (i, m) in ops.iter().enumerate() {
                for (k, v) in m {
                    match v {
                        Some(v) => { model.insert(k.clone(), vec![*v]); }
                        None if i > 0 => { model.remove(k); }
                        None => {}
                    }
                }
            }
            // A full snapshot holds no tombstones.
            let mut ops = ops;
            ops[0].retain(|_, v| v.is_some());
            let stored = merge_chain(chain(tables(&ops), true)).unwrap();
            let written = merge_chain(chain(tables(&ops), false)).unwrap();
            let mut mix = chain(tables(&ops), true);
            for (i, c) in chain(tables(&ops), false).into_iter().enumerate() {
                if mixed >> (i % 64) & 1 == 1 {
                    mix[i] = c;
                }
            }
            let mixed = merge_chain(mix).unwrap();
            prop_assert_eq!(contents(&stored), model.clone());
            prop_assert_eq!(contents(&written), model.clone());
            prop_assert_eq!(contents(&mixed), model);
        }
    }
}
