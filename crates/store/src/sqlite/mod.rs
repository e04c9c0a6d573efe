//! The SQLite implementation of [`Store`].
//!
//! # Schema (`schema_version` 1, in table `store_meta`)
//!
//! ```sql
//! types(type_no INTEGER PRIMARY KEY, name TEXT UNIQUE)      -- resource type numbers
//! transactions(lu_ms INTEGER PRIMARY KEY,                    -- lastUpdated of the transaction (ms)
//!              first_seq INTEGER, last_seq INTEGER UNIQUE)   -- its consecutive seqs
//! resource_versions(
//!   k INTEGER PRIMARY KEY,        -- (type_no << 40) | seq: rows of one type are clustered in seq order
//!   seq INTEGER UNIQUE,           -- global version sequence
//!   type_no INTEGER, id TEXT, version INTEGER,
//!   last_updated TEXT,            -- meta.lastUpdated as stored in the JSON
//!   method INTEGER,               -- 0 POST (create), 1 PUT (update), 2 DELETE
//!   deleted INTEGER,              -- 1 for a tombstone (json NULL)
//!   superseded_seq INTEGER NULL,  -- seq of the next version of this resource, once there is one
//!   json BLOB)                    -- compact JSON, meta included
//!   -- indexes: (type_no, id, version) UNIQUE; (seq) UNIQUE;
//!   --          rv_current (k) WHERE superseded_seq IS NULL AND deleted = 0;
//!   --          rv_superseded (superseded_seq) WHERE superseded_seq IS NOT NULL
//! ```
//!
//! The snapshot "as of S" of a type is `k BETWEEN base+1 AND base+S AND deleted = 0 AND
//! (superseded_seq IS NULL OR superseded_seq > S)` with `base = type_no << 40`: one clustered range
//! scan, which is why the type is folded into the rowid instead of using a `WITHOUT ROWID` table
//! (rows average ~1.3 kB, too large for a clustered composite key to stay compact).
//!
//! Search index tables, one per [`IndexValue`] kind, each row `(type_no, param, <values>, k)` where
//! `k` is the `resource_versions.k` of the indexed (current) version; join with
//! `resource_versions.k = idx.k`:
//!
//! ```sql
//! idx_token(type_no, param, system, code, k)
//! idx_token_text(type_no, param, text, k)
//! idx_string(type_no, param, normalized, exact, k)
//! idx_date(type_no, param, lo, hi, k)                 -- [lo, hi) ms since the epoch
//! idx_number(type_no, param, value REAL, k)
//! idx_quantity(type_no, param, value REAL, system, code, unit, k)
//! idx_reference(type_no, param, target_type, target_id, url, k)
//! idx_reference_identifier(type_no, param, system, value, k)
//! idx_uri(type_no, param, uri, k)
//! ```
//! Each has an index on `(type_no, param, <first value columns>, k)` and one on `(k)`. `k` ends the
//! value index so that an equality lookup yields rows in `k` order (search pages stop early) and
//! the index covers the search's `k` lists.

use std::collections::{HashMap, HashSet};
use std::ops::{ControlFlow, Deref};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use rusqlite::config::DbConfig;
use rusqlite::{
    CachedStatement, Connection, OpenFlags, OptionalExtension, TransactionBehavior, params,
};
use serde_json::Value;

mod jobs;
mod search;

pub use jobs::{JOBS_FILE_NAME, JOBS_SCHEMA_VERSION, SqliteJobQueue};

use crate::jobs::{JobQueue, QueueError};
use crate::stamp::{PreparedResource, format_instant_ms};
use crate::{
    DataDirLock, HistoryEntry, HistoryMethod, HistoryPage, HistoryQuery, HistoryScope, IndexEntry,
    IndexValue, Indexer, ListFilter, ListPage, ScanRow, SeqBounds, SeqStats, Store, StoreError,
    StoredResource, Tombstone, Watermark, WriteOp, WriteOutcome, WriteStatus,
};

/// The schema version this code writes and reads.
pub const SCHEMA_VERSION: i64 = 1;
/// Name of the database file inside a data directory.
pub const DB_FILE_NAME: &str = "fhirhose.db";
use crate::index_tables::{INDEX_TABLES, VALUE_INDEXES};
use crate::ops::{
    Body, DEFAULT_HISTORY_COUNT, MAX_SEQ, Prepared, check_update, key, method_code, method_of,
    prepare,
};

/// Options of [`SqliteStore`].
#[derive(Clone)]
pub struct SqliteOptions {
    /// Number of read-only connections in the pool (at least 1).
    pub readers: usize,
    /// The search indexer; `None` writes no index rows.
    pub indexer: Option<Arc<dyn Indexer>>,
    /// Page cache per connection, in KiB.
    pub cache_kib: i64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            indexer: None,
            cache_kib: 64 * 1024,
        }
    }
}

impl std::fmt::Debug for SqliteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOptions")
            .field("readers", &self.readers)
            .field("indexer", &self.indexer.is_some())
            .field("cache_kib", &self.cache_kib)
            .finish()
    }
}

/// [`Store`] on one SQLite database file in WAL mode: one writer connection behind a mutex, a pool
/// of read-only connections (readers never wait for the writer).
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Writer>,
    readers: ReaderPool,
    types: RwLock<HashMap<String, i64>>,
    indexer: Option<Arc<dyn Indexer>>,
    /// The export job queue in `exports.db` beside the database file, opened on first use
    /// ([`jobs`] says why it is a separate file).
    jobs: Mutex<Option<Arc<SqliteJobQueue>>>,
    _lock: Option<DataDirLock>,
}

struct Writer {
    conn: Connection,
    /// Last committed seq.
    last_seq: i64,
    /// lastUpdated (ms) of the last committed transaction.
    last_ms: i64,
}

impl SqliteStore {
    /// Lock the data directory `dir` (creating it) and open `dir/fhirhose.db`. This is what
    /// `serve` and `load --data-dir` use; fails with [`StoreError::Locked`] while another process
    /// holds the directory. The lock is released when the store is dropped.
    pub fn open_data_dir(dir: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let lock = DataDirLock::acquire(dir)?;
        let mut store = Self::open(&dir.join(DB_FILE_NAME), options)?;
        store._lock = Some(lock);
        Ok(store)
    }

