//! Operators on streams of `(key, value)` pairs: hash partitioning and per-batch aggregation.

use crate::api::dstream::DStream;
use crate::graph::{shuffle, Data, Key, Partitions};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

fn combine<K: Key, V: Data>(p: Vec<(K, V)>, f: &(impl Fn(V, V) -> V + Sync)) -> Vec<(K, V)> {
    let mut m: FxHashMap<K, V> = FxHashMap::with_capacity_and_hasher(p.len() / 2, Default::default());
    for (k, v) in p {
        match m.entry(k) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let old = e.get().clone();
                *e.get_mut() = f(old, v);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(v);
            }
        }
    }
    m.into_iter().collect()
}

impl<T: Key> DStream<T> {
    /// Counts each distinct element of every batch.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<char>("in").unwrap();
    /// let counts = s.count_by_value();
    /// # q.push(vec!['a', 'b', 'a']);
    /// # let out = cairn::testing::collect(&counts);
    /// # ctx.run_available().unwrap();
    /// # let mut got = out.lock().unwrap().concat(); got.sort();
    /// # assert_eq!(got, vec![('a', 2), ('b', 1)]);
    /// ```
    pub fn count_by_value(&self) -> DStream<(T, u64)> {
        self.map(|x| (x, 1u64)).reduce_by_key(|a, b| a + b)
    }
}

impl<K: Key, V: Data> DStream<(K, V)> {
    /// Moves every pair to the partition (of the context's parallelism) that owns its key.
    pub fn partition_by_key(&self) -> DStream<(K, V)> {
        self.derive(|parts, ctx| Ok(shuffle(parts, ctx.parallelism)))
    }

    /// Combines the values of each key within every batch.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<(String, i64)>("in").unwrap();
    /// let totals = s.reduce_by_key(|a, b| a + b);
    /// # q.push(vec![("x".into(), 1), ("y".into(), 5), ("x".into(), 2)]);
    /// # let out = cairn::testing::collect(&totals);
    /// # ctx.run_available().unwrap();
    /// # let mut got = out.lock().unwrap().concat(); got.sort();
    /// # assert_eq!(got, vec![("x".to_string(), 3), ("y".to_string(), 5)]);
    /// ```
    pub fn reduce_by_key(&self, f: impl Fn(V, V) -> V + Send + Sync + 'static) -> DStream<(K, V)> {
        self.derive(move |parts, ctx| {
            // Combine before shuffling so each partition ships one value per key.
            let local: Partitions<(K, V)> = parts.into_par_iter().map(|p| combine(p, &f)).collect();
            Ok(shuffle(local, ctx.parallelism).into_par_iter().map(|p| combine(p, &f)).collect())
        })
    }

    /// Collects the values of each key within every batch.
    pub fn group_by_key(&self) -> DStream<(K, Vec<V>)> {
        self.derive(|parts, ctx| {
            Ok(shuffle(parts, ctx.parallelism)
                .into_par_iter()
                .map(|p| {
                    let mut m: FxHashMap<K, Vec<V>> = FxHashMap::default();
                    for (k, v) in p {
                        m.entry(k).or_default().push(v);
                    }
                    m.into_iter().collect()
                })
                .collect())
        })
    }

    /// Inner join, per batch, with another keyed stream: every `(k, v)` meets every `(k, w)` of
    /// the same batch.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q1, left) = ctx.queue_stream::<(u32, &'static str)>("l").unwrap();
    /// # let (q2, right) = ctx.queue_stream::<(u32, i32)>("r").unwrap();
    /// let joined = left.join(&right);
    /// # q1.push(vec![(1, "a"), (2, "b")]); q2.push(vec![(1, 10), (3, 30)]);
    /// # let out = cairn::testing::collect(&joined);
    /// # ctx.run_available().unwrap();
    /// # assert_eq!(out.lock().unwrap().concat(), vec![(1, ("a", 10))]);
    /// ```
    pub fn join<W: Data>(&self, other: &DStream<(K, W)>) -> DStream<(K, (V, W))> {
        let tagged_left = self.map(|(k, v)| (k, Side::Left(v)));
        let tagged_right = other.map(|(k, w)| (k, Side::Right(w)));
        tagged_left.union(&tagged_right).derive(|parts, ctx| {
            Ok(shuffle(parts, ctx.parallelism)
                .into_par_iter()
                .map(|p| {
                    let mut m: FxHashMap<K, (Vec<V>, Vec<W>)> = FxHashMap::default();
                    let mut order = Vec::new();
                    for (k, side) in p {
                        let e = m.entry(k.clone()).or_insert_with(|| {
                            order.push(k);
                            (Vec::new(), Vec::new())
                        });
                        match side {
                            Side::Left(v) => e.0.push(v),
                            Side::Right(w) => e.1.push(w),
                        }
                    }
                    let mut out = Vec::new();
                    for k in order {
                        let (vs, ws) = m.remove(&k).expect("key recorded above");
                        for v in &vs {
                            for w in &ws {
                                out.push((k.clone(), (v.clone(), w.clone())));
                            }
                        }
                    }
                    out
                })
                .collect())
        })
    }
}

#[derive(Clone)]
enum Side<V, W> {
    Left(V),
    Right(W),
}
