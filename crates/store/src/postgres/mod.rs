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
//! params(param_no bigint PRIMARY KEY, name text UNIQUE)      -- search parameter numbers
//! idx_token(type_no, param_no, system, code, k) ... idx_uri(type_no, param_no, uri, k)
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
//!
//! # One clock
//!
//! The nodes sharing a database may disagree about the time. Every instant the store stamps
//! (`lastUpdated` of a write, its history entry or tombstone, the `transactions` row `_since`
//! and `_lastUpdated` map to seqs) is the database server's `clock_timestamp()`, read in the
//! write's transaction with the watermark, and [`Store::now_ms`] (what a `_since` is checked
//! against, an empty store's `transactionTime`) reads the same clock. A node's own clock never
//! reaches a stored instant: with it, a node behind stamped each write at the previous write's
//! instant plus 1 ms (the monotonic guard), so its resources looked older than they were and a
//! `_since` between missed them, and another node's `transactionTime` was "in the future" to it.
//! The guard (`max(now, last + 1 ms)`) stays, so `lastUpdated` grows with seq even if the
//! database's clock steps back.
//!
//! # Modules
//!
//! This module holds [`PgStore`], its options and open, the migrations, the type-number cache
//! and the [`Store`] impl, whose methods delegate to one module per concept: `target` (the parsed
//! URL, TLS, error text and redaction), `pool` (the connection pool), `schema` (migrations under
//! the advisory lock, building the index tables' indexes), `writes` (the write transaction, binary
//! `COPY`), `reads` (read, vread, history), `scans` (as-of counts and keyset scans, listings),
//! `watermark` (the watermark, instants and seqs), `index_upkeep` (suspend/resume, reindex),
//! `search` (search plan execution), `jobs` (the export job queue and shared state) and
//! `statements` (each pooled connection's prepared statements, which the others' text
//! statements go through).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use statements::{Conn, Session};

mod conditions;
mod index_upkeep;
mod jobs;
mod pool;
mod reads;
mod scans;
mod schema;
mod search;
mod statements;
mod target;
mod watermark;
mod writes;

pub use jobs::PgJobQueue;

pub(crate) use pool::Pool;
use schema::{build_value_indexes, migrate, with_schema_lock};
pub(crate) use target::Target;

use crate::index_tables::ParamNumbers;
use crate::stamp::PreparedResource;
use crate::{Indexer, Store, StoreError};

