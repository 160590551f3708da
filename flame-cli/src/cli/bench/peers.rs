//! `flame bench --peers`: running the peers' benchmark script, reading its `peer=...`
//! lines, their medians over passes, and the `ratio ...` lines that compare them with
//! Flame's measurements.

use super::figures::{median, Measurement};
use super::{PEERS_LINE_BYTES_MAX, PEERS_TIMEOUT};
use crate::render::outln;
use anyhow::anyhow;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

/// One result line of the peers' script:
/// `peer=<name> case=<case> tasks=<N> seconds=<s> tasks_per_s=<r> [p50_us=.. p99_us=..]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct PeerResult {
    peer: String,
    case: String,
    /// Every numeric field, by name.
    figures: BTreeMap<String, f64>,
}

impl PeerResult {
    /// Parses a result line; anything else (`# ...` comments, `SKIPPED`, `TIMEOUT`,
    /// `FAILED` lines) is `None`.
    fn parse(line: &str) -> Option<PeerResult> {
        let mut peer = None;
        let mut case = None;
        let mut figures = BTreeMap::new();
        for field in line.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            match key {
                "peer" => peer = Some(value.to_string()),
                "case" => case = Some(value.to_string()),
                _ => {
                    figures.insert(key.to_string(), value.parse::<f64>().ok()?);
                }
            }
        }
        Some(PeerResult {
            peer: peer?,
            case: case?,
            figures,
        })
    }

    fn figure(&self, name: &str) -> Option<f64> {
        self.figures.get(name).copied()
    }
}

impl std::fmt::Display for PeerResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer={} case={}", self.peer, self.case)?;
        for (name, value) in &self.figures {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// Per peer and case (in first-seen order), the median of each figure over the passes
/// that gave it.
pub(super) fn peer_medians(passes: &[Vec<PeerResult>]) -> Vec<PeerResult> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut values: BTreeMap<(String, String), BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for result in passes.iter().flatten() {
        let key = (result.peer.clone(), result.case.clone());
        if !order.contains(&key) {
            order.push(key.clone());
        }
        let figures = values.entry(key).or_default();
        for (name, value) in &result.figures {
            figures.entry(name.clone()).or_default().push(*value);
        }
    }
    order
        .into_iter()
        .map(|key| {
            let figures = values
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, v)| (name, median(v.into_iter())))
                .collect();
            PeerResult {
                peer: key.0,
                case: key.1,
                figures,
            }
        })
        .collect()
}

/// The peers' script's output: its results, and every other line.
#[derive(Debug, Default)]
pub(super) struct PeersOutput {
    pub(super) results: Vec<PeerResult>,
    pub(super) notes: Vec<String>,
}

/// What the peers' script gave, for `--output json`.
#[derive(Debug, Serialize)]
pub(super) struct PeersReport {
    pub(super) script: String,
    /// Each pass's results.
    pub(super) passes: Vec<Vec<PeerResult>>,
    /// Per peer and case, the median of each figure over the passes that gave it; the
    /// ratios compare these.
    pub(super) medians: Vec<PeerResult>,
    pub(super) notes: Vec<String>,
    pub(super) ratios: Vec<Ratio>,
}

