//! The file sink: each batch's output becomes one object named after its batch id, written
//! atomically, so a replayed batch replaces its own output instead of adding to it.

use super::{BatchContext, BatchWrite, Gathered, Sink};
use crate::error::{Error, Result};
use crate::graph::{Data, UserError};
use crate::io::{block_on, Location};
use cairn_checkpoint::object_store::path::Path as ObjPath;
use cairn_checkpoint::object_store::{ObjectStore, PutPayload};
use cairn_checkpoint::paths::Paths;
use cairn_checkpoint::BatchId;
use futures::TryStreamExt;
use std::fmt::Display;
use std::io::Write;

/// A storage request of the file sink failed; the object store's error is kept as the source.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}: {source}")]
struct StorageFailed {
    what: &'static str,
    path: String,
    #[source]
    source: cairn_checkpoint::object_store::Error,
}

/// The file sink: one `part-<batch>.txt` per batch under a location (see
/// [`DStream::save_as_text_files`](crate::DStream::save_as_text_files)).
pub struct TextFileSink {
    loc: Location,
    paths: Paths,
    /// The formatted partitions of the batch being written.
    parts: Gathered<Vec<u8>>,
}

impl TextFileSink {
    /// A file sink writing under `location`; staged writes a crashed earlier run left in a local
    /// directory are removed first.
    pub fn open(location: &str) -> Result<Self> {
        let loc = Location::open(location)?;
        let paths = Paths::new(loc.root.clone());
        if let Some(dir) = &loc.local_dir {
            #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
            let now = std::time::SystemTime::now();
            let removed = cairn_checkpoint::debris::sweep(dir, cairn_checkpoint::debris::DEBRIS_GRACE, now)
                .map_err(|e| Error::Sink {
                sink: location.to_string(),
                batch: BatchId(0),
                message: format!("cannot remove staging debris: {e}"),
                transient: false,
            })?;
            for f in removed {
                tracing::info!("removed {} (left by a crashed writer)", f.display());
            }
        }
        Ok(Self { loc, paths, parts: Gathered::default() })
    }
}

impl<T: Data + Display> Sink<T> for TextFileSink {
    fn name(&self) -> &str {
        &self.loc.label
    }
    /// Every task would write the same `part-<batch>` names, and a directory has no fence.
    fn fences_tasks(&self) -> bool {
        false
    }
    fn open(&self, _: &BatchContext) -> std::result::Result<BatchWrite, UserError> {
        // Replays rewrite the same object with the same lines: never "already committed".
        self.parts.clear();
        Ok(BatchWrite::Write)
    }
    fn write_partition(
        &self,
        _: &BatchContext,
        i: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError> {
        let mut buf = Vec::new();
        for x in &data {
            writeln!(buf, "{x}")?;
        }
        self.parts.push(i, buf);
        Ok(())
    }
    fn parallel(&self) -> bool {
        true
    }
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError> {
        let buf = self.parts.take();
        let path = self.paths.sink_part(batch.batch_id);
        // Object stores put atomically. A local directory gets a staging file next to the
        // target from object_store, which a reader would take as data: write under `_staging/`
        // and rename into place instead.
        let put =
            |to: &ObjPath| {
                block_on(self.loc.store.put(to, PutPayload::from(buf.clone())))
                    .map_err(|source| StorageFailed { what: "write", path: to.to_string(), source })
            };
        match self.loc.local_dir {
            None => {
                put(&path)?;
            }
            Some(_) => {
                let staged = self.paths.sink_staging(batch.batch_id);
                put(&staged)?;
                block_on(self.loc.store.rename(&staged, &path)).map_err(|source| StorageFailed {
                    what: "move into place",
                    path: staged.to_string(),
                    source,
                })?;
            }
        };
        Ok(())
    }
    fn abort(&self, _: &BatchContext) {
        self.parts.clear();
    }
}

/// Reads a file sink's output: `(batch id, lines)` for every batch written, in batch order.
pub fn read_text_output(location: &str) -> Result<Vec<(BatchId, Vec<String>)>> {
    let loc = Location::open(location)?;
    let paths = Paths::new(loc.root.clone());
    let objects: Vec<_> = block_on(loc.store.list(Some(&loc.root)).try_collect::<Vec<_>>())
        .map_err(|e| Error::Lifecycle(format!("cannot list {location}: {e}")))?;
    let mut out = Vec::new();
    for o in objects {
        let Some(batch) = paths.parse_sink_part(&o.location) else { continue };
        let bytes = block_on(async { loc.store.get(&o.location).await?.bytes().await })
            .map_err(|e| Error::Lifecycle(format!("cannot read {}: {e}", o.location)))?;
        let text = String::from_utf8_lossy(&bytes);
        out.push((batch, text.lines().map(str::to_string).collect()));
    }
    out.sort_by_key(|(b, _)| *b);
    Ok(out)
}
