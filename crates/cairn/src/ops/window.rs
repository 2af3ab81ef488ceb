//! Windowed operators. Windows hold past batches, so they are stateful here: the buffered
//! batches are checkpointed (as slices keyed by batch time) and restored, unlike Spark where a
//! restart recomputes them from lineage that may no longer exist.

use super::stateful::OpName;
use crate::api::dstream::DStream;
use crate::error::{Error, Result};
use crate::graph::state::{
    decode, describe, encode_into, table, EncodeError, KeyedState, StateData, StatePart,
};
use crate::graph::{partition_of, shuffle, BatchCtx, Data, Key, Partitions, StatefulOp};
use cairn_checkpoint::paths::operator_table;
use cairn_checkpoint::OperatorKind;
use cairn_checkpoint::{OperatorDescription, TableData, TableWriter};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Past batches by batch time, one list per partition, with change tracking for checkpoints.
struct Slices<T> {
    name: String,
    /// `(batch time, partition) -> elements`.
    slices: Mutex<SliceState<T>>,
}

struct SliceState<T> {
    by_time: BTreeMap<i64, Vec<Vec<T>>>,
    /// Slices added since the last snapshot.
    added: Vec<i64>,
    /// The `(time, partition)` keys under which each slice lives in the checkpoint chain. After
    /// a restore at another parallelism these are the old partition numbers, so evictions must
    /// delete exactly these keys, not the current layout's.
    stored: BTreeMap<i64, Vec<u32>>,
    /// Keys to delete at the next snapshot.
    evicted: Vec<(i64, u32)>,
}

impl<T> SliceState<T> {
    fn empty() -> Self {
        Self { by_time: BTreeMap::new(), added: Vec::new(), stored: BTreeMap::new(), evicted: Vec::new() }
    }
}

impl<T: StateData + Data> Slices<T> {
    fn new(name: &str) -> Self {
        Self { name: name.to_string(), slices: Mutex::new(SliceState::empty()) }
    }

