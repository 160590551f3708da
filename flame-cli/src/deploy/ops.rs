//! What `up`, `down` and `status` share: connecting to every member with bounded
//! parallelism, probing it, copying binaries, the per-member progress display, and the
//! per-member failure that names the host and the step.

use super::remote::{Remote, RemoteError, SshContext};
use super::scripts::{self, Manager, Probe, BINARIES};
use super::spec::{BinarySource, ClusterSpec, ManagerChoice, Member};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Extra time a copy may take per MiB, on top of the command timeout.
pub const COPY_TIME_PER_MIB: Duration = Duration::from_secs(1);

/// A member's failure: which step, and why.
#[derive(Debug, Clone)]
pub struct StepError {
    /// `connect`, `probe`, `check`, `install`, `init`, `token`, `join`, `start`,
    /// `credentials`, `ready`, `drain`, `stop`, `verify`.
    pub step: &'static str,
    pub message: String,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.message)
    }
}

/// `map_err` helper: a remote error at `step`.
pub fn at(step: &'static str) -> impl FnOnce(RemoteError) -> StepError {
    move |e| StepError {
        step,
        message: e.to_string(),
    }
}

/// A failure at `step` with `message`.
pub fn fail(step: &'static str, message: impl Into<String>) -> StepError {
    StepError {
        step,
        message: message.into(),
    }
}

/// The local binaries and their SHA-256, when they are copied.
#[derive(Debug, Clone, Default)]
pub struct LocalBinaries {
    /// Name → (path, hex digest, size in bytes).
    pub files: BTreeMap<&'static str, (PathBuf, String, u64)>,
}

impl LocalBinaries {
    /// Reads and hashes every binary of [`BINARIES`] in `dir`.
    pub async fn hash(dir: PathBuf) -> anyhow::Result<LocalBinaries> {
        tokio::task::spawn_blocking(move || {
            let mut files = BTreeMap::new();
            for name in BINARIES {
                let path = dir.join(name);
                let bytes = std::fs::read(&path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read {} to copy it to the hosts: {e}; build every binary \
                         first (`cargo build --release --bins`) or set binaries.dir",
                        path.display()
                    )
                })?;
                let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
                let size = bytes.len() as u64;
                files.insert(
                    name,
                    (path, flame_protocol::auth::hex(digest.as_ref()), size),
                );
            }
            Ok(LocalBinaries { files })
        })
        .await?
    }
}

/// A member reached and probed.
#[derive(Debug)]
pub struct Connected {
    pub remote: Remote,
    pub probe: Probe,
    /// Where its binaries are.
    pub bin_dir: String,
    pub manager: Manager,
}

/// Everything a command works with.
#[derive(Debug)]
pub struct Ctx {
    pub spec: ClusterSpec,
    pub ssh: SshContext,
    pub limit: Arc<Semaphore>,
    pub progress: Progress,
}

impl Ctx {
    /// Sets up SSH and the progress display for `spec`.
    pub fn new(spec: ClusterSpec, home: Option<&std::path::Path>) -> anyhow::Result<Ctx> {
        let ssh = SshContext::new(&spec.ssh, home)?;
        let limit = Arc::new(Semaphore::new(spec.ssh.parallel));
        let progress = Progress::new(&spec.members);
        Ok(Ctx {
            spec,
            ssh,
            limit,
            progress,
        })
    }

