//! The POSIX `sh` scripts run on the hosts, and the reading of what they print. Pure text
//! in, text out: what runs remotely can be read and tested here.
//!
//! Files of a member on its host, under its role folder `R = DATA_DIR/ROLE`:
//!
//! ```text
//! R/launch          what the service runs (the supervise command line, or the systemd unit);
//!                   `up` restarts a running service whose launch differs
//! R/supervisor.pid  the supervisor's pid, locked by it while it runs (supervised mode)
//! R/state           `ready <line>` once the daemon said it serves, `failed <how>` when it
//!                   exited before that (written by the supervisor)
//! LOG_DIR/flame-ROLE.log  the daemon's stdout and stderr, and the supervisor's messages
//! ```

use super::remote::quote;
use super::spec::{Member, Role};
use std::collections::BTreeMap;
use std::time::Duration;

/// Every binary of a cluster, as copied from a local build.
pub const BINARIES: [&str; 6] = [
    "flame",
    "flame-head",
    "flame-node",
    "flame-ping",
    "flame-shell",
    "flame-mpi-agent",
];

/// The binaries a role needs on its host: `flame` (the supervisor, and the admin client on
/// the head), its daemon, and the built-in applications, whose command is their path next
/// to `flame-head` on the head's host, which nodes run (so hosts should share one
/// `install_dir`); nodes also run `flame-mpi-agent` for `flame submit --mpi`.
pub fn binaries(role: Role) -> &'static [&'static str] {
    match role {
        Role::Head => &["flame", "flame-head", "flame-ping", "flame-shell"],
        Role::Node => &[
            "flame",
            "flame-node",
            "flame-ping",
            "flame-shell",
            "flame-mpi-agent",
        ],
    }
}

/// How a member's service runs on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// A systemd unit.
    Systemd,
    /// `flame cluster supervise` started detached with `setsid`.
    Supervisor,
}

/// What the probe found on a host for one member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// `uname -s`, `uname -m`.
    pub os: String,
    pub arch: String,
    /// systemd runs the host (`/run/systemd/system` exists and `systemctl` is there).
    pub systemd: bool,
    /// Tools the scripts need that are missing.
    pub missing: Vec<String>,
    /// The folder the binaries are in (for installed binaries found on `PATH`).
    pub bin_dir: String,
    /// SHA-256 of each binary present, by name.
    pub checksums: BTreeMap<String, String>,
    /// `flame-ROLE --version`, when it ran.
    pub version: Option<String>,
    /// The head has its CA (`init` ran).
    pub initialised: bool,
    /// The node has its certificate (`join` ran).
    pub joined: bool,
    /// SHA-256 of `R/launch`, when present.
    pub launch: Option<String>,
    /// The service runs: the supervisor's pid, or `systemd`.
    pub running: Option<String>,
}

impl Probe {
    /// Reads the probe script's output: `key=value` and `sha256 NAME HEX` lines.
    pub fn parse(text: &str) -> Probe {
        let mut p = Probe::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("sha256 ") {
                if let Some((name, hex)) = rest.split_once(' ') {
                    p.checksums.insert(name.to_string(), hex.trim().to_string());
                }
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().to_string();
            match key {
                "os" => p.os = value,
                "arch" => p.arch = value,
                "systemd" => p.systemd = value == "yes",
                "missing" => p.missing.push(value),
                "bin_dir" => p.bin_dir = value,
                "version" if !value.is_empty() => p.version = Some(value),
                "initialised" => p.initialised = value == "yes",
                "joined" => p.joined = value == "yes",
                "launch" if !value.is_empty() => p.launch = Some(value),
                "running" if !value.is_empty() => p.running = Some(value),
                _ => {}
            }
        }
        p
    }
}

/// The systemd unit of a member: `flame-CLUSTER-ROLE`.
pub fn unit_name(cluster: &str, role: Role) -> String {
    format!("flame-{cluster}-{}", role.as_str())
}

/// Shell lines that set `D` to the member's binary folder: the configured one, else the
/// folder of `flame-ROLE` on `PATH`.
fn bin_dir_lines(member: &Member) -> String {
    if member.install_dir.is_empty() {
        format!(
            "p=$(command -v {b} 2>/dev/null) || {{ echo '{b} is not on PATH' >&2; exit 1; }}\nD=${{p%/*}}\n",
            b = member.role.binary()
        )
    } else {
        format!("D={}\n", quote(&member.install_dir))
    }
}

