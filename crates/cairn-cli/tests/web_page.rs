//! The live web page of a running demo, rendered by headless Chromium: every chart must draw
//! points from the job's data, and the tables show its batches and checkpoints. Needs Debian's
//! `chromium` (scripts/test.sh installs it); the test fails, naming the missing browser, rather
//! than passing without it. (The page of a Kafka job after a kill and restart, with lag, is
//! checked in cairn-connectors' `web_page` test.)

use cairn_sim::tools::{element_data, headless_chromium, screenshot, table_rows};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn charts_render_with_data_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "--interval-ms", "100", "--rate", "5000", "--http", "127.0.0.1:0"])
        .arg("--checkpoint")
        .arg(dir.path().join("ckpt"))
        .arg("--output")
        .arg(dir.path().join("out"))
        .env("CAIRN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("web page: ").map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        })
        .expect("the demo prints where the page is");
    // Let a few batches happen.
    let mut seen = 0;
    for l in lines.by_ref().map_while(Result::ok) {
        if l.starts_with("batch ") {
            seen += 1;
            if seen == 5 {
                break;
            }
        }
    }
    std::thread::spawn(move || lines.for_each(drop)); // keep the pipe drained

    let profile = dir.path().join("chromium-profile");
    let dom = headless_chromium(&profile, "1280,900")
        .args(["--virtual-time-budget=5000", "--dump-dom", &url])
        .output()
        .expect("run chromium");
    let html = String::from_utf8_lossy(&dom.stdout);
    for chart in ["rate", "delays", "ckpt", "ckptbytes", "state", "statebytes", "lagchart"] {
        let n: usize = element_data(&html, chart, "points")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("chart {chart} was not drawn"));
        assert!(n >= 3, "chart {chart} drew {n} points");
    }
    let batches = table_rows(&html, "batches").into_iter().filter(|r| r.contains_key("batch")).count();
    assert!(batches >= 3, "the batch table lists the batches: {batches}");
    let kinds: Vec<String> =
        table_rows(&html, "history").into_iter().filter_map(|r| r.get("kind").cloned()).collect();
    // The history keeps the latest 20 checkpoints: the first (a full snapshot) may have left it
    // by the time the page renders, but then a compacted full snapshot is among them.
    assert!(
        kinds.iter().any(|k| k == "full" || k == "full (compacted)"),
        "the history shows full snapshots as well as deltas: {kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "delta"), "the history shows deltas: {kinds:?}");
    assert!(html.contains("id=\"plantable\""), "the newest batch's plan is shown");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cairn-web-page.png");
    screenshot(&profile, "1280,900", &url, &shot, 5000);
    demo.kill().ok();
    demo.wait().ok();
}
