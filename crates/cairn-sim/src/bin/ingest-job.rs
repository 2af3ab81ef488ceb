//! The process the HTTP ingest kill test SIGKILLs: records POSTed to `http_ingest_stream`
//! (acknowledged once in the write-ahead log) written unchanged to text files, one part file per
//! batch. Usage: `ingest-job ADDR CHECKPOINT OUTPUT`. Stops gracefully on SIGTERM.

use cairn::StreamingContext;
use cairn_web::{HttpIngest, IngestConfig};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, checkpoint, output] = args.as_slice() else {
        eprintln!("usage: ingest-job ADDR CHECKPOINT OUTPUT");
        std::process::exit(2);
    };
    let mut server = None;
    let result = StreamingContext::get_or_create(checkpoint, |loc| {
        let ctx = StreamingContext::builder()
            .checkpoint(loc)
            .app_name("ingest-job")
            .batch_interval(Duration::from_millis(100))
            // Every plan kept, so the test can audit every WAL block at the end.
            .keep_checkpoints(100_000)
            .stop_on_signals(true)
            .build()?;
        // Small limits, so the test meets them: 64 KiB bodies, 2000 records waiting.
        let cfg = IngestConfig { max_body_bytes: 64 << 10, max_pending: 2000, ..IngestConfig::default() };
        let (ingest, events) = ctx
            .http_ingest_stream_with("events", addr, cfg)
            .map_err(|e| cairn::Error::User(e.to_string()))?;
        server = Some(ingest);
        events.save_as_text_files(output)?;
        Ok(ctx)
    })
    .and_then(|ctx| ctx.run());
    drop(server);
    if let Err(e) = result {
        eprintln!("ingest-job: {e}");
        std::process::exit(1);
    }
}