/// Lines that print `running=PID` when the supervisor whose pid file is `$P` runs: the pid
/// is alive and its command line names that pid file (a recycled pid does not).
const RUNNING_CHECK: &str = r#"if [ -f "$P" ]; then
  pid=$(cat "$P" 2>/dev/null)
  if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' '\n' < "/proc/$pid/cmdline" | grep -qxF -- "$P"; then
    echo "running=$pid"
  fi
fi
"#;

/// The probe: the host's OS, architecture and service manager, the binaries' checksums and
/// version, and the member's state.
pub fn probe(member: &Member, cluster: &str) -> String {
    let mut s = String::from(
        "echo \"os=$(uname -s)\"\necho \"arch=$(uname -m)\"\n\
         if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then echo systemd=yes; else echo systemd=no; fi\n\
         for t in sha256sum setsid; do command -v $t >/dev/null 2>&1 || echo \"missing=$t\"; done\n",
    );
    s.push_str(&bin_dir_lines(member));
    s.push_str("echo \"bin_dir=$D\"\n");
    s.push_str(&format!(
        "for b in {}; do [ -f \"$D/$b\" ] && echo \"sha256 $b $(sha256sum < \"$D/$b\" | cut -d' ' -f1)\"; done\n",
        BINARIES.join(" ")
    ));
    s.push_str(&format!(
        "v=$(\"$D/{}\" --version 2>/dev/null) && echo \"version=$v\"\n",
        member.role.binary()
    ));
    s.push_str(&format!(
        "R={}\nP=\"$R/supervisor.pid\"\n",
        quote(&member.role_dir())
    ));
    match member.role {
        Role::Head => s.push_str("[ -f \"$R/tls/ca.crt\" ] && echo initialised=yes\n"),
        Role::Node => s.push_str("[ -f \"$R/tls/node.crt\" ] && echo joined=yes\n"),
    }
    s.push_str(
        "[ -f \"$R/launch\" ] && echo \"launch=$(sha256sum < \"$R/launch\" | cut -d' ' -f1)\"\n",
    );
    s.push_str(RUNNING_CHECK);
    s.push_str(&format!(
        "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet {}; then echo running=systemd; fi\n",
        quote(&unit_name(cluster, member.role))
    ));
    // The last test above may fail; the probe itself succeeded.
    s.push_str("exit 0\n");
    s
}

/// Writes stdin to `D/NAME` through a temporary file, checks its SHA-256 there, then
/// renames it into place (a running program keeps its old file). The folders it makes
/// are 0755 whatever the login's umask: executors run as their owners' own uids and must
/// reach the built-in programs (`flame-ping`, `flame-shell`) installed there.
pub fn install(dir: &str, name: &str, sha256: &str) -> String {
    format!(
        "set -e\nD={d}\n(umask 022 && mkdir -p \"$D\")\nt=\"$D/.{n}.tmp.$$\"\ntrap 'rm -f \"$t\"' EXIT\ncat > \"$t\"\nchmod 0755 \"$t\"\n\
         got=$(sha256sum < \"$t\" | cut -d' ' -f1)\n\
         [ \"$got\" = {h} ] || {{ echo \"{n}: checksum $got after the copy, expected {h}\" >&2; exit 1; }}\n\
         mv -f \"$t\" \"$D/{n}\"\ntrap - EXIT\n",
        d = quote(dir),
        n = name,
        h = sha256
    )
}

/// `flame-head ... init`, once: nothing when the CA exists.
pub fn head_init(member: &Member, bin_dir: &str) -> String {
    format!(
        "set -e\nR={r}\nif [ -f \"$R/tls/ca.crt\" ]; then echo initialised=already; exit 0; fi\n\
         mkdir -p \"$R\"\nchmod 0700 \"$R\"\n{head} {args} init\necho initialised=yes\n",
        r = quote(&member.role_dir()),
        head = quote(&format!("{bin_dir}/flame-head")),
        args = join_quoted(&member.args)
    )
}

/// A node join token on stdout, valid for `ttl` and `uses` joins.
pub fn node_token(
    member: &Member,
    bin_dir: &str,
    head_address: &str,
    ttl: &str,
    uses: usize,
) -> String {
    format!(
        "{head} --data-dir {r} --listen {a} token create --node --ttl {ttl} --uses {uses}\n",
        head = quote(&format!("{bin_dir}/flame-head")),
        r = quote(&member.role_dir()),
        a = quote(head_address),
    )
}

