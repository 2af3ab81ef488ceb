//! `cairn-bench kra`: the keyed-running-aggregate benchmark (see docs/benchmarks.md).
//!
//! One run measures, on the same input and machine: the engine with a state checkpoint every
//! batch, the engine without state checkpoints, a hand-written single-threaded floor, recovery
//! after SIGKILL with a large state, and the engine on a checkpoint store that delays every state
//! write. It prints a table and, as its last line, one JSON object.
//!
//! `cairn-bench kafka`: Kafka through a stateful job into each sink (see `kafka.rs`).
//!
//! `cairn-bench ingest`: HTTP ingest through the write-ahead log (see `ingest.rs`).

mod ingest;
mod kafka;
mod recovery;
mod scale_out;
mod window;

use cairn::checkpoint::object_store::{local::LocalFileSystem, path::Path as ObjPath};
use cairn::checkpoint::CheckpointStore;
use cairn::{BatchProgress, StateSpec, StreamingContext, Trigger};
use cairn_sim::{FaultyStore, Rng};
use clap::{Args, Parser, Subcommand};
use rustc_hash::FxHashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "cairn-bench", about = "cairn benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Keyed running aggregate: per key count and sum over everything seen.
    Kra(KraArgs),
    /// Kafka -> per-key running totals -> no sink / PostgreSQL / Kafka, a checkpoint every batch.
    Kafka(kafka::KafkaArgs),
    /// The seed job scaled out: throughput on 1, 2, 3 processes, and the failover split.
    ScaleOut(scale_out::ScaleOutArgs),
    /// HTTP ingest on loopback: records/s acknowledged and acknowledgement latency, with the
    /// write-ahead log on disk and in memory.
    Ingest(ingest::IngestArgs),
    /// Per-key sum and count over a sliding window of 30 batches (slide 1) on KRA's input:
    /// `reduce_by_key_and_window` with an inverse function, against its own floor.
    Window(window::WindowArgs),
    /// Writes KRA input (`batch-NNNNNN.csv` files of `key,value` lines) for `kra --input` or a
    /// worker.
    KraInput {
        dir: PathBuf,
        #[command(flatten)]
        input: InputArgs,
        /// Zipf-skewed keys instead of uniform.
        #[arg(long)]
        zipf: bool,
    },
    /// (internal) one KRA job process, driven by the recovery measurement.
    #[command(hide = true)]
    KraWorker { input: PathBuf, checkpoint: PathBuf },
}

