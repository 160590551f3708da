//! What this node offers: cpu, memory and GPUs, within the limits of the node's own cgroup.
//!
//! Parsing is kept apart from reading, so every format is tested on sample texts; the
//! readers are thin.

use crate::cgroup::{read_own_cgroups, OwnDir};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest `nvidia-smi` may run before it is killed and GPU detection fails.
pub const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read from each of `nvidia-smi`'s output streams.
pub const NVIDIA_SMI_OUTPUT_BYTES_MAX: u64 = 1 << 20;
/// Where the NVIDIA driver describes each GPU, one directory per PCI address.
pub const PROC_NVIDIA_GPUS: &str = "/proc/driver/nvidia/gpus";
/// Ancestors walked up from the node's own cgroup when looking for a lower limit; cgroup
/// trees are far shallower, this only bounds a loop over a malformed path.
const CGROUP_DEPTH_MAX: usize = 64;

/// One GPU of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// The driver's index (`nvidia-smi` index, or the device minor number).
    pub index: u32,
    /// The GPU's UUID, `GPU-...`.
    pub uuid: String,
    /// The model name.
    pub name: String,
    /// Total memory in bytes; 0 where unknown (the `/proc` fallback does not say).
    pub memory_bytes: u64,
}

/// What this node offers to executors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// Cpu in thousandths of a cpu.
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// GPUs, by index.
    pub gpus: Vec<Gpu>,
}

/// Why GPUs could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `nvidia-smi` is installed but could not be started.
    #[error("cannot run nvidia-smi: {0}")]
    Spawn(#[source] std::io::Error),
    /// `nvidia-smi` did not finish in time and was killed.
    #[error("nvidia-smi did not finish within {} s", .0.as_secs())]
    Timeout(Duration),
    /// `nvidia-smi` failed.
    #[error("nvidia-smi failed ({status}): {stderr}")]
    Failed {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it said on stderr.
        stderr: String,
    },
    /// A line of output was not in the format asked for.
    #[error("cannot parse GPU description `{line}`: {detail}")]
    Parse {
        /// The line.
        line: String,
        /// What was wrong.
        detail: String,
    },
    /// A driver file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Detects this node's capacity: cpus the node may run on (its affinity mask), lowered to
/// its own cgroup's cpu quota; memory from `/proc/meminfo`, lowered to its own cgroup's
/// memory limit (the lowest of its ancestors'); GPUs from [`detect_gpus`]. What cannot be
/// read is logged and left out (no GPUs, no cgroup bound).
pub fn detect() -> Capacity {
    let own = read_own_cgroups()
        .map_err(|e| tracing::warn!("cannot find the node's cgroup, ignoring its limits: {e}"))
        .ok();
    let cpu_limit = own
        .as_ref()
        .and_then(|own| match (own.v1_dir("cpu"), &own.v2) {
            (Some(d), _) => lowest_limit(d, cfs_quota_millis_at),
            (None, Some(d)) => lowest_limit(d, cpu_max_millis_at),
            (None, None) => None,
        });
    let memory_limit = own
        .as_ref()
        .and_then(|own| match (own.v1_dir("memory"), &own.v2) {
            (Some(d), _) => lowest_limit(d, |dir| read_limit(&dir.join("memory.limit_in_bytes"))),
            (None, Some(d)) => lowest_limit(d, |dir| read_limit(&dir.join("memory.max"))),
            (None, None) => None,
        });
    let mem_total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_mem_total(&t))
        .unwrap_or(0);
    let gpus = detect_gpus().unwrap_or_else(|e| {
        tracing::warn!("cannot detect GPUs, offering none: {e}");
        Vec::new()
    });
    Capacity {
        cpu_millis: bounded_cpu_millis(affinity_cpus(), cpu_limit),
        memory_bytes: bounded_memory_bytes(mem_total, memory_limit),
        gpus,
    }
}

/// Lists the NVIDIA GPUs: through `nvidia-smi` (killed after [`NVIDIA_SMI_TIMEOUT`]),
/// else, when it is not installed, from [`PROC_NVIDIA_GPUS`]; neither there: none.
pub fn detect_gpus() -> Result<Vec<Gpu>, GpuError> {
    match run_nvidia_smi()? {
        Some(csv) => parse_nvidia_smi_csv(&csv),
        None => read_proc_gpus(Path::new(PROC_NVIDIA_GPUS)),
    }
}

