//! The file sink: each batch's output becomes one object named after its batch id, written
//! atomically, so a replayed batch replaces its own output instead of adding to it.

use crate::dstream::{DStream, Data};
use crate::error::{Error, Result};
use crate::io::{block_on, Location};
use crate::source::put_text;
use cairn_checkpoint::object_store::ObjectStore;
use cairn_checkpoint::paths::Paths;
use futures::TryStreamExt;
use std::fmt::Display;
use std::io::Write;

impl<T: Data + Display> DStream<T> {
    /// Writes every batch as `part-<batch id>.txt` (one element per line, partition order) under
    /// `location` (a local directory or object-store URL). Together with the batch log this is
    /// exactly-once: a batch replayed after a crash rewrites the same object with the same lines.
    /// Read the output back with [`read_text_output`].
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let out = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<u32>("in").unwrap();
    /// s.map(|x| x * 10).save_as_text_files(out.path().to_str().unwrap()).unwrap();
    /// # q.push(vec![1, 2]);
    /// # ctx.run_available().unwrap();
    /// let batches = cairn::read_text_output(out.path().to_str().unwrap()).unwrap();
    /// assert_eq!(batches, vec![(0, vec!["10".to_string(), "20".to_string()])]);
    /// ```
    pub fn save_as_text_files(&self, location: &str) -> Result<()> {
        let loc = Location::open(location)?;
        let paths = Paths::new(loc.root.clone());
        if let Some(dir) = &loc.local_dir {
            // Staged writes of a crashed earlier run.
            #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
            let now = std::time::SystemTime::now();
            let removed = cairn_checkpoint::debris::sweep(dir, cairn_checkpoint::debris::DEBRIS_GRACE, now)
                .map_err(|e| Error::Sink {
                sink: location.to_string(),
                batch: 0,
                message: format!("cannot remove staging debris: {e}"),
            })?;
            for f in removed {
                tracing::info!("removed {} (left by a crashed writer)", f.display());
            }
        }
        self.output(move |parts, ctx| {
            let mut buf = Vec::new();
            for x in parts.iter().flatten() {
                let _ = writeln!(buf, "{x}");
            }
            let batch = cairn_checkpoint::BatchId(ctx.info.batch_id);
            let path = paths.sink_part(batch);
            // Object stores put atomically. A local directory gets a staging file next to the
            // target from object_store, which a reader would take as data: write under
            // `_staging/` and rename into place instead.
            let written = match loc.local_dir {
                None => put_text(&loc, &path, buf),
                Some(_) => {
                    let staged = paths.sink_staging(batch);
                    put_text(&loc, &staged, buf).and_then(|()| {
                        block_on(loc.store.rename(&staged, &path)).map_err(|e| Error::Sink {
                            sink: loc.label.clone(),
                            batch: 0,
                            message: format!("cannot move {staged} to {path}: {e}"),
                        })
                    })
                }
            };
            written.map_err(|e| match e {
                Error::Sink { sink, message, .. } => Error::Sink { sink, batch: ctx.info.batch_id, message },
                other => other,
            })
        });
        Ok(())
    }
}

/// Reads a file sink's output: `(batch id, lines)` for every batch written, in batch order.
pub fn read_text_output(location: &str) -> Result<Vec<(u64, Vec<String>)>> {
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
        out.push((batch.0, text.lines().map(str::to_string).collect()));
    }
    out.sort_by_key(|(b, _)| *b);
    Ok(out)
}
