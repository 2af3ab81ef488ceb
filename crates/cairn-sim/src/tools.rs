//! What the test servers share: where the one-time installs live, a free loopback port, and
//! waiting for a server to listen.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `$CAIRN_TEST_TOOLS`, else `~/.cache/cairn-test-tools` (filled by scripts/install-test-tools.sh).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("CAIRN_TEST_TOOLS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/cairn-test-tools")
    })
}

/// An installed tool's path; panics with the install instruction when it is missing.
pub fn installed(relative: &str, what: &str) -> PathBuf {
    let bin = tools_dir().join(relative);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-test-tools.sh (installs {what})",
        bin.display()
    );
    bin
}

/// A port nothing listens on right now, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// Waits until something accepts connections on the port.
pub fn wait_listening(port: u16, what: &str) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "{what} did not start listening within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The body of `GET path` from 127.0.0.1:`port` (HTTP/1.0; None while nothing answers).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// Headless Chromium with a throwaway profile under `profile`, quiet and offline (no sync,
/// updates or background requests), for the web page's browser tests. Panics, naming the
/// install script, when Debian's `chromium` is missing: those tests fail rather than pass
/// without a browser.
pub fn headless_chromium(profile: &std::path::Path, window: &str) -> std::process::Command {
    let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|c| std::path::Path::new(c).exists())
        .unwrap_or_else(|| {
            panic!(
                "headless Chromium is required: run scripts/install-test-tools.sh (apt-get install chromium)"
            )
        });
    let mut c = std::process::Command::new(bin);
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        .arg(format!("--window-size={window}"))
        .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Saves a screenshot of the page at `url` to `shot` with headless Chromium (window `window`,
/// `budget_ms` of virtual time for the page to load and draw), and checks that it holds a picture.
pub fn screenshot(
    profile: &std::path::Path,
    window: &str,
    url: &str,
    shot: &std::path::Path,
    budget_ms: u32,
) {
    let out = headless_chromium(profile, window)
        .args([format!("--virtual-time-budget={budget_ms}"), format!("--screenshot={}", shot.display())])
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(shot.exists() && std::fs::metadata(shot).unwrap().len() > 10_000, "screenshot: {out:?}");
    eprintln!("screenshot saved to {}", shot.display());
}

/// The value of attribute `data-<attr>` on the element with id `id` in an HTML document (as
/// Chromium's `--dump-dom` prints it): `None` when the element or the attribute is missing.
pub fn element_data(html: &str, id: &str, attr: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let tag = &html[at..at + html[at..].find('>')?];
    Some(tag.split(&format!("data-{attr}=\"")).nth(1)?.split('"').next()?.to_string())
}

/// The `<tr>` rows of the table with id `table` in an HTML document (as Chromium's
/// `--dump-dom` prints it), each as its `data-*` attributes (without the prefix).
pub fn table_rows(html: &str, table: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    let Some(at) = html.find(&format!("id=\"{table}\"")) else { return Vec::new() };
    let body = &html[at..];
    let body = &body[..body.find("</table>").unwrap_or(body.len())];
    body.split("<tr")
        .skip(1)
        .map(|tr| {
            let tag = &tr[..tr.find('>').unwrap_or(tr.len())];
            tag.split(" data-")
                .skip(1)
                .filter_map(|a| {
                    let (k, rest) = a.split_once("=\"")?;
                    Some((k.to_string(), rest.split('"').next()?.to_string()))
                })
                .collect()
        })
        .collect()
}

/// xorshift64*: a seeded, dependency-free sequence for tests and generated benchmark input.
pub struct Rng(pub u64);

impl Rng {
    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
