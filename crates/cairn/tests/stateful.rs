//! Stateful operators against a model computed here with plain loops, straight through and
//! across checkpoint boundaries and restarts (graceful stops, a failed batch, a corrupt newest
//! checkpoint, parallelism and checkpoint-interval changes), plus the checkpoint location's
//! guardrails (incompatible changes, a second context, object counts) and the text file source.
//!
//! Outputs are recorded per batch id (sorted within the batch), so the outputs of several runs
//! concatenate by batch id, and a batch replayed after a failure overwrites its first output the
//! way an idempotent sink would.

use cairn::{Error, OpName, QueueHandle, StateSpec, StreamingContext, Trigger};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SEC: Duration = Duration::from_secs(1);

/// Batch id -> that batch's output, sorted.
type Rec<T> = Arc<Mutex<BTreeMap<u64, Vec<T>>>>;

fn record<T: Ord + Clone + Send + Sync + 'static>(
    s: &cairn::DStream<T>,
    seen: &Arc<Mutex<Vec<u64>>>,
) -> Rec<T> {
    let rec: Rec<T> = Arc::default();
    let (r, seen) = (rec.clone(), seen.clone());
    s.foreach_batch(move |info, mut data| {
        data.sort();
        r.lock().unwrap().insert(info.batch_id.0, data);
        seen.lock().unwrap().push(info.batch_id.0);
        Ok(())
    });
    rec
}

fn snapshot<T: Clone>(r: &Rec<T>) -> BTreeMap<u64, Vec<T>> {
    r.lock().unwrap().clone()
}

/// `(key, tag, sum, count)` emitted by the `map_with_state` operator: tag 0 = a record updated
/// the state, 1 = a record removed it (`sum`/`count` of the removed state, -1/0 if none),
/// 2 = the key timed out (its last state), 3 = called with `None` but not timing out (never
/// expected).
type Session = (u8, u8, i64, u32);

/// Every output of the job, by batch id.
#[derive(Debug, Clone, PartialEq, Default)]
struct Flat {
    totals: BTreeMap<u64, Vec<(u8, i64)>>,
    sessions: BTreeMap<u64, Vec<Session>>,
    window: BTreeMap<u64, Vec<i64>>,
    sums_inv: BTreeMap<u64, Vec<(u8, i64)>>,
    sums: BTreeMap<u64, Vec<(u8, i64)>>,
    counts: BTreeMap<u64, Vec<u64>>,
}

impl Flat {
    /// Later runs overwrite earlier ones batch by batch (replays rewrite their output).
    fn extend(&mut self, o: Flat) {
        self.totals.extend(o.totals);
        self.sessions.extend(o.sessions);
        self.window.extend(o.window);
        self.sums_inv.extend(o.sums_inv);
        self.sums.extend(o.sums);
        self.counts.extend(o.counts);
    }
}

struct Outs {
    totals: Rec<(u8, i64)>,
    sessions: Rec<Session>,
    window: Rec<i64>,
    sums_inv: Rec<(u8, i64)>,
    sums: Rec<(u8, i64)>,
    counts: Rec<u64>,
    /// Batch ids in the order the `totals` sink saw them (duplicates reveal replays).
    seen: Arc<Mutex<Vec<u64>>>,
}

impl Outs {
    fn flat(&self) -> Flat {
        Flat {
            totals: snapshot(&self.totals),
            sessions: snapshot(&self.sessions),
            window: snapshot(&self.window),
            sums_inv: snapshot(&self.sums_inv),
            sums: snapshot(&self.sums),
            counts: snapshot(&self.counts),
        }
    }
    fn batch_ids(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }
}

/// Idle timeout of the `map_with_state` operator, in batches of one second.
const TIMEOUT_BATCHES: u64 = 3;
/// A `update_state_by_key` total above this removes the key (its state starts over).
const RESET_ABOVE: i64 = 40;
/// Initial state of the `map_with_state` operator: key 0 is in the data, key 9 never is.
fn initial_sessions() -> Vec<(u8, (u32, i64))> {
    vec![(0, (1, 100)), (9, (1, 5))]
}

#[derive(Clone)]
struct JobCfg {
    parallelism: usize,
    stop_after: Option<u64>,
    checkpoint_every: u32,
    /// The sink fails (once) in this batch.
    fail_at: Option<(u64, Arc<AtomicBool>)>,
}

fn cfg(parallelism: usize, stop_after: Option<u64>, checkpoint_every: u32) -> JobCfg {
    JobCfg { parallelism, stop_after, checkpoint_every, fail_at: None }
}

/// The job: every stateful operator over one keyed queue stream. All `batches` are pushed; a
/// restored context skips those its checkpointed queue position says were consumed.
fn job(
    dir: &str,
    batches: &[Vec<(u8, i64)>],
    c: &JobCfg,
) -> (StreamingContext, QueueHandle<(u8, i64)>, Outs) {
    let mut b = StreamingContext::builder()
        .app_name("stateful-test")
        .checkpoint(dir)
        .batch_interval(SEC)
        .checkpoint_interval(SEC * c.checkpoint_every)
        // Checkpoints are never put off while a write is in flight: checkpoint points are exact.
        .max_checkpoint_deferral(0)
        .parallelism(c.parallelism)
        .trigger(Trigger::AvailableNow);
    if let Some(n) = c.stop_after {
        b = b.stop_after_batches(n);
    }
    let ctx = b.build().unwrap();
    let (q, s) = ctx.queue_stream::<(u8, i64)>("events").unwrap();
    for batch in batches {
        q.push(batch.clone());
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let totals = record(
        &s.update_state_by_key("totals", |_k, vs: Vec<i64>, old: Option<i64>| {
            let t = old.unwrap_or(0) + vs.iter().sum::<i64>();
            (t <= RESET_ABOVE).then_some(t)
        }),
        &seen,
    );
    let spec = StateSpec::function(|k: &u8, v: Option<i64>, st: &mut cairn::State<'_, (u32, i64)>| match v {
        Some(0) => {
            let old = st.get().copied();
            st.remove();
            (*k, 1u8, old.map_or(-1, |o| o.1), old.map_or(0, |o| o.0))
        }
        Some(v) => {
            let (c, s) = st.get().copied().unwrap_or((0, 0));
            st.update((c + 1, s + v));
            (*k, 0, s + v, c + 1)
        }
        None => {
            let (c, s) = st.get().copied().unwrap_or((0, -1));
            let tag = if st.is_timing_out() { 2 } else { 3 };
            // Ignored: the key's state is being removed.
            st.update((999, 999));
            (*k, tag, s, c)
        }
    })
    .timeout(SEC * TIMEOUT_BATCHES as u32)
    .initial_state(initial_sessions());
    let sessions = record(&s.map_with_state("sessions", spec), &Arc::default());
    let window = record(&s.map(|(_, v)| v).window("last3", SEC * 3, SEC * 2), &Arc::default());
    let sums_inv = record(
        &s.reduce_by_key_and_window("sums-inv", |a, b| a + b, Some(|a: i64, b: i64| a - b), SEC * 3, SEC),
        &Arc::default(),
    );
    let sums = record(
        &s.reduce_by_key_and_window("sums", |a, b| a + b, None::<fn(i64, i64) -> i64>, SEC * 3, SEC),
        &Arc::default(),
    );
    let counts = record(&s.count_by_window("counts", SEC * 4, SEC * 2), &Arc::default());
    if let Some((at, armed)) = c.fail_at.clone() {
        s.foreach_batch(move |info, _| {
            if info.batch_id.0 == at && armed.swap(false, Ordering::SeqCst) {
                Err("sink unavailable".into())
            } else {
                Ok(())
            }
        });
    }
    (ctx, q, Outs { totals, sessions, window, sums_inv, sums, counts, seen })
}

