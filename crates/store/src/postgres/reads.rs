//! Reads of single resources and of history: `read`, `vread` and `history` (instance, type and
//! system level), with the row-to-resource helper they share.

use ::postgres::types::Type;

use super::statements::Session;

use crate::{HistoryEntry, HistoryPage, HistoryQuery, HistoryScope, StoreError, StoredResource};

use super::PgStore;
use crate::ops::{
    DEFAULT_HISTORY_COUNT, MAX_HISTORY_PAGE_BYTES, MAX_SEQ, key, method_of, page_cut, small_json,
};

use super::scans::sql_limit;
use super::watermark::seq_at_or_after;

pub(super) fn read(
    store: &PgStore,
    resource_type: &str,
    id: &str,
) -> Result<StoredResource, StoreError> {
    let not_found = || StoreError::NotFound {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
    };
    store.pool.read(|c| {
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Err(not_found());
        };
        // With its parameter types: one round trip (a statement given as text is prepared
        // first, a round trip of its own).
        let row = c.query_typed_opt(
            "SELECT seq, version, last_updated, deleted, json FROM resource_versions
             WHERE type_no = $1 AND id = $2 ORDER BY version DESC LIMIT 1",
            &[(&type_no, Type::INT8), (&id, Type::TEXT)],
        )?;
        match row {
            Some(row) => finish_version(row, resource_type, id),
            None => Err(not_found()),
        }
    })
}

pub(super) fn vread(
    store: &PgStore,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<StoredResource, StoreError> {
    let not_found = || StoreError::NotFound {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
    };
    store.pool.read(|c| {
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Err(not_found());
        };
        let row = c.query_typed_opt(
            "SELECT seq, version, last_updated, deleted, json FROM resource_versions
             WHERE type_no = $1 AND id = $2 AND version = $3",
            &[
                (&type_no, Type::INT8),
                (&id, Type::TEXT),
                (&version, Type::INT8),
            ],
        )?;
        match row {
            Some(row) => finish_version(row, resource_type, id),
            None => Err(not_found()),
        }
    })
}

pub(super) fn history(
    store: &PgStore,
    scope: HistoryScope<'_>,
    query: &HistoryQuery,
) -> Result<HistoryPage, StoreError> {
    let count = if query.count == 0 {
        DEFAULT_HISTORY_COUNT
    } else {
        query.count
    };
    store.pool.read(|c| {
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
                let Some(type_no) = store.lookup_type(c, resource_type)? else {
                    return Err(StoreError::NotFound {
                        resource_type: resource_type.to_string(),
                        id: id.to_string(),
                    });
                };
                let rows = c.query(
                    concat!(
                        "SELECT seq, id, version, last_updated, method, ",
                        small_json!("json"),
                        ", type_no, CAST(coalesce(length(json), 0) AS bigint)
                     FROM resource_versions
                     WHERE type_no = $1 AND id = $2 AND seq >= $3 AND seq <= $4
                     ORDER BY version DESC LIMIT $5"
                    ),
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
                let Some(type_no) = store.lookup_type(c, resource_type)? else {
                    return Ok(HistoryPage {
                        entries: Vec::new(),
                        next_before_seq: None,
                    });
                };
                c.query(
                    concat!(
                        "SELECT seq, id, version, last_updated, method, ",
                        small_json!("json"),
                        ", type_no, CAST(coalesce(length(json), 0) AS bigint)
                     FROM resource_versions WHERE k >= $1 AND k <= $2
                     ORDER BY k DESC LIMIT $3"
                    ),
                    &[&key(type_no, lo_seq), &key(type_no, hi_seq), &limit],
                )?
            }
            HistoryScope::System => c.query(
                concat!(
                    "SELECT seq, id, version, last_updated, method, ",
                    small_json!("json"),
                    ", type_no, CAST(coalesce(length(json), 0) AS bigint)
                 FROM resource_versions WHERE seq >= $1 AND seq <= $2
                 ORDER BY seq DESC LIMIT $3"
                ),
                &[&lo_seq, &hi_seq, &limit],
            )?,
        };
        let len = |row: &::postgres::Row| -> usize {
            row.try_get::<_, i64>(7)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(usize::MAX)
        };
        let (take, _) = page_cut(
            rows.iter().take(count).map(len),
            query.max_bytes.unwrap_or(MAX_HISTORY_PAGE_BYTES),
        );
        let more = rows.len() > take;
        let mut entries = Vec::with_capacity(take);
        for row in rows.into_iter().take(take) {
            let type_no: i64 = row.try_get(6)?;
            let seq: i64 = row.try_get(0)?;
            // A version longer than the rows carry is read now that the page takes it.
            let json: Option<Vec<u8>> = match row.try_get(5)? {
                None if len(&row) > 0 => Some(
                    c.query_one("SELECT json FROM resource_versions WHERE seq = $1", &[&seq])?
                        .try_get(0)?,
                ),
                json => json,
            };
            entries.push(HistoryEntry {
                resource_type: store.type_name_of(c, type_no)?,
                id: row.try_get(1)?,
                seq,
                version: row.try_get(2)?,
                last_updated: row.try_get(3)?,
                method: method_of(row.try_get(4)?)?,
                json,
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

/// Turn a version row `(seq, version, last_updated, deleted, json)` into the resource, or
/// [`StoreError::Gone`] for a tombstone.
pub(super) fn finish_version(
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
