//! WAL checkpoints on a thread of their own. SQLite's automatic checkpoint runs on the connection
//! that committed, after its commit: on the one writer, whose thread is the serial stage of a
//! bulk load (a tenth of an indexed load's samples were the writer copying WAL frames into the
//! database file and syncing it, issue 24). Here the writer's commit only wakes a checkpointing
//! thread, which runs a `PASSIVE` checkpoint on its own connection (it never waits for the
//! writer or a reader) while the writer goes on. The writer still checkpoints itself once the WAL
//! passes [`WRITER_PAGES`] (SQLite's automatic checkpoint as configured before): by then the
//! frames are mostly copied already, and a checkpoint that ends between two transactions is what
//! lets the next one restart the WAL from its beginning, so the file stays bounded.

use std::path::Path;
use std::sync::mpsc::{Receiver, TrySendError, sync_channel};
use std::thread::JoinHandle;

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

use crate::StoreError;

/// WAL pages after a commit from which the checkpointing thread is woken (16 MiB of 8 KiB pages).
const BACKGROUND_PAGES: i32 = 2048;

/// WAL pages after a commit from which the writer checkpoints itself (64 MiB).
const WRITER_PAGES: i32 = 8192;

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
    writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages| {
        if pages >= WRITER_PAGES {
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