/// The job's outputs, computed with plain loops over the input batches.
fn model(batches: &[Vec<(u8, i64)>]) -> Flat {
    let mut f = Flat::default();
    let mut totals: BTreeMap<u8, i64> = BTreeMap::new();
    // key -> (count, sum, batch of the last record)
    let mut sessions: BTreeMap<u8, (u32, i64, u64)> =
        initial_sessions().into_iter().map(|(k, (c, s))| (k, (c, s, 0))).collect();
    for (b, batch) in batches.iter().enumerate() {
        let id = b as u64;
        // update_state_by_key: called once per key with new values.
        let mut grouped: BTreeMap<u8, Vec<i64>> = BTreeMap::new();
        for &(k, v) in batch {
            grouped.entry(k).or_default().push(v);
        }
        let mut out = Vec::new();
        for (k, vs) in grouped {
            let t = totals.get(&k).copied().unwrap_or(0) + vs.iter().sum::<i64>();
            if t <= RESET_ABOVE {
                totals.insert(k, t);
                out.push((k, t));
            } else {
                totals.remove(&k);
            }
        }
        f.totals.insert(id, out);
        // map_with_state: once per record, in order, then timeouts.
        let mut out = Vec::new();
        for &(k, v) in batch {
            if v == 0 {
                let old = sessions.remove(&k);
                out.push((k, 1, old.map_or(-1, |o| o.1), old.map_or(0, |o| o.0)));
            } else {
                let (c, s, _) = sessions.get(&k).copied().unwrap_or((0, 0, 0));
                sessions.insert(k, (c + 1, s + v, id));
                out.push((k, 0, s + v, c + 1));
            }
        }
        let idle: Vec<u8> =
            sessions.iter().filter(|(_, s)| id - s.2 >= TIMEOUT_BATCHES).map(|(k, _)| *k).collect();
        for k in idle {
            let (c, s, _) = sessions.remove(&k).unwrap();
            out.push((k, 2, s, c));
        }
        out.sort();
        f.sessions.insert(id, out);
        // window(3 s, slide 2 s): on even batches, the values of the last three batches.
        let from = b.saturating_sub(2);
        let mut w: Vec<i64> = Vec::new();
        if b % 2 == 0 {
            for past in &batches[from..=b] {
                w.extend(past.iter().map(|r| r.1));
            }
        }
        w.sort();
        f.window.insert(id, w);
        // reduce_by_key_and_window(3 s, slide 1 s): per key, the sum over the last three batches.
        let mut sums: BTreeMap<u8, i64> = BTreeMap::new();
        for past in &batches[from..=b] {
            for &(k, v) in past {
                *sums.entry(k).or_insert(0) += v;
            }
        }
        f.sums.insert(id, sums.clone().into_iter().collect());
        f.sums_inv.insert(id, sums.into_iter().collect());
        // count_by_window(4 s, slide 2 s): on even batches, the records of the last four batches,
        // 0 included.
        let n: usize = batches[b.saturating_sub(3)..=b].iter().map(Vec::len).sum();
        f.counts.insert(id, if b % 2 == 0 { vec![n as u64] } else { vec![] });
    }
    f
}

/// A fixed input: frequent keys 0..=5 (values -5..=9, 0 removes a session), plus keys that go
/// idle at known batches: key 7 (batches 1, 2: times out in batch 5), key 8 (batches 4, 6: times
/// out in batch 9), key 6 (created in batch 3, removed in batch 4: never times out). Key 9 only
/// lives in the initial state (times out in batch 3).
fn fixed_input(n: usize) -> Vec<Vec<(u8, i64)>> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|b| {
            let mut batch = Vec::new();
            for _ in 0..10 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                batch.push((((x >> 33) % 6) as u8, ((x >> 45) % 15) as i64 - 5));
            }
            match b {
                1 | 2 => batch.push((7, 3)),
                3 => batch.push((6, 5)),
                4 => batch.extend([(8, 2), (6, 0)]),
                6 => batch.push((8, 4)),
                _ => {}
            }
            batch
        })
        .collect()
}

fn loc(d: &tempfile::TempDir) -> &str {
    d.path().to_str().unwrap()
}

/// Runs the job straight through.
fn straight(batches: &[Vec<(u8, i64)>], parallelism: usize, every: u32) -> Flat {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _q, out) = job(loc(&dir), batches, &cfg(parallelism, None, every));
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.next_batch.0, batches.len() as u64);
    assert_eq!(out.batch_ids(), (0..batches.len() as u64).collect::<Vec<_>>());
    out.flat()
}

/// Runs `stop_after` batches, stops gracefully, then finishes in a new context on the same
/// location (maybe at another parallelism).
fn with_restart(batches: &[Vec<(u8, i64)>], stop_after: u64, p1: usize, p2: usize, every: u32) -> Flat {
    let dir = tempfile::tempdir().unwrap();
    let (c1, _q1, o1) = job(loc(&dir), batches, &cfg(p1, Some(stop_after), every));
    let s1 = c1.run_available().unwrap();
    let n1 = stop_after.min(batches.len() as u64);
    assert_eq!(s1.next_batch.0, n1);
    assert_eq!(o1.batch_ids(), (0..n1).collect::<Vec<_>>());
    let (c2, _q2, o2) = job(loc(&dir), batches, &cfg(p2, None, every));
    let s2 = c2.run_available().unwrap();
    assert_eq!(s2.replayed_batches, 0, "a graceful stop leaves nothing to replay");
    assert!(s2.recovery_warnings.is_empty(), "{:?}", s2.recovery_warnings);
    assert_eq!(
        o2.batch_ids(),
        (n1..batches.len() as u64).collect::<Vec<_>>(),
        "the restart continues after the last batch"
    );
    let mut all = o1.flat();
    all.extend(o2.flat());
    all
}

fn assert_flat_eq(got: &Flat, want: &Flat, what: &str) {
    assert_eq!(got.totals, want.totals, "{what}: update_state_by_key");
    assert_eq!(got.sessions, want.sessions, "{what}: map_with_state");
    assert_eq!(got.window, want.window, "{what}: window");
    assert_eq!(got.sums_inv, want.sums_inv, "{what}: reduce_by_key_and_window with inverse");
    assert_eq!(got.sums, want.sums, "{what}: reduce_by_key_and_window without inverse");
    assert_eq!(got.counts, want.counts, "{what}: count_by_window");
}

const N: usize = 12;

#[test]
fn the_model_exercises_timeouts_removals_and_initial_state() {
    // Guards the test itself: the fixed input must produce the events the other tests rely on.
    let m = model(&fixed_input(N));
    let timeouts: Vec<(u64, u8)> = m
        .sessions
        .iter()
        .flat_map(|(b, out)| out.iter().filter(|o| o.1 == 2).map(move |o| (*b, o.0)))
        .collect();
    for want in [(3, 9), (5, 7), (9, 8)] {
        assert!(timeouts.contains(&want), "timeout {want:?} in {timeouts:?}");
    }
    assert!(!timeouts.iter().any(|t| t.1 == 6), "key 6 was removed before it could time out");
    assert!(m.sessions.values().flatten().filter(|o| o.1 == 1).count() >= 3, "records remove sessions");
    let first_0 = m.sessions.values().flatten().find(|o| o.0 == 0 && o.1 == 0).unwrap();
    assert!(first_0.2 >= 100 - 5 && first_0.3 == 2, "key 0 starts from its initial state: {first_0:?}");
    assert!(m.totals.values().flatten().count() < fixed_input(N).iter().flatten().count());
    let resets = (0..N as u64 - 1)
        .filter(|b| {
            let next: BTreeSet<u8> = m.totals[&(b + 1)].iter().map(|t| t.0).collect();
            fixed_input(N)[*b as usize + 1].iter().any(|r| !next.contains(&r.0))
        })
        .count();
    assert!(resets > 0, "some totals exceed {RESET_ABOVE} and are removed");
}

#[test]
fn stateful_operators_match_the_model_straight_through() {
    let input = fixed_input(N);
    let want = model(&input);
    for (p, every) in [(1, 1), (3, 1), (2, 3)] {
        assert_flat_eq(
            &straight(&input, p, every),
            &want,
            &format!("parallelism {p}, checkpoint every {every}"),
        );
    }
}

/// The straight-through run and runs stopped gracefully after k batches and restarted (same or
/// other parallelism, checkpoint every batch or every 3 batches) give identical output, equal
/// to the model; timeouts fire in the same batch (key 9 at 3, key 7 at 5, key 8 at 9) whether or
/// not a restart falls between the key's last record and its timeout.
#[test]
fn stateful_operators_are_identical_across_graceful_restarts() {
    let input = fixed_input(N);
    let want = model(&input);
    let straight = straight(&input, 2, 1);
    assert_flat_eq(&straight, &want, "straight through");
    for (k, p1, p2, every) in [
        (0, 2, 2, 1),
        (1, 2, 2, 1),
        (2, 2, 3, 1),
        (4, 3, 1, 1),
        (5, 2, 2, 3),
        (7, 1, 4, 3),
        (8, 4, 2, 3),
        (11, 2, 2, 2),
        (12, 2, 3, 1),
    ] {
        let what = format!("stop after {k}, parallelism {p1} -> {p2}, checkpoint every {every}");
        let got = with_restart(&input, k, p1, p2, every);
        assert_flat_eq(&got, &straight, &format!("{what} vs straight through"));
        assert_flat_eq(&got, &want, &format!("{what} vs model"));
    }
}

