//! Search index upkeep: suspending the value and `k` indexes of the index tables around a bulk
//! load, rebuilding them (with the deferred deletion of superseded versions' index rows), and
//! `reindex` (a full one builds new tables beside the live ones and swaps them in, see
//! [`rebuild_and_swap`]).

use super::statements::{Conn, Session, Tx};
use ::postgres::error::SqlState;
use serde_json::Value;

use crate::{IndexEntry, StoreError};

use super::schema::{
    LOAD_STATISTICS_TARGET, RV_ANALYZE_COLUMNS, build_value_indexes, k_indexes,
    run_on_two_connections, with_schema_lock,
};
use super::writes::copy_index_rows;
use super::{PgStore, REINDEX_LOCK, SCAN_PAGE_ROWS, WRITE_LOCK};
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
    match resource_type {
        None => store.pool.run(|c| {
            // One full reindex at a time in the cluster: it owns the `_rebuild` tables. A
            // session lock, released with the connection if this process dies.
            c.execute("SELECT pg_advisory_lock($1)", &[&REINDEX_LOCK])?;
            let rebuilt = rebuild_and_swap(store, c, progress);
            let unlocked = c.execute("SELECT pg_advisory_unlock($1)", &[&REINDEX_LOCK]);
            let total = rebuilt?;
            unlocked?;
            Ok(total)
        }),
        Some(name) => store.pool.run(|c| reindex_type(store, c, name, progress)),
    }
}

/// Parameter numbers a transaction read or assigned, for the store's cache once it committed.
type Assigned = Vec<(String, i64)>;

/// The suffix of the copies of the index tables (and of their indexes) a full reindex fills
/// beside the live ones and swaps in at its end.
const REBUILD: &str = "_rebuild";

/// How long the swap waits for each lock before it gives way and tries again (below the
/// server's `deadlock_timeout`, 1 s by default, so that a search or a writer waiting in a cycle
/// with it is never the one the deadlock detector aborts).
const SWAP_LOCK_TIMEOUT: &str = "200ms";

/// How many times the swap tries with [`SWAP_LOCK_TIMEOUT`] before it waits as long as it takes.
const SWAP_TRIES: u32 = 50;

/// A full reindex that searches never see half-done: the index rows are written into new
/// tables (`idx_*_rebuild`, created like the live ones without their indexes), indexed and
/// analysed once filled, then swapped in by one short transaction (live tables dropped, new
/// ones and their indexes renamed to the canonical names). Until that commit every search reads
/// the old, complete index; after it the new, complete one.
///
/// Writers (other nodes) go on meanwhile, into the live tables: the rebuild reads the current
/// versions up to the watermark `upto` it read first, and catch-up passes then bring the new
/// tables to the watermark — the index rows of every version written since are computed and
/// added if it is still current, and the rows of every version superseded since (updated or
/// deleted: its `superseded_seq` is the later version's seq) are deleted. seq order is commit
/// order, so every version up to a watermark read is committed and every later supersession
/// has a larger seq. The last pass runs in the swap transaction under [`WRITE_LOCK`], so no
/// write falls between it and the swap; the pass before it, without the lock, leaves it only
/// the writes of a moment.
fn rebuild_and_swap(
    store: &PgStore,
    c: &mut Conn,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64, StoreError> {
    // A reindex killed earlier may have left its tables: they are dropped (waiting, if need
    // be, for a dead session still building an index on one of them).
    drop_rebuild_tables(c)?;
    let mut create = String::new();
    for table in INDEX_TABLES {
        create.push_str(&format!(
            "CREATE TABLE {table}{REBUILD} (LIKE {table} INCLUDING ALL EXCLUDING INDEXES);"
        ));
    }
    c.batch_execute(&create)?;
    // The watermark before the types: a version up to it had its type registered before it
    // was written.
    let upto: i64 = c.query_one("SELECT seq FROM watermark", &[])?.try_get(0)?;
    let types = types(c)?;
    let mut total = 0u64;
    for (name, type_no) in &types {
        let mut tx = c.transaction()?;
        let (n, assigned) = index_current(store, &mut tx, name, *type_no, (0, upto), REBUILD)?;
        tx.commit()?;
        store.params.extend(assigned);
        total += n;
        progress(name, n);
    }
    build_rebuild_indexes(store, c)?;
    // Catch up without the write lock, then in the swap under it.
    let mut tx = c.transaction()?;
    let (caught_up, added, assigned) = catch_up(store, &mut tx, upto)?;
    tx.commit()?;
    store.params.extend(assigned);
    let added_in_swap = swap(store, c, caught_up)?;
    Ok(total + added + added_in_swap)
}

/// The resource types by name, with their numbers, in name order.
fn types(c: &mut impl Session) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        c.query("SELECT name, type_no FROM types ORDER BY name", &[])?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    )
}

