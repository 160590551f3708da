//! Driving `flame-test-service` (this crate's `src/bin/flame-test-service.rs`): its spec,
//! a session that runs one text command at a time, and its `whoami` report.

use crate::command::binary;
use crate::results::wait_results;
use bytes::Bytes;
use flame_client::{Client, ResultStream, Session};
use flame_protocol::model::{ApplicationSpec, SessionInfo, SessionSpec, TaskOutcome, TaskResult};
use flame_protocol::{SessionId, TaskId};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The binary's name in the target folder.
pub const NAME: &str = "flame-test-service";
/// Bound on one command's result, launch of the executor included.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a closed session finishing, and on the head reporting its usage.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two looks at a session while waiting for its state to change; the head
/// announces no change of usage or of executors.
pub const SESSION_POLL_PAUSE: Duration = Duration::from_millis(50);

/// The path of `flame-test-service`.
pub fn path() -> PathBuf {
    binary(NAME)
}

/// A spec running `flame-test-service` over stdio, with the spec defaults: its executors
/// run as their owner's identity on the node, never as root.
pub fn spec(name: &str) -> ApplicationSpec {
    ApplicationSpec::new(name, path().display().to_string())
}

/// `n` inputs `sleep MS`: tasks whose length is wall time, whatever cpu they get, so that
/// executor time does not depend on how loaded the machine is.
pub fn sleeps(n: usize, ms: u64) -> Vec<Bytes> {
    (0..n).map(|_| Bytes::from(format!("sleep {ms}"))).collect()
}

/// A copy of `flame-test-service` in a fresh folder of its own, both world-readable and
/// executable, for executors running as another user (the target folder may sit below a
/// home folder they cannot enter). The folder goes when the returned guard drops.
pub fn world_executable_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("flame-test-service-")
        .tempdir()
        .expect("cannot create a folder for the service copy");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("cannot make the copy's folder 0755");
    let copy = dir.path().join(NAME);
    std::fs::copy(path(), &copy)
        .unwrap_or_else(|e| panic!("cannot copy {NAME} to {}: {e}", copy.display()));
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
        .expect("cannot make the copy 0755");
    (dir, copy)
}

/// An open session with a watch on its results, running one command at a time.
#[derive(Debug)]
pub struct ServiceSession {
    pub session: Session,
    watch: ResultStream,
}

impl ServiceSession {
    /// Opens a session of `application` and watches it.
    pub async fn open(client: &Client, application: &str) -> ServiceSession {
        let session = client
            .create_session(SessionSpec::new(application.to_string()))
            .await
            .unwrap_or_else(|e| panic!("cannot open a session of {application}: {e}"));
        let watch = session
            .watch()
            .await
            .unwrap_or_else(|e| panic!("cannot watch session {}: {e}", session.id()));
        ServiceSession { session, watch }
    }

    /// Submits `inputs` without waiting for their results; returns their task ids.
    pub async fn submit(&mut self, inputs: &[&str]) -> Vec<TaskId> {
        self.session
            .submit(inputs.iter().map(|i| Bytes::from(i.to_string())).collect())
            .await
            .unwrap_or_else(|e| panic!("cannot submit {inputs:?}: {e}"))
    }

    /// Waits, at most [`TASK_TIMEOUT`], for the results of `ids`.
    pub async fn wait(&mut self, ids: &[TaskId]) -> Vec<TaskResult> {
        wait_results(&mut self.watch, ids, TASK_TIMEOUT).await
    }

    /// Submits `inputs` and waits, at most [`TASK_TIMEOUT`], for their results.
    pub async fn run_all(&mut self, inputs: &[&str]) -> Vec<TaskResult> {
        let ids = self.submit(inputs).await;
        self.wait(&ids).await
    }

    /// Runs `input` and returns its result.
    pub async fn run(&mut self, input: &str) -> TaskResult {
        self.run_all(&[input]).await.remove(0)
    }

