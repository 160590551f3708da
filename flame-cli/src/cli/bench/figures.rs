//! `flame bench`'s figures: one [`Measurement`] per output line, its percentiles and peak
//! memory, and the medians over repeated runs.

use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// Peak resident sets of the head and the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rss {
    /// `flame-head`'s `VmHWM`, in KiB.
    pub rss_head_kib: u64,
    /// `flame-node`'s `VmHWM`, in KiB.
    pub rss_node_kib: u64,
}

/// One measurement: one output line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// The line's name: the case's, or a part of it (`latency_durable`, `queue_drain`).
    pub case: String,
    /// Tasks measured.
    pub tasks: u64,
    /// Wall time of the measurement.
    pub seconds: f64,
    /// `tasks / seconds`.
    pub tasks_per_s: f64,
    /// Round-trip percentiles, for latency lines.
    #[serde(flatten)]
    pub latency: Option<Percentiles>,
    /// Peak memory of the head and node, when `/proc` could be read.
    #[serde(flatten)]
    pub rss: Option<Rss>,
    /// Bytes moved per second, in MiB, for the lines that move one large object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mib_per_s: Option<f64>,
}

impl Measurement {
    pub(super) fn new(case: &str, tasks: u64, elapsed: Duration, rss: Option<Rss>) -> Measurement {
        let seconds = elapsed.as_secs_f64();
        Measurement {
            case: case.to_string(),
            tasks,
            seconds,
            tasks_per_s: tasks as f64 / seconds.max(1e-9),
            latency: None,
            rss,
            mib_per_s: None,
        }
    }

    /// The same, with the rate `bytes` moved in `elapsed` gives.
    pub(super) fn moved(mut self, bytes: u64) -> Measurement {
        self.mib_per_s = Some(bytes as f64 / (1 << 20) as f64 / self.seconds.max(1e-9));
        self
    }

    /// The figure named as in the output line, for comparisons.
    pub(super) fn figure(&self, name: &str) -> Option<f64> {
        match name {
            "seconds" => Some(self.seconds),
            "tasks_per_s" => Some(self.tasks_per_s),
            "p50_us" => self.latency.map(|l| l.p50_us),
            "p99_us" => self.latency.map(|l| l.p99_us),
            "p999_us" => self.latency.map(|l| l.p999_us),
            "mib_per_s" => self.mib_per_s,
            _ => None,
        }
    }
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case={} tasks={} seconds={:.6} tasks_per_s={:.1}",
            self.case, self.tasks, self.seconds, self.tasks_per_s
        )?;
        if let Some(l) = &self.latency {
            write!(
                f,
                " p50_us={:.1} p99_us={:.1} p999_us={:.1}",
                l.p50_us, l.p99_us, l.p999_us
            )?;
        }
        if let Some(m) = self.mib_per_s {
            write!(f, " mib_per_s={m:.1}")?;
        }
        if let Some(r) = &self.rss {
            write!(
                f,
                " rss_head_kib={} rss_node_kib={}",
                r.rss_head_kib, r.rss_node_kib
            )?;
        }
        Ok(())
    }
}

/// Nearest-rank percentiles of `samples` (as the peers compute theirs), in microseconds;
/// sorts them.
pub(super) fn percentiles(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let rank = (q * samples.len() as f64).ceil() as usize;
        let k = rank.saturating_sub(1).min(samples.len() - 1);
        samples[k].as_nanos() as f64 / 1e3
    };
    Percentiles {
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
    }
}

/// The peak resident set (`VmHWM`) of process `pid`, in KiB.
pub(super) fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmHWM")
}

