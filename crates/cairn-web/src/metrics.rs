//! A job's Prometheus metrics: one `prometheus-client` registry per job, fed from the job's
//! progress events (one update per batch, per checkpoint write and per recovery, never per
//! record).

use cairn::{
    BatchProgress, CheckpointFailed, CheckpointWritten, LeaseLost, RecoveryFinished, RestartScheduled,
    StreamingContext, StreamingListener,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

/// The `Content-Type` of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus
/// scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Batches kept for the page's timeline.
const TIMELINE: usize = 600;
/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The label that tells stateful operators apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperatorLabels {
    operator: String,
}

/// The labels that tell source partitions apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    source: String,
    partition: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric of one job, each registered once in the job's own registry.
struct Families {
    batches: Counter,
    replayed_batches: Counter,
    input_records: Counter,
    checkpoints_written: Counter,
    checkpoint_failures: Counter,
    checkpoint_written_bytes: Counter,
    checkpoint_write_retries: Counter,
    checkpoint_deferrals: Counter,
    checkpoint_backpressure_seconds: Counter<f64, AtomicU64>,
    recovery_warnings: Counter,
    lease_lost: Counter,
    restarts: Counter,
    last_batch_id: Gauge,
    scheduling_delay_seconds: FloatGauge,
    checkpoint_queue_depth: Gauge,
    checkpoint_chain: Gauge,
    checkpoint_restore_estimate_seconds: FloatGauge,
    input_rows_per_second: FloatGauge,
    processed_rows_per_second: FloatGauge,
    state_keys: Family<OperatorLabels, Gauge>,
    source_lag_records: Family<PartitionLabels, Gauge>,
    state_checkpoint_bytes: Family<OperatorLabels, Gauge>,
    batch_processing_seconds: Histogram,
    checkpoint_write_seconds: Histogram,
}

impl Families {
    /// Creates every metric at zero and registers it in `r`.
    fn register(r: &mut Registry) -> Self {
        let f = Self {
            batches: Counter::default(),
            replayed_batches: Counter::default(),
            input_records: Counter::default(),
            checkpoints_written: Counter::default(),
            checkpoint_failures: Counter::default(),
            checkpoint_written_bytes: Counter::default(),
            checkpoint_write_retries: Counter::default(),
            checkpoint_deferrals: Counter::default(),
            checkpoint_backpressure_seconds: Counter::default(),
            recovery_warnings: Counter::default(),
            lease_lost: Counter::default(),
            restarts: Counter::default(),
            last_batch_id: Gauge::default(),
            scheduling_delay_seconds: FloatGauge::default(),
            checkpoint_queue_depth: Gauge::default(),
            checkpoint_chain: Gauge::default(),
            checkpoint_restore_estimate_seconds: FloatGauge::default(),
            input_rows_per_second: FloatGauge::default(),
            processed_rows_per_second: FloatGauge::default(),
            state_keys: Family::default(),
            source_lag_records: Family::default(),
            state_checkpoint_bytes: Family::default(),
            batch_processing_seconds: Histogram::new(BUCKETS),
            checkpoint_write_seconds: Histogram::new(BUCKETS),
        };
        r.register("batches", "Batches completed (replays included)", f.batches.clone());
        r.register("replayed_batches", "Batches re-run after a restart", f.replayed_batches.clone());
        r.register("input_records", "Records read from sources", f.input_records.clone());
        r.register("checkpoints_written", "State checkpoints stored", f.checkpoints_written.clone());
        r.register(
            "checkpoint_failures",
            "State checkpoints that could not be stored after every retry (the job stops)",
            f.checkpoint_failures.clone(),
        );
        r.register_with_unit(
            "checkpoint_written",
            "Bytes of state checkpoints stored",
            Unit::Bytes,
            f.checkpoint_written_bytes.clone(),
        );
        r.register(
            "checkpoint_write_retries",
            "Storage requests of checkpoint writes retried after a transient failure (the store's one retry budget)",
            f.checkpoint_write_retries.clone(),
        );
        r.register(
            "checkpoint_deferrals",
            "Due checkpoints put off because storage was still writing earlier ones",
            f.checkpoint_deferrals.clone(),
        );
        r.register_with_unit(
            "checkpoint_backpressure",
            "Time batches spent blocked waiting for room in the checkpoint queue",
            Unit::Seconds,
            f.checkpoint_backpressure_seconds.clone(),
        );
        r.register(
            "recovery_warnings",
            "Problems recovery worked around (a damaged checkpoint fallen back past, a torn last plan)",
            f.recovery_warnings.clone(),
        );
        r.register(
            "lease_lost",
            "Times another process took the checkpoint location over (the job stops)",
            f.lease_lost.clone(),
        );
        r.register(
            "restarts",
            "Restarts in place from the checkpoint after a transient failure (a dependency briefly down)",
            f.restarts.clone(),
        );
        r.register("last_batch_id", "Id of the latest completed batch", f.last_batch_id.clone());
        r.register_with_unit(
            "scheduling_delay",
            "How late the latest batch started",
            Unit::Seconds,
            f.scheduling_delay_seconds.clone(),
        );
        r.register(
            "checkpoint_queue_depth",
            "Checkpoints waiting to be written",
            f.checkpoint_queue_depth.clone(),
        );
        r.register(
            "checkpoint_chain",
            "Objects a restore of the newest checkpoint would read (its chain through a full snapshot)",
            f.checkpoint_chain.clone(),
        );
        r.register(
            "checkpoint_restore_estimate_seconds",
            "What a restore of the newest checkpoint would take now: its chain at the measured read latency and bandwidth",
            f.checkpoint_restore_estimate_seconds.clone(),
        );
        r.register(
            "input_rows_per_second",
            "Input rate of the latest batch (records per second since the previous batch started)",
            f.input_rows_per_second.clone(),
        );
        r.register(
            "processed_rows_per_second",
            "Records per second of processing time in the latest batch",
            f.processed_rows_per_second.clone(),
        );
        r.register("state_keys", "Live keys per stateful operator", f.state_keys.clone());
        r.register(
            "source_lag_records",
            "Records of a source partition left unread after the latest batch's plan (Kafka: end offset minus planned end)",
            f.source_lag_records.clone(),
        );
        r.register_with_unit(
            "state_checkpoint",
            "Uncompressed bytes of each stateful operator's state in the latest checkpoint cut",
            Unit::Bytes,
            f.state_checkpoint_bytes.clone(),
        );
        r.register_with_unit(
            "batch_processing",
            "Time to run a batch's operators and sinks",
            Unit::Seconds,
            f.batch_processing_seconds.clone(),
        );
        r.register_with_unit(
            "checkpoint_write",
            "Time to store a state checkpoint (retries included)",
            Unit::Seconds,
            f.checkpoint_write_seconds.clone(),
        );
        f
    }
}

/// What the live page shows besides the metrics.
#[derive(Default)]
struct Page {
    timeline: VecDeque<BatchProgress>,
    last_checkpoint: Option<CheckpointWritten>,
    last_restart: Option<RestartScheduled>,
}

struct Shared {
    app: String,
    registry: Registry,
    families: Families,
    page: Mutex<Page>,
}

/// One job's metrics and page data: a [`StreamingListener`] with its own Prometheus registry,
/// so several jobs in one process never mix their figures. Every series carries the label
/// `app` (the job's app name).
///
/// [`serve`](crate::serve) creates and registers one; to expose the figures through a server
/// of your own, create it with [`Metrics::for_context`], add it as a listener before the job
/// starts, and answer scrapes with [`Metrics::encode`].
///
/// ```
/// use std::sync::Arc;
/// let ctx = cairn::StreamingContext::builder().app_name("orders").build().unwrap();
/// let metrics = cairn_web::Metrics::for_context(&ctx);
/// ctx.add_listener(Arc::new(metrics.clone()));
/// assert!(metrics.encode().contains("cairn_batches_total{app=\"orders\"} 0"));
/// ```
#[derive(Clone)]
pub struct Metrics(Arc<Shared>);

impl Metrics {
    /// Metrics for a job named `app`, every one registered at zero.
    pub fn new(app: &str) -> Self {
        let labels = [("app".into(), app.to_string().into())];
        let mut registry = Registry::with_prefix_and_labels("cairn", labels.into_iter());
        let families = Families::register(&mut registry);
        Self(Arc::new(Shared { app: app.to_string(), registry, families, page: Mutex::default() }))
    }

    /// Metrics for `ctx`'s job: its app name, and `cairn_state_keys` and
    /// `cairn_state_checkpoint_bytes` at zero for each of its stateful operators.
    pub fn for_context(ctx: &StreamingContext) -> Self {
        let m = Self::new(ctx.app_name());
        for op in ctx
            .graph_description()
            .operators
            .iter()
            .filter(|o| o.kind != cairn::checkpoint::OperatorKind::Source)
        {
            let l = OperatorLabels { operator: op.name.clone() };
            // Creating the series is the point: it then shows 0 until the first batch.
            drop(m.f().state_keys.get_or_create(&l));
            drop(m.f().state_checkpoint_bytes.get_or_create(&l));
        }
        m
    }

    fn f(&self) -> &Families {
        &self.0.families
    }

    fn page(&self) -> MutexGuard<'_, Page> {
        self.0.page.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job's app name.
    pub fn app(&self) -> &str {
        &self.0.app
    }

    /// Every metric in the OpenMetrics text exposition format (see [`CONTENT_TYPE`]), ending
    /// with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric type.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.0.registry) {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }

    /// The data behind the live page: the app name, the latest batches' progress records (up
    /// to 600), the latest checkpoint written and the number written, and the restarts after
    /// transient failures (their number and the latest).
    pub fn progress_json(&self) -> serde_json::Value {
        let page = self.page();
        serde_json::json!({
            "app": self.0.app,
            "batches": page.timeline,
            "last_checkpoint": page.last_checkpoint,
            "checkpoints_written": self.f().checkpoints_written.get(),
            "restarts": self.f().restarts.get(),
            "last_restart": page.last_restart,
        })
    }
}

impl StreamingListener for Metrics {
    fn on_recovery_finished(&self, e: &RecoveryFinished) {
        self.f().recovery_warnings.inc_by(e.warnings.len() as u64);
    }

    fn on_batch_completed(&self, p: &BatchProgress) {
        let f = self.f();
        f.batches.inc();
        if p.replayed {
            f.replayed_batches.inc();
        }
        f.input_records.inc_by(p.records);
        f.batch_processing_seconds.observe(p.processing_ms / 1e3);
        if p.checkpoint_deferred {
            f.checkpoint_deferrals.inc();
        }
        f.checkpoint_backpressure_seconds.inc_by(p.checkpoint_wait_ms / 1e3);
        f.last_batch_id.set(i64::try_from(p.batch_id.0).unwrap_or(i64::MAX));
        f.scheduling_delay_seconds.set(p.scheduling_delay_ms / 1e3);
        f.checkpoint_queue_depth.set(i64::try_from(p.checkpoint_queue_depth).unwrap_or(i64::MAX));
        f.checkpoint_chain.set(i64::try_from(p.checkpoint_chain).unwrap_or(i64::MAX));
        if let Some(ms) = p.checkpoint_restore_estimate_ms {
            f.checkpoint_restore_estimate_seconds.set(ms / 1e3);
        }
        f.input_rows_per_second.set(p.input_rows_per_s);
        f.processed_rows_per_second.set(p.processed_rows_per_s);
        for lag in &p.source_lag {
            let l = PartitionLabels { source: lag.source.clone(), partition: lag.partition.clone() };
            f.source_lag_records.get_or_create(&l).set(i64::try_from(lag.records).unwrap_or(i64::MAX));
        }
        for op in &p.operators {
            let l = OperatorLabels { operator: op.name.clone() };
            f.state_keys.get_or_create(&l).set(i64::try_from(op.keys).unwrap_or(i64::MAX));
            f.state_checkpoint_bytes
                .get_or_create(&l)
                .set(i64::try_from(op.checkpoint_bytes).unwrap_or(i64::MAX));
        }
        let mut page = self.page();
        if page.timeline.len() == TIMELINE {
            page.timeline.pop_front();
        }
        page.timeline.push_back(p.clone());
    }

    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        let f = self.f();
        f.checkpoints_written.inc();
        f.checkpoint_written_bytes.inc_by(e.bytes);
        f.checkpoint_write_retries.inc_by(u64::from(e.retries));
        f.checkpoint_write_seconds.observe(e.write_ms / 1e3);
        self.page().last_checkpoint = Some(e.clone());
    }

    fn on_checkpoint_failed(&self, e: &CheckpointFailed) {
        let f = self.f();
        f.checkpoint_failures.inc();
        f.checkpoint_write_retries.inc_by(u64::from(e.retries));
    }

    fn on_lease_lost(&self, _e: &LeaseLost) {
        self.f().lease_lost.inc();
    }

    fn on_restart_scheduled(&self, e: &RestartScheduled) {
        self.f().restarts.inc();
        self.page().last_restart = Some(e.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn::OperatorProgress;

    fn batch(id: u64) -> BatchProgress {
        BatchProgress {
            batch_id: cairn::BatchId(id),
            batch_time_ms: 0,
            started_at_ms: 0,
            records: 10,
            input_rows_per_s: 100.0,
            processed_rows_per_s: 1000.0,
            processing_ms: 10.0,
            scheduling_delay_ms: 250.0,
            checkpoint_ms: 0.0,
            checkpoint_wait_ms: 0.0,
            checkpointed: false,
            checkpoint_deferred: false,
            checkpoint_bytes: 0,
            checkpoint_queue_depth: 2,
            last_checkpoint_write_ms: None,
            state_keys: 3,
            operators: vec![OperatorProgress { name: "op".into(), keys: 3, checkpoint_bytes: 40 }],
            replayed: false,
            restarts: 0,
            checkpoint_chain: 1,
            checkpoint_restore_estimate_ms: Some(30.0),
            source_lag: vec![cairn::SourceLag { source: "in".into(), partition: "in[0]".into(), records: 7 }],
            task: None,
            epoch: 1,
        }
    }

    #[test]
    fn each_event_moves_its_metrics_once() {
        let m = Metrics::new("unit");
        let f = m.f();
        m.on_batch_completed(&BatchProgress { checkpoint_deferred: true, ..batch(0) });
        m.on_batch_completed(&BatchProgress { checkpoint_wait_ms: 1500.0, replayed: true, ..batch(1) });
        m.on_checkpoint_written(&CheckpointWritten {
            batch_id: cairn::BatchId(1),
            bytes: 64,
            write_ms: 2.0,
            full: true,
            retries: 2,
        });
        m.on_checkpoint_failed(&CheckpointFailed {
            batch_id: cairn::BatchId(2),
            error: "disk".into(),
            retries: 3,
        });
        m.on_lease_lost(&LeaseLost { holder: "pid 7".into() });
        m.on_restart_scheduled(&RestartScheduled {
            restart: 1,
            attempt: 1,
            cause: "sink \"db\" failed in batch 2: connection refused".into(),
            wait_ms: 200,
            outage_ms: 1500,
            max_outage_ms: 60_000,
        });
        m.on_recovery_finished(&RecoveryFinished {
            restored_batch: Some(cairn::BatchId(0)),
            replay_batches: 1,
            next_batch: cairn::BatchId(1),
            warnings: vec!["a".into(), "b".into()],
        });
        assert_eq!(f.batches.get(), 2);
        assert_eq!(f.replayed_batches.get(), 1);
        assert_eq!(f.input_records.get(), 20);
        assert_eq!(f.checkpoint_deferrals.get(), 1);
        assert_eq!(f.checkpoint_backpressure_seconds.get(), 1.5);
        assert_eq!(f.checkpoints_written.get(), 1);
        assert_eq!(f.checkpoint_written_bytes.get(), 64);
        assert_eq!(f.checkpoint_write_retries.get(), 5);
        assert_eq!(f.checkpoint_failures.get(), 1);
        assert_eq!(f.lease_lost.get(), 1);
        assert_eq!(f.restarts.get(), 1);
        let page = m.progress_json();
        assert_eq!(page["restarts"], 1);
        assert!(page["last_restart"]["cause"].as_str().unwrap().contains("connection refused"));
        assert_eq!(f.recovery_warnings.get(), 2);
        assert_eq!(f.last_batch_id.get(), 1);
        assert_eq!(f.scheduling_delay_seconds.get(), 0.25);
        assert_eq!(f.checkpoint_queue_depth.get(), 2);
        assert_eq!(f.checkpoint_chain.get(), 1);
        assert_eq!(f.checkpoint_restore_estimate_seconds.get(), 0.03);
        let l = OperatorLabels { operator: "op".into() };
        assert_eq!(f.state_keys.get_or_create(&l).get(), 3);
        let lag = PartitionLabels { source: "in".into(), partition: "in[0]".into() };
        assert_eq!(f.source_lag_records.get_or_create(&lag).get(), 7);
        assert_eq!(f.state_checkpoint_bytes.get_or_create(&l).get(), 40);
        let text = m.encode();
        assert!(text.contains("cairn_checkpoint_backpressure_seconds_total{app=\"unit\"} 1.5"), "{text}");
        assert!(text.contains("cairn_batch_processing_seconds_count{app=\"unit\"} 2"), "{text}");
        assert!(text.contains("cairn_checkpoint_write_seconds_count{app=\"unit\"} 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