/// Revokes the token `id` (the join token, once the nodes have joined).
pub fn token_revoke(member: &Member, bin_dir: &str, head_address: &str, id: &str) -> String {
    format!(
        "{head} --data-dir {r} --listen {a} token revoke {id}\n",
        head = quote(&format!("{bin_dir}/flame-head")),
        r = quote(&member.role_dir()),
        a = quote(head_address),
        id = quote(id),
    )
}

/// `flame-node join` with the token read from stdin into a file of mode 0600, removed after.
/// The node's folder lets others pass (0711, its parents 0755 when made here): executors
/// run as their owners' uids and must reach their work and runtime folders inside it; the
/// TLS folder in it stays the node's alone.
pub fn node_join(member: &Member, bin_dir: &str, head_address: &str) -> String {
    format!(
        "R={r}\n(umask 022 && mkdir -p \"$R\") || exit 1\nchmod 0711 \"$R\" || exit 1\n\
         umask 077\ncat > \"$R/join.token\" || exit 1\n\
         {node} join --token-file \"$R/join.token\" --head {a} --name {n} --tls-dir \"$R/tls\"\n\
         rc=$?\nrm -f \"$R/join.token\"\nexit $rc\n",
        r = quote(&member.role_dir()),
        node = quote(&format!("{bin_dir}/flame-node")),
        a = quote(head_address),
        n = quote(&member.name),
    )
}

/// The command line of the supervised daemon: `flame cluster supervise ... -- flame-ROLE
/// ARGS`, quoted for `sh`; what `R/launch` holds in supervised mode.
pub fn supervise_line(member: &Member, bin_dir: &str, restart: bool) -> String {
    join_quoted(&supervise_words(member, bin_dir, restart))
}

/// One word of a unit file's command line, as systemd reads it: in double quotes, with `\`
/// and `"` escaped, `%` (a specifier) as `%%` and `$` (a variable) as `$$`.
fn systemd_word(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('"');
    for c in word.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The supervisor's command line, word by word.
fn supervise_words(member: &Member, bin_dir: &str, restart: bool) -> Vec<String> {
    let r = member.role_dir();
    let mut words = vec![
        format!("{bin_dir}/flame"),
        "cluster".to_string(),
        "supervise".to_string(),
        "--pid-file".to_string(),
        format!("{r}/supervisor.pid"),
        "--state-file".to_string(),
        format!("{r}/state"),
        "--ready-prefix".to_string(),
        member.role.ready_prefix().trim_end().to_string(),
    ];
    if !restart {
        words.push("--no-restart".to_string());
    }
    words.push("--".to_string());
    words.push(format!("{bin_dir}/{}", member.role.binary()));
    words.extend(member.args.iter().cloned());
    words
}

/// The systemd unit that runs the supervisor without its own restarts: systemd restarts.
pub fn unit_file(member: &Member, bin_dir: &str, cluster: &str) -> String {
    format!(
        "# Written by `flame cluster up` (cluster {cluster}); `flame cluster down` removes it.\n\
         [Unit]\nDescription=Flame {role} of cluster {cluster}\nAfter=network-online.target\nWants=network-online.target\n\
         StartLimitIntervalSec=60\nStartLimitBurst=5\n\n\
         [Service]\nExecStart={line}\nStandardOutput=append:{log}\nStandardError=append:{log}\n\
         Restart=on-failure\nRestartSec=2\nKillMode=mixed\nTimeoutStopSec=15\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        role = member.role.as_str(),
        line = supervise_words(member, bin_dir, false)
            .iter()
            .map(|w| systemd_word(w))
            .collect::<Vec<_>>()
            .join(" "),
        // The rest of the line is the path: only its specifiers need escaping.
        log = log_file(member).replace('%', "%%"),
    )
}

/// The daemon's log file.
pub fn log_file(member: &Member) -> String {
    format!("{}/flame-{}.log", member.log_dir, member.role.as_str())
}

/// What `R/launch` holds: the unit file, or the supervise line.
pub fn launch(member: &Member, bin_dir: &str, manager: Manager, cluster: &str) -> String {
    match manager {
        Manager::Systemd => unit_file(member, bin_dir, cluster),
        Manager::Supervisor => format!("{}\n", supervise_line(member, bin_dir, true)),
    }
}

/// Starts the service (stopping it first when `restart`), then waits up to `ready` for the
/// supervisor's state file to say `ready` (printed) or `failed` (an error with the log's
/// end).
pub fn start(
    member: &Member,
    bin_dir: &str,
    manager: Manager,
    cluster: &str,
    restart: bool,
    ready: Duration,
) -> String {
    let launch_text = launch(member, bin_dir, manager, cluster);
    let mut s = format!(
        "R={r}\nL={l}\nLOG={log}\nP=\"$R/supervisor.pid\"\nmkdir -p \"$R\" \"$L\" || exit 1\n",
        r = quote(&member.role_dir()),
        l = quote(&member.log_dir),
        log = quote(&log_file(member)),
    );
    if restart {
        s.push_str(&stop_body(member, manager, cluster));
    }
    s.push_str(&format!(
        "printf '%s' {} > \"$R/launch.tmp\" && mv -f \"$R/launch.tmp\" \"$R/launch\" || exit 1\nrm -f \"$R/state\"\n",
        quote(&launch_text)
    ));
    match manager {
        Manager::Systemd => {
            let unit = unit_name(cluster, member.role);
            s.push_str(&format!(
                "U=/etc/systemd/system/{u}.service\ncp \"$R/launch\" \"$U.tmp\" && mv -f \"$U.tmp\" \"$U\" || exit 1\n\
                 systemctl daemon-reload && systemctl enable --quiet {u} && systemctl restart {u} || exit 1\n",
                u = quote(&unit)
            ));
        }
        Manager::Supervisor => {
            // setsid -f: a session of its own, no terminal, parent init; its output to the
            // log, so the ssh channel closes at once.
            s.push_str(&format!(
                "setsid -f {} < /dev/null >> \"$LOG\" 2>&1 || exit 1\n",
                supervise_line(member, bin_dir, true)
            ));
        }
    }
    let tenths = ready.as_millis() / 200;
    s.push_str(&format!(
        r#"i=0
while :; do
  if [ -f "$R/state" ]; then
    s=$(cat "$R/state")
    case "$s" in
      ready*) echo "$s"; exit 0;;
      failed*) echo "{name} $s; the end of $LOG:" >&2; tail -n 20 "$LOG" >&2; exit 1;;
    esac
  fi
  if [ $i -ge {tenths} ]; then echo "{name} did not say it serves within {secs}s; the end of $LOG:" >&2; tail -n 20 "$LOG" >&2; exit 1; fi
  sleep 0.2
  i=$((i+1))
done
"#,
        name = member.role.binary(),
        secs = ready.as_secs(),
    ));
    s
}

