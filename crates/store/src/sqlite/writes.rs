//! The write path: one write transaction per [`Store::write`] call (seq and lastUpdated
//! assignment, version rows, superseding, index rows), and the WAL checkpoint.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::ops::{Body, MAX_SEQ, Prepared, key, method_code, prepare};
use crate::stamp::{PreparedResource, format_instant_ms};
use crate::{HistoryMethod, StoreError, WriteOp, WriteOutcome, WriteStatus};

use super::SqliteStore;
use super::index_upkeep::{IndexInserts, delete_index_rows};

pub(super) fn checkpoint(store: &SqliteStore) -> Result<bool, StoreError> {
    let w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
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

pub(super) fn write(
    store: &SqliteStore,
    ops: Vec<WriteOp>,
) -> Result<Vec<WriteOutcome>, StoreError> {
    let prepared: Vec<Prepared> = ops.into_iter().map(prepare).collect::<Result<_, _>>()?;
    let mut w = store.writer.lock().unwrap_or_else(|e| e.into_inner());
    // A request that stopped waiting while this write waited for the writer gets nothing done.
    crate::give_up::still_waited_for()?;
    let mut names: Vec<&str> = prepared.iter().map(|p| p.resource_type.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    store.register_types(&mut w, &names)?;

    let now = chrono::Utc::now().timestamp_millis();
    let lu_ms = now.max(w.last_ms + 1);
    let last_updated = format_instant_ms(lu_ms);
    let first_seq = w.last_seq + 1;
    let mut seq = w.last_seq;
    let mut outcomes = Vec::with_capacity(prepared.len());

    let tx = w
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)?;
    let assigned_params = {
        let mut insert = tx.prepare_cached(
            "INSERT INTO resource_versions
             (k, seq, type_no, id, version, last_updated, method, deleted, superseded_seq, json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?9)",
        )?;
        let mut supersede =
            tx.prepare_cached("UPDATE resource_versions SET superseded_seq = ?1 WHERE k = ?2")?;
        let mut index_inserts = match store.indexer {
            Some(_) => Some(IndexInserts::new(&tx, &store.params, &store.systems)?),
            None => None,
        };
        for p in prepared {
            let type_no = store
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
            if p.must_exist && current.as_ref().is_none_or(|c| c.deleted) {
                return Err(StoreError::UpdateWouldCreate {
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
                if let Some(inserts) = &mut index_inserts {
                    inserts.forget(c.k);
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
            let mut ready = match resource {
                Body::Ready(ready) => ready,
                Body::Json(m) => {
                    PreparedResource::build(&p.resource_type, &id, m, store.indexer.as_deref())?
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
                if let Some(inserts) = &mut index_inserts
                    && !c.deleted
                {
                    inserts.forget(c.k);
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
                let Some(entries) = ready.index.take() else {
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
        match index_inserts {
            Some(mut inserts) => {
                inserts.finish()?;
                Some(inserts.into_assigned())
            }
            None => None,
        }
    };
    crate::give_up::before_commit()?;
    tx.commit()?;
    if let Some(assigned) = assigned_params {
        store.remember_numbers(assigned);
    }
    if seq >= first_seq {
        w.last_seq = seq;
        w.last_ms = lu_ms;
    }
    Ok(outcomes)
}

/// The newest version of a resource, as the write path needs it.
pub(super) struct Current {
    k: i64,
    version: i64,
    deleted: bool,
}

pub(super) fn current_of(
    conn: &Connection,
    type_no: i64,
    id: &str,
) -> Result<Option<Current>, StoreError> {
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
