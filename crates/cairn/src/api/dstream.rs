//! `DStream<T>`: a stream of batches, and its element-wise and whole-batch operators (output
//! operations are in `output`, keyed and stateful ones in `ops`).

use crate::error::{Error, Result};
use crate::graph::{BatchCtx, BatchInfo, Data, Graph, Node, Output, Partitions, Shared, UserError};
use rayon::prelude::*;
use std::marker::PhantomData;
use std::sync::Arc;

/// A discretized stream: a sequence of batches of `T`, each split into partitions.
///
/// Transformations build new streams lazily; output operations (`foreach_batch`, `print`,
/// `save_as_text_files`) make the job compute them once per batch.
///
/// ```
/// use cairn::StreamingContext;
/// use std::sync::{Arc, Mutex};
/// let ctx = StreamingContext::builder().app_name("doc").build().unwrap();
/// let (queue, words) = ctx.queue_stream::<String>("words").unwrap();
/// queue.push(vec!["a".into(), "bb".into(), "ccc".into()]);
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let s = seen.clone();
/// words.map(|w| w.len()).filter(|n| *n > 1).foreach_batch(move |_, lens| {
///     s.lock().unwrap().extend(lens);
///     Ok(())
/// });
/// ctx.run_available().unwrap();
/// assert_eq!(*seen.lock().unwrap(), vec![2, 3]);
/// ```
pub struct DStream<T> {
    pub(crate) node: Arc<Shared<T>>,
    pub(crate) graph: Arc<Graph>,
    /// Whether every record is known to sit in the task of the Kafka partition its key maps to
    /// (a source's own records, or the user said so): stateful operators of a scaled-out job
    /// need that, since each task keeps the state of its own partition.
    pub(crate) aligned: bool,
}

impl<T> Clone for DStream<T> {
    fn clone(&self) -> Self {
        Self { node: self.node.clone(), graph: self.graph.clone(), aligned: self.aligned }
    }
}

/// A node defined by a function of the parent's whole batch.
struct FnNode<T, U, F> {
    parent: Arc<Shared<T>>,
    f: F,
    _types: PhantomData<fn(T) -> U>,
}