/// The generated input: `batches` files of `rows` `key,value` lines over `keys` keys.
#[derive(Args, Clone)]
struct InputArgs {
    /// Distinct keys in the generated input.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Batches (one input file each).
    #[arg(long, default_value_t = 50)]
    batches: u64,
    /// Rows per batch.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Seed of the generated input.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Args, Clone)]
struct KraArgs {
    #[command(flatten)]
    gen: InputArgs,
    /// Use existing input (`batch-NNNNNN.csv` files of `key,value` lines) instead of generating.
    #[arg(long)]
    input: Option<PathBuf>,
    /// A small version of everything (under a minute).
    #[arg(long)]
    quick: bool,
    /// Keys of state in the restore and memory measurements, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000u64, 10_000_000])]
    recovery_keys: Vec<u64>,
    /// Delay added to every storage request (plan log, state, listings, reads, deletes) in the
    /// storage-latency run, in ms.
    #[arg(long, default_value_t = 1_000)]
    delay_ms: u64,
    /// Batches of the storage-latency runs (the first files of the input).
    #[arg(long, default_value_t = 5)]
    delay_batches: u64,
    /// glibc's `MALLOC_ARENA_MAX` for the restore and memory workers (0: glibc's default, eight
    /// arenas per core, each keeping what its threads once used).
    #[arg(long, default_value_t = 2)]
    malloc_arena_max: u32,
    /// Also run KRA on 1 000 000 uniform keys and on Zipf-skewed keys (`--no-variants` to skip).
    #[arg(long = "no-variants", action = clap::ArgAction::SetFalse, default_value_t = true)]
    variants: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match Cli::parse().command {
        Cmd::Kra(a) => kra(a),
        Cmd::Kafka(a) => kafka::kafka(a),
        Cmd::ScaleOut(a) => scale_out::scale_out(a),
        Cmd::Ingest(a) => ingest::ingest(a),
        Cmd::Window(a) => window::window(a),
        Cmd::KraInput { dir, input: i, zipf } => generate_keys(
            &dir,
            i.keys,
            i.batches,
            i.rows,
            i.seed,
            if zipf { Keys::Zipf } else { Keys::Uniform },
        ),
        Cmd::KraWorker { input, checkpoint } => recovery::worker(&input, &checkpoint),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the generated input's keys are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keys {
    /// Uniformly over `0..keys`.
    Uniform,
    /// Zipf-skewed with exponent 1: key `r - 1` has weight `1 / r`, so the hottest 1% of 100 000
    /// keys take about 43% of the rows.
    Zipf,
}

fn generate(dir: &Path, keys: u64, batches: u64, rows: u64, seed: u64) -> Result<(), BoxError> {
    generate_keys(dir, keys, batches, rows, seed, Keys::Uniform)
}

fn generate_keys(
    dir: &Path,
    keys: u64,
    batches: u64,
    rows: u64,
    seed: u64,
    dist: Keys,
) -> Result<(), BoxError> {
    use std::fmt::Write as _;
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    // Zipf: the cumulative weights, searched with a uniform draw.
    let cdf: Vec<f64> = match dist {
        Keys::Uniform => Vec::new(),
        Keys::Zipf => {
            let mut acc = 0.0;
            (1..=keys.max(1))
                .map(|r| {
                    acc += 1.0 / r as f64;
                    acc
                })
                .collect()
        }
    };
    for b in 0..batches {
        let mut out = String::with_capacity(rows as usize * 14);
        for _ in 0..rows {
            let x = rng.next_u64();
            let key = match dist {
                Keys::Uniform => x % keys.max(1),
                Keys::Zipf => {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * cdf[cdf.len() - 1];
                    cdf.partition_point(|&c| c < u).min(cdf.len() - 1) as u64
                }
            };
            let value = ((x >> 40) % 2001) as i64 - 1000;
            writeln!(out, "{key},{value}")?;
        }
        // Written under a hidden name and renamed, as the file source expects.
        let tmp = dir.join(format!(".batch-{b:06}.csv"));
        std::fs::write(&tmp, out)?;
        std::fs::rename(&tmp, dir.join(format!("batch-{b:06}.csv")))?;
    }
    Ok(())
}

fn parse(line: &str) -> Result<(u64, i64), String> {
    let (k, v) = line.split_once(',').ok_or_else(|| format!("expected key,value, got {line:?}"))?;
    let k = k.trim().parse::<u64>().map_err(|e| format!("bad key {k:?}: {e}"))?;
    let v = v.trim().parse::<i64>().map_err(|e| format!("bad value {v:?}: {e}"))?;
    Ok((k, v))
}

fn input_files(dir: &Path) -> Result<Vec<PathBuf>, BoxError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.') && !n.starts_with('_'))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no input files in {}", dir.display()).into());
    }
    Ok(files)
}

/// Per key: (count, sum).
type KraState = FxHashMap<u64, (u64, i64)>;

/// Scans `key,value` lines in one pass over the bytes (digits, an optional sign on the value;
/// empty lines skipped), calling `f` for each: the floor's parser. No UTF-8 check, no
/// intermediate strings, and still every malformed line refused, naming it.
fn scan_records(buf: &[u8], mut f: impl FnMut(u64, i64)) -> Result<(), String> {
    let n = buf.len();
    let mut i = 0;
    while i < n {
        if buf[i] == b'\n' {
            i += 1;
            continue;
        }
        let start = i;
        let bad = |i: usize| {
            let end = buf[i.min(n)..].iter().position(|&b| b == b'\n').map_or(n, |e| i.min(n) + e);
            format!("expected key,value, got {:?}", String::from_utf8_lossy(&buf[start..end]))
        };
        // Digits from `i` on, as a number (None on overflow); moves `i` past them.
        let number = |i: &mut usize| -> Option<u64> {
            let mut x = 0u64;
            while *i < n && buf[*i].is_ascii_digit() {
                x = x.checked_mul(10)?.checked_add(u64::from(buf[*i] - b'0'))?;
                *i += 1;
            }
            Some(x)
        };
        let key = number(&mut i).ok_or_else(|| bad(i))?;
        if i == start || i >= n || buf[i] != b',' {
            return Err(bad(i));
        }
        i += 1;
        let negative = i < n && buf[i] == b'-';
        if i < n && (buf[i] == b'-' || buf[i] == b'+') {
            i += 1;
        }
        let digits = i;
        let magnitude = number(&mut i).ok_or_else(|| bad(i))?;
        if i == digits || (i < n && buf[i] != b'\n') {
            return Err(bad(i));
        }
        let value =
            if negative { 0i64.checked_sub_unsigned(magnitude) } else { i64::try_from(magnitude).ok() }
                .ok_or_else(|| bad(i))?;
        f(key, value);
        i += 1;
    }
    Ok(())
}

