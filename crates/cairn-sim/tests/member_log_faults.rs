//! Storage failures of member logs (a scaled-out task's plans and deltas): a full disk stops the
//! tasks with a clear error and loses nothing, and a restart on a healthy disk goes on exactly.

use cairn::checkpoint::member_log::MemberLog;
use cairn::checkpoint::object_store::local::LocalFileSystem;
use cairn::checkpoint::object_store::path::Path as ObjPath;
use cairn::checkpoint::CheckpointStore;
use cairn_sim::{expected_totals, job_on_store, FaultyStore, JobParams};
use std::sync::Arc;

#[test]
fn a_full_disk_under_the_member_log_stops_the_task_clearly_and_a_restart_is_exact() {
    let p = JobParams { batches: 16, rate: 120, keys: 17 };
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    // Only member log writes fail: the task's metadata, lease and full snapshots still land.
    let faulty = FaultyStore::new(Arc::new(LocalFileSystem::new_with_prefix(&ckpt).unwrap()), "members/");
    let out = |s: &str| tmp.path().join(s).to_str().unwrap().to_string();
    let (totals, windows) = (out("totals"), out("windows"));
    let context = || {
        // A fresh member log per start, as a restarted process has.
        let log = MemberLog::new(faulty.clone(), ObjPath::from("")).unwrap();
        let store = CheckpointStore::with_store(log.view(0), log.task_root(0), "faulty/tasks/00000");
        job_on_store(store, &p, &totals, &windows, |b| b).unwrap()
    };
    let ctx = context();
    let f = faulty.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 6 {
            f.set_failing(true);
        }
    });
    let err = ctx.run_available().expect_err("plans cannot be logged, so the task must stop");
    let msg = err.to_string();
    assert!(
        msg.contains("No space left on device") && msg.contains("members/"),
        "the error names the cause and the object: {msg}"
    );
    assert!(!err.is_transient(), "a full disk is final: {msg}");
    let done = cairn::read_text_output(&totals).unwrap().len();
    assert!((7..=8).contains(&done), "the task stopped at the first plan it could not log ({done} batches)");

    faulty.set_failing(false);
    let summary = context().run_available().expect("a restart on a healthy disk");
    assert_eq!(summary.next_batch.0, p.batches);
    let got = cairn::read_text_output(&totals).unwrap();
    assert_eq!(got.len(), p.batches as usize);
    for ((b, mut lines), want) in got.into_iter().zip(expected_totals(&p)) {
        lines.sort();
        assert!(lines == want, "batch {b} differs from the model");
    }
}
