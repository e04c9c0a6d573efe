//! The PostgreSQL implementation of [`Store`] (issue 18).
//!
//! # Connections
//!
//! [`PgStore`] keeps a small pool of synchronous [`postgres::Client`]s (the blocking client of
//! tokio-postgres; the [`Store`] trait is synchronous and async callers use `spawn_blocking`). A
//! connection is checked when it is taken from the pool (closed ones are dropped, one idle for a
//! while answers a round trip first) and dropped instead of returned when a call lost it; a lost
//! connection also retires every idle connection opened before it (after a server restart they
//! are all dead), so the pool recovers by itself when the database is back. A database that cannot
//! be reached, or a connection lost during a call, is [`StoreError::Unavailable`] (→ 503), naming
//! `host:port` and never the password. A call that finds every connection in use waits at most
//! `pool_timeout=SECONDS` (a URL parameter, default [`DEFAULT_POOL_TIMEOUT`]) and is then
//! [`StoreError::Unavailable`] too.
//!
//! TLS: `sslmode=require` in the URL encrypts with rustls and verifies the server's certificate
//! and host name against the Mozilla roots plus the PEM file named by `sslrootcert=PATH` (a managed
//! service's own CA, e.g. Amazon RDS) — stricter than libpq's `require`, which does not verify.
//! `sslmode=prefer` tries TLS the same way and uses plain text when the server has none. Without
//! `sslmode` the connection is plain text.
//!
//! # Schema (versioned migrations in `schema_migrations`, applied under an advisory lock)
//!
//! The same shapes as SQLite's (see [`crate::sqlite`]), every integer `bigint`, so that the search
//! SQL can be shared:
//!
//! ```sql
//! types(type_no bigint PRIMARY KEY, name text UNIQUE)
//! transactions(lu_ms bigint PRIMARY KEY, first_seq bigint, last_seq bigint UNIQUE)
//! watermark(one boolean PRIMARY KEY, seq bigint, lu_ms bigint)     -- exactly one row
//! resource_versions(k bigint PRIMARY KEY,  -- (type_no << 40) | seq
//!   seq bigint UNIQUE, type_no bigint, id text, version bigint, last_updated text,
//!   method bigint, deleted bigint, superseded_seq bigint NULL,
//!   json bytea)                            -- ready-to-write compact JSON (not jsonb: no parse
//!                                          -- on the way out)
//! idx_token(type_no, param, system, code, k) ... idx_uri(type_no, param, uri, k)
//! store_meta(key text PRIMARY KEY, value text)                 -- indexes_stale
//! ```
//!
//! # Writes and snapshots
//!
//! Sequence values would commit out of order if several transactions allocated them at once, and
//! an export's snapshot (`seq <= watermark`) could then miss a write that commits later with a
//! smaller seq. So every write transaction first takes `pg_advisory_xact_lock(WRITE_LOCK)`, then
//! reads the one-row `watermark` (last seq and lastUpdated), allocates its seqs and its instant
//! (strictly greater than the last one), writes, updates `watermark` and commits; the lock is held
//! until the commit is visible. Writers are thus serialized cluster-wide, exactly like SQLite's
//! single writer, and seq order is commit order: a reader that sees watermark W sees every row
//! with `seq <= W`.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use ::postgres::binary_copy::BinaryCopyInWriter;
use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::types::{ToSql, Type};
use ::postgres::{Client, Config, GenericClient};
use serde_json::Value;

mod jobs;
mod search;

pub use jobs::PgJobQueue;

use crate::stamp::{PreparedResource, format_instant_ms};
use crate::{
    HistoryEntry, HistoryMethod, HistoryPage, HistoryQuery, HistoryScope, IndexEntry, IndexValue,
    Indexer, ListFilter, ListPage, ScanRow, SeqBounds, SeqStats, Store, StoreError, StoredResource,
    Tombstone, Watermark, WriteOp, WriteOutcome, WriteStatus,
};

use crate::index_tables::{INDEX_TABLES, VALUE_INDEXES};
use crate::ops::{
    Body, DEFAULT_HISTORY_COUNT, MAX_SEQ, Prepared, check_update, key, method_code, method_of,
    prepare,
};
/// `pg_advisory_xact_lock` key held by every write transaction (ASCII "fhhose" + 1).
pub const WRITE_LOCK: i64 = 0x0066_6868_6f73_6501;
/// `pg_advisory_lock` key held while migrations are applied.
pub const MIGRATION_LOCK: i64 = 0x0066_6868_6f73_6502;
/// Rows per keyset page of a scan.
const SCAN_PAGE_ROWS: i64 = 1000;
/// How long a call waits for a pooled connection when all are in use, unless the URL says
/// `pool_timeout=SECONDS`: a database too busy (or a pool held by long calls) answers 503.
pub const DEFAULT_POOL_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection idle longer than this answers a round trip before it is used.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(5);

/// The migrations, in order; each runs once, in its own transaction, and is recorded in
/// `schema_migrations`. Append new versions; never change an applied one.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "resources and search indexes", SCHEMA_V1),
    (2, "export job tables", jobs::SCHEMA),
    (
        3,
        "cluster state: cleanup holds, shared secrets, assertion replay cache",
        jobs::SCHEMA_V3,
    ),
    (
        4,
        "export file digests, de-identification key sets",
        jobs::SCHEMA_V4,
    ),
];

const SCHEMA_V1: &str = r#"
CREATE TABLE store_meta(key text PRIMARY KEY, value text COLLATE "C" NOT NULL);
CREATE TABLE types(
  type_no bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  name text COLLATE "C" NOT NULL UNIQUE);
CREATE TABLE transactions(
  lu_ms bigint PRIMARY KEY,
  first_seq bigint NOT NULL,
  last_seq bigint NOT NULL UNIQUE);
CREATE TABLE watermark(
  one boolean PRIMARY KEY DEFAULT true CHECK (one),
  seq bigint NOT NULL,
  lu_ms bigint NOT NULL);
INSERT INTO watermark(one, seq, lu_ms) VALUES (true, 0, 0);
CREATE TABLE resource_versions(
  k bigint PRIMARY KEY,
  seq bigint NOT NULL,
  type_no bigint NOT NULL,
  id text COLLATE "C" NOT NULL,
  version bigint NOT NULL,
  last_updated text COLLATE "C" NOT NULL,
  method bigint NOT NULL,
  deleted bigint NOT NULL,
  superseded_seq bigint,
  json bytea);
ALTER TABLE resource_versions ALTER COLUMN json SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX rv_resource ON resource_versions(type_no, id, version);
CREATE UNIQUE INDEX rv_seq ON resource_versions(seq);
CREATE INDEX rv_current ON resource_versions(k) WHERE superseded_seq IS NULL AND deleted = 0;
CREATE INDEX rv_superseded ON resource_versions(superseded_seq) WHERE superseded_seq IS NOT NULL;

CREATE TABLE idx_token(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  system text COLLATE "C", code text COLLATE "C", k bigint NOT NULL);
CREATE INDEX idx_token_k ON idx_token(k);
CREATE TABLE idx_token_text(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  text text COLLATE "C" NOT NULL, k bigint NOT NULL);
CREATE INDEX idx_token_text_k ON idx_token_text(k);
CREATE TABLE idx_string(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  normalized text COLLATE "C" NOT NULL, exact text COLLATE "C" NOT NULL, k bigint NOT NULL);
CREATE INDEX idx_string_k ON idx_string(k);
CREATE TABLE idx_date(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  lo bigint NOT NULL, hi bigint NOT NULL, k bigint NOT NULL);
CREATE INDEX idx_date_k ON idx_date(k);
CREATE TABLE idx_number(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  value double precision NOT NULL, k bigint NOT NULL);
CREATE INDEX idx_number_k ON idx_number(k);
CREATE TABLE idx_quantity(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  value double precision NOT NULL, system text COLLATE "C", code text COLLATE "C", unit text COLLATE "C", k bigint NOT NULL);
CREATE INDEX idx_quantity_k ON idx_quantity(k);
CREATE TABLE idx_reference(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  target_type text COLLATE "C", target_id text COLLATE "C", url text COLLATE "C", k bigint NOT NULL);
CREATE INDEX idx_reference_k ON idx_reference(k);
CREATE TABLE idx_reference_identifier(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  system text COLLATE "C", value text COLLATE "C", k bigint NOT NULL);
CREATE INDEX idx_reference_identifier_k ON idx_reference_identifier(k);
CREATE TABLE idx_uri(type_no bigint NOT NULL, param text COLLATE "C" NOT NULL,
  uri text COLLATE "C" NOT NULL, k bigint NOT NULL);
