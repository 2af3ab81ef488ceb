//! Operators against independently computed results, stateful operators across restarts and
//! checkpoint boundaries, and the guardrails of the context.

use cairn::{Error, OpName, StateSpec, StreamingContext, Trigger};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SEC: Duration = Duration::from_secs(1);

type Batches<T> = Arc<Mutex<Vec<Vec<T>>>>;

fn sorted<T: Ord + Clone>(b: &[T]) -> Vec<T> {
    let mut v = b.to_vec();
    v.sort();
    v
}

fn sorted_batches<T: Ord + Clone>(out: &Batches<T>) -> Vec<Vec<T>> {
    out.lock().unwrap().iter().map(|b| sorted(b)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Per-batch operators, each against a plain computation over the same batches.
    #[test]
    fn per_batch_operators_match_a_model(batches in prop::collection::vec(prop::collection::vec(-20i64..20, 0..40), 1..5),
                                         parallelism in 1usize..4) {
        let ctx = StreamingContext::builder().parallelism(parallelism).build().unwrap();
        let (q, s) = ctx.queue_stream::<i64>("in").unwrap();
        let (q2, s2) = ctx.queue_stream::<i64>("in2").unwrap();
        for b in &batches {
            q.push(b.clone());
            q2.push(b.iter().map(|x| x * 2).collect());
        }
        let mapped = cairn::testing::collect(&s.map(|x| x * 3 + 1));
        let filtered = cairn::testing::collect(&s.filter(|x| x % 3 == 0));
        let flat = cairn::testing::collect(&s.flat_map(|x| vec![x; (x.rem_euclid(3)) as usize]));
        let parts = cairn::testing::collect(&s.map_partitions(|p| vec![p.len()]));
        let unioned = cairn::testing::collect(&s.union(&s2));
        let repart = cairn::testing::collect(&s.repartition(3).transform(|_, p| vec![vec![p.len() as i64], p.concat()]));
        let counts = cairn::testing::collect(&s.count());
        let reduced = cairn::testing::collect(&s.reduce(|a, b| a + b));
        let by_value = cairn::testing::collect(&s.count_by_value());
        let keyed = s.map(|x| (x.rem_euclid(5), x));
        let rbk = cairn::testing::collect(&keyed.reduce_by_key(|a, b| a + b));
        let gbk = cairn::testing::collect(&keyed.group_by_key());
        let joined = cairn::testing::collect(&keyed.join(&s2.map(|x| (x.rem_euclid(5), x))));
        ctx.run_available().unwrap();

        prop_assert_eq!(mapped.lock().unwrap().clone(), batches.iter().map(|b| b.iter().map(|x| x * 3 + 1).collect()).collect::<Vec<Vec<_>>>());
        prop_assert_eq!(filtered.lock().unwrap().clone(), batches.iter().map(|b| b.iter().copied().filter(|x| x % 3 == 0).collect()).collect::<Vec<Vec<_>>>());
        prop_assert_eq!(flat.lock().unwrap().clone(), batches.iter().map(|b| b.iter().flat_map(|&x| vec![x; x.rem_euclid(3) as usize]).collect()).collect::<Vec<Vec<_>>>());
        prop_assert_eq!(parts.lock().unwrap().clone(), batches.iter().map(|b| vec![b.len()]).collect::<Vec<_>>());
        prop_assert_eq!(sorted_batches(&unioned), batches.iter().map(|b| sorted(&b.iter().flat_map(|&x| [x, 2 * x]).collect::<Vec<_>>())).collect::<Vec<_>>());
        for (b, got) in batches.iter().zip(repart.lock().unwrap().iter()) {
            prop_assert_eq!(got[0], 3, "repartition makes 3 partitions");
            prop_assert_eq!(sorted(&got[1..]), sorted(b));
        }
        prop_assert_eq!(counts.lock().unwrap().clone(), batches.iter().map(|b| vec![b.len() as u64]).collect::<Vec<_>>());
        prop_assert_eq!(reduced.lock().unwrap().clone(), batches.iter().map(|b| if b.is_empty() { vec![] } else { vec![b.iter().sum()] }).collect::<Vec<Vec<i64>>>());
        for (i, batch) in batches.iter().enumerate() {
            let mut m: BTreeMap<i64, u64> = BTreeMap::new();
            let mut sums: BTreeMap<i64, i64> = BTreeMap::new();
            let mut groups: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
            for &x in batch {
                *m.entry(x).or_default() += 1;
                *sums.entry(x.rem_euclid(5)).or_default() += x;
                groups.entry(x.rem_euclid(5)).or_default().push(x);
            }
            prop_assert_eq!(sorted(&by_value.lock().unwrap()[i]), m.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(sorted(&rbk.lock().unwrap()[i]), sums.into_iter().collect::<Vec<_>>());
            let got: Vec<(i64, Vec<i64>)> = sorted(&gbk.lock().unwrap()[i]).into_iter().map(|(k, v)| (k, sorted(&v))).collect();
            prop_assert_eq!(got, groups.into_iter().map(|(k, v)| (k, sorted(&v))).collect::<Vec<_>>());
            let mut want = Vec::new();
            for &a in batch {
                for &b in batch {
                    if a.rem_euclid(5) == (2 * b).rem_euclid(5) {
                        want.push((a.rem_euclid(5), (a, 2 * b)));
                    }
                }
            }
            prop_assert_eq!(sorted(&joined.lock().unwrap()[i]), sorted(&want));
        }
    }
}

#[test]
fn foreach_batch_sees_ids_and_times_on_the_grid_and_errors_fail_the_batch() {
    let ctx = StreamingContext::builder().batch_interval(Duration::from_millis(250)).build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    for _ in 0..3 {
        q.push(vec![1]);
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    s.foreach_batch(move |info, _| {
        s2.lock().unwrap().push((info.batch_id.0, info.batch_time_ms));
        Ok(())
    });
    s.print(1);
    ctx.run_available().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert_eq!(seen[1].1 - seen[0].1, 250);
    assert_eq!(seen[2].1 - seen[1].1, 250);

    let ctx = StreamingContext::builder().build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    q.push(vec![1]);
    q.push(vec![2]);
    s.foreach_batch(|info, _| {
        if info.batch_id == cairn::BatchId(1) {
            Err("downstream refused".into())
        } else {
            Ok(())
        }
    });
    let err = ctx.run_available().unwrap_err();
    assert!(matches!(&err, Error::Sink { batch: cairn::BatchId(1), .. }), "{err}");
    assert!(err.to_string().contains("downstream refused"));
}

#[test]
fn guardrails() {
    // No output operation.
    let ctx = StreamingContext::builder().build().unwrap();
    let _ = ctx.queue_stream::<u8>("in").unwrap();
    assert!(matches!(ctx.run_available(), Err(Error::Config(_))));
    // Stateful without a checkpoint location.
    let ctx = StreamingContext::builder().build().unwrap();
    let (_, s) = ctx.queue_stream::<(u8, u8)>("in").unwrap();
    s.update_state_by_key("counts", |_, v: Vec<u8>, o: Option<u8>| Some(o.unwrap_or(0) + v.len() as u8))
        .print(1);
    let err = ctx.run_available().unwrap_err().to_string();
    assert!(err.contains("counts") && err.contains("checkpoint location"), "{err}");
    // Duplicate names; window not a multiple of the batch interval.
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    let (_, s) = ctx.queue_stream::<(u8, u8)>("in").unwrap();
    s.update_state_by_key("x", |_, _v: Vec<u8>, o: Option<u8>| o).print(1);
    s.update_state_by_key("x", |_, _v: Vec<u8>, o: Option<u8>| o).print(1);
    s.window("w", Duration::from_millis(1500), SEC).print(1);
    let err = ctx.run_available().unwrap_err().to_string();
    assert!(err.contains("\"x\"") && err.contains("unique"), "{err}");
    assert!(err.contains("\"w\"") && err.contains("multiple of the batch interval"), "{err}");
    // Bad configuration.
    assert!(StreamingContext::builder().batch_interval(Duration::ZERO).build().is_err());
    assert!(StreamingContext::builder().app_name(" ").build().is_err());
}

/// A job with every stateful operator over a replayable input (the generator).
struct Outputs {
    totals: Batches<(u64, i64)>,
    timeouts: Batches<(u64, bool)>,
    windowed: Batches<i64>,
    sums_inv: Batches<(u64, i64)>,
    sums: Batches<(u64, i64)>,
    counts: Batches<u64>,
}

const KEYS: u64 = 7;

fn value(p: u32, o: u64) -> (u64, i64) {
    let x = (o * 2654435761 + p as u64 * 97) % 1000;
    // Key 6 only appears in the first 40 offsets of partition 0, so it goes idle and times out.
    let key = if x % KEYS == 6 && (p != 0 || o >= 40) { 5 } else { x % KEYS };
    (key, x as i64 - 500)
}

fn stateful_job(
    dir: &str,
    parallelism: usize,
    stop_after: u64,
    ckpt_every: u32,
) -> (StreamingContext, Outputs) {
    let ctx = StreamingContext::builder()
        .checkpoint(dir)
        .batch_interval(SEC)
        .checkpoint_interval(SEC * ckpt_every)
        // Deterministic checkpoint points (never deferred), so replay counts are exact.
        .max_checkpoint_deferral(0)
        .parallelism(parallelism)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(stop_after)
        .build()
        .unwrap();
    let ev = ctx.generator("ev", 2, 20, value).unwrap();
    let totals =
        cairn::testing::collect(&ev.update_state_by_key("totals", |_, vs: Vec<i64>, old: Option<i64>| {
            Some(old.unwrap_or(0) + vs.iter().sum::<i64>())
        }));
    let timeouts = cairn::testing::collect(
        &ev.map_with_state(
            "idle",
            StateSpec::function(|k: &u64, v: Option<i64>, st| {
                let seen = st.get().copied().unwrap_or(0u32) + 1;
                if v.is_some() {
                    st.update(seen);
                }
                (*k, st.is_timing_out())
            })
            .timeout(SEC * 3),
        ),
    );
    let windowed = cairn::testing::collect(&ev.map(|(_, v)| v).window("win", SEC * 3, SEC * 2));
    let sums_inv = cairn::testing::collect(&ev.reduce_by_key_and_window(
        "rw-inv",
        |a, b| a + b,
        Some(|a: i64, b: i64| a - b),
        SEC * 3,
        SEC,
    ));
    let sums = cairn::testing::collect(&ev.reduce_by_key_and_window(
        "rw",
        |a, b| a + b,
        None::<fn(i64, i64) -> i64>,
        SEC * 3,
        SEC,
    ));
    let counts = cairn::testing::collect(&ev.count_by_window("cw", SEC * 4, SEC * 2));
    (ctx, Outputs { totals, timeouts, windowed, sums_inv, sums, counts })
}

fn model_batches(n: u64) -> Vec<Vec<(u64, i64)>> {
    (0..n)
        .map(|b| (0..2u32).flat_map(|p| (b * 10..b * 10 + 10).map(move |o| value(p, o))).collect())
        .collect()
}

#[derive(Debug, PartialEq)]
struct Flat {
    totals: Vec<Vec<(u64, i64)>>,
    timeouts: Vec<Vec<(u64, bool)>>,
    windowed: Vec<Vec<i64>>,
    sums_inv: Vec<Vec<(u64, i64)>>,
    sums: Vec<Vec<(u64, i64)>>,
    counts: Vec<Vec<u64>>,
}

fn flatten(outs: &[Outputs]) -> Flat {
    fn cat<T: Ord + Clone>(f: impl Fn(&Outputs) -> &Batches<T>, outs: &[Outputs]) -> Vec<Vec<T>> {
        outs.iter().flat_map(|o| sorted_batches(f(o))).collect()
    }
    Flat {
        totals: cat(|o| &o.totals, outs),
        timeouts: cat(|o| &o.timeouts, outs),
        windowed: cat(|o| &o.windowed, outs),
        sums_inv: cat(|o| &o.sums_inv, outs),
        sums: cat(|o| &o.sums, outs),
        counts: cat(|o| &o.counts, outs),
    }
}

fn model(n: u64) -> Flat {
    let batches = model_batches(n);
    let mut totals = Vec::new();
    let mut state: BTreeMap<u64, i64> = BTreeMap::new();
    let mut timeouts = Vec::new();
    let mut last_seen: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut windowed, mut sums_inv, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for (b, recs) in batches.iter().enumerate() {
        let b = b as u64;
        let mut changed = BTreeSet::new();
        let mut out_t = Vec::new();
        for &(k, v) in recs {
            *state.entry(k).or_default() += v;
            changed.insert(k);
            last_seen.insert(k, b);
            out_t.push((k, false));
        }
        totals.push(changed.iter().map(|k| (*k, state[k])).collect());
        // Idle for 3 batch intervals (3 s): times out on the batch where now - last >= 3.
        let expired: Vec<u64> = last_seen.iter().filter(|(_, &l)| b - l >= 3).map(|(k, _)| *k).collect();
        for k in expired {
            last_seen.remove(&k);
            out_t.push((k, true));
        }
        timeouts.push(sorted(&out_t));
        let from = b.saturating_sub(2) as usize;
        let window: Vec<&(u64, i64)> = batches[from..=b as usize].iter().flatten().collect();
        windowed.push(if b % 2 == 0 {
            sorted(&window.iter().map(|r| r.1).collect::<Vec<_>>())
        } else {
            vec![]
        });
        let mut sums: BTreeMap<u64, i64> = BTreeMap::new();
        for r in &window {
            *sums.entry(r.0).or_default() += r.1;
        }
        sums_inv.push(sums.into_iter().collect());
        let cfrom = b.saturating_sub(3) as usize;
        counts.push(if b % 2 == 0 {
            vec![batches[cfrom..=b as usize].iter().map(|x| x.len() as u64).sum()]
        } else {
            vec![]
        });
    }
    Flat { totals, timeouts, windowed, sums: sums_inv.clone(), sums_inv, counts }
}

#[test]
fn stateful_operators_match_the_model_straight_through() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, out) = stateful_job(dir.path().to_str().unwrap(), 2, 12, 1);
    ctx.run_available().unwrap();
    let got = flatten(&[out]);
    let want = model(12);
    assert_eq!(got.totals, want.totals, "update_state_by_key");
    assert_eq!(got.timeouts, want.timeouts, "map_with_state timeouts");
    assert!(got.timeouts.iter().flatten().any(|(k, t)| *k == 6 && *t), "key 6 goes idle and times out");
    assert_eq!(got.windowed, want.windowed, "window");
    assert_eq!(got.sums_inv, want.sums_inv, "reduce_by_key_and_window with inverse");
    assert_eq!(got.sums, want.sums, "reduce_by_key_and_window without inverse");
    assert_eq!(got.counts, want.counts, "count_by_window");
}

/// Stop after k batches (graceful: final checkpoint), restart the same code (maybe at another
/// parallelism and checkpoint interval), finish: identical to the model, for every k.
#[test]
fn stateful_operators_survive_restarts_at_every_batch() {
    let want = model(12);
    for (k, p1, p2, every) in
        [(1, 2, 2, 1), (3, 2, 3, 1), (4, 1, 2, 3), (5, 3, 1, 2), (8, 2, 4, 3), (11, 2, 2, 5)]
    {
        let dir = tempfile::tempdir().unwrap();
        let loc = dir.path().to_str().unwrap();
        let (c1, o1) = stateful_job(loc, p1, k, every);
        c1.run_available().unwrap();
        let (c2, o2) = stateful_job(loc, p2, 12, every);
        let summary = c2.run_available().unwrap();
        assert_eq!(summary.replayed_batches, 0, "a graceful stop leaves nothing to replay");
        assert_eq!(
            flatten(&[o1, o2]),
            want,
            "stop after {k}, parallelism {p1} -> {p2}, checkpoint every {every}"
        );
    }
}

#[test]
fn incompatible_changes_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap().to_string();
    let build = |state: &'static str, drop: bool| {
        StreamingContext::get_or_create(&loc, |l| {
            let mut b = StreamingContext::builder()
                .checkpoint(l)
                .trigger(Trigger::AvailableNow)
                .stop_after_batches(2);
            if drop {
                b = b.drop_state("counts");
            }
            let ctx = b.build()?;
            let s = ctx.generator("g", 1, 5, |_, o| (o % 3, 1u64))?;
            match state {
                "u64" => s
                    .update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| {
                        Some(o.unwrap_or(0) + v.len() as u64)
                    })
                    .print(1),
                "string" => s
                    .update_state_by_key("counts", |_, v: Vec<u64>, _o: Option<String>| {
                        Some(v.len().to_string())
                    })
                    .print(1),
                "v2" => s
                    .update_state_by_key(
                        OpName::new("counts").with_version(2),
                        |_, v: Vec<u64>, o: Option<u64>| Some(o.unwrap_or(0) + v.len() as u64),
                    )
                    .print(1),
                _ => s.print(1),
            }
            Ok(ctx)
        })
    };
    build("u64", false).unwrap().run_available().unwrap();
    for (change, what) in [("string", "state type"), ("v2", "state version"), ("removed", "removed")] {
        let err = build(change, false).err().expect("refused");
        match &err {
            Error::Incompatible { operator, difference } => {
                assert_eq!(operator, "counts");
                assert!(difference.contains(what), "{change}: {difference}");
            }
            other => panic!("{change}: expected Incompatible, got {other}"),
        }
    }
    // Explicitly dropping the state of a retyped operator starts it empty; of a removed one, too.
    build("string", true).unwrap().run_available().unwrap();
    build("removed", true).unwrap().run_available().unwrap();
}

