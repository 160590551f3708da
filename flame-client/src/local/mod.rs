//! A one-machine cluster: a `flame-head` and a `flame-node` run as child processes.
//!
//! Used by `flame local`, `flame ping --local`, tests and examples. The children run in
//! their own process group (so a Ctrl-C at the terminal reaches only the parent, which then
//! stops them in order: node, then head) and get `SIGKILL` when the parent dies, whether
//! it exits, panics or is killed, so none outlives it.
//!
//! Starting takes these steps, each bounded by [`LocalOptions::ready_timeout`]:
//!
//! 1. `flame-head --data-dir D --listen L init`, unless `D/tls/ca.crt` shows that it ran
//!    before: the cluster CA (`D/tls/ca.crt`) and an admin token (`D/admin.token`).
//! 2. `flame-head --data-dir D --listen L`, until its ready line says where it listens
//!    ([`flame_protocol::ready`]).
//! 3. `flame-head --data-dir D --listen ADDR token create --node --ttl 10m`: a join token,
//!    written to `D/node/join.token` (mode 0600, never on a command line) and removed
//!    after the next step.
//! 4. `flame-node join --token-file D/node/join.token --head ADDR --name NAME --tls-dir
//!    D/node/tls`: the node's certificate, signed by the cluster CA.
//! 5. `flame-node --head ADDR --ca-file D/tls/ca.crt --name NAME --tls-dir D/node/tls ...`,
//!    until its ready line says the head registered it.
//!
//! The join token is made with the head's own command rather than through a [`Client`]
//! so that every step is a child process, and stand-in scripts can play the binaries in
//! tests. Clients of the cluster act as its admin, with the token in `D/admin.token`.
//!
//! The children themselves (starting, waiting for the ready line, stopping, quoting the
//! end of a log) are in `child.rs`.
//!
//! [`Client`]: crate::Client

mod child;

pub use child::die_with_parent;

use crate::config::{self, ClientConfig, ConfigError};
use child::{child_command, describe_status, log_tail, text_tail, Managed};
use flame_protocol::auth::Secret;
use flame_protocol::ready::Daemon;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The head binary's name.
pub const HEAD_BINARY: &str = "flame-head";
/// The node binary's name.
pub const NODE_BINARY: &str = "flame-node";
/// Default bound on each child's start-up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time a child has to exit after `SIGTERM` before it gets `SIGKILL`.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest stdout line read while waiting for a ready line; longer ones are split.
pub const READY_LINE_BYTES_MAX: u64 = 4096;
/// Bytes of a child's log quoted when it fails to start.
pub const LOG_TAIL_BYTES_MAX: u64 = 4096;
/// Lines of a child's log quoted when it fails to start.
pub const LOG_TAIL_LINES_MAX: usize = 20;
/// Lifetime of the node join token `start` makes; it is used at once.
pub const JOIN_TOKEN_TTL: &str = "10m";

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Where the head and node keep their state and logs; a temporary folder, removed when
    /// the cluster is dropped, when `None`.
    pub data_dir: Option<PathBuf>,
    /// The head's listen address.
    pub listen: String,
    /// The folder holding `flame-head` and `flame-node`. When `None` they are looked for
    /// next to the running executable (and its parent, for test binaries in `deps/`), then
    /// on `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// The node's name.
    pub node_name: String,
    /// Bound on each child's start-up.
    pub ready_timeout: Duration,
    /// Time each child has to exit after `SIGTERM`.
    pub stop_grace: Duration,
    /// Whole cpus the node offers (`flame-node --cpus`); `None`: what it detects. An
    /// executor of the built-in `ping` takes one cpu, so this bounds how many run at once.
    pub node_cpus: Option<u32>,
    /// More nodes on this machine, named `<node_name>-1`, `-2`, ...: each its own agent,
    /// folders, cgroup and object cache (for `flame bench --case broadcast`).
    pub extra_nodes: u32,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            data_dir: None,
            listen: "127.0.0.1:0".to_string(),
            bin_dir: None,
            node_name: "local".to_string(),
            ready_timeout: READY_TIMEOUT,
            stop_grace: STOP_GRACE,
            node_cpus: None,
            extra_nodes: 0,
        }
    }
}

