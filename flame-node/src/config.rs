//! The agent's settings: command-line flags, over a TOML file (`--config`), over defaults.
//!
//! ```toml
//! head = "head.example.org:7470"
//! name = "gpu-07"                   # default: the name in the node's certificate
//! tls_dir = "/var/lib/flame/node-tls"  # node.crt, node.key, ca.crt, from `flame-node join`
//! # cert = "/etc/flame/node.crt"    # default: TLS_DIR/node.crt
//! # key = "/etc/flame/node.key"     # default: TLS_DIR/node.key
//! # ca_file = "/etc/flame/ca.crt"   # default: TLS_DIR/ca.crt
//! work_dir = "/var/lib/flame/node"
//! runtime_dir = "/run/flame/node"
//! log_dir = "/var/log/flame/node"
//! executor_identity = "owner-uid"  # or "site-user", or "fixed" (needs executor_user)
//! # executor_user = "flame-exec"    # with "fixed" only: every owner's executors run as it
//! allow_root_executors = false
//! cgroups = "auto"                  # or "off": no limits, no accounting
//! cpus = 30.5                       # override what is detected
//! memory = "120GiB"
//! gpus = [0, 1]                     # override the detected GPU indices
//! reserve_cpus = 2                  # kept for the system
//! reserve_memory = "8GiB"
//! log_file_bytes_max = "8MiB"
//! log_files_kept = 3
//! object_listen = "0.0.0.0:7471"   # the object cache's endpoint (UDP, QUIC), or "off"
//! # object_advertise = "10.0.0.7:7471"  # default: the address the head sees, that port
//! object_memory = "2GiB"            # the cache's memory (at most the node's)
//! object_disk = "16GiB"             # the cache's spill folder's budget
//! # object_dir = "/var/lib/flame/node/objects"  # default: WORK_DIR/objects
//!
//! [labels]
//! zone = "a"
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest config file read.
pub const CONFIG_BYTES_MAX: u64 = 1024 * 1024;

/// The config file's layout; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub head: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub tls_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub name: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub executor_identity: Option<IdentityChoice>,
    pub executor_user: Option<String>,
    pub allow_root_executors: Option<bool>,
    pub cgroups: Option<CgroupMode>,
    pub cgroup_root: Option<String>,
    pub credit: Option<u32>,
    pub head_loss_grace: Option<String>,
    /// A duration such as "30s" (see `--start-timeout`).
    pub start_timeout: Option<String>,
    pub cpus: Option<f64>,
    pub memory: Option<Size>,
    pub gpus: Option<Vec<u32>>,
    pub reserve_cpus: Option<f64>,
    pub reserve_memory: Option<Size>,
    pub pids_max: Option<u32>,
    pub log_file_bytes_max: Option<Size>,
    pub log_files_kept: Option<u32>,
    pub object_listen: Option<String>,
    pub object_advertise: Option<std::net::SocketAddr>,
    pub object_memory: Option<Size>,
    pub object_disk: Option<Size>,
    pub object_dir: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Who executors run as (`--executor-identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityChoice {
    /// Each owner's executors run as the owner's uid from the head's reserved range, the
    /// same on every node, without a passwd entry (the default).
    OwnerUid,
    /// Each owner's executors run as the Unix user of the owner's name; a launch for an
    /// owner without an account fails, saying so.
    SiteUser,
    /// Every owner's executors run as `--executor-user`: owners are NOT isolated from
    /// each other. `flame node list` warns.
    Fixed,
}

/// Whether executors get cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Detect v2 or v1; required when the agent runs as root, else used when it can be.
    Auto,
    /// No cgroups: no limits and no accounting (the node reports isolation `none`).
    Off,
}

/// A size written as bytes or as text such as "8GiB".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    /// The size in bytes; the error names `field`.
    pub fn bytes(&self, field: &str) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(field, t),
        }
    }
}

/// Parses "8GiB", "512MiB" or plain bytes; the error names `field`.
pub fn parse_size(field: &str, text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{field}: `{text}` is not a size such as \"8GiB\": {e}"))
}

/// Cpus as thousandths; the error names `field`.
pub fn cpu_millis(field: &str, cpus: f64) -> Result<u32, String> {
    if !cpus.is_finite() || cpus < 0.0 || cpus * 1000.0 > f64::from(u32::MAX) {
        return Err(format!(
            "{field}: {cpus} is not a cpu count such as 2 or 0.5"
        ));
    }
    Ok((cpus * 1000.0).round() as u32)
}

/// The object endpoint's port unless `--object-listen` says otherwise (the head's is 7470).
pub const DEFAULT_OBJECT_PORT: u16 = 7471;

/// Where the node serves objects (`--object-listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectListen {
    /// No object service: no cache, no endpoint; tasks with object inputs fail here.
    Off,
    On(std::net::SocketAddr),
}

/// Parses `--object-listen`: an address `IP:PORT`, or `off`.
pub fn parse_object_listen(text: &str) -> Result<ObjectListen, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(ObjectListen::Off);
    }
    text.parse().map(ObjectListen::On).map_err(|_| {
        format!("object_listen: `{text}` is not an address such as 0.0.0.0:{DEFAULT_OBJECT_PORT}, or `off`")
    })
}

