//! `cairn-bench window`: a sliding window over KRA's input (see docs/benchmarks.md).
//!
//! Per key, the sum and count of its values over the last `--window` batches (default 30),
//! sliding by one batch and emitted every batch: `reduce_by_key_and_window` with an inverse
//! function. One run measures, on the same input and machine: the engine with a state checkpoint
//! every batch, the engine without state checkpoints, a hand-written single-threaded floor, and
//! the engine again with a short window (`--short-window`, default 5) to show what a slide costs
//! as the window grows. It checks the engine's last window against the floor's, prints a table
//! and, as its last line, one JSON object.

use super::{
    dir_objects, each_record, input_dir, input_files, parse, percentile, without_checkpoints, BoxError,
    InputArgs,
};
use cairn::{BatchProgress, CheckpointMaintained, StreamingContext, StreamingListener, Trigger};
use clap::Args;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args, Clone)]
pub(crate) struct WindowArgs {
    #[command(flatten)]
    gen: InputArgs,
    /// Window length in batches (the slide is one batch).
    #[arg(long, default_value_t = 30)]
    window: u64,
    /// The short window of the cost-per-slide comparison, in batches.
    #[arg(long, default_value_t = 5)]
    short_window: u64,
    /// Use existing input (`batch-NNNNNN.csv` files of `key,value` lines) instead of generating.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// A small version of everything (seconds).
    #[arg(long)]
    quick: bool,
}

/// Per key over the window: (sum, count).
type WindowMap = FxHashMap<u64, (i64, u64)>;

/// The floor: the tightest honest single-threaded loop over the same files. Each file is
/// memory-mapped and parsed in one pass over its bytes (KRA's floor parser) into this batch's
/// per-key partial aggregate; the partial is added into one map of window aggregates and kept;
/// once `window` partials are kept, the oldest is subtracted and a key whose count reaches 0 is
/// dropped. No engine, no checkpoint, and no copy of the window as output: the map is the
/// output. Returns (the last window, events, seconds).
fn floor(dir: &Path, window: usize) -> Result<(WindowMap, u64, f64), BoxError> {
    let files = input_files(dir)?;
    let t0 = Instant::now();
    let mut win: WindowMap = FxHashMap::default();
    let mut partials: VecDeque<WindowMap> = VecDeque::with_capacity(window + 1);
    let mut spare: Option<WindowMap> = None;
    let mut events = 0u64;
    for f in &files {
        let mut p = spare.take().unwrap_or_default();
        each_record(f, |k, v| {
            let e = p.entry(k).or_insert((0, 0));
            e.0 += v;
            e.1 += 1;
            events += 1;
        })?;
        for (&k, &(s, c)) in &p {
            let e = win.entry(k).or_insert((0, 0));
            e.0 += s;
            e.1 += c;
        }
        partials.push_back(p);
        if partials.len() > window {
            let mut old = partials.pop_front().expect("more than window partials");
            for (k, (s, c)) in old.drain() {
                if let Some(e) = win.get_mut(&k) {
                    e.1 -= c;
                    if e.1 == 0 {
                        win.remove(&k);
                    } else {
                        e.0 -= s;
                    }
                }
            }
            spare = Some(old); // its allocation serves the next batch
        }
    }
    Ok((win, events, t0.elapsed().as_secs_f64()))
}

/// What the listener records of one engine run.
#[derive(Default)]
struct Recorded {
    /// Per batch: (processing ms, checkpoint ms on the batch path, checkpoint bytes cut
    /// (uncompressed), the window operator's live keys).
    batches: Vec<(f64, f64, u64, u64)>,
    /// Bytes of the full snapshots compacted in the background.
    compacted: Vec<u64>,
    last_batch_at: Option<Instant>,
}

struct Recorder(Mutex<Recorded>);

impl StreamingListener for Recorder {
    fn on_batch_completed(&self, p: &BatchProgress) {
        let op = p.operators.iter().find(|o| o.name == "win");
        let mut r = self.0.lock().expect("lock");
        r.batches.push((p.processing_ms, p.checkpoint_ms, p.checkpoint_bytes, op.map_or(0, |o| o.keys)));
        r.last_batch_at = Some(Instant::now());
    }
    fn on_checkpoint_maintained(&self, e: &CheckpointMaintained) {
        if let Some(b) = e.compacted_bytes {
            self.0.lock().expect("lock").compacted.push(b);
        }
    }
}

struct EngineRun {
    events_per_s: f64,
    rec: Recorded,
    summary: cairn::RunSummary,
    /// The output of the last batch: the last window.
    last: WindowMap,
}

impl EngineRun {
    /// Per-batch latency (processing + checkpoint on the batch path).
    fn batch_ms(&self) -> Vec<f64> {
        self.rec.batches.iter().map(|b| b.0 + b.1).collect()
    }

