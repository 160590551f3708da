//! Every binary the workspace builds answers `--help` with exit code 0, and so does every
//! subcommand its help lists, at every depth (`flame`, `flame-head`, `flame-node`,
//! `pi-client` and the helpers without subcommands alike). Nothing here needs a cluster: a
//! help that wanted a head, a config file or a terminal would fail.
//!
//! The binaries are read from `cargo metadata`, so a new one is covered without editing
//! this file; one that `cargo build --workspace --bins` did not build fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::command::{bin_dir, run_command};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

/// How long one `--help` may take.
const HELP_TIMEOUT: Duration = Duration::from_secs(30);

/// Most subcommands walked, a bound on a help text that listed itself.
const COMMANDS_MAX: usize = 500;

/// The names of every `bin` target of the workspace's packages.
fn workspace_binaries() -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .output()
        .expect("cannot run `cargo metadata`");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The subcommands a clap help lists under `Commands:`, less `help` itself.
fn subcommands(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| l.trim() != "Commands:").skip(1);
    let mut names = Vec::new();
    for line in lines.by_ref() {
        // The list ends at the first line not indented (a blank line, `Options:`).
        if !line.starts_with("  ") {
            break;
        }
        // A name is indented by two spaces; a wrapped description by more.
        if line.starts_with("   ") {
            continue;
        }
        if let Some(name) = line.split_whitespace().next() {
            if name != "help" {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Runs `binary words... --help`, checks that it exits 0 and prints something, and returns
/// its output.
async fn help_of(path: &Path, words: &[String]) -> String {
    let mut command = Command::new(path);
    command.args(words).arg("--help");
    // No configuration of the machine's user may matter to a help text.
    command
        .env_remove("FLAME_HEAD")
        .env("HOME", "/nonexistent-flame-help-test");
    let out = run_command(command, HELP_TIMEOUT).await;
    assert!(
        out.success() && !out.stdout.trim().is_empty(),
        "--help must print to stdout and exit 0:\n{out}"
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn every_binary_and_subcommand_answers_help() {
    let dir = bin_dir();
    let binaries = workspace_binaries();
    for expected in [
        "flame",
        "flame-head",
        "flame-node",
        "flame-shim-check",
        "flame-mpi-agent",
    ] {
        assert!(
            binaries.iter().any(|b| b == expected),
            "cargo metadata lists no `{expected}`: {binaries:?}"
        );
    }
    let mut walked = 0;
    for name in &binaries {
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "`{name}` is not in {}: run `cargo build --workspace --bins` first",
            dir.display()
        );
        // Depth-first over the command tree, from the binary itself.
        let mut pending: Vec<Vec<String>> = vec![Vec::new()];
        while let Some(words) = pending.pop() {
            walked += 1;
            assert!(walked <= COMMANDS_MAX, "more than {COMMANDS_MAX} commands");
            let help = help_of(&path, &words).await;
            for sub in subcommands(&help) {
                let mut deeper = words.clone();
                deeper.push(sub);
                pending.push(deeper);
            }
        }
    }
    // flame alone has more than twenty commands; a walk that found few read no list.
    assert!(walked > 30, "only {walked} commands were walked");
}

#[test]
fn subcommands_are_read_from_a_clap_help() {
    let help = "Run things\n\nUsage: flame [OPTIONS] <COMMAND>\n\nCommands:\n  ping         Run pings\n  app          Register apps,\n               wrapped\n  help         Print this message\n\nOptions:\n  -h, --help  Print help\n";
    assert_eq!(subcommands(help), vec!["ping", "app"]);
    assert!(subcommands("usage: flame-shim-check -- COMMAND\n").is_empty());
}
