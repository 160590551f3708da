//! The head's settings: command-line flags over an optional TOML file over defaults.

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "flame-head", version, about = "The head of a Flame cluster")]
pub struct Args {
    /// What to do; without one, the head serves.
    #[command(subcommand)]
    pub command: Option<HeadCommand>,
    /// TOML configuration file (flags given here override it).
    #[arg(long, env = "FLAME_HEAD_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Directory holding the state (state.redb), the cluster CA and the head's identity.
    #[arg(long, env = "FLAME_HEAD_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (UDP, QUIC); `token` commands reach the head there.
    #[arg(long, global = true)]
    pub listen: Option<SocketAddr>,
    /// Extra DNS names or IP addresses for the head's certificate (it is re-issued at
    /// start when one is missing from it).
    #[arg(long = "tls-san", global = true)]
    pub tls_san: Vec<String>,
    /// Largest task input (and session common data) accepted, in bytes.
    #[arg(long)]
    pub task_input_bytes_max: Option<usize>,
    /// An owner's weight in the fair share, `NAME=WEIGHT` (repeatable; default weight 1).
    #[arg(long = "owner-weight", value_parser = parse_owner_weight)]
    pub owner_weights: Vec<(String, u32)>,
    /// How long an executor reclaimed for another session may go on with its task before
    /// it is killed and the task requeued (uncharged), e.g. `30s`. Without it a reclaimed
    /// executor always finishes its task.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub preemption_grace: Option<std::time::Duration>,
    /// How long a connected node may stay silent (nodes send a heartbeat every second)
    /// before it is declared lost and its tasks go to their next attempt; also how long a
    /// restarted head waits for known nodes to come back [default: 10s]. Silence while the
    /// head itself was stopped or frozen does not count.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Option<std::time::Duration>,
    /// Task outputs larger than this stay in the node's object cache and the result names
    /// the object, e.g. `100KiB` [default: 100KiB]; nodes learn it when they register.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub object_inline_max: Option<u64>,
    /// Largest task output accepted, inline or kept on its node as an object, e.g. `64MiB`
    /// [default: 16MiB, at most 64MiB]: a larger one fails its task. Nodes learn it when
    /// they register and keep no larger output.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub task_output_bytes_max: Option<u64>,
    /// How long a task whose input object a busy node holds waits for an executor there
    /// before any executor may take it (and fetch the object), e.g. `100ms` [default: 100ms]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub locality_wait: Option<std::time::Duration>,
    /// How long a session's objects (its outputs, the inputs put for it) stay after it
    /// ends, for readers of its last results, e.g. `10m` [default: 10m]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub object_retention: Option<std::time::Duration>,
    /// Free space of the data directory, in bytes, below which the head warns in its log
    /// (checked every 5 s) [default: 1 GiB].
    #[arg(long, value_name = "BYTES")]
    pub low_space_bytes: Option<u64>,
    /// A per-user quota for every owner, `KEY=VALUE` (repeatable; over head.toml's
    /// `[quotas]`): open_sessions, pending_tasks, input_bytes, connections,
    /// streams_per_connection, submit_bytes_in_flight, objects, object_bytes.
    #[arg(long = "quota", value_name = "KEY=VALUE", value_parser = crate::quotas::parse_quota_flag)]
    pub quotas: Vec<(String, u64)>,
    /// A quota for one owner, `OWNER.KEY=VALUE` (repeatable; over head.toml's
    /// `[quotas.owners.OWNER]`).
    #[arg(long = "owner-quota", value_name = "OWNER.KEY=VALUE", value_parser = crate::quotas::parse_owner_quota_flag)]
    pub owner_quotas: Vec<(String, String, u64)>,
    /// The uids owners' executors run as on nodes in owner-uid mode, `FIRST-LAST`; each
    /// owner gets one, once, kept in the state. Default 1900000000-1900999999.
    #[arg(long, value_name = "FIRST-LAST")]
    pub owner_uid_range: Option<crate::owner_uids::UidRange>,
}

