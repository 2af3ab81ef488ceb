//! `cairn checkpoint ...`: tables for people, `--json` for scripts.

use cairn::checkpoint::admin::{self, describe_key, guess};
use cairn::checkpoint::savepoint;
use cairn::checkpoint::{BatchId, CheckpointStore, GraphDescription};
use clap::{Args, Subcommand, ValueEnum};
use std::io::Write;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// Batches and checkpoints: id, time, size, objects, and which are retained and why.
    Ls {
        #[command(flatten)]
        common: Common,
        /// Checkpoints retention keeps (as the job's keep_checkpoints).
        #[arg(long, default_value_t = 10)]
        keep: usize,
        /// Kafka bootstrap servers: adds each Kafka partition's lag (its end offset now minus
        /// the next offset after the newest planned batch), per task for a scaled-out job.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Job metadata, graph description, planned offsets, state size per operator.
    Show {
        #[command(flatten)]
        common: Common,
        /// Describe the checkpoint at or before this batch, and this batch's plan.
        #[arg(long)]
        batch: Option<u64>,
    },
    /// Check every checksum and that the newest checkpoint restores end to end (exit 0 only then).
    Verify {
        #[command(flatten)]
        common: Common,
    },
    /// Delete what retention keeping N checkpoints does not need (the engine's own rules).
    Gc {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10)]
        keep: usize,
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// An operator's state as rows: key and value bytes (hex) and a best-effort reading.
    DumpState {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        operator: String,
        #[arg(long)]
        batch: Option<u64>,
        #[arg(long, value_enum, default_value_t = Format::Csv)]
        format: Format,
    },
    /// A keyed operator's state in the newest restorable checkpoint as JSON lines
    /// (`{"key":..,"state":..,"seen_ms":..}`), decoded with the shapes the checkpoint stores.
    Export {
        /// Checkpoint location.
        location: String,
        #[arg(long)]
        operator: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Create a new location: LOCATION's newest restore point with OPERATOR's state replaced by
    /// the rows of FILE (JSON lines as `export` writes them); the job resumes there with the
    /// next batch, as a new job for its sinks.
    Import {
        /// The location whose newest restore point is copied.
        location: String,
        #[arg(long)]
        operator: String,
        /// JSON lines, one key per line.
        #[arg(long)]
        file: std::path::PathBuf,
        /// The new location (must not exist yet, or be empty).
        #[arg(long)]
        to: String,
    },
    /// Which stateful operators a new build adds, removes or retypes (exit 0 only if compatible).
    Diff {
        #[command(flatten)]
        common: Common,
        /// The new build's graph description (JSON, e.g. from `cairn demo --print-graph`).
        #[arg(long)]
        graph: std::path::PathBuf,
        /// An operator whose state the new build drops (its `drop_state`); repeatable.
        #[arg(long = "drop")]
        drop: Vec<String>,
    },
}

#[derive(Args)]
pub struct Common {
    /// Checkpoint location: a local directory or file:// URL.
    location: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Csv,
    Jsonl,
}

type Res = Result<ExitCode, Box<dyn std::error::Error>>;