CREATE INDEX idx_uri_k ON idx_uri(k);
"#;

/// Options of [`PgStore`].
#[derive(Clone)]
pub struct PgOptions {
    /// The search indexer; `None` writes no index rows.
    pub indexer: Option<Arc<dyn Indexer>>,
    /// Most connections open at once (at least 1).
    pub pool_size: usize,
    /// How long opening a connection may take (applied unless the URL sets `connect_timeout`).
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            indexer: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("indexer", &self.indexer.is_some())
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Whether `text` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// A parsed connection URL: the driver's config, the TLS root file, and `host:port` for messages.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: Config,
    root_cert: Option<String>,
    /// `host:port` (several joined by `,`), for messages: no user, no password.
    pub(crate) display: String,
    /// Longest wait for a pooled connection when every one is in use (`pool_timeout=SECONDS` in
    /// the URL, default [`DEFAULT_POOL_TIMEOUT`]); then the call is [`StoreError::Unavailable`].
    pub(crate) pool_timeout: Duration,
}

impl Target {
    pub(crate) fn parse(url: &str, connect_timeout: Duration) -> Result<Target, StoreError> {
        // `sslrootcert` is libpq's; the driver refuses options it does not know.
        let (url, root_cert) = take_query_param(url, "sslrootcert");
        // Ours, not the driver's (it refuses options it does not know).
        let (url, pool_timeout) = take_query_param(&url, "pool_timeout");
        let pool_timeout = match pool_timeout {
            None => DEFAULT_POOL_TIMEOUT,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| StoreError::Unavailable {
                    target: redact(&url),
                    reason: format!(
                        "pool_timeout={v}: seconds (more than 0, at most 3600) expected"
                    ),
                })?,
        };
        let mut config = Config::from_str(&url).map_err(|e| StoreError::Unavailable {
            target: redact(&url),
            reason: format!("not a valid PostgreSQL URL: {e}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("fhirhose");
        }
        // No `sslmode` in the URL: plain text. (The driver's own default, `prefer`, would try TLS
        // and, with a server certificate our verifier refuses — e.g. Debian's self-signed
        // snakeoil one — fail instead of falling back.) `require`/`prefer` use TLS and verify.
        if !url.contains("sslmode=") {
            config.ssl_mode(::postgres::config::SslMode::Disable);
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                ::postgres::config::Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                ::postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports = config.get_ports();
        let display = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                format!("{h}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",");
        Ok(Target {
            config,
            root_cert,
            display,
            pool_timeout,
        })
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &self.root_cert {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| self.unavailable(format!("sslrootcert {path}: {e}")))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| self.unavailable(format!("sslrootcert {path}: {e}")))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| self.unavailable(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    pub(crate) fn unavailable(&self, reason: String) -> StoreError {
        StoreError::Unavailable {
            target: self.display.clone(),
            reason,
        }
    }

    /// Open one connection.
    pub(crate) fn connect(&self) -> Result<Client, StoreError> {
        let tls = self.tls()?;
        self.config
            .connect(tls)
            .map_err(|e| self.unavailable(describe(&e)))
    }
}

/// The driver's error text, with the database's own message when there is one.
fn describe(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

/// `url` without the password (for a message about a URL that did not parse).
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "(invalid URL)".into();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => authority[at + 1..].to_string(),
        None => authority.to_string(),
    }
}

/// Remove `name=value` from the query of `url`; returns the URL without it and the value.
fn take_query_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some(q) = url.find('?') else {
        return (url.to_string(), None);
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_string(), value)
    } else {
        (format!("{base}?{}", kept.join("&")), value)
    }
}

/// Whether `e` means the connection is gone (or the server is going away): the call can be retried
/// on another connection once the database is back.
pub(crate) fn is_connection_error(e: &::postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exception; 57P01-57P03: admin/crash shutdown, cannot connect now;
        // 25P03: the server ended a session idle in a transaction (the job queue's timeout).
        return c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03" | "25P03");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

struct Idle {
    client: Client,
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
    target: Target,
    max: usize,
    state: Mutex<PoolState>,
    available: Condvar,
}

impl Pool {
    fn new(target: Target, max: usize) -> Pool {
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
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let deadline = Instant::now() + self.target.pool_timeout;
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
                    broken: false,
                });
            }
            if state.open < self.max {
                state.open += 1;
                let generation = state.generation;
                drop(state);
                return match self.target.connect() {
                    Ok(client) => Ok(PooledClient {
                        pool: self,
                        client: Some(client),
                        generation,
                        broken: false,
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
                    "all {} connections stayed in use for {:?} (pool_timeout)",
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
    pub(crate) fn run<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.get()?;
        let result = f(conn.client());
        match result {
            Err(StoreError::Postgres(e))
                if is_connection_error(&e) || conn.client().is_closed() =>
            {
                conn.broken = true;
                tracing::warn!(target_db = %self.target.display, error = %describe(&e), "lost a database connection");
                Err(self.target.unavailable(describe(&e)))
            }
            Err(e) => {
                if conn.client().is_closed() {
                    conn.broken = true;
                }
                Err(e)
            }
            ok => ok,
        }
    }
}

/// A connection taken from the [`Pool`]; goes back on drop unless it was lost.
pub(crate) struct PooledClient<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    generation: u64,
    broken: bool,
}

impl PooledClient<'_> {
    pub(crate) fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for PooledClient<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let mut state = self.pool.lock();
        if self.broken || client.is_closed() {
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

/// Run `f` holding the session advisory lock [`MIGRATION_LOCK`] (schema changes: migrations and
/// the value indexes), so that several processes starting at once do each change once.
fn with_schema_lock<T>(
    client: &mut Client,
    f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = f(client);
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    let value = result?;
    unlocked?;
    Ok(value)
}

/// Apply the [`MIGRATIONS`] this database lacks (call under [`with_schema_lock`]). Refuses a
/// database migrated by a newer version.
fn migrate(client: &mut Client) -> Result<usize, StoreError> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations(
           version bigint PRIMARY KEY,
           description text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let done: Vec<i64> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&newest) = done.last()
        && newest > known
    {
        return Err(StoreError::Corrupt(format!(
            "database schema version {newest}, this build knows versions up to {known}"
        )));
    }
    let mut n = 0;
    for (version, description, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations(version, description) VALUES ($1, $2)",
            &[version, description],
        )?;
        tx.commit()?;
        tracing::info!(version, description, "applied a database migration");
        n += 1;
    }
    Ok(n)
}

/// The columns of `resource_versions` that ANALYZE samples (all but `json`).
const RV_ANALYZE_COLUMNS: &str =
    "k, seq, type_no, id, version, last_updated, method, deleted, superseded_seq";

/// The statistics target of the ANALYZE after a bulk load (PostgreSQL's default is 100: a
/// sample of 30,000 rows per table and 100 most common values per column). 20 samples 6,000
/// rows, enough for the plans' choices between the value indexes, at a quarter of the time
/// (about 0.9 s of 3.1 s for Synthea-100); autovacuum analyses again at the default as the
/// tables change.
const LOAD_STATISTICS_TARGET: u32 = 20;

/// Session settings for building indexes: sorting a large index gets memory and parallel workers.
const BUILD_SETTINGS: &str =
    "SET maintenance_work_mem = '512MB'; SET max_parallel_maintenance_workers = 4";

/// Undoes [`BUILD_SETTINGS`].
const BUILD_RESET: &str = "RESET maintenance_work_mem; RESET max_parallel_maintenance_workers";

/// Run `statements` (each on its own, in no particular order) on `client` and on a second
/// connection opened for the purpose, each taking the next statement when it has finished one;
/// with `build`, both use [`BUILD_SETTINGS`] meanwhile. Without a second connection everything
/// runs on `client`.
fn run_on_two_connections(
    target: &Target,
    client: &mut Client,
    statements: Vec<String>,
    build: bool,
) -> Result<usize, StoreError> {
    let n = statements.len();
    if n == 0 {
        return Ok(0);
    }
    let queue = Mutex::new(statements.into_iter());
    let work = |c: &mut Client| -> Result<(), StoreError> {
        if build {
            c.batch_execute(BUILD_SETTINGS)?;
        }
        loop {
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some(sql) = next else { break };
            c.batch_execute(&sql)?;
        }
        if build {
            c.batch_execute(BUILD_RESET)?;
        }
        Ok(())
    };
    let second = if n > 1 { target.connect().ok() } else { None };
    let (mine, theirs) = std::thread::scope(|scope| {
        let helper = second.map(|mut c| {
            let work = &work;
            scope.spawn(move || {
                work(&mut c).map_err(|e| match e {
                    StoreError::Postgres(e) if is_connection_error(&e) => {
                        target.unavailable(describe(&e))
                    }
                    e => e,
                })
            })
        });
        let mine = work(client);
        let theirs = helper.map_or(Ok(()), |h| {
            h.join().unwrap_or_else(|_| {
                Err(StoreError::Corrupt("an index build thread panicked".into()))
            })
        });
        (mine, theirs)
    });
    mine?;
    theirs?;
    Ok(n)
}

/// The names of the index tables' indexes that exist.
fn present_indexes(client: &mut Client) -> Result<Vec<String>, StoreError> {
    Ok(client
        .query(
            "SELECT indexname::text FROM pg_indexes
             WHERE schemaname = current_schema() AND indexname LIKE 'idx\\_%'",
            &[],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The index tables' `k` indexes (schema version 1 creates them; a bulk load drops them with
/// the value indexes, see [`PgStore::suspend_index_upkeep`]): `(table, index name)`.
fn k_indexes() -> impl Iterator<Item = (&'static str, String)> {
    INDEX_TABLES.iter().map(|t| (*t, format!("{t}_k")))
}

/// Create the [`VALUE_INDEXES`] and `k` indexes that are missing (two at a time); returns how
/// many were. A missing `k` index means a bulk load suspended index upkeep and may have left the
/// index rows of versions it superseded (their deletion waits for the `k` index, see
/// [`PgStore::write_in`]): they are deleted first, in one pass per table.
fn build_value_indexes(target: &Target, client: &mut Client) -> Result<usize, StoreError> {
    let present = present_indexes(client)?;
    let mut statements: Vec<String> = Vec::new();
    for (table, name) in k_indexes() {
        if !present.contains(&name) {
            client.execute(
                &format!(
                    "DELETE FROM {table} WHERE k IN
                     (SELECT k FROM resource_versions WHERE superseded_seq IS NOT NULL)"
                ),
                &[],
            )?;
            statements.push(format!("CREATE INDEX IF NOT EXISTS {name} ON {table}(k)"));
        }
    }
    statements.extend(
        VALUE_INDEXES
            .iter()
            .filter(|(name, _)| !present.iter().any(|p| p == name))
            .map(|(_, ddl)| ddl.to_string()),
    );
    run_on_two_connections(target, client, statements, true)
}

/// [`Store`] on a PostgreSQL database.
pub struct PgStore {
    pub(crate) pool: Pool,
    types: RwLock<HashMap<String, i64>>,
    indexer: Option<Arc<dyn Indexer>>,
    /// The export job queue (its own small pool on the same database).
    jobs: Arc<PgJobQueue>,
    /// Set between [`Store::suspend_index_upkeep`] and [`Store::resume_index_upkeep`]: the
    /// index tables have no `k` index, so the index rows of superseded versions stay until the
    /// resume deletes them in bulk (searches read current versions only and never see them).
    upkeep_suspended: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.pool.target.display)
            .finish()
    }
}

impl PgStore {
    /// Connect to the database named by `url` (`postgres://user:password@host:port/db?…`), apply
    /// the migrations it lacks and rebuild value indexes an interrupted bulk load left out.
    /// [`StoreError::Unavailable`] when the server cannot be reached.
    pub fn connect(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let target = Target::parse(url, options.connect_timeout)?;
        let jobs = Arc::new(PgJobQueue::new(target.clone()));
        let pool = Pool::new(target, options.pool_size);
        let store = PgStore {
            pool,
            types: RwLock::new(HashMap::new()),
            indexer: options.indexer,
            jobs,
            upkeep_suspended: std::sync::atomic::AtomicBool::new(false),
        };
        store.pool.run(|c| {
            with_schema_lock(c, |c| {
                migrate(c)?;
                let rebuilt = build_value_indexes(&store.pool.target, c)?;
                if rebuilt > 0 {
                    tracing::info!(rebuilt, "built missing search value indexes");
                }
                Ok(())
            })
        })?;
        store.load_types()?;
        Ok(store)
    }

    /// `host:port` of the database (no credentials), for messages.
    pub fn target(&self) -> &str {
        &self.pool.target.display
    }

    /// Run `f` with a pooled connection (for the backend's own modules: search, jobs). Errors of
    /// the driver convert with `?` into [`StoreError::Postgres`]; a lost connection becomes
    /// [`StoreError::Unavailable`] and is not reused.
    #[allow(dead_code)] // for postgres/search.rs and postgres/jobs.rs
    pub(crate) fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.pool.run(f)
    }

    fn load_types(&self) -> Result<(), StoreError> {
        let rows = self.pool.run(|c| {
            Ok(c.query("SELECT name, type_no FROM types", &[])?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>())
        })?;
        self.types
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(rows);
        Ok(())
    }

    fn cached_type(&self, name: &str) -> Option<i64> {
        self.types
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// The type number used in `k` and in the index tables; `None` if the type was never written.
    pub fn type_no(&self, resource_type: &str) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.cached_type(resource_type) {
            return Ok(Some(no));
        }
        self.pool.run(|c| self.lookup_type(c, resource_type))
    }

    fn lookup_type(
        &self,
        c: &mut impl GenericClient,
        name: &str,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.cached_type(name) {
            return Ok(Some(no));
        }
        let no: Option<i64> = c
            .query_opt("SELECT type_no FROM types WHERE name = $1", &[&name])?
            .map(|r| r.get(0));
        if let Some(no) = no {
            self.types
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), no);
        }
        Ok(no)
    }

    fn type_name_of(&self, c: &mut impl GenericClient, type_no: i64) -> Result<String, StoreError> {
        {
            let types = self.types.read().unwrap_or_else(|e| e.into_inner());
            if let Some((name, _)) = types.iter().find(|(_, n)| **n == type_no) {
                return Ok(name.clone());
            }
        }
        let name: Option<String> = c
            .query_opt("SELECT name FROM types WHERE type_no = $1", &[&type_no])?
            .map(|r| r.get(0));
        let name =
            name.ok_or_else(|| StoreError::Corrupt(format!("unknown type number {type_no}")))?;
        self.types
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), type_no);
        Ok(name)
    }

    /// Register the types that have no number yet, committed on their own (a type row without
    /// resources is harmless, and this keeps the cache valid if the write itself rolls back).
    fn register_types(&self, c: &mut Client, names: &[&str]) -> Result<(), StoreError> {
        for name in names {
            if self.cached_type(name).is_some() {
                continue;
            }
            c.execute(
                "INSERT INTO types(name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                &[name],
            )?;
            self.lookup_type(c, name)?
                .ok_or_else(|| StoreError::Corrupt(format!("type {name} was not registered")))?;
        }
        Ok(())
    }

    /// Records whether the search indexes miss resources (a `load --no-index`), until a full
    /// reindex clears it.
    pub fn set_indexes_stale(&self, stale: bool) -> Result<(), StoreError> {
        self.pool.run(|c| {
            if stale {
                c.execute(
                    "INSERT INTO store_meta(key, value) VALUES ('indexes_stale', '1')
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[],
                )?;
            } else {
                c.execute("DELETE FROM store_meta WHERE key = 'indexes_stale'", &[])?;
            }
            Ok(())
        })
    }

    /// Whether resources were loaded without search indexes since the last full reindex.
    pub fn indexes_stale(&self) -> Result<bool, StoreError> {
        self.pool.run(|c| {
            Ok(
                c.query_opt("SELECT 1 FROM store_meta WHERE key = 'indexes_stale'", &[])?
                    .is_some(),
            )
        })
    }

    /// The write transaction (see the module docs).
    fn write_in(
        &self,
        c: &mut Client,
        prepared: Vec<Prepared>,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut tx = c.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        let row = tx.query_one("SELECT seq, lu_ms FROM watermark", &[])?;
        let (last_seq, last_ms): (i64, i64) = (row.get(0), row.get(1));
        let now = chrono::Utc::now().timestamp_millis();
        let lu_ms = now.max(last_ms + 1);
        let last_updated = format_instant_ms(lu_ms);
        let first_seq = last_seq + 1;
        let mut seq = last_seq;

        // The current version of every named resource, in one query per type.
        let mut current: HashMap<(i64, String), Current> = HashMap::new();
        {
            let mut by_type: HashMap<i64, Vec<&str>> = HashMap::new();
            for p in &prepared {
                if let Some(id) = &p.id {
                    let type_no = self.registered(&p.resource_type)?;
                    by_type.entry(type_no).or_default().push(id);
                }
            }
            for (type_no, ids) in by_type {
                let rows = tx.query(
                    "SELECT DISTINCT ON (id) id, k, version, deleted FROM resource_versions
                     WHERE type_no = $1 AND id = ANY($2) ORDER BY id, version DESC",
                    &[&type_no, &ids],
                )?;
                for r in rows {
                    current.insert(
                        (type_no, r.get::<_, String>(0)),
                        Current {
                            k: r.get(1),
                            version: r.get(2),
                            deleted: r.get::<_, i64>(3) != 0,
                        },
                    );
                }
            }
        }

        let mut outcomes: Vec<WriteOutcome> = Vec::with_capacity(prepared.len());
        let mut rows: Vec<NewRow> = Vec::with_capacity(prepared.len());
        let mut row_of_k: HashMap<i64, usize> = HashMap::new();
        let mut supersede_db: (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        let mut deindex_db: Vec<i64> = Vec::new();
        let indexing = self.indexer.is_some();
        let defer_deindex = self
            .upkeep_suspended
            .load(std::sync::atomic::Ordering::Relaxed);

        for p in prepared {
            let type_no = self.registered(&p.resource_type)?;
            let id = match p.id {
                Some(id) => id,
                None => uuid::Uuid::new_v4().to_string(),
            };
            let cur = current.get(&(type_no, id.clone())).copied();
            if p.method == HistoryMethod::Post && cur.is_some() {
                return Err(StoreError::AlreadyExists {
                    resource_type: p.resource_type,
                    id,
                });
            }
            if let Some(expected) = p.if_match {
                let live = cur.filter(|c| !c.deleted).map(|c| c.version);
                if live != Some(expected) {
                    return Err(StoreError::VersionConflict {
                        resource_type: p.resource_type,
                        id,
                        expected,
                        actual: live,
                    });
                }
            }
            if p.resource.is_none() && cur.is_none_or(|c| c.deleted) {
                outcomes.push(WriteOutcome {
                    resource_type: p.resource_type,
                    id,
                    status: WriteStatus::DeleteNotFound,
                    version: cur.map_or(0, |c| c.version),
                    seq: 0,
                    last_updated: last_updated.clone(),
                    json: None,
                });
                continue;
            }
            seq += 1;
            if seq > MAX_SEQ {
                return Err(StoreError::Corrupt("sequence space exhausted".into()));
            }
            let k = key(type_no, seq);
            // A kept version (`$import` InitialLoad) only creates.
            let kept = match &p.resource {
                Some(Body::Ready(ready)) => ready.kept.clone(),
                _ => None,
            };
            if kept.is_some() && cur.is_some() {
                return Err(StoreError::AlreadyExists {
                    resource_type: p.resource_type,
                    id,
                });
            }
            let (version, row_updated) = match kept {
                Some((v, lu)) => (v, lu),
                None => (cur.map_or(1, |c| c.version + 1), last_updated.clone()),
            };
            // Supersede the previous version (written earlier in this call, or in the database).
            if let Some(c) = cur {
                match row_of_k.get(&c.k) {
                    Some(&i) => {
                        rows[i].superseded_seq = Some(seq);
                        rows[i].index = None;
                    }
                    None => {
                        supersede_db.0.push(c.k);
                        supersede_db.1.push(seq);
                        if indexing && !c.deleted && !defer_deindex {
                            deindex_db.push(c.k);
                        }
                    }
                }
            }
            let (status, json, index, deleted) = match p.resource {
                None => (WriteStatus::Deleted, None, None, true),
                Some(body) => {
                    let ready = match body {
                        Body::Ready(ready) => ready,
                        Body::Json(m) => PreparedResource::build(
                            &p.resource_type,
                            &id,
                            m,
                            self.indexer.as_deref(),
                        )?,
                    };
                    let json = ready.stamped(version, &row_updated);
                    let index = if indexing {
                        let Some(entries) = ready.index else {
                            return Err(StoreError::InvalidResource(format!(
                                "{}/{} was prepared without this store's search indexer",
                                p.resource_type, id
                            )));
                        };
                        Some(entries)
                    } else {
                        None
                    };
                    let status = match cur {
                        Some(c) if !c.deleted => WriteStatus::Updated,
                        _ => WriteStatus::Created,
                    };
                    (status, Some(json), index, false)
                }
            };
            current.insert(
                (type_no, id.clone()),
                Current {
                    k,
                    version,
                    deleted,
                },
            );
            row_of_k.insert(k, rows.len());
            rows.push(NewRow {
                k,
                seq,
                type_no,
                version,
                method: if deleted {
                    HistoryMethod::Delete
                } else {
                    p.method
                },
                deleted,
                superseded_seq: None,
                outcome: outcomes.len(),
                index,
            });
            outcomes.push(WriteOutcome {
                resource_type: p.resource_type,
                id,
                status,
                version,
                seq,
                last_updated: row_updated,
                json,
            });
        }

        if !supersede_db.0.is_empty() {
            tx.execute(
                "UPDATE resource_versions rv SET superseded_seq = u.s
                 FROM unnest($1::bigint[], $2::bigint[]) AS u(k, s) WHERE rv.k = u.k",
                &[&supersede_db.0, &supersede_db.1],
            )?;
        }
        if !deindex_db.is_empty() {
            for table in INDEX_TABLES {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE k = ANY($1)"),
                    &[&deindex_db],
                )?;
            }
        }
        if !rows.is_empty() {
            copy_versions(&mut tx, &rows, &outcomes)?;
            let indexed: Vec<(i64, i64, &[IndexEntry])> = rows
                .iter()
                .filter_map(|r| r.index.as_deref().map(|e| (r.type_no, r.k, e)))
                .collect();
            copy_index_rows(&mut tx, &indexed)?;
            tx.execute(
                "INSERT INTO transactions(lu_ms, first_seq, last_seq) VALUES ($1, $2, $3)",
                &[&lu_ms, &first_seq, &seq],
            )?;
            tx.execute("UPDATE watermark SET seq = $1, lu_ms = $2", &[&seq, &lu_ms])?;
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn registered(&self, name: &str) -> Result<i64, StoreError> {
        self.cached_type(name)
            .ok_or_else(|| StoreError::Corrupt(format!("type {name} not registered")))
    }

    /// Current resources of a type at `as_of` (see [`crate::sqlite`]'s `count_as_of`).
    fn count_as_of(c: &mut Client, type_no: i64, as_of: i64) -> Result<u64, StoreError> {
        if as_of <= 0 {
            return Ok(0);
        }
        let lo = key(type_no, 0);
        let hi = key(type_no, as_of);
        let now: i64 = c
            .query_one(
                "SELECT count(*) FROM resource_versions
                 WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0",
                &[&lo, &hi],
            )?
            .get(0);
        let replaced_later: i64 = c
            .query_one(
                "SELECT count(*) FROM resource_versions
                 WHERE superseded_seq > $3 AND k > $1 AND k <= $2 AND deleted = 0",
                &[&lo, &hi, &as_of],
            )?
            .get(0);
        Ok((now + replaced_later) as u64)
    }
}

/// A version row to be written by [`PgStore::write_in`].
struct NewRow {
    k: i64,
    seq: i64,
    type_no: i64,
    version: i64,
    method: HistoryMethod,
    deleted: bool,
    /// Set when a later op of the same call supersedes it.
    superseded_seq: Option<i64>,
    /// Index of its outcome (id, json).
    outcome: usize,
    /// Index entries, `None` when not indexing or superseded within the call.
    index: Option<Vec<IndexEntry>>,
}

#[derive(Clone, Copy)]
struct Current {
    k: i64,
    version: i64,
    deleted: bool,
}

fn copy_versions(
    tx: &mut ::postgres::Transaction<'_>,
    rows: &[NewRow],
    outcomes: &[WriteOutcome],
) -> Result<(), StoreError> {
    let sink = tx.copy_in(
        "COPY resource_versions (k, seq, type_no, id, version, last_updated, method, deleted,
         superseded_seq, json) FROM STDIN (FORMAT binary)",
    )?;
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::BYTEA,
    ];
    let mut w = BinaryCopyInWriter::new(sink, &types);
    for r in rows {
        let o = &outcomes[r.outcome];
        let method = method_code(r.method);
        let deleted = i64::from(r.deleted);
        let json: Option<&[u8]> = o.json.as_deref();
        w.write(&[
            &r.k,
            &r.seq,
            &r.type_no,
            &o.id,
            &r.version,
            &o.last_updated,
            &method,
            &deleted,
            &r.superseded_seq,
            &json,
        ])?;
    }
    w.finish()?;
    Ok(())
}

