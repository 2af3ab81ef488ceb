//! Opening a location: from a location string to an object store (local, S3, Azure, GCS,
//! memory) wrapped in the one retry policy, and the shared I/O runtime.

use super::*;

/// Resolves a location string to an object store and a root prefix: a local path (created if
/// missing), a `file:///abs/path` URL, `s3://bucket/prefix` (configured from the AWS_*
/// environment variables), `az://container/prefix` (from the AZURE_* variables),
/// `gs://bucket/prefix` (from the GOOGLE_* variables), or `memory://` (a fresh in-memory store,
/// for tests).
///
/// ```
/// let (_store, root) = cairn_checkpoint::store::open_store("memory://").unwrap();
/// assert_eq!(root.as_ref(), "");
/// assert!(cairn_checkpoint::store::open_store("ftp://host/x").is_err());
/// ```
pub fn open_store(location: &str) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let opened = open_location(location)?;
    Ok((opened.store, opened.root))
}

/// An opened location: its object store, the root prefix in it, and, for a location on the local
/// file system, its directory (where crashed writers can leave staging files, see
/// [`crate::debris`]).
#[derive(Debug, Clone)]
pub struct OpenedLocation {
    /// The object store, wrapped in [`Retrying`].
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside `store` under which the location's objects live (empty for a local
    /// directory and for `memory://`).
    pub root: Path,
    /// The location's directory, canonicalized, when it is on the local file system; `None` for
    /// object stores.
    pub local_dir: Option<std::path::PathBuf>,
}

/// Like [`open_store`], also telling where a local location lives on disk. The store retries
/// transient failures ([`Retrying`], the only retry budget: the cloud clients' own retries are
/// off).
pub fn open_location(location: &str) -> Result<OpenedLocation> {
    open_location_with(location, RetryPolicy::default())
}

/// [`open_location`] with another retry policy.
pub fn open_location_with(location: &str, policy: RetryPolicy) -> Result<OpenedLocation> {
    let mut opened = open_unretried(location)?;
    opened.store = Arc::new(Retrying::new(opened.store, policy));
    Ok(opened)
}

/// The cloud clients' retries, switched off: [`Retrying`] retries every request instead, so one
/// budget covers every backend and every retry is counted.
fn client_retries_off() -> object_store::RetryConfig {
    object_store::RetryConfig { max_retries: 0, ..Default::default() }
}

fn open_unretried(location: &str) -> Result<OpenedLocation> {
    let remote =
        |(store, root): (Arc<dyn ObjectStore>, Path)| OpenedLocation { store, root, local_dir: None };
    let invalid = |reason: String| Error::InvalidLocation { location: location.to_string(), reason };
    let local_dir = if let Some((scheme, rest)) = location.split_once("://") {
        match scheme {
            "memory" => return Ok(remote((Arc::new(object_store::memory::InMemory::new()), Path::from("")))),
            "file" => {
                let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
                url.to_file_path().map_err(|_| invalid(format!("{rest:?} is not an absolute local path")))?
            }
            "s3" | "s3a" => {
                // Credentials, region and endpoint come from the usual AWS_* variables
                // (AWS_ENDPOINT and AWS_ALLOW_HTTP=true for a local S3-compatible server).
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(location)
                    .with_retry(client_retries_off())
                    .build();
                return cloud(location, "S3", store).map(remote);
            }
            "az" | "abfs" | "abfss" | "azure" | "adl" => {
                // Account, key or token from the usual AZURE_* variables (AZURE_STORAGE_USE_EMULATOR
                // and AZURITE_BLOB_STORAGE_URL for a local Azurite).
                let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(location)
                    .with_retry(client_retries_off())
                    .build();
                return cloud(location, "Azure Blob storage", store).map(remote);
            }
            "gs" => {
                // Service account from GOOGLE_SERVICE_ACCOUNT (a key file path) or
                // GOOGLE_SERVICE_ACCOUNT_KEY (its JSON), as object_store reads them.
                let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(location)
                    .with_retry(client_retries_off())
                    .build();
                return cloud(location, "Google Cloud Storage", store).map(remote);
            }
            #[cfg(feature = "hdfs")]
            "hdfs" | "viewfs" => {
                let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
                let namenode = format!("{}://{}", url.scheme(), url.authority());
                let store = hdfs_native_object_store::HdfsObjectStoreBuilder::new()
                    .with_url(&namenode)
                    .build()
                    .map_err(|e| invalid(format!("cannot configure HDFS: {e}")))?;
                let root = Path::from(url.path().trim_matches('/'));
                return Ok(remote((Arc::new(store), root)));
            }
            other => {
                let hdfs = if cfg!(feature = "hdfs") { ", hdfs://namenode/path" } else { "" };
                return Err(invalid(format!(
                    "the {other}:// scheme is not supported in this build; supported: a local path, file:///abs/path, s3://bucket/prefix, az://container/prefix, gs://bucket/prefix{hdfs}, memory:// (hdfs:// needs the `hdfs` cargo feature)"
                )));
            }
        }
    } else {
        if location.trim().is_empty() {
            return Err(invalid("empty location".into()));
        }
        std::path::PathBuf::from(location)
    };
    std::fs::create_dir_all(&local_dir).map_err(|e| invalid(format!("cannot create directory: {e}")))?;
    let dir = local_dir.canonicalize().map_err(|e| invalid(format!("cannot resolve directory: {e}")))?;
    let fs =
        object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| invalid(e.to_string()))?;
    Ok(OpenedLocation { store: Arc::new(fs), root: Path::from(""), local_dir: Some(dir) })
}

/// A cloud store built from a URL: the URL's path is the root prefix.
fn cloud<S: ObjectStore>(
    location: &str,
    what: &str,
    built: object_store::Result<S>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let invalid = |reason: String| Error::InvalidLocation { location: location.to_string(), reason };
    let url = url::Url::parse(location).map_err(|e| invalid(e.to_string()))?;
    let store = built.map_err(|e| invalid(format!("cannot configure {what}: {e}")))?;
    Ok((Arc::new(store), Path::from(url.path().trim_matches('/'))))
}

/// The one runtime that drives every object-store request of the process (checkpoints, sources,
/// file sinks), started on first use. Starting it can fail (no threads or file descriptors left);
/// that is an error for the request, not a panic.
pub fn io_runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<std::result::Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cairn-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    rt.as_ref().map_err(|e| std::io::Error::other(format!("cannot start the I/O runtime: {e}")))
}

/// Runs an object-store request on [`io_runtime`], blocking the caller (the engine's scheduler is
/// synchronous). A runtime that cannot start is reported as the request's error.
pub fn block_on_io<T>(
    f: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    match io_runtime() {
        Ok(rt) => rt.block_on(f),
        Err(e) => Err(object_store::Error::Generic { store: "cairn", source: Box::new(e) }),
    }
}
