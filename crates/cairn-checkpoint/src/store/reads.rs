//! Timing of the reads a store makes (recovery, compaction, plan and metadata reads), so a job
//! can say what a restore of its newest checkpoint would cost on this storage right now.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Reads at or under this size are dominated by the request's latency, larger ones by transfer.
const SMALL_READ: u64 = 64 * 1024;

/// Counters of completed reads; shared by every clone of a store.
#[derive(Debug, Default)]
pub(crate) struct ReadTimes {
    small_reads: AtomicU64,
    small_nanos: AtomicU64,
    large_reads: AtomicU64,
    large_nanos: AtomicU64,
    large_bytes: AtomicU64,
}

impl ReadTimes {
    pub(crate) fn record(&self, bytes: u64, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        if bytes <= SMALL_READ {
            self.small_reads.fetch_add(1, Ordering::Relaxed);
            self.small_nanos.fetch_add(nanos, Ordering::Relaxed);
        } else {
            self.large_reads.fetch_add(1, Ordering::Relaxed);
            self.large_nanos.fetch_add(nanos, Ordering::Relaxed);
            self.large_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub(crate) fn rates(&self) -> Option<ReadRates> {
        let small = (self.small_reads.load(Ordering::Relaxed), self.small_nanos.load(Ordering::Relaxed));
        let large = (
            self.large_reads.load(Ordering::Relaxed),
            self.large_nanos.load(Ordering::Relaxed),
            self.large_bytes.load(Ordering::Relaxed),
        );
        ReadRates::from_totals(small, large)
    }
}

/// Measured read performance of a location: per-request latency and transfer bandwidth.
///
/// ```
/// use cairn_checkpoint::store::ReadRates;
/// let r = ReadRates { latency_ms: 20.0, bytes_per_s: 50e6 };
/// // Five objects of 1 MB: five round trips and 5 MB of transfer.
/// assert_eq!(r.estimate_ms(5, 5_000_000).round(), 200.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadRates {
    /// Mean time of a small read (the request's round trip).
    pub latency_ms: f64,
    /// Bytes per second of large reads, their round trips taken out.
    pub bytes_per_s: f64,
}

impl ReadRates {
    /// Small reads give the latency; large reads, less one latency each, the bandwidth. With no
    /// small read yet, the latency is taken as zero (large reads then give a bandwidth that
    /// includes their latency, which errs on the slow side); with no large read, transfer is
    /// taken as free beyond what the small reads cost.
    fn from_totals(small: (u64, u64), large: (u64, u64, u64)) -> Option<Self> {
        let (n_small, small_ns) = small;
        let (n_large, large_ns, large_bytes) = large;
        if n_small == 0 && n_large == 0 {
            return None;
        }
        let latency_ms = if n_small > 0 { small_ns as f64 / n_small as f64 / 1e6 } else { 0.0 };
        let bytes_per_s = if n_large > 0 {
            let transfer_s = (large_ns as f64 / 1e9 - n_large as f64 * latency_ms / 1e3).max(1e-6);
            large_bytes as f64 / transfer_s
        } else {
            f64::INFINITY
        };
        Some(Self { latency_ms, bytes_per_s })
    }

    /// Time to read `objects` objects of `bytes` in all, one after another.
    pub fn estimate_ms(&self, objects: u64, bytes: u64) -> f64 {
        objects as f64 * self.latency_ms + bytes as f64 / self.bytes_per_s * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_from_small_reads_bandwidth_from_large_ones() {
        let t = ReadTimes::default();
        assert!(t.rates().is_none());
        t.record(100, Duration::from_millis(10));
        t.record(200, Duration::from_millis(30));
        // 10 MB in 120 ms, 20 ms of which is its round trip: 100 MB/s.
        t.record(10_000_000, Duration::from_millis(120));
        let r = t.rates().unwrap();
        assert!((r.latency_ms - 20.0).abs() < 1e-9, "{r:?}");
        assert!((r.bytes_per_s - 100e6).abs() < 1.0, "{r:?}");
        assert!((r.estimate_ms(3, 1_000_000) - 70.0).abs() < 1e-6);
    }

    #[test]
    fn one_kind_of_read_is_enough_for_an_estimate() {
        let t = ReadTimes::default();
        t.record(10, Duration::from_millis(5));
        assert_eq!(t.rates().unwrap().estimate_ms(4, 1 << 20), 20.0);
        let t = ReadTimes::default();
        t.record(1_000_000, Duration::from_millis(10));
        let r = t.rates().unwrap();
        assert_eq!(r.latency_ms, 0.0);
        assert!((r.estimate_ms(1, 1_000_000) - 10.0).abs() < 1e-6);
    }
}
