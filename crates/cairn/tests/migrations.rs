//! State migrations across a code upgrade: a job runs and checkpoints with version 1 of an
//! operator's state, the same location restarts with version 2 code and a declared migration,
//! and the output from then on equals a run of the version 2 code from scratch over the same
//! input. Changes without a migration that reads the stored state are refused by name.

use cairn::{Error, OpName, StateSpec, StreamingContext, Trigger};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);
const BATCHES: usize = 10;

/// Batch id -> that batch's output, sorted.
type Rec<T> = Arc<Mutex<BTreeMap<u64, Vec<T>>>>;

fn record<T: Ord + Clone + Send + Sync + 'static>(s: &cairn::DStream<T>) -> Rec<T> {
    let rec: Rec<T> = Arc::default();
    let r = rec.clone();
    s.foreach_batch(move |info, mut data| {
        data.sort();
        r.lock().unwrap().insert(info.batch_id.0, data);
        Ok(())
    });
    rec
}

/// Deterministic input: batch `b` holds 12 records over keys 0..5.
fn input() -> Vec<Vec<(u8, i64)>> {
    (0..BATCHES as i64)
        .map(|b| (0..12).map(|i| (((b * 7 + i * 3) % 5) as u8, b * 10 + i)).collect())
        .collect()
}

/// A context on `dir` with the test's settings (a checkpoint every other batch, never deferred,
/// stop after `stop` batches of the location), and its queue source `in` holding the input.
fn start(
    dir: &str,
    interval: Duration,
    stop: u64,
    drop: Option<&str>,
) -> cairn::Result<(StreamingContext, cairn::DStream<(u8, i64)>)> {
    let mut b = StreamingContext::builder()
        .checkpoint(dir)
        .batch_interval(interval)
        .checkpoint_interval(interval * 2)
        .max_checkpoint_deferral(0)
        .parallelism(2)
        .stop_after_batches(stop)
        .trigger(Trigger::AvailableNow);
    if let Some(op) = drop {
        b = b.drop_state(op);
    }
    let ctx = b.build()?;
    let (q, s) = ctx.queue_stream::<(u8, i64)>("in")?;
    for b in input() {
        q.push(b);
    }
    Ok((ctx, s))
}

/// Version 2 of the state: the count and sum of version 1, and the largest value seen.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Stats {
    count: u64,
    sum: i64,
    /// Version 1 did not keep it: migrated keys start from `None` and pick it up from new data.
    max: Option<i64>,
}

/// Which code a run uses.
#[derive(Clone, Copy, PartialEq)]
enum Code {
    /// `(count, sum)` tuples, state version 1.
    V1,
    /// `Stats`, state version 2, with a migration from version 1.
    V2,
    /// `Stats`, state version 2, no migration.
    V2Unmigrated,
    /// `Stats`, state version 2, a migration from version 1 that expects another old type.
    V2WrongMigration,
}

/// The job: per key, `update_state_by_key("stats")` over the first `batches` batches, stopping
/// after `stop` batches of this run's location, checkpointing every other batch (so a restart
/// replays the batch after the last checkpoint).
fn run(dir: &str, code: Code, stop: u64) -> cairn::Result<Rec<(u8, Stats)>> {
    let (ctx, s) = start(dir, SEC, stop, None)?;
    let out = match code {
        Code::V1 => {
            let v1 = s.update_state_by_key("stats", |_, vs: Vec<i64>, old: Option<(u64, i64)>| {
                let (c, t) = old.unwrap_or((0, 0));
                Some((c + vs.len() as u64, t + vs.iter().sum::<i64>()))
            });
            record(&v1.map(|(k, (count, sum))| (k, Stats { count, sum, max: None })))
        }
        _ => {
            let name = OpName::new("stats").with_version(2);
            let name = match code {
                Code::V2 => {
                    name.migrate_from(1, |(count, sum): (u64, i64)| Some(Stats { count, sum, max: None }))
                }
                Code::V2WrongMigration => {
                    name.migrate_from(1, |count: u64| Some(Stats { count, sum: 0, max: None }))
                }
                _ => name,
            };
            record(&s.update_state_by_key(name, |_, vs: Vec<i64>, old: Option<Stats>| {
                let old = old.unwrap_or(Stats { count: 0, sum: 0, max: None });
                Some(Stats {
                    count: old.count + vs.len() as u64,
                    sum: old.sum + vs.iter().sum::<i64>(),
                    max: vs.iter().copied().chain(old.max).max(),
                })
            }))
        }
    };
    let summary = ctx.run_available()?;
    assert_eq!(summary.next_batch.0, stop);
    Ok(out)
}

