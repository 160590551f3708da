//! The cluster file (`cluster.toml`) and what it resolves to: one [`Member`] per role on a
//! host (the head, then each node), each with its SSH target, its folders and the command
//! line its daemon runs with.
//!
//! Every path in the file that names something on *this* machine (`identity_file`,
//! `config_file`, `known_hosts_file`, `state_dir`, `binaries.dir` when the source is
//! `local`) is taken relative to the file's folder, and `~/` is the user's home. Remote
//! paths (`install_dir`, `data_dir`, `log_dir`) must be absolute.

use flame_protocol::ready::Daemon;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest cluster file read; anything bigger is not one.
pub const CLUSTER_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// The head's port when the file names none.
pub const DEFAULT_HEAD_PORT: u16 = 7470;
/// Where binaries go on the hosts when the file names no `install_dir`.
pub const DEFAULT_INSTALL_DIR: &str = "/opt/flame/bin";
/// Where the daemons keep their state when the file names no `data_dir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/flame";
/// Where the daemons' logs go when the file names no `log_dir`.
pub const DEFAULT_LOG_DIR: &str = "/var/log/flame";
/// Bound on establishing one SSH connection, when the file names none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one remote command (other than copies and waits, which have their own), when
/// the file names none.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Hosts worked on at once, when the file names no `ssh.parallel`.
pub const DEFAULT_PARALLEL: usize = 16;
/// Most hosts worked on at once, whatever the file says: each takes an `ssh` master
/// process and a few file descriptors here.
pub const PARALLEL_MAX: usize = 256;
/// Most members (head and nodes) one file may name.
pub const MEMBERS_MAX: usize = 4096;

/// A cluster file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`CLUSTER_FILE_BYTES_MAX`].
    #[error("{} is larger than {CLUSTER_FILE_BYTES_MAX} bytes: not a cluster file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML for a cluster file.
    #[error("{} is not a valid cluster file: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the line and the field.
        message: String,
    },
    /// A field has a value that cannot be used.
    #[error("{} field `{field}`: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `nodes[2].name`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// `ssh` settings; each host may override `user`, `port` and `identity_file`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshFile {
    /// The remote user (`ssh -l`); default: what `~/.ssh/config` says, else the local user.
    pub user: Option<String>,
    /// The port (`ssh -p`); default: what `~/.ssh/config` says, else 22.
    pub port: Option<u16>,
    /// A private key (`ssh -i`); default: the ssh-agent and ssh's own defaults.
    pub identity_file: Option<PathBuf>,
    /// An ssh configuration file used instead of `~/.ssh/config` (`ssh -F`).
    pub config_file: Option<PathBuf>,
    /// A known-hosts file used instead of `~/.ssh/known_hosts`.
    pub known_hosts_file: Option<PathBuf>,
    /// `yes` (the host key must be known), `accept-new` (the default: record a new host's
    /// key, refuse a changed one) or `no`.
    pub strict_host_key_checking: Option<String>,
    /// Bound on connecting, e.g. `10s`.
    pub connect_timeout: Option<String>,
    /// Bound on each remote command, e.g. `60s`; copies and start-up waits have their own.
    pub command_timeout: Option<String>,
    /// More `ssh -o` options, `Key=Value` each, e.g. `["ProxyJump=bastion"]`.
    #[serde(default)]
    pub options: Vec<String>,
    /// Hosts worked on at once.
    pub parallel: Option<usize>,
}

/// Where things go on the hosts; each host may override any of them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsFile {
    /// The binaries (when copied from the local build).
    pub install_dir: Option<String>,
    /// State: the head's store and CA under `head/`, the node's certificate under `node/`.
    pub data_dir: Option<String>,
    /// The daemons' logs.
    pub log_dir: Option<String>,
}

/// Where the binaries come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinariesFile {
    /// `local` (the default): copy them from this machine's build, only those whose
    /// checksum differs. `installed`: they are on the hosts already (packages).
    pub source: Option<String>,
    /// `local`: the folder to copy from (default: the running `flame`'s own folder).
    /// `installed`: the folder they are in on every host (default: found on `PATH`).
    pub dir: Option<PathBuf>,
}

