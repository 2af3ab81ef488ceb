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