/// A local cluster that failed to start or to stop.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A binary is neither next to the executable nor on `PATH`.
    #[error("cannot find `{name}` in {searched}")]
    BinaryNotFound {
        /// The binary.
        name: &'static str,
        /// Where it was looked for, for display.
        searched: String,
    },
    /// A file or folder of the cluster could not be set up.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `cannot create`.
        what: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A child could not be started.
    #[error("cannot start {}: {source}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A child exited before it said it was ready.
    #[error("{name} exited with {status} before it was ready; the end of {}:\n{tail}", log.display())]
    Exited {
        /// The binary's name.
        name: &'static str,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A child did not say it was ready in time.
    #[error("{name} was not ready within {}; the end of {}:\n{tail}", humantime::format_duration(*timeout), log.display())]
    NotReady {
        /// The binary's name.
        name: &'static str,
        /// The bound.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
        /// The last lines of its log.
        tail: String,
    },
    /// A one-shot command (`flame-head init`, `flame-head token create`, `flame-node
    /// join`) failed.
    #[error("`{command}` failed with {status}; its stderr:\n{stderr}")]
    Command {
        /// The command, without its arguments.
        command: String,
        /// How it exited.
        status: String,
        /// The end of its stderr, indented.
        stderr: String,
    },
    /// A one-shot command did not finish in time; it was killed.
    #[error("`{command}` did not finish within {}", humantime::format_duration(*timeout))]
    CommandTimeout {
        /// The command, without its arguments.
        command: String,
        /// The bound.
        timeout: Duration,
    },
    /// The admin token `flame-head init` wrote, or the join token `flame-head token create`
    /// printed, cannot be used. The message never shows the token.
    #[error("{0}")]
    Token(ConfigError),
    /// The head said it was ready but its CA certificate is not where expected.
    #[error("flame-head is ready but its CA certificate {} is missing", path.display())]
    MissingCaFile {
        /// The expected path.
        path: PathBuf,
    },
    /// The cluster stopped, but not cleanly.
    #[error("the local cluster did not stop cleanly: {}", problems.join("; "))]
    Unclean {
        /// One line per child that misbehaved.
        problems: Vec<String>,
    },
}

/// How a child ended on its own, as reported by [`LocalCluster::exited`].
#[derive(Debug, Clone)]
pub struct ChildExit {
    /// The binary's name.
    pub name: &'static str,
    /// How it exited, for display.
    pub status: String,
    /// Its log file.
    pub log: PathBuf,
    /// The last lines of its log.
    pub tail: String,
}

/// A running head and node. Dropping it kills both (`SIGKILL`); [`LocalCluster::shutdown`]
/// stops them gracefully.
#[derive(Debug)]
pub struct LocalCluster {
    // Children before the data folder: fields drop in order, so the processes are killed
    // before a temporary data folder is removed.
    /// Nodes beyond the first ([`LocalOptions::extra_nodes`]).
    extra: Vec<Managed>,
    node: Managed,
    head: Managed,
    head_addr: String,
    node_name: String,
    ca_file: PathBuf,
    token_file: PathBuf,
    /// The admin token; `Debug` hides it.
    token: Secret,
    stop_grace: Duration,
    data_dir: DataDir,
    /// The executors' work and socket folders, outside the head's private data folder:
    /// executors may run as other uids (each owner's own, when started as root), which
    /// must reach them. Removed with the cluster.
    _exec_dir: tempfile::TempDir,
}

#[derive(Debug)]
enum DataDir {
    Kept(PathBuf),
    Temporary(tempfile::TempDir),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Kept(p) => p,
            DataDir::Temporary(t) => t.path(),
        }
    }
}

