//! Type-level scans as of a seq: the types present, counts, seq ranges, the streaming scan export
//! uses, deletions since a seq, the `_lastUpdated`-filtered listing and its count, and the stored
//! size.

use std::ops::ControlFlow;

use rusqlite::{Connection, OptionalExtension, params};

use crate::ops::{MAX_SEQ, key};
use crate::{
    ListFilter, ListPage, ScanRow, SeqBounds, SeqStats, StoreError, StoredResource, Tombstone,
};

use super::SqliteStore;
use super::watermark::seq_at_or_after;

pub(super) fn types_present(store: &SqliteStore, as_of: i64) -> Result<Vec<String>, StoreError> {
    let conn = store.readers.get();
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

pub(super) fn count_type(
    store: &SqliteStore,
    resource_type: &str,
    as_of: i64,
) -> Result<u64, StoreError> {
    let conn = store.readers.get();
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
        return Ok(0);
    };
    count_as_of(&conn, type_no, as_of)
}

pub(super) fn seq_range(
    store: &SqliteStore,
    resource_type: &str,
    as_of: i64,
) -> Result<Option<SeqStats>, StoreError> {
    let conn = store.readers.get();
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
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

pub(super) fn scan_type_each(
    store: &SqliteStore,
    resource_type: &str,
    as_of: i64,
    bounds: SeqBounds,
    f: &mut dyn FnMut(ScanRow<'_>) -> ControlFlow<()>,
) -> Result<u64, StoreError> {
    let Some(type_no) = store.type_no(resource_type)? else {
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
            let conn = store.readers.get();
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

pub(super) fn deleted_since(
    store: &SqliteStore,
    resource_type: &str,
    since_seq: i64,
    as_of: i64,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<Tombstone>, StoreError> {
    let conn = store.readers.get();
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
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

pub(super) fn list_type(
    store: &SqliteStore,
    resource_type: &str,
    filter: &ListFilter,
    count: usize,
    after_seq: Option<i64>,
) -> Result<ListPage, StoreError> {
    let conn = store.readers.get();
    let empty = ListPage {
        resources: Vec::new(),
        next_after_seq: None,
    };
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
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

pub(super) fn count_list(
    store: &SqliteStore,
    resource_type: &str,
    filter: &ListFilter,
) -> Result<u64, StoreError> {
    let conn = store.readers.get();
    let Some(type_no) = store.lookup_type(&conn, resource_type)? else {
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

pub(super) fn stored_bytes(store: &SqliteStore) -> Result<u64, StoreError> {
    let conn = store.readers.get();
    let bytes: i64 = conn.query_row(
        "SELECT (page_count - freelist_count) * page_size
         FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )?;
    Ok(bytes.max(0) as u64)
}

/// Current resources of a type at `as_of`: those current now with seq <= as_of (partial index),
/// plus those superseded after as_of by a newer version (few, through `rv_superseded`).
pub(super) fn count_as_of(conn: &Connection, type_no: i64, as_of: i64) -> Result<u64, StoreError> {
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
pub(super) fn list_bounds(
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