    /// Connects to member `i` and probes it (steps `connect`, `probe`).
    pub async fn connect(&self, i: usize) -> Result<Connected, StepError> {
        let member = &self.spec.members[i];
        self.progress.step(i, "connecting");
        let remote = self
            .ssh
            .connect(&member.ssh, &self.spec.ssh)
            .await
            .map_err(at("connect"))?;
        self.progress.step(i, "probing");
        let probed = remote
            .run(
                &scripts::probe(member, &self.spec.name),
                None,
                self.spec.ssh.command_timeout,
            )
            .await
            .map(|out| Probe::parse(&out.stdout))
            .map_err(at("probe"));
        let probe = match probed {
            Ok(p) => p,
            Err(e) => {
                remote.close().await;
                return Err(e);
            }
        };
        let manager = match (self.spec.manager, probe.systemd) {
            (ManagerChoice::Auto, true) | (ManagerChoice::Systemd, true) => Manager::Systemd,
            (ManagerChoice::Systemd, false) => {
                remote.close().await;
                return Err(fail(
                    "probe",
                    "service_manager is systemd, but systemd does not run this host",
                ));
            }
            _ => Manager::Supervisor,
        };
        let needed: &[&str] = match manager {
            Manager::Supervisor => &["sha256sum", "setsid"],
            Manager::Systemd => &["sha256sum"],
        };
        if let Some(tool) = probe.missing.iter().find(|t| needed.contains(&t.as_str())) {
            remote.close().await;
            return Err(fail(
                "probe",
                format!("`{tool}` is missing on the host (coreutils / util-linux)"),
            ));
        }
        let bin_dir = if member.install_dir.is_empty() {
            probe.bin_dir.clone()
        } else {
            member.install_dir.clone()
        };
        Ok(Connected {
            remote,
            probe,
            bin_dir,
            manager,
        })
    }