#[test]
fn a_second_context_on_a_running_location_is_refused_and_the_first_is_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap().to_string();
    let make = |l: &str| {
        let ctx =
            StreamingContext::builder().checkpoint(l).batch_interval(Duration::from_millis(20)).build()?;
        let s = ctx.generator("g", 1, 5, |_, o| (o % 3, 1u64))?;
        s.update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| {
            Some(o.unwrap_or(0) + v.len() as u64)
        })
        .foreach_batch(|_, _| Ok(()));
        Ok(ctx)
    };
    let first = StreamingContext::get_or_create(&loc, make).unwrap();
    let progressed = Arc::new(Mutex::new(0u64));
    let p = progressed.clone();
    first.on_batch(move |b| *p.lock().unwrap() = b.batch_id.0);
    first.start().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let err = StreamingContext::get_or_create(&loc, make).err().expect("the second is refused");
    assert!(err.to_string().contains("in use by another process"), "{err}");
    let before = *progressed.lock().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(*progressed.lock().unwrap() > before, "the first keeps running");
    first.stop();
    let summary = first.await_termination().unwrap();
    assert!(summary.new_batches > 5);
    // Once it stopped, the location can be taken again.
    StreamingContext::get_or_create(&loc, make).unwrap();
}

#[test]
fn corrupt_newest_checkpoint_is_reported_and_output_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let (c, o1) = stateful_job(loc, 2, 6, 1);
    c.run_available().unwrap();
    let newest =
        std::fs::read_dir(dir.path().join("state")).unwrap().map(|e| e.unwrap().path()).max().unwrap();
    let mut bytes = std::fs::read(&newest).unwrap();
    let i = bytes.len() / 3;
    bytes[i] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    let (c2, o2) = stateful_job(loc, 2, 12, 1);
    let summary = c2.run_available().unwrap();
    assert!(!summary.recovery_warnings.is_empty(), "the damage is reported");
    assert_eq!(summary.replayed_batches, 1, "batch 5 is replayed from the previous checkpoint");
    // Batch 5 ran twice (once before the damage, once replayed): drop the first run's copy.
    o1.totals.lock().unwrap().pop();
    o1.timeouts.lock().unwrap().pop();
    o1.windowed.lock().unwrap().pop();
    o1.sums_inv.lock().unwrap().pop();
    o1.sums.lock().unwrap().pop();
    o1.counts.lock().unwrap().pop();
    assert_eq!(flatten(&[o1, o2]), model(12));
}

