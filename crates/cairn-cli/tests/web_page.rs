//! The live web page of a running demo, rendered by headless Chromium: every chart must draw
//! points from the job's data. Needs Debian's `chromium` (scripts/test.sh installs it); the test
//! fails, naming the missing browser, rather than passing without it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn chromium() -> String {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(c).exists() {
            return c.to_string();
        }
    }
    panic!("headless Chromium is required for this test: run scripts/install-test-tools.sh (apt-get install chromium)");
}

fn headless(profile: &std::path::Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
    ])
    .args(["--disable-sync", "--no-first-run", "--disable-quic", "--window-size=1280,900"])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

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
    let dom = headless(&profile)
        .args(["--virtual-time-budget=5000", "--dump-dom", &url])
        .output()
        .expect("run chromium");
    let html = String::from_utf8_lossy(&dom.stdout);
    for chart in ["rate", "processing", "delay", "ckpt", "ckptbytes"] {
        let tag_at = html.find(&format!("<canvas id=\"{chart}\"")).expect("chart present");
        let tag = &html[tag_at..tag_at + html[tag_at..].find('>').unwrap()];
        let n: usize = tag
            .split("data-points=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("chart {chart} was not drawn: {tag}"));
        assert!(n >= 3, "chart {chart} drew {n} points");
    }
    assert!(html.contains("latest checkpoint"), "the latest checkpoint's summary is shown");

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cairn-web-page.png");
    let out = headless(&profile)
        .args(["--virtual-time-budget=5000", &format!("--screenshot={}", shot.display()), &url])
        .output()
        .expect("run chromium");
    assert!(shot.exists() && std::fs::metadata(&shot).unwrap().len() > 10_000, "screenshot: {out:?}");
    eprintln!("screenshot saved to {}", shot.display());
    demo.kill().ok();
    demo.wait().ok();
}
