//! The packages as an admin gets them. `packaging/build.sh --profile dev --no-build` packs
//! the binaries this test run built into .deb and .rpm files; then, on this machine:
//!
//! 1. `lintian` finds no error in the .deb files, and every warning it gives is named in
//!    packaging/README.md, which says why it stays;
//! 2. `dpkg -i` installs them; `systemd-analyze verify` accepts the installed units;
//! 3. systemd is not PID 1 here, so the test starts the daemons as the installed units say:
//!    their `ExecStartPre=` and `ExecStart=` lines, as their `User=`, in the folders their
//!    `StateDirectory=`, `RuntimeDirectory=` and `LogsDirectory=` would make. The node first
//!    joins with a token from the installed `flame-head token create --node`, as an admin
//!    would; the addresses come from edits to the installed /etc/flame files, which a
//!    reinstall must keep. Then the installed `flame ping -t 1000` completes;
//! 4. `dpkg -r` keeps configuration and state, and `dpkg --purge` removes every file the
//!    packages installed or their daemons made, but the `flame` user (Debian keeps system
//!    users);
//! 5. `rpm -qpl` lists the expected files, `/etc/flame` files are config files, and the
//!    head's package creates its user before it installs.
//!
//! Needs root, dpkg, lintian, rpm, systemd-analyze, cargo-deb, cargo-generate-rpm, strip and
//! adduser (.ci/run installs them); the flame packages must not be installed already, since
//! the test purges them. The head listens on a free loopback port of its own, so it does
//! not meet other tests' or people's heads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::ready::{HEAD_READY_PREFIX, NODE_READY_PREFIX};
use flame_tests::cgroup::NodeCgroups;
use flame_tests::cluster::{log_section, Proc, FOREIGN_ENV, READY_TIMEOUT, STOP_TIMEOUT};
use flame_tests::command::bin_dir;
use flame_tests::{prerequisites, run_command, CmdOutput};
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

const TEST: &str = "packages_install_run_and_purge";
const PACKAGES: [&str; 3] = ["flame-head", "flame-node", "flame-cli"];
/// Building the packages (stripping, generating docs, compressing) on a busy 2-core machine.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// lintian, dpkg and rpm runs.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
/// Folders the packages' daemons make (through their units) and purge deletes.
const STATE_DIRS: [&str; 4] = [
    "/var/lib/flame",
    "/var/log/flame",
    "/run/flame",
    "/etc/flame",
];

