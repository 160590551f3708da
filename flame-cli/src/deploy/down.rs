//! `flame cluster down` and `flame cluster status`.
//!
//! `down` drains the nodes through the head when asked (and waits, bounded, for their
//! executors to finish), stops the nodes, then the head, then checks every host for a
//! process still running one of the cluster's binaries from its folder: such a leftover is
//! killed and reported.

use super::ops::{self, at, fail, Connected, Ctx, StepError};
use super::scripts;
use super::spec::{ClusterSpec, Role};
use super::Outcome;
use crate::render::outln;
use crate::render::{self, text, OutputFormat};
use flame_protocol::model::{NodeInfo, NodeState};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the head is asked whether drained nodes still have executors.
pub const DRAIN_POLL: Duration = Duration::from_secs(1);

/// Runs `down`.
pub async fn down(
    spec: ClusterSpec,
    drain: bool,
    drain_timeout: Duration,
    home: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let ctx = Arc::new(Ctx::new(spec, home)?);
    let n = ctx.spec.members.len();
    let connected = ops::connect_all(&ctx).await;
    let mut results: Vec<MemberResult> = Vec::with_capacity(n);
    let mut conns: Vec<Option<Connected>> = Vec::with_capacity(n);
    for c in connected {
        match c {
            Ok(c) => {
                results.push(Ok(if c.probe.running.is_some() {
                    "stopped"
                } else {
                    "not running"
                }));
                conns.push(Some(c));
            }
            Err(e) => {
                results.push(Err(e));
                conns.push(None);
            }
        }
    }

    // 1. Drain, through the head, every running node; wait until their executors are gone.
    if drain {
        drain_nodes(&ctx, &conns, &mut results, drain_timeout).await;
    }
    // 2. Stop the nodes, at once (a node that failed to drain is left running).
    stop_nodes(&ctx, &mut conns, &mut results).await;
    // 3. The head, last; not while a node it should drain is left running, so that a
    // second `down --drain` can finish the drain.
    stop_head(&ctx, &conns, &mut results, drain).await;
    // 4. Nothing of the cluster's may be left running on any host.
    check_leftovers(&ctx, &conns, &mut results).await;
    ctx.progress.clear();
    ops::close_all(conns).await;
    Ok(report_down(&ctx, &results))
}

/// What `down` did to a member: `stopped` or `not running`, or the step it failed at.
type MemberResult = Result<&'static str, StepError>;

/// Step 1: drains every running node through the head and waits, at most `timeout`, until
/// their executors are gone. A node that could not be drained gets its failure.
async fn drain_nodes(
    ctx: &Ctx,
    conns: &[Option<Connected>],
    results: &mut [MemberResult],
    timeout: Duration,
) {
    let n = ctx.spec.members.len();
    let running: Vec<usize> = (1..n)
        .filter(|i| {
            conns[*i]
                .as_ref()
                .is_some_and(|c| c.probe.running.is_some())
        })
        .collect();
    match conns[0].as_ref().filter(|h| h.probe.running.is_some()) {
        None if !running.is_empty() => {
            for i in &running {
                results[*i] = Err(fail("drain", "the head is not reachable or not running"));
            }
        }
        None => {}
        Some(head) => {
            for i in &running {
                ctx.progress.step(*i, "draining");
                let name = super::remote::quote(&ctx.spec.members[*i].name);
                if let Err(e) = ctx.head_client(head, &format!("node drain {name}")).await {
                    results[*i] = Err(at("drain")(e));
                }
            }
            let draining: Vec<usize> = running
                .into_iter()
                .filter(|i| results[*i].is_ok())
                .collect();
            if let Err((e, busy)) = wait_drained(ctx, head, &draining, timeout).await {
                for i in busy {
                    results[i] = Err(e.clone());
                }
            }
        }
    }
}

/// Step 2: stops every node not failed so far, at once (bounded by the connection limit).
async fn stop_nodes(ctx: &Arc<Ctx>, conns: &mut [Option<Connected>], results: &mut [MemberResult]) {
    let n = ctx.spec.members.len();
    let mut tasks = Vec::new();
    for i in 1..n {
        if results[i].is_err() {
            continue;
        }
        let Some(conn) = conns[i].take() else {
            continue;
        };
        let ctx = Arc::clone(ctx);
        tasks.push((
            i,
            tokio::spawn(async move {
                let _permit = ctx.limit.acquire().await;
                let r = stop(&ctx, i, &conn).await;
                (conn, r)
            }),
        ));
    }
    for (i, task) in tasks {
        match task.await {
            Ok((conn, r)) => {
                conns[i] = Some(conn);
                if let Err(e) = r {
                    results[i] = Err(e);
                }
            }
            Err(e) => results[i] = Err(fail("stop", format!("the task failed: {e}"))),
        }
    }
}

