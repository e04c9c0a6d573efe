//! The watermark and the mapping between instants and seqs (`transactions` table): what an
//! export's `as_of` and `_since` are computed from.

use super::statements::Session;

use crate::stamp::format_instant_ms;
use crate::{StoreError, Watermark};

use super::PgStore;

pub(super) fn watermark(store: &PgStore) -> Result<Watermark, StoreError> {
    store.pool.read(|c| {
        let row = c.query_one("SELECT seq, lu_ms FROM watermark", &[])?;
        let (seq, ms): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        Ok(if seq == 0 {
            Watermark {
                seq: 0,
                last_updated: None,
            }
        } else {
            Watermark {
                seq,
                last_updated: Some(format_instant_ms(ms)),
            }
        })
    })
}

pub(super) fn instant_of_seq(store: &PgStore, seq: i64) -> Result<Option<String>, StoreError> {
    store.pool.read(|c| {
        let row = c.query_opt(
            "SELECT lu_ms, first_seq FROM transactions WHERE last_seq >= $1
             ORDER BY last_seq LIMIT 1",
            &[&seq],
        )?;
        Ok(row
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .filter(|(_, first)| *first <= seq)
            .map(|(ms, _)| format_instant_ms(ms)))
    })
}

/// The database server's clock, in ms since the epoch (see the module docs of `postgres`, "One
/// clock").
pub(super) fn database_now_ms(c: &mut impl Session) -> Result<i64, StoreError> {
    Ok(c.query_one(
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        &[],
    )?
    .try_get(0)?)
}

pub(super) fn seq_at_or_after(c: &mut impl Session, instant_ms: i64) -> Result<i64, StoreError> {
    let first: Option<i64> = c
        .query_opt(
            "SELECT first_seq FROM transactions WHERE lu_ms >= $1 ORDER BY lu_ms LIMIT 1",
            &[&instant_ms],
        )?
        .map(|r| r.get(0));
    match first {
        Some(s) => Ok(s),
        None => {
            let last: i64 = c.query_one("SELECT seq FROM watermark", &[])?.get(0);
            Ok(last + 1)
        }
    }
}
