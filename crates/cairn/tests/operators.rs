//! Stateless and per-batch operators against results computed here with plain loops and
//! `BTreeMap`s, plus the context's guardrails (configuration errors, sink errors, lifecycle).
//!
//! Every job reads `queue_stream`s under `Trigger::AvailableNow` (via `run_available`): each
//! pushed `Vec` is exactly one batch, so batch `i` of every output corresponds to pushed `Vec` `i`.

use cairn::{Error, StreamingContext};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Batches<T> = Arc<Mutex<Vec<Vec<T>>>>;

fn sorted<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn batches_of<T: Clone>(out: &Batches<T>) -> Vec<Vec<T>> {
    out.lock().unwrap().clone()
}

fn sorted_batches<T: Ord + Clone>(out: &Batches<T>) -> Vec<Vec<T>> {
    out.lock().unwrap().iter().map(|b| sorted(b)).collect()
}

/// Random input: 1..6 batches of 0..30 small integers (empty batches included on purpose).
fn input() -> impl Strategy<Value = Vec<Vec<i32>>> {
    prop::collection::vec(prop::collection::vec(-9i32..10, 0..30), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// map, filter, flat_map, map_partitions, union (with another stream and with itself),
    /// transform and repartition.
    #[test]
    fn element_wise_operators_match_plain_loops(batches in input(), parallelism in 1usize..5, n in 0usize..6) {
        let ctx = StreamingContext::builder().parallelism(parallelism).build().unwrap();
        let (q, s) = ctx.queue_stream::<i32>("nums").unwrap();
        let (q2, s2) = ctx.queue_stream::<i32>("other").unwrap();
        for (i, b) in batches.iter().enumerate() {
            q.push(b.clone());
            q2.push((0..i as i32).map(|x| 100 + x).collect());
        }
        let mapped = cairn::testing::collect(&s.map(|x| (x * 7 - 3) as i64));
        let filtered = cairn::testing::collect(&s.filter(|x| x.rem_euclid(3) != 1));
        let flat = cairn::testing::collect(&s.flat_map(|x| (0..x.rem_euclid(4)).map(move |i| x * 10 + i)));
        let sums = cairn::testing::collect(&s.map_partitions(|p| vec![(p.len(), p.iter().map(|&x| x as i64).sum::<i64>())]));
        let unioned = cairn::testing::collect(&s.union(&s2));
        let self_union = cairn::testing::collect(&s.union(&s));
        let infos = Arc::new(Mutex::new(Vec::new()));
        let i2 = infos.clone();
        let transformed = cairn::testing::collect(&s.transform(move |info, parts| {
            i2.lock().unwrap().push(info.batch_id.0);
            // One partition per source range: record the shape, then reverse the elements.
            let shape = parts.len();
            let mut all: Vec<i32> = parts.into_iter().flatten().collect();
            all.reverse();
            vec![vec![shape as i32], all]
        }));
        // The partitions a repartition produces, seen through map_partitions (sizes) and
        // transform (count and content).
        let rp = s.repartition(n);
        let rp_sizes = cairn::testing::collect(&rp.map_partitions(|p| vec![p.len()]));
        let rp_shape = cairn::testing::collect(&rp.transform(|_, parts| vec![vec![parts.len() as i32]]));
        let rp_all = cairn::testing::collect(&rp);
        ctx.run_available().unwrap();

        let nb = batches.len();
        prop_assert_eq!(batches_of(&mapped), batches.iter().map(|b| b.iter().map(|&x| (x * 7 - 3) as i64).collect()).collect::<Vec<Vec<_>>>());
        let mut want_f = Vec::new();
        let mut want_flat = Vec::new();
        let mut want_sums = Vec::new();
        for b in &batches {
            let mut f = Vec::new();
            let mut fl = Vec::new();
            let mut sum = 0i64;
            for &x in b {
                if x.rem_euclid(3) != 1 {
                    f.push(x);
                }
                for i in 0..x.rem_euclid(4) {
                    fl.push(x * 10 + i);
                }
                sum += x as i64;
            }
            want_f.push(f);
            want_flat.push(fl);
            want_sums.push(vec![(b.len(), sum)]);
        }
        prop_assert_eq!(batches_of(&filtered), want_f);
        prop_assert_eq!(batches_of(&flat), want_flat);
        prop_assert_eq!(batches_of(&sums), want_sums, "the queue gives one partition per batch");
        for (i, b) in batches.iter().enumerate() {
            let mut u: Vec<i32> = b.clone();
            u.extend((0..i as i32).map(|x| 100 + x));
            prop_assert_eq!(sorted(&unioned.lock().unwrap()[i]), sorted(&u));
            let mut twice = b.clone();
            twice.extend(b.iter().copied());
            prop_assert_eq!(sorted(&self_union.lock().unwrap()[i]), sorted(&twice));
            let mut rev = b.clone();
            rev.reverse();
            let mut want_t = vec![1];
            want_t.extend(rev);
            prop_assert_eq!(&transformed.lock().unwrap()[i], &want_t);
            // Repartition: n (at least 1) partitions, round robin, same multiset.
            let parts = n.max(1);
            prop_assert_eq!(&rp_shape.lock().unwrap()[i], &vec![parts as i32]);
            let want_sizes: Vec<usize> = (0..parts).map(|p| b.len() / parts + usize::from(p < b.len() % parts)).collect();
            prop_assert_eq!(&rp_sizes.lock().unwrap()[i], &want_sizes);
            prop_assert_eq!(sorted(&rp_all.lock().unwrap()[i]), sorted(b));
        }
        prop_assert_eq!(infos.lock().unwrap().clone(), (0..nb as u64).collect::<Vec<_>>());
        prop_assert_eq!(mapped.lock().unwrap().len(), nb);
    }

    /// count, count_by_value, reduce, reduce_by_key, group_by_key, per batch.
    #[test]
    fn aggregations_match_plain_loops(batches in input(), parallelism in 1usize..5, spread in 1usize..4) {
        let ctx = StreamingContext::builder().parallelism(parallelism).build().unwrap();
        let (q, s) = ctx.queue_stream::<i32>("nums").unwrap();
        for b in &batches {
            q.push(b.clone());
        }
        // Spread over several partitions first so the partial aggregates are combined.
        let s = s.repartition(spread);
        let counts = cairn::testing::collect(&s.count());
        let by_value = cairn::testing::collect(&s.count_by_value());
        let reduced = cairn::testing::collect(&s.map(|x| x as i64).reduce(|a, b| a + b));
        let maxed = cairn::testing::collect(&s.reduce(|a, b| a.max(b)));
        let keyed = s.map(|x| (x.rem_euclid(4) as u8, x as i64));
        let rbk = cairn::testing::collect(&keyed.reduce_by_key(|a, b| a + b));
        let rbk_min = cairn::testing::collect(&keyed.reduce_by_key(|a, b| a.min(b)));
        let gbk = cairn::testing::collect(&keyed.group_by_key());
        ctx.run_available().unwrap();

        prop_assert_eq!(counts.lock().unwrap().len(), batches.len());
        for (i, b) in batches.iter().enumerate() {
            prop_assert_eq!(&counts.lock().unwrap()[i], &vec![b.len() as u64], "count of batch {}", i);
            let mut freq: BTreeMap<i32, u64> = BTreeMap::new();
            let mut sum: BTreeMap<u8, i64> = BTreeMap::new();
            let mut min: BTreeMap<u8, i64> = BTreeMap::new();
            let mut groups: BTreeMap<u8, Vec<i64>> = BTreeMap::new();
            let mut total = 0i64;
            let mut max: Option<i32> = None;
            for &x in b {
                *freq.entry(x).or_insert(0) += 1;
                let k = x.rem_euclid(4) as u8;
                *sum.entry(k).or_insert(0) += x as i64;
                let m = min.entry(k).or_insert(x as i64);
                if (x as i64) < *m {
                    *m = x as i64;
                }
                groups.entry(k).or_default().push(x as i64);
                total += x as i64;
                max = Some(match max { Some(m) if m >= x => m, _ => x });
            }
            prop_assert_eq!(sorted(&by_value.lock().unwrap()[i]), freq.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(&reduced.lock().unwrap()[i], &if b.is_empty() { vec![] } else { vec![total] });
            prop_assert_eq!(&maxed.lock().unwrap()[i], &max.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(sorted(&rbk.lock().unwrap()[i]), sum.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(sorted(&rbk_min.lock().unwrap()[i]), min.into_iter().collect::<Vec<_>>());
            let got = gbk.lock().unwrap()[i].clone();
            let mut got_map: BTreeMap<u8, Vec<i64>> = BTreeMap::new();
            for (k, vs) in got {
                prop_assert!(got_map.insert(k, sorted(&vs)).is_none(), "key {} grouped twice in batch {}", k, i);
            }
            let want: BTreeMap<u8, Vec<i64>> = groups.into_iter().map(|(k, v)| (k, sorted(&v))).collect();
            prop_assert_eq!(got_map, want);
        }
    }

    /// Inner join per batch: every (k, v) of the left meets every (k, w) of the right, same batch.
    #[test]
    fn join_is_a_per_batch_inner_join(
        pairs in prop::collection::vec((prop::collection::vec((0u8..6, -9i32..10), 0..15),
                                        prop::collection::vec((0u8..6, 0u16..50), 0..15)), 1..5),
        parallelism in 1usize..5,
    ) {
        let ctx = StreamingContext::builder().parallelism(parallelism).build().unwrap();
        let (ql, left) = ctx.queue_stream::<(u8, i32)>("left").unwrap();
        let (qr, right) = ctx.queue_stream::<(u8, u16)>("right").unwrap();
        for (l, r) in &pairs {
            ql.push(l.clone());
            qr.push(r.clone());
        }
        let joined = cairn::testing::collect(&left.join(&right));
        // A self-join: the same stream on both sides.
        let self_joined = cairn::testing::collect(&left.join(&left));
        ctx.run_available().unwrap();
        prop_assert_eq!(joined.lock().unwrap().len(), pairs.len());
        for (i, (l, r)) in pairs.iter().enumerate() {
            let mut want = Vec::new();
            for &(k, v) in l {
                for &(k2, w) in r {
                    if k == k2 {
                        want.push((k, (v, w)));
                    }
                }
            }
            prop_assert_eq!(sorted(&joined.lock().unwrap()[i]), sorted(&want), "batch {}", i);
            let mut want_self = Vec::new();
            for &(k, v) in l {
                for &(k2, w) in l {
                    if k == k2 {
                        want_self.push((k, (v, w)));
                    }
                }
            }
            prop_assert_eq!(sorted(&self_joined.lock().unwrap()[i]), sorted(&want_self), "self-join, batch {}", i);
        }
    }
}

/// A stream read by several operators and outputs is computed once per batch and every reader
/// gets the whole batch (the shared node cache).
#[test]
fn a_stream_shared_by_many_readers_gives_each_the_whole_batch() {
    let ctx = StreamingContext::builder().parallelism(3).build().unwrap();
    let (q, s) = ctx.queue_stream::<u32>("in").unwrap();
    let calls = Arc::new(Mutex::new(0u32));
    let c = calls.clone();
    let shared = s.map(move |x| {
        *c.lock().unwrap() += 1;
        x + 1
    });
    let a = cairn::testing::collect(&shared);
    let b = cairn::testing::collect(&shared.filter(|x| x % 2 == 0));
    let c2 = cairn::testing::collect(&shared.union(&shared).count());
    let d = cairn::testing::collect(&shared.map(|x| (x % 3, x)).reduce_by_key(|a, b| a + b));
    // A reader that is never output must not starve the others.
    let _dangling = shared.map(|x| x * 2);
    for b in [vec![1, 2, 3], vec![], vec![10, 11]] {
        q.push(b);
    }
    ctx.run_available().unwrap();
    assert_eq!(batches_of(&a), vec![vec![2, 3, 4], vec![], vec![11, 12]]);
    assert_eq!(batches_of(&b), vec![vec![2, 4], vec![], vec![12]]);
    assert_eq!(batches_of(&c2), vec![vec![6], vec![0], vec![4]]);
    assert_eq!(sorted_batches(&d), vec![vec![(0, 3), (1, 4), (2, 2)], vec![], vec![(0, 12), (2, 11)]]);
    assert_eq!(*calls.lock().unwrap(), 5, "the shared map ran once per element");
}

#[test]
fn print_does_not_crash_on_any_batch() {
    let ctx = StreamingContext::builder().parallelism(2).build().unwrap();
    let (q, s) = ctx.queue_stream::<(u8, String)>("in").unwrap();
    s.print(0);
    s.print(2);
    s.map(|(k, _)| k).count().print(10);
    let out = cairn::testing::collect(&s.map(|(k, _)| k));
    q.push(vec![]);
    q.push((0..10).map(|i| (i, "x".repeat(i as usize))).collect());
    q.push(vec![(1, "é\n\"quoted\"".into())]);
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.new_batches, 3);
    assert_eq!(out.lock().unwrap().len(), 3);
}

#[test]
fn foreach_batch_gets_consecutive_ids_and_times_on_the_interval_grid() {
    let interval = Duration::from_millis(300);
    let ctx = StreamingContext::builder().batch_interval(interval).parallelism(2).build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    s.foreach_batch(move |info, data| {
        s2.lock().unwrap().push((info.batch_id.0, info.batch_time_ms, data));
        Ok(())
    });
    let tinfo = Arc::new(Mutex::new(Vec::new()));
    let t2 = tinfo.clone();
    s.transform(move |info, p| {
        t2.lock().unwrap().push(info.clone());
        p
    })
    .foreach_batch(|_, _| Ok(()));
    for i in 0..5u8 {
        q.push(vec![i; i as usize]);
    }
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.new_batches, 5);
    assert_eq!(summary.next_batch, cairn::BatchId(5));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    let t0 = seen[0].1;
    assert_eq!(t0.rem_euclid(300), 0, "batch times lie on the interval grid");
    for (i, (_, t, data)) in seen.iter().enumerate() {
        assert_eq!(*t, t0 + 300 * i as i64, "batch {i} time");
        assert_eq!(data, &vec![i as u8; i]);
    }
    let tinfo = tinfo.lock().unwrap().clone();
    assert_eq!(
        tinfo.iter().map(|i| (i.batch_id.0, i.batch_time_ms)).collect::<Vec<_>>(),
        seen.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        "transform sees the same batch identity as the sink"
    );
}

#[test]
fn a_failing_foreach_batch_fails_the_run_naming_the_batch() {
    let ctx = StreamingContext::builder().parallelism(2).build().unwrap();
    let (q, s) = ctx.queue_stream::<u32>("in").unwrap();
    let before = cairn::testing::collect(&s);
    s.foreach_batch(|info, data| {
        if data.contains(&13) {
            Err(format!("unlucky record in batch {}", info.batch_id).into())
        } else {
            Ok(())
        }
    });
    let after = cairn::testing::collect(&s);
    for b in [vec![1], vec![2, 3], vec![4, 13, 5], vec![6]] {
        q.push(b);
    }
    let err = ctx.run_available().unwrap_err();
    match &err {
        Error::Sink { sink, batch, message, .. } => {
            assert_eq!(*batch, cairn::BatchId(2));
            assert!(message.contains("unlucky record in batch 2"), "{message}");
            assert!(!sink.is_empty());
        }
        other => panic!("expected Error::Sink, got {other:?}"),
    }
    assert!(err.to_string().contains("batch 2"), "{err}");
    // Outputs run in definition order: the one before the failing sink saw batch 2, the one after
    // did not, and nothing ran after the failed batch.
    assert_eq!(batches_of(&before), vec![vec![1], vec![2, 3], vec![4, 13, 5]]);
    assert_eq!(batches_of(&after), vec![vec![1], vec![2, 3]]);
}

fn config_error(r: cairn::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Config(m)) => m,
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

#[test]
fn a_job_without_output_is_a_config_error() {
    let ctx = StreamingContext::builder().build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    let _unused = s.map(|x| x + 1).filter(|x| *x > 0);
    q.push(vec![1]);
    let m = config_error(ctx.run_available());
    assert!(m.contains("output"), "{m}");
    // An empty graph as well.
    let ctx = StreamingContext::builder().build().unwrap();
    config_error(ctx.run_available());
}

/// Defines one stateful operator (and an output) on a keyed stream.
type Define = Box<dyn Fn(&cairn::DStream<(u8, u64)>)>;

#[test]
fn stateful_operators_without_a_checkpoint_location_are_refused_by_name() {
    let cases: Vec<(&str, Define)> = vec![
        (
            "running-totals",
            Box::new(|s| {
                s.update_state_by_key("running-totals", |_, v: Vec<u64>, o: Option<u64>| {
                    Some(o.unwrap_or(0) + v.iter().sum::<u64>())
                })
                .print(1)
            }),
        ),
        (
            "sessions",
            Box::new(|s| {
                s.map_with_state(
                    "sessions",
                    cairn::StateSpec::function(|k: &u8, _v: Option<u64>, st: &mut cairn::State<'_, u8>| {
                        st.update(*k);
                        *k
                    }),
                )
                .print(1)
            }),
        ),
        ("last-3", Box::new(|s| s.window("last-3", Duration::from_secs(3), Duration::from_secs(1)).print(1))),
        (
            "win-sums",
            Box::new(|s| {
                s.reduce_by_key_and_window(
                    "win-sums",
                    |a, b| a + b,
                    None::<fn(u64, u64) -> u64>,
                    Duration::from_secs(2),
                    Duration::from_secs(1),
                )
                .print(1)
            }),
        ),
        (
            "win-count",
            Box::new(|s| {
                s.count_by_window("win-count", Duration::from_secs(2), Duration::from_secs(2)).print(1)
            }),
        ),
    ];
    for (name, define) in cases {
        let ctx = StreamingContext::builder().build().unwrap();
        let (q, s) = ctx.queue_stream::<(u8, u64)>("in").unwrap();
        q.push(vec![(1, 1)]);
        define(&s);
        let m = config_error(ctx.run_available());
        assert!(m.contains(name), "{name}: {m}");
        assert!(m.contains("checkpoint"), "{name}: {m}");
        // `start` is refused the same way, and nothing ran.
        let ctx = StreamingContext::builder().build().unwrap();
        let (_q, s) = ctx.queue_stream::<(u8, u64)>("in").unwrap();
        define(&s);
        let m = config_error(ctx.start());
        assert!(m.contains(name), "{name}: {m}");
    }
}

#[test]
fn duplicate_stateful_names_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    let (q, s) = ctx.queue_stream::<(u8, u64)>("in").unwrap();
    q.push(vec![(1, 1)]);
    s.update_state_by_key("dup", |_, _v: Vec<u64>, o: Option<u64>| o).print(1);
    s.map(|(k, v)| (k, v as i64)).update_state_by_key("dup", |_, _v: Vec<i64>, o: Option<i64>| o).print(1);
    let m = config_error(ctx.run_available());
    assert!(m.contains("\"dup\""), "{m}");
    // Nothing was written: the location stays empty (the error comes before the lease).
    assert!(!dir.path().join("metadata").exists());

    // A stateful operator may not take a source's name either, nor can two sources share one.
    let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    let (_q, s) = ctx.queue_stream::<(u8, u64)>("in").unwrap();
    assert!(matches!(ctx.queue_stream::<u8>("in"), Err(Error::Config(_))));
    s.window("in", Duration::from_secs(1), Duration::from_secs(1)).print(1);
    let m = config_error(ctx.run_available());
    assert!(m.contains("\"in\""), "{m}");

    // Names with '/' or a leading '$' would collide with table ids.
    for bad in ["a/b", "$source", ""] {
        let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
        let (_q, s) = ctx.queue_stream::<(u8, u64)>("in").unwrap();
        s.update_state_by_key(bad, |_, _v: Vec<u64>, o: Option<u64>| o).print(1);
        config_error(ctx.run_available());
    }
}