/// Cpus in the affinity mask (std's `available_parallelism` also applies the cgroup quota,
/// rounded down to whole cpus; the quota is applied here with millicpu precision instead).
fn affinity_cpus() -> u32 {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it and CPU_COUNT reads it.
    let counted = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            u32::try_from(libc::CPU_COUNT(&set)).ok()
        } else {
            None
        }
    };
    counted
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
}

/// Cpus in millicpus, lowered to the cgroup limit; at least 1 millicpu.
fn bounded_cpu_millis(cpus: u32, limit_millis: Option<u64>) -> u32 {
    let all = u64::from(cpus) * 1000;
    let millis = limit_millis.map_or(all, |l| l.min(all)).max(1);
    u32::try_from(millis).unwrap_or(u32::MAX)
}

fn bounded_memory_bytes(total: u64, limit: Option<u64>) -> u64 {
    limit.map_or(total, |l| l.min(total))
}

/// The lowest limit `read` finds in `own.dir` and its ancestors up to the mount point.
fn lowest_limit(own: &OwnDir, read: impl Fn(&Path) -> Option<u64>) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    let mut dir = Some(own.dir.as_path());
    for _ in 0..CGROUP_DEPTH_MAX {
        let Some(d) = dir else { break };
        if let Some(v) = read(d) {
            lowest = Some(lowest.map_or(v, |l| l.min(v)));
        }
        if d == own.mount_point {
            break;
        }
        dir = d.parent().filter(|p| p.starts_with(&own.mount_point));
    }
    lowest
}

fn read_limit(path: &Path) -> Option<u64> {
    parse_limit(&std::fs::read_to_string(path).ok()?)
}

/// v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` in a directory, in millicpus.
fn cfs_quota_millis_at(dir: &Path) -> Option<u64> {
    let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).ok()?;
    let period = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?;
    parse_cfs_millis(&quota, &period)
}

/// v2 `cpu.max` in a directory, in millicpus.
fn cpu_max_millis_at(dir: &Path) -> Option<u64> {
    parse_cpu_max_millis(&std::fs::read_to_string(dir.join("cpu.max")).ok()?)
}

/// A v1 quota (`-1`: none) over its period, in millicpus.
fn parse_cfs_millis(quota: &str, period: &str) -> Option<u64> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok()?;
    quota_millis(u64::try_from(quota).ok()?, period)
}

/// v2 `cpu.max`, `$MAX $PERIOD` (`max`: none), in millicpus.
fn parse_cpu_max_millis(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    let quota = words.next()?.parse().ok()?;
    let period = words.next()?.parse().ok()?;
    quota_millis(quota, period)
}

fn quota_millis(quota: u64, period: u64) -> Option<u64> {
    (period > 0).then(|| quota.saturating_mul(1000) / period)
}

/// A memory limit file: a byte count, or `max` (v2) for none. v1's "unlimited" is a huge
/// number that the `min` with the machine's memory takes care of.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn parse_mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits`
/// (memory in MiB), sorted by index.
fn parse_nvidia_smi_csv(text: &str) -> Result<Vec<Gpu>, GpuError> {
    let mut gpus = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let parse_error = |detail: &str| GpuError::Parse {
            line: line.to_string(),
            detail: detail.to_string(),
        };
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        // The name is the only field that could hold a comma: it is everything between
        // the uuid and the memory.
        let [index, uuid, name @ .., memory] = fields.as_slice() else {
            return Err(parse_error("expected index, uuid, name, memory.total"));
        };
        if name.is_empty() {
            return Err(parse_error("expected index, uuid, name, memory.total"));
        }
        let index = index
            .parse()
            .map_err(|_| parse_error("the index is not a number"))?;
        let memory_mib: u64 = memory
            .parse()
            .map_err(|_| parse_error("memory.total is not a number of MiB"))?;
        gpus.push(Gpu {
            index,
            uuid: uuid.to_string(),
            name: name.join(", "),
            memory_bytes: memory_mib.saturating_mul(1 << 20),
        });
    }
    gpus.sort_by_key(|g| g.index);
    Ok(gpus)
}

