//! Runs the fixture job (`cairn_sim::fixture`). Usage: `fixture-job ROOT BATCHES`. Writes the
//! input files under ROOT first if missing. Used to write the committed format fixtures (see
//! `crates/cairn-sim/fixtures/README.md`); with `CAIRN_FAILPOINT` it leaves a crashed location.

use cairn_sim::fixture::{fixture_context, write_fixture_input, FixtureDirs};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(root), Some(Ok(batches))) = (args.first(), args.get(1).map(|b| b.parse::<u64>())) else {
        eprintln!("usage: fixture-job ROOT BATCHES");
        std::process::exit(2);
    };
    let dirs = FixtureDirs::new(root);
    if !dirs.input().exists() {
        if let Err(e) = write_fixture_input(&dirs.input()) {
            eprintln!("fixture-job: cannot write the input files: {e}");
            std::process::exit(1);
        }
    }
    match fixture_context(&dirs, batches, None).and_then(|ctx| ctx.run_available()) {
        Ok(s) => eprintln!("fixture-job: done, next batch {}", s.next_batch),
        Err(e) => {
            eprintln!("fixture-job: error: {e}");
            std::process::exit(1);
        }
    }
}
