//! The SQLite implementation of [`Store`].
//!
//! # Schema (`schema_version` 5, in table `store_meta`; versions 1 to 4 are migrated at open)
//!
//! ```sql
//! types(type_no INTEGER PRIMARY KEY, name TEXT UNIQUE)      -- resource type numbers
//! params(param_no INTEGER PRIMARY KEY, name TEXT UNIQUE)    -- search parameter code numbers
//! systems(system_no INTEGER PRIMARY KEY, name TEXT UNIQUE)  -- token system numbers
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
//! Search index tables, one per [`IndexValue`](crate::IndexValue) kind, each row
//! `(type_no, param_no, <values>)` where `param_no` numbers the parameter code (`params`,
//! assigned the first time a code is written; version 1 stored the code itself). A row's rowid
//! is `(seq << 20) | n` (`n` its position among the version's entries; version 2 and before
//! had plain rowids and an index on `(k)`), so the `resource_versions.k` of the indexed
//! (current) version is `(type_no << 40) | (rowid >> 20)` (`index_upkeep::index_key`; versions
//! 1 to 4 stored it as a column `k` too); join with `resource_versions.k = ` that expression:
//!
//! ```sql
//! idx_token(type_no, param_no, system_no, code)        -- system by number (`systems`)
//! idx_token_text(type_no, param_no, text)
//! idx_string(type_no, param_no, normalized, exact)
//! idx_date(type_no, param_no, lo, hi)                  -- [lo, hi) ms since the epoch
//! idx_number(type_no, param_no, value REAL)
//! idx_quantity(type_no, param_no, value REAL, system, code, unit)
//! idx_reference(type_no, param_no, target_type, target_id, url)
//! idx_reference_identifier(type_no, param_no, system, value)
//! idx_uri(type_no, param_no, uri)
//! ```
//! Each has an index on `(type_no, param_no, <first value columns>)`, whose entries end with
//! the rowid: an equality lookup yields rows in rowid order, which is `k` order within a type
//! (search pages stop early), and the index covers the search's `k` lists. The rows of one
//! version are one rowid range, which is how they are deleted when it is superseded and read
//! per resource, with no `(k)` index to keep up during a load. A token row names its system by
//! number (`systems`, numbered on first use like `params`; version 3 and before stored the
//! text): token rows and their value index are half as wide (issue 24). Without the `k` column
//! (version 5) every row and value index entry is about 7 bytes narrower again.
//!
//! # Modules
//!
//! This module holds [`SqliteStore`], its open, the type-number cache and the [`Store`] impl,
//! whose methods delegate to one module per concept: `schema` (connection settings, tables, value
//! indexes), `pool` (the read-only connections), `writes` (the write transaction, the WAL
//! checkpoint), `checkpointer` (the WAL checkpoints of a thread of its own), `reads` (read, vread, history), `scans` (as-of counts and scans, listings),
//! `watermark` (the watermark, instants and seqs), `index_upkeep` (index rows, the stale flag,
//! suspend/resume, reindex), `search` (search plan execution) and `jobs` (the export job queue).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use serde_json::Value;

mod checkpointer;
mod index_upkeep;
mod jobs;
mod pool;
mod reads;
mod scans;
mod schema;
mod search;
mod watermark;
mod writes;

pub use jobs::{JOBS_FILE_NAME, JOBS_SCHEMA_VERSION, SqliteJobQueue};

use pool::{PooledConn, ReaderPool};
use schema::{build_value_indexes, configure, configure_reader, create_schema};

use crate::index_tables::{MAX_CACHED_NUMBERS, ParamNumbers};
use crate::jobs::{JobQueue, QueueError};
use crate::stamp::PreparedResource;
use crate::{DataDirLock, Indexer, Store, StoreError};