/// `flame-head` commands other than serving.
#[derive(Debug, clap::Subcommand)]
pub enum HeadCommand {
    /// Creates the cluster CA, the head's certificate and a first admin token (written to
    /// DATA_DIR/admin.token, mode 0600) in the data directory. Run once, before the first
    /// start; the head refuses to start without it.
    Init {
        /// Name of the first admin user.
        #[arg(long, default_value = "admin")]
        admin_name: String,
    },
    /// Issues a client certificate for a user, signed by the cluster CA: an alternative to
    /// a token (`flame --cert DIR/NAME.crt --key DIR/NAME.key`). Writes NAME.crt,
    /// NAME.key (0600) and ca.crt into OUT, and prints its serial number, by which
    /// `flame-head cert revoke` withdraws it.
    UserCert {
        /// The user it names.
        name: String,
        /// The user is an admin.
        #[arg(long)]
        admin: bool,
        /// Folder to write the files to (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// How long the certificate is valid, in whole days (e.g. `30d`, `90d`; at most a
        /// year). Default 30 days.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Revokes user, admin and node certificates and lists the revocations, on the running
    /// head, as the admin of DATA_DIR/admin.token.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Creates, lists and revokes tokens on the running head, as the admin whose token
    /// `init` wrote to DATA_DIR/admin.token.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Writes the man pages and shell completions of `flame-head` to OUT (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// How `token list` and `cert list` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListOutput {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line, for scripts.
    Json,
}

/// `flame-head token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Prints a new token once; the head keeps only a hash of it.
    // One of --node and --user is required; a group makes clap's error name both.
    #[command(group(clap::ArgGroup::new("purpose").required(true).args(["node", "user"])))]
    Create {
        /// A token that joins nodes (`flame-node join`). Default lifetime 24h.
        #[arg(long, conflicts_with = "user")]
        node: bool,
        /// A token for the user NAME, who owns the sessions it creates. No expiry unless
        /// `--ttl` is given.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// The user is an admin: registers applications, drains nodes, manages tokens, and
        /// may act on every user's sessions.
        #[arg(long, requires = "user")]
        admin: bool,
        /// How long the token is valid, e.g. `12h`, `30d`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// How many nodes may join with it (default 1: a join token is single-use).
        #[arg(long, value_name = "N", requires = "node")]
        uses: Option<u32>,
        /// A join with this token may take the name NAME of an existing node, joined or
        /// connected; that node's certificate stops working and its connection is closed.
        #[arg(long, value_name = "NAME", requires = "node")]
        replace: Option<String>,
    },
    /// Lists tokens (never their secrets).
    List {
        /// Output format: `table`, or `json` (one JSON object per line), as `flame`'s
        /// `--output`
        #[arg(long, short = 'o', value_enum, default_value_t = ListOutput::Table)]
        output: ListOutput,
        /// The older spelling of `--output json`.
        #[arg(long, hide = true)]
        json: bool,
    },
    /// Revokes a token by its id; connections it opened are closed.
    Revoke { id: String },
}

/// `flame-head cert ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CertCommand {
    /// Revokes certificates: connections made with them are closed at once, and they are
    /// refused from then on.
    #[command(override_usage = "flame-head cert revoke <SERIAL | --file CERT | --node NAME>")]
    Revoke {
        /// The serial number of the certificate (hex, as `flame-head user-cert` or
        /// `openssl x509 -noout -serial` prints it).
        #[arg(required_unless_present_any = ["file", "node"], conflicts_with_all = ["file", "node"])]
        serial: Option<String>,
        /// The certificate file (PEM) to revoke.
        #[arg(long, value_name = "CERT", conflicts_with = "node")]
        file: Option<PathBuf>,
        /// Every certificate of the node NAME; it may join again only with a token made
        /// by `flame-head token create --node --replace NAME`.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Lists revoked certificates and the certificate each node joined with.
    List {
        /// Output format: `table`, or `json` (one JSON object per line), as `flame`'s
        /// `--output`
        #[arg(long, short = 'o', value_enum, default_value_t = ListOutput::Table)]
        output: ListOutput,
        /// The older spelling of `--output json`.
        #[arg(long, hide = true)]
        json: bool,
    },
}