/// Drop the `_rebuild` tables a full reindex left (killed half-way); nothing when there are
/// none. Call holding [`REINDEX_LOCK`].
pub(super) fn drop_rebuild_tables(c: &mut Conn) -> Result<(), StoreError> {
    let left: Vec<String> = c
        .query(
            "SELECT tablename::text FROM pg_tables
             WHERE schemaname = current_schema() AND tablename = ANY($1)",
            &[&INDEX_TABLES
                .iter()
                .map(|t| format!("{t}{REBUILD}"))
                .collect::<Vec<_>>()],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !left.is_empty() {
        tracing::info!(
            tables = left.len(),
            "dropping the tables of an unfinished reindex"
        );
        c.batch_execute(&format!("DROP TABLE IF EXISTS {}", left.join(", ")))?;
    }
    Ok(())
}

/// The `CREATE INDEX` of value index `name` (`ddl` from [`VALUE_INDEXES`]) on the `_rebuild`
/// copy of its table, under the name with the same suffix.
fn rebuild_index_ddl(name: &str, ddl: &str) -> Result<String, StoreError> {
    let on = ddl
        .split_once(" ON ")
        .and_then(|(_, rest)| rest.split_once('('));
    let Some((table, columns)) = on else {
        return Err(StoreError::Corrupt(format!(
            "value index {name} has no table in its definition"
        )));
    };
    Ok(format!(
        "CREATE INDEX {name}{REBUILD} ON {table}{REBUILD}({columns}"
    ))
}

/// The `k` and value indexes of the filled `_rebuild` tables (two at a time, as after a bulk
/// load), then their statistics.
fn build_rebuild_indexes(store: &PgStore, c: &mut Conn) -> Result<(), StoreError> {
    let mut statements: Vec<String> = k_indexes()
        .map(|(table, name)| format!("CREATE INDEX {name}{REBUILD} ON {table}{REBUILD}(k)"))
        .collect();
    for (name, ddl) in VALUE_INDEXES {
        statements.push(rebuild_index_ddl(name, ddl)?);
    }
    run_on_two_connections(&store.pool.target, c, statements, true)?;
    let target = format!("SET default_statistics_target = {LOAD_STATISTICS_TARGET}; ");
    let statements = INDEX_TABLES
        .iter()
        .map(|t| format!("{target}ANALYZE {t}{REBUILD}"))
        .collect();
    run_on_two_connections(&store.pool.target, c, statements, false)?;
    c.batch_execute("RESET default_statistics_target")?;
    Ok(())
}

/// Bring the `_rebuild` tables from watermark `from` to the current one, in `tx`: the rows of
/// the versions superseded since are deleted, those of the versions written since and still
/// current added. Returns the watermark caught up to, how many versions were added, and the
/// parameter numbers assigned (for the cache once `tx` committed).
fn catch_up(
    store: &PgStore,
    tx: &mut Tx<'_>,
    from: i64,
) -> Result<(i64, u64, Assigned), StoreError> {
    // The watermark, then the types (some may be new since the rebuild began).
    let to: i64 = tx.query_one("SELECT seq FROM watermark", &[])?.try_get(0)?;
    let types = types(tx)?;
    let mut assigned = Vec::new();
    let mut added = 0u64;
    if to > from {
        for table in INDEX_TABLES {
            tx.execute(
                &format!(
                    "DELETE FROM {table}{REBUILD} WHERE k IN (SELECT k FROM resource_versions
                     WHERE superseded_seq > $1 AND superseded_seq <= $2)"
                ),
                &[&from, &to],
            )?;
        }
        for (name, type_no) in &types {
            let (n, a) = index_current(store, tx, name, *type_no, (from, to), REBUILD)?;
            added += n;
            assigned.extend(a);
        }
        tracing::debug!(from, to, added, "reindex caught up with later writes");
    }
    Ok((to, added, assigned))
}

