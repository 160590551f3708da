//! `flame bench` at a tiny scale: every case runs on its own local cluster (real
//! `flame-head`, `flame-node` and `flame-ping`), checks every result, and prints its lines in
//! the documented form. Nothing here is about speed: only that each figure is there, finite
//! and positive. The peers are played by a small shell script, never the real Ray or Dask.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::cluster::flame_command;
use flame_tests::{run_command, CmdOutput};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

/// Bound on one `flame bench` run: at `--scale 0.001` every case is a handful of tasks,
/// but each run starts a cluster of its own, and the `sessions` case still opens 100.
const BENCH_TIMEOUT: Duration = Duration::from_secs(300);

/// The lines every full run prints, one per measurement.
const ALL_LINES: &[&str] = &[
    "throughput",
    "throughput_ephemeral",
    "latency_durable",
    "latency_ephemeral",
    "fsync",
    "payload_1MiB",
    "payload_1MiB_ephemeral",
    "sessions",
    "queue_enqueue",
    "queue_drain",
    "cold_start",
    "object_put_1GiB",
    "object_get_1GiB",
    "broadcast_one_copy",
    "broadcast",
];

/// A parsed measurement line.
#[derive(Debug)]
struct Line {
    case: String,
    tasks: u64,
    has_percentiles: bool,
}

/// Parses `case=<name> tasks=<N> seconds=<s> tasks_per_s=<r> [p50_us= p99_us= p999_us=]
/// [mib_per_s=] [rss_head_kib= rss_node_kib=]` exactly: these fields, in this order, every figure finite
/// and positive; panics otherwise.
fn parse_line(line: &str) -> Line {
    let fields: Vec<(&str, &str)> = line
        .split(' ')
        .map(|f| {
            f.split_once('=')
                .unwrap_or_else(|| panic!("field {f:?} is not key=value in {line:?}"))
        })
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    let base = ["case", "tasks", "seconds", "tasks_per_s"];
    let percentiles = ["p50_us", "p99_us", "p999_us"];
    let rss = ["rss_head_kib", "rss_node_kib"];
    assert!(keys.starts_with(&base), "{line:?}");
    let mut rest = &keys[base.len()..];
    let has_percentiles = rest.starts_with(&percentiles);
    if has_percentiles {
        rest = &rest[percentiles.len()..];
    }
    if rest.first() == Some(&"mib_per_s") {
        rest = &rest[1..];
    }
    assert!(
        rest.is_empty() || rest == rss,
        "unexpected fields in {line:?}"
    );
    for (key, value) in &fields[1..] {
        let figure: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("{key}={value} is not a number in {line:?}"));
        assert!(
            figure.is_finite() && figure > 0.0,
            "{key}={value} is not finite and positive in {line:?}"
        );
    }
    let tasks: u64 = fields[1]
        .1
        .parse()
        .unwrap_or_else(|_| panic!("tasks is not a whole number in {line:?}"));
    Line {
        case: fields[0].1.to_string(),
        tasks,
        has_percentiles,
    }
}

/// The measurement lines of a run's stdout (those that start with `case=`).
fn measurements(out: &CmdOutput) -> Vec<Line> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("case="))
        .map(parse_line)
        .collect()
}

