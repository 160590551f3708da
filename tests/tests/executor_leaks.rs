//! Two hundred executors started and released one after another leave nothing behind on
//! the node: no cgroup, no descriptor of the agent, no socket or work folder, no zombie,
//! no process.
//!
//! Each executor serves one session of one task and is released when it ends
//! (`delay_release` 0); the test waits for the head to count no executor of the
//! application before the next session, so every session gets a new process, which the
//! distinct `FLAME_EXECUTOR_ID`s prove. Half the executors use the stdio shim, half the
//! socket shim.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_client::Client;
use flame_protocol::model::{ApplicationSpec, ShimKind};
use flame_tests::cgroup::NodeCgroups;
use flame_tests::test_service::{self, wait_no_executors, ServiceSession, Whoami};
use flame_tests::{prerequisites, procfs, Cluster, ClusterOptions};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// Executors started and released by the loop.
const EXECUTORS: usize = 200;
/// Descriptors the agent may hold beyond the count before the loop: timers and QUIC state
/// come and go, but never in proportion to the executors.
const FD_SLACK: usize = 3;
/// Bound on a released executor's disappearance from the head's count, and on the node
/// settling after the loop.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two looks at the node while waiting for it to settle.
const SETTLE_POLL_PAUSE: Duration = Duration::from_millis(100);

/// What a node holds that a released executor could leak.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    /// `exec-*` cgroups over every hierarchy (none without cgroups).
    cgroups: Vec<String>,
    /// The agent's open descriptors.
    fds: Vec<(i32, String)>,
    /// Entries of the runtime folder (executors' socket folders).
    run_entries: Vec<String>,
    /// `exec-*` entries of the work folder.
    work_entries: Vec<String>,
    /// Children of the agent in state Z.
    zombies: Vec<i32>,
    /// Live processes whose command line carries the test's marker.
    services: Vec<(i32, String)>,
}

fn entries(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(list) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = list
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn footprint(cluster: &Cluster, cgroups: Option<&NodeCgroups>, marker: &str) -> Footprint {
    let pid = cluster.node_pid(0);
    Footprint {
        cgroups: cgroups
            .map(|c| {
                c.executors()
                    .into_iter()
                    .flat_map(|(root, names)| {
                        names
                            .into_iter()
                            .map(move |n| root.join(n).display().to_string())
                    })
                    .collect()
            })
            .unwrap_or_default(),
        fds: procfs::fds(pid).unwrap(),
        // The node's own public copy of the cluster CA (for ranks) lives there too.
        run_entries: entries(&cluster.node_run_dir(0), "exec-"),
        work_entries: entries(&cluster.node_work_dir(0), "exec-"),
        zombies: procfs::zombie_children(pid),
        services: procfs::with_cmdline_containing(marker),
    }
}

impl Footprint {
    /// What is wrong with this footprint compared with `before`, if anything.
    fn leaks(&self, before: &Footprint) -> Vec<String> {
        let mut leaks = Vec::new();
        if !self.cgroups.is_empty() {
            leaks.push(format!("executor cgroups: {:?}", self.cgroups));
        }
        if self.fds.len() > before.fds.len() + FD_SLACK {
            let new: Vec<&(i32, String)> = self
                .fds
                .iter()
                .filter(|fd| !before.fds.contains(fd))
                .collect();
            leaks.push(format!(
                "the agent holds {} descriptors, {} before; new ones: {new:?}",
                self.fds.len(),
                before.fds.len()
            ));
        }
        if !self.run_entries.is_empty() {
            leaks.push(format!("runtime folder entries: {:?}", self.run_entries));
        }
        if !self.work_entries.is_empty() {
            leaks.push(format!("work folders: {:?}", self.work_entries));
        }
        if !self.zombies.is_empty() {
            leaks.push(format!("zombie children of the agent: {:?}", self.zombies));
        }
        if !self.services.is_empty() {
            leaks.push(format!("service processes: {:?}", self.services));
        }
        leaks
    }
}

/// One session of `app` with one `whoami` task, closed; waits until the head counts no
/// executor of `app`. Returns the id of the executor that ran it.
async fn run_one(client: &Client, app: &str) -> String {
    let mut session = ServiceSession::open(client, app).await;
    let who = Whoami::parse(&session.output("whoami").await);
    session.finish().await;
    wait_no_executors(client, app, SETTLE_TIMEOUT).await;
    who.get("executor_id").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_released_executors_leave_nothing_behind() {
    let test = "two_hundred_released_executors_leave_nothing_behind";
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let node = cluster.node_list().await.remove(0);
    // Without cgroups the rest is still checked; the prerequisite says what is not.
    let cgroups = if prerequisites::cgroups(test, &node) {
        cluster.node_cgroups(0).await
    } else {
        None
    };
    // Unique to this cluster, so processes of other tests never count.
    let marker = format!("--leak-marker={}", cluster.node_cgroup_root(0));
    let apps = [
        ("leak-stdio", ShimKind::Stdio),
        ("leak-unix", ShimKind::Unix),
    ];
    for (name, shim) in apps {
        client
            .register_application(ApplicationSpec {
                shim,
                args: vec![marker.clone()],
                max_instances: 1,
                delay_release_ms: 0,
                ..test_service::spec(name)
            })
            .await
            .unwrap();
    }

    // One executor of each kind first, so whatever the agent sets up once (a watcher, a
    // log folder) is counted before.
    let mut seen = BTreeSet::new();
    for (name, _) in apps {
        seen.insert(run_one(&client, name).await);
    }
    let before = footprint(&cluster, cgroups.as_ref(), &marker);
    let no_leak = before.leaks(&before);
    assert!(no_leak.is_empty(), "before the loop: {no_leak:#?}");

    for i in 0..EXECUTORS {
        let (name, _) = apps[i % apps.len()];
        let executor = run_one(&client, name).await;
        assert!(
            seen.insert(executor.clone()),
            "session {i} reused executor {executor}: each must be a new process"
        );
    }

    // The node cleans up after the head has counted the release: wait for it to settle.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let after = footprint(&cluster, cgroups.as_ref(), &marker);
        let leaks = after.leaks(&before);
        if leaks.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {EXECUTORS} executors were released:\n{}\n{}",
            leaks.join("\n"),
            cluster.logs()
        );
        tokio::time::sleep(SETTLE_POLL_PAUSE).await;
    }
    assert_eq!(seen.len(), EXECUTORS + apps.len());
    client.close().await;
}