/// Lines that stop the service (if it runs) and print `stopped=yes` when it did.
fn stop_body(member: &Member, manager: Manager, cluster: &str) -> String {
    match manager {
        Manager::Systemd => {
            let unit = quote(&unit_name(cluster, member.role));
            format!(
                "if systemctl is-active --quiet {unit}; then systemctl stop {unit} && echo stopped=yes; fi\n"
            )
        }
        Manager::Supervisor => r#"if [ -f "$P" ]; then
  pid=$(cat "$P" 2>/dev/null)
  if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' '\n' < "/proc/$pid/cmdline" | grep -qxF -- "$P"; then
    kill -TERM "$pid"
    i=0
    while [ -d "/proc/$pid" ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid"; echo forced=yes; fi
    echo stopped=yes
  fi
  rm -f "$P"
fi
"#
        .to_string(),
    }
}

/// Stops the member's service; with systemd also disables the unit and removes it.
pub fn stop(member: &Member, manager: Manager, cluster: &str) -> String {
    let mut s = format!(
        "R={r}\nP=\"$R/supervisor.pid\"\n",
        r = quote(&member.role_dir())
    );
    s.push_str(&stop_body(member, manager, cluster));
    if manager == Manager::Systemd {
        let unit = unit_name(cluster, member.role);
        s.push_str(&format!(
            "systemctl disable --quiet {u} 2>/dev/null; rm -f /etc/systemd/system/{u}.service; systemctl daemon-reload\n",
            u = quote(&unit)
        ));
    }
    s.push_str("rm -f \"$R/state\"\nexit 0\n");
    s
}

/// Prints `PID PATH` for every process of this member: its executable is one of the
/// cluster's binaries in `bin_dir` (also after they were replaced: ` (deleted)`), and its
/// command line, or an ancestor's, names the member's folder `role_dir` (the daemon and its
/// supervisor name it in their arguments; executors are the node's children). Another
/// cluster's daemons, a packaged service and anyone's `flame` client are left alone, and so
/// are this script's own ancestors. With `kill`, sends them `SIGKILL` first and lists what
/// is left after.
pub fn leftovers(bin_dir: &str, role_dir: &str, kill: bool) -> String {
    let names = BINARIES
        .iter()
        .map(|b| format!("\"$D/{b}\""))
        .collect::<Vec<_>>()
        .join("|");
    let scan = format!(
        r#"ours() {{
  p=$1; n=0
  while [ "$p" -gt 1 ] && [ $n -lt 64 ]; do
    [ "$p" = "$$" ] && return 1
    # One argument a line; the folder itself, or a path under it (not a sibling).
    c=$(tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null; echo .)
    case "$c" in *"$R/"*|*"$R"'
'*) return 0;; esac
    p=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f2)
    [ -n "$p" ] || return 1
    n=$((n + 1))
  done
  return 1
}}
scan() {{
  for p in /proc/[0-9]*; do
    e=$(readlink "$p/exe" 2>/dev/null) || continue
    e=${{e% (deleted)}}
    case "$e" in {names}) ours "${{p#/proc/}}" && echo "${{p#/proc/}} $e";; esac
  done
}}
"#
    );
    let mut s = format!("D={}\nR={}\n{scan}", quote(bin_dir), quote(role_dir));
    if kill {
        s.push_str(
            "scan | while read -r pid exe; do kill -KILL \"$pid\" 2>/dev/null; done\nsleep 0.2\n",
        );
    }
    s.push_str("scan\nexit 0\n");
    s
}

