//! Running tasks through a session with the client library and accounting for every result.

use bytes::Bytes;
use flame_client::{ResultStream, Session};
use flame_protocol::model::{SessionSpec, TaskResult};
use flame_protocol::{SessionId, TaskId};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest wait for the next batch of results before a test gives up.
pub const RESULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Inputs handed to [`flame_client::Submitter::send`] at a time, so that a run exercises
/// several sends on one pipelined stream.
pub const SEND_CHUNK_INPUTS: usize = 1_000;

/// A durable session of the built-in `ping` application.
pub fn ping_spec() -> SessionSpec {
    SessionSpec::new("ping".to_string())
}

/// Reads results until the head says the session is finished. Panics on a stream error, on
/// a stall longer than `stall`, and when the stream ends without the head saying so.
pub async fn collect_results(watch: &mut ResultStream, stall: Duration) -> Vec<TaskResult> {
    collect_results_counting(watch, stall, &watch::Sender::new(0)).await
}

/// [`collect_results`], publishing on `seen` how many results it has read so far.
pub async fn collect_results_counting(
    watch: &mut ResultStream,
    stall: Duration,
    seen: &watch::Sender<usize>,
) -> Vec<TaskResult> {
    let mut results = Vec::new();
    loop {
        match tokio::time::timeout(stall, watch.next()).await {
            Err(_) => panic!(
                "no result of session {} for {stall:?} after {} results",
                watch.session(),
                results.len()
            ),
            Ok(None) => break,
            Ok(Some(Err(e))) => panic!("watching session {} failed: {e}", watch.session()),
            Ok(Some(Ok(batch))) => {
                results.extend(batch);
                seen.send_replace(results.len());
            }
        }
    }
    assert!(
        watch.is_finished(),
        "the result stream of session {} ended before the head said it finished, after {} results",
        watch.session(),
        results.len()
    );
    results
}

/// Watches `session` (before returning, so no result is missed) and collects its results
/// on a task of its own until the session finishes, with [`RESULT_STALL_TIMEOUT`]. The
/// receiver counts the results read so far, so a test can act once results flow.
pub async fn spawn_collector(
    session: &Session,
) -> (JoinHandle<Vec<TaskResult>>, watch::Receiver<usize>) {
    let mut watch = session.watch().await.expect("cannot watch the session");
    let (seen_tx, seen) = watch::channel(0);
    let collecting = tokio::spawn(async move {
        collect_results_counting(&mut watch, RESULT_STALL_TIMEOUT, &seen_tx).await
    });
    (collecting, seen)
}

/// Watches `session`, submits `inputs` on one pipelined stream (in chunks of
/// [`SEND_CHUNK_INPUTS`]) while results come in, closes the session and waits until it is
/// finished. Returns each input with its result, in input order.
///
/// Panics unless the acks give every input its own task id, every result belongs to one of
/// those ids, and every id gets exactly one result.
pub async fn run_tasks(session: &Session, inputs: Vec<Bytes>) -> Vec<(Bytes, TaskResult)> {
    let mut watch = session.watch().await.expect("cannot watch the session");
    let submitting = tokio::spawn({
        let session = session.clone();
        let inputs = inputs.clone();
        async move {
            let mut submitter = session.submitter().await.expect("cannot open a submitter");
            for chunk in inputs.chunks(SEND_CHUNK_INPUTS) {
                submitter.send(chunk.to_vec()).await.expect("submit failed");
            }
            let acks = submitter
                .finish()
                .await
                .expect("finishing the submit failed");
            session.close().await.expect("cannot close the session");
            acks
        }
    });
    let results = collect_results(&mut watch, RESULT_STALL_TIMEOUT).await;
    let acks = submitting.await.expect("the submitting task panicked");

    let ids: Vec<TaskId> = acks.iter().flat_map(|a| a.task_ids()).collect();
    match_results(inputs, &ids, results)
}