/// COPY the index rows of `(type_no, k, entries)` into the index tables, one COPY per table that
/// gets rows.
fn copy_index_rows(
    tx: &mut ::postgres::Transaction<'_>,
    items: &[(i64, i64, &[IndexEntry])],
) -> Result<(), StoreError> {
    if items.is_empty() {
        return Ok(());
    }
    let t = Type::TEXT;
    let i = Type::INT8;
    let f = Type::FLOAT8;
    // (table, columns, types, does this entry belong here)
    type Pick = fn(&IndexValue) -> bool;
    let tables: [(&str, &str, Vec<Type>, Pick); 9] = [
        (
            "idx_token",
            "type_no, param, system, code, k",
            vec![i.clone(), t.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::Token { .. }),
        ),
        (
            "idx_token_text",
            "type_no, param, text, k",
            vec![i.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::TokenText(_)),
        ),
        (
            "idx_string",
            "type_no, param, normalized, exact, k",
            vec![i.clone(), t.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::String { .. }),
        ),
        (
            "idx_date",
            "type_no, param, lo, hi, k",
            vec![i.clone(), t.clone(), i.clone(), i.clone(), i.clone()],
            |v| matches!(v, IndexValue::Date { .. }),
        ),
        (
            "idx_number",
            "type_no, param, value, k",
            vec![i.clone(), t.clone(), f.clone(), i.clone()],
            |v| matches!(v, IndexValue::Number(_)),
        ),
        (
            "idx_quantity",
            "type_no, param, value, system, code, unit, k",
            vec![
                i.clone(),
                t.clone(),
                f.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                i.clone(),
            ],
            |v| matches!(v, IndexValue::Quantity { .. }),
        ),
        (
            "idx_reference",
            "type_no, param, target_type, target_id, url, k",
            vec![
                i.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                t.clone(),
                i.clone(),
            ],
            |v| {
                matches!(
                    v,
                    IndexValue::Reference { .. } | IndexValue::ReferenceUrl(_)
                )
            },
        ),
        (
            "idx_reference_identifier",
            "type_no, param, system, value, k",
            vec![i.clone(), t.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::ReferenceIdentifier { .. }),
        ),
        (
            "idx_uri",
            "type_no, param, uri, k",
            vec![i.clone(), t.clone(), t.clone(), i.clone()],
            |v| matches!(v, IndexValue::Uri(_)),
        ),
    ];
    for (table, columns, types, pick) in tables {
        let any = items
            .iter()
            .any(|(_, _, entries)| entries.iter().any(|e| pick(&e.value)));
        if !any {
            continue;
        }
        let sink = tx.copy_in(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))?;
        let mut w = BinaryCopyInWriter::new(sink, &types);
        for (type_no, k, entries) in items {
            for e in entries.iter().filter(|e| pick(&e.value)) {
                let p = e.param.as_str();
                let none: Option<&str> = None;
                match &e.value {
                    IndexValue::Token { system, code } => {
                        w.write(&[type_no, &p, system, code, k])?
                    }
                    IndexValue::TokenText(text) => w.write(&[type_no, &p, text, k])?,
                    IndexValue::String { normalized, exact } => {
                        w.write(&[type_no, &p, normalized, exact, k])?
                    }
                    IndexValue::Date { lo, hi } => w.write(&[type_no, &p, lo, hi, k])?,
                    IndexValue::Number(value) => w.write(&[type_no, &p, value, k])?,
                    IndexValue::Quantity {
                        value,
                        system,
                        code,
                        unit,
                    } => w.write(&[type_no, &p, value, system, code, unit, k])?,
                    IndexValue::Reference { target_type, id } => {
                        let tt: Option<&str> = Some(target_type);
                        let ti: Option<&str> = Some(id);
                        w.write(&[type_no, &p, &tt, &ti, &none, k])?
                    }
                    IndexValue::ReferenceUrl(url) => {
                        let u: Option<&str> = Some(url);
                        w.write(&[type_no, &p, &none, &none, &u, k])?
                    }
                    IndexValue::ReferenceIdentifier { system, value } => {
                        w.write(&[type_no, &p, system, value, k])?
                    }
                    IndexValue::Uri(uri) => w.write(&[type_no, &p, uri, k])?,
                }
            }
        }
        w.finish()?;
    }
    Ok(())
}