#[tokio::test(flavor = "multi_thread")]
async fn packages_install_run_and_purge() {
    if !prerequisites::root(TEST) {
        return;
    }
    for (tool, package) in [
        ("dpkg", "dpkg"),
        ("lintian", "lintian"),
        ("rpm", "rpm"),
        ("systemd-analyze", "systemd"),
        ("cargo-deb", "cargo-deb (cargo install --locked cargo-deb)"),
        (
            "cargo-generate-rpm",
            "cargo-generate-rpm (cargo install --locked cargo-generate-rpm)",
        ),
        ("strip", "binutils"),
        ("adduser", "adduser"),
    ] {
        if !prerequisites::on_path(TEST, tool, package) {
            return;
        }
    }
    let installed: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|p| package_installed(p))
        .collect();
    if !prerequisites::require(
        TEST,
        (!installed.is_empty()).then(|| {
            format!("{installed:?} are installed on this machine, and this test would purge them")
        }),
    ) {
        return;
    }
    for dir in [
        "/var/lib/flame/head",
        "/var/lib/flame/node-tls",
        "/etc/flame",
    ] {
        let busy = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
        if !prerequisites::require(
            TEST,
            busy.then(|| format!("{dir} holds files that purging the packages would delete")),
        ) {
            return;
        }
    }

    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = work.path().join("packages");
    let debs: Vec<PathBuf> = build_packages(&out, "deb").await;
    let rpms: Vec<PathBuf> = package_files(&out, "rpm");
    assert_eq!(rpms.len(), 3, "three .rpm files: {rpms:?}");

    lintian_is_clean(&debs).await;
    rpms_list_the_expected_files(&out).await;

    let mut guard = Installation::new(work.path());
    // Before dpkg runs: a half-done install is purged too.
    guard.installed = true;
    let mut dpkg = Command::new("dpkg");
    dpkg.arg("-i").args(&debs);
    tool(dpkg).await;
    let files = installed_files().await;
    assert!(
        nix::unistd::User::from_name("flame").unwrap().is_some(),
        "installing flame-head did not create the `flame` user"
    );
    for (package, conffile) in [
        ("flame-head", "/etc/flame/head.toml"),
        ("flame-node", "/etc/flame/node.toml"),
        ("flame-cli", "/etc/flame/flame.toml"),
    ] {
        let listed = query(package, "${Conffiles}").await;
        assert!(
            listed.contains(conffile),
            "{package} does not mark {conffile} as a conffile: {listed}"
        );
        let depends = query(package, "${Depends}").await;
        assert!(
            depends.contains("libc6 (>= 2."),
            "{package} does not depend on a minimum libc6: {depends}"
        );
    }
    let head_unit = Unit::load(&unit_path(&files, "flame-head.service"));
    let node_unit = Unit::load(&unit_path(&files, "flame-node.service"));
    let mut verify = Command::new("systemd-analyze");
    verify
        .arg("verify")
        .arg(&head_unit.path)
        .arg(&node_unit.path);
    let verified = tool(verify).await;
    assert!(
        verified.stderr.trim().is_empty() && verified.stdout.trim().is_empty(),
        "systemd-analyze verify has something to say:\n{verified}"
    );
    // What the issue asks of the units: restarts, the journal, the head's hardening.
    for (unit, settings) in [
        (
            &head_unit,
            &[
                ("User", "flame"),
                ("Restart", "on-failure"),
                ("StandardError", "journal"),
                ("NoNewPrivileges", "yes"),
                ("ProtectSystem", "strict"),
                ("ProtectHome", "yes"),
            ][..],
        ),
        (
            &node_unit,
            &[
                ("User", "root"),
                ("Restart", "on-failure"),
                ("StandardError", "journal"),
                ("Delegate", "yes"),
            ][..],
        ),
    ] {
        for (key, value) in settings {
            assert_eq!(
                unit.service(key),
                Some(*value),
                "{}: {key}=",
                unit.path.display()
            );
        }
    }

    // An admin's edits: the head on a loopback port of its own, the node pointed at it.
    let port = free_udp_port();
    let head_address = format!("127.0.0.1:{port}");
    let node_name = format!("flame-pkg-test-{}", std::process::id());
    edit_conffile(
        "/etc/flame/head.toml",
        "# listen = \"0.0.0.0:7470\"",
        &format!("listen = \"{head_address}\""),
    );
    edit_conffile(
        "/etc/flame/node.toml",
        "head = \"head.example.org:7470\"",
        &format!("head = \"{head_address}\""),
    );
    edit_conffile(
        "/etc/flame/node.toml",
        "# name = \"gpu-07\"",
        &format!("name = \"{node_name}\""),
    );
    // An upgrade (here: the same version again) keeps local edits to conffiles.
    let mut reinstall = Command::new("dpkg");
    reinstall.arg("-i").args(&debs);
    tool(reinstall).await;
    let head_toml = std::fs::read_to_string("/etc/flame/head.toml").unwrap();
    assert!(
        head_toml.contains(&format!("listen = \"{head_address}\"")),
        "reinstalling lost the edit to /etc/flame/head.toml:\n{head_toml}"
    );

    // The head, as its unit starts it: ExecStartPre runs `init` on the first start.
    let data_dir = Path::new("/var/lib/flame/head");
    assert!(
        head_unit.covers_state(data_dir),
        "the head's data folder {} is not one of its unit's StateDirectory= folders, which \
         ProtectSystem=strict leaves writable",
        data_dir.display()
    );
    assert!(
        !node_unit.conditions_hold(),
        "the node's unit would start before the node has joined"
    );
    let head_log = work.path().join("head.log");
    let head = head_unit.start("flame-head", &head_log).await;
    let head = guard.head.insert(head);
    let listening = head
        .wait_line(HEAD_READY_PREFIX, 0, READY_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("the installed flame-head did not start: {e}"));
    assert_eq!(listening.1, head_address);
    let ca = data_dir.join("tls/ca.crt");
    let ca_owner = std::fs::metadata(&ca)
        .unwrap_or_else(|e| panic!("{} after the first start: {e}", ca.display()))
        .uid();
    assert_eq!(
        Some(ca_owner),
        nix::unistd::User::from_name("flame")
            .unwrap()
            .map(|u| u.uid.as_raw()),
        "init did not run as the unit's user"
    );

    // The post-install step on a node: join with a token from the head.
    let mut create = Command::new("/usr/bin/flame-head");
    create.args([
        "--config",
        "/etc/flame/head.toml",
        "token",
        "create",
        "--node",
    ]);
    let token = tool(clean_env(create)).await.stdout;
    let token_file = work.path().join("join.token");
    flame_tests::cluster::write_private(&token_file, token.trim().as_bytes());
    let mut join = Command::new("/usr/bin/flame-node");
    join.args(["join", "--config", "/etc/flame/node.toml", "--token-file"])
        .arg(&token_file);
    tool(clean_env(join)).await;
    assert!(
        node_unit.conditions_hold(),
        "after `flame-node join`, the node's unit conditions still do not hold"
    );
    let node_toml = std::fs::read_to_string("/etc/flame/node.toml").unwrap();
    for key in ["work_dir", "tls_dir"] {
        let dir = toml_path(&node_toml, key);
        assert!(
            node_unit.covers_state(&dir),
            "node.toml's {key} {} is not a StateDirectory= of the node's unit",
            dir.display()
        );
    }
    assert_eq!(
        node_unit.directories("RuntimeDirectory", "/run"),
        vec![toml_path(&node_toml, "runtime_dir")]
    );
    assert_eq!(
        node_unit.directories("LogsDirectory", "/var/log"),
        vec![toml_path(&node_toml, "log_dir")]
    );

    let node_log = work.path().join("node.log");
    let node = node_unit.start("flame-node", &node_log).await;
    let node = guard.node.insert(node);
    let registered = node
        .wait_line(NODE_READY_PREFIX, 0, READY_TIMEOUT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the installed flame-node did not register: {e}\n{}",
                log_section("flame-head", &head_log)
            )
        });
    assert_eq!(registered.1, node_name);
    guard.node_cgroup = node.pid().map(|pid| {
        (
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap(),
            format!("flame-node-{node_name}"),
        )
    });

    // What a user of the cluster runs, as root with the admin token `init` wrote.
    let mut ping = Command::new("/usr/bin/flame");
    ping.args(["ping", "-t", "1000"])
        .env("FLAME_HEAD", &head_address)
        .env("FLAME_TOKEN_FILE", data_dir.join("admin.token"))
        .env("XDG_CONFIG_HOME", work.path().join("no-config"));
    let pinged = run_command(
        clean_env_but(ping, &["FLAME_HEAD", "FLAME_TOKEN_FILE"]),
        TOOL_TIMEOUT,
    )
    .await;
    assert!(
        pinged.success() && pinged.stdout.contains("1,000 tasks completed"),
        "flame ping against the installed daemons:\n{pinged}\n{}\n{}",
        log_section("flame-head", &head_log),
        log_section("flame-node", &node_log)
    );

    guard.stop_daemons().await;

    // Remove keeps configuration and state; purge deletes them.
    let mut remove = Command::new("dpkg");
    remove.arg("-r").args(PACKAGES);
    tool(remove).await;
    for kept in [
        "/etc/flame/head.toml",
        "/etc/flame/node.toml",
        "/var/lib/flame/head/tls/ca.crt",
        "/var/lib/flame/node-tls/node.key",
    ] {
        assert!(Path::new(kept).exists(), "dpkg -r deleted {kept}");
    }
    for gone in [
        "/usr/bin/flame-head",
        "/usr/bin/flame-node",
        "/usr/bin/flame",
    ] {
        assert!(!Path::new(gone).exists(), "dpkg -r left {gone}");
    }
    let mut purge = Command::new("dpkg");
    purge.arg("--purge").args(PACKAGES);
    tool(purge).await;
    guard.installed = false;
    let mut left: Vec<String> = files
        .iter()
        .filter(|f| std::fs::symlink_metadata(f).is_ok_and(|m| !m.is_dir()))
        .map(|f| f.display().to_string())
        .collect();
    left.extend(
        STATE_DIRS
            .iter()
            .filter(|d| Path::new(d).exists())
            .map(|d| d.to_string()),
    );
    left.extend(systemd_leftovers());
    assert!(left.is_empty(), "dpkg --purge left {left:?}");
    assert!(
        nix::unistd::User::from_name("flame").unwrap().is_some(),
        "purge removed the `flame` user, which Debian keeps"
    );
}