fn open(location: &str) -> Result<CheckpointStore, Box<dyn std::error::Error>> {
    if !location.contains("://") && !std::path::Path::new(location).is_dir() {
        return Err(format!("{location}: no such directory").into());
    }
    Ok(CheckpointStore::open(location)?)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Box<dyn std::error::Error>> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run(cmd: CheckpointCmd) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cmd {
        CheckpointCmd::Ls { common, keep, brokers } => ls(&common, keep, brokers.as_deref()),
        CheckpointCmd::Show { common, batch } => show(&common, batch),
        CheckpointCmd::Verify { common } => verify(&common),
        CheckpointCmd::Gc { common, keep, dry_run } => {
            let r = admin::gc(&open(&common.location)?, keep, dry_run)?;
            if common.json {
                print_json(&r)?;
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                println!("kept checkpoints: {:?}; {verb} {} object(s)", r.kept_checkpoints, r.deleted.len());
                for d in &r.deleted {
                    println!("  {d}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CheckpointCmd::DumpState { common, operator, batch, format } => {
            let store = open(&common.location)?;
            let rows = admin::dump_state(&store, &operator, batch.map(BatchId))?;
            // Keys and values read with the shapes the checkpoint stores, where it stores them;
            // otherwise a best guess from the bytes.
            let shapes = admin::show(&store, batch.map(BatchId))?.graph.and_then(|g| {
                let o = g.operators.into_iter().find(|o| o.name == operator)?;
                let encoding = o.state_encoding;
                o.key_shape.zip(o.state_shape).map(|(k, s)| (k, s, encoding))
            });
            let read = |table: &str, bytes: &[u8], key: bool| -> serde_json::Value {
                let decoded = shapes.as_ref().filter(|_| table == operator).and_then(|(k, s, encoding)| {
                    if key {
                        cairn::checkpoint::typed::decode(k, bytes).ok()
                    } else {
                        savepoint::decode_value(s, *encoding, bytes).ok()
                    }
                });
                let guessed = if key { describe_key(table, bytes) } else { guess(bytes) };
                decoded.unwrap_or_else(|| guessed.map_or(serde_json::Value::Null, serde_json::Value::String))
            };
            // In CSV a decoded value is its JSON text, a guess its text.
            let cell = |v: serde_json::Value| match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s,
                v => v.to_string(),
            };
            // A closed pipe (`| head`) ends the output quietly instead of failing.
            let mut out = std::io::stdout().lock();
            let written = match (format, common.json) {
                (Format::Jsonl, _) | (_, true) => rows.iter().try_for_each(|r| {
                    let v = serde_json::json!({
                        "table": r.table, "key_hex": hex(&r.key), "value_hex": hex(&r.value),
                        "key": read(&r.table, &r.key, true), "value": read(&r.table, &r.value, false),
                    });
                    writeln!(out, "{v}")
                }),
                (Format::Csv, false) => {
                    let q = |v: serde_json::Value| cell(v).replace('"', "\"\"");
                    writeln!(out, "table,key_hex,value_hex,key,value").and_then(|()| {
                        rows.iter().try_for_each(|r| {
                            writeln!(
                                out,
                                "{},{},{},\"{}\",\"{}\"",
                                r.table,
                                hex(&r.key),
                                hex(&r.value),
                                q(read(&r.table, &r.key, true)),
                                q(read(&r.table, &r.value, false))
                            )
                        })
                    })
                }
            };
            match written {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
        CheckpointCmd::Export { location, operator, out } => {
            let (batch, rows) = savepoint::export(&open(&location)?, &operator)?;
            let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
            match out {
                Some(path) => {
                    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
                    eprintln!(
                        "{} keys of {operator:?} at batch {batch} written to {}",
                        rows.len(),
                        path.display()
                    );
                }
                None => {
                    let mut o = std::io::stdout().lock();
                    if let Err(e) = o.write_all(text.as_bytes()) {
                        if e.kind() != std::io::ErrorKind::BrokenPipe {
                            return Err(e.into());
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CheckpointCmd::Import { location, operator, file, to } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let rows = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    serde_json::from_str(l)
                        .map_err(|e| format!("{} line {}: not JSON: {e}", file.display(), i + 1))
                })
                .collect::<Result<Vec<serde_json::Value>, _>>()?;
            if !to.contains("://") {
                std::fs::create_dir_all(&to).map_err(|e| format!("{to}: {e}"))?;
            }
            #[allow(clippy::disallowed_methods)] // the new job id is a wall-clock stamp, like the engine's
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            let r = savepoint::import(&open(&location)?, &open(&to)?, &operator, &rows, now)?;
            println!(
                "{to}: {} keys of {operator:?} imported; state after batch {}, job id {} (start the job on this location)",
                r.rows, r.batch, r.job_id
            );
            Ok(ExitCode::SUCCESS)
        }
        CheckpointCmd::Diff { common, graph, drop } => {
            let text = std::fs::read_to_string(&graph).map_err(|e| format!("{}: {e}", graph.display()))?;
            let new: GraphDescription = serde_json::from_str(&text)
                .map_err(|e| format!("{} is not a graph description: {e}", graph.display()))?;
            let d = admin::diff(&open(&common.location)?, &new, &drop)?;
            if common.json {
                print_json(&d)?;
            } else {
                if d.changes.is_empty() {
                    println!("no changes to stateful operators");
                }
                for k in &d.kept {
                    println!("kept {k:?}: unchanged");
                }
                for c in &d.changes {
                    let mark = if c.is_compatible(&[]) {
                        "ok  "
                    } else if c.is_compatible(&drop) {
                        "drop"
                    } else {
                        "FAIL"
                    };
                    println!("{mark} {c}");
                }
                println!(
                    "{}",
                    if d.compatible {
                        "compatible"
                    } else {
                        "INCOMPATIBLE: the new build would refuse to start"
                    }
                );
            }
            Ok(if d.compatible { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
    }
}

fn ls(common: &Common, keep: usize, brokers: Option<&str>) -> Res {
    let store = open(&common.location)?;
    let mut tasks = admin::tasks(&store)?;
    if !tasks.is_empty() {
        if let Some(b) = brokers {
            crate::lag::fill(b, tasks.iter_mut().flat_map(|t| t.positions.iter_mut()))?;
        }
        return ls_tasks(common, &tasks);
    }
    let mut o = admin::list(&store, keep)?;
    if let Some(b) = brokers {
        crate::lag::fill(b, o.positions.iter_mut())?;
    }
    if common.json {
        print_json(&o)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(m) = &o.metadata {
        println!(
            "job {} ({}), batch interval {} ms, created {}",
            m.app_name, m.job_id, m.batch_interval_ms, m.created_ms
        );
    }
    if let Some(l) = &o.lease {
        println!("lease: pid {} on {}, heartbeat at {}", l.pid, l.host, l.heartbeat_ms);
    }
    println!("{} object(s), {} bytes", o.total_objects, o.total_bytes);
    println!("\nBATCH  TIME_MS        COMMITTED  RANGES  RECORDS");
    for b in &o.batches {
        println!(
            "{:<6} {:<14} {:<10} {:<7} {}",
            b.batch,
            b.batch_time_ms.map_or("?".into(), |t| t.to_string()),
            if b.committed { "yes" } else { "no" },
            b.ranges,
            b.records.map_or("-".into(), |r| r.to_string())
        );
    }
    if !o.positions.is_empty() {
        println!("\nSOURCE     PARTITION            NEXT        LAG");
        for p in &o.positions {
            println!(
                "{:<10} {:<20} {:<11} {}",
                p.source,
                p.partition.to_string(),
                p.next,
                p.lag.map_or("-".into(), |l| l.to_string())
            );
        }
    }
    println!("\nCHECKPOINT  KIND   PARENT  BYTES      CHAIN  RETAINED  WHY");
    for c in &o.checkpoints {
        println!(
            "{:<11} {:<6} {:<7} {:<10} {:<6} {:<9} {}",
            c.batch,
            c.kind,
            c.parent.map_or("-".into(), |p| p.to_string()),
            c.bytes,
            c.chain_objects.map_or("broken".into(), |n| n.to_string()),
            if c.retained { "yes" } else { "no" },
            c.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A scaled-out job: one line per task (its owner, epoch and progress); `ls` on a task's own
/// location (printed here) shows its batches and checkpoints.
fn ls_tasks(common: &Common, tasks: &[admin::TaskRow]) -> Res {
    if common.json {
        print_json(&tasks)?;
        return Ok(ExitCode::SUCCESS);
    }
    #[allow(clippy::disallowed_methods)] // an age for people to read
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    println!("scaled-out job: {} task(s)\n", tasks.len());
    println!("TASK   EPOCH  OWNER                    HEARTBEAT  BATCH    CHECKPOINT  LAG       NEXT OFFSETS");
    for t in tasks {
        let owner = t.owner.as_ref().map_or("-".into(), |o| {
            format!("pid {} on {}{}", o.pid, o.host, if o.released { " (released)" } else { "" })
        });
        let heartbeat = t
            .owner
            .as_ref()
            .map_or("-".into(), |o| format!("{:.1}s ago", (now - o.heartbeat_ms).max(0) as f64 / 1e3));
        let batch =
            t.last_planned.map_or("-".into(), |b| format!("{b}{}", if t.last_committed { "" } else { "*" }));
        let offsets: Vec<String> =
            t.positions.iter().map(|p| format!("{}={}", p.partition, p.next)).collect();
        // The task's lag: the sum over its partitions whose lag is known.
        let lags: Vec<u64> = t.positions.iter().filter_map(|p| p.lag).collect();
        let lag = if lags.is_empty() { "-".into() } else { lags.iter().sum::<u64>().to_string() };
        println!(
            "{:<6} {:<6} {:<24} {:<10} {:<8} {:<11} {:<9} {}",
            t.task,
            t.owner.as_ref().map_or("-".into(), |o| o.epoch.to_string()),
            owner,
            heartbeat,
            batch,
            t.last_checkpoint.map_or("-".into(), |b| b.to_string()),
            lag,
            offsets.join(" ")
        );
    }
    println!(
        "\n(* planned, not committed yet) one task's batches and checkpoints: cairn checkpoint ls {}",
        tasks[0].location
    );
    Ok(ExitCode::SUCCESS)
}

fn show(common: &Common, batch: Option<u64>) -> Res {
    let d = admin::show(&open(&common.location)?, batch.map(BatchId))?;
    if common.json {
        print_json(&d)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(m) = &d.metadata {
        println!(
            "job {} ({}), format v{}, batch interval {} ms",
            m.app_name, m.job_id, m.format_version, m.batch_interval_ms
        );
    }
    match d.checkpoint_batch {
        Some(b) => println!("checkpoint after batch {b}"),
        None => println!("no restorable checkpoint"),
    }
    if let Some(g) = &d.graph {
        println!("parallelism when written: {}", g.parallelism);
    }
    println!("\nOPERATOR             KIND                      VERSION  KEYS       BYTES      STATE TYPE");
    for op in &d.operators {
        let keys: u64 = op.tables.iter().map(|t| t.keys).sum();
        let bytes: u64 = op.tables.iter().map(|t| t.bytes).sum();
        println!(
            "{:<20} {:<25} {:<8} {:<10} {:<10} {}",
            op.name, op.kind, op.state_version, keys, bytes, op.state_type
        );
    }
    if let Some(p) = &d.plan {
        println!("\nplan of batch {} (time {} ms):", p.batch_id, p.batch_time_ms);
        for s in &p.sources {
            for r in &s.ranges {
                println!("  {:<16} {:<24} [{}, {})", s.source, r.partition, r.start, r.end);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(common: &Common) -> Res {
    let v = admin::verify(&open(&common.location)?)?;
    if common.json {
        print_json(&v)?;
    } else {
        println!("{} object(s) checked", v.objects_checked);
        for b in &v.bad {
            println!("BAD  {}: {}", b.path, b.reason);
        }
        for w in &v.warnings {
            println!("warning: {w}");
        }
        if let Some(e) = &v.recovery_error {
            println!("recovery fails: {e}");
        }
        match (v.restorable_batch, v.newest_batch) {
            (Some(r), Some(n)) if r == n => println!(
                "newest checkpoint (batch {n}) restores; a restart replays {} batch(es)",
                v.replay_batches
            ),
            (Some(r), Some(n)) => println!(
                "newest checkpoint (batch {n}) does NOT restore; recovery would fall back to batch {r}"
            ),
            (None, Some(n)) => println!("newest checkpoint (batch {n}) does NOT restore"),
            (_, None) => println!(
                "no state checkpoint yet; a restart replays {} batch(es) from batch 0",
                v.replay_batches
            ),
        }
        println!("{}", if v.ok { "OK" } else { "FAILED" });
    }
    Ok(if v.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
