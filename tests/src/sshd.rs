//! Hosts reachable by SSH for `flame cluster` tests: a real `sshd` in each network
//! namespace of a [`Network`], on port 22 of that namespace's address, with a host key and
//! a client key made for the test, accepting that key for root.
//!
//! Every file lives in the test's folder: the keys, `authorized_keys`, each sshd's
//! configuration and log, and the client's known-hosts file. Nothing on the machine's own
//! ssh set-up is read or changed, except that `/run/sshd` (sshd's privilege-separation
//! folder, empty) is made when missing. Each sshd runs in the foreground (`-D`) as a child
//! of the test and is killed when its [`Sshd`] is dropped.

use crate::netns::Namespace;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on sshd saying it listens.
pub const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the tests need on the machine: `sshd` (openssh-server), `ssh` and `ssh-keygen`
/// (openssh-client); `None` when all are there.
pub fn missing_prerequisite() -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = |tool: &str| std::env::split_paths(&path).any(|d| d.join(tool).is_file());
    for (tool, package) in [
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ] {
        if !on_path(tool) {
            return Some(format!(
                "`{tool}` is not on PATH ({}); install {package}",
                path.to_string_lossy()
            ));
        }
    }
    None
}

/// The keys of a test's SSH hosts.
#[derive(Debug)]
pub struct SshKeys {
    /// The folder holding everything.
    pub dir: PathBuf,
    /// The client's private key (what `identity_file` names).
    pub client_key: PathBuf,
    /// The known-hosts file the client should use.
    pub known_hosts: PathBuf,
    host_key: PathBuf,
    authorized_keys: PathBuf,
}

impl SshKeys {
    /// Makes an ed25519 host key and client key in `dir`, and authorizes the client key.
    pub fn create(dir: &Path) -> SshKeys {
        std::fs::create_dir_all(dir).unwrap();
        let keygen = |path: &Path| {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "flame-test", "-f"])
                .arg(path)
                .output()
                .expect("cannot run ssh-keygen");
            assert!(
                out.status.success(),
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let host_key = dir.join("host_key");
        let client_key = dir.join("client_key");
        keygen(&host_key);
        keygen(&client_key);
        let authorized_keys = dir.join("authorized_keys");
        std::fs::copy(dir.join("client_key.pub"), &authorized_keys).unwrap();
        SshKeys {
            dir: dir.to_path_buf(),
            client_key,
            known_hosts: dir.join("known_hosts"),
            host_key,
            authorized_keys,
        }
    }
}

/// One sshd, in a namespace, killed on drop.
#[derive(Debug)]
pub struct Sshd {
    addr: Ipv4Addr,
    config: PathBuf,
    log: PathBuf,
    /// The namespace's handle, entered between fork and exec.
    netns: OwnedFd,
    child: Option<Child>,
}

impl Sshd {
    /// Writes the configuration of an sshd on `ns`'s address, port 22, and starts it.
    pub fn start(keys: &SshKeys, ns: &Namespace) -> Sshd {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let name = format!("sshd-{}", ns.addr());
        let config = keys.dir.join(format!("{name}.conf"));
        std::fs::write(
            &config,
            format!(
                "ListenAddress {addr}:22\nHostKey {host_key}\nPidFile none\n\
                 AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nMaxSessions 64\nMaxStartups 64:30:128\nLogLevel INFO\n",
                addr = ns.addr(),
                host_key = keys.host_key.display(),
                auth = keys.authorized_keys.display(),
            ),
        )
        .unwrap();
        let mut sshd = Sshd {
            addr: ns.addr(),
            config,
            log: keys.dir.join(format!("{name}.log")),
            netns: ns.handle(),
            child: None,
        };
        sshd.restart();
        sshd
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Starts sshd (again) and waits until it listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "sshd on {} already runs", self.addr);
        let log = std::fs::File::create(&self.log).unwrap();
        let sshd = which("sshd");
        // Only the network namespace is entered (not `ip netns exec`, which also remounts
        // /sys, and with it the cgroup hierarchy the nodes need). sshd wants an absolute
        // path, to re-exec itself.
        let mut command = Command::new(&sshd);
        let fd = self.netns.as_raw_fd();
        // SAFETY: runs in the forked child before exec and makes one async-signal-safe
        // system call (setns); `self.netns` outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(fd);
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(())
            });
        }
        let child = command
            .args(["-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start sshd");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("Server listening on") {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("sshd on {} exited with {status}:\n{text}", self.addr);
            }
            assert!(
                started.elapsed() < SSHD_READY_TIMEOUT,
                "sshd on {} did not listen within {SSHD_READY_TIMEOUT:?}:\n{text}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the listening sshd: no new connection is accepted. Open connections (served by
    /// sshd processes of their own) end when their clients close them.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The absolute path of `tool` on `PATH`.
fn which(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{tool}` is not on PATH"))
}

/// Pids of processes whose executable lies under `dir` (a test's own install folders),
/// with their executables.
pub fn processes_under(dir: &Path) -> Vec<(i32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            let shown = exe.to_string_lossy();
            let exe = PathBuf::from(shown.trim_end_matches(" (deleted)"));
            exe.starts_with(dir).then_some((pid, exe))
        })
        .collect()
}

/// Kills (`SIGKILL`) every process whose executable lies under `dir`: what a failed test
/// left of the daemons it started on its hosts.
pub fn kill_under(dir: &Path) {
    for (pid, _) in processes_under(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
