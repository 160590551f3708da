//! Permits counted per key, each key bounded: the head's per-user and per-address bounds
//! (log and exec streams per user and node, handshakes in progress per source address).
//!
//! A plain map behind a mutex: each acquire and each drop takes it once, briefly, and
//! leaves it whole. An entry goes when its count returns to 0, so the map holds only the
//! keys that hold permits now.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// Permits held per key, at most `max` each.
#[derive(Debug)]
pub struct Counted<K: Hash + Eq + Clone> {
    held: Mutex<HashMap<K, u32>>,
    max: u32,
}

/// One permit for `key`; given back when dropped.
#[derive(Debug)]
pub struct Permit<K: Hash + Eq + Clone> {
    book: Arc<Counted<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Counted<K> {
    pub fn new(max: u32) -> Arc<Counted<K>> {
        Arc::new(Counted {
            held: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// The bound per key.
    pub fn max(&self) -> u32 {
        self.max
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        // Every holder leaves the map whole: one insert, removal or counter change.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A permit for `key`, or `Err` with the count it holds (the bound) when it holds
    /// `max` already.
    pub fn try_acquire(self: &Arc<Self>, key: &K) -> Result<Permit<K>, u32> {
        let mut held = self.held();
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return Err(*count);
        }
        *count += 1;
        Ok(Permit {
            book: self.clone(),
            key: key.clone(),
        })
    }

    /// Permits `key` holds now.
    #[cfg(test)]
    pub fn count(&self, key: &K) -> u32 {
        self.held().get(key).copied().unwrap_or(0)
    }

    /// Keys holding permits now.
    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.held().len()
    }
}

impl<K: Hash + Eq + Clone> Drop for Permit<K> {
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
    fn each_key_is_bounded_alone_and_drops_give_back() {
        let book = Counted::<&str>::new(2);
        let a1 = book.try_acquire(&"a").unwrap();
        let _a2 = book.try_acquire(&"a").unwrap();
        assert_eq!(book.try_acquire(&"a").unwrap_err(), 2);
        let _b = book.try_acquire(&"b").unwrap();
        assert_eq!((book.count(&"a"), book.count(&"b")), (2, 1));
        drop(a1);
        assert_eq!(book.count(&"a"), 1);
        let _a3 = book.try_acquire(&"a").unwrap();
        drop(_b);
        assert_eq!(book.keys(), 1, "a key with no permits is forgotten");
    }
}