fn seq_at_or_after(c: &mut impl GenericClient, instant_ms: i64) -> Result<i64, StoreError> {
    let first: Option<i64> = c
        .query_opt(
            "SELECT first_seq FROM transactions WHERE lu_ms >= $1 ORDER BY lu_ms LIMIT 1",
            &[&instant_ms],
        )?
        .map(|r| r.get(0));
    match first {
        Some(s) => Ok(s),
        None => {
            let last: i64 = c.query_one("SELECT seq FROM watermark", &[])?.get(0);
            Ok(last + 1)
        }
    }
}

/// The seq window `(lo, hi]` of a listing, from `_lastUpdated` and the page cursor; `None` if empty.
fn list_bounds(
    c: &mut Client,
    filter: &ListFilter,
    after_seq: Option<i64>,
) -> Result<Option<(i64, i64)>, StoreError> {
    let mut lo = after_seq.unwrap_or(0).max(0);
    let mut hi = MAX_SEQ;
    if let Some(from) = filter.updated_from_ms {
        lo = lo.max(seq_at_or_after(c, from)? - 1);
    }
    if let Some(before) = filter.updated_before_ms {
        hi = hi.min(seq_at_or_after(c, before)? - 1);
    }
    Ok((hi > lo).then_some((lo, hi)))
}

