//! `flame cluster up`: every member reached and probed at once; binaries copied where their
//! checksum differs; the head initialised (once) and started; every node joined (once) and
//! started; then every node waited for until the head lists it Ready.
//!
//! A running service whose binaries and launch are unchanged is left alone, so a second
//! `up` changes nothing, and a host added to the file is the only one started. A failing
//! member is reported with its host and step; the others still come up.

use super::ops::{self, at, fail, Connected, Ctx, LocalBinaries, StepError};
use super::scripts;
use super::spec::{BinarySource, ClusterSpec, Role};
use super::{print_failures, summary, Change, Outcome, Row};
use crate::render::outln;
use crate::render::{self, text};
use flame_protocol::model::NodeState;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lifetime of the join token `up` makes; it is used at once.
pub const JOIN_TOKEN_TTL: &str = "15m";
/// How often the head is asked for its nodes while waiting for them to be Ready.
pub const READY_POLL: Duration = Duration::from_millis(500);

/// What `up` was asked.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub dry_run: bool,
    /// Bound on each daemon saying it serves after it was started.
    pub start_timeout: Duration,
    /// Bound on every node being Ready once all were started.
    pub ready_timeout: Duration,
}

/// A member after the first phase.
#[derive(Debug)]
struct Prepared {
    conn: Connected,
    /// Binaries copied (or, dry-run, that would be).
    copied: Vec<&'static str>,
}

/// Runs `up`. Its phases follow; each hands the next the members still in good standing
/// (a failed member keeps its failure and takes no further step).
pub async fn run(
    spec: ClusterSpec,
    options: UpOptions,
    home: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let hashing = Instant::now();
    let local = match &spec.binaries {
        BinarySource::Local(dir) => Some(Arc::new(LocalBinaries::hash(dir.clone()).await?)),
        BinarySource::Installed(_) => None,
    };
    tracing::debug!(
        "hashing the local binaries took {} ms",
        hashing.elapsed().as_millis()
    );
    warn_on_install_dirs(&spec);
    let ctx = Arc::new(Ctx::new(spec, home)?);

    // 1. Every member: connect, probe, check, copy what differs.
    let prepared = prepare_all(&ctx, local, options.dry_run).await;
    if options.dry_run {
        return dry_run(&ctx, prepared).await;
    }
    let mut m = Members::new(prepared);

    // 2. The head: init once, start (or leave running), fetch the client's credentials.
    let head = start_head_member(&ctx, &mut m, &options).await;

    // 3. The nodes: a join token when one needs it, then join once and start, at once.
    // 4. Every node that came up, Ready at the head.
    let mut node_states: BTreeMap<String, NodeState> = BTreeMap::new();
    if let Some(head) = head.as_ref().filter(|_| m.changes[0].is_ok()) {
        let token = make_join_token(&ctx, head, &mut m).await;
        start_nodes(&ctx, &mut m, &token, &options).await;
        revoke_join_token(&ctx, head, &token).await;
        node_states = await_ready(&ctx, head, &mut m, &options).await;
    } else {
        for change in m.changes.iter_mut().skip(1).filter(|c| c.is_ok()) {
            *change = Err(fail("join", "the head is not up"));
        }
    }
    ctx.progress.clear();

    // The report.
    m.conns[0] = head;
    report(&ctx, m, &node_states).await
}

/// Every member's standing between the phases of `up`, by member index (0 is the head).
#[derive(Debug)]
struct Members {
    /// What was done to it so far, or the step it failed at.
    changes: Vec<Result<Change, StepError>>,
    /// Its connection, while it has one and it is not lent to a phase's task.
    conns: Vec<Option<Connected>>,
    /// Whether binaries were copied to it (a running service is then restarted).
    copied: Vec<bool>,
}

