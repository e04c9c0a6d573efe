//! The database server's clock, on which the queue keeps its leases.
//!
//! Several nodes share one queue, and each passes its own clock's time. A node whose clock is
//! behind by more than the heartbeat timeout would write heartbeats that the other nodes see
//! as stale, so they would take over every item it runs; a node ahead would take over theirs,
//! and retry delays and cleanup holds written by one node would mean something else to another.
//! So the queue moves every lease time it is given (heartbeats, the stale cut-off, retry
//! not-before times, cleanup holds) onto the database server's clock, by an offset measured
//! against `clock_timestamp()` and measured again every [`REMEASURE`], or at once when this
//! machine's wall clock has stepped since (it left the monotonic clock). Job timestamps shown to
//! users (created, finished) stay on the node's clock. The resources' `lastUpdated` (and so an
//! export's `transactionTime` and what `_since` compares) is the database's clock itself, read
//! in the write's transaction (see the module docs of `postgres`, "One clock").

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::super::statements::Session;

/// How long a measured offset is used before it is measured again.
pub(super) const REMEASURE: Duration = Duration::from_secs(30);

/// The offset between this process's clock and the database server's, and when it was measured.
#[derive(Debug, Default)]
pub(super) struct SharedClock {
    measured: Mutex<Option<Measured>>,
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Database clock minus this process's clock (ms).
    offset: i64,
    /// This process's wall clock (ms) and monotonic clock at the measurement.
    wall_ms: i64,
    at: Instant,
}

impl Measured {
    /// Whether the offset still holds: younger than [`REMEASURE`], and the wall clock has moved
    /// with the monotonic clock since (a step of the wall clock — an NTP correction, a resumed
    /// VM — would otherwise move every lease written in the rest of the window by the step).
    fn holds(&self) -> bool {
        let elapsed = self.at.elapsed();
        let monotonic = i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX);
        let wall = now_ms().saturating_sub(self.wall_ms);
        elapsed < REMEASURE && wall.saturating_sub(monotonic).abs() <= STEP_MS
    }
}

/// A disagreement between the wall and monotonic clocks since the measurement (ms) taken for a
/// step: well above the slew NTP applies (at most 0.5 ms/s) and scheduling noise.
const STEP_MS: i64 = 250;

impl SharedClock {
    /// `local_ms` (a time on this process's clock) on the database server's clock; the offset
    /// is measured on `c` first when it no longer holds ([`Measured::holds`]: one query).
    pub(super) fn shared(
        &self,
        c: &mut impl Session,
        local_ms: i64,
    ) -> Result<i64, ::postgres::Error> {
        let known = *self.measured.lock().unwrap_or_else(|e| e.into_inner());
        let offset = match known {
            Some(m) if m.holds() => m.offset,
            _ => {
                let m = measure(c)?;
                *self.measured.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
                if m.offset.abs() > 1_000 {
                    tracing::warn!(
                        offset_ms = m.offset,
                        "this node's clock differs from the database server's; the job queue's leases use the database's clock"
                    );
                }
                m.offset
            }
        };
        Ok(local_ms.saturating_add(offset))
    }
}

/// Database clock minus this process's clock, in ms, taken at the middle of the round trip.
fn measure(c: &mut impl Session) -> Result<Measured, ::postgres::Error> {
    let (before, at) = (now_ms(), Instant::now());
    let db: i64 = c
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            &[],
        )?
        .get(0);
    let after = now_ms();
    let wall_ms = before + (after - before) / 2;
    Ok(Measured {
        offset: db - wall_ms,
        wall_ms,
        at: at + at.elapsed() / 2,
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_holds_until_the_wall_clock_leaves_the_monotonic_one() {
        let fresh = Measured {
            offset: 5_000,
            wall_ms: now_ms(),
            at: Instant::now(),
        };
        assert!(fresh.holds());
        // Measured 2 s ago on both clocks: still good.
        let steady = Measured {
            wall_ms: now_ms() - 2_000,
            at: Instant::now() - Duration::from_secs(2),
            ..fresh
        };
        assert!(steady.holds());
        // The wall clock stepped 20 minutes ahead since (it reads 20 min + 2 s later, the
        // monotonic clock 2 s): measured again at once, not trusted for the rest of the window.
        let stepped = Measured {
            wall_ms: now_ms() - 2_000 - 20 * 60_000,
            ..steady
        };
        assert!(!stepped.holds());
        let back = Measured {
            wall_ms: now_ms() + 60_000,
            ..steady
        };
        assert!(!back.holds());
        // Older than the window.
        let old = Measured {
            wall_ms: now_ms() - 31_000,
            at: Instant::now() - Duration::from_secs(31),
            ..fresh
        };
        assert!(!old.holds());
    }
}