/// One line through the floor's parser (tests).
#[cfg(test)]
fn parse_bytes(line: &[u8]) -> Result<(u64, i64), String> {
    let mut out = Vec::new();
    scan_records(line, |k, v| out.push((k, v)))?;
    match out[..] {
        [one] => Ok(one),
        _ => Err(format!("expected one record in {:?}", String::from_utf8_lossy(line))),
    }
}

/// Scans the records of `file`, read memory-mapped.
fn each_record(file: &Path, f: impl FnMut(u64, i64)) -> Result<(), BoxError> {
    let fd = std::fs::File::open(file)?;
    // SAFETY: the benchmark's input files are written once before the run and never changed
    // while mapped.
    let map = unsafe { memmap2::Mmap::map(&fd)? };
    scan_records(&map, f).map_err(|e| format!("{}: {e}", file.display()).into())
}

/// The floor: the tightest honest single-threaded loop over the same files: memory-mapped
/// input, the byte-level parser, one hash map; no engine, no checkpoint.
fn floor(dir: &Path) -> Result<(KraState, u64, f64), BoxError> {
    let t0 = Instant::now();
    let mut m: KraState = FxHashMap::default();
    let mut events = 0u64;
    for f in input_files(dir)? {
        each_record(&f, |k, v| {
            let e = m.entry(k).or_insert((0, 0));
            e.0 += 1;
            e.1 += v;
            events += 1;
        })?;
    }
    Ok((m, events, t0.elapsed().as_secs_f64()))
}

/// The floor with an ideal incremental checkpoint: after each file (batch), the entries it
/// changed are written fixed-width (key, count, sum: 24 bytes) to one new file, fsynced. Returns
/// (seconds, checkpoint bytes written).
fn floor_with_checkpoint(dir: &Path, out: &Path) -> Result<(f64, u64), BoxError> {
    use std::io::Write;
    std::fs::create_dir_all(out)?;
    let t0 = Instant::now();
    // Per key: (count, sum, the batch that last changed it), so each batch lists a changed key
    // once without a second set.
    let mut m: FxHashMap<u64, (u64, i64, u32)> = FxHashMap::default();
    let mut changed: Vec<u64> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut bytes = 0u64;
    for (batch, f) in input_files(dir)?.iter().enumerate() {
        let gen = batch as u32 + 1;
        each_record(f, |k, v| {
            let e = m.entry(k).or_insert((0, 0, 0));
            e.0 += 1;
            e.1 += v;
            if e.2 != gen {
                e.2 = gen;
                changed.push(k);
            }
        })?;
        buf.clear();
        for k in changed.drain(..) {
            let (c, s, _) = m[&k];
            buf.extend_from_slice(&k.to_le_bytes());
            buf.extend_from_slice(&c.to_le_bytes());
            buf.extend_from_slice(&s.to_le_bytes());
        }
        let mut file = std::fs::File::create(out.join(format!("{batch:06}.bin")))?;
        file.write_all(&buf)?;
        file.sync_all()?;
        bytes += buf.len() as u64;
    }
    Ok((t0.elapsed().as_secs_f64(), bytes))
}

