//! Names as types inside the head: a node's, an application's and an owner's name.
//!
//! On the wire and on disk each is a plain string (the protocol's types and the store's
//! records are unchanged); inside the head they are distinct types, so a map keyed by node
//! names cannot be looked up with an owner's name, and a pair like (application, owner)
//! cannot be built the wrong way round. Each derefs to `str` and borrows as `str`, so a
//! map keyed by one is still looked up with a `&str` that came off the wire.
//!
//! An owner's name also carries the one rule about owners: a session spec with no owner
//! belongs to [`DEFAULT_OWNER`]; [`OwnerName::of`] applies it.

use flame_protocol::model::DEFAULT_OWNER;
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

name_type!(
    /// A node's name (normally its host name), as it registered.
    NodeName
);
name_type!(
    /// An application's name, as registered (or `job.<id>` for a batch job's own).
    AppName
);
name_type!(
    /// The user a session, an executor or a quota belongs to.
    OwnerName
);

impl From<String> for NodeName {
    fn from(s: String) -> NodeName {
        NodeName(s)
    }
}

impl From<&str> for NodeName {
    fn from(s: &str) -> NodeName {
        NodeName(s.to_string())
    }
}

impl From<String> for AppName {
    fn from(s: String) -> AppName {
        AppName(s)
    }
}

impl From<&str> for AppName {
    fn from(s: &str) -> AppName {
        AppName(s.to_string())
    }
}

impl From<String> for OwnerName {
    /// The name as given, empty or not (an executor's owner as a node reports it); a spec's
    /// owner field goes through [`OwnerName::of`] instead.
    fn from(s: String) -> OwnerName {
        OwnerName(s)
    }
}

impl OwnerName {
    /// The owner a spec's `owner` field names: [`DEFAULT_OWNER`] when it is empty.
    pub fn of(owner: &str) -> OwnerName {
        if owner.is_empty() {
            OwnerName(DEFAULT_OWNER.to_string())
        } else {
            OwnerName(owner.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn an_empty_owner_is_the_default_one_and_names_look_up_by_str() {
        assert_eq!(OwnerName::of(""), DEFAULT_OWNER);
        assert_eq!(OwnerName::of("alice"), "alice");
        let mut nodes = BTreeMap::new();
        nodes.insert(NodeName::from("n2"), 2);
        nodes.insert(NodeName::from("n1"), 1);
        assert_eq!(nodes.get("n1"), Some(&1));
        // Ordered as their text: maps keyed by names iterate as they did keyed by strings.
        let order: Vec<&str> = nodes.keys().map(|n| n.as_str()).collect();
        assert_eq!(order, ["n1", "n2"]);
    }
}