/// The schema version this code writes and reads.
pub const SCHEMA_VERSION: i64 = 5;
/// Name of the database file inside a data directory.
pub const DB_FILE_NAME: &str = "fhirhose.db";
use crate::ops::check_update;

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
    /// The numbers of the search parameter codes in the index rows.
    params: ParamNumbers,
    /// The numbers of the token systems in `idx_token`.
    systems: ParamNumbers,
    indexer: Option<Arc<dyn Indexer>>,
    /// The export job queue in `exports.db` beside the database file, opened on first use
    /// ([`jobs`] says why it is a separate file).
    jobs: Mutex<Option<Arc<SqliteJobQueue>>>,
    /// The locks of conditional interactions' conditions: one process writes a data directory.
    conditions: crate::conditions::ProcessLocks,
    /// Declared after `writer`: dropped once the writer connection is closed, which ends its
    /// thread.
    _checkpointer: checkpointer::Checkpointer,
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
        let mut conn = Connection::open(path)?;
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
        let params = ParamNumbers::default();
        {
            let mut stmt = conn.prepare("SELECT name, param_no FROM params")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            params.extend(rows.collect::<Result<Vec<_>, _>>()?);
        }
        let systems = ParamNumbers::default();
        {
            let mut stmt = conn.prepare(&format!(
                "SELECT name, system_no FROM systems ORDER BY system_no LIMIT {MAX_CACHED_NUMBERS}"
            ))?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            systems.extend(rows.collect::<Result<Vec<_>, _>>()?);
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
        let checkpointer = checkpointer::start(&mut conn, path)?;
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
            params,
            systems,
            indexer: options.indexer,
            jobs: Mutex::new(None),
            conditions: Default::default(),
            _checkpointer: checkpointer,
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

    /// The number of token system `system` in `idx_token`; `None` if no row has it.
    pub(crate) fn system_no(&self, system: &str) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.systems.get(system) {
            return Ok(Some(no));
        }
        let conn = self.readers.get();
        let no: Option<i64> = conn
            .query_row(
                "SELECT system_no FROM systems WHERE name = ?1",
                [system],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(no) = no {
            self.systems.extend([(system.to_string(), no)]);
        }
        Ok(no)
    }

    /// Enter the numbers a committed transaction assigned or read in the caches.
    fn remember_numbers(&self, (params, systems): index_upkeep::Assigned) {
        self.params.extend(params);
        self.systems.extend(systems);
    }

    /// The number of a search parameter code in the index rows; `None` if no index row of it was
    /// ever written.
    pub fn param_no(&self, code: &str) -> Result<Option<i64>, StoreError> {
        if let Some(no) = self.params.get(code) {
            return Ok(Some(no));
        }
        let conn = self.readers.get();
        let no: Option<i64> = conn
            .query_row("SELECT param_no FROM params WHERE name = ?1", [code], |r| {
                r.get(0)
            })
            .optional()?;
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

impl SqliteStore {
    /// The job queue of this data directory (`exports.db`), opened on first use.
    fn job_queue(&self) -> Result<Arc<SqliteJobQueue>, QueueError> {
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
}

impl Store for SqliteStore {
    fn lock_conditions(
        &self,
        keys: &[crate::ConditionKey],
        wait: std::time::Duration,
    ) -> Result<crate::ConditionGuard<'_>, StoreError> {
        let deadline = std::time::Instant::now() + wait;
        let held = self.conditions.lock(keys, wait, deadline)?;
        Ok(crate::ConditionGuard::new(held))
    }

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
        index_upkeep::set_indexes_stale(self, stale)
    }

    /// Checkpoints the WAL into the database and truncates it to zero bytes, when no reader
    /// needs its frames (busy otherwise: then nothing waits, and the next call tries again).
    /// Long exports read in short transactions (one per page of a scan), so that such moments
    /// come often; the export sweeper calls this periodically. Returns whether the WAL was
    /// truncated.
    fn checkpoint(&self) -> Result<bool, StoreError> {
        writes::checkpoint(self)
    }

    /// Whether resources were loaded without search indexes since the last full reindex.
    fn indexes_stale(&self) -> Result<bool, StoreError> {
        index_upkeep::indexes_stale(self)
    }

    fn jobs(&self) -> Result<Arc<dyn JobQueue>, QueueError> {
        Ok(self.job_queue()?)
    }

    /// In `exports.db`, the one writer lock the bulk loader never holds: a token request does
    /// not wait for resource writes. `None` when the file cannot be opened (the caller then
    /// keeps assertions in memory, and the export service reports the file's problem).
    fn assertion_record(&self) -> Option<Arc<dyn crate::AssertionRecord>> {
        match self.job_queue() {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::error!(error = %e, "cannot open the assertion record in exports.db");
                None
            }
        }
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

    fn seq_at_or_after(&self, instant_ms: i64) -> Result<i64, StoreError> {
        let conn = self.readers.get();
        watermark::seq_at_or_after(&conn, instant_ms)
    }
}