    /// Over the batches from `from` on (a full window): (mean processing ms, median checkpoint
    /// bytes cut per batch). The median leaves out a full snapshot cut on the batch path.
    fn steady(&self, from: usize) -> (f64, f64) {
        let b = &self.rec.batches[from.min(self.rec.batches.len())..];
        let n = b.len().max(1) as f64;
        let bytes: Vec<f64> = b.iter().map(|x| x.2 as f64).collect();
        (b.iter().map(|x| x.0).sum::<f64>() / n, percentile(&bytes, 0.5))
    }
}

fn builder() -> cairn::StreamingContextBuilder {
    StreamingContext::builder()
        .app_name("window")
        .batch_interval(Duration::from_secs(1))
        .trigger(Trigger::AvailableNow)
}

/// `checkpoint`: a directory, checkpointed every batch; `None`: `memory://` with a checkpoint
/// interval longer than the run (no state checkpoints).
fn run_engine(
    input: &Path,
    checkpoint: Option<&Path>,
    batches: u64,
    window: u64,
    events: u64,
) -> Result<EngineRun, BoxError> {
    let ctx = match checkpoint {
        Some(dir) => builder().checkpoint(dir.to_str().unwrap_or_default()).build()?,
        None => without_checkpoints(builder(), batches).build()?,
    };
    let rows = ctx.text_file_stream_parsed("input", input.to_str().unwrap_or_default(), 1, parse)?;
    let last = Arc::new(Mutex::new(Vec::new()));
    let l = last.clone();
    rows.map(|(k, v)| (k, (v, 1u64)))
        .reduce_by_key_and_window(
            "win",
            |a: (i64, u64), b: (i64, u64)| (a.0 + b.0, a.1 + b.1),
            Some(|a: (i64, u64), b: (i64, u64)| (a.0 - b.0, a.1 - b.1)),
            Duration::from_secs(window),
            Duration::from_secs(1),
        )
        .foreach_batch(move |_, out| {
            // Moved, not copied: only the last batch's window is kept.
            *l.lock().expect("lock") = out;
            Ok(())
        });
    let rec = Arc::new(Recorder(Mutex::new(Recorded::default())));
    ctx.add_listener(rec.clone());
    let t0 = Instant::now();
    let summary = ctx.run_available()?;
    let rec = std::mem::take(&mut *rec.0.lock().expect("lock"));
    let end = rec.last_batch_at.unwrap_or_else(Instant::now);
    let secs = (end - t0).as_secs_f64().max(1e-9);
    let last = std::mem::take(&mut *last.lock().expect("lock")).into_iter().collect();
    Ok(EngineRun { events_per_s: events as f64 / secs, rec, summary, last })
}