impl LocalCluster {
    /// Initialises the data folder if needed, starts `flame-head` and waits until it
    /// listens, joins the node, then starts `flame-node` and waits until it is registered
    /// (see the module notes). Each step is bounded by `opts.ready_timeout`.
    pub async fn start(opts: LocalOptions) -> Result<LocalCluster, LocalError> {
        let head_bin = find_binary(HEAD_BINARY, opts.bin_dir.as_deref())?;
        let node_bin = find_binary(NODE_BINARY, opts.bin_dir.as_deref())?;
        let data_dir = match &opts.data_dir {
            Some(dir) => {
                create_dir(dir)?;
                DataDir::Kept(dir.clone())
            }
            None => DataDir::Temporary(
                tempfile::Builder::new()
                    .prefix("flame-local-")
                    .tempdir()
                    .map_err(|source| LocalError::Io {
                        what: "cannot create a temporary folder in",
                        path: std::env::temp_dir(),
                        source,
                    })?,
            ),
        };
        let dir = data_dir.path().to_path_buf();
        let ca_file = dir.join("tls").join("ca.crt");
        let token_file = dir.join("admin.token");

        // A kept data folder is initialised once; `init` refuses to run twice.
        if !ca_file.is_file() {
            let init_args: Vec<OsString> = vec![
                "--data-dir".into(),
                dir.clone().into(),
                "--listen".into(),
                opts.listen.clone().into(),
                "init".into(),
            ];
            run_once("flame-head init", &head_bin, &init_args, opts.ready_timeout).await?;
        }
        let token = config::read_token_file(&token_file, "the admin token of `flame-head init`")
            .map_err(LocalError::Token)?;

        let exec_dir = tempfile::Builder::new()
            .prefix("flame-local-exec-")
            .tempdir()
            .map_err(|source| LocalError::Io {
                what: "cannot create a temporary folder in",
                path: std::env::temp_dir(),
                source,
            })?;
        std::fs::set_permissions(
            exec_dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|source| LocalError::Io {
            what: "cannot open to executors the folder",
            path: exec_dir.path().to_path_buf(),
            source,
        })?;
        let head_args: Vec<OsString> = vec![
            "--data-dir".into(),
            dir.clone().into(),
            "--listen".into(),
            opts.listen.clone().into(),
        ];
        let mut head = Managed::spawn(HEAD_BINARY, &head_bin, &head_args, &dir.join("head.log"))?;
        let listening = match head.wait_ready(Daemon::Head, opts.ready_timeout).await {
            Ok(rest) => rest,
            Err(e) => {
                head.stop(opts.stop_grace).await.ok();
                return Err(e);
            }
        };
        let head_addr = connectable(&listening);
        if !ca_file.is_file() {
            head.stop(opts.stop_grace).await.ok();
            return Err(LocalError::MissingCaFile { path: ca_file });
        }

        let started = NodeStart {
            node_bin: &node_bin,
            head_bin: &head_bin,
            dir: &dir,
            head_addr: &head_addr,
            ca_file: &ca_file,
            exec_dir: exec_dir.path(),
            opts: &opts,
        };
        let node = match started.start(&opts.node_name, "node").await {
            Ok(node) => node,
            Err(e) => {
                head.stop(opts.stop_grace).await.ok();
                return Err(e);
            }
        };
        let mut extra = Vec::new();
        for i in 1..=opts.extra_nodes {
            let name = format!("{}-{i}", opts.node_name);
            match started.start(&name, &format!("node-{i}")).await {
                Ok(n) => extra.push(n),
                Err(e) => {
                    for mut n in extra {
                        n.stop(opts.stop_grace).await.ok();
                    }
                    let mut node = node;
                    node.stop(opts.stop_grace).await.ok();
                    head.stop(opts.stop_grace).await.ok();
                    return Err(e);
                }
            }
        }
        Ok(LocalCluster {
            extra,
            node,
            head,
            head_addr,
            node_name: opts.node_name,
            ca_file,
            token_file,
            token,
            stop_grace: opts.stop_grace,
            data_dir,
            _exec_dir: exec_dir,
        })
    }

    /// The address clients connect to.
    pub fn head_addr(&self) -> &str {
        &self.head_addr
    }

    /// The cluster's CA certificate (`D/tls/ca.crt`), for clients.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The file holding the admin token (`D/admin.token`, mode 0600): what clients of this
    /// cluster authenticate with.
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// The admin token. `Debug` and `Display` hide it; [`Secret::expose`] reads it.
    pub fn token(&self) -> &Secret {
        &self.token
    }

    /// The folder with the cluster's state and the `head.log` and `node.log` files.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The process id of `flame-head`, while it runs (e.g. to read its memory use in
    /// `/proc`); `None` once it has been waited for.
    pub fn head_pid(&self) -> Option<u32> {
        self.head.child.id()
    }

    /// The process id of `flame-node`, while it runs; `None` once it has been waited for.
    pub fn node_pid(&self) -> Option<u32> {
        self.node.child.id()
    }

    /// The node's name, as given in [`LocalOptions::node_name`].
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Whether the data folder is removed when the cluster is dropped.
    pub fn is_temporary(&self) -> bool {
        matches!(self.data_dir, DataDir::Temporary(_))
    }

