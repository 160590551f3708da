//! Who an executor is and how it talks: it runs as its application's user with no way to
//! regain privileges, inherits nothing of the node but its standard streams and a clean
//! environment, cannot read the head's state; and the Unix-socket shim works end to end,
//! for the Rust service side and the Python helper, with the socket folder private to the
//! executor and removed when it is released.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{ApplicationSpec, EnvValue, ShimKind, TaskOutcome};
use flame_tests::test_service::{self, wait_no_executors, ServiceSession, Whoami};
use flame_tests::{prerequisites, Cluster, ClusterOptions};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `delay_release` of applications whose executor must stay for the test to look at it.
const KEEP_MS: u64 = 60_000;
/// Bound on a released executor's folders going, and on its log showing a line.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two looks at a folder or a log while waiting for it to change.
const FILE_POLL_PAUSE: Duration = Duration::from_millis(50);
/// The variables an executor may see besides its application's own (`CUDA_VISIBLE_DEVICES`
/// only with GPUs, `FLAME_SHIM_SOCKET` only with the socket shim).
const NODE_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "FLAME_EXECUTOR_ID",
    "FLAME_NODE",
    "FLAME_APPLICATION",
    "FLAME_SHIM_SOCKET",
    "CUDA_VISIBLE_DEVICES",
];
/// A variable the application's spec sets.
const APP_VAR: &str = "FLAME_TEST_VAR";

/// `nobody`'s user and primary group ids.
fn nobody() -> (u32, u32) {
    let user = nix::unistd::User::from_name("nobody")
        .expect("cannot read the user database")
        .expect("there is no user `nobody`");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// Waits until `dir` has no `exec-*` entry; panics with what is left.
async fn wait_no_executor_dirs(dir: &Path, what: &str) {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        let left: Vec<String> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("exec-"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("cannot list {}: {e}", dir.display()),
        };
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} of released executors are left in {}: {left:?}",
            dir.display()
        );
        tokio::time::sleep(FILE_POLL_PAUSE).await;
    }
}

