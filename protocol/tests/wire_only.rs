//! `flame-shims` links the wire format alone: no QUIC, TLS or certificate crate.
//!
//! An application built on the shims (a Rust `Service`) needs only the shim codec, the
//! frame and the limits; the endpoint and the PKI sit behind `flame-protocol`'s `net`
//! feature (see the crate doc). A new dependency of a wire-only module, a default feature
//! turned on, or `net` enabled by `flame-shims` would quietly bring the whole TLS stack
//! back into every application. This test asks cargo for the normal dependency tree of
//! `flame-shims` and fails naming any networking crate in it.
//!
//! It needs cargo at run time. Outside CI a test binary run without cargo skips with a
//! message; under `CI=true` that is a failure, so the check cannot silently stop running.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that only the networking half (`endpoint`, `pki`) may bring in.
const NETWORKING: &[&str] = &[
    "quinn",
    "quinn-proto",
    "quinn-udp",
    "rustls",
    "rustls-webpki",
    "rcgen",
    "ring",
    "x509-parser",
    "aws-lc-rs",
    "aws-lc-sys",
];

/// The cargo running this test (set at run time by `cargo test`), or the one that built it.
fn cargo() -> Option<PathBuf> {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO").map(PathBuf::from))
}

/// Whether this is a CI run, where skipping the check is not allowed.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Skips outside CI, fails in it.
fn cannot_check(why: &str) {
    assert!(
        !in_ci(),
        "cannot check flame-shims' dependencies: {why} (CI is set, so this fails)"
    );
    eprintln!("skipped: cannot check flame-shims' dependencies: {why}");
}

#[test]
fn shims_link_no_networking_crate() {
    let Some(cargo) = cargo() else {
        cannot_check("CARGO is not set");
        return;
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let output = Command::new(&cargo)
        .args(["tree", "-p", "flame-shims"])
        .args(["-e", "normal", "--prefix", "none"])
        .arg("--manifest-path")
        .arg(&manifest)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(e) => {
            cannot_check(&format!("cannot run {}: {e}", cargo.display()));
            return;
        }
    };
    assert!(
        output.status.success(),
        "`cargo tree -p flame-shims` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    // `--prefix none`: one crate a line, "name vX.Y.Z [(path)] [(*)]".
    let crates: BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    // Guards against a changed output format reading as "nothing found".
    assert!(
        crates.contains("flame-shims") && crates.contains("flame-protocol"),
        "`cargo tree -p flame-shims` output does not list flame-shims and flame-protocol:\n{tree}"
    );
    let found: Vec<&str> = NETWORKING
        .iter()
        .copied()
        .filter(|name| crates.contains(name))
        .collect();
    assert!(
        found.is_empty(),
        "flame-shims links networking crates {found:?}; they belong behind flame-protocol's \
         `net` feature. `cargo tree -p flame-shims -e normal,features -i {}` shows the path.",
        found.first().copied().unwrap_or_default()
    );
}
