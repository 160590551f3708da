//! Per-owner Unix uids: each owner's executors run as one uid (and the gid of the same
//! number) from a range reserved for Flame, assigned once by the head and kept in the
//! store, so an owner has the same uid on every node (files on shared filesystems and MPI
//! across nodes stay consistent), as systemd's DynamicUser does on one machine.
//!
//! Pure: the core asks for an owner's uid when it is about to launch an executor for it;
//! a new one is reserved here, written by the store, and usable only once that write is
//! durable ([`OwnerUids::committed`]), so no launch ever uses a uid a restarted head could
//! hand to someone else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// The uids owners get, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

/// Default range: 1,900,000,000 to 1,900,999,999 (a million owners). Above normal and
/// system accounts (below 60,000), systemd's DynamicUser range (61,184–65,519) and its
/// container range (524,288–1,879,048,191), and below its "foreign" range
/// (2,147,352,576 and up) and 2^31, which some tools read as negative.
pub const UID_RANGE_DEFAULT: UidRange = UidRange {
    first: 1_900_000_000,
    last: 1_900_999_999,
};

/// Lowest uid a range may start at: below it are normal and system accounts and systemd's
/// DynamicUser range.
pub const UID_RANGE_FIRST_MIN: u32 = 65_536;
/// Highest uid a range may reach (2^31 - 2: below what tools read as negative, and
/// not the overflow uid).
pub const UID_RANGE_LAST_MAX: u32 = (1 << 31) - 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UidRangeError {
    #[error("`{0}` is not a uid range; write it FIRST-LAST, e.g. 1900000000-1900999999")]
    Syntax(String),
    #[error(
        "uid range {first}-{last} must lie within {UID_RANGE_FIRST_MIN}-{UID_RANGE_LAST_MAX} \
         (above normal accounts and systemd's DynamicUser range), first <= last"
    )]
    Bounds { first: u32, last: u32 },
}

impl UidRange {
    pub fn new(first: u32, last: u32) -> Result<UidRange, UidRangeError> {
        if first < UID_RANGE_FIRST_MIN || last > UID_RANGE_LAST_MAX || first > last {
            return Err(UidRangeError::Bounds { first, last });
        }
        Ok(UidRange { first, last })
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl FromStr for UidRange {
    type Err = UidRangeError;
    fn from_str(s: &str) -> Result<UidRange, UidRangeError> {
        let syntax = || UidRangeError::Syntax(s.to_string());
        let (a, b) = s.trim().split_once('-').ok_or_else(syntax)?;
        let first = a.trim().parse().map_err(|_| syntax())?;
        let last = b.trim().parse().map_err(|_| syntax())?;
        UidRange::new(first, last)
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The range holds no free uid for a new owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no uid left for owner `{owner}` in the head's owner uid range {range}\n\
     hint: widen `--owner-uid-range` (owner_uid_range in head.toml); uids already given keep"
)]
pub struct UidsExhausted {
    pub owner: String,
    pub range: UidRange,
}

/// Owners' uids: durable ones, and ones being written.
#[derive(Debug)]
pub struct OwnerUids {
    range: UidRange,
    durable: BTreeMap<String, u32>,
    /// Reserved, not durable yet: not to be used by a launch.
    pending: BTreeMap<String, u32>,
    /// Every uid durable or pending, so none is given twice.
    used: BTreeSet<u32>,
}

/// What [`OwnerUids::uid`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UidLookup {
    /// Durable: launches may use it.
    Ready(u32),
    /// Newly reserved: write it to the store, then [`OwnerUids::committed`].
    Reserved(u32),
    /// Being written.
    Pending,
}

impl OwnerUids {
    /// The uids the store holds. A stored uid outside `range` (the range was changed) is
    /// kept: an owner's uid never changes.
    pub fn new(range: UidRange, stored: impl IntoIterator<Item = (String, u32)>) -> OwnerUids {
        let durable: BTreeMap<String, u32> = stored.into_iter().collect();
        let used = durable.values().copied().collect();
        OwnerUids {
            range,
            durable,
            pending: BTreeMap::new(),
            used,
        }
    }

