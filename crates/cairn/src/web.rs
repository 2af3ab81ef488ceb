//! The opt-in HTTP endpoint of a running job: Prometheus metrics at `/metrics`, a live web page
//! with the batch timeline at `/`, and the data behind it at `/api/progress`.

use crate::progress::{BatchProgress, CheckpointFailed, CheckpointWritten, StreamingListener};
use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::VecDeque;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Batches kept for the page's timeline.
const TIMELINE: usize = 600;
/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

#[derive(Default)]
struct Figures {
    app: String,
    batches: u64,
    replayed: u64,
    records: u64,
    processing: Histogram,
    checkpoint_write: Histogram,
    checkpoints_written: u64,
    checkpoint_failures: u64,
    checkpoint_bytes: u64,
    timeline: VecDeque<BatchProgress>,
    last_checkpoint: Option<CheckpointWritten>,
}

/// Collects what the endpoint serves; registered as a listener on the context.
#[derive(Clone, Default)]
pub(crate) struct Monitor(Arc<Mutex<Figures>>);

impl Monitor {
    pub fn new(app: &str) -> Self {
        let m = Self::default();
        m.lock().app = app.to_string();
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prometheus text exposition format.
    fn metrics(&self) -> String {
        let f = self.lock();
        let mut o = String::new();
        let app = &f.app;
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{app=\"{app}\"}} {v}");
        };
        counter("cairn_batches_total", "Batches completed (replays included).", f.batches);
        counter("cairn_replayed_batches_total", "Batches re-run after a restart.", f.replayed);
        counter("cairn_input_records_total", "Records read from sources.", f.records);
        counter("cairn_checkpoints_written_total", "State checkpoints stored.", f.checkpoints_written);
        counter(
            "cairn_checkpoint_failures_total",
            "State checkpoints that could not be stored.",
            f.checkpoint_failures,
        );
        counter(
            "cairn_checkpoint_written_bytes_total",
            "Bytes of state checkpoints stored.",
            f.checkpoint_bytes,
        );
        if let Some(p) = f.timeline.back() {
            let mut gauge = |name: &str, help: &str, v: f64| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{app=\"{app}\"}} {v}");
            };
            gauge("cairn_last_batch_id", "Id of the latest completed batch.", p.batch_id as f64);
            gauge(
                "cairn_scheduling_delay_seconds",
                "How late the latest batch started.",
                p.scheduling_delay_ms / 1e3,
            );
            gauge(
                "cairn_checkpoint_queue_depth",
                "Checkpoints waiting to be written.",
                p.checkpoint_queue_depth as f64,
            );
            gauge("cairn_input_rows_per_second", "Input rate of the latest batch.", p.input_rows_per_s);
            let _ = writeln!(
                o,
                "# HELP cairn_state_keys Live keys per stateful operator.\n# TYPE cairn_state_keys gauge"
            );
            for op in &p.operators {
                let _ = writeln!(o, "cairn_state_keys{{app=\"{app}\",operator=\"{}\"}} {}", op.name, op.keys);
            }
        }
        f.processing.render(
            &mut o,
            "cairn_batch_processing_seconds",
            "Time to run a batch's operators and sinks.",
        );
        f.checkpoint_write.render(
            &mut o,
            "cairn_checkpoint_write_seconds",
            "Time to store a state checkpoint.",
        );
        o
    }
}

impl StreamingListener for Monitor {
    fn on_batch_completed(&self, p: &BatchProgress) {
        let mut f = self.lock();
        f.batches += 1;
        f.replayed += u64::from(p.replayed);
        f.records += p.records;
        f.processing.observe(p.processing_ms / 1e3);
        if f.timeline.len() == TIMELINE {
            f.timeline.pop_front();
        }
        f.timeline.push_back(p.clone());
    }
    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        let mut f = self.lock();
        f.checkpoints_written += 1;
        f.checkpoint_bytes += e.bytes;
        f.checkpoint_write.observe(e.write_ms / 1e3);
        f.last_checkpoint = Some(e.clone());
    }
    fn on_checkpoint_failed(&self, _e: &CheckpointFailed) {
        self.lock().checkpoint_failures += 1;
    }
}

async fn metrics(State(m): State<Monitor>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], m.metrics())
}

async fn progress(State(m): State<Monitor>) -> impl IntoResponse {
    let f = m.lock();
    Json(serde_json::json!({
        "app": f.app,
        "batches": f.timeline,
        "last_checkpoint": f.last_checkpoint,
        "checkpoints_written": f.checkpoints_written,
    }))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("web/index.html"))
}

/// The running endpoint; dropping it stops the server.
pub(crate) struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` and serves the monitor from a thread of its own.
pub(crate) fn serve(addr: &str, monitor: Monitor) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("cairn-http".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("cannot start the HTTP endpoint: {e}");
                return;
            }
        };
        rt.block_on(async move {
            let app = Router::new()
                .route("/", get(page))
                .route("/metrics", get(metrics))
                .route("/api/progress", get(progress))
                .with_state(monitor);
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    let shutdown = async {
                        let _ = rx.await;
                    };
                    if let Err(e) = axum::serve(l, app).with_graceful_shutdown(shutdown).await {
                        tracing::error!("HTTP endpoint failed: {e}");
                    }
                }
                Err(e) => tracing::error!("cannot serve HTTP: {e}"),
            }
        });
    })?;
    Ok(Server { addr: local, stop: Some(tx), thread: Some(thread) })
}
