//! `cairn checkpoint ...` on real checkpoints written by the engine, healthy and damaged.

mod support;
use support::{cairn, json, text};

use cairn::{StreamingContext, Trigger};
use std::path::Path;

/// Runs a small stateful job: 12 batches, a checkpoint every batch, keep 4.
fn job(dir: &Path) {
    let ctx = StreamingContext::builder()
        .checkpoint(dir.to_str().unwrap())
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(12)
        .keep_checkpoints(4)
        // A checkpoint every batch, never deferred under load, so gc always has something to free.
        .max_checkpoint_deferral(0)
        .full_snapshot_every(5)
        .build()
        .unwrap();
    let s = ctx.generator("events", 2, 40, |_, o| (o % 17, 1u64)).unwrap();
    s.update_state_by_key("counts", |_, v: Vec<u64>, old: Option<u64>| {
        Some(old.unwrap_or(0) + v.len() as u64)
    })
    .foreach_batch(|_, _| Ok(()));
    ctx.run_available().unwrap();
}

#[test]
fn inspect_a_healthy_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    job(dir.path());
    let loc = dir.path().to_str().unwrap();

    let ls = cairn(&["checkpoint", "ls", loc, "--keep", "4", "--json"]);
    assert!(ls.status.success(), "{}", text(&ls));
    let v = json(&ls);
    let ckpts = v["checkpoints"].as_array().unwrap();
    assert!(ckpts.iter().any(|c| c["batch"] == 11), "the final checkpoint is listed");
    assert!(ckpts.iter().all(|c| c["retained"] == true), "retention already ran in the job");
    assert!(v["batches"].as_array().unwrap().iter().all(|b| b["committed"] == true));
    assert!(text(&cairn(&["checkpoint", "ls", loc])).contains("CHECKPOINT"), "a table by default");

    let show = json(&cairn(&["checkpoint", "show", loc, "--json"]));
    assert_eq!(show["checkpoint_batch"], 11);
    let counts =
        show["operators"].as_array().unwrap().iter().find(|o| o["name"] == "counts").unwrap().clone();
    assert_eq!(counts["kind"], "update_state_by_key");
    assert_eq!(counts["tables"][0]["keys"], 17, "17 distinct keys");
    assert_eq!(show["plan"]["batch_id"], 11);

    let verify = cairn(&["checkpoint", "verify", loc]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("OK"));

    let dump = cairn(&["checkpoint", "dump-state", loc, "--operator", "counts", "--format", "jsonl"]);
    assert!(dump.status.success(), "{}", text(&dump));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&dump.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 17);
    // Value = (count, last data time), decoded with the stored shapes: 12 batches x 40 records
    // over 17 keys.
    let total: u64 = rows.iter().map(|r| r["value"][0].as_u64().unwrap()).sum();
    assert!(rows.iter().all(|r| r["key"].is_u64()), "{rows:?}");
    assert_eq!(total, 12 * 40);
    let missing = cairn(&["checkpoint", "dump-state", loc, "--operator", "nope"]);
    assert!(!missing.status.success() && text(&missing).contains("counts"), "{}", text(&missing));
}

#[test]
fn gc_and_diff() {
    let dir = tempfile::tempdir().unwrap();
    job(dir.path());
    let loc = dir.path().to_str().unwrap();
    let count = || walk(dir.path());
    let before = count();
    let dry = json(&cairn(&["checkpoint", "gc", loc, "--keep", "1", "--dry-run", "--json"]));
    assert!(!dry["deleted"].as_array().unwrap().is_empty(), "keeping 1 frees something");
    assert_eq!(count(), before, "a dry run deletes nothing");
    let done = json(&cairn(&["checkpoint", "gc", loc, "--keep", "1", "--json"]));
    assert_eq!(done["deleted"], dry["deleted"], "gc deletes what the dry run said");
    assert!(count() < before);
    assert!(cairn(&["checkpoint", "verify", loc]).status.success(), "still restorable after gc");

    // Diff against the job's own graph: compatible. Retyped: incompatible, named, exit 2.
    let ctx = StreamingContext::builder().checkpoint(loc).build().unwrap();
    let s = ctx.generator("events", 2, 40, |_, o| (o % 17, 1u64)).unwrap();
    s.update_state_by_key("counts", |_, v: Vec<u64>, _old: Option<String>| Some(v.len().to_string()))
        .print(1);
    s.update_state_by_key("extra", |_, v: Vec<u64>, _old: Option<u64>| Some(v.len() as u64)).print(1);
    let g = dir.path().join("new-graph.json");
    std::fs::write(&g, serde_json::to_string(&ctx.graph_description()).unwrap()).unwrap();
    let diff = cairn(&["checkpoint", "diff", loc, "--graph", g.to_str().unwrap()]);
    assert_eq!(diff.status.code(), Some(2), "{}", text(&diff));
    let t = text(&diff);
    assert!(
        t.contains("\"counts\"") && t.contains("state type changed") && t.contains("INCOMPATIBLE"),
        "{t}"
    );
    assert!(t.contains("new update_state_by_key operator \"extra\""), "{t}");
    assert!(t.contains("kept \"events\": unchanged"), "the source is kept: {t}");
    // With the retyped operator's state dropped (the new build's drop_state), it would start.
    let diff = cairn(&["checkpoint", "diff", loc, "--graph", g.to_str().unwrap(), "--drop", "counts"]);
    assert_eq!(diff.status.code(), Some(0), "{}", text(&diff));
    assert!(text(&diff).contains("drop operator \"counts\""), "{}", text(&diff));
    let j = json(&cairn(&[
        "checkpoint",
        "diff",
        loc,
        "--graph",
        g.to_str().unwrap(),
        "--drop",
        "counts",
        "--json",
    ]));
    assert_eq!(j["dropped"], serde_json::json!(["counts"]));
    assert_eq!(j["compatible"], true);
}

#[test]
fn damage_and_bad_locations_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    job(dir.path());
    let loc = dir.path().to_str().unwrap();
    let newest =
        std::fs::read_dir(dir.path().join("state")).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    let mut b = std::fs::read(&newest).unwrap();
    let i = b.len() / 2;
    b[i] ^= 1;
    std::fs::write(&newest, b).unwrap();
    let v = cairn(&["checkpoint", "verify", loc]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    let name = newest.file_name().unwrap().to_str().unwrap();
    assert!(text(&v).contains(name) && text(&v).contains("checksum"), "names the bad object: {}", text(&v));
    // Depending on whether the damaged object was a compacted snapshot (its deltas remain as a
    // fallback) or the newest delta, recovery falls back along another chain or to an older
    // checkpoint; either way verify says so.
    assert!(text(&v).contains("does NOT restore") || text(&v).contains("falling back"), "{}", text(&v));

    let missing = cairn(&["checkpoint", "ls", dir.path().join("nope").to_str().unwrap()]);
    assert!(!missing.status.success() && text(&missing).contains("no such directory"), "{}", text(&missing));
    let empty = tempfile::tempdir().unwrap();
    let foreign = cairn(&["checkpoint", "verify", empty.path().to_str().unwrap()]);
    assert!(
        !foreign.status.success() && text(&foreign).contains("no cairn checkpoint here"),
        "{}",
        text(&foreign)
    );
}

fn walk(p: &Path) -> usize {
    std::fs::read_dir(p)
        .map_or(0, |d| d.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
}