/// How the daemons run on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ManagerChoice {
    /// systemd units where systemd runs the host, else supervised background processes.
    #[default]
    Auto,
    /// Always systemd units.
    Systemd,
    /// Always supervised background processes (`flame cluster supervise`).
    Supervisor,
}

/// The `[head]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadFile {
    /// Host name or address to reach over SSH.
    pub host: String,
    /// The head's UDP port.
    pub port: Option<u16>,
    /// The listen address, default `0.0.0.0:PORT`.
    pub listen: Option<String>,
    /// The address nodes and clients use, default `HOST:PORT`.
    pub address: Option<String>,
    /// More `flame-head` arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Overrides of the `[ssh]` and `[paths]` settings.
    #[serde(flatten)]
    pub host_settings: HostSettings,
}

/// A `[[nodes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Host name or address to reach over SSH.
    pub host: String,
    /// The node's name in the cluster, default the host.
    pub name: Option<String>,
    /// Labels that application selectors match (`flame-node --label`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Cpus offered (`--cpus`), default: detected.
    pub cpus: Option<f64>,
    /// Memory offered (`--memory`, e.g. `8GiB`), default: detected.
    pub memory: Option<String>,
    /// GPU indices offered (`--gpus`, e.g. `0,1` or `none`), default: detected.
    pub gpus: Option<String>,
    /// More `flame-node` arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Overrides of the `[ssh]` and `[paths]` settings.
    #[serde(flatten)]
    pub host_settings: HostSettings,
}

/// What a host may override.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HostSettings {
    /// The remote user.
    pub user: Option<String>,
    /// The SSH port.
    pub ssh_port: Option<u16>,
    /// The private key.
    pub identity_file: Option<PathBuf>,
    /// See [`PathsFile::install_dir`].
    pub install_dir: Option<String>,
    /// See [`PathsFile::data_dir`].
    pub data_dir: Option<String>,
    /// See [`PathsFile::log_dir`].
    pub log_dir: Option<String>,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// The cluster's name: it names the local folder the credentials go to and the systemd
    /// units.
    pub name: String,
    /// Where `up` writes the cluster's CA certificate and admin token, default
    /// `~/.flame/clusters/NAME`.
    pub state_dir: Option<PathBuf>,
    /// `auto`, `systemd` or `supervisor`.
    #[serde(default)]
    pub service_manager: ManagerChoice,
    #[serde(default)]
    pub ssh: SshFile,
    #[serde(default)]
    pub paths: PathsFile,
    #[serde(default)]
    pub binaries: BinariesFile,
    pub head: HeadFile,
    #[serde(default)]
    pub nodes: Vec<NodeFile>,
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `flame-head`.
    Head,
    /// `flame-node`.
    Node,
}

impl Role {
    /// `head` or `node`: the role's folder under the data directory and its file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Head => "head",
            Role::Node => "node",
        }
    }

    /// The daemon's binary.
    pub fn binary(self) -> &'static str {
        match self {
            Role::Head => "flame-head",
            Role::Node => "flame-node",
        }
    }

    /// The daemon, as the ready-line contract names it.
    pub fn daemon(self) -> Daemon {
        match self {
            Role::Head => Daemon::Head,
            Role::Node => Daemon::Node,
        }
    }

    /// What the daemon prints on stdout once it serves (see [`flame_protocol::ready`]).
    pub fn ready_prefix(self) -> &'static str {
        self.daemon().ready_prefix()
    }
}

/// How to reach a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// Host name or address.
    pub host: String,
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity_file: Option<PathBuf>,
}

/// Cluster-wide SSH settings.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub config_file: Option<PathBuf>,
    pub known_hosts_file: Option<PathBuf>,
    /// `yes`, `accept-new` or `no`.
    pub strict_host_key_checking: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// `Key=Value` each.
    pub options: Vec<String>,
    pub parallel: usize,
}

