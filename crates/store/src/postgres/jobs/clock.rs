//! The database server's clock, on which the queue keeps its leases.
//!
//! Several nodes share one queue, and each passes its own clock's time. A node whose clock is
//! behind by more than the heartbeat timeout would write heartbeats that the other nodes see
//! as stale, so they would take over every item it runs; a node ahead would take over theirs,
//! and retry delays and cleanup holds written by one node would mean something else to another.
//! So the queue moves every lease time it is given (heartbeats, the stale cut-off, retry
//! not-before times, cleanup holds) onto the database server's clock, by an offset measured
//! against `clock_timestamp()` and measured again every [`REMEASURE`]. Job timestamps shown to
//! users (created, finished) stay on the node's clock. The resources' `lastUpdated` (and so an
//! export's `transactionTime` and what `_since` compares) is the database's clock itself, read
//! in the write's transaction (see the module docs of `postgres`, "One clock").

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::super::statements::Session;

/// How long a measured offset is used before it is measured again.
pub(super) const REMEASURE: Duration = Duration::from_secs(30);

/// The offset between this process's clock and the database server's.
#[derive(Debug, Default)]
pub(super) struct SharedClock {
    /// Database clock minus this process's clock (ms), and when it was measured.
    measured: Mutex<Option<(i64, Instant)>>,
}

impl SharedClock {
    /// `local_ms` (a time on this process's clock) on the database server's clock; the offset
    /// is measured on `c` first when it is older than [`REMEASURE`] (one query).
    pub(super) fn shared(
        &self,
        c: &mut impl Session,
        local_ms: i64,
    ) -> Result<i64, ::postgres::Error> {
        let known = *self.measured.lock().unwrap_or_else(|e| e.into_inner());
        let offset = match known {
            Some((offset, at)) if at.elapsed() < REMEASURE => offset,
            _ => {
                let offset = measure(c)?;
                *self.measured.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((offset, Instant::now()));
                if offset.abs() > 1_000 {
                    tracing::warn!(
                        offset_ms = offset,
                        "this node's clock differs from the database server's; the job queue's leases use the database's clock"
                    );
                }
                offset
            }
        };
        Ok(local_ms.saturating_add(offset))
    }
}

/// Database clock minus this process's clock, in ms, taken at the middle of the round trip.
fn measure(c: &mut impl Session) -> Result<i64, ::postgres::Error> {
    let before = now_ms();
    let db: i64 = c
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )?
        .get(0);
    let after = now_ms();
    Ok(db - (before + (after - before) / 2))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
