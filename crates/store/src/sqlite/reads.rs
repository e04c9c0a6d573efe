//! Reads of single resources and of history: `read`, `vread` and `history` (instance, type and
//! system level), with the row-to-resource helpers they share.

use rusqlite::{OptionalExtension, params};

use crate::ops::{
    DEFAULT_HISTORY_COUNT, MAX_HISTORY_PAGE_BYTES, MAX_SEQ, key, method_of, page_cut, small_json,
};
use crate::{HistoryEntry, HistoryPage, HistoryQuery, HistoryScope, StoreError, StoredResource};

use super::SqliteStore;
use super::watermark::seq_at_or_after;

pub(super) fn read(
    store: &SqliteStore,
    resource_type: &str,
    id: &str,
) -> Result<StoredResource, StoreError> {
    let not_found = || StoreError::NotFound {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
    };
    let conn = store.readers.get();
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
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

pub(super) fn vread(
    store: &SqliteStore,
    resource_type: &str,
    id: &str,
    version: i64,
) -> Result<StoredResource, StoreError> {
    let not_found = || StoreError::NotFound {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
    };
    let conn = store.readers.get();
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
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

pub(super) fn history(
    store: &SqliteStore,
    scope: HistoryScope<'_>,
    query: &HistoryQuery,
) -> Result<HistoryPage, StoreError> {
    let count = if query.count == 0 {
        DEFAULT_HISTORY_COUNT
    } else {
        query.count
    };
    let conn = store.readers.get();
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
            len: r.get(7)?,
        })
    };
    let rows: Vec<_> = match scope {
        HistoryScope::Instance { resource_type, id } => {
            let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
                return Err(StoreError::NotFound {
                    resource_type: resource_type.to_string(),
                    id: id.to_string(),
                });
            };
            let rows: Vec<_> = conn
                .prepare_cached(concat!(
                    "SELECT seq, id, version, last_updated, method, ",
                    small_json!("json"),
                    ", type_no, CAST(coalesce(length(json), 0) AS bigint)
                     FROM resource_versions
                     WHERE type_no = ?1 AND id = ?2 AND seq >= ?3 AND seq <= ?4
                     ORDER BY version DESC LIMIT ?5"
                ))?
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
            let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
                return Ok(HistoryPage {
                    entries,
                    next_before_seq: None,
                });
            };
            conn.prepare_cached(concat!(
                "SELECT seq, id, version, last_updated, method, ",
                small_json!("json"),
                ", type_no, CAST(coalesce(length(json), 0) AS bigint)
                 FROM resource_versions WHERE k >= ?1 AND k <= ?2
                 ORDER BY k DESC LIMIT ?3"
            ))?
            .query_map(
                params![key(type_no, lo_seq), key(type_no, hi_seq), limit],
                map,
            )?
            .collect::<Result<_, _>>()?
        }
        HistoryScope::System => conn
            .prepare_cached(concat!(
                "SELECT seq, id, version, last_updated, method, ",
                small_json!("json"),
                ", type_no, CAST(coalesce(length(json), 0) AS bigint)
                 FROM resource_versions WHERE seq >= ?1 AND seq <= ?2
                 ORDER BY seq DESC LIMIT ?3"
            ))?
            .query_map(params![lo_seq, hi_seq, limit], map)?
            .collect::<Result<_, _>>()?,
    };
    let (take, _) = page_cut(
        rows.iter()
            .take(count)
            .map(|r| usize::try_from(r.len).unwrap_or(usize::MAX)),
        query.max_bytes.unwrap_or(MAX_HISTORY_PAGE_BYTES),
    );
    let more = rows.len() > take;
    for row in rows.into_iter().take(take) {
        // A version longer than the rows carry is read now that the page takes it.
        let json = match row.json {
            None if row.len > 0 => Some(
                conn.prepare_cached("SELECT json FROM resource_versions WHERE seq = ?1")?
                    .query_row(params![row.seq], |r| r.get::<_, Vec<u8>>(0))?,
            ),
            json => json,
        };
        entries.push(HistoryEntry {
            resource_type: store.type_name_of(&conn, row.type_no)?,
            id: row.id,
            seq: row.seq,
            version: row.version,
            last_updated: row.last_updated,
            method: method_of(row.method)?,
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
}

pub(super) struct HistoryRow {
    seq: i64,
    id: String,
    version: i64,
    last_updated: String,
    method: i64,
    json: Option<Vec<u8>>,
    type_no: i64,
    /// The stored JSON's length (`json` is `None` beyond 64 KiB, [`crate::ops::small_json!`]).
    len: i64,
}

pub(super) type VersionRow = (i64, i64, String, i64, Option<Vec<u8>>);

pub(super) fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

/// Turn a version row into the resource, or [`StoreError::Gone`] for a tombstone; `None` if there
/// was no row.
pub(super) fn finish_version(
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
