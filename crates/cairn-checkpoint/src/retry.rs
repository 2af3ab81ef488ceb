//! Retries of object-store requests, as a wrapper around any [`ObjectStore`], with one budget.
//!
//! Every request cairn makes to a checkpoint location goes through [`Retrying`]: a request that
//! fails with an error that may be transient (a timeout, a 5xx, a dropped connection: object
//! store's `Generic` errors) is retried with exponential backoff, up to
//! [`RetryPolicy::max_retries`] times; an answer that is a fact (not found, already exists, a
//! failed precondition, no permission, not supported) is returned at once. The cloud clients'
//! own retries are switched off where the location is opened ([`crate::store::open_store`]), so
//! this is the only budget, and every retry is counted: per process ([`Retrying::retries`]) and
//! per calling thread ([`retries_on_this_thread`]), which is how the checkpoint writer reports the
//! retries of one write.
//!
//! Whole objects are read into memory before a read counts as done, so a body cut off mid-way is
//! retried like a failed request (checkpoint objects are read whole anyway).

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often and how patiently a request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: none).
    pub max_retries: u32,
    /// The wait before the first retry; it doubles with every further retry.
    pub first_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Six retries over about three seconds (50 ms doubling, at most 2 s apart): enough for a
    /// throttled or briefly unreachable store, short enough that a dead one is reported soon.
    fn default() -> Self {
        Self { max_retries: 6, first_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(2) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `n` (1-based).
    ///
    /// ```
    /// use cairn_checkpoint::retry::RetryPolicy;
    /// use std::time::Duration;
    /// let p = RetryPolicy::default();
    /// assert_eq!(p.backoff(1), Duration::from_millis(50));
    /// assert_eq!(p.backoff(3), Duration::from_millis(200));
    /// assert_eq!(p.backoff(20), Duration::from_secs(2));
    /// ```
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Whether an error may go away if the request is made again. Answers about the object or the
/// caller (missing, exists, precondition, permission, configuration) are final, and so is a local
/// file system that is full, read-only or refuses access.
///
/// ```
/// use cairn_checkpoint::retry::is_transient;
/// let io = |kind| object_store::Error::Generic { store: "x", source: Box::new(std::io::Error::from(kind)) };
/// assert!(is_transient(&io(std::io::ErrorKind::ConnectionRefused)));
/// assert!(!is_transient(&io(std::io::ErrorKind::StorageFull)));
/// assert!(!is_transient(&object_store::Error::NotFound { path: "a".into(), source: "gone".into() }));
/// ```
pub fn is_transient(e: &object_store::Error) -> bool {
    match e {
        object_store::Error::Generic { source, .. } => !final_io_error(source.as_ref()),
        object_store::Error::JoinError { .. } => true,
        _ => false,
    }
}

/// Whether an I/O error somewhere in `e`'s chain is an answer that waiting does not change.
fn final_io_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                StorageFull
                    | QuotaExceeded
                    | ReadOnlyFilesystem
                    | PermissionDenied
                    | InvalidInput
                    | FileTooLarge
            );
        }
        cur = err.source();
    }
    false
}

thread_local! {
    static THREAD_RETRIES: Cell<u64> = const { Cell::new(0) };
}

/// Retries made so far by requests issued from this thread (requests run on the calling thread:
/// see [`crate::store::block_on_io`]). Take the difference around a piece of work to learn how
/// many retries it needed.
pub fn retries_on_this_thread() -> u64 {
    THREAD_RETRIES.with(Cell::get)
}

/// An [`ObjectStore`] that retries transient failures of the store it wraps.
#[derive(Debug)]
pub struct Retrying {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    retries: Arc<AtomicU64>,
}

impl Retrying {
    /// Wraps `inner`.
    ///
    /// ```
    /// use cairn_checkpoint::retry::{Retrying, RetryPolicy};
    /// use std::sync::Arc;
    /// let store = Retrying::new(Arc::new(object_store::memory::InMemory::new()), RetryPolicy::default());
    /// assert_eq!(store.retries(), 0);
    /// ```
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        Self { inner, policy, retries: Arc::new(AtomicU64::new(0)) }
    }

    /// Retries made through this wrapper so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    async fn run<T, F, Fut>(&self, what: &str, location: &str, mut request: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        with_retries(self.policy, &self.retries, what, location, &mut request).await
    }
}

async fn with_retries<T, F, Fut>(
    policy: RetryPolicy,
    counter: &AtomicU64,
    what: &str,
    location: &str,
    request: &mut F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut retry = 0;
    loop {
        match request().await {
            Err(e) if is_transient(&e) && retry < policy.max_retries => {
                retry += 1;
                counter.fetch_add(1, Ordering::Relaxed);
                THREAD_RETRIES.with(|c| c.set(c.get() + 1));
                tracing::warn!("{what} {location} failed (retry {retry} of {}): {e}", policy.max_retries);
                tokio::time::sleep(policy.backoff(retry)).await;
            }
            other => return other,
        }
    }
}

