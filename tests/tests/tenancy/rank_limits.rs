//! Bob cannot lift his own rank's cgroup limits. An `--mpi` job's rank grows its cgroup to
//! its node's share of the job (`FLAME_LOCAL_WORLD_SIZE` ranks), because Open MPI starts
//! all of that node's processes in it. The count must be the head's: bob's job sets
//! `FLAME_LOCAL_WORLD_SIZE=64` (and `LOCAL_WORLD_SIZE`) in its own environment, and his
//! rank still sees the head's value and gets the limits of 2 ranks, not 64.
//!
//! The job's `mpirun` is bob's own program (his job's `PATH` puts it first), as any user
//! may do: it prints what it sees, its environment and the limits of the cgroup it runs
//! in. A second job without a memory size shows the default limit of
//! [`JOB_MEMORY_PER_RANK_DEFAULT_BYTES`].

use flame_client::Client;
use flame_protocol::model::{JobSpec, JobState, SessionSpec, JOB_MEMORY_PER_RANK_DEFAULT_BYTES};
use flame_protocol::SessionId;
use flame_tests::test_service::{wait_session, FINISH_TIMEOUT};
use flame_tests::{prerequisites, Cluster, ClusterOptions};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const MIB: u64 = 1024 * 1024;
/// Each of bob's ranks asks for this much memory and half a cpu.
const RANK_MEMORY_BYTES: u64 = 64 * MIB;
const RANK_CPU_MILLIS: u32 = 500;
/// Ranks of bob's job, all on the one node.
const RANKS: u32 = 2;
/// What bob claims in his job's environment.
const CLAIMED: &str = "64";

/// Prints the environment's local world sizes and the memory limit and cpu quota (in
/// millicpus) of the cgroup it runs in, cgroup v1 or v2, one `key=value` per line.
const REPORT_SCRIPT: &str = r#"#!/bin/sh
echo "flame_local_world_size=$FLAME_LOCAL_WORLD_SIZE"
echo "local_world_size=$LOCAL_WORLD_SIZE"
while IFS=: read -r id controllers path; do
    case ",$controllers," in
    *,memory,*)
        echo "memory_limit=$(cat "/sys/fs/cgroup/memory$path/memory.limit_in_bytes")" ;;
    esac
    case ",$controllers," in
    *,cpu,*)
        quota=$(cat "/sys/fs/cgroup/$controllers$path/cpu.cfs_quota_us")
        period=$(cat "/sys/fs/cgroup/$controllers$path/cpu.cfs_period_us")
        echo "cpu_millis=$((quota * 1000 / period))" ;;
    esac
    if [ "$id" = 0 ] && [ -f "/sys/fs/cgroup$path/memory.max" ]; then
        echo "memory_limit=$(cat "/sys/fs/cgroup$path/memory.max")"
        read -r quota period < "/sys/fs/cgroup$path/cpu.max"
        echo "cpu_millis=$((quota * 1000 / period))"
    fi
done < /proc/self/cgroup
"#;

/// A folder of bob's programs, `mpirun` among them, that the executor user can run.
fn bobs_programs(dir: &Path) -> std::path::PathBuf {
    let bin = dir.join("bob-bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in ["mpirun", "report"] {
        let path = bin.join(name);
        std::fs::write(&path, REPORT_SCRIPT).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// Runs `job` as `client`'s user to its end; returns its state and all its output.
async fn run_job(client: &Client, job: JobSpec) -> (JobState, SessionId, String) {
    let session = client
        .create_session(SessionSpec {
            job: Some(job),
            ..SessionSpec::new("")
        })
        .await
        .unwrap();
    let id = session.id();
    let info = wait_session(client, id, "an ended job", FINISH_TIMEOUT, |i| {
        i.job.as_ref().is_some_and(|j| j.state.is_final())
    })
    .await;
    let state = info.job.as_ref().unwrap().state;
    let mut logs = client.logs(id, None, false).await.unwrap();
    let mut out = String::new();
    while let Some(event) = logs.next().await {
        if let flame_protocol::messages::LogEvent::Chunk { data, .. } = event.unwrap() {
            out.push_str(&String::from_utf8_lossy(&data));
        }
    }
    (state, id, out)
}

/// The value of `key=` in `out`: each must appear, and only with one value.
fn value_of<'a>(out: &'a str, key: &str) -> &'a str {
    let values: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .collect();
    assert!(
        !values.is_empty() && values.iter().all(|v| *v == values[0]),
        "`{key}` is not reported once, or with different values:\n{out}"
    );
    values[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn bob_cannot_lift_his_ranks_limits_through_his_environment() {
    let test = "bob_cannot_lift_his_ranks_limits_through_his_environment";
    if !prerequisites::root(test) {
        return;
    }
    let cluster = Cluster::start(
        ClusterOptions::default()
            .executor_user("nobody")
            .allow_root_executors(false),
    )
    .await;
    let node = cluster.node_list().await.into_iter().next().unwrap();
    if !prerequisites::cgroups(test, &node) {
        return;
    }
    let bin = bobs_programs(cluster.dir());
    let bob = Client::connect(&cluster.client_config_as(cluster.user_token("bob", false).await))
        .await
        .unwrap();

    let mut job = JobSpec::new("report", RANKS);
    job.mpi = true;
    job.ranks_per_node = Some(RANKS);
    job.resources.cpu_millis = RANK_CPU_MILLIS;
    job.resources.memory_bytes = Some(RANK_MEMORY_BYTES);
    job.env = BTreeMap::from([
        (
            "PATH".to_string(),
            format!("{}:/usr/bin:/bin", bin.display()),
        ),
        ("FLAME_LOCAL_WORLD_SIZE".to_string(), CLAIMED.to_string()),
        ("LOCAL_WORLD_SIZE".to_string(), CLAIMED.to_string()),
    ]);
    let (state, id, out) = run_job(&bob, job).await;
    assert_eq!(
        state,
        JobState::Succeeded,
        "job {id}:\n{out}\n{}",
        cluster.logs()
    );
    // He sees the head's count, not his own,
    assert_eq!(
        value_of(&out, "flame_local_world_size"),
        RANKS.to_string(),
        "{out}"
    );
    assert_eq!(
        value_of(&out, "local_world_size"),
        RANKS.to_string(),
        "{out}"
    );
    // and his `mpirun` runs within the node's share of his job: 2 ranks' worth.
    assert_eq!(
        value_of(&out, "memory_limit"),
        (RANK_MEMORY_BYTES * u64::from(RANKS)).to_string(),
        "{out}"
    );
    assert_eq!(
        value_of(&out, "cpu_millis"),
        (RANK_CPU_MILLIS * RANKS).to_string(),
        "{out}"
    );

    // A job that names no memory still has a limit: the default, per rank.
    let mut job = JobSpec::new(bin.join("report").display().to_string(), 1);
    job.resources.cpu_millis = RANK_CPU_MILLIS;
    let (state, id, out) = run_job(&bob, job).await;
    assert_eq!(
        state,
        JobState::Succeeded,
        "job {id}:\n{out}\n{}",
        cluster.logs()
    );
    assert_eq!(
        value_of(&out, "memory_limit"),
        JOB_MEMORY_PER_RANK_DEFAULT_BYTES.to_string(),
        "{out}"
    );
}
