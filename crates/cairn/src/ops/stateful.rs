//! Stateful keyed operators: `update_state_by_key` and `map_with_state`.

use crate::api::dstream::DStream;
use crate::error::Result;
use crate::graph::state::{describe, table, KeyedState, Slot, StateData, StatePart};
use crate::graph::{partition_of, shuffle, Data, Key, Partitions, StatefulOp};
use crate::ops::migration::{self, Migration};
use crate::runtime::failpoint;
use cairn_checkpoint::{OperatorDescription, TableData};
use cairn_checkpoint::{OperatorKind, StateEncoding};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

/// A stateful operator's stable name (its id in checkpoints), the version of its state's
/// schema, and how to convert state stored by older versions.
///
/// Bump the version when the meaning or the type of the state changes: a restart then refuses
/// to load the old state instead of misreading it, unless a migration from the stored version
/// is declared ([`migrate_from`](Self::migrate_from)).
///
/// ```
/// use cairn::OpName;
/// let a: OpName = "totals".into();
/// assert_eq!(a.version(), 1);
/// assert_eq!(OpName::new("totals").with_version(2).version(), 2);
/// ```
#[derive(Debug, Clone)]
pub struct OpName {
    name: String,
    version: u32,
    migrations: Vec<Migration>,
    renamed_from: Vec<String>,
    encoding: StateEncoding,
}

impl OpName {
    /// A name with state version 1.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: 1,
            migrations: Vec::new(),
            renamed_from: Vec::new(),
            encoding: StateEncoding::Compact,
        }
    }
    /// Sets the state schema version.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }
    /// Declares how state stored at an older `version`, of type `O`, becomes the operator's
    /// current state type `S`: `f` maps each stored value (returning `None` drops the key).
    /// Applies to `update_state_by_key`, `update_state_by_key_every_batch` and
    /// `map_with_state`. At restore, a checkpoint holding the operator's state at `version`
    /// with `O`'s shape is converted value by value, and the next checkpoint is a full snapshot
    /// at the new version. Declare one migration per older version still in use; a
    /// migration whose `S` is not the operator's state type, or whose `version` is not older
    /// than the operator's, stops the job at start with an error naming it.
    ///
    /// ```
    /// use cairn::OpName;
    /// #[derive(serde::Serialize, serde::Deserialize, Clone)]
    /// struct Stats { count: u64, sum: i64 }
    /// // Version 1 kept a count alone; version 2 keeps the sum too (unknown for old keys: 0).
    /// let name = OpName::new("stats").with_version(2).migrate_from(1, |count: u64| Some(Stats { count, sum: 0 }));
    /// assert_eq!(name.version(), 2);
    /// ```
    pub fn migrate_from<O: StateData, S: StateData>(
        mut self,
        version: u32,
        f: impl Fn(O) -> Option<S> + Send + Sync + 'static,
    ) -> Self {
        self.migrations.push(Migration::new(version, f));
        self
    }
    /// Declares that the operator was called `old` before: a checkpoint holding state of an
    /// operator named `old` restores it into this one (for every stateful operator kind), and
    /// the next checkpoint is a full snapshot under the new name. `old` must not be the name of
    /// another operator of the job.
    ///
    /// ```
    /// use cairn::OpName;
    /// let name = OpName::new("clicks_per_user").renamed_from("counts");
    /// assert_eq!(name.name(), "clicks_per_user");
    /// ```
    pub fn renamed_from(mut self, old: impl Into<String>) -> Self {
        self.renamed_from.push(old.into());
        self
    }
    /// Stores the state's values as JSON with field names instead of the compact positional
    /// encoding, so that a field added with `#[serde(default)]` (or a field removed) is read
    /// from old values as they are: the state type may change that way without a version bump
    /// or a migration; a stored value the new type cannot read stops the restore, naming the
    /// operator and showing the value. Costs more bytes and time per checkpointed key (see
    /// docs/benchmarks.md). Applies to `update_state_by_key` and `map_with_state`; switching an
    /// existing operator's encoding is a migration (raise the version, `migrate_from` the old
    /// version with the same type).
    ///
    /// ```
    /// use cairn::OpName;
    /// let name = OpName::new("sessions").self_describing();
    /// assert_eq!(name.name(), "sessions");
    /// ```
    pub fn self_describing(mut self) -> Self {
        self.encoding = StateEncoding::Json;
        self
    }
    /// How the state's values are stored.
    pub(crate) fn encoding(&self) -> StateEncoding {
        self.encoding
    }
    /// The names this operator had before.
    pub(crate) fn old_names(&self) -> &[String] {
        &self.renamed_from
    }
    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The state schema version.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// The declared migrations, checked against the operator's state type `S`; mistakes are
    /// recorded on the graph, reported when the job starts.
    pub(crate) fn migrations_for<S: 'static>(&self, graph: &crate::graph::Graph) -> Vec<Migration> {
        for e in migration::check::<S>(&self.name, self.version, &self.migrations) {
            graph.defer_error(e);
        }
        self.migrations.clone()
    }
    /// For operators whose state cannot be migrated or stored self-describing (yet): asking
    /// for it is a mistake.
    pub(crate) fn refuse_migrations(&self, graph: &crate::graph::Graph, kind: OperatorKind) {
        if !self.migrations.is_empty() {
            graph.defer_error(format!(
                "operator {:?}: {kind} state cannot be migrated; migrations apply to update_state_by_key and map_with_state",
                self.name
            ));
        }
        if !self.encoding.is_compact() {
            graph.defer_error(format!(
                "operator {:?}: {kind} state cannot be stored self-describing; that applies to update_state_by_key and map_with_state",
                self.name
            ));
        }
    }
}