/// How many nodes a join token admits when `--uses` is not given.
pub const NODE_TOKEN_USES_DEFAULT: u32 = 1;

/// Lifetime of a node join token when `--ttl` is not given.
pub const NODE_TOKEN_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The longest preemption grace period accepted.
pub const PREEMPTION_GRACE_MAX: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The shortest heartbeat timeout accepted: three heartbeat intervals, so one late or
/// lost heartbeat never loses a node.
pub const HEARTBEAT_TIMEOUT_MIN: std::time::Duration = std::time::Duration::from_secs(3);
/// The longest heartbeat timeout accepted.
pub const HEARTBEAT_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// Largest owner weight accepted.
pub const OWNER_WEIGHT_MAX: u32 = 1_000_000;

fn parse_owner_weight(text: &str) -> Result<(String, u32), String> {
    let (name, weight) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not NAME=WEIGHT"))?;
    let weight = check_weight(
        name,
        weight
            .parse::<u32>()
            .map_err(|e| format!("`{text}`: {e}"))?,
    )?;
    Ok((name.to_string(), weight))
}

fn check_weight(name: &str, weight: u32) -> Result<u32, String> {
    if name.is_empty() {
        return Err("an owner name must not be empty".into());
    }
    if weight == 0 || weight > OWNER_WEIGHT_MAX {
        return Err(format!(
            "owner `{name}`: weight {weight} must be between 1 and {OWNER_WEIGHT_MAX}"
        ));
    }
    Ok(weight)
}

/// The TOML file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    #[serde(default)]
    tls_san: Vec<String>,
    task_input_bytes_max: Option<usize>,
    /// `[owners]` table: owner name → weight.
    #[serde(default)]
    owners: BTreeMap<String, u32>,
    /// A duration such as "30s" (see `--preemption-grace`).
    preemption_grace: Option<String>,
    /// A duration such as "10s" (see `--heartbeat-timeout`).
    heartbeat_timeout: Option<String>,
    /// A size such as "100KiB" (see `--object-inline-max`).
    object_inline_max: Option<String>,
    /// A size such as "64MiB" (see `--task-output-bytes-max`).
    task_output_bytes_max: Option<String>,
    /// A duration such as "100ms" (see `--locality-wait`).
    locality_wait: Option<String>,
    /// A duration such as "10m" (see `--object-retention`).
    object_retention: Option<String>,
    /// See `--low-space-bytes`.
    low_space_bytes: Option<u64>,
    /// `[quotas]`: per-user quotas, and `[quotas.owners.NAME]` for owners that differ.
    #[serde(default)]
    quotas: crate::quotas::FileQuotas,
    /// "FIRST-LAST" (see `--owner-uid-range`).
    owner_uid_range: Option<String>,
    /// `[groups]` table: group name → its members (Flame user names), for applications'
    /// `groups` lists.
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
}

