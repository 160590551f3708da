//! Running tasks through a session with the client library and accounting for every result.

use bytes::Bytes;
use flame_client::{ResultStream, Session};
use flame_protocol::model::{SessionSpec, TaskResult};
use flame_protocol::{SessionId, TaskId};
use std::collections::HashMap;
use std::time::Duration;

/// The longest wait for the next batch of results before a test gives up.
pub const RESULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Inputs handed to [`flame_client::Submitter::send`] at a time, so that a run exercises
/// several sends on one pipelined stream.
pub const SEND_CHUNK_INPUTS: usize = 1_000;

/// A durable session of the built-in `ping` application.
pub fn ping_spec() -> SessionSpec {
    SessionSpec {
        application: "ping".to_string(),
        common_data: Bytes::new(),
        ephemeral: false,
    }
}

/// Reads results until the head says the session is finished. Panics on a stream error, on
/// a stall longer than `stall`, and when the stream ends without the head saying so.
pub async fn collect_results(watch: &mut ResultStream, stall: Duration) -> Vec<TaskResult> {
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
            Ok(Some(Ok(batch))) => results.extend(batch),
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
    assert_eq!(ids.len(), inputs.len(), "the acks do not cover the inputs");
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
        .zip(&ids)
        .map(|((input, slot), id)| {
            (
                input,
                slot.unwrap_or_else(|| panic!("task {id} has no result")),
            )
        })
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