#[test]
fn objects_per_batch_and_per_checkpoint_are_constant() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let count = |sub: &str| std::fs::read_dir(dir.path().join(sub)).map_or(0, |d| d.count());
    let (c, _o) = stateful_job(loc, 4, 30, 1);
    let summary = c.run_available().unwrap();
    // Five stateful operators, two sources, four partitions: still one object per checkpoint.
    assert_eq!(
        summary.log_objects, 31,
        "one plan per batch (carrying the previous commit), one final commit"
    );
    // A checkpoint is due every batch; under load some are deferred while writes are in flight.
    assert!((20..=30).contains(&summary.checkpoints), "{summary:?}");
    assert!(
        summary.checkpoint_objects <= summary.checkpoints + summary.checkpoints / 10 + 1,
        "one object per checkpoint plus compactions: {summary:?}"
    );
    // Keeping 10 checkpoints keeps their chains: at most 10 + K(10) deltas and two snapshots.
    assert!(count("state") <= 10 + 10 + 2, "retention bounds state objects: {}", count("state"));
    assert!(count("log") <= 10 + 1, "retention bounds the log: {}", count("log"));
}

#[test]
fn text_files_are_taken_exactly_once_across_restarts() {
    let input = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let add = |name: &str, lines: std::ops::Range<u32>| {
        let text: String = lines.map(|i| format!("{i}\n")).collect();
        let tmp = input.path().join(format!(".{name}"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, input.path().join(name)).unwrap();
    };
    let run = || {
        let ctx = StreamingContext::builder()
            .checkpoint(ckpt.path().to_str().unwrap())
            .trigger(Trigger::AvailableNow)
            .build()
            .unwrap();
        let s = ctx
            .text_file_stream_parsed("files", input.path().to_str().unwrap(), 2, |l| {
                l.parse::<u32>().map_err(|e| e.to_string())
            })
            .unwrap();
        let out = cairn::testing::collect(&s);
        ctx.run_available().unwrap();
        let v = out.lock().unwrap().clone();
        v
    };
    for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        add(name, (i as u32 * 10)..(i as u32 * 10 + 10));
    }
    let first = run();
    assert_eq!(first.len(), 3, "two files per batch: 2 + 2 + 1");
    add("f", 50..60);
    add("0-late-but-earlier-name", 60..70);
    let second = run();
    let mut all: Vec<u32> = first.into_iter().chain(second).flatten().collect();
    all.sort();
    assert_eq!(all, (0..70).collect::<Vec<_>>(), "every line exactly once");
}