impl From<&str> for OpName {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for OpName {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

struct KeyedOp<K, S> {
    kind: OperatorKind,
    version: u32,
    migrations: Vec<Migration>,
    state: KeyedState<K, S>,
}

impl<K: Key + StateData, S: StateData> StatefulOp for KeyedOp<K, S> {
    fn describe(&self) -> OperatorDescription {
        OperatorDescription {
            migrations: self.migrations.iter().map(Migration::source).collect(),
            state_encoding: self.state.encoding,
            ..describe::<K, S>(&self.state.name, self.kind.clone(), self.version)
        }
    }
    fn snapshot(&self, full: bool) -> Result<Vec<TableData>> {
        Ok(vec![self.state.snapshot(&self.state.name, full)?])
    }
    fn restore(&self, tables: &[&TableData]) -> Result<()> {
        match table(tables, &self.state.name) {
            Some(t) => self.state.restore(t),
            None => Ok(()),
        }
    }
    fn key_count(&self) -> usize {
        self.state.len()
    }
    fn migrations(&self) -> &[Migration] {
        &self.migrations
    }
    fn reset(&self) {
        self.state.clear();
    }
}

/// The state of one key, as seen by a `map_with_state` function.
///
/// ```
/// use cairn::State;
/// let mut slot = Some(3);
/// let mut s = State::detached(&mut slot);
/// assert_eq!(s.get(), Some(&3));
/// s.update(4);
/// assert!(s.exists());
/// s.remove();
/// assert!(!s.exists());
/// ```
pub struct State<'a, S> {
    current: Option<&'a mut S>,
    replacement: Option<S>,
    removed: bool,
    updated: bool,
    timing_out: bool,
}

impl<'a, S> State<'a, S> {
    fn new(current: Option<&'a mut S>, timing_out: bool) -> Self {
        Self { current, replacement: None, removed: false, updated: false, timing_out }
    }

    /// A state handle over a plain option, for unit-testing state functions.
    pub fn detached(slot: &'a mut Option<S>) -> Self {
        Self::new(slot.as_mut(), false)
    }

    /// Whether the key has state.
    pub fn exists(&self) -> bool {
        !self.removed && (self.replacement.is_some() || self.current.is_some())
    }

    /// The key's state, if any.
    pub fn get(&self) -> Option<&S> {
        if self.removed {
            return None;
        }
        self.replacement.as_ref().or(self.current.as_deref())
    }