/// Several restarts in a row, changing parallelism each time (state and window slices are
/// redistributed twice, including back to the original layout).
#[test]
fn stateful_operators_survive_a_chain_of_restarts() {
    let input = fixed_input(N);
    let dir = tempfile::tempdir().unwrap();
    let mut all = Flat::default();
    for (stop, p, every) in [(2, 3, 1), (3, 1, 2), (6, 3, 1), (7, 2, 3), (10, 4, 1), (12, 3, 2)] {
        let (ctx, _q, out) = job(loc(&dir), &input, &cfg(p, Some(stop), every));
        let summary = ctx.run_available().unwrap();
        assert_eq!(summary.replayed_batches, 0);
        assert_eq!(summary.next_batch.0, stop);
        all.extend(out.flat());
    }
    assert_flat_eq(&all, &model(&input), "restarts after 2, 3, 6, 7, 10");
}

/// A sink fails in batch 7 with a checkpoint every 3 batches (last one after batch 5): the run
/// fails, and the restart replays batches 6 and 7 from their logged plans, on top of the state
/// of batch 5 (the failed batch's in-memory updates are not double counted).
#[test]
fn a_failed_batch_is_replayed_exactly_after_a_restart() {
    let input = fixed_input(N);
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    let c = JobCfg { fail_at: Some((7, armed.clone())), ..cfg(2, None, 3) };
    let (c1, _q1, o1) = job(loc(&dir), &input, &c);
    match c1.run_available() {
        Err(Error::Sink { batch: cairn::BatchId(7), message, .. }) => {
            assert!(message.contains("sink unavailable"))
        }
        other => panic!("expected the sink error of batch 7, got {other:?}"),
    }
    assert_eq!(o1.batch_ids(), (0..=7).collect::<Vec<_>>());
    assert!(!armed.load(Ordering::SeqCst));
    let (c2, _q2, o2) = job(loc(&dir), &input, &JobCfg { parallelism: 3, ..c });
    let s2 = c2.run_available().unwrap();
    assert_eq!(s2.replayed_batches, 2, "batches 6 and 7 come after the checkpoint of batch 5");
    assert_eq!(o2.batch_ids(), (6..N as u64).collect::<Vec<_>>());
    let want = model(&input);
    // The replayed batches reproduce the first run's output of batch 6 exactly.
    assert_eq!(o1.flat().totals[&6], want.totals[&6]);
    let mut all = o1.flat();
    all.extend(o2.flat());
    assert_flat_eq(&all, &want, "failed batch 7, restart");
}

fn random_input() -> impl Strategy<Value = Vec<Vec<(u8, i64)>>> {
    prop::collection::vec(prop::collection::vec((0u8..7, -5i64..10), 0..12), 1..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random batches (empty ones included), a random stop point, random parallelism before and
    /// after, random checkpoint interval: equal to the model and to the straight-through run.
    #[test]
    fn random_batches_with_a_restart_match_the_model(
        input in random_input(),
        stop in 0u64..10,
        p1 in 1usize..4,
        p2 in 1usize..4,
        every in 1u32..4,
    ) {
        let want = model(&input);
        let s = straight(&input, p1, every);
        prop_assert_eq!(&s, &want);
        let r = with_restart(&input, stop, p1, p2, every);
        prop_assert_eq!(&r, &want);
    }
}

/// State functions see timeouts at exactly `timeout` of batch time, also when the timeout is
/// not a multiple of the batch interval; `remove` removes (the next record starts afresh).
#[test]
fn map_with_state_timeouts_fire_on_the_first_batch_past_the_timeout() {
    for (timeout_ms, fires_after) in [(1000u64, 1u64), (2000, 2), (2500, 3), (3000, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StreamingContext::builder()
            .checkpoint(loc(&dir))
            .batch_interval(SEC)
            .parallelism(2)
            .build()
            .unwrap();
        let (q, s) = ctx.queue_stream::<(u8, i64)>("in").unwrap();
        // key 1: batch 0 only. key 2: batches 0 and 2. key 3: batch 0, removed in batch 1.
        // key 4: every batch (never idle).
        let batches: Vec<Vec<(u8, i64)>> = (0..8)
            .map(|b| {
                let mut v = vec![(4, b)];
                match b {
                    0 => v.extend([(1, 1), (2, 1), (3, 1)]),
                    1 => v.push((3, 0)),
                    2 => v.push((2, 5)),
                    _ => {}
                }
                v
            })
            .collect();
        for b in &batches {
            q.push(b.clone());
        }
        let out = record(
            &s.map_with_state(
                "idle",
                StateSpec::function(|k: &u8, v: Option<i64>, st: &mut cairn::State<'_, i64>| {
                    match v {
                        Some(0) => st.remove(),
                        Some(v) => {
                            let n = st.get().copied().unwrap_or(0) + v;
                            st.update(n)
                        }
                        None => {}
                    }
                    (*k, v.is_none(), st.is_timing_out(), st.exists())
                })
                .timeout(Duration::from_millis(timeout_ms)),
            ),
            &Arc::default(),
        );
        ctx.run_available().unwrap();
        let got: BTreeMap<u64, Vec<(u8, bool, bool, bool)>> = snapshot(&out);
        // Model: a key whose last record came in batch l times out in the first batch b with
        // (b - l) * 1000 >= timeout.
        let mut want: BTreeMap<u64, Vec<(u8, bool, bool, bool)>> = BTreeMap::new();
        let mut last: BTreeMap<u8, u64> = BTreeMap::new();
        for (b, batch) in batches.iter().enumerate() {
            let b = b as u64;
            let mut o = Vec::new();
            for &(k, v) in batch {
                if v == 0 {
                    last.remove(&k);
                    o.push((k, false, false, false));
                } else {
                    last.insert(k, b);
                    o.push((k, false, false, true));
                }
            }
            let due: Vec<u8> =
                last.iter().filter(|(_, l)| (b - **l) * 1000 >= timeout_ms).map(|(k, _)| *k).collect();
            for k in due {
                last.remove(&k);
                o.push((k, true, true, true));
            }
            o.sort();
            want.insert(b, o);
        }
        assert_eq!(got, want, "timeout {timeout_ms} ms");
        // Spelled out: key 1 (last record in batch 0) times out in batch `fires_after`.
        assert!(got[&fires_after].contains(&(1, true, true, true)), "timeout {timeout_ms} ms: {got:?}");
        assert_eq!(got.values().flatten().filter(|o| o.0 == 1 && o.1).count(), 1, "exactly one timeout call");
        assert!(!got.values().flatten().any(|o| o.0 == 3 && o.1), "a removed key does not time out");
        assert!(!got.values().flatten().any(|o| o.0 == 4 && o.1), "a busy key does not time out");
    }
}

/// The initial state is used on a fresh start only: a restart restores the checkpoint instead,
/// even when the code passes a different initial state.
#[test]
fn initial_state_is_used_on_the_first_start_only() {
    let dir = tempfile::tempdir().unwrap();
    let run = |initial: Vec<(u8, i64)>, batch: Vec<(u8, i64)>, stop: u64| {
        let ctx = StreamingContext::builder()
            .checkpoint(loc(&dir))
            .batch_interval(SEC)
            .stop_after_batches(stop)
            .parallelism(2)
            .build()
            .unwrap();
        let (q, s) = ctx.queue_stream::<(u8, i64)>("in").unwrap();
        for _ in 0..stop {
            q.push(batch.clone());
        }
        let out = record(
            &s.map_with_state(
                "sums",
                StateSpec::function(|k: &u8, v: Option<i64>, st: &mut cairn::State<'_, i64>| {
                    let n = st.get().copied().unwrap_or(0) + v.unwrap_or(0);
                    st.update(n);
                    (*k, n)
                })
                .initial_state(initial),
            ),
            &Arc::default(),
        );
        ctx.run_available().unwrap();
        snapshot(&out)
    };
    let first = run(vec![(1, 1000), (2, 2000)], vec![(1, 1), (3, 3)], 1);
    assert_eq!(first[&0], vec![(1, 1001), (3, 3)], "key 1 starts from its initial state");
    let second = run(vec![(1, 5_000_000), (2, 7_000_000)], vec![(1, 1), (2, 2)], 2);
    assert_eq!(second[&1], vec![(1, 1002), (2, 2002)], "the checkpoint wins over a new initial state");
}

