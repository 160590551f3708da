//! Objects and faults through real processes: a node killed with `kill -9` in the middle
//! of a session. Its task outputs are rebuilt by re-running their tasks while the session
//! is open, a kept object put only on it is reported lost by name (library and CLI), and
//! an object put with two replicas stays readable and gets its second copy back on the
//! third node. And tenancy at the node itself: a read grant of one owner, presented
//! straight to a node's object endpoint (Unix socket and QUIC), reads nothing of
//! another owner, even with the id in hand.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::{Client, ClientError};
use flame_protocol::auth::Secret;
use flame_protocol::endpoint::{self, Trust};
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::messages::{ClientRequest, ClientResponse, Hello, HelloReply, Role};
use flame_protocol::model::{ApplicationSpec, NodeState, SessionSpec, TaskOutcome};
use flame_protocol::object::{ObjectId, ObjectInfo, ObjectLocations, ObjectOrigin, ObjectRef};
use flame_protocol::object_transfer::{ObjectClient, TransferError};
use flame_protocol::{TaskId, PROTOCOL_VERSION};
use flame_tests::cluster::{dial, say_hello};
use flame_tests::results::{crashy_service, wait_results, RESULT_STALL_TIMEOUT};
use flame_tests::{Cluster, ClusterOptions};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Bytes of each task input: above the 100 KiB inline threshold, so inputs and outputs
/// (the input reversed) are objects.
const INPUT_BYTES: usize = 150 * 1024;
/// Tasks of the session; each sleeps [`TASK_SLEEP`] so that the input holder cannot keep
/// up alone and the other nodes take some (after the locality wait).
const TASKS: usize = 18;
const TASK_SLEEP: &str = "0.3";
/// The head's heartbeat timeout here (the shortest it accepts): the kill is noticed soon.
const HEARTBEAT_TIMEOUT: &str = "3s";
/// Bound on the head declaring the killed node lost, beyond its heartbeat timeout.
const NOT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the lost outputs' rebuild (an executor to start, the task to run again) and
/// on the replicas' top-up.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two looks at the object list while waiting for a repair: the head
/// announces none.
const POLL_PAUSE: Duration = Duration::from_millis(200);

/// `n` bytes that differ from any other call's (`seed`) and within themselves.
fn blob(n: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// `sleep:<TASK_SLEEP><i as 8 digits>` padded with spaces to [`INPUT_BYTES`]: the service
/// sleeps about `TASK_SLEEP` seconds (Python's `float` takes the digits as decimals and
/// ignores trailing spaces, not spaces inside), and each input is distinct.
fn sleep_input(i: usize) -> Bytes {
    let mut text = format!("sleep:{TASK_SLEEP}{i:08}").into_bytes();
    text.resize(INPUT_BYTES, b' ');
    text.into()
}

fn reversed(bytes: &[u8]) -> Bytes {
    bytes.iter().rev().copied().collect::<Vec<u8>>().into()
}

fn node_index(name: &str) -> usize {
    name.strip_prefix("node-")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("`{name}` is not a harness node name"))
}

/// Asks for `client`'s objects until `done` holds for them, for at most `timeout`;
/// panics with the last list seen, `what` and `extra()` (e.g. the head's reason).
async fn wait_objects<F, E, Fut>(
    client: &Client,
    what: &str,
    timeout: Duration,
    done: F,
    extra: E,
) -> Vec<ObjectInfo>
where
    F: Fn(&[ObjectInfo]) -> bool,
    E: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let objects = client.list_objects(None, None).await.unwrap();
        if done(&objects) {
            return objects;
        }
        if Instant::now() >= deadline {
            panic!(
                "not {what} after {timeout:?}: {}\n{objects:#?}",
                extra().await
            );
        }
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

fn info_of<'a>(objects: &'a [ObjectInfo], id: &ObjectId) -> Option<&'a ObjectInfo> {
    objects.iter().find(|o| o.object.id == *id)
}

/// Puts `bytes` (kept) with `replicas` copies while every node but `onto` is drained, so
/// that the copies land exactly there; undrains them again. Returns the reference.
async fn put_onto(
    client: &Client,
    nodes: usize,
    onto: &[&str],
    bytes: Bytes,
    replicas: u32,
) -> ObjectRef {
    let others: Vec<String> = (0..nodes)
        .map(Cluster::node_name)
        .filter(|n| !onto.contains(&n.as_str()))
        .collect();
    for n in &others {
        client.drain_node(n).await.unwrap();
    }
    let put = client.put_object(None, None, bytes, replicas).await;
    for n in &others {
        client.undrain_node(n).await.unwrap();
    }
    let object = put.unwrap();
    let objects = client.list_objects(None, None).await.unwrap();
    let info = info_of(&objects, &object.id).unwrap();
    let mut held = info.nodes.clone();
    held.sort();
    let mut wanted: Vec<String> = onto.iter().map(|s| s.to_string()).collect();
    wanted.sort();
    assert_eq!(held, wanted, "the put did not land where steered: {info:?}");
    object
}