/// Write the index rows of the current versions of type `type_no` whose seq is in
/// `(from, to]` into the index tables with `suffix` (`""`: the live ones); returns how many
/// versions and the parameter numbers assigned.
fn index_current(
    store: &PgStore,
    tx: &mut Tx<'_>,
    name: &str,
    type_no: i64,
    (from, to): (i64, i64),
    suffix: &str,
) -> Result<(u64, Assigned), StoreError> {
    let mut assigned = Vec::new();
    let mut n = 0u64;
    let Some(indexer) = &store.indexer else {
        return Ok((0, assigned));
    };
    let hi = key(type_no, to);
    let mut after = key(type_no, from);
    loop {
        let rows = tx.query(
            "SELECT k, json FROM resource_versions
             WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0
             ORDER BY k LIMIT $3",
            &[&after, &hi, &SCAN_PAGE_ROWS],
        )?;
        let mut batch: Vec<(i64, i64, Vec<IndexEntry>)> = Vec::with_capacity(rows.len());
        for r in &rows {
            let k: i64 = r.try_get(0)?;
            let json: Option<&[u8]> = r.try_get(1)?;
            let value: Value = serde_json::from_slice(json.unwrap_or_default()).map_err(|e| {
                StoreError::Corrupt(format!("stored {name} row {k} is not JSON: {e}"))
            })?;
            batch.push((
                type_no,
                k,
                crate::index::bounded_entries(&**indexer, name, &value),
            ));
            after = k;
        }
        let items: Vec<(i64, i64, &[IndexEntry])> = batch
            .iter()
            .map(|(t, k, e)| (*t, *k, e.as_slice()))
            .collect();
        assigned.extend(copy_index_rows(tx, &store.params, &items, suffix)?);
        n += rows.len() as u64;
        if (rows.len() as i64) < SCAN_PAGE_ROWS {
            break;
        }
    }
    Ok((n, assigned))
}

/// The swap: under the write lock, the last catch-up from watermark `from`, the live tables
/// dropped, the `_rebuild` tables and their indexes renamed to the canonical names, the stale
/// flag cleared — one transaction. Its locks are taken with [`SWAP_LOCK_TIMEOUT`]: the table
/// locks wait for running searches, and a search or writer that in turn waits for a table this
/// transaction holds would otherwise be in a deadlock with it; on a timeout it rolls back and
/// tries again, [`SWAP_TRIES`] times, then waits without a limit. Returns how many versions
/// the catch-up added.
fn swap(store: &PgStore, c: &mut Conn, from: i64) -> Result<u64, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let limited = tries <= SWAP_TRIES;
        let mut tx = c.transaction()?;
        let locked = (|| -> Result<(), ::postgres::Error> {
            if limited {
                tx.batch_execute(&format!("SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'"))?;
            }
            // The write lock first (writers take it before they touch an index table).
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            tx.batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                INDEX_TABLES.join(", ")
            ))?;
            tx.batch_execute("SET LOCAL lock_timeout = 0")
        })();
        match locked {
            Ok(()) => {}
            Err(e) if limited && e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                drop(tx);
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let (_, added, assigned) = catch_up(store, &mut tx, from)?;
        let mut ddl = format!("DROP TABLE {};", INDEX_TABLES.join(", "));
        for table in INDEX_TABLES {
            ddl.push_str(&format!("ALTER TABLE {table}{REBUILD} RENAME TO {table};"));
        }
        for (_, name) in k_indexes() {
            ddl.push_str(&format!("ALTER INDEX {name}{REBUILD} RENAME TO {name};"));
        }
        for (name, _) in VALUE_INDEXES {
            ddl.push_str(&format!("ALTER INDEX {name}{REBUILD} RENAME TO {name};"));
        }
        // Complete now; without an indexer, every resource is missing from it.
        ddl.push_str(if store.indexer.is_some() {
            "DELETE FROM store_meta WHERE key = 'indexes_stale';"
        } else {
            "INSERT INTO store_meta(key, value) VALUES ('indexes_stale', '1')
             ON CONFLICT (key) DO UPDATE SET value = excluded.value;"
        });
        tx.batch_execute(&ddl)?;
        tx.commit()?;
        // The server re-plans statements on the swapped tables by itself; the pool's
        // connections forget theirs all the same (rare, and no statement outlives a schema
        // change of this store; see `statements`).
        store.pool.forget_statements();
        store.params.extend(assigned);
        if tries > 1 {
            tracing::info!(
                tries,
                "reindex swapped its tables in after waiting for locks"
            );
        }
        return Ok(added);
    }
}

/// The reindex of one type, in one transaction under the write lock: its rows deleted from the
/// live tables and written again (searches see the old rows until the commit).
fn reindex_type(
    store: &PgStore,
    c: &mut Conn,
    resource_type: &str,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64, StoreError> {
    let type_no: Option<i64> = c
        .query_opt(
            "SELECT type_no FROM types WHERE name = $1",
            &[&resource_type],
        )?
        .map(|r| r.get(0));
    let Some(type_no) = type_no else {
        return Ok(0);
    };
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
    let (lo, hi) = (key(type_no, 0), key(type_no, MAX_SEQ));
    for table in INDEX_TABLES {
        tx.execute(
            &format!("DELETE FROM {table} WHERE k > $1 AND k <= $2"),
            &[&lo, &hi],
        )?;
    }
    let (n, assigned) = index_current(store, &mut tx, resource_type, type_no, (0, MAX_SEQ), "")?;
    tx.commit()?;
    store.params.extend(assigned);
    progress(resource_type, n);
    Ok(n)
}
