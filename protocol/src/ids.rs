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

/// A set of task ids of one session, as bits: ids are dense from 1 within a session, so
/// this costs one bit per task. Used to drop results already delivered when a watch starts
/// over (a watch sends every final result again).
#[derive(Debug, Default, Clone)]
pub struct TaskIdSet {
    words: Vec<u64>,
}

impl TaskIdSet {
    /// Marks `task`; false if it was marked already.
    pub fn insert(&mut self, task: TaskId) -> bool {
        let Ok(i) = usize::try_from(task.0) else {
            return true;
        };
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        fresh
    }

    /// Whether `task` is marked.
    pub fn contains(&self, task: TaskId) -> bool {
        let Ok(i) = usize::try_from(task.0) else {
            return false;
        };
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_id_set_marks_each_id_once() {
        let mut set = TaskIdSet::default();
        assert!(!set.contains(TaskId(70)));
        assert!(set.insert(TaskId(70)));
        assert!(!set.insert(TaskId(70)));
        assert!(set.contains(TaskId(70)));
        assert!(!set.contains(TaskId(69)));
        assert!(set.insert(TaskId(1)));
    }
}