/// A `NAME:   1234 kB` field of a `/proc/PID/status` text.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The median of each figure of each measurement name in `runs`, in order of first
/// appearance. A figure some runs lack (RSS) is left out.
pub(super) fn medians(runs: &[Measurement]) -> Vec<Measurement> {
    let mut names: Vec<&str> = Vec::new();
    for m in runs {
        if !names.contains(&m.case.as_str()) {
            names.push(&m.case);
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let of: Vec<&Measurement> = runs.iter().filter(|m| m.case == name).collect();
            let first = of.first()?;
            let latency = of
                .iter()
                .map(|m| m.latency)
                .collect::<Option<Vec<_>>>()
                .map(|l| Percentiles {
                    p50_us: median(l.iter().map(|p| p.p50_us)),
                    p99_us: median(l.iter().map(|p| p.p99_us)),
                    p999_us: median(l.iter().map(|p| p.p999_us)),
                });
            let rss = of
                .iter()
                .map(|m| m.rss)
                .collect::<Option<Vec<_>>>()
                .map(|r| Rss {
                    rss_head_kib: median(r.iter().map(|x| x.rss_head_kib as f64)).round() as u64,
                    rss_node_kib: median(r.iter().map(|x| x.rss_node_kib as f64)).round() as u64,
                });
            Some(Measurement {
                case: first.case.clone(),
                tasks: median(of.iter().map(|m| m.tasks as f64)).round() as u64,
                seconds: median(of.iter().map(|m| m.seconds)),
                tasks_per_s: median(of.iter().map(|m| m.tasks_per_s)),
                latency,
                rss,
                mib_per_s: of
                    .iter()
                    .map(|m| m.mib_per_s)
                    .collect::<Option<Vec<_>>>()
                    .map(|v| median(v.into_iter())),
            })
        })
        .collect()
}

/// The median of `values`: the middle one, or the mean of the middle two; 0 for none.
pub(super) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn line(case: &str, tasks: u64, seconds: f64) -> Measurement {
        Measurement::new(case, tasks, Duration::from_secs_f64(seconds), None)
    }

    #[test]
    fn lines_have_the_documented_form() {
        let mut m = line("latency_durable", 2000, 2.0);
        assert_eq!(
            m.to_string(),
            "case=latency_durable tasks=2000 seconds=2.000000 tasks_per_s=1000.0"
        );
        m.latency = Some(Percentiles {
            p50_us: 900.0,
            p99_us: 1500.26,
            p999_us: 3000.0,
        });
        m.rss = Some(Rss {
            rss_head_kib: 10,
            rss_node_kib: 20,
        });
        assert_eq!(
            m.to_string(),
            "case=latency_durable tasks=2000 seconds=2.000000 tasks_per_s=1000.0 \
             p50_us=900.0 p99_us=1500.3 p999_us=3000.0 rss_head_kib=10 rss_node_kib=20"
        );
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["p99_us"], 1500.26);
        assert_eq!(json["rss_node_kib"], 20);
        let plain = serde_json::to_value(line("x", 1, 1.0)).unwrap();
        assert!(plain.get("p50_us").is_none(), "{plain}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=1000u64).rev().map(Duration::from_micros).collect();
        let p = percentiles(&mut samples);
        assert_eq!((p.p50_us, p.p99_us, p.p999_us), (500.0, 990.0, 999.0));
        let mut one = vec![Duration::from_micros(7)];
        assert_eq!(percentiles(&mut one).p999_us, 7.0);
    }

    #[test]
    fn medians_per_measurement() {
        let runs = vec![
            line("a", 10, 1.0),
            line("b", 5, 9.0),
            line("a", 10, 3.0),
            line("a", 10, 2.0),
            line("b", 5, 1.0),
        ];
        let m = medians(&runs);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].case.as_str(), m[0].seconds), ("a", 2.0));
        assert_eq!((m[1].case.as_str(), m[1].seconds), ("b", 5.0));
        assert_eq!(m[1].tasks, 5);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
    }

    #[test]
    fn proc_status_fields() {
        let status =
            "Name:\tflame-head\nVmPeak:\t  9000 kB\nVmHWM:\t    4242 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(4242));
        assert_eq!(status_kib(status, "VmRSS"), Some(4000));
        assert_eq!(status_kib(status, "VmSwap"), None);
        // This process has one.
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
