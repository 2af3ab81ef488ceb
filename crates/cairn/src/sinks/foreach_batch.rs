//! The sink behind `DStream::foreach_batch`: gathers a batch's partitions and hands them to a
//! closure at commit.

use super::{BatchContext, BatchWrite, Sink};
use crate::graph::{BatchInfo, Data, UserError};
use std::sync::Mutex;

/// The sink behind [`DStream::foreach_batch`](crate::DStream::foreach_batch).
pub(crate) struct ForeachBatch<T, F> {
    name: String,
    f: Mutex<F>,
    parts: Mutex<Vec<(usize, Vec<T>)>>,
}

impl<T, F> ForeachBatch<T, F> {
    pub(crate) fn new(name: String, f: F) -> Self {
        Self { name, f: Mutex::new(f), parts: Mutex::new(Vec::new()) }
    }

    fn take_parts(&self) -> Vec<(usize, Vec<T>)> {
        std::mem::take(&mut *self.parts.lock().unwrap_or_else(|e| e.into_inner()))
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
        self.take_parts();
        Ok(BatchWrite::Write)
    }
    fn write_partition(
        &self,
        _: &BatchContext,
        i: usize,
        data: Vec<T>,
    ) -> std::result::Result<(), UserError> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).push((i, data));
        Ok(())
    }
    fn commit(&self, batch: &BatchContext) -> std::result::Result<(), UserError> {
        let mut parts = self.take_parts();
        parts.sort_by_key(|(i, _)| *i);
        let data: Vec<T> = parts.into_iter().flat_map(|(_, p)| p).collect();
        let mut f = self.f.lock().unwrap_or_else(|e| e.into_inner());
        f(&batch.info(), data)
    }
    fn abort(&self, _: &BatchContext) {
        self.take_parts();
    }
}