/// Pairs each input with the result of its task: `ids[i]` is the task id the head gave
/// `inputs[i]`. Panics unless every input has its own id, every result belongs to one of
/// those ids, and every id has exactly one result.
pub fn match_results(
    inputs: Vec<Bytes>,
    ids: &[TaskId],
    results: Vec<TaskResult>,
) -> Vec<(Bytes, TaskResult)> {
    assert_eq!(
        ids.len(),
        inputs.len(),
        "the task ids do not cover the inputs"
    );
    let mut index_of: HashMap<TaskId, usize> = HashMap::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        assert!(
            index_of.insert(*id, i).is_none(),
            "task id {id} was given to two inputs"
        );
    }
    let mut slots: Vec<Option<TaskResult>> = vec![None; inputs.len()];
    for result in results {
        let Some(&i) = index_of.get(&result.task) else {
            panic!("a result for task {}, which was not submitted", result.task);
        };
        assert!(
            slots[i].is_none(),
            "task {} has a second result: {:?}",
            result.task,
            result.outcome
        );
        slots[i] = Some(result);
    }
    inputs
        .into_iter()
        .zip(slots)
        .zip(ids)
        .map(|((input, slot), id)| {
            (
                input,
                slot.unwrap_or_else(|| panic!("task {id} has no result")),
            )
        })
        .collect()
}

/// Reads `watch` until every task of `ids` has a result, for at most `timeout` in all;
/// returns the results in `ids` order. Panics on a stream error, on the timeout, on a
/// result for a task outside `ids` and on a second result for one.
pub async fn wait_results(
    watch: &mut ResultStream,
    ids: &[TaskId],
    timeout: Duration,
) -> Vec<TaskResult> {
    let mut slots: HashMap<TaskId, Option<TaskResult>> = ids.iter().map(|&id| (id, None)).collect();
    let mut missing = ids.len();
    let deadline = tokio::time::Instant::now() + timeout;
    while missing > 0 {
        let batch = match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => panic!(
                "{missing} of {} results of session {} did not come within {timeout:?}",
                ids.len(),
                watch.session()
            ),
            Ok(None) => panic!(
                "the result stream of session {} ended with {missing} results missing",
                watch.session()
            ),
            Ok(Some(Err(e))) => panic!("watching session {} failed: {e}", watch.session()),
            Ok(Some(Ok(batch))) => batch,
        };
        for result in batch {
            let Some(slot) = slots.get_mut(&result.task) else {
                panic!(
                    "a result for task {}, which is not awaited: {result:?}",
                    result.task
                );
            };
            assert!(
                slot.is_none(),
                "task {} has a second result: {result:?}",
                result.task
            );
            *slot = Some(result);
            missing -= 1;
        }
    }
    ids.iter()
        .map(|id| slots.remove(id).flatten().expect("every slot is filled"))
        .collect()
}

/// The session id in `flame ping`'s first line, `Session N was created ...`.
pub fn ping_session_id(stdout: &str) -> SessionId {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("Session ")?.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no `Session N was created` line in:\n{stdout}"))
}

/// The fault tests' Python application (`tests/python/crashy_service.py`: reverses its
/// input; `sleep:S` sleeps first, `crash:T` dies), named `name`, over the stdio shim, with
/// up to 2 executors and 3 attempts; tests change what they need with struct update.
pub fn crashy_service(name: &str) -> flame_protocol::model::ApplicationSpec {
    use flame_protocol::model::{ApplicationSpec, EnvValue, ShimKind};
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/crashy_service.py");
    assert!(script.is_file(), "{} is missing", script.display());
    ApplicationSpec {
        shim: ShimKind::Stdio,
        args: vec![script.display().to_string()],
        env: std::collections::BTreeMap::from([(
            "PYTHONDONTWRITEBYTECODE".into(),
            EnvValue::plain("1"),
        )]),
        max_instances: 2,
        delay_release_ms: 1_000,
        max_attempts: 3,
        ..ApplicationSpec::new(name, "python3")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_from_ping_output() {
        let out =
            "Session 42 was created in 1 ms; running 10 tasks of 16 bytes.\n10 tasks completed";
        assert_eq!(ping_session_id(out), SessionId(42));
    }

    #[test]
    #[should_panic(expected = "no `Session N was created` line")]
    fn missing_session_line_panics() {
        ping_session_id("10 tasks completed");
    }
}
