//! State that the server processes sharing one database share besides the data and the export
//! queue (issue 19): the access-token signing key and the replay cache of client assertions.
//! The replay cache ([`AssertionRecord`]) is also kept by a database one process uses
//! (SQLite's `exports.db`), so that an assertion accepted before a restart is not accepted
//! again after it.
//! The auth crate defines what it needs (`auth::SharedAuthState`); the server adapts this trait
//! to it, so neither crate depends on the other.
//!
//! Only a database several processes can use has it ([`crate::Store::shared_state`]): on
//! PostgreSQL the tables `cluster_secret` and `auth_jti` (migration 3). SQLite is used by one
//! process at a time (the data-directory lock), which keeps this state in memory.

use crate::StoreError;

/// Accepted client assertions, recorded in the database until they expire: they outlive a
/// restart, and on a shared database every node sees every other node's.
pub trait AssertionRecord: Send + Sync {
    /// Records `key` in `scope` until `until_s` (unix seconds). `false` when it is recorded
    /// already and not expired at `now_s` (a replay). Expired entries are purged from time to
    /// time.
    fn remember_once(
        &self,
        scope: &str,
        key: &str,
        until_s: i64,
        now_s: i64,
    ) -> Result<bool, StoreError>;
}

/// Cluster-wide state on the database.
pub trait SharedState: AssertionRecord {
    /// The secret `name`, the same for every process: `fresh` is stored when there is none yet
    /// (the first start; two processes starting at once store one of the two) and the stored
    /// value is returned.
    fn secret(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError>;
}