/// Done-when 2 of issue 20: `kill -9` of a node mid-session. Three nodes of one cpu; a
/// session whose inputs and outputs are objects; the node holding outputs (and not the
/// inputs) is killed. Its outputs come back on a surviving node with the same bytes while
/// the session is open; a kept object put only there is reported lost, by name; an
/// object of two replicas is read throughout and gets its second copy back.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_outputs_are_rebuilt_and_its_put_objects_reported_lost() {
    const NODES: usize = 3;
    if !flame_tests::prerequisites::python3(
        "a_killed_node_outputs_are_rebuilt_and_its_put_objects_reported_lost",
    ) {
        return;
    }
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .nodes(NODES)
            .cpus(1)
            .head_args(["--heartbeat-timeout", HEARTBEAT_TIMEOUT]),
    )
    .await;
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            max_instances: NODES as u32,
            ..crashy_service("crashy")
        })
        .await
        .unwrap();
    let session = client
        .create_session(SessionSpec::new("crashy"))
        .await
        .unwrap();

    // Run the tasks; the outputs stay references, so the client never reads them here.
    let mut watch = session.watch().await.unwrap().keep_refs(true);
    let inputs: Vec<Bytes> = (0..TASKS).map(sleep_input).collect();
    let ids: Vec<TaskId> = session.submit(inputs.clone()).await.unwrap();
    let results = wait_results(&mut watch, &ids, RESULT_STALL_TIMEOUT).await;
    // Output id → (task, the bytes it must hold).
    let mut expected: HashMap<ObjectId, (TaskId, Bytes)> = HashMap::new();
    for (input, result) in inputs.iter().zip(&results) {
        let TaskOutcome::Object(r) = &result.outcome else {
            panic!(
                "task {} did not keep its output as an object: {:?}\n{}",
                result.task,
                result.outcome,
                cluster.logs()
            );
        };
        let want = reversed(input);
        assert_eq!(
            r.id,
            ObjectId::of(&want),
            "task {}: wrong output",
            result.task
        );
        expected.insert(r.id, (result.task, want));
    }

    // Who holds what: the inputs were put in one go on one node (the first holder of an
    // input is the put's; a node that ran the task elsewhere fetched a spare copy).
    let objects = client.list_objects(None, Some(session.id())).await.unwrap();
    let mut input_holders: BTreeMap<String, usize> = BTreeMap::new();
    let mut outputs_on: BTreeMap<String, Vec<ObjectId>> = BTreeMap::new();
    for o in &objects {
        match o.origin {
            ObjectOrigin::Put => {
                *input_holders.entry(o.nodes[0].clone()).or_default() += 1;
            }
            ObjectOrigin::Output { task, .. } => {
                let (t, _) = expected
                    .get(&o.object.id)
                    .unwrap_or_else(|| panic!("an output no result named: {o:?}"));
                assert_eq!(*t, task, "{o:?}");
                assert_eq!(o.nodes.len(), 1, "an output with other copies: {o:?}");
                outputs_on
                    .entry(o.nodes[0].clone())
                    .or_default()
                    .push(o.object.id);
            }
        }
    }
    assert_eq!(
        outputs_on.values().map(Vec::len).sum::<usize>(),
        TASKS,
        "{objects:#?}"
    );
    assert_eq!(
        input_holders.len(),
        1,
        "inputs on several nodes: {objects:#?}"
    );
    let holder = input_holders.into_keys().next().unwrap();
    // The victim: the node with the most outputs that is not the inputs' holder (whose
    // loss would take the inputs too, and with them the outputs' lineage).
    let (victim, lost_outputs) = outputs_on
        .iter()
        .filter(|(node, _)| **node != holder)
        .max_by_key(|(_, ids)| ids.len())
        .map(|(n, ids)| (n.clone(), ids.clone()))
        .unwrap_or_else(|| {
            panic!(
                "every task ran on {holder}, which held the inputs: nothing to test \
                 ({outputs_on:?})"
            )
        });
    let third = (0..NODES)
        .map(Cluster::node_name)
        .find(|n| *n != victim && *n != holder)
        .unwrap();
    eprintln!(
        "inputs on {holder}; outputs {:?}; killing {victim}",
        outputs_on
            .iter()
            .map(|(n, ids)| (n.as_str(), ids.len()))
            .collect::<Vec<_>>()
    );

    // A kept object only on the victim; one of two replicas on the victim and the third
    // node (the top-up can then only go to the holder).
    let lonely_bytes = blob(300 * 1024, 1);
    let lonely = put_onto(&client, NODES, &[&victim], lonely_bytes.clone(), 1).await;
    let pair_bytes = blob(2 * 1024 * 1024 + 5, 2);
    let pair = put_onto(&client, NODES, &[&victim, &third], pair_bytes.clone(), 2).await;
    assert_eq!(
        client.get_object(None, lonely.id).await.unwrap(),
        lonely_bytes
    );

    cluster.kill_node(node_index(&victim)).await;
    cluster
        .wait_node_state(node_index(&victim), NodeState::NotReady, NOT_READY_TIMEOUT)
        .await;

    // (b) The kept object is lost, by name, with the node named.
    let err = client.get_object(None, lonely.id).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ClientError::ObjectMissing { id, .. } if id == lonely.id),
        "{err:?}"
    );
    assert!(text.contains(&lonely.id.to_string()), "{text}");
    assert!(
        text.contains(&format!("lost with node {victim}")),
        "the error does not say it was lost with {victim}: {text}"
    );
    let list = cluster.flame(&["object", "list"]).await;
    list.assert_success();
    let row = list
        .stdout
        .lines()
        .find(|l| l.contains(&lonely.id.to_string()))
        .unwrap_or_else(|| panic!("{} is not listed: {list}", lonely.id));
    assert!(row.contains("LOST"), "not shown LOST: {row}\n{list}");

    // (c) Two replicas: still readable from the survivor, and topped up to two copies,
    // on the holder (the only ready node without one).
    assert_eq!(client.get_object(None, pair.id).await.unwrap(), pair_bytes);
    let objects = wait_objects(
        &client,
        "the replicas topped up",
        REPAIR_TIMEOUT,
        |objects| info_of(objects, &pair.id).is_some_and(|o| o.nodes.len() == 2),
        || async { cluster.logs() },
    )
    .await;
    let o = info_of(&objects, &pair.id).unwrap();
    let mut nodes = o.nodes.clone();
    nodes.sort();
    let mut want = vec![holder.clone(), third.clone()];
    want.sort();
    assert_eq!(nodes, want, "{o:?}");
    assert_eq!(o.replicas, 2, "{o:?}");

    // (a) The outputs the victim held are rebuilt, while the session is open: listed on a
    // surviving node, and read back with the task's bytes.
    let first_lost = lost_outputs[0];
    let objects = wait_objects(
        &client,
        "the lost outputs rebuilt",
        REPAIR_TIMEOUT,
        |objects| {
            lost_outputs.iter().all(|id| {
                info_of(objects, id)
                    .is_some_and(|o| !o.nodes.is_empty() && !o.nodes.contains(&victim))
            })
        },
        || async {
            let why = match client.get_object(None, first_lost).await {
                Ok(_) => "the first is readable".to_string(),
                Err(e) => format!("reading the first: {e}"),
            };
            format!("{why}\n{}", cluster.logs())
        },
    )
    .await;
    for id in &lost_outputs {
        let o = info_of(&objects, id).unwrap();
        let (task, want) = &expected[id];
        assert!(
            matches!(o.origin, ObjectOrigin::Output { task: t, .. } if t == *task),
            "{o:?}"
        );
        let got = client.get_object(None, *id).await.unwrap();
        assert!(
            got == *want,
            "output of task {task} rebuilt with other bytes"
        );
    }
    // Every other output is where it was and reads right too.
    for (id, (task, want)) in &expected {
        let got = client.get_object(None, *id).await.unwrap();
        assert!(got == *want, "output of task {task} reads other bytes");
    }
    // The re-runs were hidden: every task succeeded once, none failed.
    let info = session.info().await.unwrap();
    assert!(!info.is_finished(), "{info:?}");
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (TASKS as u64, 0),
        "{info:?}"
    );
    session.close().await.unwrap();
    client.close().await;
}

