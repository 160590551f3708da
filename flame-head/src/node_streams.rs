//! Per-user bound on the streams the head holds open to each node for clients: a
//! `flame logs` reads every node involved on a stream of its own (for as long as it
//! follows), and a `JobExec` keeps one open while its process runs.
//!
//! A node takes at most [`limits::STREAMS_PER_CONNECTION_MAX`] streams from the head at
//! once, for everyone. Without a bound per user, one user holding that many `flame logs
//! --follow`s would leave every other user's logs and Open MPI daemons waiting. So each
//! user may hold at most [`limits::NODE_STREAMS_PER_USER_MAX`] per node; a request over it
//! is refused at once with an error that names the bound, and nothing is opened.
//!
//! A stream counts from the moment it is granted until its [`NodeStreamPermit`] is dropped
//! (the relay ended: the client left, the node finished, or the process exited). The
//! book is a plain map behind a mutex: each request takes it once per node, briefly.

use flame_protocol::limits;
use flame_protocol::model::{ApiError, ErrorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The streams each user holds open to each node.
#[derive(Debug)]
pub struct NodeStreams {
    /// By (user, node): streams held now; an entry goes when its count reaches 0.
    held: Mutex<HashMap<(String, String), u32>>,
    /// Most streams one user may hold to one node.
    per_user_max: u32,
}

/// One granted stream to a node; given back when dropped.
#[derive(Debug)]
pub struct NodeStreamPermit {
    book: Arc<NodeStreams>,
    key: (String, String),
}

impl NodeStreams {
    /// A book with [`limits::NODE_STREAMS_PER_USER_MAX`] per user and node.
    pub fn new() -> Arc<NodeStreams> {
        Self::with_max(limits::NODE_STREAMS_PER_USER_MAX)
    }

    fn with_max(per_user_max: u32) -> Arc<NodeStreams> {
        Arc::new(NodeStreams {
            held: Mutex::new(HashMap::new()),
            per_user_max,
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), u32>> {
        // Every holder leaves the map whole: one insert or one counter change.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream for `user` to `node`, or the refusal (`LimitExceeded`) naming the bound.
    pub fn acquire(self: &Arc<Self>, user: &str, node: &str) -> Result<NodeStreamPermit, ApiError> {
        let key = (user.to_string(), node.to_string());
        let mut held = self.held();
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.per_user_max {
            return Err(ApiError::new(
                ErrorKind::LimitExceeded,
                format!(
                    "user `{user}` already holds {} log and exec streams to node `{node}`, \
                     the most one user may (NODE_STREAMS_PER_USER_MAX = {}); end one (a \
                     `flame logs --follow`, say) and ask again",
                    count, self.per_user_max
                ),
            ));
        }
        *count += 1;
        Ok(NodeStreamPermit {
            book: self.clone(),
            key,
        })
    }

    /// Permits for `user` to each of `nodes`, all or none.
    pub fn acquire_all<'a>(
        self: &Arc<Self>,
        user: &str,
        nodes: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<NodeStreamPermit>, ApiError> {
        nodes
            .into_iter()
            .map(|node| self.acquire(user, node))
            .collect()
    }

    /// Streams `user` holds to `node` now.
    #[cfg(test)]
    fn count(&self, user: &str, node: &str) -> u32 {
        self.held()
            .get(&(user.to_string(), node.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for NodeStreamPermit {
    fn drop(&mut self) {
        let mut held = self.book.held();
        if let Some(count) = held.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a panic is the report.
    use super::*;

    #[test]
    fn one_user_is_bounded_per_node_and_others_are_not() {
        let book = NodeStreams::with_max(3);
        let held: Vec<_> = (0..3).map(|_| book.acquire("bob", "n1").unwrap()).collect();
        let refused = book.acquire("bob", "n1").unwrap_err();
        assert_eq!(refused.kind, ErrorKind::LimitExceeded);
        assert!(
            refused.message.contains("NODE_STREAMS_PER_USER_MAX = 3")
                && refused.message.contains("user `bob`")
                && refused.message.contains("node `n1`"),
            "{refused}"
        );
        // Another user on that node, and bob on another node, are not held back.
        let _alice = book.acquire("alice", "n1").unwrap();
        let _other = book.acquire("bob", "n2").unwrap();
        assert_eq!(book.count("bob", "n1"), 3);
        // A stream that ends gives its room back.
        drop(held);
        assert_eq!(book.count("bob", "n1"), 0);
        assert!(book.held().get(&("bob".into(), "n1".into())).is_none());
        let _again = book.acquire("bob", "n1").unwrap();
    }

    #[test]
    fn acquire_all_is_all_or_nothing() {
        let book = NodeStreams::with_max(1);
        let _n2 = book.acquire("bob", "n2").unwrap();
        let e = book.acquire_all("bob", ["n1", "n2", "n3"]).unwrap_err();
        assert!(e.message.contains("node `n2`"), "{e}");
        // The permit taken for n1 before the refusal was given back.
        assert_eq!(book.count("bob", "n1"), 0);
        assert_eq!(book.count("bob", "n3"), 0);
        let all = book.acquire_all("bob", ["n1", "n3"]).unwrap();
        assert_eq!(all.len(), 2);
    }
}