/// Runs packaging/build.sh on the binaries of this test run; returns the files of `kind`.
async fn build_packages(out: &Path, kind: &str) -> Vec<PathBuf> {
    let bins = bin_dir();
    let target = bins
        .parent()
        .expect("the binaries' folder is in the target folder");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut build = Command::new(root.join("packaging/build.sh"));
    build
        .args(["--profile", "dev", "--no-build", "--out"])
        .arg(out)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(root);
    let built = run_command(build, BUILD_TIMEOUT).await;
    assert!(built.success(), "packaging/build.sh failed:\n{built}");
    let files = package_files(out, kind);
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for package in PACKAGES {
        assert!(
            names.iter().any(|n| n.starts_with(&format!("{package}_"))),
            "no {package} .{kind} in {names:?}"
        );
    }
    files
}

fn package_files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files
}

/// No errors, and each warning's tag is justified in packaging/README.md.
async fn lintian_is_clean(debs: &[PathBuf]) {
    let mut lintian = Command::new("lintian");
    lintian.args(debs);
    let linted = run_command(lintian, TOOL_TIMEOUT).await;
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/README.md");
    let readme = std::fs::read_to_string(&readme).unwrap();
    let mut problems = Vec::new();
    for line in linted.stdout.lines() {
        let Some((severity, rest)) = line.split_once(": ") else {
            continue;
        };
        let tag = rest.split_whitespace().nth(1).unwrap_or_default();
        match severity {
            "E" => problems.push(format!("error: {line}")),
            "W" if !readme.contains(&format!("`{tag}`")) => problems.push(format!(
                "warning not justified in packaging/README.md: {line}"
            )),
            _ => {}
        }
    }
    assert!(
        problems.is_empty(),
        "lintian:\n{}\n\n{linted}",
        problems.join("\n")
    );
    // lintian exits 1 on errors and 0 otherwise; anything else means it did not run.
    assert_eq!(linted.status.code(), Some(0), "{linted}");
}