/// A raw authenticated client connection as the user of `token`.
async fn connect_raw(cluster: &Cluster, token: &Secret) -> quinn::Connection {
    let endpoint = endpoint::client(&Trust::CaFile(cluster.ca_file().to_path_buf()), None).unwrap();
    let addr: SocketAddr = cluster.head_addr().parse().unwrap();
    let conn = dial(&endpoint, addr).await.unwrap();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Client,
        agent: "objects-faults".into(),
        token: Some(token.clone()),
    };
    match say_hello(&conn, &hello).await.0 {
        HelloReply::Welcome { .. } => conn,
        HelloReply::Refused { reason } => panic!("hello refused: {reason}"),
    }
}

/// `LocateObjects` for the caller (empty owner), answered on its own stream.
async fn locate(conn: &quinn::Connection, ids: Vec<ObjectId>) -> ObjectLocations {
    let (send, recv) = conn.open_bi().await.expect("cannot open a stream");
    let mut writer = FrameWriter::new(send, flame_protocol::limits::FRAME_BYTES_MAX);
    let mut reader = FrameReader::new(recv, flame_protocol::limits::FRAME_BYTES_MAX);
    let request = ClientRequest::LocateObjects {
        owner: String::new(),
        ids,
    };
    writer.write(&request).await.expect("cannot send a request");
    let answer = tokio::time::timeout(
        flame_protocol::limits::REQUEST_TIMEOUT,
        reader.read_required::<ClientResponse>(),
    )
    .await
    .expect("no answer to LocateObjects in time")
    .expect("cannot read the answer");
    match answer {
        ClientResponse::ObjectLocations(l) => l,
        other => panic!("LocateObjects answered {other:?}"),
    }
}