/// Step 3: stops the head, unless it failed already or a node it should drain was left
/// running.
async fn stop_head(
    ctx: &Ctx,
    conns: &[Option<Connected>],
    results: &mut [MemberResult],
    drain: bool,
) {
    let n = ctx.spec.members.len();
    let undrained: Vec<&str> = (1..n)
        .filter(|i| drain && matches!(&results[*i], Err(e) if e.step == "drain"))
        .map(|i| ctx.spec.members[i].name.as_str())
        .collect();
    if !undrained.is_empty() && results[0].is_ok() {
        results[0] = Err(fail(
            "stop",
            format!(
                "left running, since {} did not finish draining",
                undrained.join(", ")
            ),
        ));
    }
    if let (Some(head), Ok(_)) = (&conns[0], &results[0]) {
        if let Err(e) = stop(ctx, 0, head).await {
            results[0] = Err(e);
        }
    }
}

/// Step 4: on every host still in good standing, kills and reports whatever of the
/// cluster's binaries still runs.
async fn check_leftovers(ctx: &Ctx, conns: &[Option<Connected>], results: &mut [MemberResult]) {
    let n = ctx.spec.members.len();
    for i in 0..n {
        let Some(conn) = conns[i].as_ref() else {
            continue;
        };
        if results[i].is_err() {
            continue;
        }
        ctx.progress.step(i, "checking for leftovers");
        let script = scripts::leftovers(&conn.bin_dir, &ctx.spec.members[i].role_dir(), true);
        match conn
            .remote
            .run(&script, None, ctx.spec.ssh.command_timeout)
            .await
        {
            Ok(out) if out.stdout.trim().is_empty() => {}
            Ok(out) => {
                results[i] = Err(fail(
                    "verify",
                    format!("still running after SIGKILL: {}", out.stdout.trim()),
                ));
            }
            Err(e) => results[i] = Err(at("verify")(e)),
        }
    }
}

/// Prints `down`'s table, its summary and each failure; [`Outcome::Partial`] when a member
/// failed.
fn report_down(ctx: &Ctx, results: &[MemberResult]) -> Outcome {
    let n = ctx.spec.members.len();
    let rows: Vec<Vec<String>> = ctx
        .spec
        .members
        .iter()
        .zip(results)
        .map(|(m, r)| {
            vec![
                m.ssh.host.clone(),
                m.role.as_str().to_string(),
                m.name.clone(),
                match r {
                    Ok(what) => (*what).to_string(),
                    Err(e) => format!("failed at {}", e.step),
                },
            ]
        })
        .collect();
    let failed = results.iter().filter(|r| r.is_err()).count();
    // The outcome is the exit status and each failure goes to stderr; stdout only
    // summarises, so a closed stdout (`| head`) loses nothing the caller needs.
    let _summary_only = render::print_table(
        &[text("Host"), text("Role"), text("Name"), text("Result")],
        rows,
    )
    .and_then(|()| {
        outln!(
            "{} members: {} stopped, {} not running, {failed} failed",
            n,
            results
                .iter()
                .filter(|r| matches!(r, Ok("stopped")))
                .count(),
            results
                .iter()
                .filter(|r| matches!(r, Ok("not running")))
                .count(),
        )
    });
    for (m, r) in ctx.spec.members.iter().zip(results) {
        if let Err(e) = r {
            eprintln!("error: {}: {e}", m.label());
        }
    }
    if failed > 0 {
        return Outcome::Partial;
    }
    Outcome::Complete
}

/// Stops member `i`'s service (step `stop`).
async fn stop(ctx: &Ctx, i: usize, c: &Connected) -> Result<(), StepError> {
    ctx.progress.step(i, "stopping");
    let member = &ctx.spec.members[i];
    let script = scripts::stop(member, c.manager, &ctx.spec.name);
    // The stop script waits up to 15 s for the supervisor.
    c.remote
        .run(
            &script,
            None,
            ctx.spec.ssh.command_timeout + Duration::from_secs(20),
        )
        .await
        .map_err(at("stop"))?;
    Ok(())
}

