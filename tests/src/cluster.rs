//! A head and its nodes, each a real child process, in a temporary folder: on loopback, or
//! each in a network namespace of its own ([`ClusterOptions::network_namespaces`], see
//! [`crate::netns`]).
//!
//! Layout of the folder `D` (mode 0755, so that an executor running as an unprivileged user
//! can reach its node's folders):
//!
//! ```text
//! D/head/              the head's data folder (state; D/head/tls/ca.crt, the CA clients
//!                      trust; D/head/admin.token, the admin token `flame-head init` made);
//!                      the head keeps it private (0700)
//! D/join.token         a node join token, made when the head first starts
//! D/node-<i>/tls/      node i's certificate and key (`flame-node join`)
//! D/head.log           the head's stderr
//! D/node-<i>/          node i's work folder (executors' folders are exec-<id> in it)
//! D/node-<i>/run/      its runtime folder (an executor's Unix socket is in exec-<id>/)
//! D/node-<i>/logs/     its executors' logs (executor-<id>.log)
//! D/node-<i>.log       its stderr
//! ```
//!
//! Each node's cgroup root (`--cgroup-root`) is `flame-test-<pid>-<n>-<random>-node-<i>`,
//! so clusters of concurrent tests, even of test processes in other pid namespaces that
//! share the cgroup hierarchies, never share one; [`crate::cgroup`] finds it on disk.

use crate::cgroup::NodeCgroups;
use crate::client_thread::ClientThread;
use crate::command::{binary, describe, run_command, CmdOutput, COMMAND_TIMEOUT};
use crate::netns::{self, Namespace, Network};
use flame_client::{Client, ClientConfig};
use flame_protocol::auth::Secret;
use flame_protocol::model::{Isolation, NodeInfo, NodeState};
use flame_protocol::ready::{HEAD_READY_PREFIX, NODE_READY_PREFIX};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Bound on a head or node start-up (its ready line), and on a node's re-registration.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a stopped head has to exit after `SIGTERM`.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a child whose stdout closed has to exit before a failure is reported anyway.
pub const EXIT_WAIT: Duration = Duration::from_secs(5);
/// Stdout lines kept per child; the binaries print a handful, so more means a runaway.
pub const STDOUT_LINES_MAX: usize = 10_000;
/// Bytes of a log quoted in a failure message.
pub const LOG_TAIL_BYTES_MAX: u64 = 8 * 1024;
/// Joins the cluster's join token allows beyond its nodes, for tests that join more.
pub const JOIN_TOKEN_SPARE_USES: usize = 8;
/// Pause between two looks at the node list while waiting for a node's state. The head
/// announces no state change, so waiting for one means asking again.
pub const NODE_STATE_POLL_PAUSE: Duration = Duration::from_millis(250);

/// Bound on the clean-up of a dropped cluster's cgroups (what the killed nodes left).
pub const CGROUP_CLEANUP_MAX: Duration = Duration::from_secs(5);

/// Clusters started by this process so far, for unique cgroup root names.
static CLUSTERS_STARTED: AtomicUsize = AtomicUsize::new(0);

/// Environment variables that would make a child read settings from outside the test.
pub const FOREIGN_ENV: &[&str] = &[
    "FLAME_HEAD",
    "FLAME_CA_FILE",
    "FLAME_TOKEN",
    "FLAME_TOKEN_FILE",
    "FLAME_CERT",
    "FLAME_KEY",
    "FLAME_JOIN_TOKEN",
    "FLAME_OWNER",
    "FLAME_NODE_NAME",
    "FLAME_NODE_CONFIG",
    "FLAME_HEAD_CONFIG",
    "FLAME_HEAD_DATA_DIR",
];

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes started after the head; each must register before `start` returns.
    pub nodes: usize,
    /// Each node's `--cpus`.
    pub cpus: u32,
    /// Extra `flame-head` arguments, e.g. `--task-input-bytes-max 1024`.
    pub head_args: Vec<String>,
    /// Each node's `--executor-identity` (`owner-uid`, `site-user`, `fixed`); `None`: the
    /// node's default, `owner-uid` (each owner's executors as its own uid from the head's
    /// range; a node not run as root runs them as itself).
    pub executor_identity: Option<String>,
    /// Each node's `--executor-user`, with `executor_identity` `fixed`.
    pub executor_user: Option<String>,
    /// Pass `--allow-root-executors`. Default: no.
    pub allow_root_executors: bool,
    /// Each node's `--cgroups` (`auto` or `off`); `None` leaves the node's default.
    pub cgroups: Option<String>,
    /// Extra arguments for every node, after the harness's own, e.g. `--label zone=a`,
    /// `--memory 2GiB`. A flag the harness passes already must be changed through its
    /// field instead (clap refuses a single-value flag given twice).
    pub node_args: Vec<String>,
    /// Run the head and each node in a network namespace of its own (needs root, `ip`
    /// and `nft`; see [`crate::netns`]) instead of on loopback.
    pub network_namespaces: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 1,
            cpus: 2,
            head_args: Vec::new(),
            executor_identity: None,
            executor_user: None,
            allow_root_executors: false,
            cgroups: None,
            node_args: Vec::new(),
            network_namespaces: false,
        }
    }
}

