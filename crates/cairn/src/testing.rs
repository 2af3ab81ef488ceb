//! Helpers for tests and examples.

use crate::api::dstream::DStream;
use crate::graph::Data;
use std::sync::{Arc, Mutex};

/// Collects every batch of a stream (one `Vec` per batch, partitions concatenated).
///
/// ```
/// # use cairn::StreamingContext;
/// let ctx = StreamingContext::builder().build().unwrap();
/// let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
/// let out = cairn::testing::collect(&s);
/// q.push(vec![1]);
/// ctx.run_available().unwrap();
/// assert_eq!(*out.lock().unwrap(), vec![vec![1]]);
/// ```
pub fn collect<T: Data>(stream: &DStream<T>) -> Arc<Mutex<Vec<Vec<T>>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = out.clone();
    stream.foreach_batch(move |_, data| {
        o.lock().unwrap_or_else(|e| e.into_inner()).push(data);
        Ok(())
    });
    out
}