    /// Checks the host can run the binaries (step `check`): for a local build, the same
    /// OS and architecture; for installed ones, that they are there.
    pub fn check(&self, member: &Member, c: &Connected) -> Result<(), StepError> {
        match &self.spec.binaries {
            BinarySource::Local(_) => {
                let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
                if !c.probe.os.eq_ignore_ascii_case(os) || c.probe.arch != arch {
                    return Err(fail(
                        "check",
                        format!(
                            "the host is {} {}, the local build is for {os} {arch}; copy a \
                             build for it (binaries.dir) or install packages \
                             (binaries.source = \"installed\")",
                            c.probe.os, c.probe.arch
                        ),
                    ));
                }
                Ok(())
            }
            BinarySource::Installed(_) => {
                if c.probe.version.is_none() {
                    return Err(fail(
                        "check",
                        format!(
                            "{} does not run from {} (binaries.source is installed)",
                            member.role.binary(),
                            if c.bin_dir.is_empty() {
                                "PATH"
                            } else {
                                &c.bin_dir
                            }
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The binaries `member` needs whose checksum on the host differs from the local
    /// build's.
    pub fn differing(
        &self,
        member: &Member,
        local: &LocalBinaries,
        c: &Connected,
    ) -> Vec<&'static str> {
        scripts::binaries(member.role)
            .iter()
            .copied()
            .filter(|name| {
                local
                    .files
                    .get(name)
                    .is_some_and(|(_, hex, _)| c.probe.checksums.get(*name) != Some(hex))
            })
            .collect()
    }

    /// Copies `names` to member `i` (step `install`), each checked by checksum there.
    pub async fn install(
        &self,
        i: usize,
        local: &LocalBinaries,
        c: &Connected,
        names: &[&'static str],
    ) -> Result<(), StepError> {
        for (k, name) in names.iter().enumerate() {
            let Some((path, hex, size)) = local.files.get(name) else {
                continue;
            };
            self.progress
                .step(i, &format!("copying {name} ({}/{})", k + 1, names.len()));
            let timeout = self.spec.ssh.command_timeout
                + COPY_TIME_PER_MIB * u32::try_from(size >> 20).unwrap_or(u32::MAX);
            c.remote
                .run_with_file(&scripts::install(&c.bin_dir, name, hex), path, timeout)
                .await
                .map_err(|e| fail("install", format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// Runs the admin client on the head host: `flame ARGS` as the admin.
    pub async fn head_client(&self, head: &Connected, args: &str) -> Result<String, RemoteError> {
        let script = scripts::head_client(
            self.spec.head(),
            &head.bin_dir,
            &self.spec.head_address,
            args,
        );
        Ok(head
            .remote
            .run(&script, None, self.spec.ssh.command_timeout)
            .await?
            .stdout)
    }

    /// The nodes as the head lists them.
    pub async fn node_list(
        &self,
        head: &Connected,
    ) -> Result<Vec<flame_protocol::model::NodeInfo>, RemoteError> {
        let out = self.head_client(head, "node list --output json").await?;
        serde_json::from_str(&out).map_err(|e| {
            RemoteError::Unexpected(format!(
                "`flame node list --output json` printed what is not a node list ({e})"
            ))
        })
    }
}

/// Connects to every member at once (at most `ssh.parallel` at a time); member `i`'s
/// result is at `i`.
pub async fn connect_all(ctx: &Arc<Ctx>) -> Vec<Result<Connected, StepError>> {
    let tasks: Vec<_> = (0..ctx.spec.members.len())
        .map(|i| {
            let ctx = Arc::clone(ctx);
            tokio::spawn(async move {
                let _permit = ctx.limit.acquire().await;
                ctx.connect(i).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(
            task.await
                .unwrap_or_else(|e| Err(fail("connect", format!("the task failed: {e}")))),
        );
    }
    out
}

/// Closes every connection.
pub async fn close_all(conns: Vec<Option<Connected>>) {
    let closing: Vec<_> = conns
        .into_iter()
        .flatten()
        .map(|c| tokio::spawn(c.remote.close()))
        .collect();
    for c in closing {
        let _ = c.await;
    }
}

/// One spinner per member on stderr, only when stderr is a terminal; and, at debug level
/// (`RUST_LOG=debug`), a log line with the time each member's step took.
#[derive(Debug)]
pub struct Progress {
    bars: Vec<ProgressBar>,
    _multi: Option<MultiProgress>,
    labels: Vec<String>,
    /// Each member's current step and when it began.
    steps: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
}

impl Progress {
    fn new(members: &[Member]) -> Progress {
        let labels: Vec<String> = members
            .iter()
            .map(|m| format!("{} {}", m.label(), m.role.as_str()))
            .collect();
        let now = std::time::Instant::now();
        let steps = std::sync::Mutex::new(vec![("waiting".to_string(), now); members.len()]);
        if !std::io::stderr().is_terminal() {
            return Progress {
                bars: members.iter().map(|_| ProgressBar::hidden()).collect(),
                _multi: None,
                labels,
                steps,
            };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {prefix:<28} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = members
            .iter()
            .map(|m| {
                let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                bar.set_prefix(format!("{} {}", m.label(), m.role.as_str()));
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .collect();
        Progress {
            bars,
            _multi: Some(multi),
            labels,
            steps,
        }
    }

    /// Shows what member `i` is doing.
    pub fn step(&self, i: usize, what: &str) {
        self.timed(i, what);
        if let Some(bar) = self.bars.get(i) {
            bar.set_message(what.to_string());
        }
    }

    /// Member `i` is done.
    pub fn done(&self, i: usize, what: &str) {
        self.timed(i, what);
        if let Some(bar) = self.bars.get(i) {
            bar.finish_with_message(what.to_string());
        }
    }

    /// Logs how long member `i`'s previous step took, and starts timing `what`.
    fn timed(&self, i: usize, what: &str) {
        let Ok(mut steps) = self.steps.lock() else {
            return;
        };
        if let (Some((previous, began)), Some(label)) = (steps.get_mut(i), self.labels.get(i)) {
            tracing::debug!(
                "{label}: {previous} took {} ms",
                began.elapsed().as_millis()
            );
            *previous = what.to_string();
            *began = std::time::Instant::now();
        }
    }

    /// Clears every line, before the table is printed.
    pub fn clear(&self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
    }
}

/// `flame-head 0.1.0` → `0.1.0`.
pub fn short_version(version: Option<&str>) -> String {
    version
        .and_then(|v| v.split_whitespace().last())
        .unwrap_or("-")
        .to_string()
}
