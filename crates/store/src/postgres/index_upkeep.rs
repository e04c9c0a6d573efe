//! Search index upkeep: suspending the value and `k` indexes of the index tables around a bulk
//! load, rebuilding them (with the deferred deletion of superseded versions' index rows), and
//! `reindex`.

use serde_json::Value;

use crate::{IndexEntry, StoreError};

use super::schema::{
    LOAD_STATISTICS_TARGET, RV_ANALYZE_COLUMNS, build_value_indexes, k_indexes,
    run_on_two_connections, with_schema_lock,
};
use super::writes::copy_index_rows;
use super::{PgStore, SCAN_PAGE_ROWS, WRITE_LOCK};
use crate::index_tables::{INDEX_TABLES, VALUE_INDEXES};
use crate::ops::{MAX_SEQ, key};

pub(super) fn suspend_index_upkeep(store: &PgStore) -> Result<bool, StoreError> {
    if store.indexer.is_none() {
        return Ok(false);
    }
    store.pool.run(|c| {
        with_schema_lock(c, |c| {
            let mut tx = c.transaction()?;
            for (name, _) in VALUE_INDEXES {
                tx.batch_execute(&format!("DROP INDEX IF EXISTS {name}"))?;
            }
            for (_, name) in k_indexes() {
                tx.batch_execute(&format!("DROP INDEX IF EXISTS {name}"))?;
            }
            tx.commit()?;
            store
                .upkeep_suspended
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(true)
        })
    })
}

pub(super) fn resume_index_upkeep(store: &PgStore) -> Result<(), StoreError> {
    // The deferred deletions, the `k` and value indexes, then fresh statistics of the
    // tables a load wrote, each on two connections at once (the server builds and samples a
    // table on one core; a second connection keeps a second core busy). The JSON column
    // takes no part in ANALYZE: no plan filters on it, and sampling it would read and sort
    // 30,000 documents. The sample is [`LOAD_STATISTICS_TARGET`]'s, not the default's.
    store.pool.run(|c| {
        with_schema_lock(c, |c| build_value_indexes(&store.pool.target, c))?;
        store
            .upkeep_suspended
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let target = format!("SET default_statistics_target = {LOAD_STATISTICS_TARGET}; ");
        let mut statements = vec![format!(
            "{target}ANALYZE resource_versions ({RV_ANALYZE_COLUMNS})"
        )];
        statements.extend(INDEX_TABLES.iter().map(|t| format!("{target}ANALYZE {t}")));
        statements.push(format!("{target}ANALYZE transactions"));
        run_on_two_connections(&store.pool.target, c, statements, false)?;
        c.batch_execute("RESET default_statistics_target")?;
        Ok(())
    })
}

pub(super) fn reindex(
    store: &PgStore,
    resource_type: Option<&str>,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64, StoreError> {
    store.pool.run(|c| {
        let types: Vec<(String, i64)> = c
            .query("SELECT name, type_no FROM types ORDER BY name", &[])?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let full = resource_type.is_none();
        // The versions whose rows are rebuilt: all but those written after a full reindex
        // cleared the tables, whose writers wrote their rows (see below).
        let mut upto = MAX_SEQ;
        if full {
            // Every row at once (`TRUNCATE` visits no row; one type's `DELETE` by `k` range
            // scans every table while the `k` indexes are suspended), under the write lock;
            // versions written later, by other processes, come with their rows, so only those
            // up to this seq are rebuilt. Until the last type is, the indexes miss resources:
            // recorded as stale, so a reindex that stops half-way is not taken for a complete
            // one.
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            upto = tx.query_one("SELECT seq FROM watermark", &[])?.try_get(0)?;
            tx.batch_execute(&format!("TRUNCATE {}", INDEX_TABLES.join(", ")))?;
            tx.execute(
                "INSERT INTO store_meta(key, value) VALUES ('indexes_stale', '1')
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[],
            )?;
            tx.commit()?;
        }
        let mut total = 0u64;
        for (name, type_no) in types {
            if resource_type.is_some_and(|t| t != name) {
                continue;
            }
            let mut tx = c.transaction()?;
            // Under the write lock: no version changes while this type is rebuilt.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            let (lo, hi) = (key(type_no, 0), key(type_no, upto));
            if !full {
                for table in INDEX_TABLES {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE k > $1 AND k <= $2"),
                        &[&lo, &hi],
                    )?;
                }
            }
            let mut assigned = Vec::new();
            let mut n = 0u64;
            if let Some(indexer) = &store.indexer {
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
                    assigned.extend(copy_index_rows(&mut tx, &store.params, &items)?);
                    n += rows.len() as u64;
                    if (rows.len() as i64) < SCAN_PAGE_ROWS {
                        break;
                    }
                }
            }
            tx.commit()?;
            store.params.extend(assigned);
            total += n;
            progress(&name, n);
        }
        if full && store.indexer.is_some() {
            c.execute("DELETE FROM store_meta WHERE key = 'indexes_stale'", &[])?;
        }
        Ok(total)
    })
}
