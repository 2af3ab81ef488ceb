//! An HTTP ingest job: records POSTed to `http://ADDR/ingest` are kept in the checkpoint
//! location's write-ahead log before they are acknowledged, then counted per record (a running
//! total per distinct line) and written to text files under OUTPUT, exactly once across crashes.
//!
//! ```text
//! cargo run --release -p cairn-web --example http_ingest -- 127.0.0.1:8090 /tmp/ingest-ckpt /tmp/ingest-out
//! curl -X POST --data-binary $'click\nview\nclick\n' -H 'Idempotency-Key: req-1' http://127.0.0.1:8090/ingest
//! ```

use cairn::StreamingContext;
use cairn_web::HttpIngest;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, checkpoint, output] = args.as_slice() else {
        return Err("usage: http_ingest ADDR CHECKPOINT OUTPUT".into());
    };
    let mut server = None;
    let ctx = StreamingContext::get_or_create(checkpoint, |loc| {
        let ctx = StreamingContext::builder()
            .checkpoint(loc)
            .app_name("http-ingest")
            .batch_interval(Duration::from_millis(500))
            .stop_on_signals(true)
            .build()?;
        let (ingest, events) =
            ctx.http_ingest_stream("events", addr).map_err(|e| cairn::Error::User(e.to_string()))?;
        println!("POST records to http://{}/ingest", ingest.addr());
        server = Some(ingest);
        events.save_as_text_files(output)?;
        events
            .map(|e| (e, 1u64))
            .update_state_by_key("totals", |_, new: Vec<u64>, old: Option<u64>| {
                Some(old.unwrap_or(0) + new.iter().sum::<u64>())
            })
            .print(10);
        Ok(ctx)
    })?;
    ctx.run()?;
    drop(server);
    Ok(())
}