use crate::ops::check_update;
/// `pg_advisory_xact_lock` key held by every write transaction (ASCII "fhhose" + 1).
pub const WRITE_LOCK: i64 = 0x0066_6868_6f73_6501;
/// `pg_advisory_lock` key held while migrations are applied.
pub const MIGRATION_LOCK: i64 = 0x0066_6868_6f73_6502;
/// `pg_advisory_lock_shared` key held by every session building the index tables' indexes; a
/// build first waits for it exclusively (see `schema::run_on_two_connections`).
pub const BUILD_LOCK: i64 = 0x0066_6868_6f73_6503;
/// `pg_advisory_lock` key held by a full reindex from start to swap: one at a time in the
/// cluster, and the `_rebuild` tables belong to its holder.
pub const REINDEX_LOCK: i64 = 0x0066_6868_6f73_6504;
/// `pg_advisory_xact_lock` key held while a kick-off counts the active jobs and records its own
/// (`jobs`). Every key of the store is here, each its own: a kick-off must never wait for a
/// bulk load's index build (it did while the two shared one key; `lock_key_tests`).
pub const ADMISSION_LOCK: i64 = 0x0066_6868_6f73_6505;
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
    (5, "search parameters by number in index rows", SCHEMA_V5),
    (6, "the owner of a deletion hold", jobs::SCHEMA_V6),
    (
        7,
        "the start of a work item's wait for space",
        jobs::SCHEMA_V7,
    ),
    (
        8,
        "export expiry instants, a complete export's parts folder left to remove",
        jobs::SCHEMA_V8,
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

/// Migration 5 (issue 24): index rows name their search parameter by number (`param_no`,
/// numbered in the new `params` table in the order of the codes) instead of by its code; each
/// index table is rewritten. Its `k` and value indexes are built after the migration by
/// [`schema::build_value_indexes`], as after a bulk load.
const SCHEMA_V5: &str = r#"
CREATE TABLE params(
  param_no bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  name text COLLATE "C" NOT NULL UNIQUE);
INSERT INTO params(name) SELECT param FROM (
  SELECT param FROM idx_token
  UNION SELECT param FROM idx_token_text
  UNION SELECT param FROM idx_string
  UNION SELECT param FROM idx_date
  UNION SELECT param FROM idx_number
  UNION SELECT param FROM idx_quantity
  UNION SELECT param FROM idx_reference
  UNION SELECT param FROM idx_reference_identifier
  UNION SELECT param FROM idx_uri) AS p ORDER BY param;
DROP INDEX IF EXISTS idx_token_k; DROP INDEX IF EXISTS idx_token_value;
ALTER TABLE idx_token RENAME TO idx_token_v1;
CREATE TABLE idx_token(type_no bigint NOT NULL, param_no bigint NOT NULL,
  system text COLLATE "C", code text COLLATE "C", k bigint NOT NULL);
INSERT INTO idx_token(type_no, param_no, system, code, k)
  SELECT o.type_no, p.param_no, system, code, o.k FROM idx_token_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_token_v1;
DROP INDEX IF EXISTS idx_token_text_k; DROP INDEX IF EXISTS idx_token_text_value;
ALTER TABLE idx_token_text RENAME TO idx_token_text_v1;
CREATE TABLE idx_token_text(type_no bigint NOT NULL, param_no bigint NOT NULL,
  text text COLLATE "C" NOT NULL, k bigint NOT NULL);
INSERT INTO idx_token_text(type_no, param_no, text, k)
  SELECT o.type_no, p.param_no, text, o.k FROM idx_token_text_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_token_text_v1;
DROP INDEX IF EXISTS idx_string_k; DROP INDEX IF EXISTS idx_string_value;
ALTER TABLE idx_string RENAME TO idx_string_v1;
CREATE TABLE idx_string(type_no bigint NOT NULL, param_no bigint NOT NULL,
  normalized text COLLATE "C" NOT NULL, exact text COLLATE "C" NOT NULL, k bigint NOT NULL);
INSERT INTO idx_string(type_no, param_no, normalized, exact, k)
  SELECT o.type_no, p.param_no, normalized, exact, o.k FROM idx_string_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_string_v1;
DROP INDEX IF EXISTS idx_date_k; DROP INDEX IF EXISTS idx_date_value;
ALTER TABLE idx_date RENAME TO idx_date_v1;
CREATE TABLE idx_date(type_no bigint NOT NULL, param_no bigint NOT NULL,
  lo bigint NOT NULL, hi bigint NOT NULL, k bigint NOT NULL);
INSERT INTO idx_date(type_no, param_no, lo, hi, k)
  SELECT o.type_no, p.param_no, lo, hi, o.k FROM idx_date_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_date_v1;
DROP INDEX IF EXISTS idx_number_k; DROP INDEX IF EXISTS idx_number_value;
ALTER TABLE idx_number RENAME TO idx_number_v1;
CREATE TABLE idx_number(type_no bigint NOT NULL, param_no bigint NOT NULL,
  value double precision NOT NULL, k bigint NOT NULL);
INSERT INTO idx_number(type_no, param_no, value, k)
  SELECT o.type_no, p.param_no, value, o.k FROM idx_number_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_number_v1;
DROP INDEX IF EXISTS idx_quantity_k; DROP INDEX IF EXISTS idx_quantity_value;
ALTER TABLE idx_quantity RENAME TO idx_quantity_v1;
CREATE TABLE idx_quantity(type_no bigint NOT NULL, param_no bigint NOT NULL,
  value double precision NOT NULL, system text COLLATE "C", code text COLLATE "C", unit text COLLATE "C", k bigint NOT NULL);
INSERT INTO idx_quantity(type_no, param_no, value, system, code, unit, k)
  SELECT o.type_no, p.param_no, value, system, code, unit, o.k FROM idx_quantity_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_quantity_v1;
DROP INDEX IF EXISTS idx_reference_k; DROP INDEX IF EXISTS idx_reference_value; DROP INDEX IF EXISTS idx_reference_url;
ALTER TABLE idx_reference RENAME TO idx_reference_v1;
CREATE TABLE idx_reference(type_no bigint NOT NULL, param_no bigint NOT NULL,
  target_type text COLLATE "C", target_id text COLLATE "C", url text COLLATE "C", k bigint NOT NULL);
INSERT INTO idx_reference(type_no, param_no, target_type, target_id, url, k)
  SELECT o.type_no, p.param_no, target_type, target_id, url, o.k FROM idx_reference_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_reference_v1;
DROP INDEX IF EXISTS idx_reference_identifier_k; DROP INDEX IF EXISTS idx_reference_identifier_value;
ALTER TABLE idx_reference_identifier RENAME TO idx_reference_identifier_v1;
CREATE TABLE idx_reference_identifier(type_no bigint NOT NULL, param_no bigint NOT NULL,
  system text COLLATE "C", value text COLLATE "C", k bigint NOT NULL);
INSERT INTO idx_reference_identifier(type_no, param_no, system, value, k)
  SELECT o.type_no, p.param_no, system, value, o.k FROM idx_reference_identifier_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_reference_identifier_v1;
DROP INDEX IF EXISTS idx_uri_k; DROP INDEX IF EXISTS idx_uri_value;
ALTER TABLE idx_uri RENAME TO idx_uri_v1;
CREATE TABLE idx_uri(type_no bigint NOT NULL, param_no bigint NOT NULL,
  uri text COLLATE "C" NOT NULL, k bigint NOT NULL);
INSERT INTO idx_uri(type_no, param_no, uri, k)
  SELECT o.type_no, p.param_no, uri, o.k FROM idx_uri_v1 o JOIN params p ON p.name = o.param;
DROP TABLE idx_uri_v1;
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

/// [`Store`] on a PostgreSQL database.
pub struct PgStore {
    pub(crate) pool: Pool,
    types: RwLock<HashMap<String, i64>>,
    /// The numbers of the search parameter codes in the index rows.
    params: ParamNumbers,
    indexer: Option<Arc<dyn Indexer>>,
    /// The export job queue (its own small pool on the same database).
    jobs: Arc<PgJobQueue>,
    /// Set between [`Store::suspend_index_upkeep`] and [`Store::resume_index_upkeep`]: the
    /// index tables have no `k` index, so the index rows of superseded versions stay until the
    /// resume deletes them in bulk (searches read current versions only and never see them).
    upkeep_suspended: std::sync::atomic::AtomicBool,
    /// This node's condition locks, taken before the database's ([`conditions`]).
    condition_locks: crate::conditions::ProcessLocks,
    /// Connections whose sessions hold conditions' advisory locks (as many as the store pool).
    condition_pool: Pool,
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
        let condition_pool = Pool::new(target.clone(), options.pool_size);
        let pool = Pool::new(target, options.pool_size);
        let store = PgStore {
            pool,
            types: RwLock::new(HashMap::new()),
            params: ParamNumbers::default(),
            indexer: options.indexer,
            jobs,
            upkeep_suspended: std::sync::atomic::AtomicBool::new(false),
            condition_locks: Default::default(),
            condition_pool,
        };
        store.pool.run(|c| {
            with_schema_lock(c, |c| {
                migrate(c)?;
                // The tables of a reindex killed half-way, unless one is running.
                let free: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&REINDEX_LOCK])?
                    .get(0);
                if free {
                    let dropped = index_upkeep::drop_rebuild_tables(c);
                    c.execute("SELECT pg_advisory_unlock($1)", &[&REINDEX_LOCK])?;
                    dropped?;
                }
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

    fn load_types(&self) -> Result<(), StoreError> {
        let rows = self.pool.read(|c| {
            Ok(c.query("SELECT name, type_no FROM types", &[])?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>())
        })?;
        self.types
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(rows);
        let params = self.pool.read(|c| {
            Ok(c.query("SELECT name, param_no FROM params", &[])?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>())
        })?;
        self.params.extend(params);
        Ok(())
    }

    /// The number of a search parameter code in the index rows; `None` if no index row of it was
    /// ever written.
    fn lookup_param(&self, c: &mut impl Session, code: &str) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.params.get(code) {
            return Ok(Some(no));
        }
        let no: Option<i64> = c
            .query_opt("SELECT param_no FROM params WHERE name = $1", &[&code])?
            .map(|r| r.get(0));
        if let Some(no) = no {
            self.params.extend([(code.to_string(), no)]);
        }
        Ok(no)
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
        self.pool.read(|c| self.lookup_type(c, resource_type))
    }

    fn lookup_type(&self, c: &mut impl Session, name: &str) -> Result<Option<i64>, StoreError> {
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

    fn type_name_of(&self, c: &mut impl Session, type_no: i64) -> Result<String, StoreError> {
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
    fn register_types(&self, c: &mut Conn, names: &[&str]) -> Result<(), StoreError> {
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
        self.pool.read(|c| {
            Ok(
                c.query_opt("SELECT 1 FROM store_meta WHERE key = 'indexes_stale'", &[])?
                    .is_some(),
            )
        })
    }

    fn registered(&self, name: &str) -> Result<i64, StoreError> {
        self.cached_type(name)
            .ok_or_else(|| StoreError::Corrupt(format!("type {name} not registered")))
    }
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

    crate::forward_to_backend_modules!();

    fn lock_conditions(
        &self,
        keys: &[crate::ConditionKey],
        wait: Duration,
    ) -> Result<crate::ConditionGuard<'_>, StoreError> {
        conditions::lock_conditions(self, keys, wait)
    }

    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError> {
        self.pool
            .read(|c| watermark::seq_at_or_after(c, instant_ms))
    }

    fn now_ms(&self) -> Result<i64, StoreError> {
        self.pool.read(watermark::database_now_ms)
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
        vec![
            self.pool.stats("store"),
            self.jobs.pool_stats(),
            self.condition_pool.stats("conditions"),
        ]
    }

    fn shared_state(&self) -> Option<Arc<dyn crate::SharedState>> {
        Some(self.jobs.clone())
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::{MAX_SEQ, key};

    #[test]
    fn keys_fold_the_type_over_the_seq() {
        assert_eq!(key(1, 5), (1 << 40) | 5);
        assert!(key(1, MAX_SEQ) < key(2, 0));
        assert_eq!(key(3, i64::MAX), key(3, MAX_SEQ));
    }
}

#[cfg(test)]
mod lock_key_tests {
    #[test]
    fn every_advisory_lock_key_is_its_own() {
        use super::{ADMISSION_LOCK, BUILD_LOCK, MIGRATION_LOCK, REINDEX_LOCK, WRITE_LOCK};
        let keys = [
            WRITE_LOCK,
            MIGRATION_LOCK,
            BUILD_LOCK,
            REINDEX_LOCK,
            ADMISSION_LOCK,
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b, "two advisory locks share the key {a:#x}");
            }
        }
    }
}
