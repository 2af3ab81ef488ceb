//! HTTP ingest: a receiver fed by `POST` requests, answering only once their records are in the
//! write-ahead log (see `StreamingContext::receiver_stream`).

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use cairn::source::{Durable, NotDurable, ReceiverHandle, Refused};
use cairn::{DStream, RecoveryFinished, RestartScheduled, StreamingContext, StreamingListener};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How an HTTP ingest endpoint behaves. The defaults suit most jobs.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Largest request body taken; a larger one is answered 413 and stored nowhere. Default 8 MiB.
    pub max_body_bytes: usize,
    /// Records that may wait for the next batch; beyond that requests are answered 429 with
    /// `Retry-After`. Default 100 000.
    pub max_pending: usize,
    /// How long a request waits for its records to reach the log before it is answered 503 with
    /// `Retry-After` (its records may still be logged: retry with the same idempotency key).
    /// Default 30 s.
    pub ack_timeout: Duration,
    /// How long an idempotency key is remembered (across restarts: the log blocks holding keys
    /// are kept that long). Default 1 hour.
    pub key_window: Duration,
    /// How many idempotency keys are remembered at most (the oldest are forgotten first).
    /// Default 1 000 000.
    pub max_keys: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 << 20,
            max_pending: 100_000,
            ack_timeout: Duration::from_secs(30),
            key_window: Duration::from_secs(3600),
            max_keys: 1_000_000,
        }
    }
}

/// Where a request's idempotency key stands.
enum KeyState {
    /// Its records were taken; `Durable` says when they are in the log.
    Pending(Arc<Durable>),
    /// Its records are in the log.
    Logged,
}

/// The idempotency keys remembered, with when each was first seen, bounded in time and count.
struct Keys {
    map: HashMap<String, KeyState>,
    order: VecDeque<(String, Instant)>,
    window: Duration,
    max: usize,
}

impl Keys {
    fn prune(&mut self) {
        while let Some((k, at)) = self.order.front() {
            if self.order.len() <= self.max && at.elapsed() <= self.window {
                break;
            }
            self.map.remove(k);
            self.order.pop_front();
        }
    }

    fn insert(&mut self, key: String, state: KeyState) {
        if self.map.insert(key.clone(), state).is_none() {
            self.order.push_back((key, Instant::now()));
        }
        self.prune();
    }
}

struct Shared {
    name: String,
    handle: ReceiverHandle,
    cfg: IngestConfig,
    keys: Mutex<Keys>,
    /// Recovery finished and no restart is pending: records can be logged soon.
    ready: AtomicBool,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
}

/// Follows the job's recoveries and restarts, so that requests are answered 503 while it
/// recovers instead of waiting.
struct Readiness(Arc<Shared>);

impl StreamingListener for Readiness {
    fn on_recovery_finished(&self, _e: &RecoveryFinished) {
        self.0.ready.store(true, Ordering::SeqCst);
    }
    fn on_restart_scheduled(&self, _e: &RestartScheduled) {
        self.0.ready.store(false, Ordering::SeqCst);
    }
}