/// Defines the KRA job on a context; `json`: its state stored self-describing.
fn define(ctx: &StreamingContext, input: &Path, json: bool) -> cairn::Result<()> {
    let rows = ctx.text_file_stream_parsed("input", input.to_str().unwrap_or_default(), 1, parse)?;
    let name = if json { cairn::OpName::new("kra").self_describing() } else { cairn::OpName::new("kra") };
    rows.map_with_state(
        name,
        StateSpec::function(|_k: &u64, v: Option<i64>, st: &mut cairn::State<'_, (u64, i64)>| {
            match st.get_mut() {
                Some(s) => {
                    s.0 += 1;
                    s.1 += v.unwrap_or(0);
                }
                None => st.update((1u64, v.unwrap_or(0))),
            }
        }),
    )
    .foreach_batch(|_, _| Ok(()));
    Ok(())
}

struct EngineRun {
    events_per_s: f64,
    batch_ms: Vec<f64>,
    /// Per batch: (processing ms, checkpoint ms on the batch path, latest background write ms).
    parts_ms: Vec<(f64, f64, f64)>,
    summary: cairn::RunSummary,
    waited_batches: usize,
}

fn run_engine(input: &Path, ctx: StreamingContext, events: u64, json: bool) -> Result<EngineRun, BoxError> {
    define(&ctx, input, json)?;
    let lat = Arc::new(Mutex::new(Vec::new()));
    let parts = Arc::new(Mutex::new(Vec::new()));
    let last = Arc::new(Mutex::new(None::<Instant>));
    let waited = Arc::new(Mutex::new(0usize));
    let (l, pa, t, w) = (lat.clone(), parts.clone(), last.clone(), waited.clone());
    ctx.on_batch(move |p: &BatchProgress| {
        l.lock().expect("lock").push(p.processing_ms + p.checkpoint_ms);
        pa.lock().expect("lock").push((
            p.processing_ms,
            p.checkpoint_ms,
            p.last_checkpoint_write_ms.unwrap_or(0.0),
        ));
        *t.lock().expect("lock") = Some(Instant::now());
        if p.checkpoint_wait_ms > 1.0 {
            *w.lock().expect("lock") += 1;
        }
    });
    let t0 = Instant::now();
    let summary = ctx.run_available()?;
    let end = last.lock().expect("lock").unwrap_or_else(Instant::now);
    let secs = (end - t0).as_secs_f64().max(1e-9);
    let batch_ms = lat.lock().expect("lock").clone();
    let waited_batches = *waited.lock().expect("lock");
    let parts_ms = parts.lock().expect("lock").clone();
    Ok(EngineRun { events_per_s: events as f64 / secs, batch_ms, parts_ms, summary, waited_batches })
}

fn builder(batches: u64) -> cairn::StreamingContextBuilder {
    let _ = batches;
    StreamingContext::builder()
        .app_name("kra")
        .batch_interval(Duration::from_secs(1))
        .trigger(Trigger::AvailableNow)
}

/// `b` without state checkpoints: on `memory://`, with a checkpoint interval longer than a run of
/// `batches` one-second batches.
fn without_checkpoints(b: cairn::StreamingContextBuilder, batches: u64) -> cairn::StreamingContextBuilder {
    b.checkpoint("memory://").checkpoint_interval(Duration::from_secs(batches * 10 + 10))
}

/// The input directory: `given`, or `keys` over `batches` × `rows` generated under `tmp`.
fn input_dir(tmp: &Path, given: &Option<PathBuf>, g: &InputArgs) -> Result<PathBuf, BoxError> {
    match given {
        Some(d) => Ok(d.clone()),
        None => {
            let d = tmp.join("input");
            eprintln!("generating {} batches x {} rows over {} keys...", g.batches, g.rows, g.keys);
            generate(&d, g.keys, g.batches, g.rows, g.seed)?;
            Ok(d)
        }
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn dir_objects(dir: &Path) -> (u64, u64) {
    let mut n = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(m) = e.metadata() {
                n += 1;
                bytes += m.len();
            }
        }
    }
    (n, bytes)
}

