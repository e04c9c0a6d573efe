//! Search index upkeep: the per-transaction index-row inserts and deletes the write path uses,
//! the `indexes_stale` flag, suspending and resuming the value indexes around a bulk load, and
//! `reindex`.

use std::collections::HashMap;

use rusqlite::{
    Connection, OptionalExtension, Statement, Transaction, TransactionBehavior, params,
};
use serde_json::Value;

use crate::index_tables::{INDEX_TABLES, ParamNumbers, VALUE_INDEXES};
use crate::ops::{MAX_SEQ, TYPE_SHIFT, key};
use crate::{IndexEntry, IndexValue, StoreError};

use super::SqliteStore;
use super::schema::{build_value_indexes, create_value_indexes, with_build_settings};

pub(super) fn set_indexes_stale(store: &SqliteStore, stale: bool) -> Result<(), StoreError> {
    let w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
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

pub(super) fn indexes_stale(store: &SqliteStore) -> Result<bool, StoreError> {
    let conn = store.readers.get();
    Ok(conn
        .query_row(
            "SELECT 1 FROM store_meta WHERE key = 'indexes_stale'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

pub(super) fn suspend_index_upkeep(store: &SqliteStore) -> Result<bool, StoreError> {
    if store.indexer.is_none() {
        return Ok(false);
    }
    let w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
    let tx = w.conn.unchecked_transaction()?;
    for (name, _) in VALUE_INDEXES {
        tx.execute_batch(&format!("DROP INDEX IF EXISTS {name}"))?;
    }
    tx.commit()?;
    Ok(true)
}

pub(super) fn resume_index_upkeep(store: &SqliteStore) -> Result<(), StoreError> {
    let w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
    build_value_indexes(&w.conn)?;
    Ok(())
}

pub(super) fn reindex(
    store: &SqliteStore,
    resource_type: Option<&str>,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64, StoreError> {
    // The writer is held throughout, and the transactions take the database's write lock
    // first: no version changes while the index is rebuilt (the types are read in them).
    let mut w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
    let Some(only) = resource_type else {
        // Everything in one transaction: readers (WAL) see the old, complete index until it
        // commits, the new one after; a reindex that stops half-way (killed, failed) leaves the
        // old one as it was. The value indexes are dropped first and built once at the end,
        // sorted, in the same transaction; a `DELETE` without `WHERE` empties a table without
        // visiting its rows (one type's `DELETE … WHERE type_no = ?` would scan every table
        // without the value indexes, and there is no `(k)` index since schema 3).
        let conn = &w.conn;
        let (total, assigned) = with_build_settings(conn, || {
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
            for (name, _) in VALUE_INDEXES {
                tx.execute_batch(&format!("DROP INDEX IF EXISTS {name}"))?;
            }
            for table in INDEX_TABLES {
                tx.execute(&format!("DELETE FROM {table}"), [])?;
            }
            let mut total = 0u64;
            let mut assigned = Assigned::default();
            for (name, type_no) in &types(&tx)? {
                let (n, a) = index_type(store, &tx, name, *type_no)?;
                assigned.0.extend(a.0);
                assigned.1.extend(a.1);
                total += n;
                progress(name, n);
            }
            create_value_indexes(&tx)?;
            // Complete now; without an indexer, every resource is missing from it.
            tx.execute(
                if store.indexer.is_some() {
                    "DELETE FROM store_meta WHERE key = 'indexes_stale'"
                } else {
                    "INSERT OR REPLACE INTO store_meta(key, value) VALUES ('indexes_stale', '1')"
                },
                [],
            )?;
            tx.commit()?;
            Ok((total, assigned))
        })?;
        store.remember_numbers(assigned);
        return Ok(total);
    };
    let tx = w
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)?;
    let type_no: Option<i64> = tx
        .query_row("SELECT type_no FROM types WHERE name = ?1", [only], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(type_no) = type_no else {
        return Ok(0);
    };
    // The type's rows: through the value indexes, which all start with `type_no`.
    for table in INDEX_TABLES {
        tx.execute(
            &format!("DELETE FROM {table} WHERE type_no = ?1"),
            [type_no],
        )?;
    }
    let (n, assigned) = index_type(store, &tx, only, type_no)?;
    tx.commit()?;
    store.remember_numbers(assigned);
    progress(only, n);
    Ok(n)
}

/// The resource types by name, with their numbers, in name order.
fn types(conn: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt = conn.prepare("SELECT name, type_no FROM types ORDER BY name")?;
    Ok(stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?)
}

/// Write the index rows of the current versions of one type in `tx`; returns how many and the
/// numbers assigned (for the caches once `tx` committed).
fn index_type(
    store: &SqliteStore,
    tx: &Connection,
    name: &str,
    type_no: i64,
) -> Result<(u64, Assigned), StoreError> {
    let Some(indexer) = &store.indexer else {
        return Ok((0, Assigned::default()));
    };
    let mut n = 0u64;
    let mut stmt = tx.prepare(
        "SELECT k, json FROM resource_versions
         WHERE k > ?1 AND k <= ?2 AND superseded_seq IS NULL AND deleted = 0",
    )?;
    let mut rows = stmt.query(params![key(type_no, 0), key(type_no, MAX_SEQ)])?;
    let mut inserts = IndexInserts::new(tx, &store.params, &store.systems)?;
    while let Some(r) = rows.next()? {
        let k: i64 = r.get(0)?;
        let json = r.get_ref(1)?.as_blob_or_null()?.unwrap_or_default();
        let value: Value = serde_json::from_slice(json)
            .map_err(|e| StoreError::Corrupt(format!("stored {name} row {k} is not JSON: {e}")))?;
        inserts.insert(
            type_no,
            k,
            crate::index::bounded_entries(&**indexer, name, &value),
        )?;
        n += 1;
    }
    inserts.finish()?;
    Ok((n, inserts.into_assigned()))
}

/// The bits of an index row's rowid that number the rows of one stored version: the rowid is
/// `(seq << INDEX_ROW_BITS) | n` ([`index_rowid`]), `n` the row's position among the version's
/// index entries. The rows of a version are thus one rowid range of each index table, which is
/// how they are deleted when the version is superseded and looked up per resource (a sort value,
/// an `_include`): no separate `(k)` index to keep up (schema version 3, issue 24). `seq` has 40
/// bits, so the rowid stays below 2^60.
pub(crate) const INDEX_ROW_BITS: u32 = 20;

/// Most index entries one stored version may have (`n` must fit [`INDEX_ROW_BITS`]).
pub(crate) const MAX_INDEX_ROWS: usize = 1 << INDEX_ROW_BITS;

/// The rowid of row `n` of the version whose key is `k`.
pub(crate) fn index_rowid(k: i64, n: usize) -> i64 {
    ((k & MAX_SEQ) << INDEX_ROW_BITS) | n as i64
}

/// The rowids of the rows of version `k`: `lo..hi`.
fn index_rowids(k: i64) -> (i64, i64) {
    (index_rowid(k, 0), index_rowid(k, 0) + MAX_INDEX_ROWS as i64)
}

/// The SQL expression of the version key `k` of the index row whose columns are prefixed with
/// `alias` (`""`, or a table alias and a dot): `(type_no << 40) | (rowid >> INDEX_ROW_BITS)`.
/// SQLite's index rows store no `k` (schema version 5): their type and rowid give it, and the
/// rowid ends every index entry, so a value index still covers it and still yields the rows of
/// one value in `k` order.
pub(crate) fn index_key(alias: &str) -> String {
    format!("(({alias}type_no << {TYPE_SHIFT}) | ({alias}rowid >> {INDEX_ROW_BITS}))")
}

/// Rows per multi-row `INSERT` of [`IndexInserts`].
const ROWS_PER_INSERT: usize = 64;

/// The index row shapes, one `INSERT` each: (table and columns, one row's `VALUES` tuple).
/// References to a `Type/id` and to a URL go to the same table with different `NULL`s.
const SHAPES: [(&str, &str); 10] = [
    (
        "idx_token(rowid, type_no, param_no, system_no, code)",
        "(?,?,?,?,?)",
    ),
    (
        "idx_token_text(rowid, type_no, param_no, text)",
        "(?,?,?,?)",
    ),
    (
        "idx_string(rowid, type_no, param_no, normalized, exact)",
        "(?,?,?,?,?)",
    ),
    ("idx_date(rowid, type_no, param_no, lo, hi)", "(?,?,?,?,?)"),
    ("idx_number(rowid, type_no, param_no, value)", "(?,?,?,?)"),
    (
        "idx_quantity(rowid, type_no, param_no, value, system, code, unit)",
        "(?,?,?,?,?,?,?)",
    ),
    (
        "idx_reference(rowid, type_no, param_no, target_type, target_id, url)",
        "(?,?,?,?,?,NULL)",
    ),
    (
        "idx_reference(rowid, type_no, param_no, target_type, target_id, url)",
        "(?,?,?,NULL,NULL,?)",
    ),
    (
        "idx_reference_identifier(rowid, type_no, param_no, system, value)",
        "(?,?,?,?,?)",
    ),
    ("idx_uri(rowid, type_no, param_no, uri)", "(?,?,?,?)"),
];

/// The position of a value's shape in [`SHAPES`].
fn shape_of(v: &IndexValue) -> usize {
    match v {
        IndexValue::Token { .. } => 0,
        IndexValue::TokenText(_) => 1,
        IndexValue::String { .. } => 2,
        IndexValue::Date { .. } => 3,
        IndexValue::Number(_) => 4,
        IndexValue::Quantity { .. } => 5,
        IndexValue::Reference { .. } => 6,
        IndexValue::ReferenceUrl(_) => 7,
        IndexValue::ReferenceIdentifier { .. } => 8,
        IndexValue::Uri(_) => 9,
    }
}

/// `INSERT INTO` shape `shape` of `rows` rows.
fn insert_sql(shape: usize, rows: usize) -> String {
    let (table, tuple) = SHAPES[shape];
    let tuples = vec![tuple; rows].join(",");
    format!("INSERT INTO {table} VALUES {tuples}")
}

/// One index row waiting for its `INSERT`.
struct Row {
    rowid: i64,
    type_no: i64,
    param_no: i64,
    /// A token's system, by number.
    system_no: Option<i64>,
    /// The key of the row's version (not stored: [`index_key`]), for [`IndexInserts::forget`].
    k: i64,
    value: IndexValue,
}

/// Bind `r`'s values from parameter `at` (1-based) on; returns the next parameter's number.
fn bind_row(stmt: &mut Statement<'_>, mut at: usize, r: &Row) -> rusqlite::Result<usize> {
    let mut bind = |v: &dyn rusqlite::ToSql| -> rusqlite::Result<()> {
        stmt.raw_bind_parameter(at, v)?;
        at += 1;
        Ok(())
    };
    bind(&r.rowid)?;
    bind(&r.type_no)?;
    bind(&r.param_no)?;
    match &r.value {
        IndexValue::Token { code, .. } => {
            bind(&r.system_no)?;
            bind(code)?;
        }
        IndexValue::TokenText(text) => bind(text)?,
        IndexValue::String { normalized, exact } => {
            bind(normalized)?;
            bind(exact)?;
        }
        IndexValue::Date { lo, hi } => {
            bind(lo)?;
            bind(hi)?;
        }
        IndexValue::Number(value) => bind(value)?,
        IndexValue::Quantity {
            value,
            system,
            code,
            unit,
        } => {
            bind(value)?;
            bind(system)?;
            bind(code)?;
            bind(unit)?;
        }
        IndexValue::Reference { target_type, id } => {
            bind(target_type)?;
            bind(id)?;
        }
        IndexValue::ReferenceUrl(url) => bind(url)?,
        IndexValue::ReferenceIdentifier { system, value } => {
            bind(system)?;
            bind(value)?;
        }
        IndexValue::Uri(uri) => bind(uri)?,
    }
    Ok(at)
}

/// The index-row inserts of one transaction. Rows wait in one queue per shape and go in
/// [`ROWS_PER_INSERT`] at a time, one statement execution for all of them (a bulk load inserts
/// about nine rows per resource; one execution per row was most of the insert cost), the rest
/// one by one at [`IndexInserts::finish`]. Statements come from the connection's cache.
pub(super) struct IndexInserts<'c> {
    conn: &'c Connection,
    /// Parameter codes (`params`) and token systems (`systems`) by number.
    params: Numbering<'c>,
    systems: Numbering<'c>,
    queues: [Vec<Row>; 10],
}

/// The names of one numbering table (`params`, `systems`): the store's cache, and the numbers
/// this transaction assigned or read (for the cache once it commits).
struct Numbering<'c> {
    table: &'static str,
    cache: &'c ParamNumbers,
    assigned: HashMap<String, i64>,
}

impl Numbering<'_> {
    /// The number of `name`: known, or assigned now in this transaction.
    fn number(&mut self, conn: &Connection, name: &str) -> Result<i64, StoreError> {
        if let Some(no) = self.cache.get(name) {
            return Ok(no);
        }
        if let Some(no) = self.assigned.get(name) {
            return Ok(*no);
        }
        let table = self.table;
        let no = match conn
            .prepare_cached(&format!("SELECT rowid FROM {table} WHERE name = ?1"))?
            .query_row([name], |r| r.get(0))
            .optional()?
        {
            Some(no) => no,
            None => {
                conn.prepare_cached(&format!("INSERT INTO {table}(name) VALUES (?1)"))?
                    .execute([name])?;
                conn.last_insert_rowid()
            }
        };
        self.assigned.insert(name.to_string(), no);
        Ok(no)
    }
}

/// The numbers a transaction assigned or read: (parameter codes, token systems), for
/// [`super::SqliteStore::remember_numbers`] once it committed.
pub(super) type Assigned = (Vec<(String, i64)>, Vec<(String, i64)>);

impl<'c> IndexInserts<'c> {
    pub(super) fn new(
        conn: &'c Connection,
        params: &'c ParamNumbers,
        systems: &'c ParamNumbers,
    ) -> Result<Self, StoreError> {
        Ok(IndexInserts {
            conn,
            params: Numbering {
                table: "params",
                cache: params,
                assigned: HashMap::new(),
            },
            systems: Numbering {
                table: "systems",
                cache: systems,
                assigned: HashMap::new(),
            },
            queues: Default::default(),
        })
    }

    /// The numbers this transaction assigned or read from the database: enter them in the
    /// store's caches once it committed. Call [`IndexInserts::finish`] first.
    pub(super) fn into_assigned(self) -> Assigned {
        (
            self.params.assigned.into_iter().collect(),
            self.systems.assigned.into_iter().collect(),
        )
    }

    /// The rows of one stored version `k`: queued, inserted once a shape has
    /// [`ROWS_PER_INSERT`] waiting.
    pub(super) fn insert(
        &mut self,
        type_no: i64,
        k: i64,
        entries: Vec<IndexEntry>,
    ) -> Result<(), StoreError> {
        if entries.len() > MAX_INDEX_ROWS {
            return Err(StoreError::InvalidResource(format!(
                "{} search index entries in one resource; at most {MAX_INDEX_ROWS} are kept",
                entries.len()
            )));
        }
        for (n, e) in entries.into_iter().enumerate() {
            let param_no = self.params.number(self.conn, &e.param)?;
            let system_no = match &e.value {
                IndexValue::Token {
                    system: Some(system),
                    ..
                } => Some(self.systems.number(self.conn, system)?),
                _ => None,
            };
            let shape = shape_of(&e.value);
            self.queues[shape].push(Row {
                rowid: index_rowid(k, n),
                type_no,
                param_no,
                system_no,
                k,
                value: e.value,
            });
            if self.queues[shape].len() >= ROWS_PER_INSERT {
                self.write(shape)?;
            }
        }
        Ok(())
    }

    /// Drop the queued rows of version `k` (superseded in this transaction; those already
    /// inserted are deleted by [`delete_index_rows`]).
    pub(super) fn forget(&mut self, k: i64) {
        for q in &mut self.queues {
            q.retain(|r| r.k != k);
        }
    }

    /// Insert every queued row (before the transaction commits).
    pub(super) fn finish(&mut self) -> Result<(), StoreError> {
        for shape in 0..SHAPES.len() {
            self.write(shape)?;
        }
        Ok(())
    }

    /// Insert the queued rows of `shape`: by [`ROWS_PER_INSERT`], the rest one by one.
    fn write(&mut self, shape: usize) -> Result<(), StoreError> {
        let rows = std::mem::take(&mut self.queues[shape]);
        let mut chunks = rows.chunks_exact(ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut stmt = self
                .conn
                .prepare_cached(&insert_sql(shape, ROWS_PER_INSERT))?;
            for chunk in &mut chunks {
                let mut at = 1;
                for r in chunk {
                    at = bind_row(&mut stmt, at, r)?;
                }
                stmt.raw_execute()?;
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut stmt = self.conn.prepare_cached(&insert_sql(shape, 1))?;
            for r in rest {
                bind_row(&mut stmt, 1, r)?;
                stmt.raw_execute()?;
            }
        }
        let mut rows = rows;
        rows.clear();
        if self.queues[shape].is_empty() {
            self.queues[shape] = rows;
        }
        Ok(())
    }
}

/// Delete the index rows of version `k`: one rowid range per table ([`INDEX_ROW_BITS`]).
pub(super) fn delete_index_rows(conn: &Connection, k: i64) -> Result<(), StoreError> {
    let (lo, hi) = index_rowids(k);
    for table in INDEX_TABLES {
        conn.prepare_cached(&format!(
            "DELETE FROM {table} WHERE rowid >= ?1 AND rowid < ?2"
        ))?
        .execute([lo, hi])?;
    }
    Ok(())
}