/// Waits until every member in `nodes` has no executor at the head; on timeout, the
/// error and the members still busy.
async fn wait_drained(
    ctx: &Ctx,
    head: &Connected,
    nodes: &[usize],
    timeout: Duration,
) -> Result<(), (StepError, Vec<usize>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = ctx
            .node_list(head)
            .await
            .map_err(|e| (at("drain")(e), nodes.to_vec()))?;
        let by_name: BTreeMap<&str, &NodeInfo> =
            list.iter().map(|n| (n.name.as_str(), n)).collect();
        let busy: Vec<usize> = nodes
            .iter()
            .copied()
            .filter(|i| {
                by_name
                    .get(ctx.spec.members[*i].name.as_str())
                    .is_some_and(|n| n.executors > 0 && n.state != NodeState::NotReady)
            })
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err((
                fail(
                    "drain",
                    format!(
                        "executors still running after {}; left running (stop it without --drain, or wait)",
                        humantime::format_duration(timeout)
                    ),
                ),
                busy,
            ));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// One member in `status`'s report (`--output json` prints a list of these).
#[derive(Debug, serde::Serialize)]
pub struct MemberStatus {
    pub host: String,
    pub role: &'static str,
    pub name: String,
    pub reachable: bool,
    /// The role's binary's version, when it runs there.
    pub version: Option<String>,
    /// The supervisor's pid, or `systemd`, when the daemon runs.
    pub running: Option<String>,
    /// `serving` for a running head; the head's state of a node (`Ready`, `NotReady`,
    /// `Draining`), or `not registered`.
    pub state: Option<String>,
    /// Why the host could not be looked at.
    pub error: Option<String>,
}

impl MemberStatus {
    /// Reachable, running, and for a node Ready.
    fn healthy(&self) -> bool {
        self.reachable
            && self.running.is_some()
            && (self.role == "head" || self.state.as_deref() == Some("Ready"))
    }
}

/// Runs `status`.
pub async fn status(
    spec: ClusterSpec,
    output: OutputFormat,
    home: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let ctx = Arc::new(Ctx::new(spec, home)?);
    let connected = ops::connect_all(&ctx).await;
    let head_nodes = match connected.first() {
        Some(Ok(head)) if head.probe.running.is_some() => ctx.node_list(head).await.ok(),
        _ => None,
    };
    ctx.progress.clear();
    let states: BTreeMap<String, NodeState> = head_nodes
        .unwrap_or_default()
        .into_iter()
        .map(|n| (n.name, n.state))
        .collect();
    let report: Vec<MemberStatus> = ctx
        .spec
        .members
        .iter()
        .zip(&connected)
        .map(|(m, c)| {
            let mut s = MemberStatus {
                host: m.ssh.host.clone(),
                role: m.role.as_str(),
                name: m.name.clone(),
                reachable: c.is_ok(),
                version: None,
                running: None,
                state: None,
                error: None,
            };
            match c {
                Err(e) => s.error = Some(e.to_string()),
                Ok(c) => {
                    s.version = c.probe.version.clone();
                    s.running = c.probe.running.clone();
                    s.state = match m.role {
                        Role::Head => c.probe.running.is_some().then(|| "serving".to_string()),
                        Role::Node => Some(
                            states
                                .get(&m.name)
                                .map_or("not registered".to_string(), |s| format!("{s:?}")),
                        ),
                    };
                }
            }
            s
        })
        .collect();
    ops::close_all(connected.into_iter().map(Result::ok).collect()).await;
    match output {
        OutputFormat::Json => render::print_json(&report)?,
        OutputFormat::Table => {
            let rows = report
                .iter()
                .map(|s| {
                    vec![
                        s.host.clone(),
                        s.role.to_string(),
                        s.name.clone(),
                        if s.reachable { "yes" } else { "no" }.to_string(),
                        ops::short_version(s.version.as_deref()),
                        match s.running.as_deref() {
                            None if !s.reachable => "-".to_string(),
                            None => "stopped".to_string(),
                            Some("systemd") => "running (systemd)".to_string(),
                            Some(pid) => format!("running (pid {pid})"),
                        },
                        s.state.clone().unwrap_or_else(|| "-".to_string()),
                    ]
                })
                .collect();
            render::print_table(
                &[
                    text("Host"),
                    text("Role"),
                    text("Name"),
                    text("Reachable"),
                    text("Version"),
                    text("Process"),
                    text("State"),
                ],
                rows,
            )?;
        }
    }
    for (m, s) in ctx.spec.members.iter().zip(&report) {
        if let Some(e) = &s.error {
            eprintln!("error: {}: {e}", m.label());
        }
    }
    if !report.iter().all(MemberStatus::healthy) {
        return Ok(Outcome::Partial);
    }
    Ok(Outcome::Complete)
}
