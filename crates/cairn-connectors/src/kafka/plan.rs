//! Planning one partition's next range: pure logic, no broker calls, so every case (a first
//! sight, retention gaps, a recreated topic) is unit-tested without a broker.

use cairn::{OffsetRange, SourcePartition};

/// What the broker says about a partition right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Watermarks {
    /// The oldest offset still stored.
    pub low: i64,
    /// The offset the next produced record will get.
    pub high: i64,
}

/// The plan for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionPlan {
    /// The range to read; empty when there is nothing new. `None`: nothing to plan (the position
    /// is known and no records arrived).
    pub range: Option<OffsetRange>,
    /// Records that were skipped because the broker no longer has them (`skip_lost` only).
    pub lost: u64,
}

/// Plans `[start, min(high, start + max))` for `partition`.
///
/// `position` is the next offset from the checkpoint; `initial` is where a partition without a
/// position starts (already resolved from the source's start setting). A partition seen for the
/// first time always gets a range, possibly empty, so that its start is logged in the plan and a
/// `Latest` start cannot drift forward between plans.
pub(crate) fn plan_partition(
    partition: &SourcePartition,
    position: Option<u64>,
    initial: i64,
    w: Watermarks,
    max: u64,
    skip_lost: bool,
) -> Result<PartitionPlan, String> {
    let first_sight = position.is_none();
    let mut start = position.map_or(initial, |p| p as i64);
    let mut lost = 0;
    if start < w.low {
        let gone = (w.low - start) as u64;
        if !skip_lost {
            return Err(format!(
                "partition {partition}: offsets {start}..{} were deleted by the broker's retention \
                 ({gone} records lost); set skip_lost_records(true) to go on from offset {}",
                w.low, w.low
            ));
        }
        tracing::warn!(
            "partition {partition}: skipping {gone} records deleted by retention (offsets {start}..{})",
            w.low
        );
        lost = gone;
        start = w.low;
    } else if start > w.high {
        // The log is shorter than what was already read: the topic was deleted and recreated, or
        // an unclean leader election truncated it. Reading on would silently skip the new records.
        if !skip_lost {
            return Err(format!(
                "partition {partition}: the next offset {start} is beyond the broker's end offset {} \
                 (topic recreated or truncated?); set skip_lost_records(true) to read it again \
                 from offset {}",
                w.high, w.low
            ));
        }
        tracing::warn!(
            "partition {partition}: next offset {start} is beyond the end offset {}; reading again from {}",
            w.high,
            w.low
        );
        start = w.low;
    }
    let end = w.high.min(start.saturating_add(i64::try_from(max).unwrap_or(i64::MAX)));
    let range = (end > start || first_sight).then(|| OffsetRange {
        partition: partition.clone(),
        start: start as u64,
        end: end.max(start) as u64,
    });
    Ok(PartitionPlan { range, lost })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(topic: &str, partition: i32) -> SourcePartition {
        SourcePartition::topic(topic, partition)
    }

    fn w(low: i64, high: i64) -> Watermarks {
        Watermarks { low, high }
    }

    fn range(p: &PartitionPlan) -> Option<(u64, u64)> {
        p.range.as_ref().map(|r| (r.start, r.end))
    }

    #[test]
    fn resumes_at_the_position_and_caps_the_range() {
        let p = plan_partition(&tp("t", 0), Some(40), 0, w(0, 100), 25, false).unwrap();
        assert_eq!(range(&p), Some((40, 65)));
        let p = plan_partition(&tp("t", 0), Some(90), 0, w(0, 100), 25, false).unwrap();
        assert_eq!(range(&p), Some((90, 100)));
    }

    #[test]
    fn nothing_new_plans_nothing_once_the_position_is_known() {
        let p = plan_partition(&tp("t", 0), Some(100), 0, w(0, 100), 25, false).unwrap();
        assert_eq!(p.range, None);
    }

    #[test]
    fn a_first_sight_pins_its_start_even_when_empty() {
        // A `Latest` start on an idle partition: an empty range at the end, logged in the plan.
        let p = plan_partition(&tp("t", 3), None, 100, w(0, 100), 25, false).unwrap();
        assert_eq!(range(&p), Some((100, 100)));
        let p = plan_partition(&tp("t", 3), None, 7, w(0, 100), 25, false).unwrap();
        assert_eq!(range(&p), Some((7, 32)));
    }

    #[test]
    fn deleted_offsets_stop_the_job_with_the_count() {
        let e = plan_partition(&tp("orders", 2), Some(10), 0, w(250, 300), 25, false).unwrap_err();
        assert!(e.contains("orders[2]") && e.contains("240 records lost") && e.contains("10..250"), "{e}");
        // An explicit start below the retained range is the same gap.
        let e = plan_partition(&tp("orders", 2), None, 5, w(250, 300), 25, false).unwrap_err();
        assert!(e.contains("245 records lost"), "{e}");
    }

    #[test]
    fn skipping_deleted_offsets_reports_how_many() {
        let p = plan_partition(&tp("orders", 2), Some(10), 0, w(250, 300), 25, true).unwrap();
        assert_eq!((range(&p), p.lost), (Some((250, 275)), 240));
    }

    #[test]
    fn a_log_shorter_than_the_position_is_an_error_unless_skipping() {
        let e = plan_partition(&tp("t", 0), Some(500), 0, w(0, 20), 25, false).unwrap_err();
        assert!(e.contains("beyond the broker's end offset 20"), "{e}");
        let p = plan_partition(&tp("t", 0), Some(500), 0, w(0, 20), 25, true).unwrap();
        assert_eq!(range(&p), Some((0, 20)));
    }
}
