//! The watermark and the mapping between instants and seqs (`transactions` table): what an
//! export's `as_of` and `_since` are computed from.

use rusqlite::{Connection, OptionalExtension};

use crate::stamp::format_instant_ms;
use crate::{StoreError, Watermark};

use super::SqliteStore;

pub(super) fn watermark(store: &SqliteStore) -> Result<Watermark, StoreError> {
    let conn = store.readers.get();
    let row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT lu_ms, last_seq FROM transactions ORDER BY lu_ms DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match row {
        Some((ms, seq)) => Watermark {
            seq,
            last_updated: Some(format_instant_ms(ms)),
        },
        None => Watermark {
            seq: 0,
            last_updated: None,
        },
    })
}

pub(super) fn instant_of_seq(store: &SqliteStore, seq: i64) -> Result<Option<String>, StoreError> {
    let conn = store.readers.get();
    let row: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT lu_ms, first_seq FROM transactions WHERE last_seq >= ?1
             ORDER BY last_seq LIMIT 1",
        )?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row
        .filter(|(_, first)| *first <= seq)
        .map(|(ms, _)| format_instant_ms(ms)))
}

pub(super) fn seq_at_or_after(conn: &Connection, instant_ms: i64) -> Result<i64, StoreError> {
    let first: Option<i64> = conn
        .prepare_cached(
            "SELECT first_seq FROM transactions WHERE lu_ms >= ?1 ORDER BY lu_ms LIMIT 1",
        )?
        .query_row([instant_ms], |r| r.get(0))
        .optional()?;
    match first {
        Some(s) => Ok(s),
        None => {
            let last: i64 = conn
                .prepare_cached("SELECT coalesce(max(last_seq), 0) FROM transactions")?
                .query_row([], |r| r.get(0))?;
            Ok(last + 1)
        }
    }
}
