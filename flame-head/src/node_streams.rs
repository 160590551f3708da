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
//! (the relay ended: the client left, the node finished, or the process exited).

use crate::counted::{Counted, Permit};
use flame_protocol::limits;
use flame_protocol::model::{ApiError, ErrorKind};
use std::sync::Arc;

/// The streams each user holds open to each node, by (user, node).
#[derive(Debug)]
pub struct NodeStreams {
    held: Arc<Counted<(String, String)>>,
}

/// One granted stream to a node; given back when dropped.
pub type NodeStreamPermit = Permit<(String, String)>;

impl NodeStreams {
    /// A book with [`limits::NODE_STREAMS_PER_USER_MAX`] per user and node.
    pub fn new() -> Arc<NodeStreams> {
        Self::with_max(limits::NODE_STREAMS_PER_USER_MAX)
    }

    fn with_max(per_user_max: u32) -> Arc<NodeStreams> {
        Arc::new(NodeStreams {
            held: Counted::new(per_user_max),
        })
    }

    /// A stream for `user` to `node`, or the refusal (`LimitExceeded`) naming the bound.
    pub fn acquire(&self, user: &str, node: &str) -> Result<NodeStreamPermit, ApiError> {
        self.held
            .try_acquire(&(user.to_string(), node.to_string()))
            .map_err(|count| {
                ApiError::new(
                    ErrorKind::LimitExceeded,
                    format!(
                        "user `{user}` already holds {count} log and exec streams to node \
                         `{node}`, the most one user may (NODE_STREAMS_PER_USER_MAX = {}); end \
                         one (a `flame logs --follow`, say) and ask again",
                        self.held.max()
                    ),
                )
            })
    }

    /// Permits for `user` to each of `nodes`, all or none.
    pub fn acquire_all<'a>(
        &self,
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
        self.held.count(&(user.to_string(), node.to_string()))
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