    /// A client configuration for this cluster, as its admin.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.head_addr.clone(), self.ca_file.clone())
            .with_token(self.token.clone())
    }

    /// The environment that points a child process's `flame` (or client library) at this
    /// cluster, as its admin: `FLAME_HEAD`, `FLAME_CA_FILE` and `FLAME_TOKEN_FILE`, and the
    /// other credential variables set empty (which counts as unset), so that none inherited
    /// from this process competes with the token file. The token itself is not in it:
    /// every process could read it there.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = vec![
            (config::ENV_HEAD, OsString::from(&self.head_addr)),
            (config::ENV_CA_FILE, self.ca_file.clone().into_os_string()),
            (
                config::ENV_TOKEN_FILE,
                self.token_file.clone().into_os_string(),
            ),
        ];
        env.extend(CREDENTIAL_ENV_CLEARED.iter().map(|v| (*v, OsString::new())));
        env
    }

    /// The shell line that points another shell's `flame` at this cluster: the
    /// [`LocalCluster::env`] variables, exported or unset.
    pub fn exports(&self) -> String {
        format!(
            "export {}={} {}={} {}={}; unset {}",
            config::ENV_HEAD,
            shell_quote(&self.head_addr),
            config::ENV_CA_FILE,
            shell_quote(&self.ca_file.to_string_lossy()),
            config::ENV_TOKEN_FILE,
            shell_quote(&self.token_file.to_string_lossy()),
            CREDENTIAL_ENV_CLEARED.join(" "),
        )
    }

    /// Waits until the head or the node exits on its own and says which and how. Meant to
    /// be raced against a shutdown signal; cancel-safe.
    pub async fn exited(&mut self) -> ChildExit {
        let (managed, status) = tokio::select! {
            status = self.head.child.wait() => (&self.head, status),
            status = self.node.child.wait() => (&self.node, status),
        };
        ChildExit {
            name: managed.name,
            status: match status {
                Ok(s) => describe_status(s),
                Err(e) => format!("an unknown status ({e})"),
            },
            log: managed.log.clone(),
            tail: log_tail(&managed.log),
        }
    }

    /// Stops the node, then the head: `SIGTERM`, then `SIGKILL` after the grace period.
    /// Both are stopped even when the first one misbehaves; the error lists what went wrong.
    pub async fn shutdown(mut self) -> Result<(), LocalError> {
        let mut problems = Vec::new();
        // The nodes first, so that they can release their executors while the head still
        // runs.
        for node in &mut self.extra {
            if let Err(p) = node.stop(self.stop_grace).await {
                problems.push(p);
            }
        }
        if let Err(p) = self.node.stop(self.stop_grace).await {
            problems.push(p);
        }
        if let Err(p) = self.head.stop(self.stop_grace).await {
            problems.push(p);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LocalError::Unclean { problems })
        }
    }
}

/// What starting one node needs: the binaries, the cluster's folders and head.
struct NodeStart<'a> {
    node_bin: &'a Path,
    head_bin: &'a Path,
    dir: &'a Path,
    head_addr: &'a str,
    ca_file: &'a Path,
    exec_dir: &'a Path,
    opts: &'a LocalOptions,
}

impl NodeStart<'_> {
    /// Joins node `name` and starts it, its folders under `folder` (in the data folder)
    /// and `exec_dir`; waits until it is registered.
    async fn start(&self, name: &str, folder: &str) -> Result<Managed, LocalError> {
        let opts = self.opts;
        let work_dir = self.dir.join(folder);
        let tls_dir = work_dir.join("tls");
        create_dir(&work_dir)?;
        join_node(
            self.head_bin,
            self.node_bin,
            self.dir,
            self.head_addr,
            name,
            &tls_dir,
            opts.ready_timeout,
        )
        .await?;
        let exec_dir = self.exec_dir.join(folder);
        // The first six arguments keep their places: stand-in nodes in tests read them.
        let mut node_args: Vec<OsString> = vec![
            "--head".into(),
            self.head_addr.into(),
            "--ca-file".into(),
            self.ca_file.into(),
            "--name".into(),
            name.into(),
            "--tls-dir".into(),
            tls_dir.clone().into(),
            "--work-dir".into(),
            exec_dir.join("work").into(),
            "--runtime-dir".into(),
            exec_dir.join("run").into(),
            "--log-dir".into(),
            work_dir.join("logs").into(),
            // The node's default identity: started by a user, it runs executors as that
            // user (an unprivileged agent cannot do otherwise); started by root, as each
            // owner's own uid, never as root.
            "--cgroup-root".into(),
            format!("flame-local-{}-{folder}", std::process::id()).into(),
            // Any free port: several local clusters may run on one machine. The object
            // cache spills into the node's own folder.
            "--object-listen".into(),
            "127.0.0.1:0".into(),
            "--object-dir".into(),
            work_dir.join("objects").into(),
        ];
        if let Some(cpus) = opts.node_cpus {
            node_args.push("--cpus".into());
            node_args.push(cpus.to_string().into());
        }
        let log = self.dir.join(format!("{folder}.log"));
        let mut node = Managed::spawn(NODE_BINARY, self.node_bin, &node_args, &log)?;
        if let Err(e) = node.wait_ready(Daemon::Node, opts.ready_timeout).await {
            node.stop(opts.stop_grace).await.ok();
            return Err(e);
        }
        Ok(node)
    }
}

