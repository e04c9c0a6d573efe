//! WAL checkpoints on a thread of their own. SQLite's automatic checkpoint runs on the connection
//! that committed, after its commit: on the one writer, whose thread is the serial stage of a
//! bulk load (a tenth of an indexed load's samples were the writer copying WAL frames into the
//! database file and syncing it, issue 24). Here the writer's commit only wakes a checkpointing
//! thread, which runs a `PASSIVE` checkpoint on its own connection (it never waits for the
//! writer or a reader) while the writer goes on. The writer still checkpoints itself once the WAL
//! passes [`WRITER_PAGES`] (SQLite's automatic checkpoint as configured before): by then the
//! frames are mostly copied already, and a checkpoint that ends between two transactions is what
//! lets the next one restart the WAL from its beginning, so the file stays bounded.
//!
//! Except under readers that overlap without a pause (several clients searching while others
//! write): a `PASSIVE` checkpoint never waits, the WAL restarts only when no reader is in it, and
//! so it grew without end — 140 KB per update, 1.5 GB in 50 s, 34 GB until the disk was full in
//! a review. Past [`LIMIT_PAGES`] the writer itself therefore runs a `TRUNCATE` checkpoint
//! after its commit, which waits for the readers in the WAL up to the writer's busy timeout
//! (5 s): once every frame is copied, new readers read the database file alone, the readers
//! already in the WAL end, and the WAL starts over at zero bytes. At most one such attempt per
//! [`TRUNCATE_EVERY`], so a reader that outlasts the wait delays the writer now and then, not at
//! every commit. (The checkpointing thread cannot do it: a busy writer wins every race for the
//! write lock against its busy handler.)

use std::path::Path;
use std::sync::mpsc::{Receiver, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

use crate::StoreError;

/// WAL pages after a commit from which the checkpointing thread is woken (16 MiB of 8 KiB pages).
const BACKGROUND_PAGES: i32 = 2048;

/// WAL pages after a commit from which the writer checkpoints itself (64 MiB).
const WRITER_PAGES: i32 = 8192;

/// WAL pages after a commit from which the thread waits for the readers to leave the WAL and
/// truncates it (256 MiB; 4 MiB in unit tests).
const LIMIT_PAGES: i32 = if cfg!(test) { 512 } else { 4 * WRITER_PAGES };

/// At most one truncating checkpoint per this long (10 ms in unit tests, which write fast).
const TRUNCATE_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(10)
} else {
    Duration::from_secs(2)
};

/// The checkpointing thread of a store; it ends once the writer connection that wakes it is
/// closed (dropping the wake-up's sender). Dropping this waits for it.
pub(super) struct Checkpointer {
    thread: Option<JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start the checkpointing thread of the database at `path` and hand its wake-ups to `writer`'s
/// commits (replacing SQLite's automatic checkpoint on that connection).
pub(super) fn start(writer: &mut Connection, path: &Path) -> Result<Checkpointer, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    let (wake, woken) = sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("fhirhose-checkpoint".into())
        .spawn(move || run(conn, woken))
        .map_err(|e| StoreError::Corrupt(format!("cannot start the checkpoint thread: {e}")))?;
    let mut last_truncate: Option<Instant> = None;
    writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages| {
        if pages >= LIMIT_PAGES && last_truncate.is_none_or(|t| t.elapsed() >= TRUNCATE_EVERY) {
            // On the writer, between two of its transactions (another thread's checkpoint
            // loses every race for the write lock to a busy writer).
            last_truncate = Some(Instant::now());
            truncate(wal, pages);
        } else if pages >= WRITER_PAGES {
            // BUSY (the thread is at it) is fine: the next commit tries again.
            let _ = wal.checkpoint_v2(CheckpointMode::PASSIVE);
        } else if pages >= BACKGROUND_PAGES {
            // Full: a wake-up is pending already; disconnected: the thread ended.
            let _: Result<(), TrySendError<()>> = wake.try_send(());
        }
        Ok(())
    }))?;
    Ok(Checkpointer {
        thread: Some(thread),
    })
}

fn run(conn: Connection, woken: Receiver<()>) {
    while woken.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))
        {
            tracing::warn!(error = %e, "background WAL checkpoint failed");
        }
    }
}

/// A `TRUNCATE` checkpoint of a WAL of `pages` pages, on the writer: it waits for the readers
/// in the WAL as long as the writer's busy timeout (5 s) and holds new writers back meanwhile.
fn truncate(wal: &mut rusqlite::hooks::Wal, pages: i32) {
    match wal.checkpoint_v2(CheckpointMode::TRUNCATE) {
        Ok(_) => tracing::info!(
            wal_pages = pages,
            "WAL truncated after it outgrew its limit under readers"
        ),
        Err(e) => tracing::warn!(
            wal_pages = pages,
            error = %e,
            "the WAL is past its limit and a reader outlasted the wait to truncate it; trying again"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// Review: with readers that overlap without a pause, the WAL grew without end (PASSIVE
    /// checkpoints only, and the WAL restarts only when no reader is in it). Two reader threads
    /// keep a read transaction open at every moment while the writer commits far more than the
    /// limit; the WAL file stays within a few times the limit.
    #[test]
    fn the_wal_stays_bounded_under_readers_that_never_pause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let mut writer = Connection::open(&path).expect("open");
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA page_size = 8192; PRAGMA synchronous = NORMAL;
                 PRAGMA busy_timeout = 5000; CREATE TABLE t(x BLOB); INSERT INTO t VALUES (x'00');",
            )
            .expect("schema");
        let checkpointer = start(&mut writer, &path).expect("checkpointer");
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..2)
            .map(|i| {
                let (path, stop, reads) = (path.clone(), stop.clone(), reads.clone());
                std::thread::spawn(move || {
                    let mut conn = Connection::open(&path).expect("reader");
                    // Staggered: one reader is always inside a read transaction.
                    std::thread::sleep(Duration::from_millis(5 * i));
                    while !stop.load(Ordering::Relaxed) {
                        let tx = conn.transaction().expect("read transaction");
                        let _: i64 = tx
                            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                            .expect("read");
                        std::thread::sleep(Duration::from_millis(3));
                        drop(tx);
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let wal = path.with_file_name("db-wal");
        let limit = LIMIT_PAGES as u64 * 8192;
        let blob = vec![7u8; 64 * 1024];
        let mut largest = 0;
        // 5 × the limit written, in 64 KiB commits.
        for _ in 0..(5 * limit / blob.len() as u64) {
            writer
                .execute("INSERT INTO t VALUES (?1)", [&blob])
                .expect("write");
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
        drop(writer);
        drop(checkpointer);
        assert!(reads.load(Ordering::Relaxed) > 10, "the readers ran");
        assert!(
            largest < 3 * limit,
            "the WAL reached {largest} bytes (limit {limit})"
        );
    }
}