/// Turn a version row `(seq, version, last_updated, deleted, json)` into the resource, or
/// [`StoreError::Gone`] for a tombstone.
fn finish_version(
    row: ::postgres::Row,
    resource_type: &str,
    id: &str,
) -> Result<StoredResource, StoreError> {
    let seq: i64 = row.try_get(0)?;
    let version: i64 = row.try_get(1)?;
    let last_updated: String = row.try_get(2)?;
    let deleted: i64 = row.try_get(3)?;
    let json: Option<Vec<u8>> = row.try_get(4)?;
    match (deleted, json) {
        (0, Some(json)) => Ok(StoredResource {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            seq,
            version,
            last_updated,
            json,
        }),
        (0, None) => Err(StoreError::Corrupt(format!(
            "{resource_type}/{id} version {version} has no content"
        ))),
        _ => Err(StoreError::Gone {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version,
        }),
    }
}

fn sql_limit(n: usize) -> i64 {
    n.min(i64::MAX as usize) as i64
}

impl Store for PgStore {
    fn search(
        &self,
        plan: &crate::plan::SearchPlan,
        stop: Option<&crate::plan::StopCheck>,
    ) -> Result<crate::plan::SearchRows, StoreError> {
        search::search(self, plan, stop)
    }

    fn prepare_put(
        &self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<PreparedResource, StoreError> {
        let m = check_update(resource_type, id, resource)?;
        PreparedResource::build(resource_type, id, m, self.indexer.as_deref())
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, StoreError> {
        let prepared: Vec<Prepared> = ops.into_iter().map(prepare).collect::<Result<_, _>>()?;
        let mut names: Vec<&str> = prepared.iter().map(|p| p.resource_type.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let names: Vec<String> = names.into_iter().map(str::to_string).collect();
        self.pool.run(|c| {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            self.register_types(c, &refs)?;
            self.write_in(c, prepared)
        })
    }

    fn read(&self, resource_type: &str, id: &str) -> Result<StoredResource, StoreError> {
        let not_found = || StoreError::NotFound {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
        };
        self.pool.run(|c| {
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Err(not_found());
            };
            let row = c.query_opt(
                "SELECT seq, version, last_updated, deleted, json FROM resource_versions
                 WHERE type_no = $1 AND id = $2 ORDER BY version DESC LIMIT 1",
                &[&type_no, &id],
            )?;
            match row {
                Some(row) => finish_version(row, resource_type, id),
                None => Err(not_found()),
            }
        })
    }

    fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<StoredResource, StoreError> {
        let not_found = || StoreError::NotFound {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
        };
        self.pool.run(|c| {
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Err(not_found());
            };
            let row = c.query_opt(
                "SELECT seq, version, last_updated, deleted, json FROM resource_versions
                 WHERE type_no = $1 AND id = $2 AND version = $3",
                &[&type_no, &id, &version],
            )?;
            match row {
                Some(row) => finish_version(row, resource_type, id),
                None => Err(not_found()),
            }
        })
    }

    fn history(
        &self,
        scope: HistoryScope<'_>,
        query: &HistoryQuery,
    ) -> Result<HistoryPage, StoreError> {
        let count = if query.count == 0 {
            DEFAULT_HISTORY_COUNT
        } else {
            query.count
        };
        self.pool.run(|c| {
            let lo_seq = match query.since_ms {
                Some(ms) => seq_at_or_after(c, ms)?,
                None => 1,
            };
            let hi_seq = query
                .before_seq
                .map_or(MAX_SEQ, |b| b - 1)
                .min(query.as_of.unwrap_or(MAX_SEQ))
                .min(MAX_SEQ);
            let limit = sql_limit(count.saturating_add(1));
            let rows: Vec<::postgres::Row> = match scope {
                HistoryScope::Instance { resource_type, id } => {
                    let Some(type_no) = self.lookup_type(c, resource_type)? else {
                        return Err(StoreError::NotFound {
                            resource_type: resource_type.to_string(),
                            id: id.to_string(),
                        });
                    };
                    let rows = c.query(
                        "SELECT seq, id, version, last_updated, method, json, type_no
                         FROM resource_versions
                         WHERE type_no = $1 AND id = $2 AND seq >= $3 AND seq <= $4
                         ORDER BY version DESC LIMIT $5",
                        &[&type_no, &id, &lo_seq, &hi_seq, &limit],
                    )?;
                    if rows.is_empty() && query.before_seq.is_none() {
                        let exists = c.query_opt(
                            "SELECT 1 FROM resource_versions WHERE type_no = $1 AND id = $2 LIMIT 1",
                            &[&type_no, &id],
                        )?;
                        if exists.is_none() {
                            return Err(StoreError::NotFound {
                                resource_type: resource_type.to_string(),
                                id: id.to_string(),
                            });
                        }
                    }
                    rows
                }
                HistoryScope::Type(resource_type) => {
                    let Some(type_no) = self.lookup_type(c, resource_type)? else {
                        return Ok(HistoryPage {
                            entries: Vec::new(),
                            next_before_seq: None,
                        });
                    };
                    c.query(
                        "SELECT seq, id, version, last_updated, method, json, type_no
                         FROM resource_versions WHERE k >= $1 AND k <= $2
                         ORDER BY k DESC LIMIT $3",
                        &[&key(type_no, lo_seq), &key(type_no, hi_seq), &limit],
                    )?
                }
                HistoryScope::System => c.query(
                    "SELECT seq, id, version, last_updated, method, json, type_no
                     FROM resource_versions WHERE seq >= $1 AND seq <= $2
                     ORDER BY seq DESC LIMIT $3",
                    &[&lo_seq, &hi_seq, &limit],
                )?,
            };
            let more = rows.len() > count;
            let mut entries = Vec::with_capacity(rows.len().min(count));
            for row in rows.into_iter().take(count) {
                let type_no: i64 = row.try_get(6)?;
                entries.push(HistoryEntry {
                    resource_type: self.type_name_of(c, type_no)?,
                    id: row.try_get(1)?,
                    seq: row.try_get(0)?,
                    version: row.try_get(2)?,
                    last_updated: row.try_get(3)?,
                    method: method_of(row.try_get(4)?)?,
                    json: row.try_get(5)?,
                });
            }
            let next_before_seq = if more {
                entries.last().map(|e| e.seq)
            } else {
                None
            };
            Ok(HistoryPage {
                entries,
                next_before_seq,
            })
        })
    }

    fn watermark(&self) -> Result<Watermark, StoreError> {
        self.pool.run(|c| {
            let row = c.query_one("SELECT seq, lu_ms FROM watermark", &[])?;
            let (seq, ms): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            Ok(if seq == 0 {
                Watermark {
                    seq: 0,
                    last_updated: None,
                }
            } else {
                Watermark {
                    seq,
                    last_updated: Some(format_instant_ms(ms)),
                }
            })
        })
    }

    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError> {
        self.pool.run(|c| seq_at_or_after(c, instant_ms))
    }

    fn instant_of_seq(&self, seq: i64) -> Result<Option<String>, StoreError> {
        self.pool.run(|c| {
            let row = c.query_opt(
                "SELECT lu_ms, first_seq FROM transactions WHERE last_seq >= $1
                 ORDER BY last_seq LIMIT 1",
                &[&seq],
            )?;
            Ok(row
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
                .filter(|(_, first)| *first <= seq)
                .map(|(ms, _)| format_instant_ms(ms)))
        })
    }

    fn types_present(&self, as_of: i64) -> Result<Vec<String>, StoreError> {
        self.pool.run(|c| {
            let types: Vec<(String, i64)> = c
                .query("SELECT name, type_no FROM types ORDER BY name", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let stmt = c.prepare(
                "SELECT 1 FROM resource_versions WHERE k > $1 AND k <= $2 AND deleted = 0
                 AND (superseded_seq IS NULL OR superseded_seq > $3) LIMIT 1",
            )?;
            let mut out = Vec::new();
            for (name, type_no) in types {
                let any = c.query_opt(&stmt, &[&key(type_no, 0), &key(type_no, as_of), &as_of])?;
                if any.is_some() {
                    out.push(name);
                }
            }
            // `ORDER BY name` sorts by the database's collation; the contract is byte order.
            out.sort();
            Ok(out)
        })
    }

    fn count_type(&self, resource_type: &str, as_of: i64) -> Result<u64, StoreError> {
        self.pool.run(|c| {
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Ok(0);
            };
            Self::count_as_of(c, type_no, as_of)
        })
    }

    fn seq_range(&self, resource_type: &str, as_of: i64) -> Result<Option<SeqStats>, StoreError> {
        self.pool.run(|c| {
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Ok(None);
            };
            let count = Self::count_as_of(c, type_no, as_of)?;
            if count == 0 {
                return Ok(None);
            }
            let mut edge = |order: &str| -> Result<i64, StoreError> {
                Ok(c.query_one(
                    &format!(
                        "SELECT seq FROM resource_versions WHERE k > $1 AND k <= $2 AND deleted = 0
                         AND (superseded_seq IS NULL OR superseded_seq > $3) ORDER BY k {order} LIMIT 1"
                    ),
                    &[&key(type_no, 0), &key(type_no, as_of), &as_of],
                )?
                .try_get(0)?)
            };
            let min_seq = edge("ASC")?;
            let max_seq = edge("DESC")?;
            Ok(Some(SeqStats {
                min_seq,
                max_seq,
                count,
            }))
        })
    }

