//! The process the crash tests kill. Usage:
//! `crash-job CHECKPOINT OUT_TOTALS OUT_WINDOWS BATCHES RATE KEYS CHECKPOINT_EVERY PARALLELISM`

use cairn::{StreamingContext, Trigger};
use cairn_sim::{define_job, JobParams, INTERVAL};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 8 {
        eprintln!("usage: crash-job CHECKPOINT OUT_TOTALS OUT_WINDOWS BATCHES RATE KEYS CHECKPOINT_EVERY PARALLELISM");
        std::process::exit(2);
    }
    let num = |i: usize| -> u64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("argument {} must be a number, got {:?}", i + 1, args[i]);
            std::process::exit(2)
        })
    };
    let p = JobParams { batches: num(3), rate: num(4), keys: num(5).max(1) };
    let (every, parallelism) = (num(6).max(1), num(7).max(1));
    // CRASH_JOB_FAULTS=1 routes the checkpoint through the fault injector: latency spikes on
    // every 5th write and a transient error every 7th, on top of the SIGKILLs.
    let faulty = std::env::var("CRASH_JOB_FAULTS").is_ok_and(|v| v == "1");
    // CRASH_JOB_DELAY_MS=n delays every request to the checkpoint location (of every kind) by n ms:
    // slow storage, for the bounded-location tests.
    let delay: Option<u64> = std::env::var("CRASH_JOB_DELAY_MS").ok().and_then(|v| v.parse().ok());
    let result = StreamingContext::get_or_create(&args[0], |loc| {
        let mut builder = StreamingContext::builder();
        if let Some(ms) = delay {
            let (store, root) = cairn::checkpoint::store::open_store(loc)?;
            let f = cairn_sim::FaultyStore::new(store, "");
            f.set_delay_all(std::time::Duration::from_millis(ms));
            builder = builder.checkpoint_store(cairn::checkpoint::CheckpointStore::with_store(f, root, loc));
        } else if faulty {
            let (store, root) = cairn::checkpoint::store::open_store(loc)?;
            let f = cairn_sim::FaultyStore::new(store, "");
            f.set_spikes(5, std::time::Duration::from_millis(40));
            f.fail_every(7);
            builder = builder.checkpoint_store(cairn::checkpoint::CheckpointStore::with_store(f, root, loc));
        } else {
            builder = builder.checkpoint(loc);
        }
        // CRASH_JOB_LEASE_TTL_MS shortens the lease TTL, so fencing tests can pause a holder past
        // it without waiting the default 10 s.
        if let Some(ms) = std::env::var("CRASH_JOB_LEASE_TTL_MS").ok().and_then(|v| v.parse().ok()) {
            builder = builder.lease_ttl(std::time::Duration::from_millis(ms));
        }
        let ctx = builder
            .app_name("crash-job")
            .batch_interval(INTERVAL)
            .checkpoint_interval(INTERVAL * every as u32)
            .parallelism(parallelism as usize)
            .keep_checkpoints(3)
            .full_snapshot_every(4)
            // Logical batch times (no waiting): restarts after a kill must not shift the window
            // grid, so the expected output can be computed batch by batch.
            .trigger(Trigger::AvailableNow)
            .stop_after_batches(p.batches)
            .build()?;
        define_job(&ctx, &p, &args[1], &args[2])?;
        // Slows batches down so random kills land mid-run rather than after the end.
        if let Some(ms) = std::env::var("CRASH_JOB_PACE_MS").ok().and_then(|v| v.parse().ok()) {
            ctx.on_batch(move |_| std::thread::sleep(std::time::Duration::from_millis(ms)));
        }
        Ok(ctx)
    })
    .and_then(|ctx| ctx.run_available());
    match result {
        Ok(s) => {
            for w in &s.recovery_warnings {
                eprintln!("crash-job: recovery warning: {w}");
            }
            eprintln!("crash-job: done, next batch {}", s.next_batch)
        }
        Err(e) => {
            eprintln!("crash-job: error: {e}");
            std::process::exit(1);
        }
    }
}
