//! The sink behind `DStream::foreach_batch`: gathers a batch's partitions and hands them to a
//! closure at commit.

use super::{BatchContext, BatchWrite, Gathered, Sink};
use crate::graph::{BatchInfo, Data, UserError};
use std::sync::Mutex;

/// The sink behind [`DStream::foreach_batch`](crate::DStream::foreach_batch).
pub(crate) struct ForeachBatch<T, F> {
    name: String,
    f: Mutex<F>,
    parts: Gathered<Vec<T>>,
}

impl<T, F> ForeachBatch<T, F> {
    pub(crate) fn new(name: String, f: F) -> Self {
        Self { name, f: Mutex::new(f), parts: Gathered::default() }
    }
}

impl<T: Data, F> Sink<T> for ForeachBatch<T, F>
where
    F: FnMut(&BatchInfo, Vec<T>) -> std::result::Result<(), UserError> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn open(&self, _: &BatchContext) -> std::result::Result<BatchWrite, UserError> {
        self.parts.clear();
        Ok(BatchWrite::Write)
    }
    fn write_partition(
        &self,
        _: &BatchContext,
        i: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError> {
        self.parts.push(i, data);
        Ok(())
    }
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError> {
        let data = self.parts.take();
        let mut f = self.f.lock().unwrap_or_else(|e| e.into_inner());
        f(&batch.info(), data)
    }
    fn abort(&self, _: &BatchContext) {
        self.parts.clear();
    }
}