/// A running HTTP ingest endpoint; dropping it stops the server.
pub struct Ingest {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ingest {
    /// The address bound (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Records accepted (logged and acknowledged), requests answered as duplicates of an
    /// idempotency key already logged, and requests refused (malformed, oversize, buffer full,
    /// recovering, timed out).
    pub fn counts(&self) -> (u64, u64, u64) {
        let s = &self.shared;
        (
            s.accepted.load(Ordering::Relaxed),
            s.duplicates.load(Ordering::Relaxed),
            s.rejected.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// HTTP ingest on a [`StreamingContext`].
pub trait HttpIngest {
    /// A stream of the records `POST`ed to `http://<addr>/ingest` (also `/`), each answered 200
    /// only once its records are durable in the job's write-ahead log; see [`IngestConfig`] for
    /// the limits and `docs/receivers.md` for the protocol. Call it before the job starts.
    ///
    /// ```
    /// use cairn_web::HttpIngest;
    /// let dir = tempfile::tempdir().unwrap();
    /// let ctx = cairn::StreamingContext::builder().checkpoint(dir.path().to_str().unwrap()).build().unwrap();
    /// let (ingest, events) = ctx.http_ingest_stream("events", "127.0.0.1:0").unwrap();
    /// events.count().print(1);
    /// println!("POST records to http://{}/ingest", ingest.addr());
    /// ```
    fn http_ingest_stream(&self, name: &str, addr: &str) -> Result<(Ingest, DStream<String>), crate::Error> {
        self.http_ingest_stream_with(name, addr, IngestConfig::default())
    }

    /// [`http_ingest_stream`](Self::http_ingest_stream) with limits of your own.
    fn http_ingest_stream_with(
        &self,
        name: &str,
        addr: &str,
        cfg: IngestConfig,
    ) -> Result<(Ingest, DStream<String>), crate::Error>;
}

impl HttpIngest for StreamingContext {
    fn http_ingest_stream_with(
        &self,
        name: &str,
        addr: &str,
        cfg: IngestConfig,
    ) -> Result<(Ingest, DStream<String>), crate::Error> {
        if self.is_started() {
            return Err(crate::Error::AlreadyStarted);
        }
        let (handle, stream) = self.receiver_stream(name, cfg.max_pending).map_err(crate::Error::Job)?;
        handle.keep_keys_for(cfg.key_window);
        // Keys of requests logged before a restart are still recognised.
        let mut keys =
            Keys { map: HashMap::new(), order: VecDeque::new(), window: cfg.key_window, max: cfg.max_keys };
        let logged =
            handle.logged_keys(cfg.key_window).map_err(|e| crate::Error::Job(cairn::Error::User(e)))?;
        for k in logged {
            keys.insert(k, KeyState::Logged);
        }
        let shared = Arc::new(Shared {
            name: name.to_string(),
            handle,
            cfg: cfg.clone(),
            keys: Mutex::new(keys),
            ready: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        self.add_listener(Arc::new(Readiness(shared.clone())));
        let app = Router::new()
            .route("/ingest", post(ingest))
            .route("/", post(ingest))
            .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
            .with_state(shared.clone());
        let (addr, stop, thread) = crate::spawn_server(addr, app, "cairn-ingest")?;
        tracing::info!("receiver {name}: accepting POST http://{addr}/ingest");
        Ok((Ingest { addr, shared, stop: Some(stop), thread: Some(thread) }, stream))
    }
}

fn answer(status: StatusCode, retry_after: Option<u64>, body: serde_json::Value) -> Response {
    let mut r = (status, Json(body)).into_response();
    if let Some(s) = retry_after {
        r.headers_mut().insert("retry-after", s.into());
    }
    r
}

fn refuse(s: &Shared, status: StatusCode, retry_after: Option<u64>, why: String) -> Response {
    s.rejected.fetch_add(1, Ordering::Relaxed);
    answer(status, retry_after, serde_json::json!({ "error": why }))
}

/// The records of a request body: a JSON array's elements (`application/json`), JSON lines
/// (`application/x-ndjson`), or lines of text (anything else). Empty lines are skipped.
fn parse(content_type: &str, body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    let records: Vec<Vec<u8>> = if content_type.starts_with("application/json") {
        let items: Vec<serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("the body is not a JSON array: {e}"))?;
        items.iter().map(|v| v.to_string().into_bytes()).collect()
    } else {
        let ndjson = content_type.starts_with("application/x-ndjson");
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            if ndjson {
                serde_json::from_str::<serde_json::Value>(line)
                    .map_err(|e| format!("line {} is not JSON: {e}", i + 1))?;
            }
            out.push(line.as_bytes().to_vec());
        }
        out
    };
    if records.is_empty() {
        return Err("the body holds no records".into());
    }
    Ok(records)
}

async fn wait_logged(durable: Arc<Durable>, timeout: Duration) -> Result<(), NotDurable> {
    tokio::task::spawn_blocking(move || durable.wait(timeout)).await.unwrap_or(Err(NotDurable::Stopped))
}

async fn ingest(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if s.handle.is_stopped() {
        return refuse(&s, StatusCode::SERVICE_UNAVAILABLE, Some(5), "the job stopped".into());
    }
    if !s.ready.load(Ordering::SeqCst) {
        return refuse(&s, StatusCode::SERVICE_UNAVAILABLE, Some(1), "the job is recovering".into());
    }
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("text/plain");
    let records = match parse(content_type, &body) {
        Ok(r) => r,
        Err(why) => return refuse(&s, StatusCode::BAD_REQUEST, None, why),
    };
    let n = records.len();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    let pushed = {
        // Looked up and taken under one lock, so concurrent retries of one key push once.
        let mut keys = s.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.prune();
        match key.as_ref().and_then(|k| keys.map.get(k)) {
            Some(KeyState::Logged) => {
                s.duplicates.fetch_add(1, Ordering::Relaxed);
                return answer(StatusCode::OK, None, serde_json::json!({ "accepted": 0, "duplicate": true }));
            }
            Some(KeyState::Pending(d)) => Ok((d.clone(), true)),
            None => {
                let pushed = match &key {
                    Some(k) => s.handle.push_keyed(records, k.clone()),
                    None => s.handle.push(records),
                };
                pushed.map(|d| {
                    let d = Arc::new(d);
                    if let Some(k) = &key {
                        keys.insert(k.clone(), KeyState::Pending(d.clone()));
                    }
                    (d, false)
                })
            }
        }
    };
    let (durable, duplicate) = match pushed {
        Ok(p) => p,
        // Full buffer or over the rate bound: the client should slow down and retry.
        Err(e @ (Refused::Full(_) | Refused::RateLimited(_))) => {
            return refuse(&s, StatusCode::TOO_MANY_REQUESTS, Some(1), format!("receiver {}: {e}", s.name))
        }
        Err(e) => return refuse(&s, StatusCode::SERVICE_UNAVAILABLE, Some(5), e.to_string()),
    };
    match wait_logged(durable, s.cfg.ack_timeout).await {
        Ok(()) => {
            if let Some(k) = &key {
                s.keys.lock().unwrap_or_else(|e| e.into_inner()).map.insert(k.clone(), KeyState::Logged);
            }
            if duplicate {
                s.duplicates.fetch_add(1, Ordering::Relaxed);
                answer(StatusCode::OK, None, serde_json::json!({ "accepted": 0, "duplicate": true }))
            } else {
                s.accepted.fetch_add(n as u64, Ordering::Relaxed);
                answer(StatusCode::OK, None, serde_json::json!({ "accepted": n }))
            }
        }
        Err(e) => refuse(
            &s,
            StatusCode::SERVICE_UNAVAILABLE,
            Some(1),
            format!("{e}; retry with the same Idempotency-Key"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_by_content_type() {
        assert_eq!(parse("text/plain", b"a\n\nb\r\n").unwrap(), [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(
            parse("application/json", br#"[1, {"x": "y"}]"#).unwrap(),
            [b"1".to_vec(), br#"{"x":"y"}"#.to_vec()]
        );
        assert_eq!(parse("application/x-ndjson", b"{\"a\":1}\n2\n").unwrap().len(), 2);
        assert!(parse("application/x-ndjson", b"{\"a\":1}\nnope\n").unwrap_err().contains("line 2"));
        assert!(parse("application/json", b"{\"a\":1}").unwrap_err().contains("not a JSON array"));
        assert!(parse("text/plain", b"\xff").unwrap_err().contains("UTF-8"));
        assert!(parse("text/plain", b"\n\n").unwrap_err().contains("no records"));
    }

    #[test]
    fn keys_are_forgotten_past_their_count() {
        let mut k =
            Keys { map: HashMap::new(), order: VecDeque::new(), window: Duration::from_secs(60), max: 2 };
        for key in ["a", "b", "c"] {
            k.insert(key.into(), KeyState::Logged);
        }
        assert!(!k.map.contains_key("a") && k.map.contains_key("b") && k.map.contains_key("c"));
    }
}
