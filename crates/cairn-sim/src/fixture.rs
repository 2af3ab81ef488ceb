//! The fixture job: a small job that uses every kind of stored state (map_with_state with a
//! timeout, update_state_by_key, windows with and without an inverse, count_by_window, a plain
//! window, a generator's and a text-file source's positions). Checkpoint locations it wrote with
//! each released format are committed under `crates/cairn-sim/fixtures/` and restored by
//! `tests/fixtures.rs`, so every later build proves it still reads them.

use cairn::{Clock, StateSpec, StreamingContext, Trigger};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Batch interval of the fixture job.
pub const FIXTURE_INTERVAL: Duration = Duration::from_millis(10);

/// The text files the fixture job's file source reads, one per batch for the first batches.
pub const FIXTURE_INPUT_FILES: usize = 8;

/// The sink directories of the fixture job, relative to its root's `out/`.
pub const FIXTURE_SINKS: [&str; 6] = ["sessions", "totals", "wsum", "wcount", "wlast", "words"];

/// Where the fixture job keeps its checkpoint, input and outputs under one root.
#[derive(Debug, Clone)]
pub struct FixtureDirs {
    pub root: PathBuf,
}

impl FixtureDirs {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The checkpoint location.
    pub fn checkpoint(&self) -> String {
        self.root.join("checkpoint").display().to_string()
    }
    /// The text source's directory.
    pub fn input(&self) -> PathBuf {
        self.root.join("input")
    }
    /// One sink's output directory.
    pub fn out(&self, sink: &str) -> String {
        self.root.join("out").join(sink).display().to_string()
    }
}

/// Writes the text source's input files (deterministic content).
pub fn write_fixture_input(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let words = ["ash", "birch", "cedar", "elm", "fir", "oak"];
    for f in 0..FIXTURE_INPUT_FILES {
        let lines: Vec<String> = (0..5).map(|i| words[(f * 3 + i * 5) % words.len()].to_string()).collect();
        std::fs::write(dir.join(format!("in-{f:03}.txt")), lines.join("\n") + "\n")?;
    }
    Ok(())
}

/// A generator record: keys drift with the offset so that keys go idle and time out.
fn fixture_record(partition: u32, offset: u64) -> (u64, i64) {
    ((offset / 4 + partition as u64) % 9, (offset * 7 + partition as u64 * 3) as i64 % 23 - 5)
}

/// Builds the fixture job's context on `dirs`, stopping once `batches` batches exist. A job
/// created with `clock` starts its batch-time grid there (a fresh run comparable with a fixture
/// byte for byte starts where the fixture started).
pub fn fixture_context(
    dirs: &FixtureDirs,
    batches: u64,
    clock: Option<Arc<dyn Clock>>,
) -> cairn::Result<StreamingContext> {
    StreamingContext::get_or_create(&dirs.checkpoint(), |loc| {
        let mut builder = StreamingContext::builder();
        if let Some(c) = clock {
            builder = builder.clock(c);
        }
        let ctx = builder
            .app_name("fixture-job")
            .batch_interval(FIXTURE_INTERVAL)
            .checkpoint(loc)
            .checkpoint_interval(FIXTURE_INTERVAL * 2)
            .parallelism(2)
            .keep_checkpoints(3)
            .full_snapshot_every(2)
            .trigger(Trigger::AvailableNow)
            .stop_after_batches(batches)
            .build()?;
        define_fixture_job(&ctx, dirs)?;
        Ok(ctx)
    })
}

fn define_fixture_job(ctx: &StreamingContext, dirs: &FixtureDirs) -> cairn::Result<()> {
    let events = ctx.generator("gen", 2, 12, fixture_record)?;
    events
        .map_with_state(
            "sessions",
            StateSpec::function(|k: &u64, v: Option<i64>, st| {
                if st.is_timing_out() {
                    return format!("{k},timeout");
                }
                let n = st.get().copied().unwrap_or(0i64) + v.unwrap_or(0);
                st.update(n);
                format!("{k},{n}")
            })
            .timeout(FIXTURE_INTERVAL * 2),
        )
        .save_as_text_files(&dirs.out("sessions"))?;
    events
        .update_state_by_key("totals", |_k, vs: Vec<i64>, old: Option<(u64, i64)>| {
            let (c, s) = old.unwrap_or((0, 0));
            Some((c + vs.len() as u64, s + vs.iter().sum::<i64>()))
        })
        .map(|(k, (c, s))| format!("{k},{c},{s}"))
        .save_as_text_files(&dirs.out("totals"))?;
    events
        .reduce_by_key_and_window(
            "wsum",
            |a, b| a + b,
            Some(|a: i64, b: i64| a - b),
            FIXTURE_INTERVAL * 3,
            FIXTURE_INTERVAL,
        )
        .map(|(k, v)| format!("{k},{v}"))
        .save_as_text_files(&dirs.out("wsum"))?;
    events
        .filter(|(k, _)| *k < 3)
        .count_by_window("wcount", FIXTURE_INTERVAL * 2, FIXTURE_INTERVAL)
        .map(|c| c.to_string())
        .save_as_text_files(&dirs.out("wcount"))?;
    events
        .map(|(k, v)| k as i64 * 100 + v)
        .window("wlast", FIXTURE_INTERVAL * 2, FIXTURE_INTERVAL * 2)
        .map(|x| x.to_string())
        .save_as_text_files(&dirs.out("wlast"))?;
    let input = dirs.input().display().to_string();
    ctx.text_file_stream("lines", &input, 1)?
        .map(|w| (w, 1u64))
        .update_state_by_key("words", |_w, vs: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + vs.iter().sum::<u64>())
        })
        .map(|(w, n)| format!("{w},{n}"))
        .save_as_text_files(&dirs.out("words"))?;
    Ok(())
}
