//! The `flame-head` binary's command line: bad settings are refused with a readable error.
//!
//! (These tests also make `cargo test --workspace` build the `flame-head` binary, which the
//! end-to-end tests in `tests/` start.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

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

/// Runs the head on `data_dir` and expects it to refuse to start, saying `expected`.
fn refuses(data_dir: &std::path::Path, expected: &[&str]) {
    let out = head()
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the head started on a bad store");
    let err = String::from_utf8_lossy(&out.stderr);
    for e in expected {
        assert!(err.contains(e), "missing `{e}` in: {err}");
    }
}

#[test]
fn a_store_that_is_not_redb_is_refused_never_reset() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    let garbage: Vec<u8> = (0..100_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&state, &garbage).unwrap();
    refuses(
        dir.path(),
        &["state.redb", "hint: restore the data directory"],
    );
    // Nothing was reset: the file is as it was.
    assert_eq!(std::fs::read(&state).unwrap(), garbage);
}

#[test]
fn a_damaged_store_is_refused_never_reset() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    {
        let db = redb::Database::create(&state).unwrap();
        let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("sessions");
        let txn = db.begin_write().unwrap();
        txn.open_table(table)
            .unwrap()
            .insert(1, &[7u8; 64][..])
            .unwrap();
        txn.commit().unwrap();
    }
    let mut bytes = std::fs::read(&state).unwrap();
    for b in bytes.iter_mut().skip(512) {
        *b ^= 0xa5;
    }
    std::fs::write(&state, &bytes).unwrap();
    refuses(
        dir.path(),
        &["state.redb", "hint: restore the data directory"],
    );
    assert_eq!(std::fs::read(&state).unwrap(), bytes);
}

#[test]
fn a_store_with_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = redb::Database::create(dir.path().join("state.redb")).unwrap();
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let txn = db.begin_write().unwrap();
        txn.open_table(meta)
            .unwrap()
            .insert("schema_version", 99)
            .unwrap();
        txn.commit().unwrap();
    }
    refuses(dir.path(), &["schema version 99", "refusing to start"]);
}

#[test]
fn an_uninitialised_data_directory_is_refused_and_init_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("head");
    refuses(&data, &["holds no cluster CA", "init"]);
    let init = head()
        .arg("--data-dir")
        .arg(&data)
        .arg("init")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let printed = String::from_utf8_lossy(&init.stdout);
    assert!(printed.contains("CA fingerprint: sha256:"), "{printed}");
    assert!(data.join("tls/ca.crt").is_file() && data.join("admin.token").is_file());
    // The token file is the admin's alone, and nothing printed holds its secret.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "admin.token is mode {mode:o}");
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let secret = token.trim().split('.').nth(2).unwrap();
    assert!(!printed.contains(secret), "{printed}");
    let again = head()
        .arg("--data-dir")
        .arg(&data)
        .arg("init")
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already initialised"), "{err}");
}
