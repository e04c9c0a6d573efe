//! Type-level scans as of a seq: the types present, counts, seq ranges, the keyset scan export
//! uses (pages of rows without a long transaction), deletions since a seq, the
//! `_lastUpdated`-filtered listing and its count, and the stored size.

use std::ops::ControlFlow;

use super::statements::{Conn, Session};
use ::postgres::fallible_iterator::FallibleIterator;
use ::postgres::types::ToSql;

use crate::{
    ListFilter, ListPage, ScanRow, SeqBounds, SeqStats, StoreError, StoredResource, Tombstone,
};

use super::{PgStore, SCAN_PAGE_ROWS};
use crate::ops::{MAX_SEQ, key};

use super::watermark::seq_at_or_after;

pub(super) fn types_present(store: &PgStore, as_of: i64) -> Result<Vec<String>, StoreError> {
    store.pool.read(|c| {
        let types: Vec<(String, i64)> = c
            .query("SELECT name, type_no FROM types ORDER BY name", &[])?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut out = Vec::new();
        for (name, type_no) in types {
            let any = c.query_opt(
                "SELECT 1 FROM resource_versions WHERE k > $1 AND k <= $2 AND deleted = 0
                 AND (superseded_seq IS NULL OR superseded_seq > $3) LIMIT 1",
                &[&key(type_no, 0), &key(type_no, as_of), &as_of],
            )?;
            if any.is_some() {
                out.push(name);
            }
        }
        // `ORDER BY name` sorts by the database's collation; the contract is byte order.
        out.sort();
        Ok(out)
    })
}

pub(super) fn count_type(
    store: &PgStore,
    resource_type: &str,
    as_of: i64,
) -> Result<u64, StoreError> {
    store.pool.read(|c| {
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Ok(0);
        };
        PgStore::count_as_of(c, type_no, as_of)
    })
}

pub(super) fn seq_range(
    store: &PgStore,
    resource_type: &str,
    as_of: i64,
) -> Result<Option<SeqStats>, StoreError> {
    store.pool.read(|c| {
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Ok(None);
        };
        let count = PgStore::count_as_of(c, type_no, as_of)?;
        if count == 0 {
            return Ok(None);
        }
        let mut edge = |order: &str| -> Result<i64, StoreError> {
            Ok(c.query_one(
                &format!(
                    "SELECT seq FROM resource_versions WHERE k > $1 AND k <= $2 AND deleted = 0
                     AND (superseded_seq IS NULL OR superseded_seq > $3) ORDER BY k {order} LIMIT 1"
                ),
                &[&key(type_no, 0), &key(type_no, as_of), &as_of],
            )?
            .try_get(0)?)
        };
        let min_seq = edge("ASC")?;
        let max_seq = edge("DESC")?;
        Ok(Some(SeqStats {
            min_seq,
            max_seq,
            count,
        }))
    })
}