impl<T, U, F> Node<U> for FnNode<T, U, F>
where
    T: Data,
    U: Data,
    F: Fn(Partitions<T>, &BatchCtx<'_>) -> Result<Partitions<U>> + Send + Sync,
{
    fn compute(&self, ctx: &BatchCtx<'_>) -> Result<Partitions<U>> {
        (self.f)(self.parent.compute(ctx)?, ctx)
    }
}

struct UnionNode<T> {
    parents: Vec<Arc<Shared<T>>>,
}

impl<T: Data> Node<T> for UnionNode<T> {
    fn compute(&self, ctx: &BatchCtx<'_>) -> Result<Partitions<T>> {
        let mut out = Vec::new();
        for p in &self.parents {
            out.extend(p.compute(ctx)?);
        }
        Ok(out)
    }
}

impl<T: Data> DStream<T> {
    pub(crate) fn from_node(graph: Arc<Graph>, node: impl Node<T> + 'static) -> Self {
        Self { node: Shared::new(node), graph, aligned: false }
    }

    /// Declares that this stream is partitioned like its Kafka source: every record's key (the
    /// key the stateful operators downstream use) maps to the Kafka partition the record came
    /// from, typically because it *is* the record's Kafka key. In a scaled-out job each task
    /// keeps the state of its own partition, so a stateful operator is refused at start unless
    /// its input is a source's stream, a `filter` of one, or a stream declared so here. The
    /// engine cannot check the declaration (it cannot tell a key-preserving `map` from a
    /// re-keying one); a wrong one splits a key's state across tasks. In a job that runs as one
    /// process it changes nothing.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, words) = ctx.queue_stream::<String>("words").unwrap();
    /// let counts = words
    ///     .map(|w| (w, 1u64))
    ///     .partitioned_like_source()
    ///     .update_state_by_key("counts", |_, v: Vec<u64>, old: Option<u64>| Some(old.unwrap_or(0) + v.len() as u64));
    /// # let _ = counts;
    /// ```
    pub fn partitioned_like_source(&self) -> DStream<T> {
        Self { aligned: true, ..self.clone() }
    }

    /// A child stream computed from this stream's whole batch.
    pub(crate) fn derive<U: Data>(
        &self,
        f: impl Fn(Partitions<T>, &BatchCtx<'_>) -> Result<Partitions<U>> + Send + Sync + 'static,
    ) -> DStream<U> {
        self.node.add_consumer();
        DStream::from_node(self.graph.clone(), FnNode { parent: self.node.clone(), f, _types: PhantomData })
    }

    /// How many outputs the graph has so far (names unnamed sinks).
    pub(crate) fn output_count(&self) -> usize {
        self.graph.lock().outputs.len()
    }

    /// Registers an output pulling this stream.
    pub(crate) fn output(
        &self,
        run: impl Fn(Partitions<T>, &BatchCtx<'_>) -> Result<()> + Send + Sync + 'static,
    ) {
        struct Out<T, F> {
            node: Arc<Shared<T>>,
            run: F,
        }
        impl<T: Data, F: Fn(Partitions<T>, &BatchCtx<'_>) -> Result<()> + Send + Sync> Output for Out<T, F> {
            fn run(&self, ctx: &BatchCtx<'_>) -> Result<()> {
                (self.run)(self.node.compute(ctx)?, ctx)
            }
        }
        self.node.add_consumer();
        self.graph.add_output(Out { node: self.node.clone(), run });
    }

    /// Applies `f` to each partition, in parallel across partitions.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, s) = ctx.queue_stream::<i64>("in").unwrap();
    /// let sums = s.map_partitions(|part| vec![part.iter().sum::<i64>()]);
    /// # q.push(vec![1, 2, 3]);
    /// # let out = cairn::testing::collect(&sums);
    /// # ctx.run_available().unwrap();
    /// # assert_eq!(out.lock().unwrap().concat(), vec![6]);
    /// ```
    pub fn map_partitions<U: Data>(
        &self,
        f: impl Fn(Vec<T>) -> Vec<U> + Send + Sync + 'static,
    ) -> DStream<U> {
        self.derive(move |parts, _| Ok(parts.into_par_iter().map(&f).collect()))
    }

    /// Applies `f` to each element.
    pub fn map<U: Data>(&self, f: impl Fn(T) -> U + Send + Sync + 'static) -> DStream<U> {
        self.map_partitions(move |p| p.into_iter().map(&f).collect())
    }

    /// Applies `f` to each element; an error fails the batch (nothing of it is committed, and the
    /// job stops with the error, which names the batch). After a restart the batch replays with
    /// the same input, so fix the input or the function first. For input that may be malformed
    /// and should not stop the job, route failures to a second stream with `flat_map` instead.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// let ctx = StreamingContext::builder().build().unwrap();
    /// let (q, lines) = ctx.queue_stream::<String>("in").unwrap();
    /// let numbers = lines.try_map(|l| l.parse::<i64>().map_err(|e| format!("{l:?}: {e}").into()));
    /// let _out = cairn::testing::collect(&numbers);
    /// q.push(vec!["1".into(), "x".into()]);
    /// let err = ctx.run_available().unwrap_err().to_string();
    /// assert!(err.contains("batch 0") && err.contains("\"x\""), "{err}");
    /// ```
    pub fn try_map<U: Data>(
        &self,
        f: impl Fn(T) -> std::result::Result<U, UserError> + Send + Sync + 'static,
    ) -> DStream<U> {
        self.derive(move |parts, ctx| {
            parts
                .into_par_iter()
                .map(|p| p.into_iter().map(&f).collect::<std::result::Result<Vec<U>, UserError>>())
                .collect::<std::result::Result<Partitions<U>, UserError>>()
                .map_err(|e| Error::User(format!("batch {}: {e}", ctx.info.batch_id)))
        })
    }

    /// Keeps the elements for which `f` is true.
    pub fn filter(&self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> DStream<T> {
        let kept = self.map_partitions(move |mut p| {
            p.retain(&f);
            p
        });
        // Dropping records moves none to another task.
        DStream { aligned: self.aligned, ..kept }
    }

    /// Maps each element to any number of elements.
    ///
    /// ```
    /// # use cairn::StreamingContext;
    /// # let ctx = StreamingContext::builder().build().unwrap();
    /// # let (q, lines) = ctx.queue_stream::<String>("in").unwrap();
    /// let words = lines.flat_map(|l| l.split(' ').map(str::to_string).collect::<Vec<_>>());
    /// # q.push(vec!["a b".into(), "c".into()]);
    /// # let out = cairn::testing::collect(&words);
    /// # ctx.run_available().unwrap();
    /// # assert_eq!(out.lock().unwrap().concat(), vec!["a", "b", "c"]);
    /// ```
    pub fn flat_map<U: Data, I: IntoIterator<Item = U>>(
        &self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> DStream<U> {
        self.map_partitions(move |p| p.into_iter().flat_map(&f).collect())
    }

    /// The elements of this stream and of `other`, batch by batch.
    pub fn union(&self, other: &DStream<T>) -> DStream<T> {
        self.node.add_consumer();
        other.node.add_consumer();
        let union = DStream::from_node(
            self.graph.clone(),
            UnionNode { parents: vec![self.node.clone(), other.node.clone()] },
        );
        DStream { aligned: self.aligned && other.aligned, ..union }
    }

    /// Replaces each batch with `f(batch info, partitions)`: arbitrary batch-level logic.
    pub fn transform<U: Data>(
        &self,
        f: impl Fn(&BatchInfo, Partitions<T>) -> Partitions<U> + Send + Sync + 'static,
    ) -> DStream<U> {
        self.derive(move |parts, ctx| Ok(f(&ctx.info, parts)))
    }

    /// Spreads each batch round-robin over `n` partitions (at least 1).
    pub fn repartition(&self, n: usize) -> DStream<T> {
        let n = n.max(1);
        self.derive(move |parts, _| {
            let total: usize = parts.iter().map(Vec::len).sum();
            let mut out: Partitions<T> = (0..n).map(|_| Vec::with_capacity(total / n + 1)).collect();
            for (i, x) in parts.into_iter().flatten().enumerate() {
                out[i % n].push(x);
            }
            Ok(out)
        })
    }

    /// The number of elements in each batch, as a single-element batch.
    pub fn count(&self) -> DStream<u64> {
        self.derive(|parts, _| Ok(vec![vec![parts.iter().map(|p| p.len() as u64).sum()]]))
    }

    /// Combines each batch's elements with `f` into at most one element (none for an empty batch).
    pub fn reduce(&self, f: impl Fn(T, T) -> T + Send + Sync + 'static) -> DStream<T> {
        self.derive(move |parts, _| {
            let partials: Vec<T> = parts.into_par_iter().filter_map(|p| p.into_iter().reduce(&f)).collect();
            Ok(vec![partials.into_iter().reduce(&f).into_iter().collect()])
        })
    }
}
