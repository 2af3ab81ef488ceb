//! Restore time and memory per key at scale: a KRA worker process builds a state of `keys` keys
//! (checkpoint every batch), is SIGKILLed, and a second worker restores it. Both print their
//! resident memory, so memory per key counts everything the process keeps for its state: the
//! maps, change lists, and whatever the checkpoint path holds between batches.

use crate::{builder, define, generate, BoxError, KraArgs};
use cairn::StreamingContext;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// One state size's figures.
pub(crate) struct AtScale {
    pub keys: u64,
    /// Seconds from the restarted worker's start until its state is restored.
    pub restore_s: f64,
    /// Seconds from the restarted worker's spawn to its first new batch.
    pub recovery_s: f64,
    /// Resident memory growth of the first worker, from its start to the batch before the kill,
    /// per key.
    pub running_bytes_per_key: f64,
    /// Peak resident memory (VmHWM) growth of the first worker, per key.
    pub peak_bytes_per_key: f64,
    /// Resident memory growth of the restarted worker once restored, per key.
    pub restored_bytes_per_key: f64,
}

/// Resident and peak resident bytes of this process.
pub(crate) fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Generates input whose first 25 batches (or 60% of them) hold about five rows per key, so
/// nearly every key is in the state at the kill, runs a worker to that batch, SIGKILLs it and
/// times the restart.
pub(crate) fn at_scale(tmp: &Path, keys: u64, a: &KraArgs) -> Result<AtScale, BoxError> {
    let (quick, seed) = (a.quick, a.gen.seed);
    let input = tmp.join(format!("recovery-input-{keys}"));
    let batches = if quick { 20 } else { 30 };
    let kill_after = (batches * 6 / 10).min(25);
    let rows = (keys * 5 / kill_after).max(1);
    generate(&input, keys, batches, rows, seed ^ 0xabcdef)?;
    let ckpt = tmp.join(format!("recovery-ckpt-{keys}"));
    let exe = std::env::current_exe()?;
    let spawn = || {
        let mut c = Command::new(&exe);
        c.args(["kra-worker", input.to_str().unwrap_or_default(), ckpt.to_str().unwrap_or_default()]);
        if a.malloc_arena_max > 0 {
            c.env("MALLOC_ARENA_MAX", a.malloc_arena_max.to_string());
        }
        c.stdout(Stdio::piped()).spawn()
    };
    let numbers = |line: &str, prefix: &str| -> Vec<f64> {
        line.strip_prefix(prefix)
            .map(|rest| rest.split_whitespace().filter_map(|w| w.parse::<f64>().ok()).collect())
            .unwrap_or_default()
    };
    let mut first = spawn()?;
    let (mut start_rss, mut running, mut peak) = (0.0, 0.0, 0.0);
    for line in BufReader::new(first.stdout.take().ok_or("no stdout")?).lines() {
        let line = line?;
        if let [_, rss, ..] = numbers(&line, "RESTORED ")[..] {
            start_rss = rss;
        }
        if let [_, rss, hwm] = numbers(&line, "BATCH ")[..] {
            (running, peak) = (rss, hwm);
        }
        if line.starts_with(&format!("BATCH {kill_after} ")) {
            break;
        }
    }
    first.kill()?; // SIGKILL
    first.wait()?;
    let t0 = Instant::now();
    let mut second = spawn()?;
    let (mut restore_s, mut recovery_s, mut restored) = (f64::NAN, f64::NAN, 0.0);
    let (mut base, mut after) = (0.0, 0.0);
    for line in BufReader::new(second.stdout.take().ok_or("no stdout")?).lines() {
        let line = line?;
        if let [b] = numbers(&line, "STARTED ")[..] {
            base = b;
        }
        if let [ms, rss, ..] = numbers(&line, "RESTORED ")[..] {
            restore_s = ms / 1e3;
            after = rss;
            restored = rss - base;
        }
        if line.starts_with("BATCH ") && line.contains(" new ") {
            recovery_s = t0.elapsed().as_secs_f64();
            break;
        }
    }
    second.kill().ok();
    second.wait()?;
    if recovery_s.is_nan() || after == 0.0 {
        return Err("the restarted worker never completed a new batch".into());
    }
    let per_key = |bytes: f64| bytes / keys as f64;
    Ok(AtScale {
        keys,
        restore_s,
        recovery_s,
        running_bytes_per_key: per_key(running - start_rss),
        peak_bytes_per_key: per_key(peak - start_rss),
        restored_bytes_per_key: per_key(restored),
    })
}

/// One KRA process for the recovery measurement: prints `STARTED <rss>` first, `RESTORED <ms>
/// <rss> <peak rss>` once state is back, and `BATCH <id> new|replayed <rss> <peak rss>` after
/// every batch (bytes).
pub(crate) fn worker(input: &Path, checkpoint: &Path) -> Result<(), BoxError> {
    let t0 = Instant::now();
    println!("STARTED {}", memory().0);
    let loc = checkpoint.to_str().unwrap_or_default().to_string();
    let ctx = StreamingContext::get_or_create(&loc, |loc| {
        let ctx = builder(0).checkpoint(loc).build()?;
        define(&ctx, input, false)?;
        Ok(ctx)
    })?;
    let (rss, hwm) = memory();
    println!("RESTORED {:.1} {rss} {hwm}", t0.elapsed().as_secs_f64() * 1e3);
    ctx.on_batch(|p| {
        let (rss, hwm) = memory();
        let kind = if p.replayed { "replayed" } else { "new" };
        // The reader stops reading after the kill point; a closed pipe is not this worker's
        // failure.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "BATCH {} {kind} {rss} {hwm}", p.batch_id);
        let _ = out.flush();
    });
    ctx.run_available()?;
    Ok(())
}
