//! The connection pool: a few `postgres` clients handed out one at a time, a lost connection
//! dropped (503) and replaced, idle ones checked with a round trip before use, and its use counted
//! for `GET /metrics`. Reads ([`Pool::read`]) that meet an idle connection a database restart
//! closed run once more on a new one; writes ([`Pool::run`]) do not.
//!
//! A pooled connection is a [`Conn`]: the client with the statements it prepared (`statements`),
//! which live and die with it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::StoreError;

use super::IDLE_CHECK_AFTER;
use super::statements::Conn;
use super::target::{Target, describe, is_connection_error};

struct Idle {
    client: Conn,
    generation: u64,
    since: Instant,
}

struct PoolState {
    idle: Vec<Idle>,
    /// Connections open (idle or checked out).
    open: usize,
    /// Bumped when a connection is found lost: idle connections of older generations are dropped.
    generation: u64,
    /// Calls of [`Pool::get`] that found every connection in use and waited for one.
    waits: u64,
    /// Waits that ended without a connection (`pool_timeout`).
    wait_timeouts: u64,
}

/// A small connection pool (see the module docs).
pub(crate) struct Pool {
    pub(super) target: Target,
    max: usize,
    state: Mutex<PoolState>,
    available: Condvar,
    /// Shared by the statement caches of this pool's connections: moved on, it makes each
    /// forget its prepared statements (a schema change; see `statements`).
    schema_epoch: Arc<AtomicU64>,
}

impl Pool {
    pub(super) fn new(target: Target, max: usize) -> Pool {
        Pool {
            target,
            max: max.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                generation: 0,
                waits: 0,
                wait_timeouts: 0,
            }),
            available: Condvar::new(),
            schema_epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every connection of this pool forget its prepared statements before it runs the
    /// next one: the store changed its schema (see `statements`).
    pub(crate) fn forget_statements(&self) {
        self.schema_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The pool's use now, named `name` (metrics).
    pub(crate) fn stats(&self, name: &str) -> crate::PoolStats {
        let state = self.lock();
        crate::PoolStats {
            name: name.to_string(),
            in_use: (state.open - state.idle.len()) as u64,
            idle: state.idle.len() as u64,
            max: self.max as u64,
            waits: state.waits,
            wait_timeouts: state.wait_timeouts,
        }
    }

    /// Take a checked connection, opening one when fewer than `max` are open; waits at most
    /// the target's `pool_timeout` for one to be returned ([`StoreError::Unavailable`] then).
    pub(crate) fn get(&self) -> Result<PooledClient<'_>, StoreError> {
        self.get_until(Instant::now() + self.target.pool_timeout)
    }