    fn scan_type_each(
        &self,
        resource_type: &str,
        as_of: i64,
        bounds: SeqBounds,
        f: &mut dyn FnMut(ScanRow<'_>) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let Some(type_no) = self.type_no(resource_type)? else {
            return Ok(0);
        };
        let upper = bounds.up_to.min(as_of);
        if upper <= bounds.after {
            return Ok(0);
        }
        // Keyset pages of SCAN_PAGE_ROWS, each its own short statement (no transaction stays
        // open across pages, so a long export holds back no vacuum), rows handed to `f` as they
        // arrive. The snapshot is `as_of`, not a database snapshot, so pages read at different
        // moments still show one snapshot. One connection for the whole scan.
        self.pool.run(|c| {
            let stmt = c.prepare(
                "SELECT k, seq, id, version, last_updated, json FROM resource_versions
                 WHERE k > $1 AND k <= $2 AND deleted = 0
                 AND (superseded_seq IS NULL OR superseded_seq > $3) ORDER BY k LIMIT $4",
            )?;
            let hi = key(type_no, upper);
            let mut after_k = key(type_no, bounds.after);
            let mut n = 0u64;
            loop {
                let params: [&(dyn ToSql + Sync); 4] = [&after_k, &hi, &as_of, &SCAN_PAGE_ROWS];
                let mut rows = c.query_raw(&stmt, params.iter().copied())?;
                let mut in_page = 0i64;
                let mut last_k = after_k;
                while let Some(r) = rows.next()? {
                    in_page += 1;
                    last_k = r.try_get(0)?;
                    let json: Option<&[u8]> = r.try_get(5)?;
                    n += 1;
                    let row = ScanRow {
                        seq: r.try_get(1)?,
                        id: r.try_get(2)?,
                        version: r.try_get(3)?,
                        last_updated: r.try_get(4)?,
                        json: json.unwrap_or_default(),
                    };
                    if f(row).is_break() {
                        return Ok(n);
                    }
                }
                if in_page < SCAN_PAGE_ROWS {
                    return Ok(n);
                }
                after_k = last_k;
            }
        })
    }