impl Members {
    fn new(prepared: Vec<Result<Prepared, StepError>>) -> Members {
        let n = prepared.len();
        let mut changes: Vec<Result<Change, StepError>> = Vec::with_capacity(n);
        let mut conns: Vec<Option<Connected>> = Vec::with_capacity(n);
        let mut copied: Vec<bool> = Vec::with_capacity(n);
        for p in prepared {
            match p {
                Ok(p) => {
                    changes.push(Ok(Change::Unchanged));
                    copied.push(!p.copied.is_empty());
                    conns.push(Some(p.conn));
                }
                Err(e) => {
                    changes.push(Err(e));
                    copied.push(false);
                    conns.push(None);
                }
            }
        }
        Members {
            changes,
            conns,
            copied,
        }
    }
}

/// Phase 1: connects to, probes and (unless `dry_run`) copies binaries to every member at
/// once, bounded by the connection limit.
async fn prepare_all(
    ctx: &Arc<Ctx>,
    local: Option<Arc<LocalBinaries>>,
    dry_run: bool,
) -> Vec<Result<Prepared, StepError>> {
    let n = ctx.spec.members.len();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ctx = Arc::clone(ctx);
            let local = local.clone();
            tokio::spawn(async move {
                let _permit = ctx.limit.acquire().await;
                prepare(&ctx, i, local.as_deref(), dry_run).await
            })
        })
        .collect();
    let mut prepared: Vec<Result<Prepared, StepError>> = Vec::with_capacity(n);
    for task in tasks {
        prepared.push(
            task.await
                .unwrap_or_else(|e| Err(fail("connect", format!("the task failed: {e}")))),
        );
    }
    prepared
}

/// Phase 2: initialises (once) and starts the head, and fetches the client's credentials.
/// Returns the head's connection, taken out of `m.conns`.
async fn start_head_member(ctx: &Ctx, m: &mut Members, options: &UpOptions) -> Option<Connected> {
    let head = m.conns[0].take();
    if let (Some(h), Ok(_)) = (&head, &m.changes[0]) {
        m.changes[0] = match start_head(ctx, h, m.copied[0], options).await {
            Ok(change) => fetch_credentials(ctx, h).await.map(|()| change),
            Err(e) => Err(e),
        };
    }
    let head_up = head.as_ref().filter(|_| m.changes[0].is_ok());
    ctx.progress.done(
        0,
        if head_up.is_some() {
            "serving"
        } else {
            "failed"
        },
    );
    head
}

/// Phase 3a: a join token for the nodes that have not joined, when there are some. When it
/// cannot be made, those nodes fail with its error.
async fn make_join_token(ctx: &Ctx, head: &Connected, m: &mut Members) -> Arc<Option<String>> {
    let n = ctx.spec.members.len();
    let joining = (1..n)
        .filter(|&i| m.changes[i].is_ok() && m.conns[i].as_ref().is_some_and(|c| !c.probe.joined))
        .count();
    let token = if joining > 0 {
        ctx.progress.step(0, "making a join token");
        make_token(ctx, head, joining).await.map(Some)
    } else {
        Ok(None)
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            for i in 1..n {
                if m.changes[i].is_ok() && m.conns[i].as_ref().is_some_and(|c| !c.probe.joined) {
                    m.changes[i] = Err(e.clone());
                }
            }
            None
        }
    };
    Arc::new(token)
}

/// Phase 3b: joins (once) and starts every node in good standing, at once, bounded by the
/// connection limit.
async fn start_nodes(
    ctx: &Arc<Ctx>,
    m: &mut Members,
    token: &Arc<Option<String>>,
    options: &UpOptions,
) {
    let n = ctx.spec.members.len();
    let mut nodes = Vec::new();
    for i in 1..n {
        if m.changes[i].is_err() {
            continue;
        }
        let Some(conn) = m.conns[i].take() else {
            continue;
        };
        let ctx = Arc::clone(ctx);
        let token = Arc::clone(token);
        let options = options.clone();
        let copied = m.copied[i];
        nodes.push((
            i,
            tokio::spawn(async move {
                let _permit = ctx.limit.acquire().await;
                let result =
                    start_node(&ctx, i, &conn, token.as_ref().as_deref(), copied, &options).await;
                (conn, result)
            }),
        ));
    }
    for (i, task) in nodes {
        match task.await {
            Ok((conn, result)) => {
                m.conns[i] = Some(conn);
                m.changes[i] = result;
            }
            Err(e) => m.changes[i] = Err(fail("start", format!("the task failed: {e}"))),
        }
    }
}

