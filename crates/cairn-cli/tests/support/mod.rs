//! Running the `cairn` binary from the CLI's tests.
#![allow(dead_code)] // each test file uses its own part

use std::process::{Command, Output};

/// Runs `cairn ARGS` with quiet logs.
pub fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env("CAIRN_LOG", "error")
        .output()
        .expect("run cairn")
}

/// Standard output then standard error, for messages.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Standard output as one JSON document.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}