/// Runs the peers' script with `bash`, bounded by [`PEERS_TIMEOUT`], passing its stdout
/// lines through when `echo`. Its stderr (progress, the venv build) goes to ours. On an
/// error, what it printed until then comes with it.
pub(super) async fn run_peers(
    script: &Path,
    echo: bool,
) -> Result<PeersOutput, (PeersOutput, anyhow::Error)> {
    let mut out = PeersOutput::default();
    let mut child = match tokio::process::Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            let e = anyhow!(e).context(format!("cannot run bash {}", script.display()));
            return Err((out, e));
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return Err((out, anyhow!("no stdout pipe for the peers' script")));
    };
    let mut reader = BufReader::new(stdout);
    let deadline = tokio::time::Instant::now() + PEERS_TIMEOUT;
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(PEERS_LINE_BYTES_MAX);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout_at(deadline, read).await {
            Err(_) => {
                let e = anyhow!(
                    "the peers' script ran past {}; it was killed",
                    humantime::format_duration(PEERS_TIMEOUT)
                );
                return Err((out, e));
            }
            Ok(Err(e)) => {
                return Err((out, anyhow!(e).context("cannot read the peers' output")));
            }
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if echo {
            if let Err(e) = outln!("{text}") {
                return Err((out, e));
            }
        }
        match PeerResult::parse(text) {
            Some(result) => out.results.push(result),
            None if !text.is_empty() => out.notes.push(text.to_string()),
            None => {}
        }
    }
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Err(_) => {
            let e = anyhow!(
                "the peers' script ran past {}; it was killed",
                humantime::format_duration(PEERS_TIMEOUT)
            );
            return Err((out, e));
        }
        Ok(Err(e)) => return Err((out, anyhow!(e).context("cannot wait for the peers' script"))),
        Ok(Ok(status)) => status,
    };
    if !status.success() {
        let e = anyhow!(
            "the peers' script {} failed with {status}",
            script.display()
        );
        return Err((out, e));
    }
    Ok(out)
}

/// Which figure is better high (a rate) or low (a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// Our measurement, the peers' case it compares with, the figure compared, and which way
/// is better. The peers' `startup` is their cluster start alone, without a first result;
/// ours includes one, so that ratio flatters them.
const COMPARED: &[(&str, &str, &str, Better)] = &[
    ("throughput", "throughput", "tasks_per_s", Better::Higher),
    (
        "throughput",
        "throughput_chunk1",
        "tasks_per_s",
        Better::Higher,
    ),
    (
        "throughput_ephemeral",
        "throughput",
        "tasks_per_s",
        Better::Higher,
    ),
    (
        "throughput_ephemeral",
        "throughput_chunk1",
        "tasks_per_s",
        Better::Higher,
    ),
    ("latency_durable", "latency", "p50_us", Better::Lower),
    ("latency_durable", "latency", "p99_us", Better::Lower),
    ("latency_ephemeral", "latency", "p50_us", Better::Lower),
    ("latency_ephemeral", "latency", "p99_us", Better::Lower),
    (
        "payload_1MiB",
        "payload_1MiB",
        "tasks_per_s",
        Better::Higher,
    ),
    (
        "payload_1MiB_ephemeral",
        "payload_1MiB",
        "tasks_per_s",
        Better::Higher,
    ),
    ("cold_start", "startup", "seconds", Better::Lower),
];

/// One comparison: `ratio case=<ours> peer=<name> peer_case=<theirs> metric=<figure>
/// flame=<ours> peer_value=<theirs> flame_vs_peer=<how many times faster flame is>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Ratio {
    case: String,
    peer: String,
    peer_case: String,
    metric: String,
    flame: f64,
    peer_value: f64,
    flame_vs_peer: f64,
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ratio case={} peer={} peer_case={} metric={} flame={:.1} peer_value={:.1} flame_vs_peer={:.3}",
            self.case,
            self.peer,
            self.peer_case,
            self.metric,
            self.flame,
            self.peer_value,
            self.flame_vs_peer
        )
    }
}