/// Where the binaries come from, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinarySource {
    /// Copied from this folder here.
    Local(PathBuf),
    /// On the hosts already: in this folder, or found on `PATH` when `None`.
    Installed(Option<String>),
}

/// One role on one host.
#[derive(Debug, Clone)]
pub struct Member {
    pub role: Role,
    /// `head`, or the node's name.
    pub name: String,
    pub ssh: SshTarget,
    pub install_dir: String,
    pub data_dir: String,
    pub log_dir: String,
    /// The daemon's arguments after its binary, given the data and log folders.
    pub args: Vec<String>,
}

impl Member {
    /// `NAME (HOST)`, how messages name a member.
    pub fn label(&self) -> String {
        if self.name == self.ssh.host {
            self.name.clone()
        } else {
            format!("{} ({})", self.name, self.ssh.host)
        }
    }

    /// The role's own folder under the data directory.
    pub fn role_dir(&self) -> String {
        format!("{}/{}", self.data_dir, self.role.as_str())
    }
}

/// A resolved cluster file.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub name: String,
    pub state_dir: PathBuf,
    pub manager: ManagerChoice,
    pub ssh: SshSettings,
    pub binaries: BinarySource,
    /// What nodes and clients connect to, `host:port`.
    pub head_address: String,
    /// The head first, then the nodes in file order.
    pub members: Vec<Member>,
}