pub(super) fn scan_type_each(
    store: &PgStore,
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
    // Keyset pages of SCAN_PAGE_ROWS, each its own short statement (no transaction stays
    // open across pages, so a long export holds back no vacuum), rows handed to `f` as they
    // arrive. The snapshot is `as_of`, not a database snapshot, so pages read at different
    // moments still show one snapshot. One connection for the whole scan, unless it turns out
    // closed by a restart while it idled in the pool: the second run (`Pool::read`) goes on
    // after the last row handed to `f` (`after_k` lives outside the closure), never twice.
    let hi = key(type_no, upper);
    let mut after_k = key(type_no, bounds.after);
    let mut n = 0u64;
    let mut pages = |c: &mut Conn| -> Result<u64, StoreError> {
        let stmt = c.prepared(
            "SELECT k, seq, id, version, last_updated, json FROM resource_versions
             WHERE k > $1 AND k <= $2 AND deleted = 0
             AND (superseded_seq IS NULL OR superseded_seq > $3) ORDER BY k LIMIT $4",
        )?;
        loop {
            let params: [&(dyn ToSql + Sync); 4] = [&after_k, &hi, &as_of, &SCAN_PAGE_ROWS];
            let mut rows = c.raw().query_raw(&stmt, params.iter().copied())?;
            let mut in_page = 0i64;
            while let Some(r) = rows.next()? {
                in_page += 1;
                let k = r.try_get(0)?;
                let json: Option<&[u8]> = r.try_get(5)?;
                let row = ScanRow {
                    seq: r.try_get(1)?,
                    id: r.try_get(2)?,
                    version: r.try_get(3)?,
                    last_updated: r.try_get(4)?,
                    json: json.unwrap_or_default(),
                };
                n += 1;
                after_k = k;
                if f(row).is_break() {
                    return Ok(n);
                }
            }
            if in_page < SCAN_PAGE_ROWS {
                return Ok(n);
            }
        }
    };
    store.pool.read(|c| {
        let scanned = pages(c);
        if let Err(StoreError::Postgres(e)) = &scanned {
            c.forget_if_stale(e);
        }
        scanned
    })
}

pub(super) fn deleted_since(
    store: &PgStore,
    resource_type: &str,
    since_seq: i64,
    as_of: i64,
    after_seq: i64,
    limit: usize,
) -> Result<Vec<Tombstone>, StoreError> {
    store.pool.read(|c| {
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Ok(Vec::new());
        };
        let lo = since_seq.max(after_seq);
        if as_of <= lo || limit == 0 {
            return Ok(Vec::new());
        }
        let rows = c.query(
            "SELECT seq, id, version, last_updated FROM resource_versions
             WHERE k > $1 AND k <= $2 AND deleted = 1
             AND (superseded_seq IS NULL OR superseded_seq > $3) ORDER BY k LIMIT $4",
            &[
                &key(type_no, lo),
                &key(type_no, as_of),
                &as_of,
                &sql_limit(limit),
            ],
        )?;
        rows.into_iter()
            .map(|r| {
                Ok(Tombstone {
                    resource_type: resource_type.to_string(),
                    seq: r.try_get(0)?,
                    id: r.try_get(1)?,
                    version: r.try_get(2)?,
                    last_updated: r.try_get(3)?,
                })
            })
            .collect()
    })
}

pub(super) fn list_type(
    store: &PgStore,
    resource_type: &str,
    filter: &ListFilter,
    count: usize,
    after_seq: Option<i64>,
) -> Result<ListPage, StoreError> {
    store.pool.read(|c| {
        let empty = ListPage {
            resources: Vec::new(),
            next_after_seq: None,
        };
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Ok(empty);
        };
        let Some((lo, hi)) = list_bounds(c, filter, after_seq)? else {
            return Ok(empty);
        };
        let to_resource = |r: &::postgres::Row| -> Result<StoredResource, StoreError> {
            Ok(StoredResource {
                resource_type: resource_type.to_string(),
                seq: r.try_get(0)?,
                id: r.try_get(1)?,
                version: r.try_get(2)?,
                last_updated: r.try_get(3)?,
                json: r.try_get(4)?,
            })
        };
        let mut resources: Vec<StoredResource> = Vec::new();
        match &filter.ids {
            Some(ids) => {
                let mut seen = std::collections::HashSet::new();
                let unique: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|id| seen.insert(*id))
                    .collect();
                let rows = c.query(
                    "SELECT seq, id, version, last_updated, json, deleted FROM (
                       SELECT DISTINCT ON (id) seq, id, version, last_updated, json, deleted
                       FROM resource_versions WHERE type_no = $1 AND id = ANY($2)
                       ORDER BY id, version DESC) cur
                     WHERE deleted = 0 AND seq > $3 AND seq <= $4 ORDER BY seq",
                    &[&type_no, &unique, &lo, &hi],
                )?;
                for r in rows.iter().take(count.saturating_add(1)) {
                    resources.push(to_resource(r)?);
                }
            }
            None => {
                let rows = c.query(
                    "SELECT seq, id, version, last_updated, json FROM resource_versions
                     WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0
                     ORDER BY k LIMIT $3",
                    &[
                        &key(type_no, lo),
                        &key(type_no, hi),
                        &sql_limit(count.saturating_add(1)),
                    ],
                )?;
                for r in &rows {
                    resources.push(to_resource(r)?);
                }
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
    })
}

