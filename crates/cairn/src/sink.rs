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
        self.output(move |parts, ctx| {
            let mut buf = Vec::new();
            for x in parts.iter().flatten() {
                let _ = writeln!(buf, "{x}");
            }
            let path = paths.sink_part(cairn_checkpoint::BatchId(ctx.info.batch_id));
            put_text(&loc, &path, buf).map_err(|e| match e {
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