/// `flame node list --output json` (or `drain NAME`) on the head host, as the admin.
pub fn head_client(member: &Member, bin_dir: &str, head_address: &str, args: &str) -> String {
    format!(
        "unset FLAME_TOKEN FLAME_CERT FLAME_KEY FLAME_OWNER FLAME_TOKEN_FILE\nR={r}\n{flame} --head {a} --ca-file \"$R/tls/ca.crt\" --token-file \"$R/admin.token\" {args}\n",
        r = quote(&member.role_dir()),
        flame = quote(&format!("{bin_dir}/flame")),
        a = quote(head_address),
    )
}

/// Prints the head's CA certificate, a line `--`, then the admin token.
pub fn credentials(member: &Member) -> String {
    format!(
        "R={}\ncat \"$R/tls/ca.crt\" && echo -- && cat \"$R/admin.token\"\n",
        quote(&member.role_dir())
    )
}

fn join_quoted(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::spec::SshTarget;
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;

    fn member(root: &std::path::Path, role: Role) -> Member {
        Member {
            role,
            name: if role == Role::Head { "head" } else { "n1" }.to_string(),
            ssh: SshTarget {
                host: "h".to_string(),
                user: None,
                port: None,
                identity_file: None,
            },
            install_dir: root.join("bin").display().to_string(),
            data_dir: root.join("data").display().to_string(),
            log_dir: root.join("log").display().to_string(),
            args: vec!["--x".to_string(), "a b".to_string()],
        }
    }

    fn sh(script: &str, stdin: &[u8]) -> (bool, String, String) {
        use std::io::Write as _;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        flame_protocol::auth::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    #[test]
    fn install_checks_the_copy_and_probe_sees_it() {
        let root = tempfile::tempdir().unwrap();
        let m = member(root.path(), Role::Node);
        let content = b"#!/bin/sh\necho 'flame-node 9.9.9'\n";
        let (ok, _, err) = sh(
            &install(&m.install_dir, "flame-node", &sha256_hex(content)),
            content,
        );
        assert!(ok, "{err}");
        let installed = root.path().join("bin/flame-node");
        assert_eq!(std::fs::read(&installed).unwrap(), content);
        assert_eq!(
            std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // A copy that does not match its checksum is refused and leaves nothing behind.
        let (ok, _, err) = sh(
            &install(&m.install_dir, "flame", &sha256_hex(b"other")),
            content,
        );
        assert!(!ok && err.contains("checksum"), "{err}");
        let names: Vec<_> = std::fs::read_dir(root.path().join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["flame-node"]);

        let (ok, out, err) = sh(&probe(&m, "c"), b"");
        assert!(ok, "{err}");
        let p = Probe::parse(&out);
        assert_eq!(p.checksums.get("flame-node"), Some(&sha256_hex(content)));
        assert_eq!(p.checksums.len(), 1);
        assert_eq!(p.version.as_deref(), Some("flame-node 9.9.9"));
        assert!(!p.joined && p.running.is_none() && p.launch.is_none());
        assert!(!p.os.is_empty() && !p.arch.is_empty());
        // The test machine runs no systemd as PID 1 (containers, CI): detected as such.
        assert_eq!(
            p.systemd,
            std::path::Path::new("/run/systemd/system").is_dir()
        );
    }

    #[test]
    fn probe_parsing() {
        let p = Probe::parse(
            "os=Linux\narch=x86_64\nsystemd=no\nmissing=setsid\nbin_dir=/opt/f\nsha256 flame abc\nversion=flame-head 0.1.0\ninitialised=yes\nlaunch=ff\nrunning=42\njunk\n",
        );
        assert_eq!(p.os, "Linux");
        assert_eq!(p.missing, ["setsid"]);
        assert_eq!(p.checksums.get("flame").map(String::as_str), Some("abc"));
        assert_eq!(p.version.as_deref(), Some("flame-head 0.1.0"));
        assert!(p.initialised && !p.joined && !p.systemd);
        assert_eq!(p.running.as_deref(), Some("42"));
    }

    #[test]
    fn the_unit_runs_the_supervisor_without_its_restarts() {
        let root = tempfile::tempdir().unwrap();
        let m = member(root.path(), Role::Head);
        let unit = unit_file(&m, "/opt/flame/bin", "lab");
        assert!(
            unit.contains(r#"ExecStart="/opt/flame/bin/flame" "cluster" "supervise" "--pid-file""#),
            "{unit}"
        );
        assert!(
            unit.contains(r#""--no-restart" "--" "/opt/flame/bin/flame-head" "--x" "a b""#),
            "{unit}"
        );
        // systemd's specifiers, variables and escapes are taken literally.
        assert_eq!(
            systemd_word(r#"fe80::1%eth0 $HOME a"b\c"#),
            r#""fe80::1%%eth0 $$HOME a\"b\\c""#
        );
        assert!(unit.contains("Restart=on-failure"), "{unit}");
        assert_eq!(unit_name("lab", Role::Head), "flame-lab-head");
        let line = supervise_line(&m, "/b", true);
        assert!(
            line.contains("--ready-prefix 'flame-head listening on'"),
            "{line}"
        );
        assert!(!line.contains("--no-restart"), "{line}");
    }

    #[test]
    fn leftovers_finds_this_members_processes_by_their_executable() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let role_dir = root.path().join("data/node").display().to_string();
        let other_dir = root.path().join("other/node").display().to_string();
        // Copies of `sh` and `sleep` named like cluster binaries: one started for this
        // member (its folder in its arguments), one for another cluster's member sharing the
        // binaries, and one child of a process of this member (as an executor is the node's
        // child). `; :` keeps `sh` from replacing itself with the `sleep`.
        let fake = bin.join("flame-node");
        std::fs::copy("/bin/sh", &fake).unwrap();
        let ping = bin.join("flame-ping");
        std::fs::copy("/bin/sleep", &ping).unwrap();
        let mut ours = Command::new(&fake)
            .args(["-c", "sleep 30; :", &format!("{role_dir}/work")])
            .spawn()
            .unwrap();
        let mut theirs = Command::new(&fake)
            .args(["-c", "sleep 30; :", &format!("{other_dir}/work")])
            .spawn()
            .unwrap();
        let mut parent = Command::new("sh")
            .args([
                "-c",
                &format!("{} 30; : {role_dir}", quote(&ping.display().to_string())),
            ])
            .spawn()
            .unwrap();
        let dir = bin.display().to_string();
        // The child of `sh` may take a moment to exist.
        let child_line = |out: &str| {
            out.lines()
                .any(|l| l.ends_with(&ping.display().to_string()))
        };
        let mut out = String::new();
        for _ in 0..50 {
            let (ok, o, err) = sh(&leftovers(&dir, &role_dir, false), b"");
            assert!(ok, "{err}");
            out = o;
            if child_line(&out) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(
            out.contains(&format!("{} {}", ours.id(), fake.display())),
            "{out}"
        );
        assert!(child_line(&out), "{out}");
        assert!(!out.contains(&format!("{} ", theirs.id())), "{out}");
        let (ok, out, err) = sh(&leftovers(&dir, &role_dir, true), b"");
        assert!(ok, "{err}");
        assert!(!out.contains(&ours.id().to_string()), "{out}");
        assert!(!ours.wait().unwrap().success());
        // The other cluster's process is still there.
        assert!(theirs.try_wait().unwrap().is_none());
        theirs.kill().unwrap();
        let _ = theirs.wait();
        let _ = parent.wait();
    }
}