    /// Mutable access to existing state; counts as an update.
    pub fn get_mut(&mut self) -> Option<&mut S> {
        if self.removed || self.timing_out {
            return None;
        }
        self.updated = true;
        match &mut self.replacement {
            Some(r) => Some(r),
            None => self.current.as_deref_mut(),
        }
    }

    /// Sets the key's state. Ignored while the key is timing out (its state is being removed).
    pub fn update(&mut self, value: S) {
        if self.timing_out {
            return;
        }
        self.replacement = Some(value);
        self.updated = true;
        self.removed = false;
    }

    /// Removes the key's state.
    pub fn remove(&mut self) {
        self.removed = true;
        self.replacement = None;
    }

    /// True when the function is called because the key was idle for the spec's timeout; the
    /// state is removed after this call.
    pub fn is_timing_out(&self) -> bool {
        self.timing_out
    }
}

/// Makes the initial state again each time a run starts without restored state (a restart in
/// place before the first checkpoint needs it a second time).
type InitialState<K, S> = Arc<dyn Fn() -> Vec<(K, S)> + Send + Sync>;

/// How `map_with_state` treats each key: the function, an optional idle timeout, an optional
/// initial state (used only when the job starts without a checkpoint).
///
/// The function is called once per record with `Some(value)`, and once with `None` when a key
/// has had no data for the timeout (checked every batch, against batch time).
pub struct StateSpec<K, V, S, U> {
    func: Arc<StateFn<K, V, S, U>>,
    timeout: Option<Duration>,
    initial: Option<InitialState<K, S>>,
}

impl<K, V, S, U> StateSpec<K, V, S, U> {
    /// A spec with the given function, no timeout and no initial state.
    pub fn function(f: impl Fn(&K, Option<V>, &mut State<'_, S>) -> U + Send + Sync + 'static) -> Self {
        Self { func: Arc::new(f), timeout: None, initial: None }
    }
    /// Removes keys that received no data for `idle` (batch time), calling the function once
    /// with `None` and `is_timing_out()` before removal.
    pub fn timeout(mut self, idle: Duration) -> Self {
        self.timeout = Some(idle);
        self
    }
    /// State to start from on a fresh start (ignored when restoring from a checkpoint).
    pub fn initial_state(mut self, initial: Vec<(K, S)>) -> Self
    where
        K: Clone + Send + Sync + 'static,
        S: Clone + Send + Sync + 'static,
    {
        self.initial = Some(Arc::new(move || initial.clone()));
        self
    }
}

impl<K: Key + StateData, V: Data> DStream<(K, V)> {
    /// Keeps a state per key across batches: `f(key, new values, previous state)` returns the
    /// new state (`None` removes it). Called for every key that received values in the batch;
    /// emits `(key, new state)` for those keys.
    ///
    /// Unlike Spark, keys without new values are not visited every batch (that would cost the
    /// whole state per batch); use `map_with_state` with a timeout to expire idle keys, or
    /// [`update_state_by_key_every_batch`](Self::update_state_by_key_every_batch) for Spark's
    /// semantics.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<(char, i64)>("in").unwrap();
    /// let totals = s.update_state_by_key("totals", |_k, vs: Vec<i64>, old: Option<i64>| {
    ///     Some(old.unwrap_or(0) + vs.iter().sum::<i64>())
    /// });
    /// # q.push(vec![('a', 1), ('a', 2)]);
    /// # q.push(vec![('a', 10)]);
    /// # let out = cairn::testing::collect(&totals);
    /// # ctx.run_available().unwrap();
    /// # assert_eq!(out.lock().unwrap().clone(), vec![vec![('a', 3)], vec![('a', 13)]]);
    /// ```
    pub fn update_state_by_key<S: StateData + Data>(
        &self,
        name: impl Into<OpName>,
        f: impl Fn(&K, Vec<V>, Option<S>) -> Option<S> + Send + Sync + 'static,
    ) -> DStream<(K, S)> {
        self.update_state(name.into(), f, None)
    }