/// count_by_window counts the records of the window, including none: after every record left
/// the window, a slide batch reports 0 (as `count` does for an empty batch, and as Spark's
/// countByWindow does once data has left the window).
#[test]
fn count_by_window_reports_zero_for_a_window_whose_records_left() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder().checkpoint(loc(&dir)).batch_interval(SEC).build().unwrap();
    let (q, s) = ctx.queue_stream::<u8>("in").unwrap();
    for b in [vec![1, 2, 3], vec![4], vec![], vec![], vec![], vec![5]] {
        q.push(b);
    }
    let out = record(&s.count_by_window("c", SEC * 2, SEC), &Arc::default());
    ctx.run_available().unwrap();
    let got: Vec<Vec<u64>> = snapshot(&out).into_values().collect();
    assert_eq!(got, vec![vec![3], vec![4], vec![1], vec![0], vec![0], vec![1]]);
}

/// A key's window value that cancels out (a sum back to 0) is still emitted while one of its
/// batches is in the window, and the key leaves with its last contributing batch, with and
/// without an inverse function alike.
#[test]
fn a_window_key_stays_while_a_batch_holds_it_and_leaves_with_the_last() {
    for inverse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StreamingContext::builder().checkpoint(loc(&dir)).batch_interval(SEC).build().unwrap();
        let (q, s) = ctx.queue_stream::<(char, i64)>("in").unwrap();
        for b in [vec![('a', 5), ('b', 1)], vec![('a', -5)], vec![], vec![], vec![]] {
            q.push(b);
        }
        let inv = inverse.then_some(|a: i64, b: i64| a - b);
        let out = record(&s.reduce_by_key_and_window("w", |a, b| a + b, inv, SEC * 3, SEC), &Arc::default());
        ctx.run_available().unwrap();
        let got: Vec<Vec<(char, i64)>> = snapshot(&out).into_values().collect();
        let want = vec![
            vec![('a', 5), ('b', 1)],
            vec![('a', 0), ('b', 1)],
            vec![('a', 0), ('b', 1)],
            vec![('a', -5)],
            vec![],
        ];
        assert_eq!(got, want, "inverse: {inverse}");
    }
}

/// Per batch, keys 0..=3 with pseudo-random values; key 9 only in batch 1.
fn window_input(n: usize) -> Vec<Vec<(u8, i64)>> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|b| {
            let mut batch: Vec<(u8, i64)> = (0..4u8)
                .map(|k| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (k, ((x >> 40) % 100) as i64 - 50)
                })
                .collect();
            if b == 1 {
                batch.push((9, 7));
            }
            batch
        })
        .collect()
}

/// The 3-batch windowed sums of `window_input`, per batch, with plain loops.
fn window_model(batches: &[Vec<(u8, i64)>]) -> BTreeMap<u64, Vec<(u8, i64)>> {
    (0..batches.len())
        .map(|b| {
            let mut sums: BTreeMap<u8, i64> = BTreeMap::new();
            for past in &batches[b.saturating_sub(2)..=b] {
                for &(k, v) in past {
                    *sums.entry(k).or_insert(0) += v;
                }
            }
            (b as u64, sums.into_iter().collect())
        })
        .collect()
}

/// Runs `reduce_by_key_and_window("sums", ...)` with or without an inverse until `stop_after`
/// batches exist, checkpointing every batch.
fn window_run(location: &str, inverse: bool, batches: &[Vec<(u8, i64)>], stop_after: u64) -> Rec<(u8, i64)> {
    let ctx = StreamingContext::builder()
        .checkpoint(location)
        .batch_interval(SEC)
        .checkpoint_interval(SEC)
        .max_checkpoint_deferral(0)
        .parallelism(2)
        .stop_after_batches(stop_after)
        .trigger(Trigger::AvailableNow)
        .build()
        .unwrap();
    let (q, s) = ctx.queue_stream::<(u8, i64)>("in").unwrap();
    for b in batches {
        q.push(b.clone());
    }
    let inv = inverse.then_some(|a: i64, b: i64| a - b);
    let out = record(&s.reduce_by_key_and_window("sums", |a, b| a + b, inv, SEC * 3, SEC), &Arc::default());
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.next_batch.0, stop_after, "inverse: {inverse}");
    assert!(summary.recovery_warnings.is_empty(), "{:?}", summary.recovery_warnings);
    out
}

/// Adding the inverse function starts from an aggregate rebuilt from the buffered batches;
/// removing it drops the stored aggregate, so adding it back later does not restore an outdated
/// one (every key is in every batch here, so an outdated aggregate would have the right keys and
/// slice counts, and only its values would be wrong).
#[test]
fn the_inverse_function_can_be_added_and_removed_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let input = window_input(16);
    let mut got = BTreeMap::new();
    for (phase, inverse) in [false, true, false, true].into_iter().enumerate() {
        let out = window_run(loc(&dir), inverse, &input, 4 * (phase as u64 + 1));
        let out = snapshot(&out);
        assert_eq!(
            out.keys().copied().collect::<Vec<_>>(),
            (4 * phase as u64..4 * (phase as u64 + 1)).collect::<Vec<_>>()
        );
        got.extend(out);
    }
    assert_eq!(got, window_model(&input));
}

/// `OpName::with_version` applies to window operators: a version change is refused like for
/// the other stateful operators, naming the operator, and allowed with `drop_state`.
#[test]
fn a_window_operator_version_change_is_refused_unless_its_state_is_dropped() {
    type Build = fn(&cairn::DStream<(u8, i64)>, OpName);
    let ops: [(&str, Build); 3] = [
        ("window", |s, n| s.window(n, SEC * 2, SEC).print(1)),
        ("reduce_by_key_and_window", |s, n| {
            s.reduce_by_key_and_window(n, |a, b| a + b, Some(|a: i64, b: i64| a - b), SEC * 2, SEC).print(1)
        }),
        ("count_by_window", |s, n| s.count_by_window(n, SEC * 2, SEC).print(1)),
    ];
    for (what, build) in ops {
        let dir = tempfile::tempdir().unwrap();
        let start = |version: u32, drop: bool, batches: usize| {
            StreamingContext::get_or_create(loc(&dir), |l| {
                let mut b = StreamingContext::builder().checkpoint(l).batch_interval(SEC);
                if drop {
                    b = b.drop_state("w");
                }
                let ctx = b.build()?;
                let (q, s) = ctx.queue_stream::<(u8, i64)>("in")?;
                for batch in window_input(batches) {
                    q.push(batch);
                }
                build(&s, OpName::new("w").with_version(version));
                Ok(ctx)
            })
        };
        start(1, false, 2).unwrap().run_available().unwrap();
        match start(2, false, 3) {
            Err(Error::Incompatible { operator, difference }) => {
                assert_eq!(operator, "w", "{what}");
                assert!(difference.contains("state version changed from 1 to 2"), "{what}: {difference}");
            }
            Err(other) => panic!("{what}: expected Error::Incompatible, got {other:?}"),
            Ok(_) => panic!("{what}: a version change was accepted without drop_state"),
        }
        let summary = start(2, true, 3).unwrap().run_available().unwrap();
        assert_eq!(summary.new_batches, 1, "{what}");
        let summary = start(2, false, 4).unwrap().run_available().unwrap();
        assert_eq!(summary.new_batches, 1, "{what}: the new version is stored from then on");
    }
}

/// The `update_state_by_key_every_batch` function of the test below: values add up (above 60
/// the key is removed); without values an odd total loses 1, a negative even one is removed,
/// another even one stays as it is.
fn every_batch_update(vs: Vec<i64>, old: Option<i64>) -> Option<i64> {
    match (vs.is_empty(), old) {
        (false, old) => Some(old.unwrap_or(0) + vs.iter().sum::<i64>()).filter(|t| *t <= 60),
        (true, Some(t)) if t % 2 != 0 => Some(t - 1),
        (true, Some(t)) => (t >= 0).then_some(t),
        (true, None) => panic!("called for a key without state and without values"),
    }
}

