//! The HTTP endpoint of running jobs: `/metrics` must be a valid text exposition (checked by
//! the parser below, not by matching lines) holding the job's own figures, with the metrics that
//! only move on events present at zero from the start.

use cairn::{CheckpointWritten, RunSummary, StreamingContext, StreamingListener, Trigger};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A small parser of the OpenMetrics / Prometheus text exposition format that rejects what a
/// scraper would reject.
mod exposition {
    use std::collections::BTreeMap;

    /// Label name to value.
    pub type Labels = BTreeMap<String, String>;

    /// One `# TYPE` family and its samples.
    #[derive(Debug, Default)]
    pub struct Family {
        pub kind: String,
        pub help: Option<String>,
        pub unit: Option<String>,
        /// (sample name, labels, value)
        pub samples: Vec<(String, Labels, f64)>,
    }

    fn valid_name(n: &str) -> bool {
        let mut c = n.chars();
        matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    }

    fn valid_label_name(n: &str) -> bool {
        !n.contains(':') && valid_name(n)
    }

    /// `{a="x",b="y"}` after a sample name; returns the labels and the rest of the line.
    fn labels(s: &str) -> Result<(Labels, &str), String> {
        let mut out = Labels::new();
        let Some(mut rest) = s.strip_prefix('{') else { return Ok((out, s)) };
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                return Ok((out, r));
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let name = &rest[..eq];
            if !valid_label_name(name) {
                return Err(format!("bad label name {name:?}"));
            }
            rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            if out.insert(name.to_string(), value).is_some() {
                return Err(format!("label {name} twice"));
            }
            rest = &rest[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }

    fn number(v: &str) -> Result<f64, String> {
        match v {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => v.parse().map_err(|_| format!("bad number {v:?}")),
        }
    }

    /// The family a sample belongs to, from its name and the suffixes its type allows.
    fn family_of<'a>(families: &BTreeMap<String, Family>, sample: &'a str) -> Option<&'a str> {
        if families.get(sample).is_some_and(|f| f.kind == "gauge") {
            return Some(sample);
        }
        for (suffix, kinds) in [
            ("_total", &["counter"][..]),
            ("_created", &["counter", "histogram"][..]),
            ("_bucket", &["histogram"][..]),
            ("_sum", &["histogram"][..]),
            ("_count", &["histogram"][..]),
        ] {
            if let Some(base) = sample.strip_suffix(suffix) {
                if families.get(base).is_some_and(|f| kinds.contains(&f.kind.as_str())) {
                    return Some(base);
                }
            }
        }
        None
    }

    /// Parses a whole exposition, checking metadata, sample names, labels, values, the
    /// terminating `# EOF`, and the histograms' buckets.
    pub fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut eof = false;
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if eof {
                return Err(at("content after # EOF".into()));
            }
            if line == "# EOF" {
                eof = true;
                continue;
            }
            if let Some(meta) = line.strip_prefix("# ") {
                let mut parts = meta.splitn(3, ' ');
                let (kw, name, rest) = (parts.next(), parts.next(), parts.next());
                let name = name.filter(|n| valid_name(n)).ok_or_else(|| at("bad metadata".into()))?;
                let rest = rest.ok_or_else(|| at("metadata without a value".into()))?;
                let f = families.entry(name.to_string()).or_default();
                match kw {
                    Some("TYPE") => {
                        if !f.kind.is_empty() {
                            return Err(at("TYPE twice".into()));
                        }
                        if !["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"]
                            .contains(&rest)
                        {
                            return Err(at("unknown type".into()));
                        }
                        f.kind = rest.to_string();
                    }
                    Some("HELP") => f.help = Some(rest.to_string()),
                    Some("UNIT") => {
                        if !name.ends_with(&format!("_{rest}")) {
                            return Err(at("a family with a unit must end with it".into()));
                        }
                        f.unit = Some(rest.to_string());
                    }
                    _ => return Err(at("unknown metadata".into())),
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !valid_name(name) {
                return Err(at("bad metric name".into()));
            }
            let (labels, rest) = labels(&line[name_end..]).map_err(at)?;
            let mut fields = rest.split_whitespace();
            let value = number(fields.next().ok_or_else(|| at("no value".into()))?).map_err(at)?;
            if let Some(ts) = fields.next() {
                number(ts).map_err(at)?;
            }
            if fields.next().is_some() {
                return Err(at("trailing fields".into()));
            }
            let family =
                family_of(&families, name).ok_or_else(|| at("sample of no declared family".into()))?;
            if !seen.insert((name.to_string(), labels.clone())) {
                return Err(at("duplicate sample".into()));
            }
            let f = families.get_mut(family).expect("found above");
            if f.kind == "counter" && (value.is_nan() || value < 0.0) {
                return Err(at("negative counter".into()));
            }
            f.samples.push((name.to_string(), labels, value));
        }
        if !eof {
            return Err("no # EOF at the end".into());
        }
        for (name, f) in &families {
            if f.kind.is_empty() {
                return Err(format!("{name}: metadata without TYPE"));
            }
            if f.kind == "histogram" {
                check_histogram(name, f)?;
            }
        }
        Ok(families)
    }

    /// Buckets ascend by `le`, counts never decrease, and `+Inf` equals `_count`.
    fn check_histogram(name: &str, f: &Family) -> Result<(), String> {
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts: BTreeMap<Labels, f64> = BTreeMap::new();
        for (sample, labels, value) in &f.samples {
            if sample.ends_with("_bucket") {
                let mut rest = labels.clone();
                let le = rest.remove("le").ok_or_else(|| format!("{name}: bucket without le"))?;
                series.entry(rest).or_default().push((number(&le)?, *value));
            } else if sample.ends_with("_count") {
                counts.insert(labels.clone(), *value);
            }
        }
        if series.is_empty() {
            return Err(format!("{name}: histogram without buckets"));
        }
        for (labels, buckets) in &series {
            for w in buckets.windows(2) {
                if !(w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
                    return Err(format!("{name}{labels:?}: buckets out of order or not cumulative"));
                }
            }
            let last = buckets.last().expect("not empty");
            if last.0 != f64::INFINITY || counts.get(labels) != Some(&last.1) {
                return Err(format!("{name}{labels:?}: the +Inf bucket must equal _count"));
            }
        }
        Ok(())
    }
}

