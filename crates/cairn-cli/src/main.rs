//! The `cairn` command. `cairn demo` runs a stateful job on the built-in generator with a local
//! checkpoint; kill it (Ctrl-C or `kill -9`) and run it again to see it resume. `cairn checkpoint`
//! inspects, verifies and cleans checkpoint locations (a thin layer over
//! `cairn_checkpoint::admin`).

mod admin;
mod lag;

use cairn::{StateSpec, StreamingContext, Trigger};
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cairn", version, about = "Stream processing with exactly-once checkpoints")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the demo job: per-user running totals over generated purchase events.
    Demo(DemoArgs),
    /// Inspect, verify and clean checkpoint locations.
    #[command(subcommand)]
    Checkpoint(admin::CheckpointCmd),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Checkpoint location (local directory or file:// URL).
    #[arg(long, default_value = "cairn-demo/checkpoint")]
    checkpoint: String,
    /// Where the file sink writes each batch's updated totals.
    #[arg(long, default_value = "cairn-demo/output")]
    output: String,
    /// Stop once this many batches exist in total (counting batches before a restart); 0 runs
    /// until stopped.
    #[arg(long, default_value_t = 0)]
    batches: u64,
    /// Records generated per batch.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Distinct users in the generated events.
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Batch interval in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
    /// Parallelism (default: number of cores).
    #[arg(long)]
    parallelism: Option<usize>,
    /// Print the job's graph description as JSON (for `cairn checkpoint diff`) and exit.
    #[arg(long)]
    print_graph: bool,
    /// Serve Prometheus metrics and the live web page on this address (e.g. 127.0.0.1:8080).
    #[arg(long)]
    http: Option<String>,
    /// Append every batch's progress record as a JSON line to this file.
    #[arg(long)]
    progress_json: Option<std::path::PathBuf>,
    /// One live status line, rewritten in place, instead of a line per batch.
    #[arg(long)]
    live: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Per-batch progress records go to --progress-json or the web page; keep the terminal
            // to one line per batch unless asked (CAIRN_LOG=cairn::progress=info).
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "info,cairn::progress=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Command::Demo(a) => demo(a).map(|()| ExitCode::SUCCESS),
        Command::Checkpoint(c) => admin::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A purchase event: user id and amount in cents, a pure function of the generator offset.
fn event(partition: u32, offset: u64, users: u64) -> (u64, i64) {
    let mut x = (partition as u64) << 48 ^ offset;
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    (x % users, (x >> 20) as i64 % 10_000)
}

/// Builds the demo job's context on `loc` (without touching the checkpoint).
fn build(a: &DemoArgs, loc: &str) -> cairn::Result<StreamingContext> {
    let users = a.users.max(1);
    let mut b = StreamingContext::builder()
        .app_name("cairn-demo")
        .batch_interval(Duration::from_millis(a.interval_ms.max(1)))
        .checkpoint(loc)
        .trigger(Trigger::ProcessingTime)
        .stop_on_signals(true);
    if a.batches > 0 {
        b = b.stop_after_batches(a.batches);
    }
    if let Some(p) = a.parallelism {
        b = b.parallelism(p);
    }
    let ctx = b.build()?;
    let events = ctx.generator("purchases", 2, a.rate, move |p, o| event(p, o, users))?;
    let totals = events.map_with_state(
        "user_totals",
        StateSpec::function(|user: &u64, amount: Option<i64>, state| {
            let (count, sum) = state.get().copied().unwrap_or((0u64, 0i64));
            let next = (count + 1, sum + amount.unwrap_or(0));
            state.update(next);
            format!("{user},{},{}", next.0, next.1)
        }),
    );
    totals.save_as_text_files(&a.output)?;
    Ok(ctx)
}

fn demo(a: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.print_graph {
        let ctx = build(&a, &a.checkpoint)?;
        println!("{}", serde_json::to_string_pretty(&ctx.graph_description()).unwrap_or_default());
        return Ok(());
    }
    let ctx = StreamingContext::get_or_create(&a.checkpoint, |loc| build(&a, loc))?;
    let live = a.live;
    ctx.on_batch(move |p| {
        let ckpt = p.checkpoint_ms + p.last_checkpoint_write_ms.unwrap_or(0.0);
        if live {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = write!(
                out,
                "\r\x1b[2Kbatch {}  {:.0} records/s  processing {:.1} ms  checkpoint {:.1} ms  queue {}  state keys {}{}",
                p.batch_id,
                p.input_rows_per_s,
                p.processing_ms,
                ckpt,
                p.checkpoint_queue_depth,
                p.state_keys,
                if p.replayed { "  (replaying)" } else { "" }
            );
            let _ = out.flush();
            return;
        }
        println!(
            "batch {:>6}  records {:>8}  processing {:>8.1} ms  checkpoint {:>7.1} ms  state keys {:>8}{}",
            p.batch_id,
            p.records,
            p.processing_ms,
            ckpt,
            p.state_keys,
            if p.replayed { "  (replayed)" } else { "" }
        );
    });
    if let Some(p) = &a.progress_json {
        ctx.progress_json_lines(p)?;
    }
    // Served before the job starts, so the metrics see recovery and every batch; it stops when
    // dropped, after the job.
    let endpoint = a.http.as_deref().map(|addr| cairn_web::serve(&ctx, addr)).transpose()?;
    if let Some(e) = &endpoint {
        let addr = e.addr();
        println!("web page: http://{addr}/  metrics: http://{addr}/metrics");
    }
    ctx.start()?;
    let summary = ctx.await_termination()?;
    drop(endpoint);
    if live {
        println!();
    }
    eprintln!(
        "stopped: next batch {}, {} new and {} replayed batch(es) this run, {} checkpoint(s) written",
        summary.next_batch, summary.new_batches, summary.replayed_batches, summary.checkpoints
    );
    Ok(())
}