    /// Spark's `updateStateByKey`: like [`update_state_by_key`](Self::update_state_by_key), but
    /// `f` sees every key in state every batch, with an empty `Vec` when the key got no values
    /// (returning `None` removes it), and the output holds every key in state after the batch.
    ///
    /// Cost: every batch calls `f` (and clones the state value) for the whole state, not only
    /// for the keys of the batch. Checkpoints stay incremental: a key without new values is
    /// written to the next checkpoint only if `f` returned a value different from the old one,
    /// which is why the state type must be `PartialEq` (without it every key would count as
    /// changed, and every checkpoint would rewrite the whole state). The stored state is the
    /// same as `update_state_by_key`'s, so a job may switch between the two across a restart.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<(char, i64)>("in").unwrap();
    /// // A key loses 1 per batch without values, and leaves when it reaches 0.
    /// let credit = s.update_state_by_key_every_batch("credit", |_k, vs: Vec<i64>, old: Option<i64>| {
    ///     let c = old.unwrap_or(0) + vs.iter().sum::<i64>() - i64::from(vs.is_empty());
    ///     (c > 0).then_some(c)
    /// });
    /// # q.push(vec![('a', 2), ('b', 5)]);
    /// # q.push(vec![('b', 1)]);
    /// # q.push(vec![]);
    /// # let out = cairn::testing::collect(&credit);
    /// # ctx.run_available().unwrap();
    /// # let got: Vec<Vec<(char, i64)>> = out.lock().unwrap().iter().map(|b| { let mut b = b.clone(); b.sort(); b }).collect();
    /// # assert_eq!(got, vec![vec![('a', 2), ('b', 5)], vec![('a', 1), ('b', 6)], vec![('b', 5)]]);
    /// ```
    pub fn update_state_by_key_every_batch<S: StateData + Data + PartialEq>(
        &self,
        name: impl Into<OpName>,
        f: impl Fn(&K, Vec<V>, Option<S>) -> Option<S> + Send + Sync + 'static,
    ) -> DStream<(K, S)> {
        self.update_state(name.into(), f, Some(|a: &S, b: &S| a == b))
    }

    /// Both `update_state_by_key` flavours: with `every_key` (how to tell an unchanged value),
    /// keys without values in the batch are visited too.
    fn update_state<S: StateData + Data>(
        &self,
        name: OpName,
        f: impl Fn(&K, Vec<V>, Option<S>) -> Option<S> + Send + Sync + 'static,
        every_key: Option<fn(&S, &S) -> bool>,
    ) -> DStream<(K, S)> {
        self.graph.claim_stateful(&name, self.aligned);
        let op = Arc::new(KeyedOp {
            kind: OperatorKind::UpdateStateByKey,
            version: name.version(),
            migrations: name.migrations_for::<S>(&self.graph),
            state: KeyedState::<K, S>::new(name.name(), self.graph.parallelism)
                .with_encoding(name.encoding()),
        });
        self.graph.add_stateful(op.clone());
        self.derive(move |parts, ctx| {
            let n = op.state.parallelism();
            let shuffled = shuffle(parts, n);
            let now = ctx.info.batch_time_ms;
            let out: Partitions<(K, S)> = shuffled
                .into_par_iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut grouped: FxHashMap<K, Vec<V>> = FxHashMap::default();
                    let mut order = Vec::new();
                    for (k, v) in p {
                        match grouped.entry(k) {
                            Entry::Occupied(mut e) => e.get_mut().push(v),
                            Entry::Vacant(e) => {
                                order.push(e.key().clone());
                                e.insert(vec![v]);
                            }
                        }
                    }
                    let mut guard = op.state.part(i);
                    let StatePart { map, dirty, removed, .. } = &mut *guard;
                    let mut out = Vec::with_capacity(order.len());
                    if let Some(same) = every_key {
                        // Keys without values: an unchanged value is not marked changed, so the
                        // next delta does not rewrite it (its last data time stays as it was).
                        map.retain(|k, slot| {
                            if grouped.contains_key(k) {
                                return true;
                            }
                            match f(k, Vec::new(), Some(slot.value.clone())) {
                                Some(s) => {
                                    if !same(&s, &slot.value) {
                                        slot.value = s;
                                        StatePart::<K, S>::touch(dirty, k, slot);
                                    }
                                    out.push((k.clone(), slot.value.clone()));
                                    true
                                }
                                None => {
                                    StatePart::<K, S>::removed(removed, k.clone());
                                    false
                                }
                            }
                        });
                    }
                    for k in order {
                        let vs = grouped.remove(&k).expect("grouped above");
                        let old = map.remove(&k);
                        let (existed, was_dirty) = (old.is_some(), old.as_ref().is_some_and(|s| s.dirty()));
                        match f(&k, vs, old.map(|s| s.value)) {
                            Some(s) => {
                                if !was_dirty {
                                    dirty.push(k.clone());
                                }
                                map.insert(k.clone(), Slot::new(s.clone(), now, true));
                                out.push((k, s));
                            }
                            None if existed => removed.push(k),
                            None => {}
                        }
                    }
                    out
                })
                .collect();
            failpoint::hit(failpoint::MID_BATCH, ctx.info.batch_id.0);
            Ok(out)
        })
    }

