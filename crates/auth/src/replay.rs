//! The replay cache: every accepted assertion's `(iss, jti)` is kept until the assertion expires,
//! so the same assertion is never accepted twice.
//!
//! Memory is bounded by `capacity`. Entries age out within the assertion lifetime limit (five
//! minutes plus clock skew), so a full cache means more than `capacity` token requests in that
//! window; new requests are then refused rather than old entries evicted, because evicting a
//! live entry would re-open its replay window. Each client may hold at most its share of the
//! cache ([`ReplayCache::with_client_share`]: the capacity divided among the registered
//! clients), so that one client sending assertions as fast as it can is refused alone instead
//! of locking every other client out for five minutes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// Default number of remembered assertions.
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("the assertion's jti has already been used")]
    Replayed,
    #[error("too many recent token requests; retry later")]
    Full,
    #[error("too many recent token requests from this client; retry later")]
    ClientFull,
}

#[derive(Default)]
struct Inner {
    /// (iss, jti) → expiry (unix seconds).
    seen: HashMap<(String, String), i64>,
    /// (expiry, iss, jti), to purge in expiry order.
    by_expiry: BTreeSet<(i64, String, String)>,
    /// iss → its entries in `seen`.
    per_client: HashMap<String, usize>,
}

pub struct ReplayCache {
    inner: Mutex<Inner>,
    capacity: usize,
    client_share: usize,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            client_share: capacity.max(1),
        }
    }

    /// At most `share` entries of one client (`iss`); beyond it that client is refused
    /// ([`ReplayError::ClientFull`]) while the others go on.
    pub fn with_client_share(mut self, share: usize) -> ReplayCache {
        self.client_share = share.clamp(1, self.capacity);
        self
    }

    /// Records `(iss, jti)` until `keep_until` (unix seconds), or refuses it if already present.
    pub fn check_and_insert(
        &self,
        iss: &str,
        jti: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<(), ReplayError> {
        // A poisoned lock only means another request panicked mid-update; the maps stay consistent
        // enough (worst case an entry is missing from one of them), so keep serving.
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Purge expired entries first, so a jti whose assertion has expired is not "replayed"
        // (its assertion is refused as expired anyway).
        while let Some(first) = inner.by_expiry.first().cloned() {
            if first.0 >= now {
                break;
            }
            inner.by_expiry.pop_first();
            if inner.seen.remove(&(first.1.clone(), first.2)).is_some()
                && let Some(n) = inner.per_client.get_mut(&first.1)
            {
                *n -= 1;
                if *n == 0 {
                    inner.per_client.remove(&first.1);
                }
            }
        }
        let key = (iss.to_owned(), jti.to_owned());
        if inner.seen.contains_key(&key) {
            return Err(ReplayError::Replayed);
        }
        if inner.seen.len() >= self.capacity {
            return Err(ReplayError::Full);
        }
        if inner.per_client.get(iss).copied().unwrap_or(0) >= self.client_share {
            return Err(ReplayError::ClientFull);
        }
        inner
            .by_expiry
            .insert((keep_until, key.0.clone(), key.1.clone()));
        *inner.per_client.entry(key.0.clone()).or_default() += 1;
        inner.seen.insert(key, keep_until);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_replay_until_expiry() {
        let c = ReplayCache::new(10);
        assert_eq!(c.check_and_insert("a", "1", 100, 50), Ok(()));
        assert_eq!(
            c.check_and_insert("a", "1", 100, 60),
            Err(ReplayError::Replayed)
        );
        // Same jti from another issuer is a different assertion.
        assert_eq!(c.check_and_insert("b", "1", 100, 60), Ok(()));
        // After expiry the entry is purged.
        assert_eq!(c.check_and_insert("a", "1", 200, 101), Ok(()));
    }

    #[test]
    fn bounded() {
        let c = ReplayCache::new(2);
        c.check_and_insert("a", "1", 100, 0).unwrap();
        c.check_and_insert("a", "2", 100, 0).unwrap();
        assert_eq!(c.check_and_insert("a", "3", 100, 0), Err(ReplayError::Full));
        assert_eq!(c.check_and_insert("a", "3", 200, 101), Ok(()));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn one_client_holds_at_most_its_share() {
        let c = ReplayCache::new(4).with_client_share(2);
        c.check_and_insert("a", "1", 100, 0).unwrap();
        c.check_and_insert("a", "2", 100, 0).unwrap();
        assert_eq!(
            c.check_and_insert("a", "3", 100, 0),
            Err(ReplayError::ClientFull)
        );
        c.check_and_insert("b", "1", 100, 0).unwrap();
        // Expired entries give the share back.
        c.check_and_insert("a", "3", 200, 101).unwrap();
        assert_eq!(c.len(), 1);
    }
}