/// Parses a `/proc/driver/nvidia/gpus/<pci>/information` file (`Key: value` lines).
fn parse_proc_gpu_information(text: &str) -> Result<Gpu, GpuError> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let missing = |key: &str| GpuError::Parse {
        line: text.lines().next().unwrap_or_default().to_string(),
        detail: format!("no `{key}:` line"),
    };
    let minor = value("Device Minor").ok_or_else(|| missing("Device Minor"))?;
    Ok(Gpu {
        index: minor.parse().map_err(|_| GpuError::Parse {
            line: format!("Device Minor: {minor}"),
            detail: "not a number".to_string(),
        })?,
        uuid: value("GPU UUID").ok_or_else(|| missing("GPU UUID"))?,
        name: value("Model").ok_or_else(|| missing("Model"))?,
        memory_bytes: 0,
    })
}

/// Every GPU the driver lists under `dir`; a missing `dir` (no driver) lists none.
fn read_proc_gpus(dir: &Path) -> Result<Vec<Gpu>, GpuError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GpuError::Read { path, source }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_error(dir)(e)),
    };
    let mut gpus = Vec::new();
    for entry in entries {
        let path = entry.map_err(read_error(dir))?.path().join("information");
        let text = std::fs::read_to_string(&path).map_err(read_error(&path))?;
        gpus.push(parse_proc_gpu_information(&text)?);
    }
    gpus.sort_by_key(|g| g.index);
    Ok(gpus)
}

/// Runs `nvidia-smi` for the GPU list; `None` when it is not installed.
fn run_nvidia_smi() -> Result<Option<String>, GpuError> {
    let spawned = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(GpuError::Spawn(e)),
    };
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < NVIDIA_SMI_TIMEOUT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Ok(None) => {
                // Best effort: it may have exited just now.
                let _ = child.kill();
                let _ = child.wait();
                return Err(GpuError::Timeout(NVIDIA_SMI_TIMEOUT));
            }
            Err(e) => return Err(GpuError::Spawn(e)),
        }
    };
    // The pipes close at exit unless it left a descendant holding them: wait a little.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(1))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let (out, err) = (collect(stdout), collect(stderr));
    if !status.success() {
        return Err(GpuError::Failed {
            status,
            stderr: err.trim().to_string(),
        });
    }
    Ok(Some(out))
}

