//! Identifiers. Plain integers on the wire, distinct types in code.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }
    };
}

id_type!(
    /// A session, unique for the life of a head's data directory.
    SessionId
);
id_type!(
    /// A task, unique within its session; the head numbers a session's tasks from 1 in
    /// submission order.
    TaskId
);
id_type!(
    /// An executor, unique for the life of a head's data directory.
    ExecutorId
);