/// Longest `--locality-wait`: locality is a preference; a longer wait would make it a
/// queue behind one node.
pub const LOCALITY_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest `--object-retention` (a week): an ended session's objects are pinned that long.
pub const OBJECT_RETENTION_MAX: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// A size such as `100KiB`, `4MiB` or `65536`.
fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{text}` is not a size such as 100KiB or 4MiB: {e}"))
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tls_san: Vec<String>,
    pub task_input_bytes_max: usize,
    /// Fair-share weights; owners not listed weigh 1.
    pub owner_weights: BTreeMap<String, u32>,
    pub preemption_grace: Option<std::time::Duration>,
    /// A node silent this long is lost.
    pub heartbeat_timeout: std::time::Duration,
    /// Outputs above this are objects.
    pub object_inline_max: u64,
    pub task_output_bytes_max: u64,
    /// The locality wait.
    pub locality_wait: std::time::Duration,
    /// How long an ended session's objects stay.
    pub object_retention: std::time::Duration,
    /// Free space of the data directory below which the head warns.
    pub low_space_bytes: u64,
    /// Per-user quotas.
    pub quotas: crate::quotas::QuotaBook,
    /// The uids executors run as on nodes in owner-uid mode, one per owner.
    pub owner_uid_range: crate::owner_uids::UidRange,
    /// Group name → members, for applications' `groups`.
    pub groups: BTreeMap<String, Vec<String>>,
}

/// A duration of the configuration file, named by its key in errors.
fn file_duration(key: &str, text: Option<&String>) -> anyhow::Result<Option<std::time::Duration>> {
    text.map(|text| {
        humantime::parse_duration(text)
            .map_err(|e| anyhow::anyhow!("{key}: `{text}` is not a duration such as \"30s\": {e}"))
    })
    .transpose()
}

/// Most groups in `[groups]`, and most members of one.
pub const GROUPS_MAX: usize = 4096;

impl HeadConfig {
    pub fn resolve(args: Args) -> anyhow::Result<HeadConfig> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid configuration file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let task_input_bytes_max = args
            .task_input_bytes_max
            .or(file.task_input_bytes_max)
            .unwrap_or(flame_protocol::limits::TASK_INPUT_BYTES_MAX);
        // Inputs must fit in a frame together with their batch envelope.
        let frame_room = flame_protocol::limits::FRAME_BYTES_MAX - 64 * 1024;
        if task_input_bytes_max == 0 || task_input_bytes_max > frame_room {
            anyhow::bail!(
                "task_input_bytes_max must be between 1 and {frame_room} bytes, not {task_input_bytes_max}"
            );
        }
        let mut owner_weights = BTreeMap::new();
        for (name, weight) in file.owners {
            let weight = check_weight(&name, weight).map_err(anyhow::Error::msg)?;
            owner_weights.insert(name, weight);
        }
        owner_weights.extend(args.owner_weights);
        let from_file = file_duration("preemption_grace", file.preemption_grace.as_ref())?;
        let preemption_grace = args.preemption_grace.or(from_file);
        if let Some(grace) = preemption_grace {
            if grace.is_zero() || grace > PREEMPTION_GRACE_MAX {
                anyhow::bail!(
                    "preemption_grace must be more than 0 and at most {}, not {}",
                    humantime::format_duration(PREEMPTION_GRACE_MAX),
                    humantime::format_duration(grace)
                );
            }
        }
        let from_file = file_duration("heartbeat_timeout", file.heartbeat_timeout.as_ref())?;
        let heartbeat_timeout = args
            .heartbeat_timeout
            .or(from_file)
            .unwrap_or(flame_protocol::limits::HEARTBEAT_TIMEOUT);
        if !(HEARTBEAT_TIMEOUT_MIN..=HEARTBEAT_TIMEOUT_MAX).contains(&heartbeat_timeout) {
            anyhow::bail!(
                "heartbeat_timeout must be between {} and {}, not {}",
                humantime::format_duration(HEARTBEAT_TIMEOUT_MIN),
                humantime::format_duration(HEARTBEAT_TIMEOUT_MAX),
                humantime::format_duration(heartbeat_timeout)
            );
        }
        let object_inline_max = match (args.object_inline_max, &file.object_inline_max) {
            (Some(n), _) => n,
            (None, Some(text)) => {
                parse_size(text).map_err(|e| anyhow::anyhow!("object_inline_max: {e}"))?
            }
            (None, None) => flame_protocol::limits::OBJECT_INLINE_BYTES_DEFAULT,
        };
        if object_inline_max > flame_protocol::limits::TASK_INPUT_BYTES_MAX as u64 {
            anyhow::bail!(
                "object_inline_max must be at most {} bytes (the largest inline payload), not {object_inline_max}",
                flame_protocol::limits::TASK_INPUT_BYTES_MAX
            );
        }
        let task_output_bytes_max = match (args.task_output_bytes_max, &file.task_output_bytes_max)
        {
            (Some(n), _) => n,
            (None, Some(text)) => {
                parse_size(text).map_err(|e| anyhow::anyhow!("task_output_bytes_max: {e}"))?
            }
            (None, None) => flame_protocol::limits::TASK_OUTPUT_BYTES_MAX,
        };
        let output_room = flame_protocol::shim::SHIM_FRAME_BYTES_MAX as u64;
        if task_output_bytes_max == 0 || task_output_bytes_max > output_room {
            anyhow::bail!(
                "task_output_bytes_max must be between 1 and {output_room} bytes (the largest \
                 shim frame), not {task_output_bytes_max}"
            );
        }
        let locality_wait = args
            .locality_wait
            .or(file_duration("locality_wait", file.locality_wait.as_ref())?)
            .unwrap_or(flame_protocol::limits::LOCALITY_WAIT);
        if locality_wait > LOCALITY_WAIT_MAX {
            anyhow::bail!(
                "locality_wait must be at most {}, not {}",
                humantime::format_duration(LOCALITY_WAIT_MAX),
                humantime::format_duration(locality_wait)
            );
        }
        let object_retention = args
            .object_retention
            .or(file_duration(
                "object_retention",
                file.object_retention.as_ref(),
            )?)
            .unwrap_or(flame_protocol::limits::SESSION_OBJECTS_RETENTION);
        if object_retention > OBJECT_RETENTION_MAX {
            anyhow::bail!(
                "object_retention must be at most {}, not {}",
                humantime::format_duration(OBJECT_RETENTION_MAX),
                humantime::format_duration(object_retention)
            );
        }
        let quotas =
            crate::quotas::QuotaBook::resolve(&file.quotas, &args.quotas, &args.owner_quotas)
                .map_err(anyhow::Error::msg)?;
        let mut tls_san = file.tls_san;
        tls_san.extend(args.tls_san);
        let owner_uid_range = match (args.owner_uid_range, &file.owner_uid_range) {
            (Some(r), _) => r,
            (None, Some(text)) => text
                .parse()
                .map_err(|e| anyhow::anyhow!("owner_uid_range: {e}"))?,
            (None, None) => crate::owner_uids::UID_RANGE_DEFAULT,
        };
        if file.groups.len() > GROUPS_MAX {
            anyhow::bail!("[groups] names more than {GROUPS_MAX} groups");
        }
        for (group, members) in &file.groups {
            flame_protocol::model::validate_principal_name("groups", group)
                .map_err(|e| anyhow::anyhow!("[groups]: {e}"))?;
            if members.len() > GROUPS_MAX {
                anyhow::bail!("[groups] {group}: more than {GROUPS_MAX} members");
            }
            for m in members {
                flame_protocol::model::validate_principal_name("groups", m)
                    .map_err(|e| anyhow::anyhow!("[groups] {group}: {e}"))?;
            }
        }
        Ok(HeadConfig {
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/flame/head")),
            listen: args.listen.or(file.listen).unwrap_or_else(|| {
                SocketAddr::from(([0, 0, 0, 0], flame_protocol::DEFAULT_HEAD_PORT))
            }),
            tls_san,
            task_input_bytes_max,
            owner_weights,
            preemption_grace,
            heartbeat_timeout,
            object_inline_max,
            task_output_bytes_max,
            locality_wait,
            object_retention,
            low_space_bytes: args
                .low_space_bytes
                .or(file.low_space_bytes)
                .unwrap_or(crate::storage_fault::LOW_SPACE_BYTES_DEFAULT),
            quotas,
            owner_uid_range,
            groups: file.groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_with(file_text: &str, flags: &[&str]) -> anyhow::Result<HeadConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("head.toml");
        std::fs::write(&path, file_text)?;
        let mut argv = vec!["flame-head", "--config"];
        let path_text = path.display().to_string();
        argv.push(&path_text);
        argv.extend_from_slice(flags);
        HeadConfig::resolve(Args::try_parse_from(argv)?)
    }

    #[test]
    fn the_packaged_head_file_parses() {
        let config = resolve_with(include_str!("../../packaging/head.toml"), &[]).unwrap();
        assert_eq!(config.preemption_grace, None);
    }

    #[test]
    fn low_space_threshold_from_file_or_flag() {
        let config = resolve_with("", &[]).unwrap();
        assert_eq!(
            config.low_space_bytes,
            crate::storage_fault::LOW_SPACE_BYTES_DEFAULT
        );
        let config = resolve_with("low_space_bytes = 5000\n", &[]).unwrap();
        assert_eq!(config.low_space_bytes, 5000);
        let config = resolve_with("low_space_bytes = 5000\n", &["--low-space-bytes", "7"]).unwrap();
        assert_eq!(config.low_space_bytes, 7);
        assert!(resolve_with("low_space_bytes = \"lots\"\n", &[]).is_err());
    }

    #[test]
    fn heartbeat_timeout_from_file_or_flag_within_bounds() {
        let config = resolve_with("", &[]).unwrap();
        assert_eq!(
            config.heartbeat_timeout,
            flame_protocol::limits::HEARTBEAT_TIMEOUT
        );
        let config = resolve_with("heartbeat_timeout = \"30s\"\n", &[]).unwrap();
        assert_eq!(config.heartbeat_timeout, std::time::Duration::from_secs(30));
        let config = resolve_with(
            "heartbeat_timeout = \"30s\"\n",
            &["--heartbeat-timeout", "5s"],
        )
        .unwrap();
        assert_eq!(config.heartbeat_timeout, std::time::Duration::from_secs(5));
        for bad in ["1s", "11m", "often"] {
            let err = resolve_with(&format!("heartbeat_timeout = \"{bad}\"\n"), &[]).unwrap_err();
            assert!(format!("{err:#}").contains("heartbeat_timeout"), "{err:#}");
        }
    }

    #[test]
    fn preemption_grace_from_file_or_flag_and_bad_values_are_named() {
        let config = resolve_with("preemption_grace = \"30s\"\n", &[]).unwrap();
        assert_eq!(
            config.preemption_grace,
            Some(std::time::Duration::from_secs(30))
        );
        let config = resolve_with(
            "preemption_grace = \"30s\"\n",
            &["--preemption-grace", "2m"],
        )
        .unwrap();
        assert_eq!(
            config.preemption_grace,
            Some(std::time::Duration::from_secs(120))
        );
        let err = resolve_with("preemption_grace = \"soon\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("preemption_grace"), "{err:#}");
        let err = resolve_with("preemption_grace = \"0s\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("more than 0"), "{err:#}");
        assert!(resolve_with("", &["--preemption-grace", "later"]).is_err());
    }

    #[test]
    fn quotas_from_file_and_flags_per_owner() {
        let config = resolve_with(
            "[quotas]\nopen_sessions = 8\n[quotas.owners.bob]\npending_tasks = 10\n",
            &[
                "--owner-quota",
                "carol.connections=2",
                "--quota",
                "input_bytes=4096",
            ],
        )
        .unwrap();
        assert_eq!(config.quotas.of("alice").open_sessions, 8);
        assert_eq!(config.quotas.of("alice").input_bytes, 4096);
        assert_eq!(config.quotas.of("bob").pending_tasks, 10);
        assert_eq!(config.quotas.of("bob").open_sessions, 8);
        assert_eq!(config.quotas.of("carol").connections, 2);
        let err = resolve_with("[quotas]\nsessions = 8\n", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown quota `sessions`"),
            "{err:#}"
        );
        let err = resolve_with("", &["--quota", "connections=0"]).unwrap_err();
        assert!(format!("{err:#}").contains("between 1 and"), "{err:#}");
    }

    #[test]
    fn owner_uid_range_and_groups_resolve_and_bad_ones_are_named() {
        let config = resolve_with("", &[]).unwrap();
        assert_eq!(config.owner_uid_range, crate::owner_uids::UID_RANGE_DEFAULT);
        let config = resolve_with(
            "owner_uid_range = \"70000-70100\"\n[groups]\nlab = [\"alice\", \"carol\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.owner_uid_range.to_string(), "70000-70100");
        assert_eq!(config.groups["lab"], vec!["alice", "carol"]);
        let config = resolve_with(
            "owner_uid_range = \"70000-70100\"\n",
            &["--owner-uid-range", "80000-80001"],
        )
        .unwrap();
        assert_eq!(config.owner_uid_range.first, 80_000);
        let err = resolve_with("owner_uid_range = \"0-100\"\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("owner_uid_range"), "{err:#}");
        let err = resolve_with("[groups]\nlab = [\"a b\"]\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("[groups] lab"), "{err:#}");
    }
}
