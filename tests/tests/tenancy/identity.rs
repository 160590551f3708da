//! Each owner's executors run as the owner's own Unix identity, so the kernel keeps bob
//! out of alice's: every probe below runs inside bob's executor, as bob's uid, against
//! alice's live executor on the same node, and fails with the error the kernel gives bob.
//! Also: an application restricted to alice refuses bob with the head's error; owners keep
//! their uid across a head restart; a site-user node names a missing account; a node that
//! puts every owner in one identity is flagged by `flame node list`; the built-in
//! applications never run as root, even on a node that allows root.

use super::user_client;
use flame_protocol::model::{ApplicationSpec, ErrorKind, ShimKind};
use flame_tests::test_service::{self, ServiceSession, Whoami, SESSION_POLL_PAUSE};
use flame_tests::{prerequisites, Cluster, ClusterOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// `delay_release` of applications whose executors must stay alive for the probes.
const KEEP_MS: u64 = 60_000;
/// Bound on a session showing why it waits.
const WAITING_TIMEOUT: Duration = Duration::from_secs(30);
/// The head's default owner uid range (`flame-head --owner-uid-range`).
const OWNER_UIDS: std::ops::RangeInclusive<u32> = 1_900_000_000..=1_900_999_999;

/// `whoami` in a new session of `app` as `client`'s user; the session stays open.
async fn whoami(client: &flame_client::Client, app: &str) -> (ServiceSession, Whoami) {
    let mut session = ServiceSession::open(client, app).await;
    let who = Whoami::parse(&session.output("whoami").await);
    (session, who)
}

/// Why `session` waits, once that names `needle`; polled (the head announces no change of
/// it), for at most [`WAITING_TIMEOUT`].
async fn waiting_reason(
    cluster: &Cluster,
    session: &flame_client::Session,
    needle: &str,
) -> String {
    let deadline = Instant::now() + WAITING_TIMEOUT;
    loop {
        let info = session.info().await.unwrap();
        if let Some(why) = info.waiting.clone().filter(|w| w.contains(needle)) {
            return why;
        }
        assert!(
            Instant::now() < deadline,
            "the session never said why it waits ({needle}): {info:#?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(SESSION_POLL_PAUSE).await;
    }
}

/// Runs `probe` in bob's executor; it must fail with `errno_text`.
async fn refused(bob: &mut ServiceSession, probe: &str, errno_text: &str) {
    let message = bob.failure(probe).await;
    assert!(
        message.contains(errno_text),
        "bob's `{probe}` failed, but not with `{errno_text}`: {message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bob_cannot_reach_alices_executors_or_her_application() {
    if !prerequisites::root("bob_cannot_reach_alices_executors_or_her_application") {
        return;
    }
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let admin = cluster.client().await;
    // Executors run as uids with no account: the service must be reachable by anyone.
    let (_copy_dir, copy) = test_service::world_executable_copy();
    let command = copy.display().to_string();
    admin
        .register_application(ApplicationSpec {
            shim: ShimKind::Unix,
            delay_release_ms: KEEP_MS,
            ..ApplicationSpec::new("probe", &command)
        })
        .await
        .unwrap();
    admin
        .register_application(ApplicationSpec {
            users: vec!["alice".into()],
            ..ApplicationSpec::new("alice-only", &command)
        })
        .await
        .unwrap();
    let alice = user_client(&cluster, "alice").await;
    let bob = user_client(&cluster, "bob").await;

    let (mut alice_session, a) = whoami(&alice, "probe").await;
    let (mut bob_session, b) = whoami(&bob, "probe").await;

    // Two owners' executors on one node: distinct executors, distinct uids from the
    // head's range, each its own gid and no other group, HOME its private folder.
    assert_ne!(a.get("executor_id"), b.get("executor_id"), "{a:#?}\n{b:#?}");
    let (alice_uid, bob_uid): (u32, u32) =
        (a.get("uid").parse().unwrap(), b.get("uid").parse().unwrap());
    assert_ne!(alice_uid, bob_uid, "alice and bob share uid {alice_uid}");
    for (who, uid, name) in [(&a, alice_uid, "alice"), (&b, bob_uid, "bob")] {
        assert!(
            OWNER_UIDS.contains(&uid),
            "{name}'s uid {uid} is outside the owner range"
        );
        assert_eq!(who.get("gid"), uid.to_string(), "{who:#?}");
        assert_eq!(who.get("groups"), uid.to_string(), "{who:#?}");
        assert_eq!(who.get("home"), who.get("cwd"), "{who:#?}");
        assert_eq!(who.get("user"), format!("flame-{name}"), "{who:#?}");
        assert_eq!(who.get("logname"), format!("flame-{name}"), "{who:#?}");
        let cwd = std::fs::metadata(who.get("cwd")).unwrap();
        assert_eq!((cwd.uid(), cwd.mode() & 0o777), (uid, 0o700), "{who:#?}");
    }

    // What bob's executor, as bob, cannot do to alice's.
    let pid = a.get("pid");
    let folder = a.get("cwd");
    let socket = a.get("shim_socket");
    let socket_dir = Path::new(socket).parent().unwrap().display().to_string();
    const EACCES: &str = "Permission denied (os error 13)";
    const EPERM: &str = "Operation not permitted (os error 1)";
    refused(
        &mut bob_session,
        &format!("read /proc/{pid}/environ"),
        EACCES,
    )
    .await;
    refused(&mut bob_session, &format!("signal {pid}"), EPERM).await;
    // Nor write into her pipes through /proc.
    refused(&mut bob_session, &format!("write /proc/{pid}/fd/0"), EACCES).await;
    refused(&mut bob_session, &format!("read /proc/{pid}/fd"), EACCES).await;
    refused(&mut bob_session, &format!("read {folder}"), EACCES).await;
    refused(&mut bob_session, &format!("write {folder}/planted"), EACCES).await;
    refused(&mut bob_session, &format!("read {socket_dir}"), EACCES).await;
    refused(&mut bob_session, &format!("connect {socket}"), EACCES).await;
    refused(&mut bob_session, &format!("unlink {socket}"), EACCES).await;
    refused(&mut bob_session, &format!("write {socket}"), EACCES).await;
    // Nothing bob tried reached her: her executor still answers, over its own socket.
    assert_eq!(alice_session.output("echo still mine").await, "still mine");
    assert!(!Path::new(folder).join("planted").exists());
    assert_eq!(
        std::fs::metadata(socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Her own executor may read its own environment: the refusals above are bob's.
    alice_session
        .output(&format!("read /proc/{pid}/environ"))
        .await;

    // An application restricted to alice: the head refuses bob, naming the restriction.
    let err = bob
        .create_session(flame_protocol::model::SessionSpec::new("alice-only"))
        .await
        .expect_err("bob opened a session of an application restricted to alice");
    assert_eq!(err.kind(), Some(ErrorKind::PermissionDenied), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("user `bob` may not use application `alice-only`")
            && text.contains("restricted to users alice"),
        "{text}"
    );
    let (only, who) = whoami(&alice, "alice-only").await;
    assert_eq!(who.get("uid"), alice_uid.to_string());
    only.finish().await;
    alice_session.finish().await;
    bob_session.finish().await;
    alice.close().await;
    bob.close().await;
    admin.close().await;

    // The same owner has the same uid after a head restart (it is stored), on a new
    // executor; a new owner gets a uid nobody has.
    cluster.kill_head().await;
    cluster.start_head_again().await;
    let admin = cluster.client().await;
    admin
        .register_application(ApplicationSpec {
            delay_release_ms: 0,
            ..ApplicationSpec::new("after-restart", &command)
        })
        .await
        .unwrap();
    let alice = user_client(&cluster, "alice").await;
    let carol = user_client(&cluster, "carol").await;
    let (session, again) = whoami(&alice, "after-restart").await;
    assert_ne!(again.get("executor_id"), a.get("executor_id"));
    assert_eq!(
        again.get("uid"),
        alice_uid.to_string(),
        "alice's uid changed across a restart"
    );
    session.finish().await;
    let (session, c) = whoami(&carol, "after-restart").await;
    let carol_uid: u32 = c.get("uid").parse().unwrap();
    assert!(
        OWNER_UIDS.contains(&carol_uid) && carol_uid != alice_uid && carol_uid != bob_uid,
        "carol got uid {carol_uid} (alice {alice_uid}, bob {bob_uid})"
    );
    session.finish().await;
    alice.close().await;
    carol.close().await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_user_node_runs_owners_as_their_accounts_and_names_a_missing_one() {
    if !prerequisites::root(
        "a_site_user_node_runs_owners_as_their_accounts_and_names_a_missing_one",
    ) {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default().executor_identity("site-user")).await;
    let nodes = cluster.node_list().await;
    assert_eq!(
        nodes[0].identity,
        Some(flame_protocol::model::ExecutorIdentity::SiteUser),
        "{nodes:?}"
    );
    let admin = cluster.client().await;
    let (_copy_dir, copy) = test_service::world_executable_copy();
    admin
        .register_application(ApplicationSpec {
            delay_release_ms: 0,
            ..ApplicationSpec::new("site", copy.display().to_string())
        })
        .await
        .unwrap();

    // The Flame user `nobody` runs as the account `nobody`.
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("there is no user `nobody`");
    let client = user_client(&cluster, "nobody").await;
    let (session, who) = whoami(&client, "site").await;
    assert_eq!(who.get("uid"), nobody.uid.to_string(), "{who:#?}");
    assert_eq!(who.get("user"), "nobody", "{who:#?}");
    session.finish().await;
    client.close().await;

    // A Flame user without an account: the launch fails, and the session says why.
    let ghost = "flame-ghost-no-account";
    assert!(nix::unistd::User::from_name(ghost).unwrap().is_none());
    let client = user_client(&cluster, ghost).await;
    let session = client
        .create_session(flame_protocol::model::SessionSpec::new("site"))
        .await
        .unwrap();
    session
        .submit(vec![bytes::Bytes::from_static(b"echo never")])
        .await
        .unwrap();
    let why = waiting_reason(&cluster, &session, ghost).await;
    assert!(
        why.contains("--executor-identity site-user")
            && why.contains(&format!("create the account `{ghost}`")),
        "{why}"
    );
    client.cancel_session(session.id()).await.unwrap();
    client.close().await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_identity_is_flagged_and_built_ins_never_run_as_root() {
    if !prerequisites::root("a_shared_identity_is_flagged_and_built_ins_never_run_as_root") {
        return;
    }
    // The old way, chosen explicitly: every owner as root, root allowed on the node.
    let cluster = Cluster::start(ClusterOptions::default().executor_user("root")).await;
    let out = cluster.flame(&["node", "list"]).await;
    out.assert_success();
    assert!(out.stdout.contains("fixed:root (SHARED)"), "{}", out.stdout);
    assert!(
        out.stderr
            .contains("warning: node node-0: it runs every owner's executors as `root`"),
        "{}",
        out.stderr
    );

    // Even so, the built-in ping application never runs as root: its launch fails, and
    // the session says why.
    let client = user_client(&cluster, "bob").await;
    let session = client
        .create_session(flame_protocol::model::SessionSpec::new("ping"))
        .await
        .unwrap();
    session
        .submit(vec![bytes::Bytes::from_static(b"ping")])
        .await
        .unwrap();
    let why = waiting_reason(&cluster, &session, "is root").await;
    assert!(
        why.contains("the application does not allow it (`allow_root = true` in its file)"),
        "{why}"
    );
    client.cancel_session(session.id()).await.unwrap();
    client.close().await;
}
