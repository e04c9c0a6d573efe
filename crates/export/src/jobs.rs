//! The durable job table.
//!
//! ```text
//!   kick-off ──> queued ──> running ──> complete
//!                  │           │  └───> failed
//!                  └───────────┴──────> cancelled (files removed)
//!   server restart: running ──> queued (run again from the pinned snapshot)
//! ```
//!
//! Jobs live in `exports.db` beside the store's database (SQLite, WAL). Progress is committed
//! per finished file, never per resource.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Complete,
    Failed,
    Cancelled,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Complete => "complete",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> JobState {
        match s {
            "running" => JobState::Running,
            "complete" => JobState::Complete,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Queued,
        }
    }
}

/// One export job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    /// The request as JSON (level, parameters) so a restarted server can run it again.
    pub request: String,
    /// The pinned snapshot.
    pub watermark: i64,
    pub transaction_time: String,
    /// The client that started the job (`None` without authorization).
    pub client_id: Option<String>,
    pub container: String,
    /// Manifest JSON when complete; OperationOutcome diagnostics when failed.
    pub result: Option<String>,
    /// Human progress text, committed per file.
    pub progress: String,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

/// The job table.
pub struct JobStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS export_jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    watermark INTEGER NOT NULL,
    transaction_time TEXT NOT NULL,
    client_id TEXT,
    container TEXT NOT NULL,
    result TEXT,
    progress TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX IF NOT EXISTS export_jobs_state ON export_jobs(state);
";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: r.get(0)?,
        state: JobState::parse(&r.get::<_, String>(1)?),
        request: r.get(2)?,
        watermark: r.get(3)?,
        transaction_time: r.get(4)?,
        client_id: r.get(5)?,
        container: r.get(6)?,
        result: r.get(7)?,
        progress: r.get(8)?,
        created_ms: r.get(9)?,
        finished_ms: r.get(10)?,
    })
}

const COLUMNS: &str = "id, state, request, watermark, transaction_time, client_id, container, result, progress, created_ms, finished_ms";

impl JobStore {
    pub fn open(path: &Path) -> rusqlite::Result<JobStore> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(JobStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, j: &JobRecord) -> rusqlite::Result<()> {
        self.conn().execute(
            &format!("INSERT INTO export_jobs ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
            params![j.id, j.state.as_str(), j.request, j.watermark, j.transaction_time, j.client_id, j.container, j.result, j.progress, j.created_ms, j.finished_ms],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> rusqlite::Result<Option<JobRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM export_jobs WHERE id = ?1"),
                [id],
                row,
            )
            .optional()
    }

    /// Jobs that must (still) run: queued ones, and running ones a previous process left behind.
    pub fn unfinished(&self) -> rusqlite::Result<Vec<JobRecord>> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!("SELECT {COLUMNS} FROM export_jobs WHERE state IN ('queued', 'running') ORDER BY created_ms"))?;
        let rows = stmt.query_map([], row)?;
        rows.collect()
    }

    pub fn active_count(&self) -> rusqlite::Result<u64> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM export_jobs WHERE state IN ('queued', 'running')",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
    }

    /// Claims a queued job: only one runner moves it to running.
    pub fn start(&self, id: &str) -> rusqlite::Result<bool> {
        let n = self.conn().execute(
            "UPDATE export_jobs SET state = 'running', attempts = attempts + 1 WHERE id = ?1 AND state IN ('queued', 'running')",
            [id],
        )?;
        Ok(n == 1)
    }

    pub fn progress(&self, id: &str, text: &str) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE export_jobs SET progress = ?2 WHERE id = ?1",
            params![id, text],
        )?;
        Ok(())
    }

    /// Final state; a cancelled job is never overwritten by a runner finishing late.
    pub fn finish(
        &self,
        id: &str,
        state: JobState,
        result: Option<&str>,
        now_ms: i64,
    ) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE export_jobs SET state = ?2, result = ?3, finished_ms = ?4 WHERE id = ?1 AND state != 'cancelled'",
            params![id, state.as_str(), result, now_ms],
        )?;
        Ok(())
    }

    pub fn cancel(&self, id: &str, now_ms: i64) -> rusqlite::Result<()> {
        self.conn().execute(
            "UPDATE export_jobs SET state = 'cancelled', finished_ms = ?2 WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, created_ms: i64) -> JobRecord {
        JobRecord {
            id: id.to_string(),
            state: JobState::Queued,
            request: "{}".to_string(),
            watermark: 7,
            transaction_time: "2026-01-01T00:00:00Z".to_string(),
            client_id: Some("client-a".to_string()),
            container: "fhirhose".to_string(),
            result: None,
            progress: String::new(),
            created_ms,
            finished_ms: None,
        }
    }

    #[test]
    fn state_machine_and_restart_survival() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exports.db");
        {
            let jobs = JobStore::open(&path).expect("open");
            jobs.insert(&job("a", 1)).expect("insert a");
            jobs.insert(&job("b", 2)).expect("insert b");
            assert_eq!(jobs.active_count().expect("count"), 2);
            assert!(jobs.start("a").expect("start"));
            jobs.progress("a", "Patient 1 of 2").expect("progress");
        }
        // A new process sees the running job as unfinished and may claim it again.
        let jobs = JobStore::open(&path).expect("reopen");
        let open: Vec<String> = jobs
            .unfinished()
            .expect("unfinished")
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(open, ["a", "b"]);
        let a = jobs.get("a").expect("get").expect("present");
        assert_eq!(a.state, JobState::Running);
        assert_eq!(a.progress, "Patient 1 of 2");
        assert_eq!(a.client_id.as_deref(), Some("client-a"));
        assert!(jobs.start("a").expect("restart"));

        jobs.finish("a", JobState::Complete, Some("{\"output\":[]}"), 10)
            .expect("finish");
        let a = jobs.get("a").expect("get").expect("present");
        assert_eq!(a.state, JobState::Complete);
        assert_eq!(a.finished_ms, Some(10));
        // A finished job cannot be claimed again.
        assert!(!jobs.start("a").expect("start finished"));

        // Cancel wins over a runner that finishes late.
        jobs.cancel("b", 11).expect("cancel");
        jobs.finish("b", JobState::Complete, Some("{}"), 12)
            .expect("late finish");
        let b = jobs.get("b").expect("get").expect("present");
        assert_eq!(b.state, JobState::Cancelled);
        assert_eq!(jobs.active_count().expect("count"), 0);
        assert!(jobs.get("missing").expect("get").is_none());
    }
}
