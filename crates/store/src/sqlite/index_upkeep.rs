//! Search index upkeep: the per-transaction index-row inserts and deletes the write path uses,
//! the `indexes_stale` flag, suspending and resuming the value indexes around a bulk load, and
//! `reindex`.

use rusqlite::{CachedStatement, Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::Value;

use crate::index_tables::{INDEX_TABLES, ParamNumbers, VALUE_INDEXES};
use crate::ops::{MAX_SEQ, key};
use crate::{IndexEntry, IndexValue, StoreError};

use super::SqliteStore;
use super::schema::build_value_indexes;

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

pub(super) fn reindex(store: &SqliteStore, resource_type: Option<&str>) -> Result<u64, StoreError> {
    let mut w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut assigned = Vec::new();
        if let Some(indexer) = &store.indexer {
            let mut stmt = tx.prepare(
                "SELECT k, json FROM resource_versions
                 WHERE k > ?1 AND k <= ?2 AND superseded_seq IS NULL AND deleted = 0",
            )?;
            let mut rows = stmt.query(params![key(type_no, 0), key(type_no, MAX_SEQ)])?;
            let mut inserts = IndexInserts::new(&tx, &store.params)?;
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
            assigned = inserts.into_assigned();
        }
        tx.commit()?;
        store.params.extend(assigned);
    }
    Ok(total)
}

/// The index-row inserts of one transaction, prepared once: a bulk load inserts about nine rows
/// per resource, and looking each statement up in the connection's cache by its SQL text cost a
/// tenth of the insert time.
pub(super) struct IndexInserts<'c> {
    conn: &'c Connection,
    /// The store's parameter numbers, and those this transaction assigned (for the cache once it
    /// commits: [`IndexInserts::into_assigned`]).
    params: &'c ParamNumbers,
    assigned: Vec<(String, i64)>,
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
    pub(super) fn new(conn: &'c Connection, params: &'c ParamNumbers) -> Result<Self, StoreError> {
        Ok(IndexInserts {
            conn,
            params,
            assigned: Vec::new(),
            token: conn.prepare_cached(
                "INSERT INTO idx_token(type_no, param_no, system, code, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            token_text: conn.prepare_cached(
                "INSERT INTO idx_token_text(type_no, param_no, text, k) VALUES (?1,?2,?3,?4)",
            )?,
            string: conn.prepare_cached(
                "INSERT INTO idx_string(type_no, param_no, normalized, exact, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            date: conn.prepare_cached(
                "INSERT INTO idx_date(type_no, param_no, lo, hi, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            number: conn.prepare_cached(
                "INSERT INTO idx_number(type_no, param_no, value, k) VALUES (?1,?2,?3,?4)",
            )?,
            quantity: conn.prepare_cached(
                "INSERT INTO idx_quantity(type_no, param_no, value, system, code, unit, k) VALUES (?1,?2,?3,?4,?5,?6,?7)",
            )?,
            reference: conn.prepare_cached(
                "INSERT INTO idx_reference(type_no, param_no, target_type, target_id, url, k) VALUES (?1,?2,?3,?4,NULL,?5)",
            )?,
            reference_url: conn.prepare_cached(
                "INSERT INTO idx_reference(type_no, param_no, target_type, target_id, url, k) VALUES (?1,?2,NULL,NULL,?3,?4)",
            )?,
            reference_identifier: conn.prepare_cached(
                "INSERT INTO idx_reference_identifier(type_no, param_no, system, value, k) VALUES (?1,?2,?3,?4,?5)",
            )?,
            uri: conn.prepare_cached(
                "INSERT INTO idx_uri(type_no, param_no, uri, k) VALUES (?1,?2,?3,?4)",
            )?,
        })
    }

    /// The number of parameter `code`: known, or assigned now in this transaction.
    fn param_no(&mut self, code: &str) -> Result<i64, StoreError> {
        if let Some(no) = self.params.get(code) {
            return Ok(no);
        }
        if let Some((_, no)) = self.assigned.iter().find(|(c, _)| c == code) {
            return Ok(*no);
        }
        let no = match self
            .conn
            .prepare_cached("SELECT param_no FROM params WHERE name = ?1")?
            .query_row([code], |r| r.get(0))
            .optional()?
        {
            Some(no) => no,
            None => {
                self.conn
                    .prepare_cached("INSERT INTO params(name) VALUES (?1)")?
                    .execute([code])?;
                self.conn.last_insert_rowid()
            }
        };
        self.assigned.push((code.to_string(), no));
        Ok(no)
    }

    /// The parameter numbers this transaction assigned or read from the database: enter them in
    /// the store's cache once it committed.
    pub(super) fn into_assigned(self) -> Vec<(String, i64)> {
        self.assigned
    }

    /// The rows of one stored version `k`.
    pub(super) fn insert(
        &mut self,
        type_no: i64,
        k: i64,
        entries: &[IndexEntry],
    ) -> Result<(), StoreError> {
        for e in entries {
            let p = self.param_no(&e.param)?;
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

pub(super) fn delete_index_rows(conn: &Connection, k: i64) -> Result<(), StoreError> {
    for table in INDEX_TABLES {
        conn.prepare_cached(&format!("DELETE FROM {table} WHERE k = ?1"))?
            .execute([k])?;
    }
    Ok(())
}
