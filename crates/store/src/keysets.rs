//! Named de-identification key sets (issue 21): the three keys of an anonymizer configuration
//! (`cryptoHashKey`, `encryptKey`, `dateShiftKey`) stored under a name, so that every export and
//! `fhirhose anonymize` run that names the set pseudonymizes ids and shifts dates identically.
//!
//! Kept beside the export jobs (SQLite: `exports.db`, table `deid_key_set`; PostgreSQL:
//! migration 4). The keys are secret: [`KeySet`]'s `Debug` shows none, and callers show only a digest
//! of them (`deid::keys::fingerprint`).

use crate::error::QueueError;

/// One stored key set (the current version of a name).
#[derive(Clone, PartialEq, Eq)]
pub struct KeySet {
    pub name: String,
    /// 1 at creation, +1 at each rotation.
    pub version: i64,
    pub crypto_hash_key: String,
    pub encrypt_key: String,
    pub date_shift_key: String,
    pub created_ms: i64,
    /// When the keys were last replaced (`None`: never rotated).
    pub rotated_ms: Option<i64>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("keys", &"…")
            .finish()
    }
}

/// Where key sets are kept.
pub trait KeySets: Send + Sync {
    /// Stores a new key set; `false` when the name exists (nothing changed).
    fn create_key_set(&self, set: &KeySet) -> Result<bool, QueueError>;
    /// The key set of that name.
    fn key_set(&self, name: &str) -> Result<Option<KeySet>, QueueError>;
    /// Every key set, by name.
    fn key_sets(&self) -> Result<Vec<KeySet>, QueueError>;
    /// Replaces the keys of `set.name` (its version +1, `rotated_ms` = `now_ms`); the new
    /// version, `None` when there is no such name.
    fn rotate_key_set(&self, set: &KeySet, now_ms: i64) -> Result<Option<i64>, QueueError>;
    /// Deletes a key set; `false` when there was none.
    fn delete_key_set(&self, name: &str) -> Result<bool, QueueError>;
}

/// The table, the same on both backends.
pub(crate) const KEY_SET_TABLE: &str = "
CREATE TABLE deid_key_set (
    name text PRIMARY KEY,
    version bigint NOT NULL,
    crypto_hash_key text NOT NULL,
    encrypt_key text NOT NULL,
    date_shift_key text NOT NULL,
    created_ms bigint NOT NULL,
    rotated_ms bigint
);
";

pub(crate) const KEY_SET_COLUMNS: &str =
    "name, version, crypto_hash_key, encrypt_key, date_shift_key, created_ms, rotated_ms";
