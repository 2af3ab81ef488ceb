//! What stream elements and keys must be, and where a key lives: the partitioning that keyed
//! operators shuffle by and keyed state is laid out by, so both place every key alike.

use rayon::prelude::*;
use rustc_hash::FxHasher;
use std::hash::{Hash, Hasher};

/// One batch's data, split into partitions that are processed in parallel.
pub type Partitions<T> = Vec<Vec<T>>;

/// What stream elements must be: cheap to move between threads. Blanket-implemented.
pub trait Data: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> Data for T {}

/// Errors returned by user functions (`foreach_batch`, parsers): anything printable.
pub type UserError = Box<dyn std::error::Error + Send + Sync>;

/// What keys must be: data that can be hashed and compared. Blanket-implemented.
pub trait Key: Data + Hash + Eq {}
impl<T: Data + Hash + Eq> Key for T {}

/// The partition (of `n`) that owns `key`. Deterministic across processes and runs, so replays
/// and restarts place every key where it was.
#[inline]
pub(crate) fn partition_of<K: Hash + ?Sized>(key: &K, n: usize) -> usize {
    let mut h = FxHasher::default();
    key.hash(&mut h);
    // Mix before reducing: the per-partition hash maps use the same hasher, and partitioning on
    // its raw bits would give every map a skewed slice of the hash space.
    let mut x = h.finish();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    ((x as u128 * n as u128) >> 64) as usize
}

/// Moves every pair to the partition that owns its key.
pub(crate) fn shuffle<K: Key, V: Data>(parts: Partitions<(K, V)>, n: usize) -> Partitions<(K, V)> {
    let buckets: Vec<Vec<Vec<(K, V)>>> = parts
        .into_par_iter()
        .map(|p| {
            let mut b: Vec<Vec<(K, V)>> = (0..n).map(|_| Vec::with_capacity(p.len() / n + 8)).collect();
            for kv in p {
                let i = partition_of(&kv.0, n);
                b[i].push(kv);
            }
            b
        })
        .collect();
    let mut by_target: Vec<Vec<Vec<(K, V)>>> = (0..n).map(|_| Vec::with_capacity(buckets.len())).collect();
    for b in buckets {
        for (i, v) in b.into_iter().enumerate() {
            by_target[i].push(v);
        }
    }
    by_target.into_par_iter().map(|vs| vs.concat()).collect()
}