/// A cgroup root name unique to one cluster: the pid and a counter tell the clusters of
/// this process apart, and a random part those of processes in other pid namespaces, which
/// may share the cgroup hierarchies (and the pid) with this one.
fn cgroup_base_name() -> String {
    use std::hash::BuildHasher;
    let n = CLUSTERS_STARTED.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // RandomState is seeded randomly per process.
    let random = std::collections::hash_map::RandomState::new().hash_one((pid, n, now));
    format!("flame-test-{pid}-{n}-{:08x}", random as u32)
}

impl ClusterOptions {
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    pub fn head_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.head_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Every owner's executors as `user` (`--executor-identity fixed`); also allows root
    /// executors exactly when `user` is `root`.
    pub fn executor_user(mut self, user: impl Into<String>) -> Self {
        let user = user.into();
        self.allow_root_executors = user == "root";
        self.executor_identity = Some("fixed".into());
        self.executor_user = Some(user);
        self
    }

    /// See [`ClusterOptions::executor_identity`].
    pub fn executor_identity(mut self, mode: impl Into<String>) -> Self {
        self.executor_identity = Some(mode.into());
        self
    }

    pub fn allow_root_executors(mut self, allow: bool) -> Self {
        self.allow_root_executors = allow;
        self
    }

    pub fn cgroups(mut self, mode: impl Into<String>) -> Self {
        self.cgroups = Some(mode.into());
        self
    }

    pub fn node_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.node_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// See [`ClusterOptions::network_namespaces`]; check [`netns::available`] first.
    pub fn network_namespaces(mut self) -> Self {
        self.network_namespaces = true;
        self
    }
}

/// A running head and nodes. Dropping it kills every child (`SIGKILL`), then deletes the
/// network namespaces if there are any, then removes the folder.
///
/// Children are started from the calling thread with a parent-death signal, so they also
/// die if the test process is killed: start clusters from the test's body (or a runtime
/// worker), never from a `spawn_blocking` thread, which may exit while the test runs.
#[derive(Debug)]
pub struct Cluster {
    // Children, then their namespaces, then the folder: fields drop in order.
    nodes: Vec<Node>,
    head: Option<Proc>,
    net: Option<Network>,
    head_addr: String,
    /// Environment for the next head started, then cleared (e.g. `FLAME_FAILPOINTS`).
    next_head_env: Vec<(String, String)>,
    ca_file: PathBuf,
    options: ClusterOptions,
    /// Node i's cgroup root is `<cgroup_base>-node-<i>`.
    cgroup_base: String,
    dir: tempfile::TempDir,
}

/// A node's agent process and what the harness learned about it when it started.
#[derive(Debug)]
struct Node {
    proc: Proc,
    pid: i32,
    /// `/proc/<pid>/cgroup` read when it registered: its own cgroups, below which it makes
    /// its cgroup root.
    proc_cgroup: String,
}