/// Checks what `whoami` says of an executor of node 0 running as `uid`:`gid`.
fn check_identity(cluster: &Cluster, who: &Whoami, uid: u32, gid: u32, shim: ShimKind) {
    assert_eq!(who.get("uid"), uid.to_string(), "{who:#?}");
    assert_eq!(who.get("gid"), gid.to_string(), "{who:#?}");
    assert_eq!(
        who.get("groups"),
        gid.to_string(),
        "supplementary groups of the node leaked in: {who:#?}"
    );
    assert_eq!(who.get("no_new_privs"), "1", "{who:#?}");
    assert_eq!(
        who.inherited_fds(),
        [0, 1, 2],
        "descriptors other than the standard streams were inherited: {who:#?}"
    );
    // Its own folder in the node's work folder, owned by it, is its working directory.
    let executor = who.get("executor_id");
    let cwd = cluster.node_work_dir(0).join(format!("exec-{executor}"));
    assert_eq!(Path::new(who.get("cwd")), cwd, "{who:#?}");
    let meta = std::fs::metadata(&cwd).unwrap();
    assert_eq!(meta.uid(), uid, "{} is not the executor's", cwd.display());
    // A clean environment: the node's variables and the application's, nothing else.
    let env = who.env_names();
    let foreign: Vec<&&str> = env
        .iter()
        .filter(|n| !NODE_ENV.contains(n) && **n != APP_VAR)
        .collect();
    assert!(
        foreign.is_empty(),
        "variables from outside leaked in: {foreign:?}"
    );
    for needed in [
        "PATH",
        "FLAME_EXECUTOR_ID",
        "FLAME_NODE",
        "FLAME_APPLICATION",
        APP_VAR,
    ] {
        assert!(env.contains(&needed), "{needed} is missing: {who:#?}");
    }
    match shim {
        ShimKind::Stdio | ShimKind::Batch => {
            assert_eq!(who.get("shim_socket"), "unset", "{who:#?}")
        }
        ShimKind::Unix => {
            let dir = cluster.node_run_dir(0).join(format!("exec-{executor}"));
            let socket = Path::new(who.get("shim_socket"));
            assert_eq!(socket.parent(), Some(dir.as_path()), "{who:#?}");
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!(meta.uid(), uid, "{} is not the executor's", dir.display());
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o700,
                "{} is not private",
                dir.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn executor_runs_as_its_user_without_privileges() {
    if !prerequisites::root("executor_runs_as_its_user_without_privileges") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    // The test binary may sit where `nobody` cannot reach it.
    let (_copy_dir, copy) = test_service::world_executable_copy();
    let (uid, gid) = nobody();
    let head_dir = cluster.data_dir();
    let state = head_dir.join("state.redb");
    assert!(state.is_file(), "{} is missing", state.display());
    let node_environ = format!("/proc/{}/environ", cluster.node_pid(0));

    for shim in [ShimKind::Stdio, ShimKind::Unix] {
        let name = format!("as-nobody-{shim}");
        client
            .register_application(ApplicationSpec {
                shim,
                // A fixed user serves one Flame user only: the admin, who opens the session.
                user: Some("nobody".into()),
                users: vec!["admin".into()],
                env: BTreeMap::from([(APP_VAR.to_string(), EnvValue::plain("visible"))]),
                delay_release_ms: KEEP_MS,
                ..ApplicationSpec::new(&name, copy.display().to_string())
            })
            .await
            .unwrap();
        let mut session = ServiceSession::open(&client, &name).await;
        let who = Whoami::parse(&session.output("whoami").await);
        check_identity(&cluster, &who, uid, gid, shim);

        // The head's state and the node's environment are out of its reach.
        for path in [
            head_dir.display().to_string(),
            state.display().to_string(),
            node_environ.clone(),
        ] {
            let message = session.failure(&format!("read {path}")).await;
            assert!(
                message.contains("Permission denied"),
                "{shim}: reading {path} did not fail for lack of permission: {message}"
            );
        }
        session.finish().await;
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_service_over_the_unix_socket() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let spec = ApplicationSpec {
        shim: ShimKind::Unix,
        env: BTreeMap::from([(APP_VAR.to_string(), EnvValue::plain("visible"))]),
        max_instances: 1,
        delay_release_ms: KEEP_MS,
        ..test_service::spec("socket-rust")
    };
    client.register_application(spec.clone()).await.unwrap();
    let mut session = ServiceSession::open(&client, "socket-rust").await;
    let who = Whoami::parse(&session.output("whoami").await);
    if nix::unistd::geteuid().is_root() {
        // A root node runs the admin's executors as the admin's own uid from the head's
        // range (owner-uid mode), gid the same number, no other group.
        let uid: u32 = who.get("uid").parse().unwrap();
        assert!(
            (1_900_000_000..=1_900_999_999).contains(&uid),
            "not an owner uid: {who:#?}"
        );
        check_identity(&cluster, &who, uid, uid, ShimKind::Unix);
    }
    assert_eq!(who.inherited_fds(), [0, 1, 2], "{who:#?}");
    let socket = PathBuf::from(who.get("shim_socket"));
    let meta = std::fs::metadata(&socket)
        .unwrap_or_else(|e| panic!("the socket {} is not there: {e}", socket.display()));
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{}",
        socket.display()
    );

    // Several tasks, in one batch and one by one, successes and failures.
    let results = session
        .run_all(&["echo one", "echo two", "alloc 1", "spin 10", "nope"])
        .await;
    let outcomes: Vec<&TaskOutcome> = results.iter().map(|r| &r.outcome).collect();
    let ok = |s: &str| TaskOutcome::Succeeded(bytes::Bytes::from(s.to_string()));
    assert_eq!(
        outcomes[..4],
        [
            &ok("one"),
            &ok("two"),
            &ok("allocated 1 MiB"),
            &ok("spun 10 ms")
        ]
    );
    assert!(
        matches!(outcomes[4], TaskOutcome::Failed(m) if m.contains("unknown command")),
        "{outcomes:?}"
    );
    assert_eq!(session.output("echo three").await, "three");
    let info = session.finish().await;
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (6, 1),
        "{info:#?}"
    );

    // An update releases the idle executor; its socket folder and work folder go with it.
    client
        .update_application(ApplicationSpec {
            delay_release_ms: 0,
            ..spec
        })
        .await
        .unwrap();
    wait_no_executors(&client, "socket-rust", CLEANUP_TIMEOUT).await;
    wait_no_executor_dirs(&cluster.node_run_dir(0), "socket folders").await;
    wait_no_executor_dirs(&cluster.node_work_dir(0), "work folders").await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_service_over_the_unix_socket() {
    if !prerequisites::python3("python_service_over_the_unix_socket") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/socket_service.py");
    assert!(script.is_file(), "{} is missing", script.display());
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            shim: ShimKind::Unix,
            args: vec![script.display().to_string()],
            // No __pycache__ written into the repository's shims/python.
            env: BTreeMap::from([("PYTHONDONTWRITEBYTECODE".into(), EnvValue::plain("1"))]),
            delay_release_ms: 0,
            ..ApplicationSpec::new("socket-python", "python3")
        })
        .await
        .unwrap();
    let mut session = ServiceSession::open(&client, "socket-python").await;
    let inputs: Vec<String> = (0..5).map(|i| format!("py-{i}")).collect();
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let results = session.run_all(&inputs).await;
    let mut executors = Vec::new();
    for (input, result) in inputs.iter().zip(&results) {
        let TaskOutcome::Succeeded(out) = &result.outcome else {
            panic!("`{input}` did not succeed: {result:?}\n{}", cluster.logs());
        };
        let out = String::from_utf8_lossy(out);
        let fields: Vec<&str> = out.split(' ').collect();
        let [executor, socket, upper] = fields[..] else {
            panic!("`{input}` answered {out:?}");
        };
        assert_eq!(upper, input.to_uppercase(), "{out}");
        let dir = cluster.node_run_dir(0).join(format!("exec-{executor}"));
        assert_eq!(Path::new(socket).parent(), Some(dir.as_path()), "{out}");
        executors.push((executor.to_string(), input.to_string()));
    }
    session.finish().await;

    // Over the socket, stdout is the application's own: the node keeps it in the log.
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    for (executor, input) in &executors {
        let log = cluster
            .node_log_dir(0)
            .join(format!("executor-{executor}.log"));
        let line = format!("logged {input}");
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&line)) {
            assert!(
                Instant::now() < deadline,
                "{} does not show `{line}`",
                log.display()
            );
            tokio::time::sleep(FILE_POLL_PAUSE).await;
        }
    }

    // Released (delay_release 0), the executors leave no socket folder behind.
    wait_no_executors(&client, "socket-python", CLEANUP_TIMEOUT).await;
    wait_no_executor_dirs(&cluster.node_run_dir(0), "socket folders").await;
    client.close().await;
}