pub(crate) fn window(mut a: WindowArgs) -> Result<(), BoxError> {
    if a.quick {
        a.gen.keys = a.gen.keys.min(10_000);
        a.gen.batches = a.gen.batches.min(20);
        a.gen.rows = a.gen.rows.min(20_000);
        a.window = a.window.min(8);
        a.short_window = a.short_window.min(2);
    }
    if a.window == 0 || a.short_window == 0 {
        return Err("--window and --short-window must be at least 1 batch".into());
    }
    let tmp = tempfile::tempdir()?;
    let input = input_dir(tmp.path(), &a.input, &a.gen)?;
    let batches = input_files(&input)?.len() as u64;

    eprintln!("floor, window {}...", a.window);
    let (expected, events, floor_s) = floor(&input, a.window as usize)?;
    let floor_eps = events as f64 / floor_s;

    eprintln!("engine, window {}, checkpoint every batch...", a.window);
    let ckpt_dir = tmp.path().join("ckpt");
    let with = run_engine(&input, Some(&ckpt_dir), batches, a.window, events)?;
    let correct = with.last == expected;
    let (objects_total, bytes_total) = dir_objects(&ckpt_dir);

    eprintln!("engine, window {}, no state checkpoints...", a.window);
    let without = run_engine(&input, None, batches, a.window, events)?;
    let without_correct = without.last == expected;

    eprintln!("engine, window {}, checkpoint every batch, then without...", a.short_window);
    let short = run_engine(&input, Some(&tmp.path().join("ckpt-short")), batches, a.short_window, events)?;
    let short_without = run_engine(&input, None, batches, a.short_window, events)?;
    let (short_expected, _, _) = floor(&input, a.short_window as usize)?;
    let short_correct = short.last == short_expected && short_without.last == short_expected;

    // The cost of a slide once both windows are full: the same batches in every run.
    let from = a.window.max(a.short_window) as usize;
    let steady_batches = (batches as usize).saturating_sub(from);
    let (long_ms, long_bytes) = with.steady(from);
    let (long_nc_ms, _) = without.steady(from);
    let (short_ms, short_bytes) = short.steady(from);
    let (short_nc_ms, _) = short_without.steady(from);
    let compacted = |r: &EngineRun| {
        let c = &r.rec.compacted;
        (c.len(), c.iter().sum::<u64>() as f64 / c.len().max(1) as f64)
    };
    let (long_compactions, long_compacted) = compacted(&with);
    let (short_compactions, short_compacted) = compacted(&short);
    let keys_in_window = |r: &EngineRun| r.rec.batches.last().map_or(0, |b| b.3);
    let forced = |r: &EngineRun| r.summary.forced_full_snapshots;

    let s = &with.summary;
    let objects_per_batch = (s.checkpoint_objects + s.log_objects) as f64 / batches as f64;
    let ckpt_bytes_per_batch = s.checkpoint_bytes as f64 / batches as f64;
    let short_bytes_per_batch = short.summary.checkpoint_bytes as f64 / batches as f64;
    let batch_ms = with.batch_ms();
    let p50 = percentile(&batch_ms, 0.5);
    let p99 = percentile(&batch_ms, 0.99);
    let short_p99 = percentile(&short.batch_ms(), 0.99);
    let (w, sw) = (a.window, a.short_window);
    let rows: Vec<(String, String)> = vec![
        ("events".into(), events.to_string()),
        ("batches".into(), batches.to_string()),
        ("window / slide (batches)".into(), format!("{w} / 1")),
        ("keys in the last window".into(), expected.len().to_string()),
        ("events/s, checkpoint every batch".into(), format!("{:.0}", with.events_per_s)),
        ("events/s, no state checkpoints".into(), format!("{:.0}", without.events_per_s)),
        (
            "ratio checkpoint / no checkpoint".into(),
            format!("{:.3}", with.events_per_s / without.events_per_s),
        ),
        ("events/s, single-threaded floor".into(), format!("{floor_eps:.0}")),
        ("ratio engine / floor".into(), format!("{:.3}", with.events_per_s / floor_eps)),
        ("batch latency p50 / p99 ms".into(), format!("{p50:.1} / {p99:.1}")),
        ("checkpoint bytes per batch (stored)".into(), format!("{ckpt_bytes_per_batch:.0}")),
        ("new objects per batch (log + state)".into(), format!("{objects_per_batch:.2}")),
        ("objects in checkpoint location at end".into(), format!("{objects_total} ({bytes_total} bytes)")),
        (format!("slide cost, batches {from}..{batches}: window"), format!("{w:>12} {sw:>12}")),
        (
            "  keys in the window".into(),
            format!("{:>12} {:>12}", keys_in_window(&with), keys_in_window(&short)),
        ),
        ("  processing ms, no state checkpoints".into(), format!("{long_nc_ms:>12.1} {short_nc_ms:>12.1}")),
        ("  processing ms, checkpoint every batch".into(), format!("{long_ms:>12.1} {short_ms:>12.1}")),
        (
            "  checkpoint bytes cut, median (uncompressed)".into(),
            format!("{long_bytes:>12.0} {short_bytes:>12.0}"),
        ),
        (
            "  compactions, mean bytes".into(),
            format!(
                "{:>12} {:>12}",
                format!("{long_compactions} x {long_compacted:.0}"),
                format!("{short_compactions} x {short_compacted:.0}")
            ),
        ),
        (
            "  full snapshots forced on the batch path".into(),
            format!("{:>12} {:>12}", forced(&with), forced(&short)),
        ),
        ("  batch latency p99 ms (all batches)".into(), format!("{p99:>12.1} {short_p99:>12.1}")),
        (
            "  stored bytes per batch (all batches)".into(),
            format!("{ckpt_bytes_per_batch:>12.0} {short_bytes_per_batch:>12.0}"),
        ),
        ("last window equals the floor's".into(), (correct && without_correct && short_correct).to_string()),
    ];
    let mut out = std::io::stdout().lock();
    for (k, v) in &rows {
        writeln!(out, "{k:<45} {v}")?;
    }
    let json = serde_json::json!({
        "events": events,
        "batches": batches,
        "window": w,
        "keys_in_window": expected.len(),
        "events_per_s": with.events_per_s.round(),
        "events_per_s_no_ckpt": without.events_per_s.round(),
        "ckpt_ratio": with.events_per_s / without.events_per_s,
        "floor_events_per_s": floor_eps.round(),
        "ratio_to_floor": with.events_per_s / floor_eps,
        "p50_batch_ms": p50,
        "p99_batch_ms": p99,
        "ckpt_bytes_per_batch": ckpt_bytes_per_batch.round(),
        "objects_per_batch": objects_per_batch,
        "ckpt_objects_total": objects_total,
        "slide_cost": {
            "from_batch": from,
            "batches": steady_batches,
            "windows": [w, sw],
            "processing_ms_no_ckpt": [long_nc_ms, short_nc_ms],
            "processing_ms_ckpt": [long_ms, short_ms],
            "ckpt_bytes_cut_median": [long_bytes.round(), short_bytes.round()],
            "forced_full_snapshots": [forced(&with), forced(&short)],
            "p99_batch_ms": [p99, short_p99],
            "compactions": [long_compactions, short_compactions],
            "compacted_bytes_mean": [long_compacted.round(), short_compacted.round()],
            "stored_bytes_per_batch": [ckpt_bytes_per_batch.round(), short_bytes_per_batch.round()],
        },
        "correct": correct && without_correct && short_correct,
    });
    writeln!(out, "{json}")?;
    if !(correct && without_correct && short_correct) {
        return Err("the engine's last window differs from the floor's".into());
    }
    Ok(())
}
