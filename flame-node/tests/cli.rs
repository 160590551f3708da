//! The `flame-node` binary's command line: bad settings are refused with a readable error.
//!
//! (These tests also make `cargo test --workspace` build the `flame-node` binary, which the
//! end-to-end tests in `tests/` start.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use std::process::Command;

fn node() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flame-node"))
}

#[test]
fn head_and_ca_file_are_required() {
    let out = node()
        .env_remove("FLAME_HEAD")
        .env_remove("FLAME_CA_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--head"), "{err}");
}

#[test]
fn missing_ca_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = node()
        .args(["--head", "127.0.0.1:9", "--ca-file", "/nonexistent/ca.pem"])
        .arg("--work-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn zero_cpus_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = node()
        .args([
            "--head",
            "127.0.0.1:9",
            "--ca-file",
            "/dev/null",
            "--cpus",
            "0",
        ])
        .arg("--work-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cpus"), "{err}");
}
