//! The `flame` binary without a head: exit codes, and `error:`/`hint:` on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `flame` with an environment that names no head: no FLAME_* variables, and a home with
/// no configuration file.
fn flame(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flame"));
    cmd.env_remove("FLAME_HEAD")
        .env_remove("FLAME_CA_FILE")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"));
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fixture_ca() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.crt")
}

#[test]
fn usage_errors_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let out = flame(home.path()).arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = flame(home.path())
        .args(["ping", "-t", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn app_file_errors_name_the_file_and_the_field() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let cases = [
        (
            "empty.toml",
            "name = \"pi\"\ncommand = \"\"\n",
            "field `command`: must not be empty",
        ),
        ("missing.toml", "name = \"pi\"\n", "missing field `command`"),
        (
            "unknown.toml",
            "name = \"pi\"\ncommand = \"x\"\ncolor = 1\n",
            "unknown field `color`",
        ),
        (
            "delay.toml",
            "name = \"pi\"\ncommand = \"x\"\ndelay_release = \"later\"\n",
            "field `delay_release`",
        ),
    ];
    for (file, text, expected) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let out = flame(dir)
            .args(["app", "register"])
            .arg(&path)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("error: {}: ", path.display())),
            "{err}"
        );
        assert!(first.contains(expected), "{err}");
        // The cause is printed once, not repeated by the error chain.
        assert_eq!(first.matches(expected).count(), 1, "{err}");
    }
    let exact = flame(dir)
        .args(["app", "register"])
        .arg(dir.join("empty.toml"))
        .output()
        .unwrap();
    assert_eq!(
        stderr(&exact).trim_end(),
        format!(
            "error: {}: field `command`: must not be empty",
            dir.join("empty.toml").display()
        )
    );
}

#[test]
fn no_configured_head_is_an_error_with_a_hint() {
    let home = tempfile::tempdir().unwrap();
    let out = flame(home.path()).args(["node", "list"]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    // A machine-wide /etc/flame/flame.toml could name a head; only then is the message
    // about something else.
    if !Path::new(flame_client::config::SYSTEM_CONFIG_FILE).exists() {
        assert!(err.contains("no head address is configured"), "{err}");
        assert!(err.contains("FLAME_HEAD"), "{err}");
        assert!(err.contains("\nhint: `flame local`"), "{err}");
    }
}

#[test]
fn unreachable_head_names_the_address() {
    let home = tempfile::tempdir().unwrap();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = flame(home.path())
        .args(["--head", &addr, "--ca-file"])
        .arg(fixture_ca())
        .args(["session", "list"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("error: could not reach the head at {addr}")),
        "{err}"
    );
    assert!(err.contains("\nhint: "), "{err}");
}

#[test]
fn ping_refuses_inputs_too_small_to_be_unique() {
    let home = tempfile::tempdir().unwrap();
    let out = flame(home.path())
        .args(["ping", "-t", "1000", "--size", "2"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--size 2"), "{err}");
}