    /// Calls `spec`'s function for every record with the key's state, emitting what it returns;
    /// see [`StateSpec`] for timeouts and initial state.
    ///
    /// ```
    /// # use cairn::{StreamingContext, StateSpec};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let ctx = StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<(String, u64)>("in").unwrap();
    /// let running = s.map_with_state("running", StateSpec::function(|k: &String, v: Option<u64>, st| {
    ///     let total = st.get().copied().unwrap_or(0) + v.unwrap_or(0);
    ///     st.update(total);
    ///     (k.clone(), total)
    /// }));
    /// # q.push(vec![("a".into(), 1), ("a".into(), 2)]);
    /// # let out = cairn::testing::collect(&running);
    /// # ctx.run_available().unwrap();
    /// # assert_eq!(out.lock().unwrap().concat(), vec![("a".to_string(), 1), ("a".to_string(), 3)]);
    /// ```
    pub fn map_with_state<S: StateData, U: Data>(
        &self,
        name: impl Into<OpName>,
        spec: StateSpec<K, V, S, U>,
    ) -> DStream<U> {
        let name = name.into();
        self.graph.claim_stateful(&name, self.aligned);
        let op = Arc::new(MapWithStateOp {
            inner: KeyedOp {
                kind: OperatorKind::MapWithState,
                version: name.version(),
                migrations: name.migrations_for::<S>(&self.graph),
                state: KeyedState::<K, S>::new(name.name(), self.graph.parallelism)
                    .with_encoding(name.encoding()),
            },
            timeout_ms: spec.timeout.map(|d| d.as_millis() as i64),
            pending: std::sync::Mutex::new(spec.initial.as_ref().map(|f| f())),
            initial: spec.initial,
        });
        self.graph.add_stateful(op.clone());
        let func = spec.func;
        self.derive(move |parts, ctx| {
            op.seed_initial(ctx.info.batch_time_ms);
            let n = op.inner.state.parallelism();
            let now = ctx.info.batch_time_ms;
            let timeout = op.timeout_ms;
            let out: Partitions<U> = shuffle(parts, n)
                .into_par_iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut guard = op.inner.state.part(i);
                    let part: &mut StatePart<K, S> = &mut guard;
                    let mut out = Vec::with_capacity(p.len());
                    for (k, v) in p {
                        out.push(apply_record(part, k, v, now, timeout, &*func));
                    }
                    if let Some(t) = timeout {
                        expire(part, now, t, &*func, &mut out);
                    }
                    out
                })
                .collect();
            failpoint::hit(failpoint::MID_BATCH, ctx.info.batch_id.0);
            Ok(out)
        })
    }
}

