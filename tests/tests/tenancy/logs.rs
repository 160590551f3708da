//! Bob never reads alice's logs: not of her session (refused), and not through his own
//! session, even when the executor that served her serves him next (today's scheduler may
//! rebind it; with executors per owner it never does, and this still holds), nor with
//! `--follow` across that rebind, nor in the output a crash of his task reports.

use flame_client::Client;
use flame_protocol::auth::Secret;
use flame_protocol::model::TaskOutcome;
use flame_tests::cluster::{flame_command, write_private};
use flame_tests::command::{run_command, CmdOutput};
use flame_tests::logging_service::{executor_of, spec, Follower};
use flame_tests::test_service::ServiceSession;
use flame_tests::{prerequisites, Cluster, ClusterOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bound on one `flame` command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A token for `name`, and the file holding it (for the `flame` command).
async fn user(cluster: &Cluster, name: &str) -> (Secret, PathBuf) {
    let token = cluster.user_token(name, false).await;
    let file = cluster.dir().join(format!("{name}.token"));
    write_private(&file, token.expose().as_bytes());
    (token, file)
}

/// `flame ARGS...` as the user of `token_file`.
async fn flame_as(cluster: &Cluster, token_file: &Path, args: &[&str]) -> CmdOutput {
    let mut command = flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(token_file)
        .args(args);
    run_command(command, COMMAND_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bob_never_reads_alices_logs_even_from_an_executor_she_used() {
    if !prerequisites::python3("bob_never_reads_alices_logs_even_from_an_executor_she_used") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let admin = cluster.client().await;
    let mut spec = spec("py-tenancy-logs");
    // One executor at a time: bob's session can only run once alice's lets go of it. One
    // attempt: a crash is reported from the executor it happened on.
    spec.max_instances = 1;
    spec.max_attempts = 1;
    admin.register_application(spec).await.unwrap();
    let (alice_token, _alice_file) = user(&cluster, "alice").await;
    let (bob_token, bob_file) = user(&cluster, "bob").await;
    let alice = Client::connect(&cluster.client_config_as(alice_token))
        .await
        .unwrap();
    let bob = Client::connect(&cluster.client_config_as(bob_token))
        .await
        .unwrap();

    let mut hers = ServiceSession::open(&alice, "py-tenancy-logs").await;
    let her_executor = executor_of(&hers.output("log:alice-secret").await);
    let her_id = hers.session.id().to_string();
    let mut his = ServiceSession::open(&bob, "py-tenancy-logs").await;
    let waiting = his.submit(&["log:bob-line"]).await;
    hers.finish().await;
    let done = his.wait(&waiting).await;
    let his_executor = match &done[0].outcome {
        TaskOutcome::Succeeded(out) => executor_of(&String::from_utf8_lossy(out)),
        other => panic!("bob's task did not succeed: {other:?}\n{}", cluster.logs()),
    };
    let his_id = his.session.id().to_string();

    // Following his session: his lines, as they come, and nothing of hers.
    let mut follower = Follower::start_as(&cluster, &his_id, &bob_file);
    follower
        .wait_line(&format!("bob-line from {his_executor}"), &cluster)
        .await;
    his.output("log:bob-again").await;
    follower
        .wait_line(&format!("bob-again from {his_executor}"), &cluster)
        .await;
    // The end of the output a crash's message carries is his own.
    let crash = his.failure("crash:bob-crash").await;
    assert!(crash.contains("bob-crash"), "{crash}");
    assert!(!crash.contains("alice-secret"), "{crash}");
    his.finish().await;
    let seen = follower.wait_success(&cluster).await;
    assert!(
        !seen.iter().any(|l| l.contains("alice-secret")),
        "bob's follow showed alice's output: {seen:?}"
    );

    // His whole log, and the executor that served her alone.
    let all = flame_as(&cluster, &bob_file, &["logs", &his_id]).await;
    all.assert_success();
    assert!(all.stdout.contains("bob-line from"), "{all}");
    assert!(!all.stdout.contains("alice-secret"), "{all}");
    let by_her_executor = flame_as(
        &cluster,
        &bob_file,
        &["logs", &his_id, "--executor", &her_executor.to_string()],
    )
    .await;
    if her_executor == his_executor {
        by_her_executor.assert_success();
        assert!(
            by_her_executor.stdout.contains("bob-line from"),
            "{by_her_executor}"
        );
    } else {
        // Executors per owner: hers never served him, and the head says so.
        by_her_executor.assert_failure();
        assert!(
            by_her_executor.stderr.contains("did not serve"),
            "{by_her_executor}"
        );
    }
    assert!(
        !by_her_executor.stdout.contains("alice-secret"),
        "{by_her_executor}"
    );

    // Her session's logs are refused to him, followed or not.
    for args in [
        vec!["logs", her_id.as_str()],
        vec!["logs", her_id.as_str(), "--follow"],
    ] {
        let refused = flame_as(&cluster, &bob_file, &args).await;
        refused.assert_failure();
        assert!(
            refused.stderr.contains("belongs to another user"),
            "{refused}"
        );
        assert!(!refused.stdout.contains("alice-secret"), "{refused}");
    }
    alice.close().await;
    bob.close().await;
    admin.close().await;
}
