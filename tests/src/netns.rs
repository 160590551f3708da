//! Network namespaces for a cluster: the head and each node in a namespace of its own, with
//! its own address, so that a test can cut one node off the head with firewall drops.
//!
//! ```text
//!  head namespace                          node-i namespace
//!  lo, br0 10.47.0.1/24 ── veth n<i> ──────── eth0 10.47.0.(10+i)/24, lo
//! ```
//!
//! The bridge lives in the head's namespace, so the head is on the nodes' subnet with no
//! router, and nothing at all is added to the root namespace: every link has an end in a
//! namespace made here, and deleting the namespaces deletes the links. Because the
//! namespaces are private, every cluster uses the same subnet without clashing with another
//! test or with the machine's own networks. The test process itself stays in the root
//! namespace; commands it runs enter a namespace between fork and exec
//! ([`Namespace::enter_in_child`]), and client code that must reach the head runs on a
//! thread that has entered the head's namespace ([`crate::Cluster::spawn_client`]).
//!
//! A partition is an nftables table in the node's namespace that drops every packet to and
//! from the head's address ([`Network::partition`]); healing deletes the table and checks it
//! is gone. The head hears nothing and gets no error back, as when a cable is cut; the
//! node's own sends fail locally (`EPERM` from the output hook), which QUIC takes as loss.
//!
//! Names hold the test process id and a counter (`flame-e2e-<pid>-<n>-head`,
//! `...-node<i>`), so tests running in parallel never clash, and a leftover of a killed test
//! process can be recognised and removed by the next run.

use crate::command::{run_command, CmdOutput};
use nix::sched::CloneFlags;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::process::Command;

/// Where `ip netns` keeps the namespaces it names.
const NETNS_DIR: &str = "/run/netns";
/// The prefix of every namespace made here; what follows is `<pid>-<n>-`.
const NAME_PREFIX: &str = "flame-e2e-";
/// The head's address; nodes get `10.47.0.(NODE_HOST_FIRST + i)`.
pub const HEAD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 47, 0, 1);
/// The host part of node 0's address.
const NODE_HOST_FIRST: u8 = 10;
/// The host part of the first extra host's address ([`Network::add_host`]), above the
/// nodes' range.
const EXTRA_HOST_FIRST: u8 = 230;
/// Most extra hosts one network holds.
pub const EXTRA_HOSTS_MAX: usize = 20;
/// Prefix length of the cluster's subnet.
const PREFIX_LEN: u8 = 24;
/// Most nodes one network holds: their addresses must stay in the /24.
pub const NODES_MAX: usize = 200;
/// The nftables table a partition adds to a node's namespace.
const PARTITION_TABLE: &str = "flame_partition";
/// Bound on one `ip` or `nft` command.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Namespaces made by this process so far, for unique names.
static NETWORKS_MADE: AtomicU32 = AtomicU32::new(0);

/// Why network namespaces cannot be used here, if they cannot: they need root, `ip`
/// (iproute2) and `nft` (nftables).
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network namespaces and nftables need root".to_string());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            return Some(format!(
                "`{tool}` is not on PATH ({}); install {package}",
                path.to_string_lossy()
            ));
        }
    }
    None
}

/// Whether a network-namespace test can run. Under CI (`CI=true`) a missing prerequisite
/// fails the test: CI must provide it. Elsewhere the test is skipped, loudly, so that a
/// developer without root can still run the rest of the suite.
pub fn available(test: &str) -> bool {
    let Some(missing) = missing_prerequisite() else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} cannot run: {missing}; CI must run the tests as root with iproute2 and nftables");
    }
    eprintln!("SKIPPED {test}: {missing} (under CI=true this fails)");
    false
}

/// One named network namespace and its address on the cluster's subnet.
#[derive(Debug)]
pub struct Namespace {
    name: String,
    addr: Ipv4Addr,
    /// `/run/netns/<name>`, held open to enter the namespace.
    handle: File,
}