/// The KRA state in the newest checkpoint of `dir`; `json`: stored self-describing.
fn checkpointed_state(dir: &Path, json: bool) -> Result<KraState, BoxError> {
    let store = CheckpointStore::open(dir.to_str().unwrap_or_default())?;
    let state = store.recover()?.state.ok_or("no checkpoint was written")?;
    let table = state.tables.iter().find(|t| t.id == "kra").ok_or("no kra table in the checkpoint")?;
    let mut m = FxHashMap::default();
    for e in table.reader() {
        let (k, v) = e?;
        let Some(v) = v else { continue };
        let key: u64 = postcard::from_bytes(k)?;
        let (value, _seen): ((u64, i64), i64) =
            if json { serde_json::from_slice(v)? } else { postcard::from_bytes(v)? };
        m.insert(key, value);
    }
    Ok(m)
}

fn kra(mut a: KraArgs) -> Result<(), BoxError> {
    if a.quick {
        a.gen.keys = a.gen.keys.min(10_000);
        a.gen.batches = a.gen.batches.min(10);
        a.gen.rows = a.gen.rows.min(20_000);
        a.recovery_keys = vec![50_000];
        a.delay_ms = a.delay_ms.min(200);
        a.delay_batches = a.delay_batches.min(5);
    }
    let tmp = tempfile::tempdir()?;
    let input = input_dir(tmp.path(), &a.input, &a.gen)?;
    let batches = input_files(&input)?.len() as u64;

    eprintln!("floor...");
    let (expected, events, floor_s) = floor(&input)?;
    let floor_eps = events as f64 / floor_s;
    let (floor_ckpt_s, floor_ckpt_bytes) = floor_with_checkpoint(&input, &tmp.path().join("floor-ckpt"))?;
    let floor_ckpt_eps = events as f64 / floor_ckpt_s;

    eprintln!("engine, checkpoint every batch...");
    let ckpt_dir = tmp.path().join("ckpt");
    let rss0 = recovery::memory().0;
    let with = run_engine(
        &input,
        builder(batches).checkpoint(ckpt_dir.to_str().unwrap_or_default()).build()?,
        events,
        false,
    )?;
    let rss_per_key = recovery::memory().0.saturating_sub(rss0) as f64 / expected.len().max(1) as f64;
    let correct = checkpointed_state(&ckpt_dir, false)? == expected;
    let (objects_total, bytes_total) = dir_objects(&ckpt_dir);

    eprintln!("engine, no state checkpoints...");
    let without = run_engine(&input, without_checkpoints(builder(batches), batches).build()?, events, false)?;

    eprintln!("engine, checkpoint every batch, state stored self-describing (JSON)...");
    let json_dir = tmp.path().join("ckpt-json");
    let json = run_engine(
        &input,
        builder(batches).checkpoint(json_dir.to_str().unwrap_or_default()).build()?,
        events,
        true,
    )?;
    let json_correct = checkpointed_state(&json_dir, true)? == expected;

    eprintln!(
        "storage latency: every request delayed {} ms, first {} batches...",
        a.delay_ms, a.delay_batches
    );
    let (delay_input, delay_events) =
        first_batches(&input, &tmp.path().join("delay-input"), a.delay_batches)?;
    let undelayed = run_engine(&delay_input, latency_ctx(tmp.path(), "undelayed", 0)?, delay_events, false)?;
    let delayed =
        run_engine(&delay_input, latency_ctx(tmp.path(), "delayed", a.delay_ms)?, delay_events, false)?;

    eprintln!("scaling with cores: parallelism 1 and 2, state checkpoints off then on...");
    let mut scaling = Vec::new();
    for checkpoints in [false, true] {
        for parallelism in [1usize, 2] {
            let b = builder(batches).parallelism(parallelism);
            let b = if checkpoints {
                let dir = tmp.path().join(format!("ckpt-p{parallelism}"));
                b.checkpoint(dir.to_str().unwrap_or_default())
            } else {
                without_checkpoints(b, batches)
            };
            scaling.push(run_engine(&input, b.build()?, events, false)?.events_per_s);
        }
    }
    let speedup = |i: usize| scaling[i + 1] / scaling[i];

    let mut variants = Vec::new();
    if a.variants {
        for (label, keys, dist) in
            [("1M uniform keys", 1_000_000, Keys::Uniform), ("Zipf-skewed keys", a.gen.keys, Keys::Zipf)]
        {
            eprintln!("variant: {label}...");
            variants.push(variant(tmp.path(), label, &a, keys, dist)?);
        }
    }

    let mut at_scale = Vec::new();
    for &keys in &a.recovery_keys {
        eprintln!("restore and memory with {keys} keys of state...");
        at_scale.push(recovery::at_scale(tmp.path(), keys, &a)?);
    }

    let s = &with.summary;
    let objects_per_batch = (s.checkpoint_objects + s.log_objects) as f64 / batches as f64;
    let ckpt_bytes_per_batch = s.checkpoint_bytes as f64 / batches as f64;
    let p50 = percentile(&with.batch_ms, 0.5);
    let p99 = percentile(&with.batch_ms, 0.99);
    let rows: Vec<(&str, String)> = vec![
        ("events", events.to_string()),
        ("batches", batches.to_string()),
        ("keys in state", expected.len().to_string()),
        ("events/s, checkpoint every batch", format!("{:.0}", with.events_per_s)),
        ("events/s, no state checkpoints", format!("{:.0}", without.events_per_s)),
        ("ratio checkpoint / no checkpoint", format!("{:.3}", with.events_per_s / without.events_per_s)),
        ("events/s, single-threaded floor", format!("{floor_eps:.0}")),
        ("ratio engine / floor", format!("{:.3}", with.events_per_s / floor_eps)),
        (
            "events/s, floor + ideal incremental ckpt",
            format!(
                "{floor_ckpt_eps:.0} ({:.0} bytes per batch, fsynced; ratio engine / it {:.3})",
                floor_ckpt_bytes as f64 / batches as f64,
                with.events_per_s / floor_ckpt_eps
            ),
        ),
        ("batch latency p50 / p99 ms", format!("{p50:.1} / {p99:.1}")),
        ("mean ms: processing / ckpt on batch path / bg write", {
            let n = with.parts_ms.len().max(1) as f64;
            let (a, b, c) =
                with.parts_ms.iter().fold((0.0, 0.0, 0.0), |s, p| (s.0 + p.0, s.1 + p.1, s.2 + p.2));
            let m = without.parts_ms.iter().map(|p| p.0).sum::<f64>() / without.parts_ms.len().max(1) as f64;
            format!("{:.1} / {:.1} / {:.1} (no-ckpt processing {m:.1})", a / n, b / n, c / n)
        }),
        ("checkpoint bytes per batch", format!("{ckpt_bytes_per_batch:.0}")),
        (
            "self-describing (JSON) state: events/s, bytes/batch",
            format!(
                "{:.0} (ratio to compact {:.3}), {:.0} bytes per batch (ratio {:.2})",
                json.events_per_s,
                json.events_per_s / with.events_per_s,
                json.summary.checkpoint_bytes as f64 / batches as f64,
                json.summary.checkpoint_bytes as f64 / s.checkpoint_bytes.max(1) as f64
            ),
        ),
        ("new objects per batch (log + state)", format!("{objects_per_batch:.2}")),
        ("objects in checkpoint location at end", format!("{objects_total} ({bytes_total} bytes)")),
        ("process RSS growth per key (approx.)", format!("{rss_per_key:.0} B")),
        (
            "every request delayed: p99 batch ms delayed / undelayed",
            format!(
                "{:.1} / {:.1} (ratio {:.1}; {} ms per request, {} batches)",
                percentile(&delayed.batch_ms, 0.99),
                percentile(&undelayed.batch_ms, 0.99),
                percentile(&delayed.batch_ms, 0.99) / percentile(&undelayed.batch_ms, 0.99).max(1e-9),
                a.delay_ms,
                delayed.batch_ms.len()
            ),
        ),
        (
            "every request delayed: events/s, checkpoints written / due",
            format!(
                "{:.0} vs {:.0} undelayed; {} / {} vs {} / {}; {} batches waited",
                delayed.events_per_s,
                undelayed.events_per_s,
                delayed.summary.checkpoints,
                delayed.summary.new_batches,
                undelayed.summary.checkpoints,
                undelayed.summary.new_batches,
                delayed.waited_batches
            ),
        ),
        (
            "cores, state checkpoints off: events/s p1 / p2",
            format!("{:.0} / {:.0} (speed-up {:.2})", scaling[0], scaling[1], speedup(0)),
        ),
        (
            "cores, checkpoint every batch: events/s p1 / p2",
            format!("{:.0} / {:.0} (speed-up {:.2})", scaling[2], scaling[3], speedup(2)),
        ),
        ("final state equals the floor's", correct.to_string()),
    ];
    let mut out = std::io::stdout().lock();
    for (k, v) in &rows {
        writeln!(out, "{k:<45} {v}")?;
    }
    for v in &variants {
        writeln!(
            out,
            "{:<45} ckpt {:.0} / no ckpt {:.0} / floor {:.0} events/s; ckpt/no-ckpt {:.3}, engine/floor {:.3}; {:.0} ckpt bytes per batch; correct {}",
            format!("variant: {}", v.label),
            v.with,
            v.without,
            v.floor,
            v.with / v.without,
            v.with / v.floor,
            v.ckpt_bytes_per_batch,
            v.correct
        )?;
    }
    for m in &at_scale {
        writeln!(
            out,
            "{:<45} restore {:.3} s, first new batch {:.3} s; RSS per key running {:.0} B (peak {:.0} B), restored {:.0} B",
            format!("{} keys of state (arenas {})", m.keys, a.malloc_arena_max),
            m.restore_s,
            m.recovery_s,
            m.running_bytes_per_key,
            m.peak_bytes_per_key,
            m.restored_bytes_per_key
        )?;
    }
    let json = serde_json::json!({
        "events": events,
        "batches": batches,
        "events_per_s": with.events_per_s.round(),
        "events_per_s_no_ckpt": without.events_per_s.round(),
        "ckpt_ratio": with.events_per_s / without.events_per_s,
        "floor_events_per_s": floor_eps.round(),
        "ratio_to_floor": with.events_per_s / floor_eps,
        "floor_ckpt_events_per_s": floor_ckpt_eps.round(),
        "ratio_to_floor_ckpt": with.events_per_s / floor_ckpt_eps,
        "p50_batch_ms": p50,
        "p99_batch_ms": p99,
        "ckpt_bytes_per_batch": ckpt_bytes_per_batch.round(),
        "objects_per_batch": objects_per_batch,
        "ckpt_objects_total": objects_total,
        "state_rss_bytes_per_key": rss_per_key.round(),
        "delay_ms": a.delay_ms,
        "delay_batches": delayed.summary.new_batches,
        "delayed_checkpoints": delayed.summary.checkpoints,
        "undelayed_checkpoints": undelayed.summary.checkpoints,
        "delayed_p99_batch_ms": percentile(&delayed.batch_ms, 0.99),
        "undelayed_p99_batch_ms": percentile(&undelayed.batch_ms, 0.99),
        "delayed_events_per_s": delayed.events_per_s.round(),
        "undelayed_events_per_s": undelayed.events_per_s.round(),
        "variants": variants.iter().map(|v| serde_json::json!({
            "label": v.label,
            "events_per_s": v.with.round(),
            "events_per_s_no_ckpt": v.without.round(),
            "floor_events_per_s": v.floor.round(),
            "ckpt_ratio": v.with / v.without,
            "ratio_to_floor": v.with / v.floor,
            "ckpt_bytes_per_batch": v.ckpt_bytes_per_batch.round(),
            "correct": v.correct,
        })).collect::<Vec<_>>(),
        "at_scale": at_scale.iter().map(|m| serde_json::json!({
            "keys": m.keys,
            "malloc_arena_max": a.malloc_arena_max,
            "restore_s": m.restore_s,
            "recovery_s": m.recovery_s,
            "rss_bytes_per_key": m.running_bytes_per_key.round(),
            "peak_rss_bytes_per_key": m.peak_bytes_per_key.round(),
            "restored_rss_bytes_per_key": m.restored_bytes_per_key.round(),
        })).collect::<Vec<_>>(),
        "p1_no_ckpt_events_per_s": scaling[0].round(),
        "p2_no_ckpt_events_per_s": scaling[1].round(),
        "speedup_no_ckpt": speedup(0),
        "p1_ckpt_events_per_s": scaling[2].round(),
        "p2_ckpt_events_per_s": scaling[3].round(),
        "speedup_ckpt": speedup(2),
        "json_events_per_s": json.events_per_s.round(),
        "json_ratio_to_compact": json.events_per_s / with.events_per_s,
        "json_ckpt_bytes_per_batch": (json.summary.checkpoint_bytes as f64 / batches as f64).round(),
        "correct": correct && json_correct && variants.iter().all(|v| v.correct),
    });
    writeln!(out, "{json}")?;
    if !correct || !json_correct || variants.iter().any(|v| !v.correct) {
        return Err("the engine's final state differs from the floor's".into());
    }
    Ok(())
}