/// Runs `update_state_by_key_every_batch("every", ...)` until `stop_after` batches exist,
/// checkpointing every batch.
fn every_batch_run(
    location: &str,
    batches: &[Vec<(u8, i64)>],
    stop_after: u64,
    parallelism: usize,
) -> Rec<(u8, i64)> {
    let ctx = StreamingContext::builder()
        .checkpoint(location)
        .batch_interval(SEC)
        .checkpoint_interval(SEC)
        .max_checkpoint_deferral(0)
        // No background compaction: it would replace the deltas this test reads (timing-dependent).
        .full_snapshot_every(1_000)
        .parallelism(parallelism)
        .stop_after_batches(stop_after)
        .trigger(Trigger::AvailableNow)
        .build()
        .unwrap();
    let (q, s) = ctx.queue_stream::<(u8, i64)>("in").unwrap();
    for b in batches {
        q.push(b.clone());
    }
    let out = record(
        &s.update_state_by_key_every_batch("every", |_k, vs, old| every_batch_update(vs, old)),
        &Arc::default(),
    );
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.next_batch.0, stop_after);
    out
}

/// The number of entries (puts and tombstones) of table `id` in the delta checkpoint of `batch`.
fn delta_entries(location: &str, batch: u64, id: &str) -> usize {
    use cairn_checkpoint::paths::ObjectName;
    let store = cairn_checkpoint::CheckpointStore::open(location).unwrap();
    let names: Vec<ObjectName> = store.list_objects().unwrap().into_iter().map(|(n, _)| n).collect();
    let name = names
        .iter()
        .copied()
        .find(|n| matches!(n, ObjectName::Delta { batch: b, .. } if b.0 == batch))
        .unwrap_or_else(|| panic!("no delta checkpoint of batch {batch} in {names:?}"));
    let ckpt = store.read_state(name).unwrap();
    ckpt.tables.iter().find(|t| t.id == id).map_or(0, |t| t.reader().count())
}

/// Spark's `updateStateByKey` semantics, against a plain loop, across a restart at another
/// parallelism; a key whose value did not change is not rewritten by the next checkpoint.
#[test]
fn update_state_by_key_every_batch_visits_every_key_and_matches_the_model() {
    let mut input = fixed_input(10);
    // Key 20 goes -3, -4 (idle), then is removed (idle); key 21 goes 7, 6 (idle), then stays;
    // key 22 goes -3 in batch 9, then like key 20.
    input[0].push((20, -3));
    input[9].extend([(21, 7), (22, -3)]);
    input.extend([vec![], vec![], vec![]]);
    let mut state: BTreeMap<u8, i64> = BTreeMap::new();
    let mut want: BTreeMap<u64, Vec<(u8, i64)>> = BTreeMap::new();
    for (b, batch) in input.iter().enumerate() {
        let mut grouped: BTreeMap<u8, Vec<i64>> = state.keys().map(|k| (*k, Vec::new())).collect();
        for &(k, v) in batch {
            grouped.entry(k).or_default().push(v);
        }
        for (k, vs) in grouped {
            match every_batch_update(vs, state.get(&k).copied()) {
                Some(s) => state.insert(k, s),
                None => state.remove(&k),
            };
        }
        want.insert(b as u64, state.clone().into_iter().collect());
    }
    assert!(want[&1].contains(&(20, -4)) && !want[&2].iter().any(|(k, _)| *k == 20));
    assert!(want[&10].contains(&(21, 6)) && want[&12].contains(&(21, 6)));
    assert!(want[&10].contains(&(22, -4)) && !want[&11].iter().any(|(k, _)| *k == 22));

    let dir = tempfile::tempdir().unwrap();
    let mut got = snapshot(&every_batch_run(loc(&dir), &input, 5, 2));
    got.extend(snapshot(&every_batch_run(loc(&dir), &input, input.len() as u64, 3)));
    assert_eq!(got, want);
    // Batch 11 removed key 22; batch 12 changed nothing.
    assert!(delta_entries(loc(&dir), 11, "every") > 0);
    assert_eq!(delta_entries(loc(&dir), 12, "every"), 0, "unchanged values are not rewritten");
}

// ---------------------------------------------------------------------------------------------
// State identity: the shape of a type, not its path.

/// The same state type in three places: where it was, moved to another module, and grown.
mod tally_v1 {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Tally {
        pub n: u64,
        pub last: i64,
    }
}

mod moved {
    pub mod elsewhere {
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct Tally {
            pub n: u64,
            pub last: i64,
        }
    }
}

mod tally_grown {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Tally {
        pub n: u64,
        pub last: i64,
        pub first: i64,
    }
}

mod tally_retyped {
    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Tally {
        pub n: u64,
        pub last: u64,
    }
}

/// Per batch, `(key, n, last)`.
type Tallies = BTreeMap<u64, Vec<(u8, u64, i64)>>;

/// Runs `update_state_by_key("tally", ...)` with state type `T` (built from and read back as
/// `(n, last)`) over `batches`; returns each new batch's `(key, n, last)`.
fn tally_job<T: cairn::StateData + Clone>(
    location: &str,
    batches: &[Vec<(u8, i64)>],
    make: fn(u64, i64) -> T,
    read: fn(&T) -> (u64, i64),
) -> cairn::Result<Tallies> {
    let rec: Rec<(u8, u64, i64)> = Arc::default();
    let r = rec.clone();
    let ctx = StreamingContext::get_or_create(location, move |l| {
        let ctx = StreamingContext::builder().checkpoint(l).batch_interval(SEC).build()?;
        let (q, s) = ctx.queue_stream::<(u8, i64)>("in")?;
        for b in batches {
            q.push(b.clone());
        }
        let out = s.update_state_by_key("tally", move |_, vs: Vec<i64>, old: Option<T>| {
            let n = old.as_ref().map_or(0, |t| read(t).0);
            Some(make(n + vs.len() as u64, *vs.last().expect("called with values")))
        });
        out.map(move |(k, t)| (k, read(&t).0, read(&t).1)).foreach_batch(move |info, mut data| {
            data.sort();
            r.lock().unwrap().insert(info.batch_id.0, data);
            Ok(())
        });
        Ok(ctx)
    })?;
    ctx.run_available()?;
    Ok(snapshot(&rec))
}

/// Moving a state type to another module keeps its identity (its shape), so the job restarts
/// and its state continues; a type whose shape changed (a field added, a field retyped) is
/// refused with an error naming the operator and both identities.
#[test]
fn state_identity_is_the_types_shape_not_its_path() {
    use cairn::StateSchema;
    let dir = tempfile::tempdir().unwrap();
    let l = loc(&dir);
    let mut input = vec![vec![(1, 5), (2, 7)], vec![(1, 6)]];
    let first = tally_job(l, &input, |n, last| tally_v1::Tally { n, last }, |t| (t.n, t.last)).unwrap();
    assert_eq!(first[&1], vec![(1, 2, 6)]);

    input.push(vec![(1, 8), (2, 9)]);
    let moved = tally_job(l, &input, |n, last| moved::elsewhere::Tally { n, last }, |t| (t.n, t.last))
        .expect("moved type");
    assert_eq!(moved.keys().copied().collect::<Vec<_>>(), vec![2], "the moved type resumes after batch 1");
    assert_eq!(moved[&2], vec![(1, 3, 8), (2, 2, 9)], "with the state written under the old path");

    let old = StateSchema::of::<tally_v1::Tally>();
    assert_eq!(old.fingerprint, StateSchema::of::<moved::elsewhere::Tally>().fingerprint);
    input.push(vec![(1, 1)]);
    let grown = tally_job(l, &input, |n, last| tally_grown::Tally { n, last, first: 0 }, |t| (t.n, t.last));
    let retyped = tally_job(
        l,
        &input,
        |n, last| tally_retyped::Tally { n, last: last as u64 },
        |t| (t.n, t.last as i64),
    );
    let new = [StateSchema::of::<tally_grown::Tally>(), StateSchema::of::<tally_retyped::Tally>()];
    for (r, new) in [grown.map(|_| ()), retyped.map(|_| ())].into_iter().zip(new) {
        match r {
            Err(Error::Incompatible { operator, difference }) => {
                assert_eq!(operator, "tally");
                assert_ne!(new.fingerprint, old.fingerprint);
                let (o, n) = (format!("{:016x}", old.fingerprint), format!("{:016x}", new.fingerprint));
                assert!(
                    difference.contains("state type changed from Tally (shape ")
                        && difference.contains(&o)
                        && difference.contains(&n),
                    "{difference}"
                );
            }
            other => panic!("expected Error::Incompatible for a changed shape, got {other:?}"),
        }
    }
    // The refusals changed nothing: the moved type still resumes.
    let again = tally_job(l, &input, |n, last| moved::elsewhere::Tally { n, last }, |t| (t.n, t.last))
        .expect("moved type");
    assert_eq!(again[&3], vec![(1, 4, 1)]);
}