/// A refusal by the node itself (not a failure to reach it).
fn assert_refused(result: Result<Bytes, TransferError>, what: &str) {
    match result {
        Err(TransferError::Refused { .. }) => {}
        Err(e) => panic!("{what}: not a refusal by the node: {e:?}"),
        Ok(_) => panic!("{what}: the node handed out another owner's object"),
    }
}

/// Tenancy at the node: mallory, with a valid read grant of her own for the id of an
/// object admin stored (she stored the same bytes, so the head grants her that id), goes
/// straight to admin's node. Asking for admin's copy with her grant is refused (the grant
/// is for another owner), and asking for her own copy there is refused too (that node
/// holds admin's copy only: copies are kept per owner). Both over the node's Unix socket
/// and over QUIC; the same grant at her own node reads her bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_grant_of_one_owner_reads_nothing_of_another_at_the_node() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(2)).await;
    let admin = cluster.client().await;
    let data = blob(3 * 1024 * 1024 + 1, 42);
    let theirs = put_onto(&admin, 2, &["node-0"], data.clone(), 1).await;
    // Mallory's copy of the same bytes goes to node-1 (node-0 drained for the put).
    admin.drain_node("node-0").await.unwrap();
    let mallory_token = cluster.user_token("mallory", false).await;
    let mallory = Client::connect(&cluster.client_config_as(mallory_token.clone()))
        .await
        .unwrap();
    let put = mallory.put_object(None, None, data.clone(), 1).await;
    admin.undrain_node("node-0").await.unwrap();
    let hers = put.unwrap();
    assert_eq!(hers, theirs);

    let admin_conn = connect_raw(&cluster, &cluster.admin_token()).await;
    let mallory_conn = connect_raw(&cluster, &mallory_token).await;
    let admin_loc = locate(&admin_conn, vec![theirs.id]).await;
    let mallory_loc = locate(&mallory_conn, vec![hers.id]).await;
    let admin_owner = admin_loc.grant.body.owner.clone();
    assert_ne!(admin_owner, "mallory");
    assert_eq!(mallory_loc.grant.body.owner, "mallory");
    let node0 = admin_loc.endpoints[admin_loc.objects[0].nodes[0] as usize].clone();
    let node1 = mallory_loc.endpoints[mallory_loc.objects[0].nodes[0] as usize].clone();
    assert_eq!(
        (node0.node.as_str(), node1.node.as_str()),
        ("node-0", "node-1")
    );
    assert!(
        node0.socket.is_some(),
        "a node on this host offers no Unix socket: {node0:?}"
    );
    let grant = &mallory_loc.grant;
    let transfer =
        ObjectClient::new(&Trust::CaFile(cluster.ca_file().to_path_buf()), None).unwrap();

    // The grant is good: it reads her own copy at her node.
    let mine = transfer
        .get("mallory", hers, std::slice::from_ref(&node1), grant)
        .await;
    assert_eq!(mine.unwrap(), data);

    let quic_only = |ep: &flame_protocol::object::ObjectEndpoint| {
        let mut ep = ep.clone();
        ep.socket = None;
        ep
    };
    for (how, ep) in [("unix socket", node0.clone()), ("QUIC", quic_only(&node0))] {
        // Admin's copy, with mallory's grant.
        assert_refused(
            transfer
                .get(&admin_owner, theirs, std::slice::from_ref(&ep), grant)
                .await,
            &format!("admin's copy with mallory's grant over the {how}"),
        );
        // Her own id at a node that holds only admin's copy of those bytes.
        assert_refused(
            transfer
                .get("mallory", hers, std::slice::from_ref(&ep), grant)
                .await,
            &format!("mallory's id at admin's node over the {how}"),
        );
    }
    // Admin still reads theirs there; mallory removing hers leaves admin's alone.
    mallory.remove_objects(None, &[hers.id]).await.unwrap();
    assert_eq!(admin.get_object(None, theirs.id).await.unwrap(), data);
    mallory.close().await;
    admin.close().await;
}