/// Reads a stream to its end (at most [`NVIDIA_SMI_OUTPUT_BYTES_MAX`]) on a thread.
fn read_in_background(stream: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::sync_channel(1);
    if let Some(stream) = stream {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stream
                .take(NVIDIA_SMI_OUTPUT_BYTES_MAX)
                .read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_csv_one_and_many() {
        let one = "0, GPU-5a3e0f0e-7c2b-11ee-b962-0242ac120002, NVIDIA H200, 143771\n";
        assert_eq!(
            parse_nvidia_smi_csv(one).unwrap(),
            vec![Gpu {
                index: 0,
                uuid: "GPU-5a3e0f0e-7c2b-11ee-b962-0242ac120002".to_string(),
                name: "NVIDIA H200".to_string(),
                memory_bytes: 143_771 << 20,
            }]
        );
        let many = "\
1, GPU-b1, NVIDIA A100-SXM4-80GB, 81920
0, GPU-a0, NVIDIA A100-SXM4-80GB, 81920
2, GPU-c2, Tesla V100-SXM2-16GB, 16384

";
        let gpus = parse_nvidia_smi_csv(many).unwrap();
        assert_eq!(
            gpus.iter()
                .map(|g| (g.index, g.uuid.as_str()))
                .collect::<Vec<_>>(),
            [(0, "GPU-a0"), (1, "GPU-b1"), (2, "GPU-c2")]
        );
        assert_eq!(gpus[2].memory_bytes, 16 << 30);
        assert_eq!(parse_nvidia_smi_csv("").unwrap(), vec![]);
        // A name with a comma stays whole.
        let odd = parse_nvidia_smi_csv("3, GPU-d3, Odd, Name, 1024\n").unwrap();
        assert_eq!(odd[0].name, "Odd, Name");
        for bad in [
            "0, GPU-a0, 81920",
            "x, GPU-a0, A100, 81920",
            "0, GPU-a0, A100, [N/A]",
        ] {
            let e = parse_nvidia_smi_csv(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    const PROC_INFORMATION: &str = "\
Model: \t\t Tesla V100-SXM2-16GB
IRQ:   \t\t 40
GPU UUID: \t GPU-2b1b5e0c-62ab-4a3c-9c1a-0d0c4b7f8e11
Video BIOS: \t 88.00.4f.00.09
Bus Type: \t PCIe
DMA Size: \t 47 bits
DMA Mask: \t 0x7fffffffffff
Bus Location: \t 0000:00:1e.0
Device Minor: \t 3
GPU Excluded:\t No
";

    #[test]
    fn proc_gpu_information() {
        assert_eq!(
            parse_proc_gpu_information(PROC_INFORMATION).unwrap(),
            Gpu {
                index: 3,
                uuid: "GPU-2b1b5e0c-62ab-4a3c-9c1a-0d0c4b7f8e11".to_string(),
                name: "Tesla V100-SXM2-16GB".to_string(),
                memory_bytes: 0,
            }
        );
        let e = parse_proc_gpu_information("Model: X\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Device Minor"), "{e}");
    }

    #[test]
    fn proc_gpus_directory() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(read_proc_gpus(&tmp.path().join("absent")).unwrap(), vec![]);
        for (pci, minor) in [("0000:00:1f.0", 1), ("0000:00:1e.0", 0)] {
            let d = tmp.path().join(pci);
            std::fs::create_dir(&d).unwrap();
            let text =
                PROC_INFORMATION.replace("Device Minor: \t 3", &format!("Device Minor: {minor}"));
            std::fs::write(d.join("information"), text).unwrap();
        }
        let gpus = read_proc_gpus(tmp.path()).unwrap();
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn cgroup_cpu_and_memory_limits_parse() {
        assert_eq!(parse_cfs_millis("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs_millis("150000\n", "100000\n"), Some(1500));
        assert_eq!(parse_cfs_millis("50000", "0"), None);
        assert_eq!(parse_cpu_max_millis("max 100000\n"), None);
        assert_eq!(parse_cpu_max_millis("250000 100000\n"), Some(2500));
        assert_eq!(parse_cpu_max_millis("25000 50000\n"), Some(500));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(
            parse_limit("9223372036854771712\n"),
            Some(9_223_372_036_854_771_712)
        );
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(
            parse_mem_total("MemTotal:       24684092 kB\nMemFree: 1 kB\n"),
            Some(24_684_092 * 1024)
        );
    }

    #[test]
    fn limits_bound_the_machine() {
        assert_eq!(bounded_cpu_millis(8, None), 8000);
        assert_eq!(bounded_cpu_millis(8, Some(1500)), 1500);
        assert_eq!(bounded_cpu_millis(2, Some(4000)), 2000);
        assert_eq!(bounded_cpu_millis(2, Some(0)), 1);
        assert_eq!(bounded_memory_bytes(16 << 30, None), 16 << 30);
        assert_eq!(bounded_memory_bytes(16 << 30, Some(4 << 30)), 4 << 30);
        // v1's "unlimited".
        assert_eq!(
            bounded_memory_bytes(16 << 30, Some(9_223_372_036_854_771_712)),
            16 << 30
        );
    }

    #[test]
    fn the_lowest_ancestor_limit_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let mount = tmp.path().join("memory");
        let own = mount.join("a/b/c");
        std::fs::create_dir_all(&own).unwrap();
        let limit = |d: &Path, v: &str| std::fs::write(d.join("memory.max"), v).unwrap();
        limit(&mount, "max\n");
        limit(&mount.join("a"), "2147483648\n");
        limit(&mount.join("a/b"), "max\n");
        limit(&own, "4294967296\n");
        // Above the mount point is outside the hierarchy and never read.
        limit(tmp.path(), "1\n");
        let own = OwnDir {
            mount_point: mount.clone(),
            dir: own,
        };
        let read = |d: &Path| read_limit(&d.join("memory.max"));
        assert_eq!(lowest_limit(&own, read), Some(2 << 30));
        limit(&mount.join("a"), "max\n");
        assert_eq!(lowest_limit(&own, read), Some(4 << 30));
        limit(&own.dir, "max\n");
        assert_eq!(lowest_limit(&own, read), None);

        // cpu.max, v2: the parent's quota is lower.
        std::fs::write(mount.join("a/cpu.max"), "50000 100000\n").unwrap();
        std::fs::write(own.dir.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(lowest_limit(&own, cpu_max_millis_at), Some(500));
    }

    #[test]
    fn this_machine() {
        // No assertion on the numbers, which depend on the machine: it runs, and stays
        // within what the machine has.
        let c = detect();
        eprintln!("{c:?}");
        assert!(c.cpu_millis >= 1);
        assert!(c.cpu_millis <= affinity_cpus() * 1000);
        assert!(c.memory_bytes > 0);
    }
}