impl std::fmt::Display for Retrying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Retrying({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Retrying {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.run("write of", location.as_ref(), || {
            self.inner.put_opts(location, payload.clone(), opts.clone())
        })
        .await
    }

    /// Multipart uploads are passed through: cairn writes every object in one request.
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.run("read of", location.as_ref(), || async {
            let r = self.inner.get_opts(location, options.clone()).await?;
            let (meta, range, attributes) = (r.meta.clone(), r.range.clone(), r.attributes.clone());
            let bytes: Bytes = r.bytes().await?;
            let body = futures::stream::once(async move { Ok(bytes) }).boxed();
            Ok(GetResult { payload: GetResultPayload::Stream(body), meta, range, attributes })
        })
        .await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.run("delete of", location.as_ref(), || self.inner.delete(location)).await
    }

    /// The listing is collected whole before it is returned, so a failure half-way through
    /// retries the listing instead of handing out a partial one.
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let (inner, policy, counter) = (self.inner.clone(), self.policy, self.retries.clone());
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let shown = prefix.as_ref().map_or(String::new(), |p| p.to_string());
            let mut request = || inner.list(prefix.as_ref()).try_collect::<Vec<_>>();
            with_retries(policy, &counter, "listing of", &shown, &mut request).await
        })
        .map_ok(|all| futures::stream::iter(all.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let shown = prefix.map_or(String::new(), |p| p.to_string());
        self.run("listing of", &shown, || self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.run("copy to", to.as_ref(), || self.inner.copy(from, to)).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.run("copy to", to.as_ref(), || self.inner.copy_if_not_exists(from, to)).await
    }

    // The trait's default renames by copy and delete; on a local directory that copy goes
    // through a staging file beside the target, which a crash leaves under a data name. The
    // inner store's own rename (one `rename(2)` there) must be used.
    async fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.run("rename to", to.as_ref(), || self.inner.rename(from, to)).await
    }

    async fn rename_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.run("rename to", to.as_ref(), || self.inner.rename_if_not_exists(from, to)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use std::sync::atomic::AtomicU32;

    /// Fails the first `fail` puts with `error`, then passes them on.
    #[derive(Debug)]
    struct Flaky {
        inner: InMemory,
        fail: AtomicU32,
        transient: bool,
    }

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Flaky")
        }
    }

    #[async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> Result<PutResult> {
            if self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(if self.transient {
                    object_store::Error::Generic { store: "flaky", source: "503 Slow Down".into() }
                } else {
                    object_store::Error::PermissionDenied { path: l.to_string(), source: "no".into() }
                });
            }
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &Path,
            o: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(l, o).await
        }
        async fn delete(&self, l: &Path) -> Result<()> {
            self.inner.delete(l).await
        }
        fn list(&self, p: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(p)
        }
        async fn list_with_delimiter(&self, p: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(p).await
        }
        // Copies fail, so a rename that a wrapper turned into copy and delete fails too.
        async fn copy(&self, _: &Path, _: &Path) -> Result<()> {
            Err(object_store::Error::NotImplemented)
        }
        async fn copy_if_not_exists(&self, _: &Path, _: &Path) -> Result<()> {
            Err(object_store::Error::NotImplemented)
        }
        async fn rename(&self, f: &Path, t: &Path) -> Result<()> {
            self.inner.rename(f, t).await
        }
    }

    fn fast(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    }

    fn put(store: &Retrying) -> Result<PutResult> {
        crate::store::block_on_io(store.put(&Path::from("a"), PutPayload::from_static(b"x")))
    }

    #[test]
    fn transient_errors_are_retried_within_the_budget_and_counted() {
        let flaky = Arc::new(Flaky { inner: InMemory::new(), fail: AtomicU32::new(3), transient: true });
        let store = Retrying::new(flaky, fast(3));
        let before = retries_on_this_thread();
        put(&store).expect("three failures fit in three retries");
        assert_eq!(store.retries(), 3);
        assert_eq!(retries_on_this_thread() - before, 3, "counted on the calling thread");
    }

    #[test]
    fn past_the_budget_the_last_error_is_returned() {
        let flaky = Arc::new(Flaky { inner: InMemory::new(), fail: AtomicU32::new(4), transient: true });
        let store = Retrying::new(flaky, fast(3));
        let err = put(&store).unwrap_err();
        assert!(err.to_string().contains("503 Slow Down"), "{err}");
        assert_eq!(store.retries(), 3);
    }

    #[test]
    fn renames_reach_the_inner_store_as_renames() {
        let flaky = Arc::new(Flaky { inner: InMemory::new(), fail: AtomicU32::new(0), transient: true });
        let store = Retrying::new(flaky, fast(3));
        put(&store).unwrap();
        crate::store::block_on_io(store.rename(&Path::from("a"), &Path::from("b"))).expect("renamed");
        assert!(crate::store::block_on_io(store.head(&Path::from("b"))).is_ok());
    }

    #[test]
    fn final_answers_are_not_retried() {
        let flaky = Arc::new(Flaky { inner: InMemory::new(), fail: AtomicU32::new(1), transient: false });
        let store = Retrying::new(flaky, fast(3));
        assert!(matches!(put(&store), Err(object_store::Error::PermissionDenied { .. })));
        assert_eq!(store.retries(), 0);
        // A missing object is an answer too.
        let r = crate::store::block_on_io(store.get(&Path::from("missing")));
        assert!(matches!(r, Err(object_store::Error::NotFound { .. })));
        assert_eq!(store.retries(), 0);
    }
}