async fn bench(args: &[&str]) -> CmdOutput {
    let mut command = flame_command();
    command.arg("bench").args(args);
    run_command(command, BENCH_TIMEOUT).await
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Every case, a few tasks each: one line per measurement, in the exact form, with
/// percentiles on the latency lines only.
#[tokio::test(flavor = "multi_thread")]
async fn every_case_prints_a_checked_line() {
    let out = bench(&["--scale", "0.001"]).await;
    out.assert_success();
    let lines = measurements(&out);
    let names: Vec<&str> = lines.iter().map(|l| l.case.as_str()).collect();
    assert_eq!(names, ALL_LINES, "{out}");
    for line in &lines {
        assert!(line.tasks > 0, "{line:?}");
        assert_eq!(
            line.has_percentiles,
            line.case.starts_with("latency_") || line.case == "fsync",
            "{line:?}"
        );
    }
    // Scaled: 100,000 × 0.001 tasks; 100 sessions of one task; the payload's 200 × 0.001
    // rounds to 0 and is raised to 1.
    let tasks = |name: &str| lines.iter().find(|l| l.case == name).unwrap().tasks;
    assert_eq!(tasks("throughput"), 100, "{out}");
    assert_eq!(tasks("sessions"), 100, "{out}");
    assert_eq!(tasks("payload_1MiB"), 1, "{out}");
    assert_eq!(tasks("payload_1MiB_ephemeral"), 1, "{out}");
    assert_eq!(tasks("queue_drain"), 1_000, "{out}");
    // Nothing but measurements on stdout.
    assert_eq!(out.stdout.lines().count(), ALL_LINES.len(), "{out}");
}

/// `--repeat 2` prints both runs and a median; `--peers-script` runs a stand-in for the
/// peers' script twice (as many passes as runs), passes its result lines through, prints
/// the median of each peer figure, and compares the matching case with that median.
#[tokio::test(flavor = "multi_thread")]
async fn repeats_and_compares_with_a_stand_in_peer() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bench_peers.sh");
    // Pass 1 says 100 s to start, pass 2 says 300 s: their median is 200 s.
    let count = dir.path().join("passes");
    write_script(
        &script,
        &format!(
            "n=$(cat {count} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {count}\n\
             echo '# versions: stand-in'\n\
             echo \"peer=fake case=startup tasks=0 seconds=$((n * 200 - 100)).0 tasks_per_s=0.0\"\n\
             echo 'peer=fake case=throughput tasks=10000 seconds=1.0 tasks_per_s=10000.0'\n\
             echo 'peer=fake case=latency TIMEOUT after 90s'\n",
            count = count.display()
        ),
    );
    let out = bench(&[
        "--case",
        "cold_start",
        "--scale",
        "0.001",
        "--repeat",
        "2",
        "--peers",
        "--peers-script",
        script.to_str().unwrap(),
    ])
    .await;
    out.assert_success();
    let lines = measurements(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines.iter().all(|l| l.case == "cold_start"), "{out}");
    let median: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("stat=median "))
        .filter(|l| l.starts_with("case="))
        .collect();
    assert_eq!(median.len(), 1, "{out}");
    assert_eq!(parse_line(median[0]).case, "cold_start", "{out}");
    // Both passes' lines pass through, then the peer's medians.
    for seconds in ["100.0", "300.0"] {
        assert!(
            out.stdout.contains(&format!(
                "peer=fake case=startup tasks=0 seconds={seconds} tasks_per_s=0.0"
            )),
            "{out}"
        );
    }
    assert_eq!(std::fs::read_to_string(&count).unwrap().trim(), "2");
    assert!(
        out.stdout
            .lines()
            .any(|l| l == "stat=median peer=fake case=startup seconds=200 tasks=0 tasks_per_s=0"),
        "{out}"
    );
    let ratios: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("ratio "))
        .collect();
    // Only cold_start ran, so only the peer's startup is compared, with its median.
    assert_eq!(ratios.len(), 1, "{out}");
    assert!(
        ratios[0]
            .starts_with("ratio case=cold_start peer=fake peer_case=startup metric=seconds flame="),
        "{out}"
    );
    assert!(ratios[0].contains(" peer_value=200.0 "), "{out}");
}

/// `--output json`: one document with the runs and their medians.
#[tokio::test(flavor = "multi_thread")]
async fn json_output() {
    let out = bench(&[
        "--case",
        "cold_start",
        "--scale",
        "0.001",
        "--output",
        "json",
    ])
    .await;
    out.assert_success();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{out}"));
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{out}");
    assert_eq!(runs[0]["case"], "cold_start", "{out}");
    assert_eq!(runs[0]["tasks"], 1, "{out}");
    assert!(runs[0]["seconds"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(doc["medians"].as_array().unwrap().len(), 1, "{out}");
    assert!(doc.get("peers").is_none(), "{out}");
}

/// An explicit `--peers` without the script fails at once, before any case runs; without
/// `--peers`, a missing `--peers-script` is only a note.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_peers_script() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.sh");
    let missing = missing.to_str().unwrap();
    let out = bench(&["--peers", "--peers-script", missing]).await;
    out.assert_failure();
    assert!(out.stderr.contains("is not there"), "{out}");
    assert!(out.stderr.contains(missing), "{out}");
    assert!(!out.stdout.contains("case="), "{out}");

    let out = bench(&[
        "--case",
        "cold_start",
        "--scale",
        "0.001",
        "--peers-script",
        missing,
    ])
    .await;
    out.assert_success();
    assert!(out.stderr.contains("is not there"), "{out}");
    assert_eq!(measurements(&out).len(), 1, "{out}");
}