use exposition::Family;

/// The value of sample `name` whose labels include `labels`; fails if there is not exactly one.
fn value(families: &BTreeMap<String, Family>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = families
        .values()
        .flat_map(|f| &f.samples)
        .filter(|(n, l, _)| {
            n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

/// Status line, headers and body of a GET.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    (head.to_ascii_lowercase(), body.to_string())
}

fn scrape(addr: SocketAddr) -> BTreeMap<String, Family> {
    let (head, body) = get(addr, "/metrics");
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    exposition::parse(&body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{body}"))
}

/// Sums what the checkpoint events report, to compare with the metrics.
#[derive(Default)]
struct Written {
    count: AtomicU64,
    bytes: AtomicU64,
    /// Batches whose checkpoint waited for the writer (a loaded machine makes some).
    deferred: AtomicU64,
}

impl StreamingListener for Written {
    fn on_checkpoint_written(&self, e: &CheckpointWritten) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(e.bytes, Ordering::SeqCst);
    }

    fn on_batch_completed(&self, p: &cairn::BatchProgress) {
        if p.checkpoint_deferred {
            self.deferred.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn job(app: &str, dir: &std::path::Path, batches: u64, rate: u64, keys: u64) -> StreamingContext {
    let ctx = StreamingContext::builder()
        .app_name(app)
        .checkpoint(dir.to_str().unwrap())
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(batches)
        .parallelism(2)
        .build()
        .unwrap();
    // `rate` records per batch, spread over two partitions.
    let s = ctx.generator("g", 2, rate, move |_, o| (o % keys, 1u64)).unwrap();
    s.update_state_by_key("counts", |_, v: Vec<u64>, o: Option<u64>| Some(o.unwrap_or(0) + v.len() as u64))
        .foreach_batch(|_, _| Ok(()));
    ctx
}

/// Metrics that only move on events; each must be exposed at 0 before its first event.
const EVENT_ONLY: [&str; 8] = [
    "cairn_replayed_batches_total",
    "cairn_checkpoint_failures_total",
    "cairn_checkpoint_write_retries_total",
    "cairn_checkpoint_deferrals_total",
    "cairn_recovery_warnings_total",
    "cairn_lease_lost_total",
    "cairn_checkpoints_written_total",
    "cairn_checkpoint_written_bytes_total",
];

#[test]
fn metrics_are_a_valid_exposition_with_the_jobs_figures() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = job("metrics-test", dir.path(), 4, 50, 7);
    let written = Arc::new(Written::default());
    ctx.add_listener(written.clone());
    let endpoint = cairn_web::serve(&ctx, "127.0.0.1:0").unwrap();
    let addr = endpoint.addr();
    let app = [("app", "metrics-test")];

    // Before the first batch every metric is there; event-only ones and counters at 0.
    let before = scrape(addr);
    for name in EVENT_ONLY.iter().chain(&["cairn_batches_total", "cairn_input_records_total"]) {
        assert_eq!(value(&before, name, &app), 0.0, "{name}");
    }
    assert_eq!(value(&before, "cairn_state_keys", &[("operator", "counts")]), 0.0);
    assert_eq!(value(&before, "cairn_batch_processing_seconds_count", &app), 0.0);
    assert_eq!(before["cairn_batch_processing_seconds"].unit.as_deref(), Some("seconds"));

    let summary: RunSummary = ctx.run().unwrap();
    assert_eq!(summary.new_batches, 4);
    let m = scrape(addr);
    for f in m.values() {
        assert!(f.help.is_some(), "{f:?} has help");
        for (name, labels, _) in &f.samples {
            assert_eq!(labels.get("app").map(String::as_str), Some("metrics-test"), "{name}");
        }
    }
    assert_eq!(m["cairn_batches"].kind, "counter");
    assert_eq!(m["cairn_state_keys"].kind, "gauge");
    assert_eq!(m["cairn_checkpoint_write_seconds"].kind, "histogram");
    assert_eq!(value(&m, "cairn_batches_total", &app), 4.0);
    assert_eq!(value(&m, "cairn_input_records_total", &app), 4.0 * 50.0);
    assert_eq!(value(&m, "cairn_last_batch_id", &app), 3.0);
    assert_eq!(value(&m, "cairn_state_keys", &[("operator", "counts")]), 7.0);
    assert!(value(&m, "cairn_state_checkpoint_bytes", &[("operator", "counts")]) > 0.0);
    assert_eq!(value(&m, "cairn_batch_processing_seconds_count", &app), 4.0);
    let n = written.count.load(Ordering::SeqCst) as f64;
    assert!(n >= 4.0, "a checkpoint per batch");
    assert_eq!(value(&m, "cairn_checkpoints_written_total", &app), n);
    assert_eq!(value(&m, "cairn_checkpoint_write_seconds_count", &app), n);
    assert_eq!(
        value(&m, "cairn_checkpoint_written_bytes_total", &app),
        written.bytes.load(Ordering::SeqCst) as f64
    );
    assert!(value(&m, "cairn_processed_rows_per_second", &app) > 0.0);
    // Nothing happened that moves these; a deferral happens when the machine is slow, and is
    // counted as the batches reported it.
    for name in EVENT_ONLY[..6].iter().filter(|n| **n != "cairn_checkpoint_deferrals_total") {
        assert_eq!(value(&m, name, &app), 0.0, "{name}");
    }
    let deferred = written.deferred.load(Ordering::SeqCst) as f64;
    assert_eq!(value(&m, "cairn_checkpoint_deferrals_total", &app), deferred);

    let (_, p) = get(addr, "/api/progress");
    let p: serde_json::Value = serde_json::from_str(&p).unwrap();
    assert_eq!(p["app"], "metrics-test");
    assert_eq!(p["batches"].as_array().unwrap().len(), 4);
    assert_eq!(p["checkpoints_written"], n as u64);
    let (head, page) = get(addr, "/");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(page.contains("<div id=\"rate\">"));
    // The charting library is served by the endpoint itself (the page needs no network).
    let (head, js) = get(addr, "/assets/uplot.js");
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(js.contains("uPlot") && js.len() > 40_000, "{} bytes", js.len());
    let (head, _) = get(addr, "/assets/uplot.css");
    assert!(head.contains("content-type: text/css"), "{head}");

    drop(endpoint);
    assert!(std::net::TcpStream::connect(addr).is_err(), "nothing listens once the endpoint is dropped");
}

#[test]
fn recovery_past_a_damaged_checkpoint_moves_the_recovery_metrics() {
    let dir = tempfile::tempdir().unwrap();
    job("recovering", dir.path(), 4, 20, 5).run().unwrap();
    // Damage the newest checkpoint (names sort by batch): recovery falls back past it and
    // replays the batches after the older one.
    let mut state: Vec<_> =
        std::fs::read_dir(dir.path().join("state")).unwrap().map(|e| e.unwrap().path()).collect();
    state.sort();
    let newest = state.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    for b in bytes.iter_mut().skip(8) {
        *b = !*b;
    }
    std::fs::write(newest, bytes).unwrap();

    let ctx = job("recovering", dir.path(), 6, 20, 5);
    let endpoint = cairn_web::serve(&ctx, "127.0.0.1:0").unwrap();
    let summary = ctx.run().unwrap();
    assert!(!summary.recovery_warnings.is_empty(), "the damage was noticed");
    assert!(summary.replayed_batches > 0);
    let m = scrape(endpoint.addr());
    let app = [("app", "recovering")];
    assert_eq!(value(&m, "cairn_recovery_warnings_total", &app), summary.recovery_warnings.len() as f64);
    assert_eq!(value(&m, "cairn_replayed_batches_total", &app), summary.replayed_batches as f64);
    assert_eq!(
        value(&m, "cairn_batches_total", &app),
        (summary.replayed_batches + summary.new_batches) as f64
    );
}

#[test]
fn two_jobs_in_one_process_keep_separate_figures() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = job("job-a", d1.path(), 3, 10, 4);
    let b = job("job-b", d2.path(), 5, 30, 9);
    let ea = cairn_web::serve(&a, "127.0.0.1:0").unwrap();
    let eb = cairn_web::serve(&b, "127.0.0.1:0").unwrap();
    a.start().unwrap();
    b.start().unwrap();
    a.await_termination().unwrap();
    b.await_termination().unwrap();
    for (addr, app, batches, rate, keys) in
        [(ea.addr(), "job-a", 3.0, 10.0, 4.0), (eb.addr(), "job-b", 5.0, 30.0, 9.0)]
    {
        let m = scrape(addr);
        let apps: std::collections::BTreeSet<&str> = m
            .values()
            .flat_map(|f| &f.samples)
            .filter_map(|(_, l, _)| l.get("app").map(String::as_str))
            .collect();
        assert_eq!(apps.into_iter().collect::<Vec<_>>(), [app], "only its own series");
        let l = [("app", app)];
        assert_eq!(value(&m, "cairn_batches_total", &l), batches);
        assert_eq!(value(&m, "cairn_input_records_total", &l), batches * rate);
        assert_eq!(value(&m, "cairn_state_keys", &[("operator", "counts")]), keys);
        assert_eq!(value(&m, "cairn_batch_processing_seconds_count", &l), batches);
    }
}

#[test]
fn serving_a_started_job_or_a_taken_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = job("late", dir.path(), 1, 1, 1);
    let first = cairn_web::serve(&ctx, "127.0.0.1:0").unwrap();
    let taken = first.addr().to_string();
    let other_dir = tempfile::tempdir().unwrap();
    let other = job("other", other_dir.path(), 1, 1, 1);
    match cairn_web::serve(&other, &taken) {
        Err(cairn_web::Error::Bind { addr, .. }) => assert_eq!(addr, taken),
        r => panic!("expected a bind error, got {:?}", r.map(|e| e.addr())),
    }
    ctx.run().unwrap();
    assert!(matches!(cairn_web::serve(&ctx, "127.0.0.1:0"), Err(cairn_web::Error::AlreadyStarted)));
}

#[test]
fn the_parser_rejects_what_a_scraper_would() {
    let ok = "# TYPE a counter\n# HELP a A.\na_total{app=\"x\"} 1\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n# EOF\n";
    exposition::parse(ok).unwrap();
    for bad in [
        ok.replace("# EOF\n", ""),                                  // not terminated
        ok.replace("a_total", "b_total"),                           // sample of no declared family
        ok.replace("a_total{app=\"x\"} 1", "a_total -1"),           // negative counter
        ok.replace("{app=\"x\"}", "{app=x}"),                       // unquoted label value
        ok.replace("h_count 2", "h_count 3"),                       // +Inf bucket differs from _count
        ok.replace("h_bucket{le=\"1\"} 1", "h_bucket{le=\"1\"} 5"), // not cumulative
        ok.replace("# TYPE a counter", "# TYPE a countr"),          // unknown type
        format!("{ok}a_total 2\n"),                                 // after # EOF
    ] {
        assert!(exposition::parse(&bad).is_err(), "accepted:\n{bad}");
    }
}

#[test]
fn a_receivers_figures_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = StreamingContext::builder()
        .app_name("recv")
        .checkpoint(dir.path().to_str().unwrap())
        .trigger(Trigger::AvailableNow)
        .build()
        .unwrap();
    let (input, events) = ctx.receiver_stream("events", 100).unwrap();
    events.foreach_batch(|_, _| Ok(()));
    let endpoint = cairn_web::serve(&ctx, "127.0.0.1:0").unwrap();
    input.set_max_rate(Some(500.0));
    let _ = input.push((0..50).map(|i| i.to_string().into_bytes()).collect()).unwrap();
    assert!(input.push((0..60).map(|i| i.to_string().into_bytes()).collect()).is_err(), "over the buffer");
    ctx.run_available().unwrap();
    let (_, text) = get(endpoint.addr(), "/metrics");
    let m = exposition::parse(&text).unwrap();
    let labels = [("app", "recv"), ("receiver", "events")];
    assert_eq!(value(&m, "cairn_receiver_records_total", &labels), 50.0);
    assert_eq!(value(&m, "cairn_receiver_refused_total", &labels), 1.0);
    assert_eq!(value(&m, "cairn_receiver_rate_limit", &labels), 500.0);
}