impl ClusterSpec {
    /// Reads and resolves `path`. `local_bin_dir` is the folder of the running `flame`,
    /// the default source of binaries; `home` the user's home folder, for `~/`.
    pub fn load(
        path: &Path,
        local_bin_dir: Option<&Path>,
        home: Option<&Path>,
    ) -> Result<ClusterSpec, SpecError> {
        let text = read_bounded(path)?;
        let file: ClusterFile = toml::from_str(&text).map_err(|e| SpecError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        resolve(file, path, local_bin_dir, home)
    }

    /// The head.
    pub fn head(&self) -> &Member {
        // `resolve` puts the head first, always.
        &self.members[0]
    }
}

fn read_bounded(path: &Path) -> Result<String, SpecError> {
    use std::io::Read as _;
    let read = |source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    file.take(CLUSTER_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > CLUSTER_FILE_BYTES_MAX {
        return Err(SpecError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Resolves a parsed file (see [`ClusterSpec::load`]).
pub fn resolve(
    file: ClusterFile,
    path: &Path,
    local_bin_dir: Option<&Path>,
    home: Option<&Path>,
) -> Result<ClusterSpec, SpecError> {
    let r = Resolver {
        file: &file,
        path,
        base: path.parent().unwrap_or(Path::new(".")),
        home,
    };
    check_name(&file.name).map_err(|m| r.invalid("name", m))?;
    if file.nodes.len() + 1 > MEMBERS_MAX {
        return Err(r.invalid(
            "nodes",
            format!("{} nodes: at most {}", file.nodes.len(), MEMBERS_MAX - 1),
        ));
    }

    let ssh = r.ssh()?;
    let binaries = r.binaries(local_bin_dir)?;
    let state_dir = r.state_dir()?;

    // The head.
    let head = &file.head;
    check_host(&head.host).map_err(|m| r.invalid("head.host", m))?;
    let port = head.port.unwrap_or(DEFAULT_HEAD_PORT);
    let listen = head
        .listen
        .clone()
        .unwrap_or_else(|| format!("0.0.0.0:{port}"));
    let head_address = head
        .address
        .clone()
        .unwrap_or_else(|| format!("{}:{port}", bracket_v6(&head.host)));
    let address_host = host_of(&head_address)
        .ok_or_else(|| r.invalid("head.address", format!("`{head_address}` is not host:port")))?;

    let mut members = Vec::with_capacity(file.nodes.len() + 1);
    let hs = r.settings("head", &head.host_settings)?;
    let install_dir = installed_dir(&binaries, &hs.install_dir);
    let mut head_args = vec![
        "--data-dir".to_string(),
        format!("{}/head", hs.data_dir),
        "--listen".to_string(),
        listen,
        "--tls-san".to_string(),
        unbracket(&head.host).to_string(),
    ];
    if unbracket(&head.host) != address_host {
        head_args.extend(["--tls-san".to_string(), address_host.to_string()]);
    }
    head_args.extend(head.args.iter().cloned());
    members.push(hs.member(Role::Head, "head", &head.host, install_dir, head_args));

    let mut names = BTreeSet::new();
    for (i, node) in file.nodes.iter().enumerate() {
        members.push(r.node(i, node, &head_address, &binaries, &mut names)?);
    }

    Ok(ClusterSpec {
        name: file.name,
        state_dir,
        manager: file.service_manager,
        ssh,
        binaries,
        head_address,
        members,
    })
}

/// What resolving a file needs besides the file: where it is (relative local paths and
/// errors) and the user's home (`~/`).
struct Resolver<'a> {
    file: &'a ClusterFile,
    path: &'a Path,
    base: &'a Path,
    home: Option<&'a Path>,
}

impl Resolver<'_> {
    fn invalid(&self, field: &str, message: String) -> SpecError {
        SpecError::Invalid {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message,
        }
    }

    /// A path on this machine, relative to the file's folder, `~/` the user's home.
    fn local(&self, p: &Path) -> PathBuf {
        local_path(self.base, self.home, p)
    }

    fn duration(
        &self,
        field: &str,
        value: &Option<String>,
        default: Duration,
    ) -> Result<Duration, SpecError> {
        match value {
            None => Ok(default),
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                self.invalid(field, format!("`{text}` is not a duration like 10s: {e}"))
            }),
        }
    }

    /// The `[ssh]` table.
    fn ssh(&self) -> Result<SshSettings, SpecError> {
        let strict = self
            .file
            .ssh
            .strict_host_key_checking
            .clone()
            .unwrap_or_else(|| "accept-new".to_string());
        if !["yes", "accept-new", "no"].contains(&strict.as_str()) {
            return Err(self.invalid(
                "ssh.strict_host_key_checking",
                format!("`{strict}`: expected yes, accept-new or no"),
            ));
        }
        for (i, option) in self.file.ssh.options.iter().enumerate() {
            let well_formed = option.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric())
            });
            if !well_formed || option.contains('\n') {
                return Err(self.invalid(
                    &format!("ssh.options[{i}]"),
                    format!("`{option}` is not `Key=Value`"),
                ));
            }
        }
        let parallel = self.file.ssh.parallel.unwrap_or(DEFAULT_PARALLEL);
        if parallel == 0 || parallel > PARALLEL_MAX {
            return Err(self.invalid(
                "ssh.parallel",
                format!("{parallel}: expected 1 to {PARALLEL_MAX}"),
            ));
        }
        Ok(SshSettings {
            config_file: self.file.ssh.config_file.as_deref().map(|p| self.local(p)),
            known_hosts_file: self
                .file
                .ssh
                .known_hosts_file
                .as_deref()
                .map(|p| self.local(p)),
            strict_host_key_checking: strict,
            connect_timeout: self.duration(
                "ssh.connect_timeout",
                &self.file.ssh.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            command_timeout: self.duration(
                "ssh.command_timeout",
                &self.file.ssh.command_timeout,
                DEFAULT_COMMAND_TIMEOUT,
            )?,
            options: self.file.ssh.options.clone(),
            parallel,
        })
    }

    /// Where the binaries come from (`[binaries]`); `local_bin_dir` is the running
    /// `flame`'s folder, the default for `local`.
    fn binaries(&self, local_bin_dir: Option<&Path>) -> Result<BinarySource, SpecError> {
        let binaries = match self.file.binaries.source.as_deref().unwrap_or("local") {
            "local" => match (&self.file.binaries.dir, local_bin_dir) {
                (Some(dir), _) => BinarySource::Local(self.local(dir)),
                (None, Some(dir)) => BinarySource::Local(dir.to_path_buf()),
                (None, None) => {
                    return Err(self.invalid(
                        "binaries.dir",
                        "the folder of the running flame is unknown; name one".to_string(),
                    ))
                }
            },
            "installed" => BinarySource::Installed(match &self.file.binaries.dir {
                None => None,
                Some(dir) => Some(
                    remote_dir(&dir.to_string_lossy())
                        .map_err(|m| self.invalid("binaries.dir", m))?,
                ),
            }),
            other => {
                return Err(self.invalid(
                    "binaries.source",
                    format!("`{other}`: expected local or installed"),
                ))
            }
        };
        Ok(binaries)
    }

    /// The local folder for the client's credentials.
    fn state_dir(&self) -> Result<PathBuf, SpecError> {
        let state_dir = match &self.file.state_dir {
            Some(dir) => self.local(dir),
            None => self
                .home
                .map(|h| h.join(".flame/clusters").join(&self.file.name))
                .ok_or_else(|| {
                    self.invalid(
                        "state_dir",
                        "HOME is unset, so the default ~/.flame/clusters/NAME is unknown; name one"
                            .to_string(),
                    )
                })?,
        };
        Ok(state_dir)
    }

    /// One host's settings (`field` names its table in errors), over the global ones.
    fn settings(&self, field: &str, s: &HostSettings) -> Result<Settings, SpecError> {
        let dir = |key: &str, value: &Option<String>, global: &Option<String>, default: &str| {
            let text = value.as_deref().or(global.as_deref()).unwrap_or(default);
            remote_dir(text).map_err(|m| self.invalid(&format!("{field}.{key}"), m))
        };
        Ok(Settings {
            user: s.user.clone().or_else(|| self.file.ssh.user.clone()),
            port: s.ssh_port.or(self.file.ssh.port),
            identity_file: s
                .identity_file
                .as_deref()
                .or(self.file.ssh.identity_file.as_deref())
                .map(|p| self.local(p)),
            install_dir: dir(
                "install_dir",
                &s.install_dir,
                &self.file.paths.install_dir,
                DEFAULT_INSTALL_DIR,
            )?,
            data_dir: dir(
                "data_dir",
                &s.data_dir,
                &self.file.paths.data_dir,
                DEFAULT_DATA_DIR,
            )?,
            log_dir: dir(
                "log_dir",
                &s.log_dir,
                &self.file.paths.log_dir,
                DEFAULT_LOG_DIR,
            )?,
        })
    }

    /// Node `i` of the file, as a member; `names` holds the names taken so far.
    fn node(
        &self,
        i: usize,
        node: &NodeFile,
        head_address: &str,
        binaries: &BinarySource,
        names: &mut BTreeSet<String>,
    ) -> Result<Member, SpecError> {
        let field = format!("nodes[{i}]");
        check_host(&node.host).map_err(|m| self.invalid(&format!("{field}.host"), m))?;
        let name = node
            .name
            .clone()
            .unwrap_or_else(|| unbracket(&node.host).to_lowercase());
        check_name(&name).map_err(|m| self.invalid(&format!("{field}.name"), m))?;
        if !names.insert(name.clone()) {
            return Err(self.invalid(
                &format!("{field}.name"),
                format!("`{name}` names two nodes"),
            ));
        }
        let ns = self.settings(&field, &node.host_settings)?;
        let role_dir = format!("{}/node", ns.data_dir);
        let mut args = vec![
            "--head".to_string(),
            head_address.to_string(),
            "--name".to_string(),
            name.clone(),
            "--tls-dir".to_string(),
            format!("{role_dir}/tls"),
            "--work-dir".to_string(),
            format!("{role_dir}/work"),
            "--runtime-dir".to_string(),
            format!("{role_dir}/run"),
            "--log-dir".to_string(),
            format!("{}/executors", ns.log_dir),
        ];
        if let Some(cpus) = node.cpus {
            if !(cpus > 0.0 && cpus.is_finite()) {
                return Err(self.invalid(
                    &format!("{field}.cpus"),
                    format!("{cpus}: expected more than 0"),
                ));
            }
            args.extend(["--cpus".to_string(), cpus.to_string()]);
        }
        if let Some(memory) = &node.memory {
            args.extend(["--memory".to_string(), memory.clone()]);
        }
        if let Some(gpus) = &node.gpus {
            args.extend(["--gpus".to_string(), gpus.clone()]);
        }
        for (k, v) in &node.labels {
            args.extend(["--label".to_string(), format!("{k}={v}")]);
        }
        args.extend(node.args.iter().cloned());
        let install_dir = installed_dir(binaries, &ns.install_dir);
        Ok(ns.member(Role::Node, &name, &node.host, install_dir, args))
    }
}