/// Credential variables [`LocalCluster::env`] clears: with `FLAME_TOKEN_FILE` set, any of
/// them would be a conflicting credential (see [`crate::config`]).
const CREDENTIAL_ENV_CLEARED: [&str; 3] = [config::ENV_TOKEN, config::ENV_CERT, config::ENV_KEY];

/// Runs a one-shot child (`what` names it in errors) to its end, bounded by `timeout`,
/// and returns its stdout. A failure quotes the end of its stderr.
async fn run_once(
    what: &str,
    program: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<Vec<u8>, LocalError> {
    let mut command = child_command(program, args);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().map_err(|source| LocalError::Spawn {
        path: program.to_path_buf(),
        source,
    })?;
    // On timeout the future, and with it the child (kill_on_drop), is dropped.
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| LocalError::CommandTimeout {
            command: what.to_string(),
            timeout,
        })?
        .map_err(|source| LocalError::Spawn {
            path: program.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(LocalError::Command {
        command: what.to_string(),
        status: describe_status(output.status),
        stderr: text_tail(&output.stderr),
    })
}

/// Gets the node a certificate: a join token from the running head, handed to `flame-node
/// join` in a 0600 file that is removed afterwards.
async fn join_node(
    head_bin: &Path,
    node_bin: &Path,
    data_dir: &Path,
    head_addr: &str,
    node_name: &str,
    tls_dir: &Path,
    timeout: Duration,
) -> Result<(), LocalError> {
    let create_args: Vec<OsString> = vec![
        "--data-dir".into(),
        data_dir.into(),
        "--listen".into(),
        head_addr.into(),
        "token".into(),
        "create".into(),
        "--node".into(),
        "--ttl".into(),
        JOIN_TOKEN_TTL.into(),
    ];
    let printed = run_once(
        "flame-head token create --node",
        head_bin,
        &create_args,
        timeout,
    )
    .await?;
    // The token is the one line on stdout; kept in a `Secret` from here on.
    let printed = Secret::new(String::from_utf8_lossy(&printed).trim());
    let token = config::check_token(printed, || {
        "the join token `flame-head token create --node` printed".to_string()
    })
    .map_err(LocalError::Token)?;
    let token_file = tls_dir.with_file_name("join.token");
    write_private(&token_file, format!("{}\n", token.expose()).as_bytes())?;
    let join_args: Vec<OsString> = vec![
        "join".into(),
        "--token-file".into(),
        token_file.clone().into(),
        "--head".into(),
        head_addr.into(),
        "--name".into(),
        node_name.into(),
        "--tls-dir".into(),
        tls_dir.into(),
    ];
    let joined = run_once("flame-node join", node_bin, &join_args, timeout).await;
    // Used once; a copy left behind would let anyone who can read it join a node until
    // it expires.
    if let Err(e) = std::fs::remove_file(&token_file) {
        tracing::debug!("cannot remove {}: {e}", token_file.display());
    }
    joined.map(drop)
}

/// Writes `bytes` to a new file at `path` that only its owner may read (mode 0600); an
/// older file there is replaced, since its mode could be wider.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io_err = |what, source| LocalError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot replace", e)),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err("cannot create", e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("cannot write", e))
}

/// A head listening on the unspecified address is reached through loopback.
fn connectable(listening: &str) -> String {
    match listening.parse::<std::net::SocketAddr>() {
        Ok(sa) if sa.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if sa.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, sa.port()).to_string()
        }
        _ => listening.to_string(),
    }
}

