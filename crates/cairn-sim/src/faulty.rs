//! An object store wrapper that injects latency and failures into writes, for tests of storage
//! errors (a full disk, an outage, transient errors, a torn write) and of checkpoint
//! backpressure; it also counts requests by kind, to measure what a job costs on a cloud store.

use cairn_checkpoint::object_store::path::Path;
use cairn_checkpoint::object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};
use futures::stream::BoxStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Wraps a store; writes can be delayed or made to fail (with "no space left on device").
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    /// Every put under a path containing this fragment is affected (empty: all puts).
    only: String,
    delay_ms: AtomicU64,
    /// Delay of every GET, HEAD, LIST and DELETE (puts have `delay_ms`).
    read_delay_ms: AtomicU64,
    /// Every `spike_every`-th affected put waits `spike_ms` more.
    spike_every: AtomicU64,
    spike_ms: AtomicU64,
    fail: AtomicBool,
    /// The next this-many affected puts fail with a transient (retryable-looking) error.
    transient: AtomicU64,
    /// The affected put with this 1-based number fails once (0: none).
    fail_nth: AtomicU64,
    /// Every n-th affected put fails with a transient error (0: none).
    fail_period: AtomicU64,
    /// The next affected put stores only the first half of its bytes, then reports success.
    tear_next: AtomicBool,
    /// The next this-many affected puts are stored, then reported as failed (a reply lost
    /// after the write landed): the caller's retry finds its own object.
    land_then_fail: AtomicU64,
    puts: AtomicU64,
    counts: [AtomicU64; 5],
}

/// Requests seen by a [`FaultyStore`], by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    pub put: u64,
    pub get: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
}

const PUT: usize = 0;
const GET: usize = 1;
const HEAD: usize = 2;
const LIST: usize = 3;
const DELETE: usize = 4;

fn storage_error(kind: std::io::ErrorKind, msg: &str) -> cairn_checkpoint::object_store::Error {
    cairn_checkpoint::object_store::Error::Generic {
        store: "FaultyStore",
        source: Box::new(std::io::Error::new(kind, msg.to_string())),
    }
}

impl FaultyStore {
    /// Wraps `inner`, affecting puts whose path contains `only` ("" for every put).
    pub fn new(inner: Arc<dyn ObjectStore>, only: &str) -> Arc<Self> {
        Arc::new(Self {
            inner,
            only: only.to_string(),
            delay_ms: AtomicU64::new(0),
            read_delay_ms: AtomicU64::new(0),
            spike_every: AtomicU64::new(0),
            spike_ms: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            transient: AtomicU64::new(0),
            fail_nth: AtomicU64::new(0),
            fail_period: AtomicU64::new(0),
            tear_next: AtomicBool::new(false),
            land_then_fail: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            counts: Default::default(),
        })
    }
    /// Every `every`-th affected put is delayed by `extra` more (a latency spike).
    pub fn set_spikes(&self, every: u64, extra: Duration) {
        self.spike_every.store(every, Ordering::SeqCst);
        self.spike_ms.store(extra.as_millis() as u64, Ordering::SeqCst);
    }
    /// The next `n` affected puts fail with a transient error.
    pub fn fail_next(&self, n: u64) {
        self.transient.store(n, Ordering::SeqCst);
    }
    /// Every `n`-th affected put fails once with a transient error (0: never).
    pub fn fail_every(&self, n: u64) {
        self.fail_period.store(n, Ordering::SeqCst);
    }
    /// The `n`-th affected put (counting from the first ever, 1-based) fails.
    pub fn fail_nth_put(&self, n: u64) {
        self.fail_nth.store(n, Ordering::SeqCst);
    }
    /// The next affected put writes half its bytes and reports success: a torn write, as a store
    /// without atomic puts could leave.
    pub fn tear_next_put(&self) {
        self.tear_next.store(true, Ordering::SeqCst);
    }
    /// The next `n` affected puts are stored and then reported as a transient error, as when a
    /// write lands but its reply is lost.
    pub fn land_then_fail_next(&self, n: u64) {
        self.land_then_fail.store(n, Ordering::SeqCst);
    }
    /// Requests of every kind so far (affected or not).
    pub fn requests(&self) -> Requests {
        let c = |i: usize| self.counts[i].load(Ordering::SeqCst);
        Requests { put: c(PUT), get: c(GET), head: c(HEAD), list: c(LIST), delete: c(DELETE) }
    }
    fn count(&self, i: usize) {
        self.counts[i].fetch_add(1, Ordering::SeqCst);
    }
    /// Delays every affected put.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
    /// Delays every request, of every kind, by `d`: a uniformly slow store, where compaction
    /// and retention (reads, listings, deletes) cost as much as writes.
    pub fn set_delay_all(&self, d: Duration) {
        self.set_delay(d);
        self.read_delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
    async fn read_delay(&self) {
        let d = self.read_delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
    }
    /// Makes every affected put fail with a "disk full" error (or stop failing).
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }
    /// Affected puts attempted so far.
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.count(PUT);
        if location.as_ref().contains(&self.only) {
            let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
            let mut d = self.delay_ms.load(Ordering::SeqCst);
            let every = self.spike_every.load(Ordering::SeqCst);
            if every > 0 && n.is_multiple_of(every) {
                d += self.spike_ms.load(Ordering::SeqCst);
            }
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(storage_error(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device (os error 28)",
                ));
            }
            let period = self.fail_period.load(Ordering::SeqCst);
            if period > 0 && n.is_multiple_of(period) {
                return Err(storage_error(
                    std::io::ErrorKind::TimedOut,
                    &format!("injected transient error on write #{n}"),
                ));
            }
            if self.fail_nth.load(Ordering::SeqCst) == n {
                return Err(storage_error(
                    std::io::ErrorKind::Other,
                    &format!("injected failure of write #{n}"),
                ));
            }
            if self.transient.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1)).is_ok() {
                return Err(storage_error(
                    std::io::ErrorKind::TimedOut,
                    "injected transient error (503 Slow Down)",
                ));
            }
            if self.tear_next.swap(false, Ordering::SeqCst) {
                let bytes: Vec<u8> = payload.into_iter().flat_map(|b| b.to_vec()).collect();
                let half = PutPayload::from(bytes[..bytes.len() / 2].to_vec());
                return self.inner.put_opts(location, half, opts).await;
            }
            if self
                .land_then_fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1))
                .is_ok()
            {
                self.inner.put_opts(location, payload, opts).await?;
                return Err(storage_error(
                    std::io::ErrorKind::TimedOut,
                    "injected lost reply: the write landed, the client saw a timeout",
                ));
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.count(if options.head { HEAD } else { GET });
        self.read_delay().await;
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &Path) -> Result<()> {
        self.count(DELETE);
        self.read_delay().await;
        self.inner.delete(location).await
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.count(LIST);
        let d = self.read_delay_ms.load(Ordering::SeqCst);
        if d == 0 {
            return self.inner.list(prefix);
        }
        use futures::StreamExt;
        let (inner, prefix) = (self.inner.clone(), prefix.cloned());
        futures::stream::once(async move {
            tokio::time::sleep(Duration::from_millis(d)).await;
            inner.list(prefix.as_ref())
        })
        .flatten()
        .boxed()
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.count(LIST);
        self.read_delay().await;
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
    // Forwarded so the inner store's rename is used, not the trait's copy and delete.
    async fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.rename(from, to).await
    }
}