/// `rpm -qpl` of each package holds its programs, configuration, unit, man pages and
/// completions; the configuration is marked as such; the head creates its user first.
async fn rpms_list_the_expected_files(out: &Path) {
    let expected: [(&str, &[&str]); 3] = [
        (
            "flame-head",
            &[
                "/usr/bin/flame-head",
                "/etc/flame/head.toml",
                "/usr/lib/systemd/system/flame-head.service",
                "/usr/share/man/man8/flame-head.8.gz",
                "/usr/share/man/man8/flame-head-token-create.8.gz",
                "/usr/share/bash-completion/completions/flame-head",
                "/usr/share/zsh/site-functions/_flame-head",
                "/usr/share/fish/vendor_completions.d/flame-head.fish",
            ],
        ),
        (
            "flame-node",
            &[
                "/usr/bin/flame-node",
                "/usr/bin/flame-ping",
                "/usr/bin/flame-shell",
                "/usr/bin/flame-mpi-agent",
                "/etc/flame/node.toml",
                "/usr/lib/systemd/system/flame-node.service",
                "/usr/share/man/man8/flame-node.8.gz",
                "/usr/share/man/man8/flame-node-join.8.gz",
                "/usr/share/bash-completion/completions/flame-node",
                "/usr/share/zsh/site-functions/_flame-node",
                "/usr/share/fish/vendor_completions.d/flame-node.fish",
            ],
        ),
        (
            "flame-cli",
            &[
                "/usr/bin/flame",
                "/usr/bin/flame-shim-check",
                "/etc/flame/flame.toml",
                "/usr/share/man/man1/flame.1.gz",
                "/usr/share/man/man1/flame-ping.1.gz",
                "/usr/share/man/man1/flame-completions.1.gz",
                "/usr/share/bash-completion/completions/flame",
                "/usr/share/zsh/site-functions/_flame",
                "/usr/share/fish/vendor_completions.d/flame.fish",
            ],
        ),
    ];
    let rpms = package_files(out, "rpm");
    for (package, files) in expected {
        let rpm = rpms
            .iter()
            .find(|f| {
                f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{package}-0"))
            })
            .unwrap_or_else(|| panic!("no {package} .rpm in {rpms:?}"));
        let listed = rpm_query(rpm, &["-qpl"]).await;
        let listed: BTreeSet<&str> = listed.lines().collect();
        let missing: Vec<&&str> = files.iter().filter(|f| !listed.contains(**f)).collect();
        assert!(
            missing.is_empty(),
            "{} lacks {missing:?}; it lists {listed:?}",
            rpm.display()
        );
        let config = rpm_query(rpm, &["-qpc"]).await;
        let etc: Vec<&&str> = files.iter().filter(|f| f.starts_with("/etc/")).collect();
        for file in etc {
            assert!(
                config.contains(*file),
                "{file} is no config file in {package}.rpm: {config}"
            );
        }
        let requires = rpm_query(rpm, &["-qpR"]).await;
        assert!(
            requires.contains("libc.so.6(GLIBC_2."),
            "{package}.rpm does not require a minimum glibc: {requires}"
        );
        if package == "flame-head" {
            let scripts = rpm_query(rpm, &["-qp", "--scripts"]).await;
            assert!(
                scripts.contains("preinstall") && scripts.contains("useradd -r -g flame"),
                "flame-head.rpm does not create its user before installing: {scripts}"
            );
        }
    }
}

