//! The deterministic generator source.

use super::{Positions, Source};
use crate::graph::{Data, UserError};
use cairn_checkpoint::{OffsetRange, SourcePartition};

/// A deterministic generator: `rate` records per batch spread over `partitions`, record `o` of
/// partition `p` being `f(p, o)`. Replayable by offset, so it is the demo's and the crash tests'
/// input. With a `limit`, each partition stops after that many records.
pub struct Generator<F> {
    partitions: u32,
    rate: u64,
    limit: Option<u64>,
    f: F,
}

impl<T: Data, F: Fn(u32, u64) -> T + Send + Sync + 'static> Generator<F> {
    /// `rate` records per batch over `partitions` partitions.
    pub fn new(partitions: u32, rate: u64, f: F) -> Self {
        Self { partitions: partitions.max(1), rate, limit: None, f }
    }
    /// Stops each partition after `per_partition` records in total.
    pub fn limit(mut self, per_partition: u64) -> Self {
        self.limit = Some(per_partition);
        self
    }
}

impl<T: Data, F: Fn(u32, u64) -> T + Send + Sync + 'static> Source for Generator<F> {
    type Item = T;
    fn plan(&self, positions: &Positions) -> std::result::Result<Vec<OffsetRange>, UserError> {
        let n = self.partitions as u64;
        let mut out = Vec::new();
        for p in 0..self.partitions {
            let key = SourcePartition::named(p.to_string());
            let start = positions.get(&key).copied().unwrap_or(0);
            let share = self.rate / n + u64::from((p as u64) < self.rate % n);
            let mut end = start + share;
            if let Some(l) = self.limit {
                end = end.min(l.max(start));
            }
            if end > start {
                out.push(OffsetRange { partition: key, start, end });
            }
        }
        Ok(out)
    }
    fn read(&self, r: &OffsetRange) -> std::result::Result<Vec<T>, UserError> {
        let p: u32 = r
            .partition
            .as_named()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("not a generator partition: {}", r.partition))?;
        Ok((r.start..r.end).map(|o| (self.f)(p, o)).collect())
    }
}