    /// Open (creating if needed) the database file at `path` without taking a directory lock.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path)?;
        configure(&conn, options.cache_kib)?;
        let created = create_schema(&conn)?;
        let rebuilt = build_value_indexes(&conn)?;
        if rebuilt > 0 && !created {
            tracing::warn!(
                rebuilt,
                db = %path.display(),
                "rebuilt search value indexes that an interrupted bulk load had left out"
            );
        }
        let (last_seq, last_ms): (i64, i64) = conn.query_row(
            "SELECT coalesce(max(last_seq), 0), coalesce(max(lu_ms), 0) FROM transactions",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut types = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT name, type_no FROM types")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (name, no) = row?;
                types.insert(name, no);
            }
        }
        let mut readers = Vec::new();
        for _ in 0..options.readers.max(1) {
            let r = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )?;
            configure_reader(&r, options.cache_kib)?;
            readers.push(r);
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Mutex::new(Writer {
                conn,
                last_seq,
                last_ms,
            }),
            readers: ReaderPool {
                conns: Mutex::new(readers),
                available: Condvar::new(),
            },
            types: RwLock::new(types),
            indexer: options.indexer,
            jobs: Mutex::new(None),
            _lock: None,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` with a pooled read-only connection, for queries the trait does not cover (the
    /// search crate's index queries). See the module docs for the schema.
    pub fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.get();
        f(&conn)
    }

    /// [`SqliteStore::with_reader`] whose statements stop as soon as `stop` answers true (a
    /// client that went away, a time limit): SQLite asks it every thousand virtual-machine
    /// steps through a progress handler, and it is asked once before `f` starts. A stopped
    /// statement fails with `SQLITE_INTERRUPT` ([`is_interrupted`]). The handler is removed
    /// before the connection goes back to the pool, also when `f` panics.
    pub fn with_reader_until<T>(
        &self,
        stop: &Arc<dyn Fn() -> bool + Send + Sync>,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if stop() {
            return Err(interrupted());
        }
        struct Handler<'p, 'a>(&'p mut PooledConn<'a>);
        impl Drop for Handler<'_, '_> {
            fn drop(&mut self) {
                if let Some(conn) = self.0.conn.as_mut() {
                    let _ = conn.progress_handler(0, None::<fn() -> bool>);
                }
            }
        }
        let mut pooled = self.readers.get();
        let stop = Arc::clone(stop);
        if let Some(conn) = pooled.conn.as_mut() {
            conn.progress_handler(1000, Some(move || stop()))?;
        }
        let handler = Handler(&mut pooled);
        f(&*handler.0)
    }

    /// The type number used in `k` and in the index tables; `None` if the type was never written.
    pub fn type_no(&self, resource_type: &str) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.cached_type(resource_type) {
            return Ok(Some(no));
        }
        let conn = self.readers.get();
        self.lookup_type(&conn, resource_type)
    }

    fn cached_type(&self, name: &str) -> Option<i64> {
        self.types
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    fn lookup_type(&self, conn: &Connection, name: &str) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.cached_type(name) {
            return Ok(Some(no));
        }
        let no: Option<i64> = conn
            .query_row("SELECT type_no FROM types WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(no) = no {
            self.types
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), no);
        }
        Ok(no)
    }

    fn type_name_of(&self, conn: &Connection, type_no: i64) -> Result<String, StoreError> {
        {
            let types = self.types.read().unwrap_or_else(|e| e.into_inner());
            if let Some((name, _)) = types.iter().find(|(_, n)| **n == type_no) {
                return Ok(name.clone());
            }
        }
        conn.query_row(
            "SELECT name FROM types WHERE type_no = ?1",
            [type_no],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::Corrupt(format!("unknown type number {type_no}")))
    }

    /// Register the types of `ops` that have no number yet, in their own committed transaction
    /// (a type row without resources is harmless, and this keeps the cache valid if the write
    /// itself rolls back).
    fn register_types(&self, w: &mut Writer, names: &[&str]) -> Result<(), StoreError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| self.cached_type(n).is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut added = Vec::new();
        for name in missing {
            let existing: Option<i64> = tx
                .query_row("SELECT type_no FROM types WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            let no = match existing {
                Some(no) => no,
                None => {
                    tx.execute("INSERT INTO types(name) VALUES (?1)", [name])?;
                    tx.last_insert_rowid()
                }
            };
            added.push((name.to_string(), no));
        }
        tx.commit()?;
        let mut types = self.types.write().unwrap_or_else(|e| e.into_inner());
        types.extend(added);
        Ok(())
    }
}

/// Whether `e` is a statement stopped by the `stop` of [`SqliteStore::with_reader_until`].
pub fn is_interrupted(e: &StoreError) -> bool {
    matches!(e, StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
        if f.code == rusqlite::ErrorCode::OperationInterrupted)
}

fn interrupted() -> StoreError {
    StoreError::Sqlite(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
        None,
    ))
}

fn configure(conn: &Connection, cache_kib: i64) -> Result<(), StoreError> {
    // page_size only takes effect on a new database; 8 KiB keeps typical resources inline.
    conn.execute_batch(&format!(
        "PRAGMA page_size = 8192;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -{cache_kib};
         PRAGMA busy_timeout = 5000;"
    ))?;
    // The writer's statements are prepared once and bound per resource. Without the query
    // planner stability guarantee SQLite re-prepares a statement on every new binding whose value
    // it compares with a partial index's WHERE clause (`current_of` against `rv_current`): that
    // re-parse was a tenth of a bulk load's time. The writer's queries gain nothing from
    // value-dependent plans.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Checkpoint every 64 MiB of WAL rather than SQLite's 8 MiB: a bulk load rewrites the same
    // index pages in many transactions, and each checkpoint copies them (and fsyncs) once.
    conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
    // A WAL that grew (while a reader held an old snapshot) is cut back to this size when it is
    // reset, instead of keeping its largest size on disk.
    conn.pragma_update(None, "journal_size_limit", 64i64 * 1024 * 1024)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Readers: a quarter of the writer's page cache each, and no memory map. Their work is mostly
/// sequential scans that a large cache does not help, and mapped pages of a multi-GB database
/// would count as resident memory of the server (an export must stay within a few hundred MB).
fn configure_reader(conn: &Connection, cache_kib: i64) -> Result<(), StoreError> {
    let cache_kib = (cache_kib / 4).max(1024);
    conn.execute_batch(&format!(
        "PRAGMA cache_size = -{cache_kib};
         PRAGMA mmap_size = 0;
         PRAGMA busy_timeout = 5000;"
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS types(
  type_no INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS transactions(
  lu_ms INTEGER PRIMARY KEY,
  first_seq INTEGER NOT NULL,
  last_seq INTEGER NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS resource_versions(
  k INTEGER PRIMARY KEY,
  seq INTEGER NOT NULL,
  type_no INTEGER NOT NULL,
  id TEXT NOT NULL,
  version INTEGER NOT NULL,
  last_updated TEXT NOT NULL,
  method INTEGER NOT NULL,
  deleted INTEGER NOT NULL,
  superseded_seq INTEGER,
  json BLOB);
CREATE UNIQUE INDEX IF NOT EXISTS rv_resource ON resource_versions(type_no, id, version);
CREATE UNIQUE INDEX IF NOT EXISTS rv_seq ON resource_versions(seq);
CREATE INDEX IF NOT EXISTS rv_current ON resource_versions(k)
  WHERE superseded_seq IS NULL AND deleted = 0;
CREATE INDEX IF NOT EXISTS rv_superseded ON resource_versions(superseded_seq)
  WHERE superseded_seq IS NOT NULL;

CREATE TABLE IF NOT EXISTS idx_token(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  system TEXT, code TEXT, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_token_k ON idx_token(k);
CREATE TABLE IF NOT EXISTS idx_token_text(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  text TEXT NOT NULL, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_token_text_k ON idx_token_text(k);
CREATE TABLE IF NOT EXISTS idx_string(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  normalized TEXT NOT NULL, exact TEXT NOT NULL, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_string_k ON idx_string(k);
CREATE TABLE IF NOT EXISTS idx_date(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  lo INTEGER NOT NULL, hi INTEGER NOT NULL, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_date_k ON idx_date(k);
CREATE TABLE IF NOT EXISTS idx_number(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  value REAL NOT NULL, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_number_k ON idx_number(k);
CREATE TABLE IF NOT EXISTS idx_quantity(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  value REAL NOT NULL, system TEXT, code TEXT, unit TEXT, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_quantity_k ON idx_quantity(k);
CREATE TABLE IF NOT EXISTS idx_reference(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  target_type TEXT, target_id TEXT, url TEXT, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_reference_k ON idx_reference(k);
CREATE TABLE IF NOT EXISTS idx_reference_identifier(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  system TEXT, value TEXT, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_reference_identifier_k ON idx_reference_identifier(k);
CREATE TABLE IF NOT EXISTS idx_uri(type_no INTEGER NOT NULL, param TEXT NOT NULL,
  uri TEXT NOT NULL, k INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS idx_uri_k ON idx_uri(k);
";

/// Create the schema of a new database (returns true) or check the version of an existing one.
fn create_schema(conn: &Connection) -> Result<bool, StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS store_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    )?;
    let found: Option<String> = conn
        .query_row(
            "SELECT value FROM store_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match found {
        None => {
            conn.execute_batch(&format!("BEGIN IMMEDIATE;{SCHEMA}COMMIT;"))?;
            conn.execute(
                "INSERT INTO store_meta(key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
            return Ok(true);
        }
        Some(v) if v == SCHEMA_VERSION.to_string() => {}
        Some(v) => {
            return Err(StoreError::Corrupt(format!(
                "database schema version {v}, this build reads version {SCHEMA_VERSION}"
            )));
        }
    }
    Ok(false)
}

/// Create the [`VALUE_INDEXES`] that are missing; returns how many were. Sorting a large index
/// spills to temporary files (not to memory, as the writer's other temporary data does) and uses
/// every core; the connection's own settings are restored afterwards.
fn build_value_indexes(conn: &Connection) -> Result<usize, StoreError> {
    let present: HashSet<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx_%'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let missing: Vec<&str> = VALUE_INDEXES
        .iter()
        .filter(|(name, _)| !present.contains(*name))
        .map(|(_, ddl)| *ddl)
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let temp_store: i64 = conn.query_row("PRAGMA temp_store", [], |r| r.get(0))?;
    let threads: i64 = conn.query_row("PRAGMA threads", [], |r| r.get(0))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    conn.execute_batch(&format!(
        "PRAGMA temp_store = FILE; PRAGMA threads = {cores};"
    ))?;
    let built = (|| {
        let tx = conn.unchecked_transaction()?;
        for ddl in &missing {
            tx.execute_batch(ddl)?;
        }
        tx.commit()
    })();
    conn.execute_batch(&format!(
        "PRAGMA temp_store = {temp_store}; PRAGMA threads = {threads};"
    ))?;
    built?;
    Ok(missing.len())
}

/// The index-row inserts of one transaction, prepared once: a bulk load inserts about nine rows
/// per resource, and looking each statement up in the connection's cache by its SQL text cost a
/// tenth of the insert time.
struct IndexInserts<'c> {
    token: CachedStatement<'c>,
    token_text: CachedStatement<'c>,
    string: CachedStatement<'c>,
    date: CachedStatement<'c>,
    number: CachedStatement<'c>,
    quantity: CachedStatement<'c>,
    reference: CachedStatement<'c>,
    reference_url: CachedStatement<'c>,
    reference_identifier: CachedStatement<'c>,
    uri: CachedStatement<'c>,
}

impl<'c> IndexInserts<'c> {
    fn new(conn: &'c Connection) -> Result<Self, StoreError> {
        Ok(IndexInserts {
            token: conn.prepare_cached(
                "INSERT INTO idx_token(type_no, param, system, code, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            token_text: conn.prepare_cached(
                "INSERT INTO idx_token_text(type_no, param, text, k) VALUES (?1,?2,?3,?4)",
            )?,
            string: conn.prepare_cached(
                "INSERT INTO idx_string(type_no, param, normalized, exact, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            date: conn.prepare_cached(
                "INSERT INTO idx_date(type_no, param, lo, hi, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            number: conn.prepare_cached(
                "INSERT INTO idx_number(type_no, param, value, k) VALUES (?1,?2,?3,?4)",
            )?,
            quantity: conn.prepare_cached(
                "INSERT INTO idx_quantity(type_no, param, value, system, code, unit, k) VALUES (?1,?2,?3,?4,?5,?6,?7)",
            )?,
            reference: conn.prepare_cached(
                "INSERT INTO idx_reference(type_no, param, target_type, target_id, url, k) VALUES (?1,?2,?3,?4,NULL,?5)",
            )?,
            reference_url: conn.prepare_cached(
                "INSERT INTO idx_reference(type_no, param, target_type, target_id, url, k) VALUES (?1,?2,NULL,NULL,?3,?4)",
            )?,
            reference_identifier: conn.prepare_cached(
                "INSERT INTO idx_reference_identifier(type_no, param, system, value, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            uri: conn.prepare_cached(
                "INSERT INTO idx_uri(type_no, param, uri, k) VALUES (?1,?2,?3,?4)",
            )?,
        })
    }

    /// The rows of one stored version `k`.
    fn insert(&mut self, type_no: i64, k: i64, entries: &[IndexEntry]) -> Result<(), StoreError> {
        for e in entries {
            let p = e.param.as_str();
            match &e.value {
                IndexValue::Token { system, code } => {
                    self.token.execute(params![type_no, p, system, code, k])?
                }
                IndexValue::TokenText(text) => {
                    self.token_text.execute(params![type_no, p, text, k])?
                }
                IndexValue::String { normalized, exact } => self
                    .string
                    .execute(params![type_no, p, normalized, exact, k])?,
                IndexValue::Date { lo, hi } => self.date.execute(params![type_no, p, lo, hi, k])?,
                IndexValue::Number(value) => self.number.execute(params![type_no, p, value, k])?,
                IndexValue::Quantity {
                    value,
                    system,
                    code,
                    unit,
                } => self
                    .quantity
                    .execute(params![type_no, p, value, system, code, unit, k])?,
                IndexValue::Reference { target_type, id } => {
                    self.reference
                        .execute(params![type_no, p, target_type, id, k])?
                }
                IndexValue::ReferenceUrl(url) => {
                    self.reference_url.execute(params![type_no, p, url, k])?
                }
                IndexValue::ReferenceIdentifier { system, value } => self
                    .reference_identifier
                    .execute(params![type_no, p, system, value, k])?,
                IndexValue::Uri(uri) => self.uri.execute(params![type_no, p, uri, k])?,
            };
        }
        Ok(())
    }
}

fn delete_index_rows(conn: &Connection, k: i64) -> Result<(), StoreError> {
    for table in INDEX_TABLES {
        conn.prepare_cached(&format!("DELETE FROM {table} WHERE k = ?1"))?
            .execute([k])?;
    }
    Ok(())
}

/// The newest version of a resource, as the write path needs it.
struct Current {
    k: i64,
    version: i64,
    deleted: bool,
}

fn current_of(conn: &Connection, type_no: i64, id: &str) -> Result<Option<Current>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT k, version, deleted FROM resource_versions
             WHERE type_no = ?1 AND id = ?2 ORDER BY version DESC LIMIT 1",
        )?
        .query_row(params![type_no, id], |r| {
            Ok(Current {
                k: r.get(0)?,
                version: r.get(1)?,
                deleted: r.get::<_, i64>(2)? != 0,
            })
        })
        .optional()?)
}

impl Store for SqliteStore {
    fn search(
        &self,
        plan: &crate::plan::SearchPlan,
        stop: Option<&crate::plan::StopCheck>,
    ) -> Result<crate::plan::SearchRows, StoreError> {
        search::search(self, plan, stop)
    }

    /// Records whether the search indexes miss resources (a `load --no-index`), until a full
    /// reindex clears it.
    fn set_indexes_stale(&self, stale: bool) -> Result<(), StoreError> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if stale {
            w.conn.execute(
                "INSERT OR REPLACE INTO store_meta(key, value) VALUES ('indexes_stale', '1')",
                [],
            )?;
        } else {
            w.conn
                .execute("DELETE FROM store_meta WHERE key = 'indexes_stale'", [])?;
        }
        Ok(())
    }

    /// Checkpoints the WAL into the database and truncates it to zero bytes, when no reader
    /// needs its frames (busy otherwise: then nothing waits, and the next call tries again).
    /// Long exports read in short transactions (one per page of a scan), so that such moments
    /// come often; the export sweeper calls this periodically. Returns whether the WAL was
    /// truncated.
    fn checkpoint(&self) -> Result<bool, StoreError> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // No busy wait: the writer must not stall behind a reader for this.
        w.conn.busy_timeout(std::time::Duration::ZERO)?;
        let busy = w
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        w.conn
            .busy_timeout(std::time::Duration::from_millis(5000))?;
        Ok(busy? == 0)
    }

    /// Whether resources were loaded without search indexes since the last full reindex.
    fn indexes_stale(&self) -> Result<bool, StoreError> {
        let conn = self.readers.get();
        Ok(conn
            .query_row(
                "SELECT 1 FROM store_meta WHERE key = 'indexes_stale'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    fn jobs(&self) -> Result<Arc<dyn JobQueue>, QueueError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = jobs.as_ref() {
            return Ok(q.clone());
        }
        let q = Arc::new(SqliteJobQueue::open(
            &self.path.with_file_name(JOBS_FILE_NAME),
        )?);
        *jobs = Some(q.clone());
        Ok(q)
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
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&str> = prepared.iter().map(|p| p.resource_type.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        self.register_types(&mut w, &names)?;

        let now = chrono::Utc::now().timestamp_millis();
        let lu_ms = now.max(w.last_ms + 1);
        let last_updated = format_instant_ms(lu_ms);
        let first_seq = w.last_seq + 1;
        let mut seq = w.last_seq;
        let mut outcomes = Vec::with_capacity(prepared.len());

        let tx = w
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO resource_versions
                 (k, seq, type_no, id, version, last_updated, method, deleted, superseded_seq, json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?9)",
            )?;
            let mut supersede =
                tx.prepare_cached("UPDATE resource_versions SET superseded_seq = ?1 WHERE k = ?2")?;
            let mut index_inserts = match self.indexer {
                Some(_) => Some(IndexInserts::new(&tx)?),
                None => None,
            };
            for p in prepared {
                let type_no = self
                    .cached_type(&p.resource_type)
                    .ok_or_else(|| StoreError::Corrupt("type not registered".into()))?;
                let (id, current) = match p.id {
                    Some(id) => {
                        let cur = current_of(&tx, type_no, &id)?;
                        (id, cur)
                    }
                    None => (uuid::Uuid::new_v4().to_string(), None),
                };
                if p.method == HistoryMethod::Post && current.is_some() {
                    return Err(StoreError::AlreadyExists {
                        resource_type: p.resource_type,
                        id,
                    });
                }
                if let Some(expected) = p.if_match {
                    let live = current.as_ref().filter(|c| !c.deleted).map(|c| c.version);
                    if live != Some(expected) {
                        return Err(StoreError::VersionConflict {
                            resource_type: p.resource_type,
                            id,
                            expected,
                            actual: live,
                        });
                    }
                }
                let Some(resource) = p.resource else {
                    // Delete.
                    match &current {
                        Some(c) if !c.deleted => {}
                        _ => {
                            outcomes.push(WriteOutcome {
                                resource_type: p.resource_type,
                                id,
                                status: WriteStatus::DeleteNotFound,
                                version: current.map_or(0, |c| c.version),
                                seq: 0,
                                last_updated: last_updated.clone(),
                                json: None,
                            });
                            continue;
                        }
                    }
                    let c = current.as_ref().expect("checked above");
                    seq += 1;
                    let k = key(type_no, seq);
                    let version = c.version + 1;
                    supersede.execute(params![seq, c.k])?;
                    if self.indexer.is_some() {
                        delete_index_rows(&tx, c.k)?;
                    }
                    insert.execute(params![
                        k,
                        seq,
                        type_no,
                        id,
                        version,
                        last_updated,
                        method_code(HistoryMethod::Delete),
                        1,
                        Option::<Vec<u8>>::None
                    ])?;
                    outcomes.push(WriteOutcome {
                        resource_type: p.resource_type,
                        id,
                        status: WriteStatus::Deleted,
                        version,
                        seq,
                        last_updated: last_updated.clone(),
                        json: None,
                    });
                    continue;
                };
                seq += 1;
                if seq > MAX_SEQ {
                    return Err(StoreError::Corrupt("sequence space exhausted".into()));
                }
                let k = key(type_no, seq);
                let ready = match resource {
                    Body::Ready(ready) => ready,
                    Body::Json(m) => {
                        PreparedResource::build(&p.resource_type, &id, m, self.indexer.as_deref())?
                    }
                };
                // A kept version (`$import` InitialLoad) only creates.
                if ready.kept.is_some() && current.is_some() {
                    return Err(StoreError::AlreadyExists {
                        resource_type: p.resource_type,
                        id,
                    });
                }
                let (version, row_updated) = match &ready.kept {
                    Some((v, lu)) => (*v, lu.clone()),
                    None => (
                        current.as_ref().map_or(1, |c| c.version + 1),
                        last_updated.clone(),
                    ),
                };
                let status = match &current {
                    Some(c) if !c.deleted => WriteStatus::Updated,
                    _ => WriteStatus::Created,
                };
                if let Some(c) = &current {
                    supersede.execute(params![seq, c.k])?;
                    if self.indexer.is_some() && !c.deleted {
                        delete_index_rows(&tx, c.k)?;
                    }
                }
                let json = ready.stamped(version, &row_updated);
                insert.execute(params![
                    k,
                    seq,
                    type_no,
                    id,
                    version,
                    row_updated,
                    method_code(p.method),
                    0,
                    json
                ])?;
                if let Some(inserts) = &mut index_inserts {
                    let Some(entries) = &ready.index else {
                        return Err(StoreError::InvalidResource(format!(
                            "{}/{} was prepared without this store's search indexer",
                            p.resource_type, id
                        )));
                    };
                    inserts.insert(type_no, k, entries)?;
                }
                outcomes.push(WriteOutcome {
                    resource_type: p.resource_type,
                    id,
                    status,
                    version,
                    seq,
                    last_updated: row_updated,
                    json: Some(json),
                });
            }
            if seq >= first_seq {
                tx.prepare_cached(
                    "INSERT INTO transactions(lu_ms, first_seq, last_seq) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![lu_ms, first_seq, seq])?;
            }
        }
        tx.commit()?;
        if seq >= first_seq {
            w.last_seq = seq;
            w.last_ms = lu_ms;
        }
        Ok(outcomes)
    }

    fn read(&self, resource_type: &str, id: &str) -> Result<StoredResource, StoreError> {
        let not_found = || StoreError::NotFound {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
        };
        let conn = self.readers.get();
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Err(not_found());
        };
        let row = conn
            .prepare_cached(
                "SELECT seq, version, last_updated, deleted, json FROM resource_versions
                 WHERE type_no = ?1 AND id = ?2 ORDER BY version DESC LIMIT 1",
            )?
            .query_row(params![type_no, id], version_row)
            .optional()?;
        finish_version(row, resource_type, id).ok_or_else(not_found)?
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
        let conn = self.readers.get();
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Err(not_found());
        };
        let row = conn
            .prepare_cached(
                "SELECT seq, version, last_updated, deleted, json FROM resource_versions
                 WHERE type_no = ?1 AND id = ?2 AND version = ?3",
            )?
            .query_row(params![type_no, id, version], version_row)
            .optional()?;
        finish_version(row, resource_type, id).ok_or_else(not_found)?
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
        let conn = self.readers.get();
        let lo_seq = match query.since_ms {
            Some(ms) => seq_at_or_after(&conn, ms)?,
            None => 1,
        };
        let hi_seq = query
            .before_seq
            .map_or(MAX_SEQ, |b| b - 1)
            .min(query.as_of.unwrap_or(MAX_SEQ))
            .min(MAX_SEQ);
        let mut entries = Vec::new();
        let limit = (count + 1) as i64;
        let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<HistoryRow> {
            Ok(HistoryRow {
                seq: r.get(0)?,
                id: r.get(1)?,
                version: r.get(2)?,
                last_updated: r.get(3)?,
                method: r.get(4)?,
                json: r.get(5)?,
                type_no: r.get(6)?,
            })
        };
        let rows: Vec<_> = match scope {
            HistoryScope::Instance { resource_type, id } => {
                let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
                    return Err(StoreError::NotFound {
                        resource_type: resource_type.to_string(),
                        id: id.to_string(),
                    });
                };
                let rows: Vec<_> = conn
                    .prepare_cached(
                        "SELECT seq, id, version, last_updated, method, json, type_no
                         FROM resource_versions
                         WHERE type_no = ?1 AND id = ?2 AND seq >= ?3 AND seq <= ?4
                         ORDER BY version DESC LIMIT ?5",
                    )?
                    .query_map(params![type_no, id, lo_seq, hi_seq, limit], map)?
                    .collect::<Result<_, _>>()?;
                if rows.is_empty() && query.before_seq.is_none() {
                    // Distinguish "no such resource" from "no versions in the window".
                    let exists: Option<i64> = conn
                        .prepare_cached(
                            "SELECT 1 FROM resource_versions WHERE type_no = ?1 AND id = ?2 LIMIT 1",
                        )?
                        .query_row(params![type_no, id], |r| r.get(0))
                        .optional()?;
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
                let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
                    return Ok(HistoryPage {
                        entries,
                        next_before_seq: None,
                    });
                };
                conn.prepare_cached(
                    "SELECT seq, id, version, last_updated, method, json, type_no
                     FROM resource_versions WHERE k >= ?1 AND k <= ?2
                     ORDER BY k DESC LIMIT ?3",
                )?
                .query_map(
                    params![key(type_no, lo_seq), key(type_no, hi_seq), limit],
                    map,
                )?
                .collect::<Result<_, _>>()?
            }
            HistoryScope::System => conn
                .prepare_cached(
                    "SELECT seq, id, version, last_updated, method, json, type_no
                     FROM resource_versions WHERE seq >= ?1 AND seq <= ?2
                     ORDER BY seq DESC LIMIT ?3",
                )?
                .query_map(params![lo_seq, hi_seq, limit], map)?
                .collect::<Result<_, _>>()?,
        };
        let more = rows.len() > count;
        for row in rows.into_iter().take(count) {
            entries.push(HistoryEntry {
                resource_type: self.type_name_of(&conn, row.type_no)?,
                id: row.id,
                seq: row.seq,
                version: row.version,
                last_updated: row.last_updated,
                method: method_of(row.method)?,
                json: row.json,
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
    }

    fn watermark(&self) -> Result<Watermark, StoreError> {
        let conn = self.readers.get();
        let row: Option<(i64, i64)> = conn
            .prepare_cached("SELECT lu_ms, last_seq FROM transactions ORDER BY lu_ms DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match row {
            Some((ms, seq)) => Watermark {
                seq,
                last_updated: Some(format_instant_ms(ms)),
            },
            None => Watermark {
                seq: 0,
                last_updated: None,
            },
        })
    }

    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError> {
        let conn = self.readers.get();
        seq_at_or_after(&conn, instant_ms)
    }

    fn instant_of_seq(&self, seq: i64) -> Result<Option<String>, StoreError> {
        let conn = self.readers.get();
        let row: Option<(i64, i64)> = conn
            .prepare_cached(
                "SELECT lu_ms, first_seq FROM transactions WHERE last_seq >= ?1
                 ORDER BY last_seq LIMIT 1",
            )?
            .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row
            .filter(|(_, first)| *first <= seq)
            .map(|(ms, _)| format_instant_ms(ms)))
    }

    fn types_present(&self, as_of: i64) -> Result<Vec<String>, StoreError> {
        let conn = self.readers.get();
        let types: Vec<(String, i64)> = conn
            .prepare_cached("SELECT name, type_no FROM types ORDER BY name")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (name, type_no) in types {
            let any: Option<i64> = conn
                .prepare_cached(
                    "SELECT 1 FROM resource_versions WHERE k > ?1 AND k <= ?2 AND deleted = 0
                     AND (superseded_seq IS NULL OR superseded_seq > ?3) LIMIT 1",
                )?
                .query_row(params![key(type_no, 0), key(type_no, as_of), as_of], |r| {
                    r.get(0)
                })
                .optional()?;
            if any.is_some() {
                out.push(name);
            }
        }
        Ok(out)
    }

    fn count_type(&self, resource_type: &str, as_of: i64) -> Result<u64, StoreError> {
        let conn = self.readers.get();
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Ok(0);
        };
        count_as_of(&conn, type_no, as_of)
    }

    fn seq_range(&self, resource_type: &str, as_of: i64) -> Result<Option<SeqStats>, StoreError> {
        let conn = self.readers.get();
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Ok(None);
        };
        let count = count_as_of(&conn, type_no, as_of)?;
        if count == 0 {
            return Ok(None);
        }
        let edge = |order: &str| -> Result<i64, StoreError> {
            Ok(conn
                .prepare_cached(&format!(
                    "SELECT seq FROM resource_versions WHERE k > ?1 AND k <= ?2 AND deleted = 0
                     AND (superseded_seq IS NULL OR superseded_seq > ?3) ORDER BY k {order} LIMIT 1"
                ))?
                .query_row(params![key(type_no, 0), key(type_no, as_of), as_of], |r| {
                    r.get(0)
                })?)
        };
        Ok(Some(SeqStats {
            min_seq: edge("ASC")?,
            max_seq: edge("DESC")?,
            count,
        }))
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
        // Keyset pages, each read in its own short read transaction and handed to `f` after
        // the statement is reset: a long scan (an export) must not pin the WAL, or it could
        // neither be checkpointed nor restarted while writes go on (it grew to GBs). The
        // snapshot is the `as_of` sequence number, not the read transaction, so pages read at
        // different moments still show one snapshot.
        const PAGE_ROWS: usize = 512;
        const PAGE_BYTES: usize = 16 << 20;
        struct Owned {
            k: i64,
            seq: i64,
            id: String,
            version: i64,
            last_updated: String,
            json: Vec<u8>,
        }
        let mut after_k = key(type_no, bounds.after);
        let mut n = 0u64;
        let mut page: Vec<Owned> = Vec::with_capacity(PAGE_ROWS);
        let mut cut;
        loop {
            page.clear();
            {
                let conn = self.readers.get();
                let mut stmt = conn.prepare_cached(
                    "SELECT k, seq, id, version, last_updated, json FROM resource_versions
                     WHERE k > ?1 AND k <= ?2 AND deleted = 0
                     AND (superseded_seq IS NULL OR superseded_seq > ?3) ORDER BY k",
                )?;
                let mut rows = stmt.query(params![after_k, key(type_no, upper), as_of])?;
                let mut bytes = 0usize;
                cut = false;
                while let Some(r) = rows.next()? {
                    let json = r.get_ref(5)?.as_blob_or_null()?.unwrap_or_default();
                    bytes += json.len();
                    page.push(Owned {
                        k: r.get(0)?,
                        seq: r.get(1)?,
                        id: r.get(2)?,
                        version: r.get(3)?,
                        last_updated: r.get(4)?,
                        json: json.to_vec(),
                    });
                    if page.len() >= PAGE_ROWS || bytes >= PAGE_BYTES {
                        cut = true;
                        break;
                    }
                }
            }
            let Some(last) = page.last() else {
                return Ok(n);
            };
            after_k = last.k;
            for o in &page {
                n += 1;
                let row = ScanRow {
                    seq: o.seq,
                    id: &o.id,
                    version: o.version,
                    last_updated: &o.last_updated,
                    json: &o.json,
                };
                if f(row).is_break() {
                    return Ok(n);
                }
            }
            if !cut {
                return Ok(n);
            }
        }
    }

    fn deleted_since(
        &self,
        resource_type: &str,
        since_seq: i64,
        as_of: i64,
        after_seq: i64,
        limit: usize,
    ) -> Result<Vec<Tombstone>, StoreError> {
        let conn = self.readers.get();
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Ok(Vec::new());
        };
        let lo = since_seq.max(after_seq);
        if as_of <= lo || limit == 0 {
            return Ok(Vec::new());
        }
        let rows = conn
            .prepare_cached(
                "SELECT seq, id, version, last_updated FROM resource_versions
                 WHERE k > ?1 AND k <= ?2 AND deleted = 1
                 AND (superseded_seq IS NULL OR superseded_seq > ?3) ORDER BY k LIMIT ?4",
            )?
            .query_map(
                params![
                    key(type_no, lo),
                    key(type_no, as_of),
                    as_of,
                    limit.min(i64::MAX as usize) as i64
                ],
                |r| {
                    Ok(Tombstone {
                        resource_type: resource_type.to_string(),
                        seq: r.get(0)?,
                        id: r.get(1)?,
                        version: r.get(2)?,
                        last_updated: r.get(3)?,
                    })
                },
            )?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn list_type(
        &self,
        resource_type: &str,
        filter: &ListFilter,
        count: usize,
        after_seq: Option<i64>,
    ) -> Result<ListPage, StoreError> {
        let conn = self.readers.get();
        let empty = ListPage {
            resources: Vec::new(),
            next_after_seq: None,
        };
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Ok(empty);
        };
        let Some((lo, hi)) = list_bounds(&conn, filter, after_seq)? else {
            return Ok(empty);
        };
        let mut resources: Vec<StoredResource> = Vec::new();
        let to_resource = |r: &rusqlite::Row<'_>| -> rusqlite::Result<StoredResource> {
            Ok(StoredResource {
                resource_type: resource_type.to_string(),
                seq: r.get(0)?,
                id: r.get(1)?,
                version: r.get(2)?,
                last_updated: r.get(3)?,
                json: r.get(4)?,
            })
        };
        match &filter.ids {
            Some(ids) => {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, id, version, last_updated, json, deleted FROM resource_versions
                     WHERE type_no = ?1 AND id = ?2 ORDER BY version DESC LIMIT 1",
                )?;
                let mut seen = std::collections::HashSet::new();
                for id in ids {
                    if !seen.insert(id.as_str()) {
                        continue;
                    }
                    let found = stmt
                        .query_row(params![type_no, id], |r| {
                            if r.get::<_, i64>(5)? != 0 {
                                Ok(None)
                            } else {
                                to_resource(r).map(Some)
                            }
                        })
                        .optional()?
                        .flatten();
                    if let Some(r) = found
                        && r.seq > lo
                        && r.seq <= hi
                    {
                        resources.push(r);
                    }
                }
                resources.sort_by_key(|r| r.seq);
                resources.truncate(count + 1);
            }
            None => {
                resources = conn
                    .prepare_cached(
                        "SELECT seq, id, version, last_updated, json FROM resource_versions
                         WHERE k > ?1 AND k <= ?2 AND superseded_seq IS NULL AND deleted = 0
                         ORDER BY k LIMIT ?3",
                    )?
                    .query_map(
                        params![
                            key(type_no, lo),
                            key(type_no, hi),
                            count.saturating_add(1).min(i64::MAX as usize) as i64
                        ],
                        to_resource,
                    )?
                    .collect::<Result<_, _>>()?;
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
    }

    fn count_list(&self, resource_type: &str, filter: &ListFilter) -> Result<u64, StoreError> {
        let conn = self.readers.get();
        let Some(type_no) = self.lookup_type(&conn, resource_type)? else {
            return Ok(0);
        };
        let Some((lo, hi)) = list_bounds(&conn, filter, None)? else {
            return Ok(0);
        };
        match &filter.ids {
            Some(ids) => {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, deleted FROM resource_versions
                     WHERE type_no = ?1 AND id = ?2 ORDER BY version DESC LIMIT 1",
                )?;
                let mut seen = std::collections::HashSet::new();
                let mut n = 0;
                for id in ids {
                    if !seen.insert(id.as_str()) {
                        continue;
                    }
                    let row: Option<(i64, i64)> = stmt
                        .query_row(params![type_no, id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?;
                    if let Some((seq, 0)) = row
                        && seq > lo
                        && seq <= hi
                    {
                        n += 1;
                    }
                }
                Ok(n)
            }
            None => {
                let n: i64 = conn
                    .prepare_cached(
                        "SELECT count(*) FROM resource_versions
                         WHERE k > ?1 AND k <= ?2 AND superseded_seq IS NULL AND deleted = 0",
                    )?
                    .query_row(params![key(type_no, lo), key(type_no, hi)], |r| r.get(0))?;
                Ok(n as u64)
            }
        }
    }

    fn stored_bytes(&self) -> Result<u64, StoreError> {
        let conn = self.readers.get();
        let bytes: i64 = conn.query_row(
            "SELECT (page_count - freelist_count) * page_size
             FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        )?;
        Ok(bytes.max(0) as u64)
    }

    fn suspend_index_upkeep(&self) -> Result<bool, StoreError> {
        if self.indexer.is_none() {
            return Ok(false);
        }
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let tx = w.conn.unchecked_transaction()?;
        for (name, _) in VALUE_INDEXES {
            tx.execute_batch(&format!("DROP INDEX IF EXISTS {name}"))?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn resume_index_upkeep(&self) -> Result<(), StoreError> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        build_value_indexes(&w.conn)?;
        Ok(())
    }

    fn reindex(&self, resource_type: Option<&str>) -> Result<u64, StoreError> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let types: Vec<(String, i64)> = {
            let mut stmt = w
                .conn
                .prepare("SELECT name, type_no FROM types ORDER BY name")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut total = 0u64;
        for (name, type_no) in types {
            if resource_type.is_some_and(|t| t != name) {
                continue;
            }
            let tx = w
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            // The type's rows by their key range (the `k` index), so that this stays a range
            // delete while the value indexes are suspended.
            for table in INDEX_TABLES {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE k > ?1 AND k <= ?2"),
                    params![key(type_no, 0), key(type_no, MAX_SEQ)],
                )?;
            }
            if let Some(indexer) = &self.indexer {
                let mut stmt = tx.prepare(
                    "SELECT k, json FROM resource_versions
                     WHERE k > ?1 AND k <= ?2 AND superseded_seq IS NULL AND deleted = 0",
                )?;
                let mut rows = stmt.query(params![key(type_no, 0), key(type_no, MAX_SEQ)])?;
                let mut inserts = IndexInserts::new(&tx)?;
                while let Some(r) = rows.next()? {
                    let k: i64 = r.get(0)?;
                    let json = r.get_ref(1)?.as_blob_or_null()?.unwrap_or_default();
                    let value: Value = serde_json::from_slice(json).map_err(|e| {
                        StoreError::Corrupt(format!("stored {name} row {k} is not JSON: {e}"))
                    })?;
                    let entries = indexer.entries(&name, &value);
                    inserts.insert(type_no, k, &entries)?;
                    total += 1;
                }
            }
            tx.commit()?;
        }
        Ok(total)
    }
}

struct HistoryRow {
    seq: i64,
    id: String,
    version: i64,
    last_updated: String,
    method: i64,
    json: Option<Vec<u8>>,
    type_no: i64,
}

type VersionRow = (i64, i64, String, i64, Option<Vec<u8>>);

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

/// Turn a version row into the resource, or [`StoreError::Gone`] for a tombstone; `None` if there
/// was no row.
fn finish_version(
    row: Option<VersionRow>,
    resource_type: &str,
    id: &str,
) -> Option<Result<StoredResource, StoreError>> {
    let (seq, version, last_updated, deleted, json) = row?;
    Some(match (deleted, json) {
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
    })
}

fn seq_at_or_after(conn: &Connection, instant_ms: i64) -> Result<i64, StoreError> {
    let first: Option<i64> = conn
        .prepare_cached(
            "SELECT first_seq FROM transactions WHERE lu_ms >= ?1 ORDER BY lu_ms LIMIT 1",
        )?
        .query_row([instant_ms], |r| r.get(0))
        .optional()?;
    match first {
        Some(s) => Ok(s),
        None => {
            let last: i64 = conn
                .prepare_cached("SELECT coalesce(max(last_seq), 0) FROM transactions")?
                .query_row([], |r| r.get(0))?;
            Ok(last + 1)
        }
    }
}

/// Current resources of a type at `as_of`: those current now with seq <= as_of (partial index),
/// plus those superseded after as_of by a newer version (few, through `rv_superseded`).
fn count_as_of(conn: &Connection, type_no: i64, as_of: i64) -> Result<u64, StoreError> {
    if as_of <= 0 {
        return Ok(0);
    }
    let lo = key(type_no, 0);
    let hi = key(type_no, as_of);
    let now: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM resource_versions
             WHERE k > ?1 AND k <= ?2 AND superseded_seq IS NULL AND deleted = 0",
        )?
        .query_row(params![lo, hi], |r| r.get(0))?;
    let replaced_later: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM resource_versions INDEXED BY rv_superseded
             WHERE superseded_seq > ?3 AND k > ?1 AND k <= ?2 AND deleted = 0",
        )?
        .query_row(params![lo, hi, as_of], |r| r.get(0))?;
    Ok((now + replaced_later) as u64)
}

/// The seq window `(lo, hi]` of a listing, from `_lastUpdated` and the page cursor; `None` if empty.
fn list_bounds(
    conn: &Connection,
    filter: &ListFilter,
    after_seq: Option<i64>,
) -> Result<Option<(i64, i64)>, StoreError> {
    let mut lo = after_seq.unwrap_or(0).max(0);
    let mut hi = MAX_SEQ;
    if let Some(from) = filter.updated_from_ms {
        lo = lo.max(seq_at_or_after(conn, from)? - 1);
    }
    if let Some(before) = filter.updated_before_ms {
        hi = hi.min(seq_at_or_after(conn, before)? - 1);
    }
    Ok((hi > lo).then_some((lo, hi)))
}

/// A fixed set of read-only connections; `get` waits while all are in use.
struct ReaderPool {
    conns: Mutex<Vec<Connection>>,
    available: Condvar,
}

impl ReaderPool {
    fn get(&self) -> PooledConn<'_> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(conn) = conns.pop() {
                return PooledConn {
                    pool: self,
                    conn: Some(conn),
                };
            }
            conns = self
                .available
                .wait(conns)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct PooledConn<'a> {
    pool: &'a ReaderPool,
    conn: Option<Connection>,
}

impl Deref for PooledConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }
}

impl Drop for PooledConn<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut conns: MutexGuard<'_, Vec<Connection>> =
                self.pool.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.push(conn);
            self.pool.available.notify_one();
        }
    }
}