// ---------------------------------------------------------------------------------------------
// Incompatible changes.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Counts {
    U64,
    Removed,
    StringState,
    Version2,
    KeyType,
}

/// A job counting records per key with `update_state_by_key("counts", ...)` in one of several
/// code versions; returns the context (prepared by `get_or_create`) and its `(key, count)` output.
fn counts_job(
    location: &str,
    version: Counts,
    drop: bool,
    batches: &[Vec<u8>],
) -> cairn::Result<(StreamingContext, Rec<(u8, String)>)> {
    let rec: Rec<(u8, String)> = Arc::default();
    let r = rec.clone();
    let batches = batches.to_vec();
    let ctx = StreamingContext::get_or_create(location, move |l| {
        let mut b = StreamingContext::builder().checkpoint(l).batch_interval(SEC).parallelism(2);
        if drop {
            b = b.drop_state("counts");
        }
        let ctx = b.build()?;
        let (q, s) = ctx.queue_stream::<u8>("in")?;
        for batch in batches {
            q.push(batch);
        }
        let pairs = s.map(|k| (k, 1u64));
        let sink = move |out: &cairn::DStream<(u8, String)>| {
            let r = r.clone();
            out.foreach_batch(move |info, mut data| {
                data.sort();
                r.lock().unwrap().insert(info.batch_id.0, data);
                Ok(())
            })
        };
        match version {
            Counts::U64 => sink(
                &pairs
                    .update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| {
                        Some(o.unwrap_or(0) + v.len() as u64)
                    })
                    .map(|(k, c)| (k, c.to_string())),
            ),
            Counts::StringState => {
                sink(&pairs.update_state_by_key("counts", |_, v: Vec<u64>, o: Option<String>| {
                    let old: u64 = o.map_or(0, |s| s.parse().unwrap());
                    Some((old + v.len() as u64).to_string())
                }))
            }
            Counts::Version2 => sink(
                &pairs
                    .update_state_by_key(
                        OpName::new("counts").with_version(2),
                        |_, v: Vec<u64>, o: Option<u64>| Some(o.unwrap_or(0) + v.len() as u64),
                    )
                    .map(|(k, c)| (k, c.to_string())),
            ),
            Counts::KeyType => sink(
                &pairs
                    .map(|(k, v)| (k as u32, v))
                    .update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| {
                        Some(o.unwrap_or(0) + v.len() as u64)
                    })
                    .map(|(k, c)| (k as u8, c.to_string())),
            ),
            Counts::Removed => sink(&pairs.map(|(k, v)| (k, v.to_string()))),
        }
        Ok(ctx)
    })?;
    Ok((ctx, rec))
}

fn expect_incompatible(r: cairn::Result<(StreamingContext, Rec<(u8, String)>)>, what: &str) -> String {
    match r {
        Err(Error::Incompatible { operator, difference }) => {
            assert_eq!(operator, "counts", "{what}");
            difference
        }
        Err(other) => panic!("{what}: expected Error::Incompatible, got {other:?}"),
        Ok(_) => panic!("{what}: expected Error::Incompatible, the context was created"),
    }
}

#[test]
fn incompatible_changes_are_refused_naming_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let l = loc(&dir);
    let input = vec![vec![1, 2, 1], vec![2, 3]];
    let (ctx, out) = counts_job(l, Counts::U64, false, &input).unwrap();
    ctx.run_available().unwrap();
    assert_eq!(snapshot(&out)[&1], vec![(2, "2".to_string()), (3, "1".to_string())]);

    let d = expect_incompatible(counts_job(l, Counts::Removed, false, &input), "removed");
    assert!(d.contains("removed"), "{d}");
    let d = expect_incompatible(counts_job(l, Counts::StringState, false, &input), "state type");
    assert!(d.contains("state type"), "{d}");
    let d = expect_incompatible(counts_job(l, Counts::Version2, false, &input), "version 2");
    assert!(d.contains("state version"), "{d}");
    let d = expect_incompatible(counts_job(l, Counts::KeyType, false, &input), "key type");
    assert!(d.contains("key type"), "{d}");
    // Each refusal gave the location back; the unchanged code still resumes where it was.
    let mut more = input.clone();
    more.push(vec![1, 3]);
    let (ctx, out) = counts_job(l, Counts::U64, false, &more).unwrap();
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.new_batches, 1);
    assert_eq!(snapshot(&out)[&2], vec![(1, "3".to_string()), (3, "2".to_string())]);

    // Dropping the state explicitly allows removing the operator.
    more.push(vec![2]);
    let (ctx, out) = counts_job(l, Counts::Removed, true, &more).unwrap();
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.new_batches, 1);
    assert_eq!(snapshot(&out)[&3], vec![(2, "1".to_string())]);
}

/// After its state was dropped with the operator removed, an operator added back later under
/// the same name starts empty ("new operators start empty").
#[test]
fn state_dropped_with_a_removed_operator_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let l = loc(&dir);
    let mut input = vec![vec![1, 2, 3], vec![1]];
    let (ctx, _) = counts_job(l, Counts::U64, false, &input).unwrap();
    ctx.run_available().unwrap();
    input.push(vec![2]);
    let (ctx, _) = counts_job(l, Counts::Removed, true, &input).unwrap();
    ctx.run_available().unwrap();
    input.push(vec![1, 2]);
    let (ctx, out) = counts_job(l, Counts::U64, false, &input).unwrap();
    ctx.run_available().unwrap();
    assert_eq!(
        snapshot(&out)[&3],
        vec![(1, "1".to_string()), (2, "1".to_string())],
        "an operator added back after its state was dropped starts empty"
    );
}

/// Retyped with `drop_state` (only key 1 gets state of the new type), then run again without
/// `drop_state`: keys 2 and 3 have no state of the new type, so they start empty.
#[test]
fn state_dropped_with_a_retyped_operator_does_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let l = loc(&dir);
    let mut input = vec![vec![1, 2, 3]];
    let (ctx, _) = counts_job(l, Counts::U64, false, &input).unwrap();
    ctx.run_available().unwrap();
    input.push(vec![1]);
    let (ctx, out) = counts_job(l, Counts::StringState, true, &input).unwrap();
    ctx.run_available().unwrap();
    assert_eq!(snapshot(&out)[&1], vec![(1, "1".to_string())], "retyped state starts empty");
    input.push(vec![2, 3]);
    let (ctx, out) = counts_job(l, Counts::StringState, false, &input).expect("restart after a retype");
    ctx.run_available().expect("run after a retype");
    assert_eq!(snapshot(&out)[&2], vec![(2, "1".to_string()), (3, "1".to_string())]);
}

/// A removed source's offsets are dropped (compat.rs: "its offsets are dropped"): a source of
/// the same name added back later reads its input from the start.
#[test]
fn offsets_of_a_removed_source_do_not_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = |with_a: bool, a: Vec<Vec<u32>>, b: Vec<Vec<u32>>| {
        let ctx = StreamingContext::builder().checkpoint(loc(&dir)).batch_interval(SEC).build().unwrap();
        let (qb, sb) = ctx.queue_stream::<u32>("b").unwrap();
        for x in b {
            qb.push(x);
        }
        let s = if with_a {
            let (qa, sa) = ctx.queue_stream::<u32>("a").unwrap();
            for x in a {
                qa.push(x);
            }
            sb.union(&sa)
        } else {
            sb
        };
        let out = record(&s, &Arc::default());
        ctx.run_available().unwrap();
        snapshot(&out)
    };
    let first = run(true, vec![vec![1], vec![2], vec![3]], vec![vec![10], vec![20], vec![30]]);
    assert_eq!(first.into_values().collect::<Vec<_>>(), vec![vec![1, 10], vec![2, 20], vec![3, 30]]);
    let second = run(false, vec![], vec![vec![10], vec![20], vec![30], vec![40]]);
    assert_eq!(second.into_values().collect::<Vec<_>>(), vec![vec![40]]);
    // "a" is back with new input: its old offsets were dropped, so it starts at its first chunk.
    let third = run(true, vec![vec![100], vec![200]], vec![vec![10], vec![20], vec![30], vec![40], vec![50]]);
    assert_eq!(third.into_values().collect::<Vec<_>>(), vec![vec![50, 100], vec![200]]);
}

