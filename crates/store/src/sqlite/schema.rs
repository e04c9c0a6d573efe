//! The SQLite schema: connection settings (`PRAGMA`s of the writer and of the readers), the
//! `CREATE TABLE` text with its `store_meta` version check, and the building of the search
//! value indexes. The tables themselves are described in the [parent module](super).

use std::collections::HashSet;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension};

use crate::StoreError;
use crate::index_tables::VALUE_INDEXES;

use super::SCHEMA_VERSION;
use super::index_upkeep::INDEX_ROW_BITS;
use crate::ops::MAX_SEQ;

pub(super) fn configure(conn: &Connection, cache_kib: i64) -> Result<(), StoreError> {
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
    // index pages in many transactions, and each checkpoint copies them (and fsyncs) once. The
    // store's writer replaces this with its WAL hook (`checkpointer`, same 64 MiB for the
    // writer's own checkpoint, most of the copying done on another thread before).
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
pub(super) fn configure_reader(conn: &Connection, cache_kib: i64) -> Result<(), StoreError> {
    let cache_kib = (cache_kib / 4).max(1024);
    conn.execute_batch(&format!(
        "PRAGMA cache_size = -{cache_kib};
         PRAGMA mmap_size = 0;
         PRAGMA busy_timeout = 5000;"
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS types(
  type_no INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS params(
  param_no INTEGER PRIMARY KEY,
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

CREATE TABLE IF NOT EXISTS systems(
  system_no INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS idx_token(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  system_no INTEGER, code TEXT);
CREATE TABLE IF NOT EXISTS idx_token_text(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idx_string(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  normalized TEXT NOT NULL, exact TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS idx_date(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  lo INTEGER NOT NULL, hi INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idx_number(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idx_quantity(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  value REAL NOT NULL, system TEXT, code TEXT, unit TEXT);
CREATE TABLE IF NOT EXISTS idx_reference(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  target_type TEXT, target_id TEXT, url TEXT);
CREATE TABLE IF NOT EXISTS idx_reference_identifier(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  system TEXT, value TEXT);
CREATE TABLE IF NOT EXISTS idx_uri(type_no INTEGER NOT NULL, param_no INTEGER NOT NULL,
  uri TEXT NOT NULL);
";

/// Each index table's value columns now (after `type_no` and `param_no`), and the expressions
/// that compute them from a row `o` of schema versions 1–3, for the migration (version 4's
/// tables have these columns already, see [`migrate`]).
const INDEX_TABLE_COLUMNS: [(&str, &str, &str); 9] = [
    (
        "idx_token",
        "system_no, code",
        "(SELECT s.system_no FROM systems s WHERE s.name = o.system), o.code",
    ),
    ("idx_token_text", "text", "o.text"),
    ("idx_string", "normalized, exact", "o.normalized, o.exact"),
    ("idx_date", "lo, hi", "o.lo, o.hi"),
    ("idx_number", "value", "o.value"),
    (
        "idx_quantity",
        "value, system, code, unit",
        "o.value, o.system, o.code, o.unit",
    ),
    (
        "idx_reference",
        "target_type, target_id, url",
        "o.target_type, o.target_id, o.url",
    ),
    (
        "idx_reference_identifier",
        "system, value",
        "o.system, o.value",
    ),
    ("idx_uri", "uri", "o.uri"),
];

/// Schema versions 1 to 4 → 5 (issue 24), each index table rewritten into its current shape
/// in one transaction with the version change; the value indexes, dropped with the old tables,
/// are built by the open that follows ([`build_value_indexes`]). What changed:
/// - 1 → 2: index rows name their parameter by number (`param_no`, numbered in the new `params`
///   table in the order of the codes) instead of by its code;
/// - 2 → 3: an index row's rowid is `(seq << INDEX_ROW_BITS) | n`
///   ([`index_rowid`](super::index_upkeep::index_rowid); rows numbered within their version in
///   their old order), so the rows of one stored version are one rowid range of the table and
///   the separate `(k)` index of each table is gone;
/// - 3 → 4: a token row names its system by number (`system_no`, from the new `systems` table,
///   numbered in the order of the systems) instead of by its text;
/// - 4 → 5: no `k` column: a row's version key is `(type_no << 40) | (rowid >> 20)`
///   ([`index_key`](super::index_upkeep::index_key)), so neither the row nor its value index
///   entry stores it.
fn migrate(conn: &Connection, from: i64) -> Result<(), StoreError> {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    for (name, _) in VALUE_INDEXES {
        sql.push_str(&format!("DROP INDEX IF EXISTS {name};\n"));
    }
    for (table, _, _) in INDEX_TABLE_COLUMNS {
        sql.push_str(&format!(
            "DROP INDEX IF EXISTS {table}_k;\nALTER TABLE {table} RENAME TO {table}_old;\n"
        ));
    }
    // The new tables (and `params`, `systems`); the others exist already.
    sql.push_str(SCHEMA);
    if from == 1 {
        let codes: Vec<String> = INDEX_TABLE_COLUMNS
            .iter()
            .map(|(table, _, _)| format!("SELECT param FROM {table}_old"))
            .collect();
        sql.push_str(&format!(
            "INSERT INTO params(name) SELECT param FROM ({}) ORDER BY param;\n",
            codes.join(" UNION ")
        ));
    }
    if from <= 3 {
        sql.push_str(
            "INSERT INTO systems(name) SELECT DISTINCT system FROM idx_token_old
             WHERE system IS NOT NULL ORDER BY system;\n",
        );
    }
    let (param, join) = if from == 1 {
        ("p.param_no", "JOIN params p ON p.name = o.param")
    } else {
        ("o.param_no", "")
    };
    let rowid = if from <= 2 {
        format!(
            "((o.k & {MAX_SEQ}) << {INDEX_ROW_BITS})
             | (row_number() OVER (PARTITION BY o.k ORDER BY o.rowid) - 1)"
        )
    } else {
        "o.rowid".to_string()
    };
    for (table, columns, exprs) in INDEX_TABLE_COLUMNS {
        // Version 4 has the current value columns (a token's `system_no` among them).
        let exprs = if from == 4 {
            columns
                .split(", ")
                .map(|c| format!("o.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            exprs.to_string()
        };
        sql.push_str(&format!(
            "INSERT INTO {table}(rowid, type_no, param_no, {columns})
             SELECT {rowid}, o.type_no, {param}, {exprs} FROM {table}_old o {join};
             DROP TABLE {table}_old;\n"
        ));
    }
    sql.push_str(&format!(
        "UPDATE store_meta SET value = '{SCHEMA_VERSION}' WHERE key = 'schema_version';\nCOMMIT;"
    ));
    run_migration(conn, &sql, from, SCHEMA_VERSION)
}

/// Run one migration's SQL (a transaction), rolled back if it fails.
fn run_migration(conn: &Connection, sql: &str, from: i64, to: i64) -> Result<(), StoreError> {
    if let Err(e) = conn.execute_batch(sql) {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return Err(e.into());
    }
    tracing::info!(from, to, "migrated the database schema");
    Ok(())
}

/// Create the schema of a new database (returns true), or check the version of an existing one
/// and migrate it from an older version.
pub(super) fn create_schema(conn: &Connection) -> Result<bool, StoreError> {
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
        Some(v) if v == "1" => migrate(conn, 1)?,
        Some(v) if v == "2" => migrate(conn, 2)?,
        Some(v) if v == "3" => migrate(conn, 3)?,
        Some(v) if v == "4" => migrate(conn, 4)?,
        Some(v) => {
            return Err(StoreError::Corrupt(format!(
                "database schema version {v}, this build reads version {SCHEMA_VERSION}"
            )));
        }
    }
    Ok(false)
}

/// The `CREATE INDEX` of value index `name` on SQLite: [`VALUE_INDEXES`]' own without the
/// trailing `k` (SQLite's index rows have no `k` column: every index entry ends with the row's
/// rowid, which gives it with `type_no`, and keeps equal values in `k` order), and the token
/// index's system by number (`system_no`).
fn sqlite_ddl(name: &str, ddl: &str) -> String {
    if name == "idx_token_value" {
        "CREATE INDEX IF NOT EXISTS idx_token_value ON idx_token(type_no, param_no, code, system_no)"
            .to_string()
    } else {
        ddl.replace(", k)", ")")
    }
}

/// Create the [`VALUE_INDEXES`] that are missing; returns how many were. Sorting a large index
/// spills to temporary files (not to memory, as the writer's other temporary data does) and uses
/// every core; the connection's own settings are restored afterwards.
pub(super) fn build_value_indexes(conn: &Connection) -> Result<usize, StoreError> {
    with_build_settings(conn, || {
        let tx = conn.unchecked_transaction()?;
        let n = create_value_indexes(&tx)?;
        tx.commit()?;
        Ok(n)
    })
}

/// Run `f` with the settings of index builds (sorts spill to temporary files, every core); the
/// connection's own are restored afterwards. Call outside a transaction (SQLite changes
/// `temp_store` only there).
pub(super) fn with_build_settings<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let temp_store: i64 = conn.query_row("PRAGMA temp_store", [], |r| r.get(0))?;
    let threads: i64 = conn.query_row("PRAGMA threads", [], |r| r.get(0))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    conn.execute_batch(&format!(
        "PRAGMA temp_store = FILE; PRAGMA threads = {cores};"
    ))?;
    let done = f();
    let restored = conn.execute_batch(&format!(
        "PRAGMA temp_store = {temp_store}; PRAGMA threads = {threads};"
    ));
    let value = done?;
    restored?;
    Ok(value)
}

/// Create the [`VALUE_INDEXES`] that are missing, in the caller's transaction; returns how
/// many were.
pub(super) fn create_value_indexes(conn: &Connection) -> Result<usize, StoreError> {
    let present: HashSet<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'idx_%'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let missing: Vec<String> = VALUE_INDEXES
        .iter()
        .filter(|(name, _)| !present.contains(*name))
        .map(|(name, ddl)| sqlite_ddl(name, ddl))
        .collect();
    for ddl in &missing {
        conn.execute_batch(ddl)?;
    }
    Ok(missing.len())
}