/// Phase 3c: the join token is not needed any more: revoked rather than left to expire.
async fn revoke_join_token(ctx: &Ctx, head: &Connected, token: &Option<String>) {
    if let Some(id) = token.as_deref().and_then(|t| t.split('.').nth(1)) {
        let script =
            scripts::token_revoke(ctx.spec.head(), &head.bin_dir, &ctx.spec.head_address, id);
        if let Err(e) = head
            .remote
            .run(&script, None, ctx.spec.ssh.command_timeout)
            .await
        {
            eprintln!(
                "warning: the join token {id} could not be revoked ({e}); it expires within {JOIN_TOKEN_TTL}"
            );
        }
    }
}

/// Phase 4: waits, at most `options.ready_timeout`, until every node in good standing is
/// Ready at the head; one that is not fails at step `ready`. Returns the nodes' states.
async fn await_ready(
    ctx: &Ctx,
    head: &Connected,
    m: &mut Members,
    options: &UpOptions,
) -> BTreeMap<String, NodeState> {
    let n = ctx.spec.members.len();
    let mut node_states: BTreeMap<String, NodeState> = BTreeMap::new();
    let waiting: Vec<String> = (1..n)
        .filter(|i| m.changes[*i].is_ok())
        .map(|i| ctx.spec.members[i].name.clone())
        .collect();
    let waited = Instant::now();
    let ready = wait_ready(ctx, head, &waiting, options.ready_timeout).await;
    tracing::debug!(
        "waiting for the nodes to be Ready took {} ms",
        waited.elapsed().as_millis()
    );
    match ready {
        Ok(states) => node_states = states,
        Err(e) => {
            for change in m.changes.iter_mut().skip(1).filter(|c| c.is_ok()) {
                *change = Err(e.clone());
            }
        }
    }
    for (change, member) in m.changes.iter_mut().zip(&ctx.spec.members).skip(1) {
        if change.is_ok() && node_states.get(&member.name) != Some(&NodeState::Ready) {
            let state = node_states
                .get(&member.name)
                .map_or("not registered".to_string(), |s| format!("{s:?}"));
            *change = Err(fail(
                "ready",
                format!(
                    "the head lists the node as {state} after {}",
                    humantime::format_duration(options.ready_timeout)
                ),
            ));
        }
    }
    node_states
}