// ---------------------------------------------------------------------------------------------
// The location's guardrails.

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_second_context_on_a_running_location_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = loc(&dir).to_string();
    let done = Arc::new(Mutex::new(Vec::<u64>::new()));
    let make = |d: Arc<Mutex<Vec<u64>>>| {
        move |l: &str| {
            let ctx = StreamingContext::builder()
                .checkpoint(l)
                .batch_interval(Duration::from_millis(40))
                .trigger(Trigger::ProcessingTime)
                .build()?;
            let s = ctx.generator("gen", 2, 10, |p, o| ((o % 4) as u8, p as u64))?;
            s.update_state_by_key("sums", |_, v: Vec<u64>, o: Option<u64>| {
                Some(o.unwrap_or(0) + v.iter().sum::<u64>())
            })
            .foreach_batch(move |info, _| {
                d.lock().unwrap().push(info.batch_id.0);
                Ok(())
            });
            Ok(ctx)
        }
    };
    let first = StreamingContext::get_or_create(&l, make(done.clone())).unwrap();
    first.start().unwrap();
    wait_for("two batches", || done.lock().unwrap().len() >= 2);
    let second = StreamingContext::get_or_create(&l, make(Arc::default()));
    match second {
        Err(Error::Checkpoint(cairn::checkpoint::Error::Locked { location, holder, .. })) => {
            assert!(location.contains(&l) || l.contains(&location), "{location}");
            assert!(holder.contains(&std::process::id().to_string()), "names the holder: {holder}");
        }
        Err(other) => panic!("expected Locked, got {other:?}"),
        Ok(_) => panic!("a second context took a location in use"),
    }
    // The refused context neither stopped nor disturbed the first.
    let n = done.lock().unwrap().len();
    wait_for("the first to keep running", || done.lock().unwrap().len() >= n + 2);
    first.stop();
    let summary = first.await_termination().unwrap();
    let ids = done.lock().unwrap().clone();
    assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>(), "no batch lost or repeated");
    assert_eq!(summary.new_batches, ids.len() as u64);
    // Once stopped, the location can be taken again, and it resumes after the last batch.
    let again = StreamingContext::get_or_create(&l, make(Arc::default())).unwrap();
    let d2 = done.clone();
    again.on_batch(move |p| d2.lock().unwrap().push(1000 + p.batch_id.0));
    again.start().unwrap();
    wait_for("a batch after the restart", || done.lock().unwrap().iter().any(|b| *b >= 1000));
    again.stop();
    again.await_termination().unwrap();
    let first_new = done.lock().unwrap().iter().copied().find(|b| *b >= 1000).unwrap() - 1000;
    assert_eq!(first_new, ids.len() as u64);
}

/// A context that was prepared (it holds the lease) and dropped without running gives the
/// location back, so this process can open it again.
#[test]
fn dropping_a_prepared_context_releases_the_location() {
    let dir = tempfile::tempdir().unwrap();
    let l = loc(&dir).to_string();
    let (ctx, _) = counts_job(&l, Counts::U64, false, &[vec![1]]).unwrap();
    drop(ctx);
    let (ctx, out) = counts_job(&l, Counts::U64, false, &[vec![1]])
        .expect("a dropped context must not keep the location locked");
    ctx.run_available().unwrap();
    assert_eq!(snapshot(&out)[&0], vec![(1, "1".to_string())]);
}

fn files_in(dir: &std::path::Path, sub: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(sub))
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The newest checkpoint is damaged after a stop: recovery falls back to the previous one,
/// reports it, replays the batch in between with its logged input, and the output is the
/// straight-through output.
#[test]
fn a_corrupt_newest_checkpoint_falls_back_and_output_is_unchanged() {
    let input = fixed_input(N);
    let want = model(&input);
    let dir = tempfile::tempdir().unwrap();
    let (c1, _q, o1) = job(loc(&dir), &input, &cfg(2, Some(6), 1));
    c1.run_available().unwrap();
    let state = files_in(dir.path(), "state");
    let newest = state.iter().max().unwrap().clone();
    assert!(newest.starts_with("00000000000000000005"), "{state:?}");
    let path = dir.path().join("state").join(&newest);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let (c2, _q, o2) = job(loc(&dir), &input, &cfg(2, None, 1));
    let s2 = c2.run_available().unwrap();
    assert!(!s2.recovery_warnings.is_empty(), "the damage is reported");
    assert!(s2.recovery_warnings.iter().any(|w| w.contains('5')), "{:?}", s2.recovery_warnings);
    assert_eq!(s2.replayed_batches, 1, "batch 5 is replayed on top of the checkpoint of batch 4");
    assert_eq!(o2.batch_ids(), (5..N as u64).collect::<Vec<_>>());
    // The replay reproduces batch 5's first output exactly.
    assert_eq!(o1.flat().sessions[&5], o2.flat().sessions[&5]);
    assert_eq!(o1.flat().sums_inv[&5], o2.flat().sums_inv[&5]);
    let mut all = o1.flat();
    all.extend(o2.flat());
    assert_flat_eq(&all, &want, "corrupt newest checkpoint");
}

fn count_kind(files: &[String], suffix: &str) -> usize {
    files.iter().filter(|f| f.ends_with(suffix)).count()
}

/// Keeping every checkpoint, every batch adds exactly one log object (its plan, carrying the
/// previous commit) and one state object (one checkpoint for all operators and sources); every
/// stop adds one commit object.
#[test]
fn each_batch_adds_one_plan_and_one_state_object() {
    let input = fixed_input(N);
    let dir = tempfile::tempdir().unwrap();
    let mut prev = 0u64;
    let mut stops = Vec::new();
    for (run, stop) in [1u64, 3, 4, 7, 12].into_iter().enumerate() {
        let ctx = StreamingContext::builder()
            .checkpoint(loc(&dir))
            .batch_interval(SEC)
            .keep_checkpoints(1000)
            .full_snapshot_every(1000)
            .max_checkpoint_deferral(0)
            .stop_after_batches(stop)
            .parallelism(3)
            .build()
            .unwrap();
        let (q, s) = ctx.queue_stream::<(u8, i64)>("events").unwrap();
        let (q2, s2) = ctx.queue_stream::<(u8, i64)>("more").unwrap();
        for b in &input {
            q.push(b.clone());
            q2.push(b.clone());
        }
        let u = s.union(&s2);
        u.update_state_by_key("a", |_, v: Vec<i64>, o: Option<i64>| Some(o.unwrap_or(0) + v.len() as i64))
            .print(0);
        u.window("b", SEC * 2, SEC).print(0);
        u.reduce_by_key_and_window("c", |a, b| a + b, Some(|a: i64, b: i64| a - b), SEC * 2, SEC).print(0);
        let summary = ctx.run_available().unwrap();
        let new = stop - prev;
        assert_eq!(summary.new_batches, new);
        assert_eq!(summary.checkpoints, new, "one checkpoint per batch");
        assert_eq!(summary.checkpoint_objects, new, "one object per checkpoint");
        assert_eq!(summary.log_objects, new + 1, "one plan per batch and the final commit");
        let log = files_in(dir.path(), "log");
        let state = files_in(dir.path(), "state");
        // Retention keeps every checkpoint here, and all of them build on the one full snapshot:
        // no checkpoint is independent of it, so the whole log stays (a replay from batch 0 is
        // the second restore point).
        stops.push(stop - 1);
        let mut want_log: Vec<String> = (0..stop).map(|b| format!("{b:020}.plan")).collect();
        want_log.extend(stops.iter().map(|b| format!("{b:020}.commit")));
        want_log.sort();
        assert_eq!(log, want_log, "after run {run}");
        assert_eq!(count_kind(&state, ".full"), 1, "{state:?}");
        assert_eq!(count_kind(&state, ".delta"), stop as usize - 1, "{state:?}");
        assert_eq!(state.len(), stop as usize, "nothing else under state/: {state:?}");
        prev = stop;
    }
}