fn create_dir(dir: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(dir).map_err(|source| LocalError::Io {
        what: "cannot create",
        path: dir.to_path_buf(),
        source,
    })
}

/// Finds `name` in `bin_dir` when given; otherwise next to the running executable (and in
/// its parent when that is a `deps/` folder of test binaries), then on `PATH`.
pub fn find_binary(name: &'static str, bin_dir: Option<&Path>) -> Result<PathBuf, LocalError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut searched: Vec<String> = Vec::new();
    if let Some(dir) = bin_dir {
        dirs.push(dir.to_path_buf());
        searched.push(dir.display().to_string());
    } else {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
        {
            searched.push(dir.display().to_string());
            let parent = dir
                .parent()
                .filter(|_| dir.file_name().is_some_and(|n| n == "deps"))
                .map(Path::to_path_buf);
            dirs.push(dir);
            dirs.extend(parent);
        }
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        searched.push("PATH".to_string());
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| LocalError::BinaryNotFound {
            name,
            searched: searched.join(" or "),
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Single-quotes `s` for a POSIX shell when it holds anything but safe characters (not
/// `[` or `]`, which a shell would take for a pattern).
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_become_loopback() {
        assert_eq!(connectable("0.0.0.0:7470"), "127.0.0.1:7470");
        assert_eq!(connectable("[::]:7470"), "[::1]:7470");
        assert_eq!(connectable("10.0.0.1:7470"), "10.0.0.1:7470");
        assert_eq!(connectable("head:7470"), "head:7470");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("127.0.0.1:7470"), "127.0.0.1:7470");
        assert_eq!(shell_quote("/tmp/a b/c"), "'/tmp/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("[::1]:7470"), "'[::1]:7470'");
    }

    #[test]
    fn missing_binary_names_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_binary(HEAD_BINARY, Some(dir.path())).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("flame-head"), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }

    #[test]
    fn finds_an_executable_in_bin_dir() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(NODE_BINARY);
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        // Not executable yet: not found.
        assert!(find_binary(NODE_BINARY, Some(dir.path())).is_err());
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_binary(NODE_BINARY, Some(dir.path())).unwrap(), bin);
    }

    fn script(path: &Path, body: &str) {
        std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn sample_token(fill: u8) -> Secret {
        use flame_protocol::auth::{hex, ParsedToken, FINGERPRINT_BYTES, TOKEN_SECRET_BYTES};
        ParsedToken {
            id: hex(&[fill; 8]),
            secret: [fill; TOKEN_SECRET_BYTES],
            ca_fingerprint: [0x5c; FINGERPRINT_BYTES],
        }
        .to_secret()
    }

    /// Stand-ins for the two binaries: the head does `init` (once only, like the real one),
    /// prints a join token for `token create`, and serves; the node checks the join token
    /// file (content and mode), makes its certificate, and serves only with it.
    fn stand_ins(bin: &Path, admin: &Secret, join: &Secret) {
        script(
            &bin.join(HEAD_BINARY),
            &format!(
                r#"D="$2"
case "$5" in
init)
    [ -f "$D/tls/ca.crt" ] && {{ echo "already initialised" >&2; exit 5; }}
    mkdir -p "$D/tls" && echo cert > "$D/tls/ca.crt"
    (umask 077; echo "{admin}" > "$D/admin.token")
    echo "initialised"; exit 0;;
token)
    [ "$4" = "127.0.0.1:7470" ] || {{ echo "bad --listen $4" >&2; exit 9; }}
    echo "token 0a (joins nodes); it is shown only this once:" >&2
    echo "{join}"; exit 0;;
esac
echo "head starting" >&2
echo "flame-head listening on 0.0.0.0:7470"
exec sleep 600
"#,
                admin = admin.expose(),
                join = join.expose()
            ),
        );
        script(
            &bin.join(NODE_BINARY),
            &format!(
                r#"if [ "$1" = join ]; then
    [ "$(stat -c %a "$3")" = 600 ] || {{ echo "token file mode $(stat -c %a "$3")" >&2; exit 9; }}
    [ "$(cat "$3")" = "{join}" ] || {{ echo "wrong join token" >&2; exit 9; }}
    [ "$5" = "127.0.0.1:7470" ] || {{ echo "bad --head $5" >&2; exit 9; }}
    mkdir -p "$9" && echo crt > "$9/node.crt"; exit 0
fi
[ -f "$4" ] || {{ echo "no CA file $4" >&2; exit 9; }}
[ "$7" = "--tls-dir" ] && [ -f "$8/node.crt" ] || {{ echo "no node certificate" >&2; exit 9; }}
echo "flame-node registered as $6"
exec sleep 600
"#,
                join = join.expose()
            ),
        );
    }

    fn stand_in_options(bin: &Path, data: &Path) -> LocalOptions {
        LocalOptions {
            data_dir: Some(data.to_path_buf()),
            bin_dir: Some(bin.to_path_buf()),
            ready_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(5),
            ..LocalOptions::default()
        }
    }

    #[tokio::test]
    async fn start_initialises_joins_and_hands_out_the_admin_token() {
        let bin = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let (admin, join) = (sample_token(1), sample_token(2));
        stand_ins(bin.path(), &admin, &join);
        let cluster = LocalCluster::start(stand_in_options(bin.path(), data.path()))
            .await
            .unwrap();
        assert_eq!(cluster.head_addr(), "127.0.0.1:7470");
        assert_eq!(cluster.ca_file(), data.path().join("tls/ca.crt"));
        assert_eq!(cluster.token_file(), data.path().join("admin.token"));
        assert_eq!(cluster.token(), &admin);
        assert_eq!(cluster.client_config().token.as_ref(), Some(&admin));
        // The join token was used and removed; the node has its certificate.
        assert!(!data.path().join("node/join.token").exists());
        assert!(data.path().join("node/tls/node.crt").is_file());

        let exports = cluster.exports();
        assert!(
            exports.starts_with("export FLAME_HEAD=127.0.0.1:7470 FLAME_CA_FILE="),
            "{exports}"
        );
        assert!(exports.contains("FLAME_TOKEN_FILE="), "{exports}");
        assert!(
            exports.ends_with("; unset FLAME_TOKEN FLAME_CERT FLAME_KEY"),
            "{exports}"
        );
        let env = cluster.env();
        let value = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        assert_eq!(
            value(config::ENV_TOKEN_FILE),
            Some(data.path().join("admin.token").into_os_string())
        );
        assert_eq!(value(config::ENV_TOKEN), Some(OsString::new()));
        // The token's secret shows nowhere.
        let secret = flame_protocol::auth::hex(&[1u8; 32]);
        let shown = format!(
            "{cluster:?} {exports} {env:?} {:?}",
            cluster.client_config()
        );
        assert!(!shown.contains(&secret), "{shown}");
        cluster.shutdown().await.unwrap();

        // A kept data folder is not initialised again (the stand-in, like the real head,
        // would refuse).
        let again = LocalCluster::start(stand_in_options(bin.path(), data.path()))
            .await
            .unwrap();
        assert_eq!(again.token(), &admin);
        again.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_failing_init_or_join_is_reported_with_its_stderr() {
        let bin = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        stand_ins(bin.path(), &sample_token(1), &sample_token(2));
        script(
            &bin.path().join(HEAD_BINARY),
            "echo 'cannot create the CA: disk full' >&2\nexit 4\n",
        );
        let err = LocalCluster::start(stand_in_options(bin.path(), data.path()))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LocalError::Command { .. }), "{text}");
        assert!(text.contains("flame-head init"), "{text}");
        assert!(text.contains("exit code 4"), "{text}");
        assert!(text.contains("disk full"), "{text}");

        // A node without `join` (an older release): reported, and the head stopped.
        let data = tempfile::tempdir().unwrap();
        stand_ins(bin.path(), &sample_token(1), &sample_token(2));
        script(
            &bin.path().join(NODE_BINARY),
            "echo \"error: unrecognized subcommand '$1'\" >&2\nexit 2\n",
        );
        let err = LocalCluster::start(stand_in_options(bin.path(), data.path()))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("flame-node join"), "{text}");
        assert!(text.contains("unrecognized subcommand 'join'"), "{text}");
        assert!(!data.path().join("node/join.token").exists());
        // The secret of the join token is in no message.
        assert!(
            !text.contains(&flame_protocol::auth::hex(&[2u8; 32])),
            "{text}"
        );
    }

    #[test]
    fn private_files_are_made_0600_even_over_an_open_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }
}
