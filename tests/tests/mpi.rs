//! `flame submit --mpi`: a real Open MPI program, compiled here with `mpicc`, calls
//! `MPI_Allreduce` over 4 ranks on two nodes that live in network namespaces of their own.
//! `mpirun` runs in the first rank's allocation and starts its daemon on the other node
//! through Flame (`flame-mpi-agent` as `plm_rsh_agent`): there is no ssh anywhere. Needs
//! root, `ip`, `nft`, `mpicc` and `mpirun` (CI installs openmpi-bin and libopenmpi-dev);
//! elsewhere the test is skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{JobState, SessionInfo};
use flame_protocol::SessionId;
use flame_tests::{netns, prerequisites, run_command, Cluster, ClusterOptions};
use std::collections::BTreeSet;
use std::time::Duration;

const PROGRAM: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *node = getenv("FLAME_NODE");
    long mine = rank + 1, sum = 0;
    MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d on %s: sum %ld\n", rank, size, node ? node : "?", sum);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn mpi_allreduce_over_two_nodes_without_ssh() {
    let test = "mpi_allreduce_over_two_nodes_without_ssh";
    if !netns::available(test)
        || !prerequisites::on_path(test, "mpicc", "libopenmpi-dev")
        || !prerequisites::on_path(test, "mpirun", "openmpi-bin")
    {
        return;
    }
    // The program lives where every node can run it: nodes share this machine's files.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("allreduce.c");
    let program = dir.path().join("allreduce");
    std::fs::write(&source, PROGRAM).unwrap();
    let mut mpicc = tokio::process::Command::new("mpicc");
    mpicc.arg("-o").arg(&program).arg(&source);
    run_command(mpicc, Duration::from_secs(120))
        .await
        .assert_success();

    let cluster = Cluster::start(
        ClusterOptions::default()
            .nodes(2)
            .cpus(2)
            .network_namespaces(),
    )
    .await;
    // Each MPI process first prints the cpu quota of the cgroup it runs in (v1 or v2),
    // then becomes the program.
    let script = format!(
        "awk -F: '$2 ~ /(^|,)cpu(,|$)/ {{ print \"/sys/fs/cgroup/\" $2 $3 \"/cpu.cfs_quota_us\" }} \
         $1 == \"0\" {{ print \"/sys/fs/cgroup\" $3 \"/cpu.max\" }}' /proc/self/cgroup | \
         while read -r f; do [ -f \"$f\" ] && echo \"quota $(cut -d' ' -f1 \"$f\")\"; done; \
         exec {}",
        program.display()
    );
    let out = cluster
        .flame(&[
            "submit",
            "--mpi",
            "-n",
            "4",
            "--ranks-per-node",
            "2",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .await;
    out.assert_success();
    // A node's MPI processes run under Open MPI's daemon, in one rank's cgroup, which
    // holds the node's share of the job: 2 ranks of 1 cpu (a 100 ms period).
    let quotas: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("quota "))
        .collect();
    let nodes = cluster.node_list().await;
    if prerequisites::cgroups(test, &nodes[0]) {
        assert_eq!(quotas, vec!["200000"; 4], "{out}");
    }
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("rank "))
        .collect();
    assert_eq!(lines.len(), 4, "{out}\n{}", cluster.logs());
    let mut ranks = BTreeSet::new();
    let mut nodes = BTreeSet::new();
    for line in &lines {
        // rank R of 4 on NODE: sum 10
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[2..4], ["of", "4"], "{line}");
        assert_eq!(
            words[words.len() - 2..],
            ["sum", "10"],
            "{line}: wrong sum\n{out}"
        );
        ranks.insert(words[1].to_string());
        nodes.insert(words[5].trim_end_matches(':').to_string());
    }
    assert_eq!(ranks.len(), 4, "{out}");
    // Both nodes ran ranks of the program: the daemon on the second was started by Flame.
    let expected: BTreeSet<String> = (0..2).map(Cluster::node_name).collect();
    assert_eq!(nodes, expected, "{out}");

    let job: SessionId = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("flame: job "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let view = cluster
        .flame(&["job", "view", &job.to_string(), "--output", "json"])
        .await;
    view.assert_success();
    let info: SessionInfo = serde_json::from_str(&view.stdout).unwrap();
    assert_eq!(info.job.unwrap().state, JobState::Succeeded);

    // One rank per node: the first node's daemon starts in `mpirun`'s own rank.
    let out = cluster
        .flame(&[
            "submit",
            "--mpi",
            "-n",
            "2",
            "--ranks-per-node",
            "1",
            "--",
            program.to_str().unwrap(),
        ])
        .await;
    out.assert_success();
    let sums: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("rank "))
        .collect();
    assert_eq!(sums.len(), 2, "{out}");
    assert!(sums.iter().all(|l| l.ends_with("sum 3")), "{out}");
}