/// Partitions of two topics, one with `-` in its name, named the way a Kafka source names them;
/// format versions 1 and 2 stored them as `"<topic>-<partition>"` strings.
struct TwoTopics;

impl cairn::source::Source for TwoTopics {
    type Item = (String, u64);
    fn plan(&self, pos: &cairn::source::Positions) -> Result<Vec<cairn::OffsetRange>, cairn::UserError> {
        let ranges = [("t", 0), ("a-b", 1)].map(|(topic, p)| {
            let partition = cairn::SourcePartition::topic(topic, p);
            let start = pos.get(&partition).copied().unwrap_or(0);
            cairn::OffsetRange { partition, start, end: start + 2 + p as u64 }
        });
        Ok(ranges.to_vec())
    }
    fn read(&self, r: &cairn::OffsetRange) -> Result<Vec<(String, u64)>, cairn::UserError> {
        let cairn::SourcePartition::Topic { topic, partition } = &r.partition else {
            return Err(format!("{} is not a topic's partition", r.partition).into());
        };
        Ok((r.start..r.end).map(|o| (format!("{topic}/{partition}"), o)).collect())
    }
    fn legacy_partition(&self, key: &str) -> Result<cairn::SourcePartition, cairn::UserError> {
        let (topic, p) = key.rsplit_once('-').ok_or("no partition number")?;
        Ok(cairn::SourcePartition::topic(topic, p.parse::<i32>().map_err(|e| e.to_string())?))
    }
}