impl Namespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Makes `command` run inside this namespace: the child enters it before exec.
    pub fn enter_in_child(&self, command: &mut Command) {
        let fd = self.handle.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and makes one
        // async-signal-safe system call (setns); it allocates nothing on success. The
        // cluster spawns its commands while its `Network` (and so this fd) is alive; had
        // the fd been closed, setns would fail (EBADF, or EINVAL for a non-namespace fd)
        // and so would the spawn, rather than run the child in the wrong namespace.
        unsafe {
            command.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(fd);
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)?;
                Ok(())
            });
        }
    }

    /// A handle with which another thread can enter this namespace ([`enter_thread`]).
    pub fn handle(&self) -> OwnedFd {
        self.handle
            .try_clone()
            .map(OwnedFd::from)
            .unwrap_or_else(|e| panic!("cannot duplicate the handle of {}: {e}", self.name))
    }
}

/// Moves the calling thread (only it) into the namespace `handle` refers to; sockets it
/// opens from then on belong to that namespace.
pub fn enter_thread(handle: impl AsFd) -> nix::Result<()> {
    nix::sched::setns(handle, CloneFlags::CLONE_NEWNET)
}

/// The namespaces of one cluster and the links between them. Dropping it deletes the
/// namespaces, which takes their links and firewall rules with them.
#[derive(Debug)]
pub struct Network {
    nodes: Vec<Namespace>,
    head: Option<Namespace>,
    /// Hosts that are neither head nor node: another client, a flooder.
    extra: Vec<Namespace>,
    /// `partitioned[i]`: node i's namespace holds the partition table.
    partitioned: Vec<bool>,
}

