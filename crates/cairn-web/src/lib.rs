#![warn(missing_docs, unreachable_pub)]
//! The HTTP endpoint of a cairn job, kept out of the core crate so that jobs which do not want
//! it build without axum or an HTTP server: Prometheus metrics at `/metrics`, a live web page
//! with the batch timeline at `/`, and the data behind it at `/api/progress`.
//!
//! ```
//! let ctx = cairn::StreamingContext::builder()
//!     .app_name("clicks")
//!     .trigger(cairn::Trigger::AvailableNow)
//!     .stop_after_batches(2)
//!     .build()
//!     .unwrap();
//! ctx.generator("g", 1, 10, |_, o| o).unwrap().foreach_batch(|_, _| Ok(()));
//! // Before start, so the metrics see every event; port 0 picks a free port.
//! let endpoint = cairn_web::serve(&ctx, "127.0.0.1:0").unwrap();
//! println!("metrics at http://{}/metrics", endpoint.addr());
//! ctx.run().unwrap();
//! assert!(endpoint.metrics().encode().contains("cairn_batches_total{app=\"clicks\"} 2"));
//! drop(endpoint); // stops the server
//! ```

mod ingest;
mod metrics;

pub use ingest::{HttpIngest, Ingest, IngestConfig};
pub use metrics::{Metrics, CONTENT_TYPE};

use axum::extract::State;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use cairn::StreamingContext;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why the endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job was started before `serve`: its metrics would silently miss what came before.
    #[error("the job was already started; serve its metrics and page before calling start()")]
    AlreadyStarted,
    /// The address could not be bound (in use, not local, malformed).
    #[error("cannot serve metrics and the web page on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The server's runtime or thread could not be created.
    #[error("cannot start the HTTP endpoint: {0}")]
    Start(#[source] std::io::Error),
    /// The job refused what was asked of it (a receiver without a checkpoint location, in a
    /// scaled-out job, ...).
    #[error(transparent)]
    Job(cairn::Error),
}

async fn metrics(State(m): State<Metrics>) -> impl IntoResponse {
    ([("content-type", CONTENT_TYPE)], m.encode())
}

async fn progress(State(m): State<Metrics>) -> impl IntoResponse {
    Json(m.progress_json())
}

async fn page() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

/// The page's charting library (uPlot, MIT), vendored so that the page needs no network.
async fn uplot_js() -> impl IntoResponse {
    ([("content-type", "text/javascript; charset=utf-8")], include_str!("vendor/uplot/uPlot.iife.min.js"))
}

async fn uplot_css() -> impl IntoResponse {
    ([("content-type", "text/css; charset=utf-8")], include_str!("vendor/uplot/uPlot.min.css"))
}

/// A running endpoint. It serves for as long as it lives; dropping it stops the server and
/// waits for its thread.
pub struct Endpoint {
    addr: SocketAddr,
    metrics: Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Endpoint {
    /// The address actually bound (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The job's metrics, as served at `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds `addr` (e.g. `127.0.0.1:8080`; port 0 picks a free port) and serves `ctx`'s metrics
/// and live page from a thread of its own, registering a [`Metrics`] listener on `ctx`. Call it
/// before the job starts. The endpoint has no authentication: bind it to a loopback or internal
/// address.
pub fn serve(ctx: &StreamingContext, addr: &str) -> Result<Endpoint, Error> {
    if ctx.is_started() {
        return Err(Error::AlreadyStarted);
    }
    let metrics = Metrics::for_context(ctx);
    let endpoint = serve_metrics(&metrics, addr)?;
    ctx.add_listener(Arc::new(metrics));
    Ok(endpoint)
}

/// Binds `addr` and serves `metrics` and their live page, like [`serve`], for metrics fed by
/// other means: a scaled-out process's ([`Metrics::for_process`], its tasks
/// [attached](Metrics::attach) as they start).
///
/// ```
/// let metrics = cairn_web::Metrics::for_process("clicks");
/// let endpoint = cairn_web::serve_metrics(&metrics, "127.0.0.1:0").unwrap();
/// assert!(endpoint.metrics().encode().contains("cairn_tasks{app=\"clicks\"} 0"));
/// ```
pub fn serve_metrics(metrics: &Metrics, addr: &str) -> Result<Endpoint, Error> {
    let app = Router::new()
        .route("/", get(page))
        .route("/assets/uplot.js", get(uplot_js))
        .route("/assets/uplot.css", get(uplot_css))
        .route("/metrics", get(self::metrics))
        .route("/api/progress", get(progress))
        .with_state(metrics.clone());
    let (local, stop, thread) = spawn_server(addr, app, "cairn-http")?;
    tracing::info!("metrics at http://{local}/metrics, live page at http://{local}/");
    Ok(Endpoint { addr: local, metrics: metrics.clone(), stop: Some(stop), thread: Some(thread) })
}

type Server = (SocketAddr, tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>);

/// Binds `addr` and serves `app` from a thread of its own until the returned sender fires.
fn spawn_server(addr: &str, app: Router, thread_name: &str) -> Result<Server, Error> {
    let bind_err = |source| Error::Bind { addr: addr.to_string(), source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(Error::Start)?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            rt.block_on(async move {
                let shutdown = async {
                    let _ = rx.await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                    tracing::error!("HTTP endpoint failed: {e}");
                }
            });
        })
        .map_err(Error::Start)?;
    Ok((local, tx, thread))
}