type Seen = Arc<Mutex<BTreeMap<u64, Vec<(String, u64)>>>>;

fn two_topics_job(dir: &str, batches: u64) -> (StreamingContext, Seen) {
    let ctx = StreamingContext::builder()
        .checkpoint(dir)
        .batch_interval(SEC)
        .checkpoint_interval(SEC)
        .max_checkpoint_deferral(0)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(batches)
        .build()
        .unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    ctx.source("in", TwoTopics).unwrap().foreach_batch(move |info, parts| {
        let mut all = parts;
        all.sort();
        s.lock().unwrap().insert(info.batch_id.0, all);
        Ok(())
    });
    (ctx, seen)
}

/// A location whose positions and logged plans hold the string partitions of format versions 1
/// and 2 restarts with the source's typed partitions: the logged batch replays the same records,
/// the job continues where it was, and its next checkpoint keeps typed positions only.
#[test]
fn string_partitions_of_older_formats_restart_as_the_sources_typed_partitions() {
    use cairn::checkpoint::{paths, BatchPlan, CheckpointKind, CheckpointStore, SourcePlan, TableWriter};
    let fresh = tempfile::tempdir().unwrap();
    let (ctx, want) = two_topics_job(fresh.path().to_str().unwrap(), 6);
    ctx.run_available().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let location = dir.path().to_str().unwrap();
    let (ctx, _) = two_topics_job(location, 3);
    ctx.run_available().unwrap();
    // Rewrite the location as an older format kept it: positions under `$source/in` keyed by
    // postcard strings, and batch 3 planned with string partitions but never run.
    let store = CheckpointStore::open(location).unwrap();
    let lease = store.acquire_lease(Duration::from_secs(5)).unwrap();
    let mut state = store.recover().unwrap().state.expect("a checkpoint");
    assert_eq!(state.batch_id.0, 2);
    let typed = state.tables.iter().position(|t| t.id == paths::source_table("in")).expect("typed positions");
    let mut legacy = TableWriter::new();
    let mut next = BTreeMap::new();
    for entry in state.tables[typed].reader() {
        let (k, v) = entry.unwrap();
        let key = match cairn::SourcePartition::from_key_bytes(k).unwrap() {
            cairn::SourcePartition::Topic { topic, partition } => format!("{topic}-{partition}"),
            other => panic!("{other:?}"),
        };
        next.insert(key.clone(), v.unwrap().to_vec());
        // postcard: a one-byte length (short strings), then the bytes.
        legacy.put(&[&[key.len() as u8][..], key.as_bytes()].concat(), v.unwrap());
    }
    assert_eq!(next.len(), 2);
    state.tables[typed] = legacy.finish(paths::legacy_source_table("in"));
    for (name, _) in store.list_objects().unwrap() {
        if matches!(
            name,
            cairn::checkpoint::paths::ObjectName::Full(_)
                | cairn::checkpoint::paths::ObjectName::Delta { .. }
        ) {
            store.delete_object(name).unwrap();
        }
    }
    store
        .write_checkpoint(&cairn::checkpoint::StateCheckpoint {
            batch_id: state.batch_id,
            kind: CheckpointKind::Full,
            created_ms: 0,
            graph: state.graph,
            tables: state.tables,
            epoch: 0,
        })
        .unwrap();
    let ranges = [("t-0", 2u64), ("a-b-1", 3)]
        .map(|(key, n)| {
            let start = 3 * n;
            cairn::OffsetRange { partition: cairn::SourcePartition::named(key), start, end: start + n }
        })
        .to_vec();
    let batch_2 = store.read_plan(cairn::BatchId(2)).unwrap();
    store
        .write_plan(&BatchPlan {
            batch_id: cairn::BatchId(3),
            batch_time_ms: batch_2.batch_time_ms + 1000,
            planned_at_ms: 0,
            sources: vec![SourcePlan { source: "in".into(), ranges }],
            previous_commit: None,
            previous_plan: None,
            epoch: 0,
        })
        .unwrap();
    lease.release().unwrap();

    let (ctx, got) = two_topics_job(location, 6);
    let summary = ctx.run_available().unwrap();
    assert_eq!((summary.replayed_batches, summary.new_batches), (1, 2));
    let want: Vec<_> = want.lock().unwrap().range(3..).map(|(b, r)| (*b, r.clone())).collect();
    let got: Vec<_> = got.lock().unwrap().range(3..).map(|(b, r)| (*b, r.clone())).collect();
    assert_eq!(got, want, "the replayed batch read the typed partitions, and the job went on from them");
    let state = CheckpointStore::open(location).unwrap().recover().unwrap().state.unwrap();
    let ids: Vec<_> = state.tables.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, vec![paths::source_table("in")], "the chain after the upgrade holds typed keys only");
}