impl Network {
    /// Makes the head's namespace with its bridge, then one namespace per node joined to
    /// the bridge by a veth pair. Panics, with the failing command's output, when a step
    /// fails; whatever was made is deleted then.
    pub fn create(nodes: usize) -> Network {
        assert!(
            nodes <= NODES_MAX,
            "{nodes} nodes do not fit the subnet: at most {NODES_MAX}"
        );
        remove_leftovers();
        let n = NETWORKS_MADE.fetch_add(1, Ordering::Relaxed);
        let base = format!("{NAME_PREFIX}{}-{n}-", std::process::id());
        let mut network = Network {
            nodes: Vec::with_capacity(nodes),
            head: None,
            extra: Vec::new(),
            partitioned: vec![false; nodes],
        };
        let head = add_namespace(format!("{base}head"), HEAD_ADDR);
        let h = head.name.clone();
        network.head = Some(head);
        ip(&["-n", &h, "link", "set", "lo", "up"]);
        ip(&["-n", &h, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &h, "addr", "add", &cidr(HEAD_ADDR), "dev", "br0"]);
        ip(&["-n", &h, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            let host = NODE_HOST_FIRST + u8::try_from(i).expect("NODES_MAX bounds i");
            let node = add_namespace(format!("{base}node{i}"), Ipv4Addr::new(10, 47, 0, host));
            join_bridge(&h, &node, &format!("n{i}"));
            network.nodes.push(node);
        }
        network
    }

    /// Adds a host on the cluster's subnet that is neither head nor node (another client,
    /// a flooder): a namespace of its own named `...-<what>`, joined to the bridge, with
    /// the next address from 10.47.0.230.
    pub fn add_host(&mut self, what: &str) -> &Namespace {
        let k = self.extra.len();
        assert!(k < EXTRA_HOSTS_MAX, "at most {EXTRA_HOSTS_MAX} extra hosts");
        let host = EXTRA_HOST_FIRST + u8::try_from(k).expect("EXTRA_HOSTS_MAX bounds k");
        let head = self.head().name.clone();
        let base = head.strip_suffix("head").unwrap_or(&head).to_string();
        let ns = add_namespace(format!("{base}{what}"), Ipv4Addr::new(10, 47, 0, host));
        self.extra.push(ns);
        let ns = &self.extra[k];
        join_bridge(&head, ns, &format!("x{k}"));
        ns
    }

    pub fn head(&self) -> &Namespace {
        self.head.as_ref().expect("the head's namespace exists")
    }

    pub fn node(&self, i: usize) -> &Namespace {
        &self.nodes[i]
    }

    /// Drops every packet between node `i` and the head, in both directions, with an
    /// nftables table in the node's namespace.
    pub async fn partition(&mut self, i: usize) {
        assert!(!self.partitioned[i], "node {i} is already partitioned");
        let rules = [
            format!("table inet {PARTITION_TABLE} {{"),
            format!("  chain input {{ type filter hook input priority 0; ip saddr {HEAD_ADDR} drop; }}"),
            format!("  chain output {{ type filter hook output priority 0; ip daddr {HEAD_ADDR} drop; }}"),
            "}".to_string(),
        ]
        .join("\n");
        let file = tempfile::NamedTempFile::new().expect("cannot make a temporary file");
        std::fs::write(file.path(), rules).expect("cannot write the nft ruleset");
        let path = file.path().to_string_lossy().into_owned();
        self.nft(i, &["-f", &path]).await;
        self.partitioned[i] = true;
        let tables = self.nft(i, &["list", "tables"]).await;
        assert!(
            tables.stdout.contains(PARTITION_TABLE),
            "the partition table is not in node {i}'s namespace after adding it:\n{tables}"
        );
    }

    /// Removes node `i`'s partition and checks that no table of it is left.
    pub async fn heal(&mut self, i: usize) {
        assert!(self.partitioned[i], "node {i} is not partitioned");
        self.nft(i, &["delete", "table", "inet", PARTITION_TABLE])
            .await;
        self.partitioned[i] = false;
        let tables = self.nft(i, &["list", "tables"]).await;
        assert!(
            !tables.stdout.contains(PARTITION_TABLE),
            "the partition table is still in node {i}'s namespace after deleting it:\n{tables}"
        );
    }

    /// Runs `nft ARGS` in node `i`'s namespace; panics unless it succeeds.
    async fn nft(&self, i: usize, args: &[&str]) -> CmdOutput {
        let mut command = Command::new("nft");
        command.args(args);
        self.nodes[i].enter_in_child(&mut command);
        let out = run_command(command, TOOL_TIMEOUT).await;
        assert!(
            out.success(),
            "nft failed in {}:\n{out}",
            self.nodes[i].name
        );
        out
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self
            .nodes
            .iter()
            .chain(&self.extra)
            .chain(self.head.as_ref())
        {
            delete_namespace(&ns.name);
        }
    }
}

/// Joins `ns` to the bridge in the head's namespace `head` through a veth pair whose end
/// in the head's namespace is `port`; brings its loopback and `eth0` up with its address.
fn join_bridge(head: &str, ns: &Namespace, port: &str) {
    let name = ns.name.as_str();
    ip(&["-n", name, "link", "set", "lo", "up"]);
    // Made in the head's namespace with its peer put straight into the other one.
    ip(&[
        "-n", head, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name,
    ]);
    ip(&["-n", head, "link", "set", port, "master", "br0", "up"]);
    ip(&["-n", name, "addr", "add", &cidr(ns.addr), "dev", "eth0"]);
    ip(&["-n", name, "link", "set", "eth0", "up"]);
}

fn cidr(addr: Ipv4Addr) -> String {
    format!("{addr}/{PREFIX_LEN}")
}

/// Makes the namespace `name` and opens its handle. A namespace of that name can only be a
/// leftover of a dead process that had this one's id, so it is deleted first.
fn add_namespace(name: String, addr: Ipv4Addr) -> Namespace {
    let path = Path::new(NETNS_DIR).join(&name);
    if path.exists() {
        delete_namespace(&name);
    }
    ip(&["netns", "add", &name]);
    let handle = File::open(&path).unwrap_or_else(|e| {
        delete_namespace(&name);
        panic!("cannot open {}: {e}", path.display())
    });
    Namespace { name, addr, handle }
}

/// Deletes the namespaces of test processes that no longer exist (killed before their
/// `Drop` ran).
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return; // no namespace was ever named here
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            delete_namespace(&name);
        }
    }
}

/// `ip netns del NAME`; a failure is reported but does not panic, since it runs in `Drop`.
fn delete_namespace(name: &str) {
    match std::process::Command::new("ip")
        .args(["netns", "del", name])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "warning: cannot delete network namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("warning: cannot run `ip netns del {name}`: {e}"),
    }
}

/// Runs `ip ARGS` to completion; panics with its output unless it succeeds. Synchronous:
/// each call takes milliseconds, and setting up must finish before anything else.
fn ip(args: &[&str]) {
    let line = format!("ip {}", args.join(" "));
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{line}`: {e}"));
    assert!(
        out.status.success(),
        "`{line}` failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