pub(super) fn count_list(
    store: &PgStore,
    resource_type: &str,
    filter: &ListFilter,
) -> Result<u64, StoreError> {
    store.pool.read(|c| {
        let Some(type_no) = store.lookup_type(c, resource_type)? else {
            return Ok(0);
        };
        let Some((lo, hi)) = list_bounds(c, filter, None)? else {
            return Ok(0);
        };
        let n: i64 = match &filter.ids {
            Some(ids) => {
                let mut seen = std::collections::HashSet::new();
                let unique: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|id| seen.insert(*id))
                    .collect();
                c.query_one(
                    "SELECT count(*) FROM (
                       SELECT DISTINCT ON (id) seq, deleted
                       FROM resource_versions WHERE type_no = $1 AND id = ANY($2)
                       ORDER BY id, version DESC) cur
                     WHERE deleted = 0 AND seq > $3 AND seq <= $4",
                    &[&type_no, &unique, &lo, &hi],
                )?
                .try_get(0)?
            }
            None => c
                .query_one(
                    "SELECT count(*) FROM resource_versions
                     WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0",
                    &[&key(type_no, lo), &key(type_no, hi)],
                )?
                .try_get(0)?,
        };
        Ok(n.max(0) as u64)
    })
}

pub(super) fn stored_bytes(store: &PgStore) -> Result<u64, StoreError> {
    store.pool.read(|c| {
        let n: i64 = c
            .query_one("SELECT pg_database_size(current_database())", &[])?
            .try_get(0)?;
        Ok(n.max(0) as u64)
    })
}

impl PgStore {
    /// Current resources of a type at `as_of` (see [`crate::sqlite`]'s `count_as_of`).
    pub(super) fn count_as_of(c: &mut Conn, type_no: i64, as_of: i64) -> Result<u64, StoreError> {
        if as_of <= 0 {
            return Ok(0);
        }
        let lo = key(type_no, 0);
        let hi = key(type_no, as_of);
        let now: i64 = c
            .query_one(
                "SELECT count(*) FROM resource_versions
                 WHERE k > $1 AND k <= $2 AND superseded_seq IS NULL AND deleted = 0",
                &[&lo, &hi],
            )?
            .get(0);
        let replaced_later: i64 = c
            .query_one(
                "SELECT count(*) FROM resource_versions
                 WHERE superseded_seq > $3 AND k > $1 AND k <= $2 AND deleted = 0",
                &[&lo, &hi, &as_of],
            )?
            .get(0);
        Ok((now + replaced_later) as u64)
    }
}

/// The seq window `(lo, hi]` of a listing, from `_lastUpdated` and the page cursor; `None` if empty.
pub(super) fn list_bounds(
    c: &mut Conn,
    filter: &ListFilter,
    after_seq: Option<i64>,
) -> Result<Option<(i64, i64)>, StoreError> {
    let mut lo = after_seq.unwrap_or(0).max(0);
    let mut hi = MAX_SEQ;
    if let Some(from) = filter.updated_from_ms {
        lo = lo.max(seq_at_or_after(c, from)? - 1);
    }
    if let Some(before) = filter.updated_before_ms {
        hi = hi.min(seq_at_or_after(c, before)? - 1);
    }
    Ok((hi > lo).then_some((lo, hi)))
}

pub(super) fn sql_limit(n: usize) -> i64 {
    n.min(i64::MAX as usize) as i64
}