    fn deleted_since(
        &self,
        resource_type: &str,
        since_seq: i64,
        as_of: i64,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Tombstone>, StoreError> {
        self.pool.run(|c| {
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Ok(Vec::new());
            };
            let lo = since_seq.max(after_seq);
            if as_of <= lo || limit == 0 {
                return Ok(Vec::new());
            }
            let rows = c.query(
                "SELECT seq, id, version, last_updated FROM resource_versions
                 WHERE k > $1 AND k <= $2 AND deleted = 1
                 AND (superseded_seq IS NULL OR superseded_seq > $3) ORDER BY k LIMIT $4",
                &[
                    &key(type_no, lo),
                    &key(type_no, as_of),
                    &as_of,
                    &sql_limit(limit),
                ],
            )?;
            rows.into_iter()
                .map(|r| {
                    Ok(Tombstone {
                        resource_type: resource_type.to_string(),
                        seq: r.try_get(0)?,
                        id: r.try_get(1)?,
                        version: r.try_get(2)?,
                        last_updated: r.try_get(3)?,
                    })
                })
                .collect()
        })
    }

    fn list_type(
        &self,
        resource_type: &str,
        filter: &ListFilter,
        count: usize,
        after_seq: Option<i64>,
    ) -> Result<ListPage, StoreError> {
        self.pool.run(|c| {
            let empty = ListPage {
                resources: Vec::new(),
                next_after_seq: None,
            };
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Ok(empty);
            };
            let Some((lo, hi)) = list_bounds(c, filter, after_seq)? else {
                return Ok(empty);
            };
            let to_resource = |r: &::postgres::Row| -> Result<StoredResource, StoreError> {
                Ok(StoredResource {
                    resource_type: resource_type.to_string(),
                    seq: r.try_get(0)?,
                    id: r.try_get(1)?,
                    version: r.try_get(2)?,
                    last_updated: r.try_get(3)?,
                    json: r.try_get(4)?,
                })
            };
            let mut resources: Vec<StoredResource> = Vec::new();
            match &filter.ids {
                Some(ids) => {
                    let mut seen = std::collections::HashSet::new();
                    let unique: Vec<&str> = ids
                        .iter()
                        .map(String::as_str)
                        .filter(|id| seen.insert(*id))
                        .collect();
                    let rows = c.query(
                        "SELECT seq, id, version, last_updated, json, deleted FROM (
                           SELECT DISTINCT ON (id) seq, id, version, last_updated, json, deleted
                           FROM resource_versions WHERE type_no = $1 AND id = ANY($2)
                           ORDER BY id, version DESC) cur
                         WHERE deleted = 0 AND seq > $3 AND seq <= $4 ORDER BY seq",
                        &[&type_no, &unique, &lo, &hi],
                    )?;
                    for r in rows.iter().take(count.saturating_add(1)) {
                        resources.push(to_resource(r)?);
                    }
                }
                None => {
                    let rows = c.query(
                        "SELECT seq, id, version, last_updated, json FROM resource_versions
                         WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0
                         ORDER BY k LIMIT $3",
                        &[
                            &key(type_no, lo),
                            &key(type_no, hi),
                            &sql_limit(count.saturating_add(1)),
                        ],
                    )?;
                    for r in &rows {
                        resources.push(to_resource(r)?);
                    }
                }
            }
            let more = resources.len() > count;
            resources.truncate(count);
            let next_after_seq = if more {
                resources.last().map(|r| r.seq)
            } else {
                None
            };
            Ok(ListPage {
                resources,
                next_after_seq,
            })
        })
    }

    fn count_list(&self, resource_type: &str, filter: &ListFilter) -> Result<u64, StoreError> {
        self.pool.run(|c| {
            let Some(type_no) = self.lookup_type(c, resource_type)? else {
                return Ok(0);
            };
            let Some((lo, hi)) = list_bounds(c, filter, None)? else {
                return Ok(0);
            };
            let n: i64 = match &filter.ids {
                Some(ids) => {
                    let mut seen = std::collections::HashSet::new();
                    let unique: Vec<&str> = ids
                        .iter()
                        .map(String::as_str)
                        .filter(|id| seen.insert(*id))
                        .collect();
                    c.query_one(
                        "SELECT count(*) FROM (
                           SELECT DISTINCT ON (id) seq, deleted
                           FROM resource_versions WHERE type_no = $1 AND id = ANY($2)
                           ORDER BY id, version DESC) cur
                         WHERE deleted = 0 AND seq > $3 AND seq <= $4",
                        &[&type_no, &unique, &lo, &hi],
                    )?
                    .try_get(0)?
                }
                None => c
                    .query_one(
                        "SELECT count(*) FROM resource_versions
                         WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0",
                        &[&key(type_no, lo), &key(type_no, hi)],
                    )?
                    .try_get(0)?,
            };
            Ok(n.max(0) as u64)
        })
    }

    fn stored_bytes(&self) -> Result<u64, StoreError> {
        self.pool.run(|c| {
            let n: i64 = c
                .query_one("SELECT pg_database_size(current_database())", &[])?
                .try_get(0)?;
            Ok(n.max(0) as u64)
        })
    }

    fn suspend_index_upkeep(&self) -> Result<bool, StoreError> {
        if self.indexer.is_none() {
            return Ok(false);
        }
        self.pool.run(|c| {
            with_schema_lock(c, |c| {
                let mut tx = c.transaction()?;
                for (name, _) in VALUE_INDEXES {
                    tx.batch_execute(&format!("DROP INDEX IF EXISTS {name}"))?;
                }
                for (_, name) in k_indexes() {
                    tx.batch_execute(&format!("DROP INDEX IF EXISTS {name}"))?;
                }
                tx.commit()?;
                self.upkeep_suspended
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(true)
            })
        })
    }

    fn resume_index_upkeep(&self) -> Result<(), StoreError> {
        // The deferred deletions, the `k` and value indexes, then fresh statistics of the
        // tables a load wrote, each on two connections at once (the server builds and samples a
        // table on one core; a second connection keeps a second core busy). The JSON column
        // takes no part in ANALYZE: no plan filters on it, and sampling it would read and sort
        // 30,000 documents. The sample is [`LOAD_STATISTICS_TARGET`]'s, not the default's.
        self.pool.run(|c| {
            with_schema_lock(c, |c| build_value_indexes(&self.pool.target, c))?;
            self.upkeep_suspended
                .store(false, std::sync::atomic::Ordering::Relaxed);
            let target = format!("SET default_statistics_target = {LOAD_STATISTICS_TARGET}; ");
            let mut statements = vec![format!(
                "{target}ANALYZE resource_versions ({RV_ANALYZE_COLUMNS})"
            )];
            statements.extend(INDEX_TABLES.iter().map(|t| format!("{target}ANALYZE {t}")));
            statements.push(format!("{target}ANALYZE transactions"));
            run_on_two_connections(&self.pool.target, c, statements, false)?;
            c.batch_execute("RESET default_statistics_target")?;
            Ok(())
        })
    }

    fn set_indexes_stale(&self, stale: bool) -> Result<(), StoreError> {
        PgStore::set_indexes_stale(self, stale)
    }

    fn indexes_stale(&self) -> Result<bool, StoreError> {
        PgStore::indexes_stale(self)
    }

    fn jobs(&self) -> Result<Arc<dyn crate::JobQueue>, crate::QueueError> {
        Ok(self.jobs.clone())
    }

    fn pool_stats(&self) -> Vec<crate::PoolStats> {
        vec![self.pool.stats("store"), self.jobs.pool_stats()]
    }

    fn shared_state(&self) -> Option<Arc<dyn crate::SharedState>> {
        Some(self.jobs.clone())
    }

    fn reindex(&self, resource_type: Option<&str>) -> Result<u64, StoreError> {
        self.pool.run(|c| {
            let types: Vec<(String, i64)> = c
                .query("SELECT name, type_no FROM types ORDER BY name", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut total = 0u64;
            for (name, type_no) in types {
                if resource_type.is_some_and(|t| t != name) {
                    continue;
                }
                let mut tx = c.transaction()?;
                // Under the write lock: no version changes while this type is rebuilt.
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
                let (lo, hi) = (key(type_no, 0), key(type_no, MAX_SEQ));
                for table in INDEX_TABLES {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE k > $1 AND k <= $2"),
                        &[&lo, &hi],
                    )?;
                }
                if let Some(indexer) = &self.indexer {
                    let mut after = lo;
                    loop {
                        let rows = tx.query(
                            "SELECT k, json FROM resource_versions
                             WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0
                             ORDER BY k LIMIT $3",
                            &[&after, &hi, &SCAN_PAGE_ROWS],
                        )?;
                        let mut batch: Vec<(i64, i64, Vec<IndexEntry>)> =
                            Vec::with_capacity(rows.len());
                        for r in &rows {
                            let k: i64 = r.try_get(0)?;
                            let json: Option<&[u8]> = r.try_get(1)?;
                            let value: Value = serde_json::from_slice(json.unwrap_or_default())
                                .map_err(|e| {
                                    StoreError::Corrupt(format!(
                                        "stored {name} row {k} is not JSON: {e}"
                                    ))
                                })?;
                            batch.push((type_no, k, indexer.entries(&name, &value)));
                            after = k;
                        }
                        let items: Vec<(i64, i64, &[IndexEntry])> = batch
                            .iter()
                            .map(|(t, k, e)| (*t, *k, e.as_slice()))
                            .collect();
                        copy_index_rows(&mut tx, &items)?;
                        total += rows.len() as u64;
                        if (rows.len() as i64) < SCAN_PAGE_ROWS {
                            break;
                        }
                    }
                }
                tx.commit()?;
            }
            Ok(total)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        assert_eq!(
            take_query_param(
                "postgres://h/db?sslmode=require&sslrootcert=/ca.pem",
                "sslrootcert"
            ),
            (
                "postgres://h/db?sslmode=require".to_string(),
                Some("/ca.pem".to_string())
            )
        );
        assert_eq!(
            take_query_param("postgres://h/db?sslrootcert=/ca.pem", "sslrootcert"),
            ("postgres://h/db".to_string(), Some("/ca.pem".to_string()))
        );
        assert_eq!(
            take_query_param("postgres://h/db", "sslrootcert"),
            ("postgres://h/db".to_string(), None)
        );
    }

    #[test]
    fn targets_name_host_and_port_without_credentials() {
        let t = Target::parse(
            "postgres://fh:s3cret@db.example:6543/fhir?sslmode=require&sslrootcert=/x.pem",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(t.display, "db.example:6543");
        assert_eq!(t.root_cert.as_deref(), Some("/x.pem"));
        assert_eq!(
            t.config.get_ssl_mode(),
            ::postgres::config::SslMode::Require
        );
        let t = Target::parse("postgresql://db/fhir", Duration::from_secs(1)).unwrap();
        assert_eq!(t.display, "db:5432");
        assert_eq!(
            t.config.get_ssl_mode(),
            ::postgres::config::SslMode::Disable
        );
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&Duration::from_secs(1))
        );
        assert_eq!(redact("postgres://u:pw@h:1/db?x=1"), "h:1");
        let e = match Target::parse("postgres://u:pw@h:port/db", Duration::from_secs(1)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a bad port parsed"),
        };
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn keys_fold_the_type_over_the_seq() {
        assert_eq!(key(1, 5), (1 << 40) | 5);
        assert!(key(1, MAX_SEQ) < key(2, 0));
        assert_eq!(key(3, i64::MAX), key(3, MAX_SEQ));
    }
}