    /// [`Pool::get`], waiting for a connection until `deadline` rather than `pool_timeout`.
    pub(crate) fn get_until(&self, deadline: Instant) -> Result<PooledClient<'_>, StoreError> {
        let mut state = self.lock();
        let mut waited = false;
        loop {
            if let Some(idle) = state.idle.pop() {
                if idle.generation < state.generation || idle.client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                let generation = idle.generation;
                let mut client = idle.client;
                if idle.since.elapsed() > IDLE_CHECK_AFTER {
                    drop(state);
                    if client.is_valid(Duration::from_secs(5)).is_err() {
                        drop(client);
                        state = self.lock();
                        state.open -= 1;
                        state.generation += 1;
                        continue;
                    }
                } else {
                    drop(state);
                }
                return Ok(PooledClient {
                    pool: self,
                    client: Some(client),
                    generation,
                    reused: true,
                    broken: false,
                    discard: false,
                });
            }
            if state.open < self.max {
                state.open += 1;
                let generation = state.generation;
                drop(state);
                return match self.target.connect() {
                    Ok(client) => Ok(PooledClient {
                        pool: self,
                        client: Some(Conn::new(client, self.schema_epoch.clone())),
                        generation,
                        reused: false,
                        broken: false,
                        discard: false,
                    }),
                    Err(e) => {
                        let mut state = self.lock();
                        state.open -= 1;
                        self.available.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                state.wait_timeouts += 1;
                drop(state);
                tracing::warn!(target_db = %self.target.display, connections = self.max, "no pooled database connection became free in time");
                return Err(self.target.unavailable(format!(
                    "all {} connections stayed in use until the call's deadline (pool_timeout {:?})",
                    self.max, self.target.pool_timeout
                )));
            }
            if !waited {
                waited = true;
                state.waits += 1;
            }
            state = self
                .available
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Run `f` on a pooled connection. A lost connection is dropped (with the idle ones opened
    /// before it) and the error becomes [`StoreError::Unavailable`].
    ///
    /// For writes and anything else that must not run twice: a connection lost during a
    /// commit leaves it unknown whether the commit happened, so the caller (and its client,
    /// through the 503) decides. Reads go through [`Pool::read`].
    pub(crate) fn run<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.get()?;
        let result = f(conn.client());
        self.settle(&mut conn, result).map_err(Failure::into_error)
    }

    /// Run the read `f` on a pooled connection, like [`Pool::run`], but when the connection
    /// came from the idle list and turns out lost, run `f` once more on another connection
    /// (of a newer generation: the lost one's drop bumps it, which drops every idle connection
    /// opened before) and report only a second failure as [`StoreError::Unavailable`].
    ///
    /// Why: a PostgreSQL restart closes every idle pooled connection, and the pool learns of it
    /// only when one is used (the round-trip check runs on connections idle longer than
    /// `IDLE_CHECK_AFTER`). Without the second run, the first request after a restart failed
    /// with 503 although the database was back. Only work that is safe to run again may come
    /// here: statements that change nothing (`f` is `FnMut` and may be called twice), or whose
    /// side effects outside the database resume rather than repeat (the keyset scan hands on
    /// from the last row it gave). A connection opened for this call is not retried: its loss
    /// means the database is going away now, not that it went away while the connection idled.
    pub(crate) fn read<T>(
        &self,
        mut f: impl FnMut(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.get()?;
        let result = f(conn.client());
        match self.settle(&mut conn, result) {
            Err(Failure::Lost { reason, .. }) if conn.reused => {
                // Dropped as broken: the generation moves on, the other stale idle connections go.
                drop(conn);
                tracing::info!(target_db = %self.target.display, error = %reason, "an idle database connection was found closed (a restart?); running the read again on another connection");
                let mut conn = self.get()?;
                let result = f(conn.client());
                self.settle(&mut conn, result).map_err(Failure::into_error)
            }
            other => other.map_err(Failure::into_error),
        }
    }

    /// What the result of work on `conn` means for the connection: lost (marked broken, so
    /// that its drop closes it and moves the generation on), to be closed (a cancel may be in
    /// flight for it), or fine.
    fn settle<T>(
        &self,
        conn: &mut PooledClient<'_>,
        result: Result<T, StoreError>,
    ) -> Result<T, Failure> {
        match result {
            Err(StoreError::Postgres(e))
                if is_connection_error(&e) || conn.client().is_closed() =>
            {
                conn.broken = true;
                let reason = describe(&e);
                tracing::warn!(target_db = %self.target.display, error = %reason, reused = conn.reused, "lost a database connection");
                Err(Failure::Lost {
                    unavailable: self.target.unavailable(reason.clone()),
                    reason,
                })
            }
            Err(StoreError::Cancelled) => {
                // A statement of this connection was (or was being) cancelled: a cancel request
                // travels on a connection of its own and may reach the server after the
                // statement ended, and would then stop the next statement run here — another
                // request's. The connection is closed instead of going back to the pool.
                conn.discard = true;
                Err(Failure::Other(StoreError::Cancelled))
            }
            Err(e) => {
                if conn.client().is_closed() {
                    conn.broken = true;
                }
                Err(Failure::Other(e))
            }
            Ok(v) => Ok(v),
        }
    }
}

/// How work on a pooled connection failed ([`Pool::settle`]).
enum Failure {
    /// The connection is gone: `unavailable` is what the caller sees, `reason` the driver's text.
    Lost {
        unavailable: StoreError,
        reason: String,
    },
    /// Any other error, as the work returned it.
    Other(StoreError),
}

impl Failure {
    fn into_error(self) -> StoreError {
        match self {
            Failure::Lost { unavailable, .. } => unavailable,
            Failure::Other(e) => e,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A `postgres::Client` closes its connection by blocking on a runtime of its own, which
        // panics when the pool is dropped on a thread that drives a tokio runtime (the last
        // reference to a store held by a request still in flight when `serve` shuts down: the
        // server then aborted instead of exiting 0). The idle connections are closed on a
        // thread of their own, not waited for.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let idle = std::mem::take(&mut state.idle);
        if !idle.is_empty() {
            let closing = std::thread::Builder::new()
                .name("pg-pool-close".into())
                .spawn(move || drop(idle));
            if let Err(e) = closing {
                // No thread to be had: they were closed on this one.
                tracing::warn!(error = %e, "cannot close idle database connections");
            }
        }
    }
}

/// A connection taken from the [`Pool`]; goes back on drop unless it was lost.
pub(crate) struct PooledClient<'a> {
    pool: &'a Pool,
    client: Option<Conn>,
    generation: u64,
    /// It came from the idle list (it may have been closed by the server while it idled), not
    /// opened for this call.
    reused: bool,
    broken: bool,
    /// Close this connection instead of returning it (a cancel may be in flight for it); unlike
    /// `broken`, the other idle connections stay.
    discard: bool,
}

impl PooledClient<'_> {
    pub(crate) fn client(&mut self) -> &mut Conn {
        self.client.as_mut().expect("present until drop")
    }

    /// Close this connection on drop instead of returning it to the pool (its session holds
    /// state the next user must not inherit).
    pub(crate) fn discard(&mut self) {
        self.discard = true;
    }

    /// The connection was lost: dropped, with the idle ones opened before it.
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl Drop for PooledClient<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let mut state = self.pool.lock();
        if self.broken || self.discard || client.is_closed() {
            state.open -= 1;
            if self.broken && self.generation >= state.generation {
                state.generation = self.generation + 1;
            }
            drop(state);
            drop(client);
        } else {
            state.idle.push(Idle {
                client,
                generation: self.generation,
                since: Instant::now(),
            });
        }
        self.pool.available.notify_one();
    }
}