    /// `owner`'s uid, reserving the lowest free one of the range for a new owner.
    pub fn uid(&mut self, owner: &str) -> Result<UidLookup, UidsExhausted> {
        if let Some(&uid) = self.durable.get(owner) {
            return Ok(UidLookup::Ready(uid));
        }
        if self.pending.contains_key(owner) {
            return Ok(UidLookup::Pending);
        }
        // The lowest free uid: the first gap in `used` within the range.
        let mut next = self.range.first;
        for &u in self.used.range(self.range.first..=self.range.last) {
            if u != next {
                break;
            }
            next = match next.checked_add(1) {
                Some(n) => n,
                None => break,
            };
        }
        if !self.range.contains(next) || self.used.contains(&next) {
            return Err(UidsExhausted {
                owner: owner.to_string(),
                range: self.range,
            });
        }
        self.used.insert(next);
        self.pending.insert(owner.to_string(), next);
        Ok(UidLookup::Reserved(next))
    }

    /// The write of `owner`'s reserved uid ended: durable when `ok`, else given back.
    pub fn committed(&mut self, owner: &str, ok: bool) {
        let Some(uid) = self.pending.remove(owner) else {
            return;
        };
        if ok {
            self.durable.insert(owner.to_string(), uid);
        } else {
            self.used.remove(&uid);
        }
    }

    /// The durable uid of `owner`, if it has one.
    pub fn durable(&self, owner: &str) -> Option<u32> {
        self.durable.get(owner).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_refuse_system_and_negative_uids() {
        assert_eq!("70000-70009".parse(), UidRange::new(70_000, 70_009));
        assert!(matches!(
            "1000-2000".parse::<UidRange>(),
            Err(UidRangeError::Bounds { .. })
        ));
        assert!(matches!(
            "70000-4294967294".parse::<UidRange>(),
            Err(UidRangeError::Bounds { .. })
        ));
        assert!(matches!(
            "70009-70000".parse::<UidRange>(),
            Err(UidRangeError::Bounds { .. })
        ));
        assert!(matches!(
            "70000".parse::<UidRange>(),
            Err(UidRangeError::Syntax(_))
        ));
        assert!(UidRange::new(UID_RANGE_DEFAULT.first, UID_RANGE_DEFAULT.last).is_ok());
    }

    #[test]
    fn each_owner_gets_one_uid_durable_before_use_and_never_shared() {
        let range = UidRange::new(70_000, 70_002).unwrap();
        let mut uids = OwnerUids::new(range, [("carol".to_string(), 70_001)]);
        assert_eq!(uids.uid("carol"), Ok(UidLookup::Ready(70_001)));
        assert_eq!(uids.uid("alice"), Ok(UidLookup::Reserved(70_000)));
        // Not usable until durable.
        assert_eq!(uids.uid("alice"), Ok(UidLookup::Pending));
        assert_eq!(uids.durable("alice"), None);
        assert_eq!(uids.uid("bob"), Ok(UidLookup::Reserved(70_002)));
        // A failed write gives the uid back; the next try reserves it again.
        uids.committed("bob", false);
        assert_eq!(uids.uid("bob"), Ok(UidLookup::Reserved(70_002)));
        uids.committed("bob", true);
        uids.committed("alice", true);
        assert_eq!(uids.uid("alice"), Ok(UidLookup::Ready(70_000)));
        assert_eq!(uids.uid("bob"), Ok(UidLookup::Ready(70_002)));
        let err = uids.uid("dave").unwrap_err();
        assert!(err.to_string().contains("no uid left for owner `dave`"));
        // A restart keeps every owner's uid.
        let again = OwnerUids::new(range, [("alice".into(), 70_000), ("bob".into(), 70_002)]);
        assert_eq!(again.durable("bob"), Some(70_002));
    }
}
