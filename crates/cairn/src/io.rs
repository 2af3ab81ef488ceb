//! Object-store access for sources and sinks (the checkpoint store has its own, in
//! `cairn-checkpoint`). One small runtime serves every blocking call.

use cairn_checkpoint::object_store::{path::Path, ObjectStore};
use std::sync::Arc;

/// Runs an object-store request on the process's one I/O runtime (shared with the checkpoint
/// store).
pub(crate) fn block_on<T>(
    f: impl std::future::Future<Output = cairn_checkpoint::object_store::Result<T>>,
) -> cairn_checkpoint::object_store::Result<T> {
    cairn_checkpoint::store::block_on_io(f)
}

/// An object-store location: a local path, `file://` URL, or `memory://`.
#[derive(Clone)]
pub(crate) struct Location {
    pub label: String,
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
    /// The directory, for a location on the local file system (where writes are staged).
    pub local_dir: Option<std::path::PathBuf>,
}

impl Location {
    pub(crate) fn open(location: &str) -> crate::Result<Self> {
        let o = cairn_checkpoint::store::open_location(location)?;
        Ok(Self { label: location.to_string(), store: o.store, root: o.root, local_dir: o.local_dir })
    }
}