/// `max` is what version 1 could not know: compared separately.
fn counts(r: &Rec<(u8, Stats)>) -> BTreeMap<u64, Vec<(u8, u64, i64)>> {
    r.lock()
        .unwrap()
        .iter()
        .map(|(b, v)| (*b, v.iter().map(|(k, s)| (*k, s.count, s.sum)).collect()))
        .collect()
}

#[test]
fn a_v1_location_restarts_with_v2_code_and_a_migration_and_matches_a_v2_run_from_scratch() {
    let scratch = tempfile::tempdir().unwrap();
    let v2_alone = run(scratch.path().to_str().unwrap(), Code::V2, BATCHES as u64).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    run(loc, Code::V1, 5).unwrap();
    let migrated = run(loc, Code::V2, 8).unwrap();
    // The first checkpoint after the migration is a full snapshot at version 2, so the next
    // restart needs no migration: version 2 code without one continues.
    let fulls: Vec<u64> = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .filter_map(|e| {
            e.unwrap().file_name().to_string_lossy().strip_suffix(".full").map(|b| b.parse().unwrap())
        })
        .collect();
    assert!(fulls.iter().any(|b| *b >= 5), "no full snapshot after the migration: {fulls:?}");
    let continued = run(loc, Code::V2Unmigrated, BATCHES as u64).unwrap();

    // The version 1 run stopped cleanly after batch 4 (its final checkpoint holds it); from
    // batch 5 on, counts and sums equal the version 2 run's.
    let mut got = counts(&migrated);
    got.extend(counts(&continued));
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), (5..BATCHES as u64).collect::<Vec<_>>());
    let want: BTreeMap<u64, _> = counts(&v2_alone).into_iter().filter(|(b, _)| *b >= 5).collect();
    assert_eq!(got, want);
    // The new field starts empty for migrated keys and is filled by the data that follows.
    for rec in [&migrated, &continued] {
        for (b, rows) in rec.lock().unwrap().iter() {
            for (k, s) in rows {
                assert!(s.max.is_some(), "batch {b} key {k}: a key updated by new data has its max");
            }
        }
    }
}

#[test]
fn a_version_change_without_a_migration_that_reads_the_stored_state_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    run(loc, Code::V1, 3).unwrap();
    match run(loc, Code::V2Unmigrated, 6) {
        Err(Error::Incompatible { operator, difference }) => {
            assert_eq!(operator, "stats");
            assert!(difference.contains("state version changed from 1 to 2"), "{difference}");
            assert!(difference.contains("migrate_from"), "says how to migrate: {difference}");
            assert!(difference.contains("drop_state"), "says how to drop: {difference}");
        }
        other => panic!("expected Error::Incompatible, got {:?}", other.map(|_| ())),
    }
    match run(loc, Code::V2WrongMigration, 6) {
        Err(Error::Incompatible { operator, difference }) => {
            assert_eq!(operator, "stats");
            assert!(difference.contains("from versions [1]"), "{difference}");
            assert!(
                difference.contains("state version 1 of type (u64, i64)"),
                "names what is stored: {difference}"
            );
        }
        other => panic!("expected Error::Incompatible, got {:?}", other.map(|_| ())),
    }
    // Nothing was written by the refused starts: the right code still migrates and runs.
    run(loc, Code::V2, 6).unwrap();
}

