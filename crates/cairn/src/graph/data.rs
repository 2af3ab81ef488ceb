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

/// Marks an error that may heal by itself (a refused connection, a broker or database briefly
/// unavailable, a timeout): a job with a checkpoint location waits and runs the batch again
/// instead of stopping. Sources and sinks wrap their transient failures in it; see
/// [`is_transient`] for what else counts.
///
/// ```
/// let e = cairn::Transient::wrap("connection refused");
/// assert!(cairn::is_transient(e.as_ref()));
/// assert_eq!(e.to_string(), "connection refused");
/// ```
#[derive(Debug)]
pub struct Transient(pub UserError);

impl Transient {
    /// `e`, marked transient, as a [`UserError`].
    pub fn wrap(e: impl Into<UserError>) -> UserError {
        Box::new(Transient(e.into()))
    }
}

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Transient {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Whether an error (or one in its chain of sources) may heal by itself: a [`Transient`], an
/// object-store or checkpoint-store failure that is not an answer about the data
/// ([`cairn_checkpoint::retry::is_transient`]), or an I/O error of a connection (refused, reset,
/// aborted, not connected, broken pipe) or a timeout. Everything else (decode errors, permission,
/// a full disk, a lost lease) is final.
///
/// ```
/// use std::io::{Error, ErrorKind};
/// assert!(cairn::is_transient(&Error::from(ErrorKind::ConnectionRefused)));
/// assert!(!cairn::is_transient(&Error::from(ErrorKind::PermissionDenied)));
/// ```
pub fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<Transient>() {
            return true;
        }
        if let Some(os) = err.downcast_ref::<cairn_checkpoint::object_store::Error>() {
            return cairn_checkpoint::retry::is_transient(os);
        }
        if let Some(c) = err.downcast_ref::<cairn_checkpoint::Error>() {
            return c.is_transient();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | BrokenPipe
                    | TimedOut
            );
        }
        cur = err.source();
    }
    false
}

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
