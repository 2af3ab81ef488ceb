//! Output operations: what makes a job compute a stream once per batch (writing to a sink,
//! `foreach_batch`, text files, printing).

use super::dstream::DStream;
use crate::error::Result;
use crate::graph::{BatchInfo, Data, UserError};
use crate::sinks::{self, ForeachBatch, Sink, TextFileSink};
use std::fmt::{Debug, Display};

impl<T: Data> DStream<T> {
    /// Writes every batch to `sink`: open, each partition, commit (see [`Sink`]). A sink error
    /// fails the batch, which is not committed and replays with the same id after a restart.
    pub fn write_to(&self, sink: impl Sink<T>) {
        if !sink.fences_tasks() {
            self.graph.lock().unfenced_sinks.push(sink.name().to_string());
        }
        self.output(move |parts, ctx| sinks::write_batch(&sink, parts, ctx));
    }

    /// Calls `f` with every batch's id, time and elements (in partition order). An error fails
    /// the batch: it is not committed, and replays with the same id after a restart. Sugar for
    /// [`write_to`](Self::write_to) with a sink that gathers the partitions and calls `f` at
    /// commit.
    pub fn foreach_batch(
        &self,
        f: impl FnMut(&BatchInfo, Vec<T>) -> std::result::Result<(), UserError> + Send + 'static,
    ) {
        let name = format!("foreach_batch#{}", self.output_count());
        self.write_to(ForeachBatch::new(name, f));
    }

    /// Prints the first `n` elements of every batch to stdout.
    pub fn print(&self, n: usize)
    where
        T: Debug,
    {
        self.output(move |parts, ctx| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "-------------------------------------------");
            let _ = writeln!(out, "Batch {} (time {} ms)", ctx.info.batch_id, ctx.info.batch_time_ms);
            let _ = writeln!(out, "-------------------------------------------");
            let total: usize = parts.iter().map(Vec::len).sum();
            for x in parts.iter().flatten().take(n) {
                let _ = writeln!(out, "{x:?}");
            }
            if total > n {
                let _ = writeln!(out, "... ({} more)", total - n);
            }
            Ok(())
        });
    }
}

impl<T: Data + Display> DStream<T> {
    /// Writes every batch as `part-<batch id>.txt` (one element per line, partition order) under
    /// `location` (a local directory or object-store URL). Together with the batch log this is
    /// exactly-once: a batch replayed after a crash rewrites the same object with the same lines.
    /// Partitions are formatted in parallel. Read the output back with [`read_text_output`](crate::read_text_output).
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
    /// assert_eq!(batches, vec![(cairn::BatchId(0), vec!["10".to_string(), "20".to_string()])]);
    /// ```
    pub fn save_as_text_files(&self, location: &str) -> Result<()> {
        self.write_to(TextFileSink::open(location)?);
        Ok(())
    }
}