#[test]
fn a_migration_can_drop_keys_and_migrates_map_with_state() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let start = |version: u32, stop: u64| -> cairn::Result<Rec<(u8, i64)>> {
        let (ctx, s) = start(loc, SEC, stop, None)?;
        let out = if version == 1 {
            // Version 1 keeps the sum as a string (a mistake version 2 fixes).
            let spec = StateSpec::function(|k: &u8, v: Option<i64>, st: &mut cairn::State<'_, String>| {
                let t = st.get().map_or(0, |s| s.parse::<i64>().unwrap()) + v.unwrap_or(0);
                st.update(t.to_string());
                (*k, t)
            });
            s.map_with_state("sums", spec)
        } else {
            let name = OpName::new("sums")
                .with_version(2)
                .migrate_from(1, |old: String| (old.parse::<i64>().ok()).filter(|t| t % 2 == 0));
            let spec = StateSpec::function(|k: &u8, v: Option<i64>, st: &mut cairn::State<'_, i64>| {
                let t = st.get().copied().unwrap_or(0) + v.unwrap_or(0);
                st.update(t);
                (*k, t)
            });
            s.map_with_state(name, spec)
        };
        let rec = record(&out.reduce_by_key(|a, b| a.max(b)));
        ctx.run_available()?;
        Ok(rec)
    };
    let v1 = start(1, 3).unwrap();
    let before: BTreeMap<u8, i64> = v1.lock().unwrap()[&2].iter().copied().collect();
    let v2 = start(2, 4).unwrap();
    let after: BTreeMap<u8, i64> = v2.lock().unwrap()[&3].iter().copied().collect();
    let batch3: Vec<(u8, i64)> = input()[3].clone();
    for (k, total) in after {
        let added: i64 = batch3.iter().filter(|(x, _)| *x == k).map(|(_, v)| v).sum();
        // Odd totals were dropped by the migration and start again from this batch's values.
        let kept = before.get(&k).copied().filter(|t| t % 2 == 0).unwrap_or(0);
        assert_eq!(total, kept + added, "key {k}: before {:?}", before.get(&k));
    }
}

#[test]
fn migration_mistakes_are_refused_at_start_naming_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    let (_q, s) = ctx.queue_stream::<(u8, i64)>("in").unwrap();
    // Produces a u32 where the state is an i64; migrates from the current version; migrates a
    // window.
    s.update_state_by_key(
        OpName::new("a").with_version(2).migrate_from(1, |x: u64| Some(x as u32)),
        |_, v: Vec<i64>, o: Option<i64>| Some(o.unwrap_or(0) + v.len() as i64),
    )
    .print(1);
    s.update_state_by_key(
        OpName::new("b").with_version(2).migrate_from(2, |x: i64| Some(x)),
        |_, v: Vec<i64>, o: Option<i64>| Some(o.unwrap_or(0) + v.len() as i64),
    )
    .print(1);
    s.window(OpName::new("c").with_version(2).migrate_from(1, |x: i64| Some(x)), SEC * 2, SEC).print(1);
    let err = ctx.run_available().unwrap_err().to_string();
    for want in [
        "operator \"a\": the migration from version 1 produces u32 but the operator's state is i64",
        "operator \"b\" is at state version 2: a migration from version 2 must come from an older one",
        "operator \"c\": window state cannot be migrated",
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
}

/// Names a run gives its two stateful operators: a keyed count and a window's sum.
struct Names {
    counts: OpName,
    window: OpName,
}

/// Counts per key and a two-batch window per key, each batch's output as `(tag, key, value)`.
fn renamed_job(dir: &str, names: Names, stop: u64) -> cairn::Result<Rec<(u8, u8, i64)>> {
    let (ctx, s) = start(dir, SEC, stop, None)?;
    let counts = s
        .update_state_by_key(names.counts, |_, vs: Vec<i64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + vs.len() as u64)
        })
        .map(|(k, c)| (0u8, k, c as i64));
    let sums =
        s.reduce_by_key_and_window(names.window, |a, b| a + b, None::<fn(i64, i64) -> i64>, SEC * 2, SEC);
    let out = record(&counts.union(&sums.map(|(k, v)| (1u8, k, v))));
    let summary = ctx.run_available()?;
    assert_eq!(summary.next_batch.0, stop);
    Ok(out)
}