async fn rpm_query(rpm: &Path, args: &[&str]) -> String {
    let mut command = Command::new("rpm");
    command.args(args).arg(rpm);
    tool(command).await.stdout
}

/// Runs a system tool and panics, showing everything, unless it succeeds.
async fn tool(command: Command) -> CmdOutput {
    let output = run_command(command, TOOL_TIMEOUT).await;
    output.assert_success();
    output
}

fn package_installed(package: &str) -> bool {
    std::process::Command::new("dpkg-query")
        .args(["-W", "--showformat=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

async fn query(package: &str, format: &str) -> String {
    let mut command = Command::new("dpkg-query");
    command.args(["-W", &format!("--showformat={format}"), package]);
    tool(command).await.stdout
}

/// The files (not folders) the three packages installed.
async fn installed_files() -> Vec<PathBuf> {
    let mut command = Command::new("dpkg");
    command.arg("-L").args(PACKAGES);
    tool(command)
        .await
        .stdout
        .lines()
        .map(PathBuf::from)
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()))
        .collect()
}

fn unit_path(files: &[PathBuf], name: &str) -> PathBuf {
    files
        .iter()
        .find(|f| f.ends_with(name) && f.to_string_lossy().contains("/systemd/system/"))
        .unwrap_or_else(|| panic!("no unit {name} installed: {files:?}"))
        .clone()
}

/// What enabling left of a unit in /etc/systemd and deb-systemd-helper's state.
fn systemd_leftovers() -> Vec<String> {
    let mut left = Vec::new();
    let mut walk = vec![
        PathBuf::from("/etc/systemd/system"),
        PathBuf::from("/var/lib/systemd/deb-systemd-helper-enabled"),
        PathBuf::from("/var/lib/systemd/deb-systemd-helper-masked"),
    ];
    while let Some(dir) = walk.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("flame-head.") || name.starts_with("flame-node.") {
                left.push(path.display().to_string());
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk.push(path);
            }
        }
    }
    left
}

/// Replaces the line `from` of a conffile with `to`, as an admin's editor would.
fn edit_conffile(path: &str, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with(from))
        .unwrap_or_else(|| panic!("{path} has no line `{from}`:\n{text}"));
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[at] = to.to_string();
    std::fs::write(path, edited.join("\n") + "\n").unwrap();
}

/// The quoted path of `key = "..."` in a TOML file's top level.
fn toml_path(text: &str, key: &str) -> PathBuf {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .and_then(|(_, v)| v.split('"').nth(1))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no `{key} = \"...\"` in:\n{text}"))
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap()
        .port()
}

fn clean_env(command: Command) -> Command {
    clean_env_but(command, &[])
}

fn clean_env_but(mut command: Command, keep: &[&str]) -> Command {
    for var in FOREIGN_ENV.iter().filter(|v| !keep.contains(v)) {
        command.env_remove(var);
    }
    command
}