fn latency_ctx(tmp: &Path, name: &str, delay_ms: u64) -> Result<StreamingContext, BoxError> {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir)?;
    let faulty = FaultyStore::new(Arc::new(LocalFileSystem::new_with_prefix(&dir)?), "");
    faulty.set_delay_all(Duration::from_millis(delay_ms));
    let store = CheckpointStore::with_store(
        faulty,
        ObjPath::from(""),
        format!("delayed({delay_ms} ms):{}", dir.display()),
    );
    Ok(builder(0).checkpoint_store(store).checkpoint_interval(Duration::from_secs(1)).build()?)
}

/// Links the first `n` input files of `input` into `dir`; returns it and their record count.
fn first_batches(input: &Path, dir: &Path, n: u64) -> Result<(PathBuf, u64), BoxError> {
    std::fs::create_dir_all(dir)?;
    let mut events = 0;
    for f in input_files(input)?.into_iter().take(n as usize) {
        each_record(&f, |_, _| events += 1)?;
        std::fs::hard_link(&f, dir.join(f.file_name().ok_or("an input file without a name")?))?;
    }
    Ok((dir.to_path_buf(), events))
}

/// KRA on another key distribution, same batches and rows: floor, engine with a checkpoint
/// every batch, engine without state checkpoints.
struct Variant {
    label: &'static str,
    with: f64,
    without: f64,
    floor: f64,
    ckpt_bytes_per_batch: f64,
    correct: bool,
}

