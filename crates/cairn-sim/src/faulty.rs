//! An object store wrapper that injects latency and failures into writes, for tests of storage
//! errors (a full disk, an outage) and of checkpoint backpressure.

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
    fail: AtomicBool,
    puts: AtomicU64,
}

impl FaultyStore {
    /// Wraps `inner`, affecting puts whose path contains `only` ("" for every put).
    pub fn new(inner: Arc<dyn ObjectStore>, only: &str) -> Arc<Self> {
        Arc::new(Self {
            inner,
            only: only.to_string(),
            delay_ms: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            puts: AtomicU64::new(0),
        })
    }
    /// Delays every affected put.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
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
        if location.as_ref().contains(&self.only) {
            self.puts.fetch_add(1, Ordering::SeqCst);
            let d = self.delay_ms.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_millis(d)).await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(cairn_checkpoint::object_store::Error::Generic {
                    store: "FaultyStore",
                    source: Box::new(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        "No space left on device (os error 28)",
                    )),
                });
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
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}