/// A job whose keys keep appearing (so state changed since the last checkpoint includes keys
/// the checkpoint never saw) and whose sink fails transiently once at `fail_at`.
fn growing_keys_job(dir: &str, fail_at: Option<u64>) -> (StreamingContext, Seen) {
    let ctx = StreamingContext::builder()
        .checkpoint(dir)
        .batch_interval(SEC)
        .checkpoint_interval(SEC * 4)
        .max_checkpoint_deferral(0)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(12)
        .build()
        .unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let failed = std::sync::atomic::AtomicBool::new(false);
    let counts = ctx
        .generator("ev", 2, 10, |p, o| (o / 3 + u64::from(p) * 1000, 1u64))
        .unwrap()
        .update_state_by_key("counts", |_, vs: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + vs.iter().sum::<u64>())
        })
        .map(|(k, n)| (k.to_string(), n));
    counts.foreach_batch(move |info, mut parts| {
        if Some(info.batch_id.0) == fail_at && !failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(cairn::Transient::wrap("the database is restarting"));
        }
        parts.sort();
        s.lock().unwrap().insert(info.batch_id.0, parts);
        Ok(())
    });
    (ctx, seen)
}

/// A sink's transient failure restarts the job in place from its checkpoint: operators forget
/// what the failed run had added since, the logged batches replay, and every batch's output
/// equals an uninterrupted run's. A final sink error still stops the job at once.
#[test]
fn a_transient_sink_failure_restarts_in_place_with_state_as_if_it_ran_once() {
    let fresh = tempfile::tempdir().unwrap();
    let (ctx, want) = growing_keys_job(fresh.path().to_str().unwrap(), None);
    ctx.run_available().unwrap();

    // At batch 2 nothing is checkpointed yet (the first checkpoint follows batch 3): the restart
    // starts from empty state and replays 0..=2. At batch 6 it restores batch 3's checkpoint and
    // replays 4..=6.
    for fail_at in [2, 6] {
        let dir = tempfile::tempdir().unwrap();
        let (ctx, got) = growing_keys_job(dir.path().to_str().unwrap(), Some(fail_at));
        let summary = ctx.run_available().expect("the sink's outage is ridden out");
        assert_eq!(summary.restarts, 1);
        assert_eq!(summary.replayed_batches, 3, "failing at {fail_at}: {summary:?}");
        assert_eq!(*got.lock().unwrap(), *want.lock().unwrap(), "failing at {fail_at}");
    }

    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    ctx.generator("ev", 1, 5, |_, o| o).unwrap().foreach_batch(|_, _| Err("malformed row".into()));
    let err = ctx.run_available().unwrap_err();
    assert!(!err.is_transient() && err.to_string().contains("malformed row"), "{err}");
}
