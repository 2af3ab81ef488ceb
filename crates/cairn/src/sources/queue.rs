//! The in-memory queue source behind `StreamingContext::queue_stream`.

use super::{Positions, Source};
use crate::graph::{Data, UserError};
use cairn_checkpoint::{OffsetRange, SourcePartition};
use std::sync::{Arc, Mutex};

/// Pushes batches into a [`queue_stream`](crate::StreamingContext::queue_stream); each pushed
/// `Vec` becomes one batch. In memory only: for tests and examples.
pub struct QueueHandle<T> {
    chunks: Arc<Mutex<Vec<Vec<T>>>>,
}

impl<T> Clone for QueueHandle<T> {
    fn clone(&self) -> Self {
        Self { chunks: self.chunks.clone() }
    }
}

impl<T: Data> QueueHandle<T> {
    /// Queues one batch of records.
    pub fn push(&self, batch: Vec<T>) {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
    }
}

pub(crate) struct QueueSource<T> {
    chunks: Arc<Mutex<Vec<Vec<T>>>>,
}

pub(crate) fn queue<T: Data>() -> (QueueHandle<T>, QueueSource<T>) {
    let chunks = Arc::new(Mutex::new(Vec::new()));
    (QueueHandle { chunks: chunks.clone() }, QueueSource { chunks })
}

impl<T: Data> Source for QueueSource<T> {
    type Item = T;
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError> {
        let partition = SourcePartition::named("queue");
        let next = positions.get(&partition).copied().unwrap_or(0);
        let len = self.chunks.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        Ok(if next < len { vec![OffsetRange { partition, start: next, end: next + 1 }] } else { vec![] })
    }
    fn read(&self, r: &OffsetRange) -> std::result::Result<Vec<T>, UserError> {
        let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for i in r.start..r.end {
            out.extend(
                chunks
                    .get(i as usize)
                    .ok_or("queue chunk no longer available (the queue is not durable)")?
                    .iter()
                    .cloned(),
            );
        }
        Ok(out)
    }
}
