//! The process the receiver kill test SIGKILLs: lines from a TCP server (`socket_text_stream`,
//! kept in the write-ahead log) written unchanged to text files, one part file per batch.
//! Usage: `receiver-job ADDR CHECKPOINT OUTPUT`. Stops gracefully on SIGTERM.

use cairn::StreamingContext;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, checkpoint, output] = args.as_slice() else {
        eprintln!("usage: receiver-job ADDR CHECKPOINT OUTPUT");
        std::process::exit(2);
    };
    let result = StreamingContext::get_or_create(checkpoint, |loc| {
        let ctx = StreamingContext::builder()
            .checkpoint(loc)
            .app_name("receiver-job")
            .batch_interval(Duration::from_millis(100))
            // Every checkpoint and plan kept, so the test can audit every WAL block at the end
            // (retention of the log is tested on its own).
            .keep_checkpoints(100_000)
            .stop_on_signals(true)
            .build()?;
        ctx.socket_text_stream("lines", addr)?.save_as_text_files(output)?;
        Ok(ctx)
    })
    .and_then(|ctx| ctx.run());
    if let Err(e) = result {
        eprintln!("receiver-job: {e}");
        std::process::exit(1);
    }
}
