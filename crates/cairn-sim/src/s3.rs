//! A local S3-compatible server for tests: moto's server mode (from PyPI, installed once by
//! `scripts/install-test-tools.sh` under `~/.cache/cairn-test-tools`), started on 127.0.0.1 on a
//! free port and stopped when the handle is dropped. moto's conditional create (If-None-Match)
//! is atomic, which the checkpoint protocol relies on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

/// A running moto server.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    port: u16,
}

impl S3Server {
    /// Starts a server; panics with instructions if moto is not installed.
    pub fn start() -> Self {
        // moto's own conditional writes are check-then-put on a threaded server, so two racing
        // creates can both win; the launcher next to this crate serialises writes (see it).
        let python = crate::tools::installed("moto-venv/bin/python3", "moto from PyPI");
        let launcher = concat!(env!("CARGO_MANIFEST_DIR"), "/moto_server.py");
        let port = crate::tools::free_port();
        let child = Command::new(python)
            .arg(launcher)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let server = Self { child, endpoint: format!("http://127.0.0.1:{port}"), port };
        crate::tools::wait_listening(port, "moto_server");
        server
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The AWS_* variables that point object_store at this server with static test credentials
    /// (so nothing ever falls back to a cloud metadata endpoint).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "cairn-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "cairn-test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Sets [`Self::env`] in this process (every S3 test sets the same values).
    pub fn set_env(&self) {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.1 200"), "bucket {bucket} not created: {reply}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