/// A host's settings, resolved.
struct Settings {
    user: Option<String>,
    port: Option<u16>,
    identity_file: Option<PathBuf>,
    install_dir: String,
    data_dir: String,
    log_dir: String,
}

impl Settings {
    fn member(
        &self,
        role: Role,
        name: &str,
        host: &str,
        install_dir: String,
        args: Vec<String>,
    ) -> Member {
        Member {
            role,
            name: name.to_string(),
            ssh: SshTarget {
                host: unbracket(host).to_string(),
                user: self.user.clone(),
                port: self.port,
                identity_file: self.identity_file.clone(),
            },
            install_dir,
            data_dir: self.data_dir.clone(),
            log_dir: self.log_dir.clone(),
            args,
        }
    }
}

/// Where a member's binaries are: its install folder when copied; the configured folder
/// when installed (an empty string: to be found on the host's `PATH`, see the probe).
fn installed_dir(source: &BinarySource, install_dir: &str) -> String {
    match source {
        BinarySource::Local(_) => install_dir.to_string(),
        BinarySource::Installed(Some(dir)) => dir.clone(),
        BinarySource::Installed(None) => String::new(),
    }
}

/// A local path from the file: `~/` is `home`, a relative one is taken from `base`.
fn local_path(base: &Path, home: Option<&Path>, p: &Path) -> PathBuf {
    if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), home) {
        return home.join(rest);
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// A remote folder: absolute, no trailing slash, nothing a shell line or a systemd unit
/// would take apart (newlines, NULs).
fn remote_dir(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!("`{text}` is not an absolute path"));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err("a path with a control character".to_string());
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_string())
}

