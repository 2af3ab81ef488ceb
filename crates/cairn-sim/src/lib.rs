//! Fault-injection harness for cairn: the crash job (a real process the tests kill), its
//! independently computed expected output, and helpers to read what it left behind.
//!
//! The crash job reads a deterministic generator, keeps per-key running `(count, sum)` with
//! `map_with_state` and per-key sums over a sliding window with `reduce_by_key_and_window`, and
//! writes both through the exactly-once file sink. [`expected_totals`] and [`expected_windows`]
//! compute what those sinks must contain with plain loops, sharing no code with the engine.

pub mod azure;
mod faulty;
pub mod fixture;
pub mod kafka;
pub mod kafka_log;
pub mod postgres;
pub mod proxy;
pub mod s3;
pub mod tools;
pub use faulty::{FaultyStore, Requests};
pub use tools::Rng;

use cairn::{StateSpec, StreamingContext};
use std::collections::BTreeMap;
use std::time::Duration;

/// Generator partitions of the crash job.
pub const PARTITIONS: u32 = 3;
/// Window length and slide of the crash job, in batches.
pub const WINDOW_BATCHES: u64 = 3;

/// Parameters shared by the crash job and the model.
#[derive(Debug, Clone, Copy)]
pub struct JobParams {
    pub batches: u64,
    pub rate: u64,
    pub keys: u64,
}

/// Record `offset` of generator partition `partition`: `(key, value)`.
pub fn record(partition: u32, offset: u64, keys: u64) -> (u64, i64) {
    let mut x = ((partition as u64) << 40) ^ offset ^ 0x5bd1_e995;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    (x % keys, (x >> 33) as i64 % 1000 - 100)
}

/// The offsets of each partition in batch `b`: the generator gives every partition an equal
/// share of `rate` (the first `rate % partitions` partitions one more).
fn batch_records(p: &JobParams, b: u64) -> Vec<(u64, i64)> {
    let n = PARTITIONS as u64;
    let mut out = Vec::new();
    for part in 0..PARTITIONS {
        let share = p.rate / n + u64::from((part as u64) < p.rate % n);
        for o in b * share..(b + 1) * share {
            out.push(record(part, o, p.keys));
        }
    }
    out
}

/// Expected lines of the totals sink per batch (sorted): `key,count,sum` after each record.
pub fn expected_totals(p: &JobParams) -> Vec<Vec<String>> {
    let mut state: BTreeMap<u64, (u64, i64)> = BTreeMap::new();
    (0..p.batches)
        .map(|b| {
            let mut lines: Vec<String> = batch_records(p, b)
                .into_iter()
                .map(|(k, v)| {
                    let s = state.entry(k).or_insert((0, 0));
                    s.0 += 1;
                    s.1 += v;
                    format!("{k},{},{}", s.0, s.1)
                })
                .collect();
            lines.sort();
            lines
        })
        .collect()
}

/// Expected final state of the totals operator.
pub fn expected_final_state(p: &JobParams) -> BTreeMap<u64, (u64, i64)> {
    let mut state = BTreeMap::new();
    for b in 0..p.batches {
        for (k, v) in batch_records(p, b) {
            let s: &mut (u64, i64) = state.entry(k).or_insert((0, 0));
            s.0 += 1;
            s.1 += v;
        }
    }
    state
}

/// Expected lines of the window sink per batch (sorted): `key,sum` over the last
/// [`WINDOW_BATCHES`] batches, for keys present in the window.
pub fn expected_windows(p: &JobParams) -> Vec<Vec<String>> {
    let per_batch: Vec<BTreeMap<u64, i64>> = (0..p.batches)
        .map(|b| {
            let mut m = BTreeMap::new();
            for (k, v) in batch_records(p, b) {
                *m.entry(k).or_insert(0) += v;
            }
            m
        })
        .collect();
    (0..p.batches as usize)
        .map(|b| {
            let from = (b + 1).saturating_sub(WINDOW_BATCHES as usize);
            let mut sums: BTreeMap<u64, i64> = BTreeMap::new();
            for m in &per_batch[from..=b] {
                for (k, v) in m {
                    *sums.entry(*k).or_insert(0) += v;
                }
            }
            let mut lines: Vec<String> = sums.into_iter().map(|(k, v)| format!("{k},{v}")).collect();
            lines.sort();
            lines
        })
        .collect()
}

/// Batch interval of the crash job.
pub const INTERVAL: Duration = Duration::from_millis(10);

