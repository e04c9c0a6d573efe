//! Condition locks across the nodes of one database ([`crate::Store::lock_conditions`],
//! [`crate::conditions`]): first the process's own lock table (one waiter per key per node holds
//! a database connection), then a session advisory lock per key, `pg_advisory_lock(key)` in
//! lock order, on a connection of the condition pool (never the store's pool: the holder's
//! search and write take connections of that one while it holds the lock). The wait is bounded
//! by `lock_timeout`, set to what is left of the caller's wait before each key. On drop,
//! `pg_advisory_unlock_all()` releases the session's keys and the connection goes back to the
//! condition pool; a release that fails closes the connection, and PostgreSQL releases a
//! closed session's locks.

use std::time::{Duration, Instant};

use ::postgres::error::SqlState;

use super::PgStore;
use super::pool::PooledClient;
use super::statements::Session as _;
use super::target::{describe, is_connection_error};
use crate::conditions::{ConditionKey, LocalGuard, in_lock_order};
use crate::{ConditionGuard, StoreError};

/// The locks of a [`PgStore::lock_conditions`] call. Field order is drop order: the advisory
/// locks go before the process's keys, so that a request of this node waiting for a key never
/// finds it free here while the database still holds it.
struct Held<'a> {
    _session: Session<'a>,
    _local: LocalGuard<'a>,
}

/// A condition-pool connection whose session may hold advisory locks.
struct Session<'a> {
    conn: PooledClient<'a>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Err(e) = self
            .conn
            .client()
            .batch_execute("SELECT pg_advisory_unlock_all()")
        {
            tracing::warn!(error = %describe(&e), "condition locks not released; closing their connection");
            self.conn.discard();
        }
    }
}

pub(super) fn lock_conditions<'a>(
    store: &'a PgStore,
    keys: &[ConditionKey],
    wait: Duration,
) -> Result<ConditionGuard<'a>, StoreError> {
    let deadline = Instant::now() + wait;
    let local = store.condition_locks.lock(keys, wait, deadline)?;
    let conn = match store.condition_pool.get_until(deadline) {
        Ok(conn) => conn,
        Err(_) if Instant::now() >= deadline => {
            return Err(StoreError::ConditionLocked { waited: wait });
        }
        Err(e) => return Err(e),
    };
    let mut session = Session { conn };
    for key in in_lock_order(keys) {
        let left = deadline.saturating_duration_since(Instant::now());
        // lock_timeout 0 would wait for ever.
        let ms = left.as_millis().clamp(1, i32::MAX as u128);
        let sql = format!(
            "SET lock_timeout = {ms}; SELECT pg_advisory_lock({})",
            key.value()
        );
        if let Err(e) = session.conn.client().batch_execute(&sql) {
            if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                return Err(StoreError::ConditionLocked { waited: wait });
            }
            if is_connection_error(&e) || session.conn.client().is_closed() {
                session.conn.mark_broken();
                return Err(store.condition_pool.target.unavailable(describe(&e)));
            }
            return Err(e.into());
        }
    }
    Ok(ConditionGuard::new(Held {
        _session: session,
        _local: local,
    }))
}