type StateFn<K, V, S, U> = dyn Fn(&K, Option<V>, &mut State<'_, S>) -> U + Send + Sync;

/// One record through `map_with_state`: a single hash lookup for existing keys, a second only
/// when a key is created or removed.
#[inline]
fn apply_record<K: Key, V, S, U>(
    part: &mut StatePart<K, S>,
    k: K,
    v: V,
    now: i64,
    timeout: Option<i64>,
    f: &StateFn<K, V, S, U>,
) -> U {
    let StatePart { map, dirty, removed, timers } = part;
    if let Some(slot) = map.get_mut(&k) {
        let mut st = State::new(Some(&mut slot.value), false);
        let out = f(&k, Some(v), &mut st);
        let State { replacement, removed: is_removed, updated, .. } = st;
        if is_removed {
            map.remove(&k);
            StatePart::<K, S>::removed(removed, k);
            return out;
        }
        if let Some(r) = replacement {
            slot.value = r;
        }
        let refreshed = slot.seen_ms() != now;
        slot.set_seen_ms(now);
        if updated || refreshed {
            StatePart::<K, S>::touch(dirty, &k, slot);
        }
        if let (true, Some(t)) = (refreshed, timeout) {
            timers.push_back((now + t, k));
        }
        out
    } else {
        let mut st = State::new(None, false);
        let out = f(&k, Some(v), &mut st);
        if let (false, Some(value)) = (st.removed, st.replacement) {
            if let Some(t) = timeout {
                timers.push_back((now + t, k.clone()));
            }
            let slot = StatePart::<K, S>::new_slot(dirty, &k, value, now);
            map.insert(k, slot);
        }
        out
    }
}

/// Times out keys idle for `timeout` (batch time): the function sees them once more with `None`.
fn expire<K: Key, V, S, U>(
    part: &mut StatePart<K, S>,
    now: i64,
    timeout: i64,
    f: &StateFn<K, V, S, U>,
    out: &mut Vec<U>,
) {
    let StatePart { map, removed, timers, .. } = part;
    while timers.front().is_some_and(|(deadline, _)| *deadline <= now) {
        let Some((_, k)) = timers.pop_front() else { break };
        // A key refreshed after this timer was set has a later timer; skip the stale one.
        if map.get(&k).is_none_or(|slot| slot.seen_ms() + timeout > now) {
            continue;
        }
        let Some(mut slot) = map.remove(&k) else { continue };
        let mut st = State::new(Some(&mut slot.value), true);
        out.push(f(&k, None, &mut st));
        StatePart::<K, S>::removed(removed, k);
    }
}

struct MapWithStateOp<K, S> {
    inner: KeyedOp<K, S>,
    timeout_ms: Option<i64>,
    initial: Option<InitialState<K, S>>,
    /// The initial state not loaded yet: taken by the first batch, or dropped by a restore.
    pending: std::sync::Mutex<Option<Vec<(K, S)>>>,
}

impl<K: Key + StateData, S: StateData> MapWithStateOp<K, S> {
    /// Loads the spec's initial state on the first batch of a job that did not restore state.
    fn seed_initial(&self, now: i64) {
        let Some(initial) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let n = self.inner.state.parallelism();
        for (k, s) in initial {
            let i = partition_of(&k, n);
            let mut part = self.inner.state.part(i);
            if let Some(t) = self.timeout_ms {
                part.timers.push_back((now + t, k.clone()));
            }
            part.put(k, s, now);
        }
    }
}

impl<K: Key + StateData, S: StateData> StatefulOp for MapWithStateOp<K, S> {
    fn describe(&self) -> OperatorDescription {
        self.inner.describe()
    }
    fn snapshot(&self, full: bool) -> Result<Vec<TableData>> {
        self.inner.snapshot(full)
    }
    fn restore(&self, tables: &[&TableData]) -> Result<()> {
        // Restored state replaces the initial state.
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.inner.restore(tables)?;
        if let Some(t) = self.timeout_ms {
            for i in 0..self.inner.state.parallelism() {
                let mut part = self.inner.state.part(i);
                let mut timers: Vec<(i64, K)> =
                    part.map.iter().map(|(k, s)| (s.seen_ms() + t, k.clone())).collect();
                timers.sort_by_key(|(d, _)| *d);
                part.timers = timers.into();
            }
        }
        Ok(())
    }
    fn key_count(&self) -> usize {
        self.inner.key_count()
    }
    fn migrations(&self) -> &[Migration] {
        &self.inner.migrations
    }
    fn reset(&self) {
        self.inner.reset();
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = self.initial.as_ref().map(|f| f());
    }
}
