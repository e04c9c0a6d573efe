//! Locks on the conditions of conditional interactions ([`crate::Store::lock_conditions`]).
//!
//! A conditional create runs its condition as a search and creates only when nothing matches.
//! Two of them with the same condition at the same moment would both find nothing and both
//! create, unless each holds the condition's lock from before its search until its write has
//! committed. A condition's lock is named by a [`ConditionKey`]: a hash of the resource type and
//! the condition's parameters sorted (the same condition written in another parameter order
//! names the same lock). Two *different* conditions that match the same resource are not
//! serialised by it.
//!
//! SQLite (one process per data directory): `ProcessLocks`, a lock table in the process.
//! PostgreSQL (several nodes on one database): the same, so that one node's requests wait for a
//! key in the process, then a session advisory lock on the key (`postgres::conditions`), held on
//! a connection of its own until the guard is dropped.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::StoreError;

/// The top byte of every [`ConditionKey`] (ASCII `C`): PostgreSQL's fixed advisory lock keys
/// (`postgres::WRITE_LOCK` and the others) all have a zero top byte, so a condition's key can
/// never be one of them.
const KEY_TAG: i64 = 0x43 << 56;

/// The lock key of a condition: `(resource type, parameters sorted)`, hashed (FNV-1a, 56 bits,
/// the same on every node and every build). Two keys are equal for the same type and the same
/// parameters in any order; unrelated conditions share a key only by a hash collision, which
/// makes them wait for each other and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConditionKey(i64);

impl ConditionKey {
    /// The key of the condition `params` (decoded name/value pairs, in any order) on
    /// `resource_type`.
    pub fn new(resource_type: &str, params: &[(String, String)]) -> ConditionKey {
        let mut sorted: Vec<(&str, &str)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        sorted.sort_unstable();
        let mut hash = Fnv::default();
        hash.text(resource_type);
        for (k, v) in sorted {
            hash.text(k);
            hash.text(v);
        }
        ConditionKey((hash.0 as i64 & !(0xff << 56)) | KEY_TAG)
    }

    /// The key as PostgreSQL's `pg_advisory_lock(bigint)` takes it.
    pub fn value(self) -> i64 {
        self.0
    }
}

/// FNV-1a over length-prefixed texts (so that `("ab", "c")` and `("a", "bc")` differ).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn text(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
}

/// `keys` sorted and without repeats: the one order in which every caller takes them, so that
/// two callers each holding a key the other waits for cannot happen.
pub(crate) fn in_lock_order(keys: &[ConditionKey]) -> Vec<ConditionKey> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Held condition locks: released when dropped ([`crate::Store::lock_conditions`]). Hold it
/// until the write the conditions decided has committed, and drop it off the async workers
/// like any store call (PostgreSQL's release is a statement of a blocking client).
pub struct ConditionGuard<'a>(#[allow(dead_code)] Box<dyn Send + 'a>);

impl<'a> ConditionGuard<'a> {
    pub(crate) fn new(held: impl Send + 'a) -> ConditionGuard<'a> {
        ConditionGuard(Box::new(held))
    }
}

impl std::fmt::Debug for ConditionGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConditionGuard")
    }
}

/// The condition locks of one process: the keys held, and a wake-up for those waiting when
/// any is released.
#[derive(Debug, Default)]
pub(crate) struct ProcessLocks {
    held: Mutex<HashSet<ConditionKey>>,
    released: Condvar,
}

impl ProcessLocks {
    fn table(&self) -> MutexGuard<'_, HashSet<ConditionKey>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `keys` in lock order, waiting for each until `deadline`; on time out the keys
    /// taken so far are released and the error is [`StoreError::ConditionLocked`].
    pub(crate) fn lock(
        &self,
        keys: &[ConditionKey],
        wait: Duration,
        deadline: Instant,
    ) -> Result<LocalGuard<'_>, StoreError> {
        let mut guard = LocalGuard {
            locks: self,
            keys: Vec::new(),
        };
        for key in in_lock_order(keys) {
            let mut held = self.table();
            loop {
                if held.insert(key) {
                    guard.keys.push(key);
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    // The table is unlocked before the guard releases what it took.
                    drop(held);
                    return Err(StoreError::ConditionLocked { waited: wait });
                }
                held = self
                    .released
                    .wait_timeout(held, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        Ok(guard)
    }
}

/// Keys held in a [`ProcessLocks`]; released when dropped (also while unwinding).
#[derive(Debug)]
pub(crate) struct LocalGuard<'a> {
    locks: &'a ProcessLocks,
    keys: Vec<ConditionKey>,
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut held = self.locks.table();
        for key in &self.keys {
            held.remove(key);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_ignore_parameter_order_and_tell_conditions_apart() {
        let a = ConditionKey::new(
            "Patient",
            &pairs(&[("identifier", "x|1"), ("birthdate", "1970")]),
        );
        let b = ConditionKey::new(
            "Patient",
            &pairs(&[("birthdate", "1970"), ("identifier", "x|1")]),
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            ConditionKey::new("Patient", &pairs(&[("identifier", "x|1")]))
        );
        assert_ne!(
            a,
            ConditionKey::new(
                "Person",
                &pairs(&[("identifier", "x|1"), ("birthdate", "1970")])
            )
        );
        // Length-prefixed: moving a character from a name to its value is another condition.
        assert_ne!(
            ConditionKey::new("Patient", &pairs(&[("ab", "c")])),
            ConditionKey::new("Patient", &pairs(&[("a", "bc")]))
        );
        assert_eq!(a.value() >> 56, 0x43);
    }

    #[test]
    fn a_held_key_times_out_others_and_is_free_once_dropped() {
        let locks = ProcessLocks::default();
        let k = ConditionKey::new("Patient", &pairs(&[("identifier", "x|1")]));
        let other = ConditionKey::new("Patient", &pairs(&[("identifier", "x|2")]));
        let wait = Duration::from_millis(1);
        let held = locks.lock(&[k], wait, Instant::now() + wait).unwrap();
        // Another key is free; the held one is not, and a failed attempt keeps nothing.
        drop(locks.lock(&[other], wait, Instant::now() + wait).unwrap());
        assert!(matches!(
            locks.lock(&[other, k], wait, Instant::now() + wait),
            Err(StoreError::ConditionLocked { .. })
        ));
        assert_eq!(locks.table().len(), 1);
        drop(held);
        drop(
            locks
                .lock(&[k, other, k], wait, Instant::now() + wait)
                .unwrap(),
        );
        assert!(locks.table().is_empty());
    }
}