    /// Runs `input`; panics unless it succeeds; returns its output as text.
    pub async fn output(&mut self, input: &str) -> String {
        match self.run(input).await.outcome {
            TaskOutcome::Succeeded(out) => String::from_utf8_lossy(&out).into_owned(),
            other => panic!("`{input}` did not succeed: {other:?}"),
        }
    }

    /// Runs `input`; panics unless it fails; returns the message.
    pub async fn failure(&mut self, input: &str) -> String {
        match self.run(input).await.outcome {
            TaskOutcome::Failed(message) => message,
            other => panic!("`{input}` did not fail: {other:?}"),
        }
    }

    /// Closes the session and waits, at most [`FINISH_TIMEOUT`], for it to finish.
    pub async fn finish(mut self) -> SessionInfo {
        let id = self.session.id();
        self.session
            .close()
            .await
            .unwrap_or_else(|e| panic!("cannot close session {id}: {e}"));
        match tokio::time::timeout(FINISH_TIMEOUT, self.watch.next()).await {
            Err(_) => panic!("session {id} did not finish within {FINISH_TIMEOUT:?}"),
            Ok(None) => {}
            Ok(Some(Err(e))) => panic!("watching session {id} failed: {e}"),
            Ok(Some(Ok(extra))) => {
                panic!("session {id}: results nobody waited for: {extra:?}")
            }
        }
        assert!(
            self.watch.is_finished(),
            "the watch of session {id} ended before it finished"
        );
        self.session.info().await.expect("cannot read the session")
    }
}

/// Asks for session `session`'s info until `done` holds, for at most `timeout`; returns
/// the info that satisfied it, or panics with the last one seen and `what`.
pub async fn wait_session(
    client: &Client,
    session: SessionId,
    what: &str,
    timeout: Duration,
    done: impl Fn(&SessionInfo) -> bool,
) -> SessionInfo {
    let deadline = Instant::now() + timeout;
    loop {
        let info = client
            .get_session(session)
            .await
            .unwrap_or_else(|e| panic!("cannot read session {session}: {e}"));
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "session {session}: not {what} after {timeout:?}: {info:#?}"
        );
        tokio::time::sleep(SESSION_POLL_PAUSE).await;
    }
}

/// Asks for application `name` until it has no executor left, for at most `timeout`.
pub async fn wait_no_executors(client: &Client, name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let info = client
            .get_application(name)
            .await
            .unwrap_or_else(|e| panic!("cannot read application {name}: {e}"));
        if info.executors == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "application {name} still has {} executors after {timeout:?}",
            info.executors
        );
        tokio::time::sleep(SESSION_POLL_PAUSE).await;
    }
}

/// `whoami`'s report, key by key.
#[derive(Debug, Clone)]
pub struct Whoami(pub BTreeMap<String, String>);

impl Whoami {
    pub fn parse(text: &str) -> Whoami {
        Whoami(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The value of `key`; panics, showing the report, when it is missing.
    pub fn get(&self, key: &str) -> &str {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("whoami has no `{key}`: {self:#?}"))
    }

    /// The numbers of the descriptors open when the service started.
    pub fn inherited_fds(&self) -> Vec<i32> {
        self.get("inherited_fds")
            .split_whitespace()
            .filter_map(|f| f.split_once(':')?.0.parse().ok())
            .collect()
    }

    /// The environment variable names.
    pub fn env_names(&self) -> Vec<&str> {
        self.get("env")
            .split(',')
            .filter(|n| !n.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whoami_parses() {
        let w = Whoami::parse("uid=0\ninherited_fds=0:/dev/null 1:pipe:[5] 2:pipe:[6]\nenv=A,B\n");
        assert_eq!(w.get("uid"), "0");
        assert_eq!(w.inherited_fds(), [0, 1, 2]);
        assert_eq!(w.env_names(), ["A", "B"]);
    }
}