/// `state/<batch>.full` or `state/<batch>-<parent>.delta` -> (batch, parent).
fn parse_state(name: &str) -> (u64, Option<u64>) {
    let (stem, ext) = name.split_once('.').unwrap();
    match ext {
        "full" => (stem.parse().unwrap(), None),
        "delta" => {
            let (b, p) = stem.split_once('-').unwrap();
            (b.parse().unwrap(), Some(p.parse().unwrap()))
        }
        other => panic!("unexpected state object {name} ({other})"),
    }
}

/// After 30 batches keeping 3 checkpoints: the state directory holds exactly the chains of the 3
/// newest checkpoints and of a second restore point that shares no object with the newest
/// checkpoint's chain, and the log holds only the batches after that restore point.
#[test]
fn retention_keeps_the_newest_checkpoints_and_the_log_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder()
        .checkpoint(loc(&dir))
        .batch_interval(SEC)
        .keep_checkpoints(3)
        .full_snapshot_every(3)
        .max_checkpoint_deferral(0)
        .stop_after_batches(30)
        .parallelism(2)
        .build()
        .unwrap();
    let s = ctx.generator("g", 2, 20, |p, o| ((o % 7) as u8, p as i64)).unwrap();
    s.update_state_by_key("t", |_, v: Vec<i64>, o: Option<i64>| Some(o.unwrap_or(0) + v.iter().sum::<i64>()))
        .print(0);
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.checkpoints, 30);
    let state: Vec<(u64, Option<u64>)> =
        files_in(dir.path(), "state").iter().map(|n| parse_state(n)).collect();
    let fulls: BTreeSet<u64> = state.iter().filter(|s| s.1.is_none()).map(|s| s.0).collect();
    let deltas: BTreeMap<u64, u64> = state.iter().filter_map(|s| s.1.map(|p| (s.0, p))).collect();
    // The chain of a checkpoint, preferring full snapshots, as recovery resolves it.
    let chain = |mut b: u64| {
        let mut c = BTreeSet::new();
        loop {
            if fulls.contains(&b) {
                c.insert((b, None));
                return c;
            }
            let p = *deltas.get(&b).unwrap_or_else(|| panic!("checkpoint {b} has no chain in {state:?}"));
            c.insert((b, Some(p)));
            b = p;
        }
    };
    let newest = chain(29);
    let second = (0..29)
        .rev()
        .find(|b| (fulls.contains(b) || deltas.contains_key(b)) && chain(*b).is_disjoint(&newest))
        .expect("a second restore point independent of the newest chain");
    let needed: BTreeSet<(u64, Option<u64>)> = [27, 28, 29, second].into_iter().flat_map(chain).collect();
    let mut want_log: Vec<String> = (second.min(27) + 1..30).map(|b| format!("{b:020}.plan")).collect();
    want_log.push("00000000000000000029.commit".into());
    want_log.sort();
    assert_eq!(files_in(dir.path(), "log"), want_log, "the log after the second restore point ({second})");
    // Objects of batch 29 itself (a delta and, if compacted, a full snapshot) are kept too.
    let mut want = needed.clone();
    want.extend(state.iter().filter(|s| s.0 == 29).copied());
    assert_eq!(state.iter().copied().collect::<BTreeSet<_>>(), want, "exactly the kept chains: {state:?}");
    eprintln!("state objects kept after 30 batches: {}", state.len());
}

// ---------------------------------------------------------------------------------------------
// The text file source.

fn add_file(dir: &std::path::Path, name: &str, lines: std::ops::Range<u32>) {
    let text: String = lines.map(|i| format!("line-{i}\n")).collect();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn lines(r: std::ops::Range<u32>) -> Vec<String> {
    r.map(|i| format!("line-{i}")).collect()
}

#[test]
fn text_files_arrive_in_name_order_at_most_max_files_per_batch_and_exactly_once() {
    let input = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    let run = |stop: Option<u64>| {
        let mut b = StreamingContext::builder().checkpoint(loc(&ckpt)).batch_interval(SEC).parallelism(2);
        if let Some(n) = stop {
            b = b.stop_after_batches(n);
        }
        let ctx = b.build().unwrap();
        let s = ctx.text_file_stream("files", input.path().to_str().unwrap(), 2).unwrap();
        // A stateful operator on the lines too: its count must match the lines read.
        let counted = s
            .map(|l| (l.len() as u8, 1u64))
            .update_state_by_key("by-len", |_, v: Vec<u64>, o: Option<u64>| {
                Some(o.unwrap_or(0) + v.len() as u64)
            });
        let totals = record(&counted, &Arc::default());
        let out = record(&s, &Arc::default());
        let summary = ctx.run_available().unwrap();
        (summary, snapshot(&out), snapshot(&totals))
    };
    // A file still being written (hidden name) is not taken.
    std::fs::write(input.path().join(".partial"), "not yet\n").unwrap();
    std::fs::write(input.path().join("_SUCCESS"), "").unwrap();
    for (i, name) in ["b.txt", "a.txt", "c.txt", "e.txt", "d.txt"].iter().enumerate() {
        let i = i as u32;
        add_file(input.path(), name, i * 10..i * 10 + 10);
    }
    // Batches of 2, 2, 1 files in name order: a b | c d | e; stop after the first two.
    let (s1, out1, totals1) = run(Some(2));
    assert_eq!(s1.new_batches, 2);
    let mut ab = lines(10..20);
    ab.extend(lines(0..10));
    ab.sort();
    let mut cd = lines(20..30);
    cd.extend(lines(40..50));
    cd.sort();
    assert_eq!(out1.into_values().collect::<Vec<_>>(), vec![ab, cd]);
    // New files before the restart, one with a name before the remaining "e.txt".
    add_file(input.path(), "0-early.txt", 50..55);
    add_file(input.path(), "f.txt", 55..60);
    let (s2, out2, totals2) = run(None);
    assert_eq!(s2.new_batches, 2, "0-early + e, then f");
    let mut first = lines(50..55);
    first.extend(lines(30..40));
    first.sort();
    let mut second = lines(55..60);
    second.sort();
    assert_eq!(out2.clone().into_values().collect::<Vec<_>>(), vec![first, second]);
    assert_eq!(out2.keys().copied().collect::<Vec<_>>(), vec![2, 3], "batch ids continue");
    // by-len state survived the restart: "line-N" lines are 6 or 7 bytes long.
    let mut want_len: BTreeMap<u8, u64> = BTreeMap::new();
    for l in (0..60).map(|i| format!("line-{i}")) {
        *want_len.entry(l.len() as u8).or_insert(0) += 1;
    }
    let last: BTreeMap<u8, u64> = totals1.values().chain(totals2.values()).flatten().copied().collect();
    assert_eq!(last, want_len, "every line counted once across the restart");
    // Nothing new: no batch at all.
    let (s3, out3, _) = run(None);
    assert_eq!(s3.new_batches, 0);
    assert!(out3.is_empty());
}

/// A file large enough to be split into several byte ranges still yields every line once.
#[test]
fn a_large_file_is_read_once_across_its_ranges() {
    let input = tempfile::tempdir().unwrap();
    let ckpt = tempfile::tempdir().unwrap();
    // ~1.2 MB with lines of varying length.
    let text: String = (0..60_000u32).map(|i| format!("{i}:{}\n", "z".repeat((i % 23) as usize))).collect();
    let tmp = input.path().join(".big");
    std::fs::write(&tmp, &text).unwrap();
    std::fs::rename(&tmp, input.path().join("big.txt")).unwrap();
    let ctx = StreamingContext::builder().checkpoint(loc(&ckpt)).parallelism(2).build().unwrap();
    let s = ctx
        .text_file_stream_parsed("files", input.path().to_str().unwrap(), 1, |l| {
            l.split_once(':').ok_or("no colon".to_string())?.0.parse::<u32>().map_err(|e| e.to_string())
        })
        .unwrap();
    let out = record(&s, &Arc::default());
    let summary = ctx.run_available().unwrap();
    assert_eq!(summary.new_batches, 1);
    let got = snapshot(&out);
    assert_eq!(got[&0], (0..60_000).collect::<Vec<u32>>());
}