/// What the test installed and started; on drop (also when the test fails) it kills the
/// daemons, removes the node's cgroups, purges the packages and removes the `flame` user
/// it made.
struct Installation {
    installed: bool,
    head: Option<Proc>,
    node: Option<Proc>,
    /// The node's /proc/PID/cgroup and its cgroup root's name.
    node_cgroup: Option<(String, String)>,
    user_existed: bool,
    work: PathBuf,
}

impl Installation {
    fn new(work: &Path) -> Self {
        Installation {
            installed: false,
            head: None,
            node: None,
            node_cgroup: None,
            user_existed: nix::unistd::User::from_name("flame")
                .ok()
                .flatten()
                .is_some(),
            work: work.to_path_buf(),
        }
    }

    /// SIGTERM, as `systemctl stop` sends: each must exit in time.
    async fn stop_daemons(&mut self) {
        if let Some(mut node) = self.node.take() {
            node.terminate(STOP_TIMEOUT).await;
        }
        if let Some(mut head) = self.head.take() {
            head.terminate(STOP_TIMEOUT).await;
        }
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        for daemon in [self.node.as_mut(), self.head.as_mut()]
            .into_iter()
            .flatten()
        {
            daemon.kill();
        }
        if let Some((proc_cgroup, root)) = &self.node_cgroup {
            std::thread::sleep(Duration::from_millis(200));
            if let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") {
                for v2 in [false, true] {
                    if let Ok(found) = NodeCgroups::locate(proc_cgroup, &mountinfo, root, v2) {
                        found.remove_all(Duration::from_secs(5));
                    }
                }
            }
        }
        if self.installed {
            let purged = std::process::Command::new("dpkg")
                .arg("--purge")
                .args(PACKAGES)
                .output();
            if !purged.is_ok_and(|o| o.status.success()) {
                eprintln!("cleanup: dpkg --purge {PACKAGES:?} failed; purge them by hand");
            }
        }
        if !self.user_existed {
            // The packages keep the user on purge, as Debian does; the test does not.
            let _ = std::process::Command::new("userdel").arg("flame").output();
            let _ = std::process::Command::new("groupdel").arg("flame").output();
        }
        eprintln!("packages test folder: {}", self.work.display());
    }
}