/// Prints `up`'s table, summary, the client's environment and each failure, and closes the
/// connections; [`Outcome::Partial`] when a member failed. An error when the head is not up.
async fn report(
    ctx: &Ctx,
    m: Members,
    node_states: &BTreeMap<String, NodeState>,
) -> anyhow::Result<Outcome> {
    let n = ctx.spec.members.len();
    let Members { changes, conns, .. } = m;
    let mut rows = Vec::with_capacity(n);
    for (i, member) in ctx.spec.members.iter().enumerate() {
        let version = conns[i]
            .as_ref()
            .map(|c| ops::short_version(c.probe.version.as_deref()))
            .unwrap_or_else(|| "-".to_string());
        let state = match (&changes[i], member.role) {
            (Err(_), _) => "failed".to_string(),
            (Ok(_), Role::Head) => "serving".to_string(),
            (Ok(_), Role::Node) => node_states
                .get(&member.name)
                .map_or("-".to_string(), |s| format!("{s:?}")),
        };
        rows.push(Row {
            member: member.clone(),
            version,
            state,
            change: changes[i].clone(),
        });
    }
    ops::close_all(conns).await;
    print_rows(&rows)?;
    outln!("{}", summary(&rows))?;
    let head_up = rows[0].change.is_ok();
    if head_up {
        let state = &ctx.spec.state_dir;
        outln!(
            "export FLAME_HEAD={} FLAME_CA_FILE={} FLAME_TOKEN_FILE={}; unset FLAME_TOKEN FLAME_CERT FLAME_KEY",
            super::remote::quote(&ctx.spec.head_address),
            super::remote::quote(&state.join("ca.crt").to_string_lossy()),
            super::remote::quote(&state.join("admin.token").to_string_lossy()),
        )?;
    }
    print_failures(&rows);
    let versions: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.change.is_ok())
        .map(|r| r.version.as_str())
        .collect();
    if versions.len() > 1 {
        eprintln!(
            "warning: the hosts run different versions ({}); `flame cluster status` shows which",
            versions.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    if !head_up {
        anyhow::bail!(
            "the head ({}) did not come up, so the cluster is not up",
            ctx.spec.head().ssh.host
        );
    }
    if rows.iter().any(|r| r.change.is_err()) {
        return Ok(Outcome::Partial);
    }
    Ok(Outcome::Complete)
}

/// The head registers the built-in applications (`ping`, `shell`) with their path next to
/// `flame-head` on its host, and every node runs that path: a node with another
/// `install_dir` would not find them.
fn warn_on_install_dirs(spec: &ClusterSpec) {
    let head_dir = &spec.head().install_dir;
    let others: Vec<&str> = spec.members[1..]
        .iter()
        .filter(|m| &m.install_dir != head_dir)
        .map(|m| m.name.as_str())
        .collect();
    if !others.is_empty() {
        eprintln!(
            "warning: {} {} another install_dir than the head's ({head_dir}); the built-in \
             applications (ping, shell) run from the head's path on every node, so they \
             work there only if that path holds them too",
            others.join(", "),
            if others.len() == 1 { "has" } else { "have" },
        );
    }
}

/// Connect, probe, check, and copy the binaries that differ (not when `dry_run`).
async fn prepare(
    ctx: &Ctx,
    i: usize,
    local: Option<&LocalBinaries>,
    dry_run: bool,
) -> Result<Prepared, StepError> {
    let member = &ctx.spec.members[i];
    let mut conn = ctx.connect(i).await?;
    let checked = async {
        ctx.check(member, &conn)?;
        let Some(local) = local else {
            return Ok(Vec::new());
        };
        let differing = ctx.differing(member, local, &conn);
        if !dry_run && !differing.is_empty() {
            ctx.install(i, local, &conn, &differing).await?;
        }
        Ok(differing)
    }
    .await;
    match checked {
        Ok(copied) => {
            if !copied.is_empty() && !dry_run {
                // The version of what now is there.
                let script = format!(
                    "{} --version",
                    super::remote::quote(&format!("{}/{}", conn.bin_dir, member.role.binary()))
                );
                let out = conn
                    .remote
                    .run(&script, None, ctx.spec.ssh.command_timeout)
                    .await
                    .map_err(at("install"))?;
                conn.probe.version = Some(out.stdout.trim().to_string());
            }
            ctx.progress.step(i, "prepared");
            Ok(Prepared { conn, copied })
        }
        Err(e) => {
            ctx.progress.done(i, &format!("failed: {e}"));
            conn.remote.close().await;
            Err(e)
        }
    }
}

/// The SHA-256 of a member's launch, as the probe reports the one on the host.
fn launch_digest(text: &str) -> String {
    flame_protocol::auth::hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

/// What starting member `i` would do: nothing, start, or restart (and why).
fn plan(ctx: &Ctx, i: usize, c: &Connected, copied: bool) -> (Change, &'static str) {
    let member = &ctx.spec.members[i];
    let launch = scripts::launch(member, &c.bin_dir, c.manager, &ctx.spec.name);
    let same_launch = c.probe.launch.as_deref() == Some(launch_digest(&launch).as_str());
    match (c.probe.running.is_some(), copied, same_launch) {
        (true, false, true) => (Change::Unchanged, "running"),
        (true, true, _) => (Change::Restarted, "new binaries"),
        (true, false, false) => (Change::Restarted, "new configuration"),
        (false, _, _) => (Change::Started, "not running"),
    }
}

/// Starts (or restarts) member `i` when [`plan`] says so (step `start`).
async fn ensure_running(
    ctx: &Ctx,
    i: usize,
    c: &Connected,
    copied: bool,
    options: &UpOptions,
) -> Result<Change, StepError> {
    let (change, _why) = plan(ctx, i, c, copied);
    if change == Change::Unchanged {
        return Ok(change);
    }
    ctx.progress.step(i, "starting");
    let member = &ctx.spec.members[i];
    let script = scripts::start(
        member,
        &c.bin_dir,
        c.manager,
        &ctx.spec.name,
        change == Change::Restarted,
        options.start_timeout,
    );
    c.remote
        .run(
            &script,
            None,
            options.start_timeout + ctx.spec.ssh.command_timeout,
        )
        .await
        .map_err(at("start"))?;
    Ok(change)
}

async fn start_head(
    ctx: &Ctx,
    c: &Connected,
    copied: bool,
    options: &UpOptions,
) -> Result<Change, StepError> {
    let head = ctx.spec.head();
    if !c.probe.initialised {
        ctx.progress.step(0, "initialising (CA, admin token)");
        c.remote
            .run(
                &scripts::head_init(head, &c.bin_dir),
                None,
                ctx.spec.ssh.command_timeout,
            )
            .await
            .map_err(at("init"))?;
    }
    let change = ensure_running(ctx, 0, c, copied, options).await?;
    // A head that was never initialised here was not running either: started.
    Ok(change)
}

/// Copies the head's CA certificate and admin token into the state folder (step
/// `credentials`).
async fn fetch_credentials(ctx: &Ctx, head: &Connected) -> Result<(), StepError> {
    let out = head
        .remote
        .run(
            &scripts::credentials(ctx.spec.head()),
            None,
            ctx.spec.ssh.command_timeout,
        )
        .await
        .map_err(at("credentials"))?;
    let Some((ca, token)) = out.stdout.split_once("\n--\n") else {
        return Err(fail(
            "credentials",
            "the head's CA and token could not be read",
        ));
    };
    let dir = &ctx.spec.state_dir;
    let local = |what: &str, e: &dyn std::fmt::Display| {
        fail(
            "credentials",
            format!("cannot write {what} in {}: {e}", dir.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| local("the folder", &e))?;
    flame_client::local::write_private(&dir.join("admin.token"), token.trim().as_bytes())
        .map_err(|e| local("admin.token", &e))?;
    std::fs::write(dir.join("ca.crt"), format!("{}\n", ca.trim_end()))
        .map_err(|e| local("ca.crt", &e))?;
    Ok(())
}

/// A node join token from the head (step `token`), good for `joining` joins.
async fn make_token(ctx: &Ctx, head: &Connected, joining: usize) -> Result<String, StepError> {
    let script = scripts::node_token(
        ctx.spec.head(),
        &head.bin_dir,
        &ctx.spec.head_address,
        JOIN_TOKEN_TTL,
        joining,
    );
    let out = head
        .remote
        .run(&script, None, ctx.spec.ssh.command_timeout)
        .await
        .map_err(at("token"))?;
    let token = out.stdout.trim().to_string();
    if !token.starts_with("flame1.") {
        return Err(fail(
            "token",
            "`flame-head token create --node` printed no token",
        ));
    }
    Ok(token)
}

async fn start_node(
    ctx: &Ctx,
    i: usize,
    c: &Connected,
    token: Option<&str>,
    copied: bool,
    options: &UpOptions,
) -> Result<Change, StepError> {
    let member = &ctx.spec.members[i];
    if !c.probe.joined {
        let Some(token) = token else {
            return Err(fail("join", "no join token"));
        };
        ctx.progress.step(i, "joining");
        let script = scripts::node_join(member, &c.bin_dir, &ctx.spec.head_address);
        c.remote
            .run(
                &script,
                Some(token.as_bytes()),
                ctx.spec.ssh.command_timeout,
            )
            .await
            .map_err(at("join"))?;
    }
    let change = ensure_running(ctx, i, c, copied, options).await;
    ctx.progress
        .done(i, if change.is_ok() { "started" } else { "failed" });
    change
}

/// Polls the head until every node in `names` is Ready, or `timeout` passed; returns the
/// last states seen (step `ready`).
async fn wait_ready(
    ctx: &Ctx,
    head: &Connected,
    names: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, NodeState>, StepError> {
    let deadline = Instant::now() + timeout;
    loop {
        let nodes = ctx.node_list(head).await.map_err(at("ready"))?;
        let states: BTreeMap<String, NodeState> =
            nodes.into_iter().map(|n| (n.name, n.state)).collect();
        let all = names
            .iter()
            .all(|n| states.get(n) == Some(&NodeState::Ready));
        if all || Instant::now() >= deadline {
            return Ok(states);
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// `--dry-run`: what each member would get, from the probe alone.
async fn dry_run(ctx: &Ctx, prepared: Vec<Result<Prepared, StepError>>) -> anyhow::Result<Outcome> {
    ctx.progress.clear();
    let mut rows = Vec::new();
    let mut failed = false;
    let mut conns = Vec::new();
    for (i, p) in prepared.into_iter().enumerate() {
        let member = &ctx.spec.members[i];
        let mut actions = Vec::new();
        match p {
            Err(e) => {
                failed = true;
                actions.push(format!("cannot tell: {e}"));
            }
            Ok(p) => {
                if !p.copied.is_empty() {
                    actions.push(format!("copy {}", p.copied.join(", ")));
                }
                match member.role {
                    Role::Head if !p.conn.probe.initialised => actions.push("init".to_string()),
                    Role::Node if !p.conn.probe.joined => actions.push("join".to_string()),
                    _ => {}
                }
                let (change, why) = plan(ctx, i, &p.conn, !p.copied.is_empty());
                let manager = match p.conn.manager {
                    scripts::Manager::Systemd => "systemd unit",
                    scripts::Manager::Supervisor => "supervised process",
                };
                match change {
                    Change::Unchanged => {}
                    Change::Started => actions.push(format!("start ({manager})")),
                    Change::Restarted => actions.push(format!("restart ({why})")),
                }
                if actions.is_empty() {
                    actions.push("nothing: running and up to date".to_string());
                }
                conns.push(Some(p.conn));
            }
        }
        rows.push(vec![
            member.ssh.host.clone(),
            member.role.as_str().to_string(),
            member.name.clone(),
            actions.join("; "),
        ]);
    }
    ops::close_all(conns).await;
    outln!("Dry run: nothing was changed. `flame cluster up` would do this:")?;
    render::print_table(
        &[text("Host"), text("Role"), text("Name"), text("Would")],
        rows,
    )?;
    if failed {
        return Ok(Outcome::Partial);
    }
    Ok(Outcome::Complete)
}

fn print_rows(rows: &[Row]) -> anyhow::Result<()> {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.member.ssh.host.clone(),
                r.member.role.as_str().to_string(),
                r.member.name.clone(),
                r.version.clone(),
                r.state.clone(),
                match &r.change {
                    Ok(c) => c.as_str().to_string(),
                    Err(e) => format!("failed at {}", e.step),
                },
            ]
        })
        .collect();
    render::print_table(
        &[
            text("Host"),
            text("Role"),
            text("Name"),
            text("Version"),
            text("State"),
            text("Change"),
        ],
        table,
    )?;
    Ok(())
}