#[test]
fn window_and_slide_must_be_multiples_of_the_batch_interval() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let ms = Duration::from_millis;
    for (what, window, slide) in [
        ("window length", ms(1250), ms(500)),
        ("slide", ms(2000), ms(750)),
        ("window length", ms(0), ms(1000)),
        ("slide", ms(1000), ms(0)),
    ] {
        for op in 0..3 {
            let ctx = StreamingContext::builder().checkpoint(loc).batch_interval(ms(500)).build().unwrap();
            let (q, s) = ctx.queue_stream::<(u8, u64)>("in").unwrap();
            q.push(vec![(1, 1)]);
            match op {
                0 => s.window("w", window, slide).print(1),
                1 => s
                    .reduce_by_key_and_window("w", |a, b| a + b, Some(|a: u64, b: u64| a - b), window, slide)
                    .print(1),
                _ => s.count_by_window("w", window, slide).print(1),
            }
            let m = config_error(ctx.run_available());
            assert!(m.contains("\"w\"") && m.contains(what) && m.contains("multiple"), "{what} op {op}: {m}");
        }
    }
    // Multiples are accepted.
    let ctx = StreamingContext::builder().checkpoint(loc).batch_interval(ms(500)).build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    q.push(vec![1]);
    s.window("ok", ms(1500), ms(500)).print(1);
    ctx.run_available().unwrap();
}

#[test]
fn lifecycle_misuse_is_refused() {
    let ctx = StreamingContext::builder().build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    let out = cairn::testing::collect(&s);
    q.push(vec![1]);
    ctx.run_available().unwrap();
    assert!(matches!(ctx.run_available(), Err(Error::Lifecycle(_))), "a context runs once");
    assert!(matches!(ctx.queue_stream::<u8>("late"), Err(Error::Lifecycle(_))), "no new sources after start");
    assert!(matches!(ctx.await_termination(), Err(Error::Lifecycle(_))));
    assert_eq!(*out.lock().unwrap(), vec![vec![1]]);
    // Bad builder settings.
    assert!(matches!(
        StreamingContext::builder().batch_interval(Duration::ZERO).build(),
        Err(Error::Config(_))
    ));
    assert!(matches!(StreamingContext::builder().app_name("").build(), Err(Error::Config(_))));
}
