//! The `flame-head` binary's command line: bad settings are refused with a readable error.
//!
//! (These tests also make `cargo test --workspace` build the `flame-head` binary, which the
//! end-to-end tests in `tests/` start.)

use std::process::Command;

fn head() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flame-head"))
}

#[test]
fn version_prints() {
    let out = head().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("flame-head"));
}

#[test]
fn unknown_key_in_config_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("head.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ncolour = \"blue\"\n").unwrap();
    let out = head()
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("colour"), "{err}");
    assert!(err.contains("head.toml"), "{err}");
}

#[test]
fn zero_input_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = head()
        .args(["--listen", "127.0.0.1:0", "--task-input-bytes-max", "0"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("task_input_bytes_max"), "{err}");
}

#[test]
fn data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = head()
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not-a-dir"), "{err}");
}
