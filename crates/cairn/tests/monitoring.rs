//! Listeners and JSON progress lines of a running job (the Prometheus endpoint and the live page
//! are tested in cairn-web).

use cairn::{
    BatchProgress, CheckpointWritten, RecoveryFinished, StreamingContext, StreamingListener, Trigger,
};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl StreamingListener for Recorder {
    fn on_recovery_finished(&self, e: &RecoveryFinished) {
        self.events.lock().unwrap().push(format!("recovered {:?}", e.restored_batch.map(|b| b.0)));
    }
    fn on_batch_started(&self, e: &cairn::BatchStarted) {
        self.events.lock().unwrap().push(format!("start {}", e.batch_id));
    }
    fn on_batch_completed(&self, p: &BatchProgress) {
        self.events.lock().unwrap().push(format!("done {} {}", p.batch_id, p.records));
    }
    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        self.events.lock().unwrap().push(format!("ckpt {}", e.batch_id));
    }
}

fn job(dir: &str, batches: u64) -> StreamingContext {
    let ctx = StreamingContext::builder()
        .checkpoint(dir)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(batches)
        .build()
        .unwrap();
    let s = ctx.generator("g", 2, 100, |_, o| (o % 10, 1u64)).unwrap();
    s.update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| Some(o.unwrap_or(0) + v.len() as u64))
        .foreach_batch(|_, _| Ok(()));
    ctx
}

#[test]
fn listeners_see_every_event_in_order_and_progress_lines_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = job(dir.path().to_str().unwrap(), 4);
    let rec = Arc::new(Recorder::default());
    ctx.add_listener(rec.clone());
    let lines = dir.path().join("progress.jsonl");
    ctx.progress_json_lines(&lines).unwrap();
    ctx.run_available().unwrap();
    let ev = rec.events.lock().unwrap().clone();
    assert_eq!(ev[0], "recovered None");
    for b in 0..4 {
        let start = ev.iter().position(|e| *e == format!("start {b}")).expect("started");
        let done = ev.iter().position(|e| *e == format!("done {b} 100")).expect("completed");
        assert!(start < done);
    }
    assert!(ev.iter().filter(|e| e.starts_with("ckpt")).count() >= 4, "a checkpoint per batch: {ev:?}");
    let text = std::fs::read_to_string(&lines).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 4);
    assert_eq!(records[3]["batch_id"], 3);
    assert_eq!(records[3]["operators"][0]["name"], "counts");
    assert_eq!(records[3]["operators"][0]["keys"], 10);
    assert!(records[0]["checkpoint_bytes"].as_u64().unwrap() > 0);

    // After a restart the listener hears which checkpoint was restored.
    let ctx = job(dir.path().to_str().unwrap(), 5);
    let rec = Arc::new(Recorder::default());
    ctx.add_listener(rec.clone());
    ctx.run_available().unwrap();
    assert_eq!(rec.events.lock().unwrap()[0], "recovered Some(3)");
}