    fn clear(&self) {
        *self.lock() = SliceState::empty();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SliceState<T>> {
        self.slices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds this batch's slice and drops those older than the window; returns the dropped ones.
    fn push(&self, time: i64, parts: Vec<Vec<T>>, window_ms: i64) -> Vec<Vec<Vec<T>>> {
        let mut s = self.lock();
        s.by_time.insert(time, parts);
        s.added.push(time);
        let keep_from = time - window_ms + 1;
        let old: Vec<i64> = s.by_time.range(..keep_from).map(|(t, _)| *t).collect();
        let mut dropped = Vec::new();
        for t in old {
            let parts = s.by_time.remove(&t).expect("listed above");
            if let Some(pos) = s.added.iter().position(|a| *a == t) {
                s.added.remove(pos); // never checkpointed: nothing to delete
            }
            if let Some(keys) = s.stored.remove(&t) {
                s.evicted.extend(keys.into_iter().map(|i| (t, i)));
            }
            dropped.push(parts);
        }
        dropped
    }

    fn snapshot(&self, id: String, full: bool) -> Result<TableData> {
        let mut s = self.lock();
        let mut w = TableWriter::new();
        let err = EncodeError::default();
        let times: Vec<i64> = if full { s.by_time.keys().copied().collect() } else { s.added.clone() };
        if full {
            s.stored.clear(); // a full snapshot starts the chain afresh
        }
        for t in times {
            let Some(n) = s.by_time.get(&t).map(Vec::len) else { continue };
            for i in 0..n {
                let p = &s.by_time[&t][i];
                w.put_with(|b| encode_into(&(t, i as u32), b, &err), |b| encode_into(p, b, &err));
            }
            s.stored.insert(t, (0..n as u32).collect());
        }
        if !full {
            for (t, i) in &s.evicted {
                w.delete_with(|b| encode_into(&(*t, *i), b, &err));
            }
        }
        s.added.clear();
        s.evicted.clear();
        match err.take() {
            Some(e) => Err(Error::state(&self.name, format!("cannot encode window: {e}"))),
            None => Ok(w.finish(id)),
        }
    }

    /// Loads slices, mapping stored partition `i` to `place(i, element)` of `n` partitions.
    fn restore(&self, t: &TableData, n: usize, place: impl Fn(usize, &T) -> usize) -> Result<()> {
        let mut by_time: BTreeMap<i64, Vec<Vec<T>>> = BTreeMap::new();
        let mut stored: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for entry in t.reader() {
            let (k, v) = entry?;
            let Some(v) = v else { continue };
            let (time, i): (i64, u32) = decode(&self.name, k)?;
            stored.entry(time).or_default().push(i);
            let items: Vec<T> = decode(&self.name, v)?;
            let parts = by_time.entry(time).or_insert_with(|| (0..n).map(|_| Vec::new()).collect());
            for x in items {
                let p = place(i as usize, &x);
                parts[p].push(x);
            }
        }
        let mut s = self.lock();
        s.by_time = by_time;
        s.stored = stored;
        s.added.clear();
        s.evicted.clear();
        Ok(())
    }
}

struct WindowOp<T> {
    slices: Slices<T>,
    n: usize,
    version: u32,
}

impl<T: StateData + Data> StatefulOp for WindowOp<T> {
    fn describe(&self) -> OperatorDescription {
        describe::<(), T>(&self.slices.name, OperatorKind::Window, self.version)
    }
    fn snapshot(&self, full: bool) -> Result<Vec<TableData>> {
        Ok(vec![self.slices.snapshot(self.slices.name.clone(), full)?])
    }
    fn restore(&self, tables: &[&TableData]) -> Result<()> {
        match table(tables, &self.slices.name) {
            Some(t) => self.slices.restore(t, self.n, |i, _| i % self.n),
            None => Ok(()),
        }
    }
    fn key_count(&self) -> usize {
        self.slices.lock().by_time.len()
    }
    fn reset(&self) {
        self.slices.clear();
    }
}

/// Checks window and slide against the batch interval; returns them in milliseconds.
fn window_params(d: &DStream<impl Data>, name: &str, window: Duration, slide: Duration) -> (i64, i64) {
    let (w, s, b) = (window.as_millis() as i64, slide.as_millis() as i64, d.graph.batch_interval_ms as i64);
    for (what, v) in [("window length", w), ("slide", s)] {
        if v <= 0 || b <= 0 || v % b != 0 {
            d.graph.defer_error(format!(
                "operator {name:?}: {what} of {v} ms must be a positive multiple of the batch interval ({b} ms)"
            ));
        }
    }
    (w.max(1), s.max(1))
}

fn on_slide(ctx: &BatchCtx<'_>, slide_ms: i64) -> bool {
    (ctx.info.batch_time_ms - ctx.start_time_ms).rem_euclid(slide_ms) == 0
}

impl<T: StateData + Data> DStream<T> {
    /// Every `slide`, the elements of the batches of the last `window` (both multiples of the
    /// batch interval). The buffered batches are checkpointed under `name`.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # use std::time::Duration;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().batch_interval(Duration::from_secs(1))
    /// #     .checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<u32>("in").unwrap();
    /// let last_two = s.window("last2", Duration::from_secs(2), Duration::from_secs(1));
    /// # for b in [vec![1], vec![2], vec![3]] { q.push(b); }
    /// # let out = cairn::testing::collect(&last_two);
    /// # ctx.run_available().unwrap();
    /// # let got: Vec<Vec<u32>> = out.lock().unwrap().iter().map(|b| { let mut v = b.clone(); v.sort(); v }).collect();
    /// # assert_eq!(got, vec![vec![1], vec![1, 2], vec![2, 3]]);
    /// ```
    pub fn window(&self, name: impl Into<OpName>, window: Duration, slide: Duration) -> DStream<T> {
        let name = name.into();
        self.graph.claim_stateful(&name, self.aligned);
        name.refuse_migrations(&self.graph, OperatorKind::Window);
        let (w, s) = window_params(self, name.name(), window, slide);
        let n = self.graph.parallelism;
        let op = Arc::new(WindowOp { slices: Slices::new(name.name()), n, version: name.version() });
        self.graph.add_stateful(op.clone());
        self.derive(move |parts, ctx| {
            let mut parts = parts;
            // Keep the slice shape fixed at `n` partitions so a restore maps slots one to one.
            if parts.len() != n {
                let mut fixed: Partitions<T> = (0..n).map(|_| Vec::new()).collect();
                for (i, p) in parts.into_iter().enumerate() {
                    fixed[i % n].extend(p);
                }
                parts = fixed;
            }
            op.slices.push(ctx.info.batch_time_ms, parts, w);
            if !on_slide(ctx, s) {
                return Ok(Vec::new());
            }
            let st = op.slices.lock();
            let mut out: Partitions<T> = (0..n).map(|_| Vec::new()).collect();
            for parts in st.by_time.values() {
                for (i, p) in parts.iter().enumerate() {
                    out[i].extend(p.iter().cloned());
                }
            }
            Ok(out)
        })
    }

    /// Every `slide`, the number of elements in the last `window`: one count per slide, 0 for a
    /// window without elements (as Spark's `countByWindow`). The count is kept incrementally
    /// under `name` (a `reduce_by_key_and_window` with an inverse, on a single unit key).
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # use std::time::Duration;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().batch_interval(Duration::from_secs(1))
    /// #     .checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<char>("in").unwrap();
    /// let counts = s.count_by_window("count2", Duration::from_secs(2), Duration::from_secs(1));
    /// # for b in [vec!['a', 'b'], vec!['c'], vec![], vec![]] { q.push(b); }
    /// # let out = cairn::testing::collect(&counts);
    /// # ctx.run_available().unwrap();
    /// // The last window holds no element: it still reports its count.
    /// # assert_eq!(*out.lock().unwrap(), vec![vec![2], vec![3], vec![1], vec![0]]);
    /// ```
    pub fn count_by_window(
        &self,
        name: impl Into<OpName>,
        window: Duration,
        slide: Duration,
    ) -> DStream<u64> {
        self.map(|_| ((), 1u64))
            .reduce_window(
                name.into(),
                |a, b| a + b,
                Some(|a: u64, b: u64| a - b),
                window,
                slide,
                Some(((), 0)),
            )
            .map(|(_, c)| c)
    }
}

type Agg<V> = (V, u32);
type ReduceFn<V> = Arc<dyn Fn(V, V) -> V + Send + Sync>;

struct ReduceWindowOp<K, V> {
    name: String,
    version: u32,
    slices: Slices<(K, V)>,
    /// With an inverse function: the running window aggregate and how many slices feed each key.
    agg: Option<KeyedState<K, Agg<V>>>,
    /// The reduce function, to rebuild the aggregate from the slices on restore.
    reduce: ReduceFn<V>,
    /// Without an inverse function, the keys of an aggregate restored from a run that had one:
    /// the next delta deletes them, so a later run that adds the inverse back cannot mistake
    /// that outdated aggregate for the window's.
    stale_agg: Mutex<Vec<Vec<u8>>>,
    n: usize,
}

impl<K: Key + StateData, V: StateData + Data> ReduceWindowOp<K, V> {
    fn agg_id(&self) -> String {
        operator_table(&self.name, "agg")
    }

    /// Whether the aggregate holds exactly the keys of the buffered slices, each with the number
    /// of slices it appears in. That is what the inverse path maintains; anything else means the
    /// aggregate was not kept alongside these slices (an inverse added since, or an aggregate
    /// left by an older run), and it must be rebuilt.
    fn agg_matches_slices(&self, agg: &KeyedState<K, Agg<V>>) -> bool {
        let slices = self.slices.lock();
        (0..self.n).all(|i| {
            let mut counts: FxHashMap<&K, u32> = FxHashMap::default();
            for parts in slices.by_time.values() {
                for (k, _) in &parts[i] {
                    *counts.entry(k).or_default() += 1;
                }
            }
            let part = agg.part(i);
            part.map.len() == counts.len()
                && part.map.iter().all(|(k, slot)| counts.get(k) == Some(&slot.value.1))
        })
    }

    /// Recomputes the aggregate from the slices, oldest first (the order the inverse path adds
    /// them in). Every rebuilt key is written by the next checkpoint; keys only in the old
    /// aggregate are deleted by it.
    fn rebuild_agg(&self, agg: &KeyedState<K, Agg<V>>) {
        let slices = self.slices.lock();
        for i in 0..self.n {
            let mut fresh: StatePart<K, Agg<V>> = StatePart::default();
            for (t, parts) in &slices.by_time {
                for (k, v) in &parts[i] {
                    add_to(&mut fresh, k, v.clone(), &*self.reduce, *t);
                }
            }
            let mut part = agg.part(i);
            fresh.removed = part.map.keys().filter(|k| !fresh.map.contains_key(*k)).cloned().collect();
            *part = fresh;
        }
    }
}

impl<K: Key + StateData, V: StateData + Data> StatefulOp for ReduceWindowOp<K, V> {
    fn describe(&self) -> OperatorDescription {
        describe::<K, V>(&self.name, OperatorKind::ReduceByKeyAndWindow, self.version)
    }
    fn snapshot(&self, full: bool) -> Result<Vec<TableData>> {
        let mut t = vec![self.slices.snapshot(operator_table(&self.name, "slices"), full)?];
        if let Some(agg) = &self.agg {
            t.push(agg.snapshot(&self.agg_id(), full)?);
        } else {
            let stale = std::mem::take(&mut *self.stale_agg.lock().unwrap_or_else(|e| e.into_inner()));
            // A full snapshot simply leaves the table out; a delta must delete its keys.
            if !full && !stale.is_empty() {
                let mut w = TableWriter::new();
                for k in &stale {
                    w.delete(k);
                }
                t.push(w.finish(self.agg_id()));
            }
        }
        Ok(t)
    }
    fn restore(&self, tables: &[&TableData]) -> Result<()> {
        if let Some(t) = table(tables, &operator_table(&self.name, "slices")) {
            self.slices.restore(t, self.n, |_, (k, _)| partition_of(k, self.n))?;
        }
        let stored = table(tables, &self.agg_id());
        match (&self.agg, stored) {
            (Some(agg), stored) => {
                if let Some(t) = stored {
                    agg.restore(t)?;
                }
                if !self.agg_matches_slices(agg) {
                    tracing::info!(
                        "operator {:?}: rebuilding the window aggregate from the buffered batches ({})",
                        self.name,
                        if stored.is_some() {
                            "the stored one was not maintained with them: the inverse function was removed and added back"
                        } else {
                            "the inverse function was added"
                        }
                    );
                    self.rebuild_agg(agg);
                }
            }
            (None, Some(t)) => {
                let mut keys = Vec::new();
                for entry in t.reader() {
                    if let (k, Some(_)) = entry? {
                        keys.push(k.to_vec());
                    }
                }
                if !keys.is_empty() {
                    tracing::info!(
                        "operator {:?}: the inverse function was removed; the window is reduced from its buffered batches and the stored aggregate ({} keys) is deleted",
                        self.name,
                        keys.len()
                    );
                }
                *self.stale_agg.lock().unwrap_or_else(|e| e.into_inner()) = keys;
            }
            (None, None) => {}
        }
        Ok(())
    }
    fn key_count(&self) -> usize {
        self.agg.as_ref().map_or(0, |a| a.len())
    }
    fn reset(&self) {
        self.slices.clear();
        if let Some(agg) = &self.agg {
            agg.clear();
        }
        self.stale_agg.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl<K: Key + StateData, V: StateData + Data> DStream<(K, V)> {
    /// Every `slide`, each key's values over the last `window`, combined with `reduce`.
    ///
    /// With an `inverse` (e.g. subtraction for a sum), the window is maintained incrementally:
    /// values entering are added and values leaving are removed, so the cost per batch is that
    /// of the batch, not of the window. Without it, each slide reduces every buffered batch.
    ///
    /// Either way a key is emitted exactly while at least one batch of the window holds a value
    /// for it: a key whose last contributing batch left the window is not emitted, and a key
    /// whose values cancel out (a sum back to 0) is emitted with that value while its batches
    /// are in the window. (Spark, with an inverse, keeps such keys until a filter function
    /// removes them.)
    ///
    /// The inverse function may be added or removed between runs on the same checkpoint: an
    /// added one starts from an aggregate rebuilt from the buffered batches, a removed one's
    /// stored aggregate is deleted.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # use std::time::Duration;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().batch_interval(Duration::from_secs(1))
    /// #     .checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<(char, i64)>("in").unwrap();
    /// let sums = s.reduce_by_key_and_window("sums", |a, b| a + b, Some(|a, b| a - b),
    ///     Duration::from_secs(2), Duration::from_secs(1));
    /// # for b in [vec![('a', 1)], vec![('a', 2)], vec![('a', 4)], vec![], vec![]] { q.push(b); }
    /// # let out = cairn::testing::collect(&sums);
    /// # ctx.run_available().unwrap();
    /// // Once no batch of the window holds a value for 'a', it is no longer emitted.
    /// # assert_eq!(*out.lock().unwrap(), vec![vec![('a', 1)], vec![('a', 3)], vec![('a', 6)], vec![('a', 4)], vec![]]);
    /// ```
    pub fn reduce_by_key_and_window<R, I>(
        &self,
        name: impl Into<OpName>,
        reduce: R,
        inverse: Option<I>,
        window: Duration,
        slide: Duration,
    ) -> DStream<(K, V)>
    where
        R: Fn(V, V) -> V + Send + Sync + 'static,
        I: Fn(V, V) -> V + Send + Sync + 'static,
    {
        self.reduce_window(name.into(), reduce, inverse, window, slide, None)
    }

    /// `reduce_by_key_and_window`, emitting `empty` on a slide whose window holds no key.
    fn reduce_window<R, I>(
        &self,
        name: OpName,
        reduce: R,
        inverse: Option<I>,
        window: Duration,
        slide: Duration,
        empty: Option<(K, V)>,
    ) -> DStream<(K, V)>
    where
        R: Fn(V, V) -> V + Send + Sync + 'static,
        I: Fn(V, V) -> V + Send + Sync + 'static,
    {
        self.graph.claim_stateful(&name, self.aligned);
        name.refuse_migrations(&self.graph, OperatorKind::ReduceByKeyAndWindow);
        let (w, s) = window_params(self, name.name(), window, slide);
        let n = self.graph.parallelism;
        let (reduced, reduce) = self.reduce_by_key_inner(reduce);
        let op = Arc::new(ReduceWindowOp {
            name: name.name().to_string(),
            version: name.version(),
            slices: Slices::new(name.name()),
            agg: inverse.as_ref().map(|_| KeyedState::new(name.name(), n)),
            reduce: reduce.clone(),
            stale_agg: Mutex::new(Vec::new()),
            n,
        });
        self.graph.add_stateful(op.clone());
        let fill_empty = move |mut out: Partitions<(K, V)>| {
            if let Some((k, v)) = &empty {
                if out.iter().all(Vec::is_empty) {
                    out[partition_of(k, n)].push((k.clone(), v.clone()));
                }
            }
            out
        };
        reduced.derive(move |parts, ctx| {
            let parts = if parts.len() == n { parts } else { shuffle(parts, n) };
            let now = ctx.info.batch_time_ms;
            if let (Some(agg), Some(inv)) = (&op.agg, &inverse) {
                parts.par_iter().enumerate().for_each(|(i, p)| {
                    let mut part = agg.part(i);
                    for (k, v) in p {
                        add_to(&mut part, k, v.clone(), &*reduce, now);
                    }
                });
                let dropped = op.slices.push(now, parts, w);
                for slice in dropped {
                    slice.into_par_iter().enumerate().for_each(|(i, p)| {
                        let mut part = agg.part(i);
                        for (k, v) in p {
                            subtract_from(&mut part, &k, v, inv, now);
                        }
                    });
                }
                if !on_slide(ctx, s) {
                    return Ok(Vec::new());
                }
                return Ok(fill_empty(
                    (0..n)
                        .into_par_iter()
                        .map(|i| {
                            agg.part(i).map.iter().map(|(k, s)| (k.clone(), s.value.0.clone())).collect()
                        })
                        .collect(),
                ));
            }
            op.slices.push(now, parts, w);
            if !on_slide(ctx, s) {
                return Ok(Vec::new());
            }
            let st = op.slices.lock();
            Ok(fill_empty(
                (0..n)
                    .into_par_iter()
                    .map(|i| {
                        let mut m: FxHashMap<K, V> = FxHashMap::default();
                        for parts in st.by_time.values() {
                            for (k, v) in &parts[i] {
                                let nv = match m.remove(k) {
                                    Some(old) => reduce(old, v.clone()),
                                    None => v.clone(),
                                };
                                m.insert(k.clone(), nv);
                            }
                        }
                        m.into_iter().collect()
                    })
                    .collect(),
            ))
        })
    }

    /// `reduce_by_key` that also hands back the shared reduce function.
    fn reduce_by_key_inner<R: Fn(V, V) -> V + Send + Sync + 'static>(
        &self,
        reduce: R,
    ) -> (DStream<(K, V)>, ReduceFn<V>) {
        let reduce: ReduceFn<V> = Arc::new(reduce);
        let r = reduce.clone();
        (self.reduce_by_key(move |a, b| r(a, b)), reduce)
    }
}

fn add_to<K: Key, V: Data>(
    part: &mut StatePart<K, Agg<V>>,
    k: &K,
    v: V,
    reduce: &(dyn Fn(V, V) -> V + Send + Sync),
    now: i64,
) {
    let StatePart { map, dirty, .. } = part;
    if let Some(slot) = map.get_mut(k) {
        let (old, count) = slot.value.clone();
        slot.value = (reduce(old, v), count + 1);
        StatePart::<K, Agg<V>>::touch(dirty, k, slot);
    } else {
        let slot = StatePart::<K, Agg<V>>::new_slot(dirty, k, (v, 1), now);
        map.insert(k.clone(), slot);
    }
}

fn subtract_from<K: Key, V: Data>(
    part: &mut StatePart<K, Agg<V>>,
    k: &K,
    v: V,
    inverse: &(impl Fn(V, V) -> V + ?Sized),
    _now: i64,
) {
    let StatePart { map, dirty, removed, .. } = part;
    let Some(slot) = map.get_mut(k) else { return };
    if slot.value.1 <= 1 {
        // The last slice holding this key left the window: the key leaves with it.
        map.remove(k);
        StatePart::<K, Agg<V>>::removed(removed, k.clone());
        return;
    }
    let (old, count) = slot.value.clone();
    slot.value = (inverse(old, v), count - 1);
    StatePart::<K, Agg<V>>::touch(dirty, k, slot);
}