#[test]
fn a_renamed_operator_keeps_its_state_through_its_former_name() {
    let names = |c: &str, w: &str| Names { counts: OpName::new(c), window: OpName::new(w) };
    let scratch = tempfile::tempdir().unwrap();
    let straight =
        renamed_job(scratch.path().to_str().unwrap(), names("tallies", "sums"), BATCHES as u64).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    renamed_job(loc, names("counts", "w"), 5).unwrap();
    // Without the former names the stored state would be lost: refused.
    match renamed_job(loc, names("tallies", "sums"), 7) {
        Err(Error::Incompatible { operator, difference }) => {
            assert_eq!(operator, "counts");
            assert!(
                difference.contains("was removed from the job but the checkpoint holds its state"),
                "{difference}"
            );
        }
        other => panic!("expected Error::Incompatible, got {:?}", other.map(|_| ())),
    }
    let renamed = Names {
        counts: OpName::new("tallies").renamed_from("counts"),
        window: OpName::new("sums").renamed_from("w"),
    };
    let after = renamed_job(loc, renamed, 8).unwrap();
    // The rename was checkpointed as a full snapshot under the new names: the former names are
    // no longer needed.
    let more = renamed_job(loc, names("tallies", "sums"), BATCHES as u64).unwrap();
    let mut got = after.lock().unwrap().clone();
    got.extend(more.lock().unwrap().clone());
    let want: BTreeMap<u64, _> =
        straight.lock().unwrap().clone().into_iter().filter(|(b, _)| *b >= 5).collect();
    assert_eq!(got, want);
}

#[test]
fn a_former_name_that_is_still_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clash = Names { counts: OpName::new("tallies").renamed_from("w"), window: OpName::new("w") };
    let err = renamed_job(dir.path().to_str().unwrap(), clash, 2).map(|_| ()).unwrap_err().to_string();
    assert!(
        err.contains(
            "operator \"tallies\" is renamed from \"w\", but the job still has an operator named \"w\""
        ),
        "{err}"
    );
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct ProfileV1 {
    visits: u64,
}

/// Version 1 plus a field with a default: no migration needed when stored self-describing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct ProfileV2 {
    visits: u64,
    #[serde(default)]
    largest: Option<i64>,
}

/// A field's type changed: old values cannot be read as it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct ProfileBad {
    visits: String,
}

/// Per key, `update_state_by_key("profiles")` with `S`, its output as `(key, visits)`.
fn profiles<S: cairn::StateData + cairn::Data + Ord>(
    dir: &str,
    name: OpName,
    stop: u64,
    f: fn(Option<S>, &[i64]) -> S,
    visits: fn(&S) -> u64,
) -> cairn::Result<Rec<(u8, u64)>> {
    let (ctx, s) = start(dir, SEC, stop, None)?;
    let out = s.update_state_by_key(name, move |_, vs: Vec<i64>, old: Option<S>| Some(f(old, &vs)));
    let rec = record(&out.map(move |(k, st)| (k, visits(&st))));
    ctx.run_available()?;
    Ok(rec)
}

fn v1(old: Option<ProfileV1>, vs: &[i64]) -> ProfileV1 {
    ProfileV1 { visits: old.map_or(0, |o| o.visits) + vs.len() as u64 }
}

fn v2(old: Option<ProfileV2>, vs: &[i64]) -> ProfileV2 {
    let old = old.unwrap_or(ProfileV2 { visits: 0, largest: None });
    ProfileV2 { visits: old.visits + vs.len() as u64, largest: vs.iter().copied().chain(old.largest).max() }
}

fn bad(old: Option<ProfileBad>, vs: &[i64]) -> ProfileBad {
    ProfileBad { visits: format!("{}{}", old.map_or(String::new(), |o| o.visits), vs.len()) }
}