/// Cluster and node names: letters, digits, `.`, `_` and `-`, up to 63 characters, so that
/// they fit file names, unit names and certificates.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}`: use 1 to 63 letters, digits, `.`, `_` or `-`, not starting with `.` or `-`"
        ))
    }
}

/// A host: a name or an address, nothing ssh would read as an option or a shell would split.
fn check_host(host: &str) -> Result<(), String> {
    let ok = !host.is_empty()
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:[]%".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a host name or address"))
    }
}

/// `[v6]` for an IPv6 address, so that `:port` can follow.
fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The host part of `host:port` (`[v6]:port`).
pub fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = unbracket(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ClusterSpec, SpecError> {
        let file: ClusterFile = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: PathBuf::from("/etc/c/cluster.toml"),
            message: e.to_string(),
        })?;
        resolve(
            file,
            Path::new("/etc/c/cluster.toml"),
            Some(Path::new("/build")),
            Some(Path::new("/home/u")),
        )
    }

    #[test]
    fn a_full_file_resolves_with_overrides_and_defaults() {
        let spec = load(
            r#"
name = "lab"
[ssh]
user = "ops"
identity_file = "~/.ssh/lab"
known_hosts_file = "known_hosts"
connect_timeout = "5s"
[paths]
data_dir = "/srv/flame/"
[head]
host = "10.0.0.1"
port = 7000
[[nodes]]
host = "10.0.0.2"
name = "gpu-1"
labels = { zone = "a" }
cpus = 2.5
ssh_port = 2222
install_dir = "/opt/other"
[[nodes]]
host = "Node3.lab"
"#,
        )
        .unwrap();
        assert_eq!(spec.head_address, "10.0.0.1:7000");
        assert_eq!(spec.state_dir, PathBuf::from("/home/u/.flame/clusters/lab"));
        assert_eq!(spec.binaries, BinarySource::Local(PathBuf::from("/build")));
        assert_eq!(spec.ssh.connect_timeout, Duration::from_secs(5));
        assert_eq!(spec.ssh.strict_host_key_checking, "accept-new");
        assert_eq!(
            spec.ssh.known_hosts_file,
            Some(PathBuf::from("/etc/c/known_hosts"))
        );
        let head = spec.head();
        assert_eq!(head.role, Role::Head);
        assert_eq!(head.data_dir, "/srv/flame");
        assert_eq!(head.install_dir, DEFAULT_INSTALL_DIR);
        assert_eq!(
            head.args,
            [
                "--data-dir",
                "/srv/flame/head",
                "--listen",
                "0.0.0.0:7000",
                "--tls-san",
                "10.0.0.1"
            ]
        );
        let gpu = &spec.members[1];
        assert_eq!(gpu.label(), "gpu-1 (10.0.0.2)");
        assert_eq!(gpu.ssh.port, Some(2222));
        assert_eq!(gpu.ssh.user.as_deref(), Some("ops"));
        assert_eq!(
            gpu.ssh.identity_file,
            Some(PathBuf::from("/home/u/.ssh/lab"))
        );
        assert_eq!(gpu.install_dir, "/opt/other");
        let args = gpu.args.join(" ");
        assert!(
            args.starts_with("--head 10.0.0.1:7000 --name gpu-1 --tls-dir /srv/flame/node/tls"),
            "{args}"
        );
        assert!(args.contains("--cpus 2.5"), "{args}");
        assert!(args.ends_with("--label zone=a"), "{args}");
        // The default name is the host, lower-cased.
        assert_eq!(spec.members[2].name, "node3.lab");
    }

    #[test]
    fn mistakes_name_the_field() {
        let err = |text: &str| load(text).unwrap_err().to_string();
        let e = err("name = \"x\"\n[head]\nhost = \"h\"\nport = 1\nbogus = 2\n");
        assert!(e.contains("bogus"), "{e}");
        let e = err("name = \"x\"\n[head]\nhost = \"h\"\n[[nodes]]\nhost = \"a\"\nname = \"n\"\n[[nodes]]\nhost = \"b\"\nname = \"n\"\n");
        assert!(
            e.contains("nodes[1].name") && e.contains("two nodes"),
            "{e}"
        );
        let e = err("name = \"x\"\n[paths]\ndata_dir = \"rel\"\n[head]\nhost = \"h\"\n");
        assert!(e.contains("head.data_dir") && e.contains("absolute"), "{e}");
        let e = err("name = \"x\"\n[ssh]\nconnect_timeout = \"soon\"\n[head]\nhost = \"h\"\n");
        assert!(e.contains("ssh.connect_timeout"), "{e}");
        let e = err("name = \"a b\"\n[head]\nhost = \"h\"\n");
        assert!(e.contains("field `name`"), "{e}");
        let e = err("name = \"x\"\n[head]\nhost = \"-oProxyCommand=x\"\n");
        assert!(e.contains("head.host"), "{e}");
        let e = err("name = \"x\"\n[ssh]\noptions = [\"nokey\"]\n[head]\nhost = \"h\"\n");
        assert!(e.contains("ssh.options[0]"), "{e}");
    }

    #[test]
    fn installed_binaries_use_the_configured_folder_or_path() {
        let spec = load("name = \"x\"\n[binaries]\nsource = \"installed\"\n[head]\nhost = \"h\"\n")
            .unwrap();
        assert_eq!(spec.binaries, BinarySource::Installed(None));
        assert_eq!(spec.head().install_dir, "");
        let spec = load("name = \"x\"\n[binaries]\nsource = \"installed\"\ndir = \"/usr/bin\"\n[head]\nhost = \"h\"\n").unwrap();
        assert_eq!(spec.head().install_dir, "/usr/bin");
    }

    #[test]
    fn ipv6_heads_get_brackets() {
        let spec = load("name = \"x\"\n[head]\nhost = \"fd00::1\"\n").unwrap();
        assert_eq!(spec.head_address, "[fd00::1]:7470");
        assert_eq!(host_of(&spec.head_address), Some("fd00::1"));
        assert_eq!(host_of("h:notaport"), None);
    }
}
