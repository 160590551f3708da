//! Client code on a thread of its own, optionally inside a network namespace.
//!
//! A thread can enter a network namespace, and every socket it opens afterwards belongs to
//! that namespace; a tokio runtime cannot switch namespace per task. So client code that
//! must reach a head in a namespace runs on a fresh thread that enters the namespace first
//! and then drives the code on a current-thread runtime of its own. The test's runtime
//! keeps running meanwhile (to partition, heal, kill), and awaits the outcome with
//! [`ClientThread::join`]. Tokio's channels work across the two runtimes, so the client
//! code can report progress to the test and take orders from it.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Client code running on its own thread. Dropping it without [`join`](Self::join) leaves
/// the thread to finish on its own.
#[derive(Debug)]
pub struct ClientThread<T> {
    name: String,
    outcome: oneshot::Receiver<T>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> ClientThread<T> {
    /// Starts `code` on a new thread named `name`, inside the network namespace `netns`
    /// refers to when there is one.
    pub fn spawn<F, Fut>(name: &str, netns: Option<OwnedFd>, code: F) -> ClientThread<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let (tx, outcome) = oneshot::channel();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Some(handle) = netns {
                    crate::netns::enter_thread(handle).unwrap_or_else(|e| {
                        panic!("{thread_name}: cannot enter the network namespace: {e}")
                    });
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| panic!("{thread_name}: cannot build a runtime: {e}"));
                let value = runtime.block_on(code());
                // The receiver is gone only when the test stopped caring.
                let _ = tx.send(value);
            })
            .unwrap_or_else(|e| panic!("cannot start the thread {name}: {e}"));
        ClientThread {
            name: name.to_string(),
            outcome,
            thread: Some(thread),
        }
    }

    /// Waits for the code's outcome; a panic on the thread is raised again here, so its
    /// message is the test's failure.
    pub async fn join(mut self) -> T {
        let received = (&mut self.outcome).await;
        let thread = self.thread.take().expect("joined once");
        // The thread has sent its outcome or died: either way it ends promptly.
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap_or_else(|e| panic!("cannot join the thread {}: {e}", self.name));
        match (received, joined) {
            (Ok(value), _) => value,
            (Err(_), Err(panic)) => std::panic::resume_unwind(panic),
            (Err(_), Ok(())) => panic!("the thread {} ended without an outcome", self.name),
        }
    }
}