/// Every comparison [`COMPARED`] allows between `ours` and the peers' `results`.
pub(super) fn ratios(ours: &[Measurement], results: &[PeerResult]) -> Vec<Ratio> {
    let mut ratios = Vec::new();
    for &(our_case, their_case, metric, better) in COMPARED {
        let Some(flame) = ours
            .iter()
            .find(|m| m.case == our_case)
            .and_then(|m| m.figure(metric))
        else {
            continue;
        };
        for result in results.iter().filter(|r| r.case == their_case) {
            let Some(peer_value) = result.figure(metric) else {
                continue;
            };
            let flame_vs_peer = match better {
                Better::Higher => flame / peer_value,
                Better::Lower => peer_value / flame,
            };
            if !flame_vs_peer.is_finite() || flame_vs_peer <= 0.0 {
                continue;
            }
            ratios.push(Ratio {
                case: our_case.to_string(),
                peer: result.peer.clone(),
                peer_case: their_case.to_string(),
                metric: metric.to_string(),
                flame,
                peer_value,
                flame_vs_peer,
            });
        }
    }
    ratios
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::cli::bench::figures::Percentiles;
    use std::time::Duration;

    fn line(case: &str, tasks: u64, seconds: f64) -> Measurement {
        Measurement::new(case, tasks, Duration::from_secs_f64(seconds), None)
    }

    #[test]
    fn peer_medians_per_peer_case_and_figure() {
        let pass = |rate: f64, p50: Option<f64>| {
            let mut v = vec![PeerResult::parse(&format!(
                "peer=ray case=throughput tasks=10 seconds=1 tasks_per_s={rate}"
            ))
            .unwrap()];
            if let Some(p50) = p50 {
                v.push(PeerResult::parse(&format!("peer=dask case=latency p50_us={p50}")).unwrap());
            }
            v
        };
        let medians = peer_medians(&[
            pass(100.0, Some(5.0)),
            pass(300.0, None),
            pass(200.0, Some(9.0)),
        ]);
        assert_eq!(medians.len(), 2);
        assert_eq!(medians[0].peer, "ray");
        assert_eq!(medians[0].figure("tasks_per_s"), Some(200.0));
        assert_eq!(medians[0].figure("tasks"), Some(10.0));
        // Two passes gave it: the mean of the middle two.
        assert_eq!(medians[1].figure("p50_us"), Some(7.0));
        assert_eq!(
            medians[0].to_string(),
            "peer=ray case=throughput seconds=1 tasks=10 tasks_per_s=200"
        );
    }

    #[test]
    fn peer_lines_are_parsed_and_compared() {
        let ray = PeerResult::parse(
            "peer=ray case=throughput tasks=10000 seconds=2.0000 tasks_per_s=5000.0",
        )
        .unwrap();
        assert_eq!(ray.figure("tasks_per_s"), Some(5000.0));
        let lat = PeerResult::parse(
            "peer=dask case=latency tasks=1000 seconds=1.0 tasks_per_s=1000.0 p50_us=800.0 p99_us=2000.0",
        )
        .unwrap();
        let startup =
            PeerResult::parse("peer=ray case=startup tasks=0 seconds=4.0 tasks_per_s=0.0").unwrap();
        for note in [
            "# versions: python 3.11",
            "peer=ray case=latency TIMEOUT after 90s",
            "peer=mp_pool case=throughput FAILED rc=1 (see /tmp/peers-bench.log)",
            "",
        ] {
            assert_eq!(PeerResult::parse(note), None, "{note}");
        }

        let mut latency = line("latency_durable", 2000, 2.0);
        latency.latency = Some(Percentiles {
            p50_us: 400.0,
            p99_us: 4000.0,
            p999_us: 5000.0,
        });
        let ours = vec![
            line("throughput", 100_000, 10.0),
            latency,
            line("cold_start", 1, 2.0),
            line("sessions", 100, 1.0),
        ];
        let r = ratios(&ours, &[ray, lat, startup]);
        let shown: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "ratio case=throughput peer=ray peer_case=throughput metric=tasks_per_s flame=10000.0 peer_value=5000.0 flame_vs_peer=2.000",
                "ratio case=latency_durable peer=dask peer_case=latency metric=p50_us flame=400.0 peer_value=800.0 flame_vs_peer=2.000",
                "ratio case=latency_durable peer=dask peer_case=latency metric=p99_us flame=4000.0 peer_value=2000.0 flame_vs_peer=0.500",
                "ratio case=cold_start peer=ray peer_case=startup metric=seconds flame=2.0 peer_value=4.0 flame_vs_peer=2.000",
            ]
        );
    }
}