/// An installed systemd unit file, read as far as this test needs: the `[Service]`
/// settings that say how the daemon starts.
#[derive(Debug)]
struct Unit {
    path: PathBuf,
    /// (section, key, value), in file order; a key may repeat.
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut entries = Vec::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "{}: continued lines are not read by this test: {line}",
                path.display()
            );
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
            } else if let Some((key, value)) = line.split_once('=') {
                entries.push((
                    section.clone(),
                    key.trim().to_string(),
                    value.trim().to_string(),
                ));
            }
        }
        Unit {
            path: path.to_path_buf(),
            entries,
        }
    }

    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// The last value of a `[Service]` setting, as systemd takes it.
    fn service(&self, key: &str) -> Option<&str> {
        self.values("Service", key).last().copied()
    }

    /// The folders a `StateDirectory=`-like setting makes under `base`.
    fn directories(&self, key: &str, base: &str) -> Vec<PathBuf> {
        self.values("Service", key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(|d| Path::new(base).join(d))
            .collect()
    }

    fn covers_state(&self, dir: &Path) -> bool {
        self.directories("StateDirectory", "/var/lib")
            .iter()
            .any(|d| dir.starts_with(d))
    }

    /// Every `ConditionPathExists=` holds.
    fn conditions_hold(&self) -> bool {
        self.values("Unit", "ConditionPathExists")
            .iter()
            .all(|p| match p.strip_prefix('!') {
                Some(p) => !Path::new(p).exists(),
                None => Path::new(p).exists(),
            })
    }

    /// Makes the unit's folders, runs its `ExecStartPre=` lines to completion and starts
    /// its `ExecStart=` line, each as its `User=` and `Group=`, with `UMask=`, in the
    /// clean environment systemd gives services.
    async fn start(&self, name: &str, log: &Path) -> Proc {
        let user_name = self.service("User").unwrap_or("root");
        let user = nix::unistd::User::from_name(user_name)
            .unwrap()
            .unwrap_or_else(|| panic!("{}: no user {user_name}", self.path.display()));
        let gid = match self.service("Group") {
            Some(group) => {
                nix::unistd::Group::from_name(group)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{}: no group {group}", self.path.display()))
                    .gid
            }
            None => user.gid,
        };
        for (key, base) in [
            ("StateDirectory", "/var/lib"),
            ("RuntimeDirectory", "/run"),
            ("LogsDirectory", "/var/log"),
        ] {
            let mode = self
                .service(&format!("{key}Mode"))
                .map_or(0o755, |m| u32::from_str_radix(m, 8).unwrap());
            for dir in self.directories(key, base) {
                // Parents are root's, 0755; the folder itself the unit's user's.
                std::fs::create_dir_all(&dir).unwrap();
                std::os::unix::fs::chown(&dir, Some(user.uid.as_raw()), Some(gid.as_raw()))
                    .unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        let umask = self.service("UMask").unwrap_or("0022");
        let environment: Vec<(String, String)> = self
            .values("Service", "Environment")
            .iter()
            .flat_map(|v| v.split_whitespace())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let command = |line: &str| -> (bool, Command) {
            let (ignore_failure, argv) = exec_line(line);
            // umask first, as systemd sets it before exec.
            let mut command = Command::new("/bin/sh");
            command
                .arg("-c")
                .arg(format!("umask {umask} && exec \"$@\""))
                .arg("sh")
                .args(&argv)
                .env_clear()
                .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
                .env("HOME", &user.dir)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name)
                .env("SHELL", &user.shell)
                .envs(environment.iter().map(|(k, v)| (k, v)))
                .current_dir("/")
                .uid(user.uid.as_raw())
                .gid(gid.as_raw());
            (ignore_failure, command)
        };
        for line in self.values("Service", "ExecStartPre") {
            let (ignore_failure, pre) = command(line);
            let ran = run_command(pre, TOOL_TIMEOUT).await;
            assert!(
                ignore_failure || ran.success(),
                "{}: ExecStartPre failed:\n{ran}",
                self.path.display()
            );
        }
        let start = self.values("Service", "ExecStart");
        assert_eq!(start.len(), 1, "{}: one ExecStart=", self.path.display());
        let (_, command) = command(start[0]);
        Proc::start(name.to_string(), command, log, None)
    }
}

/// An `ExecStart=`-style line: whether a `-` prefix ignores its failure, and its words,
/// with systemd's quoting. Specifiers (`%`) and variables (`$`) are not expanded; a line
/// with them fails the test rather than run differently from systemd.
fn exec_line(line: &str) -> (bool, Vec<String>) {
    let mut rest = line.trim();
    let mut ignore_failure = false;
    while let Some(prefix) = rest.chars().next().filter(|c| "-@:+!".contains(*c)) {
        assert_eq!(
            prefix, '-',
            "exec prefix `{prefix}` is not supported: {line}"
        );
        ignore_failure = true;
        rest = &rest[1..];
    }
    assert!(
        !rest.contains('%') && !rest.contains('$'),
        "specifiers and variables are not expanded by this test: {line}"
    );
    let mut words = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            break;
        };
        let mut word = String::new();
        if first == '\'' || first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some(c) if c == first => break,
                    Some('\\') if first == '"' => word.extend(chars.next()),
                    Some(c) => word.push(c),
                    None => panic!("unterminated quote in: {line}"),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    word.extend(chars.next());
                } else {
                    word.push(c);
                }
            }
        }
        words.push(word);
    }
    assert!(!words.is_empty(), "an empty exec line: {line}");
    assert!(
        words[0].starts_with('/'),
        "systemd wants an absolute path: {line}"
    );
    (ignore_failure, words)
}

#[test]
fn exec_lines_are_split_as_systemd_does() {
    assert_eq!(
        exec_line("/bin/sh -c 'test -f /a/b || exec /usr/bin/x --config /etc/x init'"),
        (
            false,
            vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                "test -f /a/b || exec /usr/bin/x --config /etc/x init".to_string()
            ]
        )
    );
    assert_eq!(
        exec_line("-/usr/bin/x  \"a \\\"b\\\"\" c"),
        (
            true,
            vec![
                "/usr/bin/x".to_string(),
                "a \"b\"".to_string(),
                "c".to_string()
            ]
        )
    );
}