impl Cluster {
    /// Starts the head (on `127.0.0.1:0`, or on [`netns::HEAD_ADDR`] port 7470 in its
    /// namespace), then the nodes one by one, each waited for.
    pub async fn start(options: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("flame-e2e-")
            .tempdir()
            .expect("cannot create a temporary folder for the cluster");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot make {} 0755: {e}", dir.path().display()));
        let ca_file = dir.path().join("head").join("tls").join("ca.crt");
        let cgroup_base = cgroup_base_name();
        let net = options
            .network_namespaces
            .then(|| Network::create(options.nodes));
        let listen = match net {
            Some(_) => format!("{}:{}", netns::HEAD_ADDR, flame_protocol::DEFAULT_HEAD_PORT),
            None => "127.0.0.1:0".to_string(),
        };
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(options.nodes),
            head: None,
            net,
            head_addr: String::new(),
            next_head_env: Vec::new(),
            ca_file,
            options,
            cgroup_base,
            dir,
        };
        cluster.init_head().await;
        cluster.start_head(&listen).await;
        cluster.make_join_token().await;
        for i in 0..cluster.options.nodes {
            cluster.start_node(i).await;
        }
        cluster
    }

    /// The address clients and nodes connect to.
    pub fn head_addr(&self) -> &str {
        &self.head_addr
    }

    /// The head's CA certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The admin token `flame-head init` wrote (one line).
    pub fn admin_token_file(&self) -> PathBuf {
        self.data_dir().join("admin.token")
    }

    /// The admin token's text.
    pub fn admin_token(&self) -> Secret {
        read_token(&self.admin_token_file())
    }

    /// A node join token's file (made when the cluster started).
    pub fn join_token_file(&self) -> PathBuf {
        self.dir.path().join("join.token")
    }

    /// Node i's TLS folder: its certificate, key and the CA, from `flame-node join`.
    pub fn node_tls_dir(&self, i: usize) -> PathBuf {
        self.node_work_dir(i).join("tls")
    }

    /// Runs `flame-head --data-dir D --listen ADDR ARGS...` (in the head's namespace if it
    /// has one): `init` and the `token` commands.
    pub async fn head_command(&self, args: &[&str]) -> CmdOutput {
        let mut command = Command::new(binary("flame-head"));
        for var in FOREIGN_ENV {
            command.env_remove(var);
        }
        command.arg("--data-dir").arg(self.data_dir());
        if !self.head_addr.is_empty() {
            command.arg("--listen").arg(&self.head_addr);
        }
        command.args(args);
        if let Some(net) = &self.net {
            net.head().enter_in_child(&mut command);
        }
        run_command(command, COMMAND_TIMEOUT).await
    }

    /// A QUIC connection to the head that trusts the cluster CA and presents `identity` if
    /// given, with no hello sent yet: for tests that speak the protocol by hand. On
    /// loopback only.
    pub async fn raw_connection(
        &self,
        identity: Option<flame_protocol::endpoint::ClientIdentity>,
    ) -> (quinn::Endpoint, quinn::Connection) {
        use flame_protocol::endpoint::{client, Trust};
        let endpoint = client(&Trust::CaFile(self.ca_file.clone()), identity)
            .unwrap_or_else(|e| panic!("cannot make a client endpoint: {e}"));
        let addr = self.head_addr.parse().unwrap_or_else(|e| {
            panic!(
                "the head address {} is no socket address: {e}",
                self.head_addr
            )
        });
        let connection = dial(&endpoint, addr)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the head: {e}\n{}", self.logs()));
        (endpoint, connection)
    }

    /// A new token for user `name` (`flame-head token create --user NAME [--admin]`).
    pub async fn user_token(&self, name: &str, admin: bool) -> Secret {
        let mut args = vec!["token", "create", "--user", name];
        if admin {
            args.push("--admin");
        }
        let out = self.head_command(&args).await;
        out.assert_success();
        Secret::new(out.stdout.trim())
    }

    /// A client configuration for this cluster acting as the user of `token`.
    pub fn client_config_as(&self, token: Secret) -> ClientConfig {
        ClientConfig::new(self.head_addr.clone(), self.ca_file.clone()).with_token(token)
    }

    /// `flame-head init` on the data folder, before the first start.
    async fn init_head(&mut self) {
        std::fs::create_dir_all(self.data_dir())
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.data_dir().display()));
        let mut args = vec!["init"];
        let san = netns::HEAD_ADDR.to_string();
        if self.net.is_some() {
            // The certificate must name the address nodes and clients dial.
            args.extend(["--tls-san", san.as_str()]);
        }
        let out = self.head_command(&args).await;
        out.assert_success();
        assert!(
            self.ca_file.is_file() && self.admin_token_file().is_file(),
            "flame-head init left no CA certificate {} or admin token\n{out}",
            self.ca_file.display()
        );
    }

    /// A node join token in [`Self::join_token_file`], for every node this cluster starts,
    /// with [`JOIN_TOKEN_SPARE_USES`] more for tests that join nodes themselves.
    async fn make_join_token(&mut self) {
        let uses = (self.options.nodes + JOIN_TOKEN_SPARE_USES).to_string();
        let out = self
            .head_command(&["token", "create", "--node", "--ttl", "1d", "--uses", &uses])
            .await;
        out.assert_success();
        write_private(&self.join_token_file(), out.stdout.trim().as_bytes());
    }

    /// `flame-node join` for node i, unless it has its certificate already.
    async fn join_node(&self, i: usize) {
        let tls = self.node_tls_dir(i);
        if tls.join("node.crt").is_file() {
            return;
        }
        let mut command = Command::new(binary("flame-node"));
        for var in FOREIGN_ENV {
            command.env_remove(var);
        }
        command
            .arg("join")
            .arg("--token-file")
            .arg(self.join_token_file())
            .arg("--head")
            .arg(&self.head_addr)
            .arg("--name")
            .arg(Self::node_name(i))
            .arg("--tls-dir")
            .arg(&tls);
        if let Some(net) = &self.net {
            net.node(i).enter_in_child(&mut command);
        }
        let out = run_command(command, COMMAND_TIMEOUT).await;
        assert!(
            out.success(),
            "node {i} could not join: {out}\n{}",
            self.logs()
        );
    }

    /// The head's data folder, `D/head`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("head")
    }

    /// The cluster's folder `D` (see the module's doc for its layout).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The name of node `i`.
    pub fn node_name(i: usize) -> String {
        format!("node-{i}")
    }

    /// Node `i`'s work folder (`--work-dir`).
    pub fn node_work_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(Self::node_name(i))
    }

    /// Node `i`'s runtime folder (`--runtime-dir`), where executors' socket folders are.
    pub fn node_run_dir(&self, i: usize) -> PathBuf {
        self.node_work_dir(i).join("run")
    }

    /// Node `i`'s object spill folder (`--object-dir`).
    pub fn node_object_dir(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}-objects", Self::node_name(i)))
    }

    /// Node `i`'s executor log folder (`--log-dir`).
    pub fn node_log_dir(&self, i: usize) -> PathBuf {
        self.node_work_dir(i).join("logs")
    }

    /// The name of node `i`'s cgroup root directory (`--cgroup-root`).
    pub fn node_cgroup_root(&self, i: usize) -> String {
        format!("{}-{}", self.cgroup_base, Self::node_name(i))
    }

    /// The process id of node `i`'s agent (the latest one, if it was restarted).
    /// The running head's process id.
    pub fn head_pid(&self) -> i32 {
        self.head
            .as_ref()
            .and_then(|h| h.child.id())
            .and_then(|id| i32::try_from(id).ok())
            .expect("the head is not running")
    }

    pub fn node_pid(&self, i: usize) -> i32 {
        self.nodes[i].pid
    }

    /// Node `i`'s cgroup root in each hierarchy, for the cgroup version the node reports
    /// (`isolation` in the node list); `None` when the node says it has no isolation.
    /// Panics when the node's cgroups cannot be located.
    pub async fn node_cgroups(&self, i: usize) -> Option<NodeCgroups> {
        let name = Self::node_name(i);
        let nodes = self.node_list().await;
        let node = nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the node list: {nodes:#?}"));
        let v2 = match node.isolation {
            Isolation::CgroupV1 => false,
            Isolation::CgroupV2 => true,
            Isolation::None => return None,
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_else(|e| panic!("cannot read /proc/self/mountinfo: {e}"));
        let found = NodeCgroups::locate(
            &self.nodes[i].proc_cgroup,
            &mountinfo,
            &self.node_cgroup_root(i),
            v2,
        );
        Some(found.unwrap_or_else(|e| {
            panic!(
                "cannot locate {name}'s cgroups ({}): {e}\n/proc/{}/cgroup:\n{}",
                node.isolation, self.nodes[i].pid, self.nodes[i].proc_cgroup
            )
        }))
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// A client configuration for this cluster.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_as(self.admin_token())
    }

    /// A connected client; panics with the logs when it cannot connect. On loopback only:
    /// a head in a namespace is out of the test's reach, so use [`Self::spawn_client`].
    pub async fn client(&self) -> Client {
        assert!(
            self.net.is_none(),
            "the head is in a network namespace: reach it with Cluster::spawn_client"
        );
        match Client::connect(&self.client_config()).await {
            Ok(client) => client,
            Err(e) => panic!("cannot connect to the head: {e}\n{}", self.logs()),
        }
    }

    /// Runs `flame --head ADDR --ca-file CA ARGS...` with [`COMMAND_TIMEOUT`], in the
    /// head's namespace if it has one.
    pub async fn flame(&self, args: &[&str]) -> CmdOutput {
        let mut command = flame_command();
        command
            .arg("--head")
            .arg(&self.head_addr)
            .arg("--ca-file")
            .arg(&self.ca_file)
            .arg("--token-file")
            .arg(self.admin_token_file())
            .args(args);
        if let Some(net) = &self.net {
            net.head().enter_in_child(&mut command);
        }
        run_command(command, COMMAND_TIMEOUT).await
    }

    /// Runs client code on a thread of its own that can reach the head (in the head's
    /// namespace if it has one), while the test goes on; see [`crate::client_thread`].
    /// `code` gets [`Self::client_config`] and connects itself.
    pub fn spawn_client<T, F, Fut>(&self, name: &str, code: F) -> ClientThread<T>
    where
        T: Send + 'static,
        F: FnOnce(ClientConfig) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let config = self.client_config();
        let netns = self.net.as_ref().map(|net| net.head().handle());
        ClientThread::spawn(name, netns, move || code(config))
    }

    /// The nodes as `flame node list --output json` shows them.
    pub async fn node_list(&self) -> Vec<NodeInfo> {
        let out = self.flame(&["node", "list", "--output", "json"]).await;
        out.assert_success();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("`flame node list` printed no node list ({e}):\n{out}"))
    }

    /// Asks for the node list until node `i` is in `state`, for at most `timeout`; returns
    /// the list that shows it. Polls because the head announces no state change.
    pub async fn wait_node_state(
        &self,
        i: usize,
        state: NodeState,
        timeout: Duration,
    ) -> Vec<NodeInfo> {
        let name = Self::node_name(i);
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.node_list().await;
            if nodes.iter().any(|n| n.name == name && n.state == state) {
                return nodes;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is not {state:?} after {timeout:?}: {nodes:#?}\n{}",
                self.logs()
            );
            tokio::time::sleep(NODE_STATE_POLL_PAUSE).await;
        }
    }

    /// Asks for the node list until `done` holds, for at most `timeout`; returns the list
    /// that satisfied it, or panics with the last one seen, `what` and the logs.
    pub async fn wait_nodes(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[NodeInfo]) -> bool,
    ) -> Vec<NodeInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let nodes = self.node_list().await;
            if done(&nodes) {
                return nodes;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes are not {what} after {timeout:?}: {nodes:#?}\n{}",
                self.logs()
            );
            tokio::time::sleep(NODE_STATE_POLL_PAUSE).await;
        }
    }

    /// Kills node `i`'s agent with `SIGKILL` and waits for it to exit (its executors die
    /// with it: they have a parent-death signal).
    pub async fn kill_node(&mut self, i: usize) {
        let node = &mut self.nodes[i].proc;
        node.kill();
        match tokio::time::timeout(EXIT_WAIT, node.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("cannot wait for {}: {e}", node.name),
            Err(_) => panic!("{} did not exit within {EXIT_WAIT:?} of SIGKILL", node.name),
        }
    }

    /// Stops node `i`'s agent with `SIGTERM`, as its service manager would, and waits for
    /// it to exit; returns how it exited.
    pub async fn stop_node(&mut self, i: usize) -> ExitStatus {
        self.nodes[i].proc.terminate(STOP_TIMEOUT).await
    }

    /// Waits until node `i` prints its ready line once more than it had when it printed
    /// `registered` of them: it lost the head and registered afresh.
    pub async fn wait_node_registered(&mut self, i: usize, registered: usize, timeout: Duration) {
        let found = self.nodes[i]
            .proc
            .wait_line(NODE_READY_PREFIX, registered, timeout)
            .await;
        if let Err(e) = found {
            panic!(
                "{} did not register again: {e}\n{}",
                Self::node_name(i),
                self.logs()
            );
        }
    }

    /// How many times node `i` has registered so far.
    pub fn node_registrations(&self, i: usize) -> usize {
        self.nodes[i].proc.count_lines(NODE_READY_PREFIX)
    }

    /// Drops all traffic between node `i` and the head; see [`Network::partition`].
    pub async fn partition(&mut self, i: usize) {
        self.network_mut().partition(i).await;
    }

    /// Ends node `i`'s partition; see [`Network::heal`].
    pub async fn heal(&mut self, i: usize) {
        self.network_mut().heal(i).await;
    }

    /// A host of its own on the cluster's subnet (see [`Network::add_host`]); needs a
    /// cluster started with `network_namespaces()`.
    pub fn add_network_host(&mut self, what: &str) -> &Namespace {
        self.network_mut().add_host(what)
    }

    fn network_mut(&mut self) -> &mut Network {
        self.net
            .as_mut()
            .expect("partitions need a cluster started with network_namespaces()")
    }

    /// Stops the head with `SIGTERM` and waits for it to exit; returns how it exited.
    pub async fn stop_head(&mut self) -> ExitStatus {
        let mut head = self.head.take().expect("the head is not running");
        head.terminate(STOP_TIMEOUT).await
    }

    /// Restarts the head (SIGTERM, then a new one on the same folder and address) with
    /// `FLAME_FAILPOINTS` set to `spec`, arming its crash points; a later restart runs
    /// without them.
    pub async fn restart_head_with_crash_points(&mut self, spec: &str) {
        self.stop_head().await;
        self.next_head_env = vec![("FLAME_FAILPOINTS".into(), spec.into())];
        self.start_head_again().await;
    }

    /// Waits for the head to exit by itself (a crash point fired) and returns how it
    /// exited; panics after `timeout`.
    pub async fn wait_head_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut head = self.head.take().expect("the head is not running");
        match tokio::time::timeout(timeout, head.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("cannot wait for the head: {e}"),
            Err(_) => panic!("the head did not exit within {timeout:?}\n{}", self.logs()),
        }
    }

    /// Kills the head with `SIGKILL`, as a crash would: no cleanup, no goodbye to anyone.
    pub async fn kill_head(&mut self) {
        let mut head = self.head.take().expect("the head is not running");
        head.kill();
        match tokio::time::timeout(EXIT_WAIT, head.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("cannot wait for the head: {e}"),
            Err(_) => panic!("the head did not exit within {EXIT_WAIT:?} of SIGKILL"),
        }
    }

    /// Starts a head on the same data folder and address as the last one, and waits until
    /// every node still running (not killed by the test) has registered with it again.
    pub async fn start_head_again(&mut self) {
        assert!(self.head.is_none(), "the head is still running");
        let registered: Vec<usize> = self
            .nodes
            .iter()
            .map(|n| n.proc.count_lines(NODE_READY_PREFIX))
            .collect();
        let addr = self.head_addr.clone();
        self.start_head(&addr).await;
        let mut failures = Vec::new();
        for (node, before) in self.nodes.iter_mut().zip(registered) {
            // A node a test killed (and reaped) is not waited for.
            if node.proc.pid().is_none() {
                continue;
            }
            let found = node
                .proc
                .wait_line(NODE_READY_PREFIX, before, READY_TIMEOUT)
                .await;
            if let Err(e) = found {
                failures.push(format!("{} did not register again: {e}", node.proc.name));
            }
        }
        assert!(
            failures.is_empty(),
            "after the head restarted:\n{}\n{}",
            failures.join("\n"),
            self.logs()
        );
    }

    /// The end of every child's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        text.push_str(&log_section(
            "flame-head",
            &self.dir.path().join("head.log"),
        ));
        for (i, node) in self.nodes.iter().enumerate() {
            text.push_str(&log_section(&Self::node_name(i), &node.proc.log));
        }
        text
    }

    async fn start_head(&mut self, listen: &str) {
        let dir = self.dir.path();
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            self.data_dir().into(),
            "--listen".into(),
            listen.into(),
        ];
        args.extend(self.options.head_args.iter().map(OsString::from));
        let env = std::mem::take(&mut self.next_head_env);
        let mut head = Proc::spawn(
            "flame-head".into(),
            &binary("flame-head"),
            &args,
            &env,
            &dir.join("head.log"),
            self.net.as_ref().map(Network::head),
        );
        let line = head.wait_line(HEAD_READY_PREFIX, 0, READY_TIMEOUT).await;
        let listening = line.unwrap_or_else(|e| panic!("flame-head did not start: {e}"));
        self.head_addr = listening.1;
        assert!(
            self.ca_file.is_file(),
            "flame-head is ready but its CA certificate {} is missing",
            self.ca_file.display()
        );
        self.head = Some(head);
    }

    async fn start_node(&mut self, i: usize) {
        self.join_node(i).await;
        let name = Self::node_name(i);
        let dir = self.dir.path();
        let options = &self.options;
        let mut args: Vec<OsString> = vec![
            "--head".into(),
            self.head_addr.clone().into(),
            "--tls-dir".into(),
            self.node_tls_dir(i).into(),
            "--name".into(),
            name.clone().into(),
            "--work-dir".into(),
            self.node_work_dir(i).into(),
            "--runtime-dir".into(),
            self.node_run_dir(i).into(),
            "--log-dir".into(),
            self.node_log_dir(i).into(),
            "--cpus".into(),
            options.cpus.to_string().into(),
            "--cgroup-root".into(),
            self.node_cgroup_root(i).into(),
        ];
        if let Some(mode) = &options.executor_identity {
            args.extend(["--executor-identity".into(), mode.into()]);
        }
        if let Some(user) = &options.executor_user {
            args.extend(["--executor-user".into(), user.into()]);
        }
        if options.allow_root_executors {
            args.push("--allow-root-executors".into());
        }
        if let Some(mode) = &options.cgroups {
            args.extend(["--cgroups".into(), mode.into()]);
        }
        // Every node serves objects on a port of its own (several nodes share this host)
        // and spills into its own folder, unless the test says otherwise.
        if !options.node_args.iter().any(|a| a == "--object-listen") {
            args.extend(["--object-listen".into(), "0.0.0.0:0".into()]);
        }
        if !options.node_args.iter().any(|a| a == "--object-dir") {
            args.extend(["--object-dir".into(), self.node_object_dir(i).into()]);
        }
        args.extend(options.node_args.iter().map(OsString::from));
        let mut node = Proc::spawn(
            name.clone(),
            &binary("flame-node"),
            &args,
            &[],
            &dir.join(format!("{name}.log")),
            self.net.as_ref().map(|net| net.node(i)),
        );
        let line = node.wait_line(NODE_READY_PREFIX, 0, READY_TIMEOUT).await;
        match line {
            Ok((_, registered)) if registered == name => {}
            Ok((_, other)) => panic!("{name} registered as `{other}`"),
            Err(e) => panic!(
                "{name} did not register: {e}\n{}",
                log_section("flame-head", &dir.join("head.log"))
            ),
        }
        let pid = node
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or_else(|| panic!("{name} registered, yet it has exited"));
        let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/cgroup of {name}: {e}"));
        self.nodes.push(Node {
            proc: node,
            pid,
            proc_cgroup,
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // `kill_on_drop` would do it too; killing first, nodes then head, makes the order
        // explicit and does not depend on field order.
        for node in &mut self.nodes {
            node.proc.kill();
        }
        if let Some(head) = &mut self.head {
            head.kill();
        }
        self.remove_node_cgroups();
    }
}

impl Cluster {
    /// Removes the cgroups the killed nodes left (a node killed with SIGKILL cannot remove
    /// its own), after a bounded wait for the nodes to exit. Both cgroup versions are
    /// tried: this runs in `drop`, which cannot ask the head which one a node used.
    fn remove_node_cgroups(&mut self) {
        let deadline = Instant::now() + CGROUP_CLEANUP_MAX;
        for node in &mut self.nodes {
            while matches!(node.proc.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        for (i, node) in self.nodes.iter().enumerate() {
            let root = self.node_cgroup_root(i);
            for v2 in [false, true] {
                if let Ok(found) = NodeCgroups::locate(&node.proc_cgroup, &mountinfo, &root, v2) {
                    found.remove_all(deadline.saturating_duration_since(Instant::now()));
                }
            }
        }
    }
}

/// A QUIC connection from `endpoint` to `addr`, with no hello sent yet; an IPv4 head is
/// reached through a dual-stack socket as a mapped address. Bounded by twice the connect
/// timeout.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
) -> Result<quinn::Connection, String> {
    use std::net::SocketAddr;
    let local = endpoint.local_addr().map_err(|e| e.to_string())?;
    let target = match (addr, local) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        (other, _) => other,
    };
    let connecting = endpoint
        .connect(target, &addr.ip().to_string())
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(flame_protocol::limits::CONNECT_TIMEOUT * 2, connecting)
        .await
        .map_err(|_| "the QUIC handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// Sends `hello` (any serialisable shape, so also old or malformed ones) on a new stream of
/// `connection` and reads the head's answer, within [`flame_protocol::limits::CONNECT_TIMEOUT`]; returns the
/// stream's two halves for what follows the hello.
pub async fn say_hello(
    connection: &quinn::Connection,
    hello: &impl serde::Serialize,
) -> (
    flame_protocol::messages::HelloReply,
    flame_protocol::frame::FrameWriter<quinn::SendStream>,
    flame_protocol::frame::FrameReader<quinn::RecvStream>,
) {
    use flame_protocol::frame::{FrameReader, FrameWriter};
    let (send, recv) = connection
        .open_bi()
        .await
        .unwrap_or_else(|e| panic!("cannot open a stream to the head: {e}"));
    let mut writer = FrameWriter::new(send, flame_protocol::limits::FRAME_BYTES_MAX);
    let mut reader = FrameReader::new(recv, flame_protocol::limits::FRAME_BYTES_MAX);
    writer
        .write(hello)
        .await
        .unwrap_or_else(|e| panic!("cannot send the hello: {e}"));
    let reply = tokio::time::timeout(
        flame_protocol::limits::CONNECT_TIMEOUT,
        reader.read_required::<flame_protocol::messages::HelloReply>(),
    )
    .await
    .unwrap_or_else(|_| panic!("no hello reply in time"))
    .unwrap_or_else(|e| panic!("cannot read the hello reply: {e}"));
    (reply, writer, reader)
}

/// Reads a token file.
pub fn read_token(path: &Path) -> Secret {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the token {}: {e}", path.display()));
    Secret::new(text.trim())
}

/// Writes `bytes` to a new file only its owner may read.
pub fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    file.write_all(bytes)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The `flame` command with an environment that cannot point it elsewhere.
pub fn flame_command() -> Command {
    let mut command = Command::new(binary("flame"));
    for var in FOREIGN_ENV {
        command.env_remove(var);
    }
    // No user or system configuration file is found through XDG; /etc/flame/flame.toml is
    // read only for keys the flags do not give, and the flags give both.
    command.env(
        "XDG_CONFIG_HOME",
        std::env::temp_dir().join("flame-e2e-no-config"),
    );
    command
}

/// What a child has printed on stdout so far.
#[derive(Debug, Default)]
struct Stdout {
    lines: Vec<String>,
    /// The pipe ended: the child is exiting.
    closed: bool,
}

/// One child process: its stderr goes to a log file, its stdout lines are kept. Killed
/// when dropped, and when the test process dies.
#[derive(Debug)]
pub struct Proc {
    name: String,
    command: String,
    child: Child,
    log: PathBuf,
    stdout: watch::Receiver<Stdout>,
}

impl Proc {
    /// Starts `program`, inside `netns` when given.
    fn spawn(
        name: String,
        program: &Path,
        args: &[OsString],
        env: &[(String, String)],
        log: &Path,
        netns: Option<&Namespace>,
    ) -> Proc {
        let mut command = Command::new(program);
        for var in FOREIGN_ENV {
            command.env_remove(var);
        }
        command.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        Proc::start(name, command, log, netns)
    }

    /// Starts `command` as it is set up (program, arguments, environment, user), inside
    /// `netns` when given, with its stderr appended to `log`.
    pub fn start(
        name: String,
        mut command: Command,
        log: &Path,
        netns: Option<&Namespace>,
    ) -> Proc {
        // Appended to, so a restarted head's log follows the first one's.
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        // Killed when the thread that forked it ends, so nothing outlives a test process
        // that is itself killed.
        flame_client::local::die_with_parent(&mut command);
        let mut line = describe(&command);
        if let Some(ns) = netns {
            ns.enter_in_child(&mut command);
            line = format!("{line} (in network namespace {})", ns.name());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = watch::channel(Stdout::default());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tx.send_modify(|s| {
                    if s.lines.len() < STDOUT_LINES_MAX {
                        s.lines.push(line);
                    }
                });
            }
            tx.send_modify(|s| s.closed = true);
        });
        Proc {
            name,
            command: line,
            child,
            log: log.to_path_buf(),
            stdout: rx,
        }
    }

    /// Lines printed so far that start with `prefix`.
    fn count_lines(&self, prefix: &str) -> usize {
        self.stdout
            .borrow()
            .lines
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Waits for the line starting with `prefix` that comes after `skip` such lines;
    /// returns its index and the rest of the line, or why it did not come.
    pub async fn wait_line(
        &mut self,
        prefix: &str,
        skip: usize,
        timeout: Duration,
    ) -> Result<(usize, String), String> {
        let find = |s: &Stdout| {
            s.lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.starts_with(prefix))
                .nth(skip)
                .map(|(i, l)| (i, l[prefix.len()..].trim().to_string()))
        };
        let mut rx = self.stdout.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.closed || find(s).is_some()))
            .await
            .map(|r| r.map(|state| find(&state)));
        let problem = match waited {
            Ok(Ok(Some(found))) => return Ok(found),
            // Stdout closed: the child is exiting, and its status says how.
            Ok(Ok(None)) => match tokio::time::timeout(EXIT_WAIT, self.child.wait()).await {
                Ok(Ok(status)) => format!("it exited with {status}"),
                Ok(Err(e)) => format!("its stdout closed, and waiting for it failed: {e}"),
                Err(_) => format!("its stdout closed, yet it has not exited within {EXIT_WAIT:?}"),
            },
            Ok(Err(_)) => "its stdout reader stopped".to_string(),
            Err(_) => format!("no such line within {timeout:?}"),
        };
        let printed = self.stdout.borrow().lines.join("\n    ");
        Err(format!(
            "`{}` did not print `{prefix}...`: {problem}\n  stdout:\n    {printed}\n{}",
            self.command,
            log_section(&self.name, &self.log)
        ))
    }

    /// `SIGTERM`, then waits for the exit; panics with the log when it does not come.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            signal::kill(Pid::from_raw(pid), Signal::SIGTERM)
                .unwrap_or_else(|e| panic!("cannot send SIGTERM to {}: {e}", self.name));
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("cannot wait for {}: {e}", self.name),
            Err(_) => {
                self.kill();
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM; killed it\n{}",
                    self.name,
                    log_section(&self.name, &self.log)
                )
            }
        }
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.id().and_then(|id| i32::try_from(id).ok())
    }

    pub fn kill(&mut self) {
        // Fails only when it already exited, which is what we want.
        let _already_gone = self.child.start_kill();
    }
}

/// The end of a log file, headed by its name.
pub fn log_section(name: &str, log: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES_MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    let body = match read() {
        Ok(text) if text.trim().is_empty() => "(empty)".to_string(),
        Ok(text) => text,
        Err(e) => format!("(cannot read it: {e})"),
    };
    format!(
        "--- end of {name}'s log {} ---\n{}\n",
        log.display(),
        body.trim_end()
    )
}