fn variant(tmp: &Path, label: &'static str, a: &KraArgs, keys: u64, dist: Keys) -> Result<Variant, BoxError> {
    let slug: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let input = tmp.join(format!("input-{slug}"));
    generate_keys(&input, keys, a.gen.batches, a.gen.rows, a.gen.seed, dist)?;
    let batches = input_files(&input)?.len() as u64;
    let (expected, events, floor_s) = floor(&input)?;
    let dir = tmp.join(format!("ckpt-{slug}"));
    let with = run_engine(
        &input,
        builder(batches).checkpoint(dir.to_str().unwrap_or_default()).build()?,
        events,
        false,
    )?;
    let without = run_engine(&input, without_checkpoints(builder(batches), batches).build()?, events, false)?;
    Ok(Variant {
        label,
        with: with.events_per_s,
        without: without.events_per_s,
        floor: events as f64 / floor_s,
        ckpt_bytes_per_batch: with.summary.checkpoint_bytes as f64 / batches as f64,
        correct: checkpointed_state(&dir, false)? == expected,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse, parse_bytes, scan_records};

    #[test]
    fn the_floors_parser_agrees_with_the_engines_and_refuses_what_it_refuses() {
        for line in ["0,0", "42,-1000", "18446744073709551615,7", "5,+3", "7,999", "1,-9223372036854775808"] {
            assert_eq!(parse_bytes(line.as_bytes()), parse(line), "{line}");
        }
        for bad in [
            "",
            "1",
            "1,",
            ",2",
            "a,1",
            "1,b",
            "1,2,3",
            "1, 2",
            "-1,2",
            "1,--2",
            "18446744073709551616,1",
            "1,9223372036854775808",
        ] {
            assert!(parse_bytes(bad.as_bytes()).is_err(), "{bad:?} must be refused");
            assert!(
                scan_records(format!("1,2\n{bad}\n3,4\n").as_bytes(), |_, _| ()).is_err() || bad.is_empty()
            );
            assert!(parse(bad).is_err() || bad == "1, 2", "{bad:?}");
        }
    }
}