#[test]
fn self_describing_state_takes_an_added_field_without_a_migration_and_refuses_a_retyped_one_clearly() {
    let json = || OpName::new("profiles").self_describing();
    let scratch = tempfile::tempdir().unwrap();
    let want = profiles(scratch.path().to_str().unwrap(), json(), 8, v2, |s| s.visits).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    profiles(loc, json(), 4, v1, |s| s.visits).unwrap();
    // The stored values are JSON with field names: readable as data without the type.
    let (_, rows) = cairn::checkpoint::savepoint::export(
        &cairn::checkpoint::CheckpointStore::open(loc).unwrap(),
        "profiles",
    )
    .unwrap();
    assert!(rows.iter().all(|r| r["state"]["visits"].is_u64()), "{rows:?}");

    // A field's type changed: the restore stops, naming the operator and showing the value.
    let err = profiles(loc, json(), 6, bad, |_| 0).map(|_| ()).unwrap_err().to_string();
    assert!(
        err.contains("profiles") && err.contains("cannot read a stored JSON value") && err.contains("visits"),
        "{err}"
    );

    // A field added with a default: same version, no migration, the visits go on exactly.
    let after = profiles(loc, json(), 8, v2, |s| s.visits).unwrap();
    let want: BTreeMap<u64, _> = want.lock().unwrap().clone().into_iter().filter(|(b, _)| *b >= 4).collect();
    assert_eq!(*after.lock().unwrap(), want);
    let want_4_5: BTreeMap<u64, _> = want.clone().into_iter().filter(|(b, _)| *b < 6).collect();

    // The compact encoding cannot take the same change: its values are positional.
    let compact = tempfile::tempdir().unwrap();
    let cloc = compact.path().to_str().unwrap();
    profiles(cloc, OpName::new("profiles"), 4, v1, |s| s.visits).unwrap();
    match profiles(cloc, OpName::new("profiles"), 6, v2, |s| s.visits) {
        Err(Error::Incompatible { difference, .. }) => {
            assert!(difference.contains("state type changed"), "{difference}")
        }
        other => panic!("expected Error::Incompatible, got {:?}", other.map(|_| ())),
    }
    // Switching the encoding is a migration from the old version, same type.
    let switched =
        OpName::new("profiles").self_describing().with_version(2).migrate_from(1, |p: ProfileV1| Some(p));
    let after = profiles(cloc, switched, 6, v1, |s| s.visits).unwrap();
    assert_eq!(*after.lock().unwrap(), want_4_5);
}

/// Counts per key and, when `window`, a two-batch window's sum; each batch's output with its
/// batch time.
fn interval_job(
    dir: &str,
    interval: Duration,
    window: bool,
    drop: bool,
    stop: u64,
) -> cairn::Result<Rec<(i64, u8, u64)>> {
    let (ctx, s) = start(dir, interval, stop, drop.then_some("w"))?;
    let counts = s.update_state_by_key("counts", |_, vs: Vec<i64>, old: Option<u64>| {
        Some(old.unwrap_or(0) + vs.len() as u64)
    });
    let timed = counts.transform(|info, parts| {
        parts.into_iter().map(|p| p.into_iter().map(|(k, c)| (info.batch_time_ms, k, c)).collect()).collect()
    });
    if window {
        s.window("w", interval * 2, interval).print(1);
    }
    let rec = record(&timed);
    ctx.run_available()?;
    Ok(rec)
}

#[test]
fn the_batch_interval_can_change_unless_a_window_depends_on_it() {
    let scratch = tempfile::tempdir().unwrap();
    let want = interval_job(scratch.path().to_str().unwrap(), SEC, false, false, 7).unwrap();
    let want: BTreeMap<u64, Vec<(u8, u64)>> = want
        .lock()
        .unwrap()
        .iter()
        .map(|(b, v)| (*b, v.iter().map(|(_, k, c)| (*k, *c)).collect()))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let before = interval_job(loc, SEC, false, false, 4).unwrap();
    let last_time = before.lock().unwrap()[&3][0].0;
    // Nothing stored depends on the interval: the job goes on every 2 s of batch time, from
    // where it was, and its state is intact.
    let after = interval_job(loc, SEC * 2, false, false, 7).unwrap();
    let after = after.lock().unwrap().clone();
    let times: Vec<i64> = after.values().map(|v| v[0].0).collect();
    assert_eq!(times, vec![last_time + 2000, last_time + 4000, last_time + 6000]);
    let counts: BTreeMap<u64, Vec<(u8, u64)>> =
        after.iter().map(|(b, v)| (*b, v.iter().map(|(_, k, c)| (*k, *c)).collect())).collect();
    assert_eq!(counts, want.into_iter().filter(|(b, _)| *b >= 4).collect());

    // A window keeps batches of the old interval: refused, naming it, unless its state goes.
    let w = tempfile::tempdir().unwrap();
    let wloc = w.path().to_str().unwrap();
    interval_job(wloc, SEC, true, false, 3).unwrap();
    let err = interval_job(wloc, SEC * 2, true, false, 5).map(|_| ()).unwrap_err().to_string();
    assert!(
        err.contains("batch interval of 1000 ms") && err.contains("2000 ms") && err.contains("[\"w\"]"),
        "{err}"
    );
    interval_job(wloc, SEC * 2, true, true, 5).unwrap();
}