/// Parses `k=v` as a node label.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not a label KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// Reads the config file; errors name the file and, for TOML, the line and key.
pub fn load(path: &Path) -> Result<FileConfig, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > CONFIG_BYTES_MAX {
        return Err(format!(
            "{}: {} bytes; a config file may hold at most {CONFIG_BYTES_MAX}",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_and_unknown_keys_are_refused() {
        let c: FileConfig = toml::from_str(
            "head = \"h:1\"\ntls_dir = \"/t\"\ncert = \"/t/c\"\nkey = \"/t/k\"\ncpus = 1.5\nmemory = \"2GiB\"\ngpus = [0, 2]\ncgroups = \"off\"\n[labels]\nzone = \"a\"\n",
        )
        .unwrap();
        assert_eq!(c.cpus, Some(1.5));
        assert_eq!(c.tls_dir, Some(PathBuf::from("/t")));
        assert_eq!(c.cert, Some(PathBuf::from("/t/c")));
        assert_eq!(c.key, Some(PathBuf::from("/t/k")));
        assert_eq!(c.memory.unwrap().bytes("memory").unwrap(), 2 << 30);
        assert_eq!(c.gpus, Some(vec![0, 2]));
        assert_eq!(c.cgroups, Some(CgroupMode::Off));
        assert_eq!(c.labels["zone"], "a");
        let err = toml::from_str::<FileConfig>("hed = \"x\"\n").unwrap_err();
        assert!(err.message().contains("hed"), "{err}");
    }

    #[test]
    fn the_packaged_example_parses() {
        let c: FileConfig = toml::from_str(include_str!("../../packaging/node.toml")).unwrap();
        assert_eq!(c.executor_identity, Some(IdentityChoice::OwnerUid));
        assert_eq!(c.executor_user, None);
        let fixed: FileConfig =
            toml::from_str("executor_identity = \"fixed\"\nexecutor_user = \"nobody\"\n").unwrap();
        assert_eq!(fixed.executor_identity, Some(IdentityChoice::Fixed));
        assert!(toml::from_str::<FileConfig>("executor_identity = \"shared\"\n").is_err());
        assert_eq!(c.reserve_cpus, Some(0.0));
        assert_eq!(
            c.reserve_memory.unwrap().bytes("reserve_memory").unwrap(),
            0
        );
        let c: FileConfig = toml::from_str("cpus = 2\n").unwrap();
        assert_eq!(c.cpus, Some(2.0));
    }

    #[test]
    fn the_object_service_is_an_address_or_off() {
        assert_eq!(parse_object_listen("off"), Ok(ObjectListen::Off));
        assert_eq!(
            parse_object_listen("[::]:9"),
            Ok(ObjectListen::On("[::]:9".parse().unwrap()))
        );
        let err = parse_object_listen("somewhere").unwrap_err();
        assert!(
            err.starts_with("object_listen") && err.contains("off"),
            "{err}"
        );
        let c: FileConfig = toml::from_str(
            "object_listen = \"off\"\nobject_memory = \"1GiB\"\nobject_disk = 5\nobject_dir = \"/o\"\n",
        )
        .unwrap();
        assert_eq!(c.object_listen.as_deref(), Some("off"));
        assert_eq!(
            c.object_memory.unwrap().bytes("object_memory").unwrap(),
            1 << 30
        );
        assert_eq!(c.object_disk.unwrap().bytes("object_disk").unwrap(), 5);
        assert_eq!(c.object_dir, Some(PathBuf::from("/o")));
    }

    #[test]
    fn bad_values_name_the_field() {
        assert!(cpu_millis("cpus", -1.0).unwrap_err().starts_with("cpus"));
        assert_eq!(cpu_millis("cpus", 0.25).unwrap(), 250);
        assert!(parse_size("memory", "lots")
            .unwrap_err()
            .starts_with("memory"));
        assert!(parse_label("novalue").is_err());
        assert_eq!(
            parse_label("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
    }
}
