//! Authorization state several server processes share (issue 19): the access-token signing key
//! and the replay cache of client assertions. A token issued by one node is then accepted by
//! every other, and an assertion accepted at one node is refused as a replay at any other.
//!
//! This crate holds no SQL: [`SharedAuthState`] is what it needs, and the server implements it
//! over the store (on PostgreSQL, tables made by the store's migrations). A single process
//! (SQLite) keeps both in memory: a random key per start and [`crate::replay::ReplayCache`].

/// The name of the shared access-token key.
pub const SIGNING_KEY_NAME: &str = "access-token-hs256";

/// Bytes of a signing key (HS256).
pub const SIGNING_KEY_BYTES: usize = 32;

/// The shared state failed (the database is unreachable). The text names no secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("shared authorization state: {0}")]
pub struct SharedStateError(pub String);

/// Where accepted client assertions are recorded so that they are refused as replays until
/// they expire, also after a restart (the database), and on a database several nodes share at
/// every node. Calls block (run them off the async workers).
pub trait ReplayRecord: Send + Sync {
    /// Records an accepted assertion `(iss, jti)` until `keep_until` (unix seconds); `false`
    /// when it is recorded already and not expired at `now` (a replay, at any node).
    fn remember_once(
        &self,
        iss: &str,
        jti: &str,
        keep_until: i64,
        now: i64,
    ) -> Result<bool, SharedStateError>;
}

/// What the auth layer needs from a store several nodes share: the signing key besides the
/// [`ReplayRecord`]. Calls block (run them off the async workers).
pub trait SharedAuthState: ReplayRecord {
    /// The signing key every node uses: `fresh` is kept when none exists yet (the first node to
    /// start; made once, atomically), otherwise the existing one is returned.
    fn signing_key(&self, fresh: &[u8]) -> Result<Vec<u8>, SharedStateError>;
}