/// Defines the crash job's graph on `ctx`: generator → running totals (`map_with_state`
/// "totals") → file sink `out_totals`, and generator → per-key window sums
/// (`reduce_by_key_and_window` "window-sums", [`WINDOW_BATCHES`] long, sliding every batch) →
/// file sink `out_windows`.
pub fn define_job(
    ctx: &StreamingContext,
    p: &JobParams,
    out_totals: &str,
    out_windows: &str,
) -> cairn::Result<()> {
    let keys = p.keys.max(1);
    let events = ctx.generator("events", PARTITIONS, p.rate, move |part, o| record(part, o, keys))?;
    events
        .map_with_state(
            "totals",
            StateSpec::function(|k: &u64, v: Option<i64>, st| {
                let (c, s) = st.get().copied().unwrap_or((0u64, 0i64));
                let next = (c + 1, s + v.unwrap_or(0));
                st.update(next);
                format!("{k},{},{}", next.0, next.1)
            }),
        )
        .save_as_text_files(out_totals)?;
    let w = INTERVAL * WINDOW_BATCHES as u32;
    events
        .reduce_by_key_and_window("window-sums", |a, b| a + b, Some(|a: i64, b: i64| a - b), w, INTERVAL)
        .map(|(k, v)| format!("{k},{v}"))
        .save_as_text_files(out_windows)?;
    Ok(())
}

/// The crash job ([`define_job`]) in process on `store`: `p.batches` batches, run as fast as they
/// go ([`cairn::Trigger::AvailableNow`]) on the [`INTERVAL`] grid; `adjust` sets anything else on
/// the builder (parallelism, checkpoint deferral, an app name).
pub fn job_on_store(
    store: cairn::checkpoint::CheckpointStore,
    p: &JobParams,
    out_totals: &str,
    out_windows: &str,
    adjust: impl FnOnce(cairn::StreamingContextBuilder) -> cairn::StreamingContextBuilder,
) -> cairn::Result<StreamingContext> {
    let builder = StreamingContext::builder()
        .batch_interval(INTERVAL)
        .checkpoint_store(store)
        .trigger(cairn::Trigger::AvailableNow)
        .stop_after_batches(p.batches);
    let ctx = adjust(builder).build()?;
    define_job(&ctx, p, out_totals, out_windows)?;
    Ok(ctx)
}

/// Asserts that a reader of the output directory that skips hidden names (`.` and `_` first, as
/// Spark and Hive do) sees only complete `part-<batch>.txt` files: no staging file of a write a
/// crash interrupted carries a data name.
pub fn check_no_visible_debris(dir: &str) {
    for e in std::fs::read_dir(dir).expect("read the output directory") {
        let name = e.expect("entry").file_name().to_string_lossy().into_owned();
        if name.starts_with('_') || name.starts_with('.') {
            continue;
        }
        let digits = name.strip_prefix("part-").and_then(|n| n.strip_suffix(".txt"));
        assert!(
            digits.is_some_and(|d| d.len() == 20 && d.bytes().all(|c| c.is_ascii_digit())),
            "{dir}: {name:?} is visible to readers but is not a complete output file"
        );
    }
}

/// Asserts that both sinks hold every batch exactly once with exactly the model's lines.
pub fn check_sink_output(out_totals: &str, out_windows: &str, p: &JobParams) {
    for (dir, expected) in [(out_totals, expected_totals(p)), (out_windows, expected_windows(p))] {
        check_no_visible_debris(dir);
        let got = cairn::read_text_output(dir).expect("read sink output");
        let ids: Vec<u64> = got.iter().map(|(b, _)| b.0).collect();
        assert_eq!(ids, (0..p.batches).collect::<Vec<_>>(), "{dir}: every batch exactly once");
        for ((b, mut lines), want) in got.into_iter().zip(expected) {
            lines.sort();
            assert_eq!(
                lines.len(),
                want.len(),
                "{dir}: batch {b} has {} lines, expected {}",
                lines.len(),
                want.len()
            );
            assert!(lines == want, "{dir}: batch {b} differs from the expected output");
        }
    }
}

/// Asserts that the final checkpoint at `location` holds exactly the model's final state.
pub fn check_final_state(location: &str, p: &JobParams) {
    let store = cairn_checkpoint::CheckpointStore::open(location).expect("open checkpoint");
    let rec = store.recover().expect("recover");
    assert!(rec.replay.is_empty(), "a clean stop leaves nothing to replay");
    let state = rec.state.expect("a final checkpoint exists");
    assert_eq!(state.batch_id.0, p.batches - 1, "final checkpoint is after the last batch");
    let table = state.tables.iter().find(|t| t.id == "totals").expect("totals table");
    let mut got = BTreeMap::new();
    for e in table.reader() {
        let (k, v) = e.expect("entry");
        let key: u64 = postcard::from_bytes(k).expect("key");
        let (value, _seen): ((u64, i64), i64) = postcard::from_bytes(v.expect("live entry")).expect("value");
        got.insert(key, value);
    }
    assert_eq!(got, expected_final_state(p), "final state");
}
