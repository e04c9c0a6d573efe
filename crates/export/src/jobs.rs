//! The durable job queue: export jobs, their work items and their committed files.
//!
//! ```text
//!   kick-off ──> queued ──> running ──> complete ──(retention)──> expired
//!                  │           │  └───> failed
//!                  └───────────┴──────> cancelled
//!   failed, cancelled and expired jobs have their files removed: `cleanup` is set to
//!   `pending` in the same transaction as the state, and to `done` once the deletion succeeded
//!   (retried by the sweeper and at start-up until then).
//!
//!   work item:  pending ──claim──> running ──> done
//!                  ^                  │  └──> failed (attempts exhausted, or not retryable)
//!                  ├── failed transiently: pending again after a back-off (attempt counted)
//!                  ├── released at shutdown: pending at once, the attempt given back
//!                  └── heartbeat older than the timeout: taken over by another worker,
//!                      which resumes from the item's committed cursor
//! ```
//!
//! An export is planned at kick-off into work items: one per (resource type, sequence range), an
//! optional Provenance item, and one `finalize` item that becomes claimable only when every other
//! item of its job is done (it writes `deleted` and warnings and the manifest). Workers claim
//! items, heartbeat them, and commit progress **per finished file part** (the file's number is
//! allocated at commit, so files of a type are numbered 1, 2, … without gaps whatever the order in
//! which items finish). A file row records its temporary name until the rename to its final name
//! is done; a worker that takes an item over first finishes such renames.
//!
//! [`JobQueue`] is the interface (a PostgreSQL implementation with `FOR UPDATE SKIP LOCKED`
//! follows the same contract); [`SqliteJobQueue`] keeps it in `exports.db` beside the store.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// The text form of a state enum as stored in the queue's tables: `as_str`, and `parse` with
/// the first variant for unknown text.
macro_rules! stored_names {
    ($t:ident { $first:ident = $first_name:literal $(, $v:ident = $name:literal)* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self {
                    $t::$first => $first_name,
                    $($t::$v => $name,)*
                }
            }

            fn parse(s: &str) -> $t {
                match s {
                    $($name => $t::$v,)*
                    _ => $t::$first,
                }
            }
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Complete,
    Failed,
    Cancelled,
    /// Complete, and removed after the retention period.
    Expired,
}

stored_names!(JobState {
    Queued = "queued",
    Running = "running",
    Complete = "complete",
    Failed = "failed",
    Cancelled = "cancelled",
    Expired = "expired",
});

/// Whether a finished job's files still have to be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing to remove (an active or complete job).
    None,
    /// The job failed, was cancelled or expired: its files are to be removed.
    Pending,
    /// Its files are removed.
    Done,
}

stored_names!(Cleanup {
    None = "none",
    Pending = "pending",
    Done = "done",
});

impl JobState {
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// One export job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    /// The request as JSON (level, parameters) so any worker, in any process, can run it.
    pub request: String,
    /// The pinned snapshot.
    pub watermark: i64,
    pub transaction_time: String,
    /// The client that started the job (`None` without authorization).
    pub client_id: Option<String>,
    pub container: String,
    /// The export's folder inside the container.
    pub folder: String,
    /// De-identification of the export (JSON: source, name, etag/digest, fingerprint and the
    /// configuration text itself, so a resumed job uses exactly the kick-off's rules).
    pub anonymization: Option<String>,
    /// Manifest JSON when complete; diagnostics when failed.
    pub result: Option<String>,
    /// HTTP status of a failure (4xx for a bad request found late, 5xx otherwise).
    pub failure_status: Option<u16>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// Whether the job's files are still to be removed.
    pub cleanup: Cleanup,
}

/// How a transiently failed item is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Claims per item; the failure of the last one fails the job.
    pub max_attempts: i64,
    /// Back-off after attempt n: `base_ms * 2^(n-1)`, at most `max_ms`.
    pub base_ms: i64,
    pub max_ms: i64,
}

impl Retry {
    /// When an item failed in its `attempt`-th claim may be claimed again.
    pub fn not_before(&self, attempt: i64, now_ms: i64) -> i64 {
        let shift = (attempt - 1).clamp(0, 20) as u32;
        now_ms + self.base_ms.saturating_mul(1i64 << shift).min(self.max_ms)
    }
}

/// What a work item does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// Scan one resource type over a sequence range.
    Scan,
    /// Provenance of exported resources (`includeAssociatedData`).
    Associated,
    /// Deleted entries, warnings, the manifest: runs after every other item is done.
    Finalize,
}

stored_names!(ItemKind {
    Scan = "scan",
    Associated = "associated",
    Finalize = "finalize",
});

/// A planned work item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPlan {
    pub kind: ItemKind,
    pub resource_type: String,
    /// Sequence range `(seq_after, seq_up_to]`.
    pub seq_after: i64,
    pub seq_up_to: i64,
    /// Resources expected in the range (for progress).
    pub expected: u64,
}

/// A claimed work item.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub job_id: String,
    pub item_no: i64,
    pub kind: ItemKind,
    pub resource_type: String,
    pub seq_after: i64,
    pub seq_up_to: i64,
    /// Last sequence number covered by committed files (resume point).
    pub cursor: i64,
    pub expected: u64,
    /// Resources scanned so far, as of the last heartbeat or commit.
    pub scanned: u64,
    /// This claim's attempt number (1 = first); part names include it so that two workers
    /// never write the same temporary object.
    pub attempt: i64,
    pub owner: String,
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// Another worker took the item over, or it is no longer running.
    Lost,
    /// The job was cancelled or failed: stop.
    JobStopped,
}

/// A file part to commit.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// `output`, `deleted` or `error`.
    pub kind: FileKind,
    /// Type in the manifest (`Patient`, `Bundle`, `OperationOutcome`).
    pub resource_type: String,
    /// Name prefix: the file is `<prefix>-<n>.ndjson`.
    pub prefix: String,
    pub count: u64,
    pub bytes: u64,
    /// Temporary path inside the container.
    pub temp_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Output,
    Deleted,
    Error,
}

stored_names!(FileKind {
    Output = "output",
    Deleted = "deleted",
    Error = "error",
});

/// A committed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub kind: FileKind,
    pub resource_type: String,
    pub number: i64,
    /// Final name in the export folder, e.g. `Patient-2.ndjson`.
    pub name: String,
    pub count: u64,
    pub bytes: u64,
    pub item_no: i64,
    /// Set while the temporary object still has to be renamed to `name`.
    pub pending_rename: Option<String>,
}

/// Progress of one type, summed over its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeProgress {
    pub resource_type: String,
    pub scanned: u64,
    pub expected: u64,
    pub done: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job table: {0}")]
    Db(#[from] rusqlite::Error),
    /// The concurrent-export limit is reached (the number of active jobs).
    #[error("{0} exports in progress")]
    Full(u64),
}

/// The job queue contract shared by every backend.
pub trait JobQueue: Send + Sync {
    /// Inserts a job and its work items atomically, unless `max_active` jobs are queued or
    /// running already ([`QueueError::Full`]): admission is decided in the same transaction.
    fn create(
        &self,
        job: &JobRecord,
        items: &[ItemPlan],
        max_active: u64,
    ) -> Result<(), QueueError>;
    fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;
    /// Jobs queued or running.
    fn active_count(&self) -> Result<u64, QueueError>;
    /// Claims the next runnable item: a pending one, or a running one whose heartbeat is older
    /// than `timeout_ms` (taken over) — at most `max_attempts` claims per item. An item whose
    /// attempts are used up (stale, or left pending by a crash) fails its job here.
    fn claim(
        &self,
        owner: &str,
        now_ms: i64,
        timeout_ms: i64,
        max_attempts: i64,
    ) -> Result<Option<WorkItem>, QueueError>;
    /// Refreshes the lease and records the scanned count.
    fn heartbeat(&self, item: &WorkItem, scanned: u64, now_ms: i64) -> Result<Lease, QueueError>;
    /// Commits finished file parts and the item's new cursor atomically; allocates the files'
    /// numbers. `None` when the lease is lost or the job stopped (the caller discards the parts).
    fn commit_files(
        &self,
        item: &WorkItem,
        files: &[NewFile],
        cursor: i64,
        scanned: u64,
        now_ms: i64,
    ) -> Result<Option<Vec<FileRecord>>, QueueError>;
    /// Records that a committed file's temporary object was renamed to its final name.
    fn renamed(&self, job_id: &str, name: &str) -> Result<(), QueueError>;
    /// Marks the item done (only by its lease holder).
    fn complete_item(&self, item: &WorkItem, scanned: u64, now_ms: i64)
    -> Result<bool, QueueError>;
    /// Gives the item back for another attempt after a back-off (`retry`, while attempts
    /// remain), or fails the whole job (its files then to be removed). Returns whether the job
    /// failed.
    fn fail_item(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        retry: Option<Retry>,
        now_ms: i64,
    ) -> Result<bool, QueueError>;
    /// Gives a held item back without counting the attempt (graceful shutdown): claimable at
    /// once, resumed at its committed cursor.
    fn release(&self, item: &WorkItem) -> Result<bool, QueueError>;
    /// [`JobQueue::release`] for every item `owner` holds.
    fn release_owned(&self, owner: &str) -> Result<u64, QueueError>;
    /// Ends a job (a cancelled job is never overwritten).
    fn finish(
        &self,
        id: &str,
        state: JobState,
        result: Option<&str>,
        failure_status: Option<u16>,
        now_ms: i64,
    ) -> Result<(), QueueError>;
    /// Cancels a job durably (its files to be removed).
    fn cancel(&self, id: &str, now_ms: i64) -> Result<(), QueueError>;
    /// Complete jobs finished at or before `finished_before_ms` become `expired` (their files to
    /// be removed). Returns how many.
    fn expire(&self, finished_before_ms: i64) -> Result<u64, QueueError>;
    /// Jobs whose files are still to be removed.
    fn cleanups(&self) -> Result<Vec<JobRecord>, QueueError>;
    /// Records that a job's files are removed.
    fn cleaned(&self, id: &str) -> Result<(), QueueError>;
    fn files(&self, job_id: &str) -> Result<Vec<FileRecord>, QueueError>;
    fn progress(&self, job_id: &str) -> Result<Vec<TypeProgress>, QueueError>;
    /// Single-node start-up: every running item belongs to a process that is gone (the data
    /// directory lock guarantees no other process shares this queue), so it is made claimable
    /// at once instead of after the heartbeat timeout. Returns how many.
    fn release_orphans(&self) -> Result<u64, QueueError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS export_job (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    watermark INTEGER NOT NULL,
    transaction_time TEXT NOT NULL,
    client_id TEXT,
    container TEXT NOT NULL,
    folder TEXT NOT NULL,
    anonymization TEXT,
    result TEXT,
    failure_status INTEGER,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    cleanup TEXT NOT NULL DEFAULT 'none'
);
CREATE INDEX IF NOT EXISTS export_job_state ON export_job(state);
CREATE TABLE IF NOT EXISTS export_item (
    job_id TEXT NOT NULL,
    item_no INTEGER NOT NULL,
    kind TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    seq_after INTEGER NOT NULL,
    seq_up_to INTEGER NOT NULL,
    expected INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    scanned INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    owner TEXT,
    heartbeat_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before_ms INTEGER,
    error TEXT,
    error_status INTEGER,
    PRIMARY KEY (job_id, item_no)
);
CREATE INDEX IF NOT EXISTS export_item_state ON export_item(state);
CREATE TABLE IF NOT EXISTS export_file (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    prefix TEXT NOT NULL,
    number INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    item_no INTEGER NOT NULL,
    pending_rename TEXT,
    PRIMARY KEY (job_id, name)
);
";

const JOB_COLUMNS: &str = "id, state, request, watermark, transaction_time, client_id, container, folder, anonymization, result, failure_status, created_ms, finished_ms, cleanup";

/// Columns added after the first release, for `exports.db` files that predate them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("export_job", "cleanup", "TEXT NOT NULL DEFAULT 'none'"),
    ("export_item", "error_status", "INTEGER"),
];

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: r.get(0)?,
        state: JobState::parse(&r.get::<_, String>(1)?),
        request: r.get(2)?,
        watermark: r.get(3)?,
        transaction_time: r.get(4)?,
        client_id: r.get(5)?,
        container: r.get(6)?,
        folder: r.get(7)?,
        anonymization: r.get(8)?,
        result: r.get(9)?,
        failure_status: r.get::<_, Option<i64>>(10)?.map(|s| s as u16),
        created_ms: r.get(11)?,
        finished_ms: r.get(12)?,
        cleanup: Cleanup::parse(&r.get::<_, String>(13)?),
    })
}

const FILE_COLUMNS: &str =
    "kind, resource_type, number, name, count, bytes, item_no, pending_rename";

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        kind: FileKind::parse(&r.get::<_, String>(0)?),
        resource_type: r.get(1)?,
        number: r.get(2)?,
        name: r.get(3)?,
        count: r.get::<_, i64>(4)? as u64,
        bytes: r.get::<_, i64>(5)? as u64,
        item_no: r.get(6)?,
        pending_rename: r.get(7)?,
    })
}

/// [`JobQueue`] in a SQLite file (WAL).
pub struct SqliteJobQueue {
    conn: Mutex<Connection>,
}

impl SqliteJobQueue {
    pub fn open(path: &Path) -> Result<SqliteJobQueue, QueueError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        for (table, column, decl) in ADDED_COLUMNS {
            let present: bool = conn.query_row(
                &format!("SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
                [column],
                |r| r.get(0),
            )?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            }
        }
        Ok(SqliteJobQueue {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `item` still holds its lease and its job is running; inside a transaction.
fn lease_state(c: &Connection, item: &WorkItem) -> rusqlite::Result<Lease> {
    let row: Option<(String, Option<String>, i64, String)> = c
        .query_row(
            "SELECT i.state, i.owner, i.attempts, j.state FROM export_item i JOIN export_job j ON j.id = i.job_id
             WHERE i.job_id = ?1 AND i.item_no = ?2",
            params![item.job_id, item.item_no],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(match row {
        None => Lease::JobStopped,
        Some((_, _, _, job_state)) if !JobState::parse(&job_state).is_active() => Lease::JobStopped,
        Some((state, owner, attempts, _))
            if state == "running"
                && owner.as_deref() == Some(item.owner.as_str())
                && attempts == item.attempt =>
        {
            Lease::Held
        }
        Some(_) => Lease::Lost,
    })
}

impl JobQueue for SqliteJobQueue {
    fn create(&self, j: &JobRecord, items: &[ItemPlan], max_active: u64) -> Result<(), QueueError> {
        let mut c = self.conn();
        // IMMEDIATE: the count and the insert happen under the write lock, so two kick-offs
        // can never both take the last slot.
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let active: i64 = tx.query_row(
            "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running')",
            [],
            |r| r.get(0),
        )?;
        if active as u64 >= max_active {
            return Err(QueueError::Full(active as u64));
        }
        tx.execute(
            &format!("INSERT INTO export_job ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
            params![j.id, j.state.as_str(), j.request, j.watermark, j.transaction_time, j.client_id, j.container, j.folder, j.anonymization, j.result, j.failure_status.map(i64::from), j.created_ms, j.finished_ms, j.cleanup.as_str()],
        )?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO export_item (job_id, item_no, kind, resource_type, seq_after, seq_up_to, expected, cursor, state)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?5, 'pending')",
            )?;
            for (n, it) in items.iter().enumerate() {
                stmt.execute(params![
                    j.id,
                    n as i64 + 1,
                    it.kind.as_str(),
                    it.resource_type,
                    it.seq_after,
                    it.seq_up_to,
                    it.expected as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM export_job WHERE id = ?1"),
                [id],
                job_row,
            )
            .optional()?)
    }

    fn active_count(&self) -> Result<u64, QueueError> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running')",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    fn claim(
        &self,
        owner: &str,
        now_ms: i64,
        timeout_ms: i64,
        max_attempts: i64,
    ) -> Result<Option<WorkItem>, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Items whose attempts ran out fail their job: stale ones (their holder stopped
        // responding) and pending ones (left by a process that died while running them, or
        // by a lower attempt limit).
        let exhausted: Vec<(String, i64, i64, Option<String>, Option<i64>, bool)> = {
            let mut stmt = tx.prepare(
                "SELECT i.job_id, i.item_no, i.attempts, i.error, i.error_status, i.state = 'running'
                 FROM export_item i JOIN export_job j ON j.id = i.job_id
                 WHERE j.state IN ('queued', 'running') AND i.attempts >= ?2
                   AND (i.state = 'pending' OR (i.state = 'running' AND i.heartbeat_ms < ?1))",
            )?;
            stmt.query_map(params![now_ms - timeout_ms, max_attempts], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        for (job, item_no, attempts, error, status, stale) in exhausted {
            let cause = match (stale, error) {
                (true, _) => "its worker stopped responding".to_string(),
                (false, Some(e)) => e,
                (false, None) => "the server stopped while it ran".to_string(),
            };
            let message = format!(
                "work item {item_no} failed {attempts} times (attempts exhausted): {cause}"
            );
            tx.execute(
                "UPDATE export_item SET state = 'failed', error = ?3 WHERE job_id = ?1 AND item_no = ?2",
                params![job, item_no, message],
            )?;
            tx.execute(
                "UPDATE export_job SET state = 'failed', failure_status = ?3, finished_ms = ?2,
                   result = ?4, cleanup = 'pending'
                 WHERE id = ?1 AND state IN ('queued', 'running')",
                params![
                    job,
                    now_ms,
                    if stale { 500 } else { status.unwrap_or(500) },
                    message
                ],
            )?;
        }
        let found: Option<(String, i64)> = tx
            .query_row(
                "SELECT i.job_id, i.item_no FROM export_item i JOIN export_job j ON j.id = i.job_id
                 WHERE j.state IN ('queued', 'running')
                   AND (i.state = 'pending' OR (i.state = 'running' AND i.heartbeat_ms < ?1))
                   AND i.attempts < ?2
                   AND (i.not_before_ms IS NULL OR i.not_before_ms <= ?3)
                   AND (i.kind != 'finalize' OR NOT EXISTS (
                        SELECT 1 FROM export_item o WHERE o.job_id = i.job_id AND o.kind != 'finalize' AND o.state != 'done'))
                 ORDER BY j.created_ms, i.item_no LIMIT 1",
                params![now_ms - timeout_ms, max_attempts, now_ms],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((job_id, item_no)) = found else {
            tx.commit()?;
            return Ok(None);
        };
        tx.execute(
            "UPDATE export_item SET state = 'running', owner = ?3, heartbeat_ms = ?4, attempts = attempts + 1
             WHERE job_id = ?1 AND item_no = ?2",
            params![job_id, item_no, owner, now_ms],
        )?;
        tx.execute(
            "UPDATE export_job SET state = 'running' WHERE id = ?1 AND state = 'queued'",
            [&job_id],
        )?;
        let item = tx.query_row(
            "SELECT kind, resource_type, seq_after, seq_up_to, cursor, expected, scanned, attempts
             FROM export_item WHERE job_id = ?1 AND item_no = ?2",
            params![job_id, item_no],
            |r| {
                Ok(WorkItem {
                    job_id: job_id.clone(),
                    item_no,
                    kind: ItemKind::parse(&r.get::<_, String>(0)?),
                    resource_type: r.get(1)?,
                    seq_after: r.get(2)?,
                    seq_up_to: r.get(3)?,
                    cursor: r.get(4)?,
                    expected: r.get::<_, i64>(5)? as u64,
                    scanned: r.get::<_, i64>(6)? as u64,
                    attempt: r.get(7)?,
                    owner: owner.to_string(),
                })
            },
        )?;
        tx.commit()?;
        Ok(Some(item))
    }

    fn heartbeat(&self, item: &WorkItem, scanned: u64, now_ms: i64) -> Result<Lease, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let lease = lease_state(&tx, item)?;
        if lease == Lease::Held {
            tx.execute(
                "UPDATE export_item SET heartbeat_ms = ?3, scanned = ?4 WHERE job_id = ?1 AND item_no = ?2",
                params![item.job_id, item.item_no, now_ms, scanned as i64],
            )?;
        }
        tx.commit()?;
        Ok(lease)
    }

    fn commit_files(
        &self,
        item: &WorkItem,
        files: &[NewFile],
        cursor: i64,
        scanned: u64,
        now_ms: i64,
    ) -> Result<Option<Vec<FileRecord>>, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if lease_state(&tx, item)? != Lease::Held {
            return Ok(None);
        }
        let mut records = Vec::with_capacity(files.len());
        for file in files {
            let number: i64 = tx.query_row(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM export_file WHERE job_id = ?1 AND prefix = ?2",
                params![item.job_id, file.prefix],
                |r| r.get(0),
            )?;
            let name = format!("{}-{number}.ndjson", file.prefix);
            tx.execute(
                "INSERT INTO export_file (job_id, name, kind, resource_type, prefix, number, count, bytes, item_no, pending_rename)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![item.job_id, name, file.kind.as_str(), file.resource_type, file.prefix, number, file.count as i64, file.bytes as i64, item.item_no, file.temp_path],
            )?;
            records.push(FileRecord {
                kind: file.kind,
                resource_type: file.resource_type.clone(),
                number,
                name,
                count: file.count,
                bytes: file.bytes,
                item_no: item.item_no,
                pending_rename: Some(file.temp_path.clone()),
            });
        }
        tx.execute(
            "UPDATE export_item SET cursor = ?3, scanned = ?4, heartbeat_ms = ?5 WHERE job_id = ?1 AND item_no = ?2",
            params![item.job_id, item.item_no, cursor, scanned as i64, now_ms],
        )?;
        tx.commit()?;
        Ok(Some(records))
    }

    fn renamed(&self, job_id: &str, name: &str) -> Result<(), QueueError> {
        self.conn().execute(
            "UPDATE export_file SET pending_rename = NULL WHERE job_id = ?1 AND name = ?2",
            params![job_id, name],
        )?;
        Ok(())
    }

    fn complete_item(
        &self,
        item: &WorkItem,
        scanned: u64,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if lease_state(&tx, item)? != Lease::Held {
            return Ok(false);
        }
        tx.execute(
            "UPDATE export_item SET state = 'done', scanned = ?3, heartbeat_ms = ?4 WHERE job_id = ?1 AND item_no = ?2",
            params![item.job_id, item.item_no, scanned as i64, now_ms],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn fail_item(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        retry: Option<Retry>,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut job_failed = false;
        if lease_state(&tx, item)? == Lease::Held {
            match retry {
                Some(r) if item.attempt < r.max_attempts => {
                    // Claimable again after a back-off that doubles per attempt.
                    tx.execute(
                        "UPDATE export_item SET state = 'pending', owner = NULL, error = ?3, error_status = ?4,
                           not_before_ms = ?5 WHERE job_id = ?1 AND item_no = ?2",
                        params![
                            item.job_id,
                            item.item_no,
                            message,
                            i64::from(status),
                            r.not_before(item.attempt, now_ms)
                        ],
                    )?;
                }
                _ => {
                    let message = match retry {
                        Some(_) => format!(
                            "work item {} failed {} times (attempts exhausted): {message}",
                            item.item_no, item.attempt
                        ),
                        None => message.to_string(),
                    };
                    tx.execute(
                        "UPDATE export_item SET state = 'failed', error = ?3, error_status = ?4 WHERE job_id = ?1 AND item_no = ?2",
                        params![item.job_id, item.item_no, message, i64::from(status)],
                    )?;
                    tx.execute(
                        "UPDATE export_job SET state = 'failed', result = ?2, failure_status = ?3, finished_ms = ?4,
                           cleanup = 'pending'
                         WHERE id = ?1 AND state IN ('queued', 'running')",
                        params![item.job_id, message, i64::from(status), now_ms],
                    )?;
                    job_failed = true;
                }
            }
        }
        tx.commit()?;
        Ok(job_failed)
    }

    fn release(&self, item: &WorkItem) -> Result<bool, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if lease_state(&tx, item)? != Lease::Held {
            return Ok(false);
        }
        tx.execute(
            "UPDATE export_item SET state = 'pending', owner = NULL, attempts = max(attempts - 1, 0), not_before_ms = NULL
             WHERE job_id = ?1 AND item_no = ?2",
            params![item.job_id, item.item_no],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn release_owned(&self, owner: &str) -> Result<u64, QueueError> {
        let n = self.conn().execute(
            "UPDATE export_item SET state = 'pending', owner = NULL, attempts = max(attempts - 1, 0), not_before_ms = NULL
             WHERE state = 'running' AND owner = ?1",
            [owner],
        )?;
        Ok(n as u64)
    }

    fn finish(
        &self,
        id: &str,
        state: JobState,
        result: Option<&str>,
        failure_status: Option<u16>,
        now_ms: i64,
    ) -> Result<(), QueueError> {
        let cleanup = if state == JobState::Complete {
            Cleanup::None
        } else {
            Cleanup::Pending
        };
        self.conn().execute(
            "UPDATE export_job SET state = ?2, result = ?3, failure_status = ?4, finished_ms = ?5, cleanup = ?6
             WHERE id = ?1 AND state IN ('queued', 'running')",
            params![
                id,
                state.as_str(),
                result,
                failure_status.map(i64::from),
                now_ms,
                cleanup.as_str()
            ],
        )?;
        Ok(())
    }

    fn cancel(&self, id: &str, now_ms: i64) -> Result<(), QueueError> {
        self.conn().execute(
            "UPDATE export_job SET state = 'cancelled', finished_ms = ?2, cleanup = 'pending' WHERE id = ?1",
            params![id, now_ms],
        )?;
        Ok(())
    }

    fn expire(&self, finished_before_ms: i64) -> Result<u64, QueueError> {
        let n = self.conn().execute(
            "UPDATE export_job SET state = 'expired', cleanup = 'pending', result = NULL
             WHERE state = 'complete' AND finished_ms <= ?1",
            [finished_before_ms],
        )?;
        Ok(n as u64)
    }

    fn cleanups(&self) -> Result<Vec<JobRecord>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM export_job WHERE cleanup = 'pending' ORDER BY finished_ms"
        ))?;
        let rows = stmt.query_map([], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn cleaned(&self, id: &str) -> Result<(), QueueError> {
        self.conn().execute(
            "UPDATE export_job SET cleanup = 'done' WHERE id = ?1 AND cleanup = 'pending'",
            [id],
        )?;
        Ok(())
    }

    fn files(&self, job_id: &str) -> Result<Vec<FileRecord>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!(
            "SELECT {FILE_COLUMNS} FROM export_file WHERE job_id = ?1 ORDER BY kind, prefix, number"
        ))?;
        let rows = stmt.query_map([job_id], file_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn progress(&self, job_id: &str) -> Result<Vec<TypeProgress>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT resource_type, SUM(scanned), SUM(expected), MIN(state = 'done')
             FROM export_item WHERE job_id = ?1 AND kind = 'scan'
             GROUP BY resource_type ORDER BY MIN(item_no)",
        )?;
        let rows = stmt.query_map([job_id], |r| {
            Ok(TypeProgress {
                resource_type: r.get(0)?,
                scanned: r.get::<_, i64>(1)? as u64,
                expected: r.get::<_, i64>(2)? as u64,
                done: r.get::<_, i64>(3)? == 1,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn release_orphans(&self) -> Result<u64, QueueError> {
        // The attempt stays counted (a crash loop ends when the attempts run out), and the
        // cause is recorded for the failure that names it.
        let n = self.conn().execute(
            "UPDATE export_item SET state = 'pending', owner = NULL,
               error = 'the server stopped while it ran', error_status = 500
             WHERE state = 'running'",
            [],
        )?;
        Ok(n as u64)
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
            folder: id.to_string(),
            anonymization: None,
            result: None,
            failure_status: None,
            created_ms,
            finished_ms: None,
            cleanup: Cleanup::None,
        }
    }

    fn scan(t: &str, after: i64, up_to: i64) -> ItemPlan {
        ItemPlan {
            kind: ItemKind::Scan,
            resource_type: t.into(),
            seq_after: after,
            seq_up_to: up_to,
            expected: (up_to - after) as u64,
        }
    }

    fn finalize() -> ItemPlan {
        ItemPlan {
            kind: ItemKind::Finalize,
            resource_type: String::new(),
            seq_after: 0,
            seq_up_to: 0,
            expected: 0,
        }
    }

    fn part(prefix: &str, temp: &str, count: u64) -> NewFile {
        NewFile {
            kind: FileKind::Output,
            resource_type: prefix.into(),
            prefix: prefix.into(),
            count,
            bytes: count * 10,
            temp_path: temp.into(),
        }
    }

    fn open(dir: &tempfile::TempDir) -> SqliteJobQueue {
        SqliteJobQueue::open(&dir.path().join("exports.db")).expect("open")
    }

    #[test]
    fn items_are_claimed_once_and_finalize_waits_for_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(
            &job("a", 1),
            &[scan("Patient", 0, 10), scan("Patient", 10, 20), finalize()],
            10,
        )
        .expect("create");
        assert_eq!(q.active_count().expect("count"), 1);
        let one = q.claim("w1", 100, 1000, 3).expect("claim").expect("item 1");
        let two = q.claim("w2", 100, 1000, 3).expect("claim").expect("item 2");
        assert_eq!((one.item_no, two.item_no), (1, 2));
        // The finalize item waits until both scans are done.
        assert!(q.claim("w3", 100, 1000, 3).expect("claim").is_none());
        assert_eq!(
            q.get("a").expect("get").expect("job").state,
            JobState::Running
        );

        // Files of one prefix are numbered in commit order, whichever item commits.
        let f = q
            .commit_files(&two, &[part("Patient", "_parts/2-1-1", 5)], 15, 5, 101)
            .expect("commit")
            .expect("held");
        assert_eq!(f[0].name, "Patient-1.ndjson");
        let f = q
            .commit_files(&one, &[part("Patient", "_parts/1-1-1", 3)], 4, 3, 101)
            .expect("commit")
            .expect("held");
        assert_eq!(f[0].name, "Patient-2.ndjson");
        q.renamed("a", "Patient-1.ndjson").expect("renamed");
        let files = q.files("a").expect("files");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].pending_rename, None);
        assert_eq!(files[1].pending_rename.as_deref(), Some("_parts/1-1-1"));

        assert!(q.complete_item(&one, 10, 102).expect("complete"));
        assert!(q.claim("w3", 103, 1000, 3).expect("claim").is_none());
        assert!(q.complete_item(&two, 10, 103).expect("complete"));
        let fin = q
            .claim("w3", 104, 1000, 3)
            .expect("claim")
            .expect("finalize");
        assert_eq!(fin.kind, ItemKind::Finalize);
        let progress = q.progress("a").expect("progress");
        assert_eq!(progress.len(), 1);
        assert_eq!((progress[0].scanned, progress[0].done), (20, true));
        q.finish("a", JobState::Complete, Some("{}"), None, 105)
            .expect("finish");
        assert_eq!(q.active_count().expect("count"), 0);
    }

    #[test]
    fn a_stale_item_is_taken_over_from_its_cursor_and_the_old_owner_loses_its_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(&job("a", 1), &[scan("Observation", 0, 100)], 10)
            .expect("create");
        let old = q
            .claim("node-1", 1_000, 600_000, 3)
            .expect("claim")
            .expect("item");
        q.commit_files(
            &old,
            &[part("Observation", "_parts/1-1-1", 40)],
            40,
            40,
            2_000,
        )
        .expect("commit")
        .expect("held");
        // Within the timeout nobody else may take it.
        assert!(
            q.claim("node-2", 500_000, 600_000, 3)
                .expect("claim")
                .is_none()
        );
        // After the timeout without heartbeat, node-2 takes it over and resumes at the cursor.
        let new = q
            .claim("node-2", 700_000, 600_000, 3)
            .expect("claim")
            .expect("taken over");
        assert_eq!((new.cursor, new.attempt, new.scanned), (40, 2, 40));
        // The old owner learns it at its next heartbeat or commit, and cannot commit.
        assert_eq!(q.heartbeat(&old, 50, 700_001).expect("hb"), Lease::Lost);
        assert!(
            q.commit_files(
                &old,
                &[part("Observation", "_parts/1-1-2", 10)],
                50,
                50,
                700_002
            )
            .expect("commit")
            .is_none()
        );
        assert!(!q.complete_item(&old, 100, 700_003).expect("complete"));
        assert_eq!(q.heartbeat(&new, 60, 700_004).expect("hb"), Lease::Held);
        assert!(q.complete_item(&new, 100, 700_005).expect("complete"));
    }

    #[test]
    fn attempts_are_bounded_and_cancel_stops_workers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        let i = q.claim("w", 0, 10, 2).expect("claim").expect("1");
        assert!(
            !q.fail_item(&i, "destination unreachable", 503, Some(RETRY), 1)
                .expect("retry")
        );
        // Retried after a back-off, not at once.
        assert!(q.claim("w", 2, 10, 2).expect("claim").is_none());
        let i = q.claim("w", 2_001, 10, 2).expect("claim").expect("2");
        assert_eq!(i.attempt, 2);
        // Stale again with attempts exhausted: the job fails instead of looping forever.
        assert!(q.claim("w", 3_000, 10, 2).expect("claim").is_none());
        let a = q.get("a").expect("get").expect("job");
        assert_eq!((a.state, a.failure_status), (JobState::Failed, Some(500)));

        q.create(&job("b", 2), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        let i = q.claim("w", 200, 10, 3).expect("claim").expect("b");
        q.cancel("b", 201).expect("cancel");
        assert_eq!(q.heartbeat(&i, 1, 202).expect("hb"), Lease::JobStopped);
        // A runner finishing late never overwrites the cancel.
        q.finish("b", JobState::Complete, Some("{}"), None, 203)
            .expect("finish");
        assert_eq!(
            q.get("b").expect("get").expect("job").state,
            JobState::Cancelled
        );
    }

    const RETRY: Retry = Retry {
        max_attempts: 2,
        base_ms: 2_000,
        max_ms: 60_000,
    };

    #[test]
    fn a_transient_failure_of_the_last_attempt_fails_the_job_with_its_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        let i = q.claim("w", 0, 10_000, 2).expect("claim").expect("1");
        assert!(
            !q.fail_item(&i, "s3 unavailable", 503, Some(RETRY), 1)
                .expect("fail")
        );
        let i = q.claim("w", 5_000, 10_000, 2).expect("claim").expect("2");
        // The second failure is the last allowed attempt: the job fails, nothing stays pending.
        assert!(
            q.fail_item(&i, "s3 unavailable", 503, Some(RETRY), 5_001)
                .expect("fail")
        );
        assert!(q.claim("w", 999_999, 10_000, 2).expect("claim").is_none());
        let a = q.get("a").expect("get").expect("job");
        assert_eq!((a.state, a.failure_status), (JobState::Failed, Some(503)));
        assert!(
            a.result
                .as_deref()
                .is_some_and(|r| r.contains("s3 unavailable"))
        );
        assert_eq!(a.cleanup, Cleanup::Pending);
        assert_eq!(q.active_count().expect("count"), 0);
        assert_eq!(q.cleanups().expect("cleanups").len(), 1);
        q.cleaned("a").expect("cleaned");
        assert!(q.cleanups().expect("cleanups").is_empty());
    }

    #[test]
    fn a_crash_loop_fails_the_job_once_the_attempts_are_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        for n in 1..=2 {
            let i = q.claim("w", n, 600_000, 2).expect("claim").expect("item");
            assert_eq!(i.attempt, n);
            // The process dies; the next one releases the item.
            assert_eq!(q.release_orphans().expect("release"), 1);
        }
        assert!(q.claim("w", 10, 600_000, 2).expect("claim").is_none());
        let a = q.get("a").expect("get").expect("job");
        assert_eq!((a.state, a.failure_status), (JobState::Failed, Some(500)));
        assert!(
            a.result
                .as_deref()
                .is_some_and(|r| r.contains("the server stopped while it ran")),
            "{:?}",
            a.result
        );
    }

    #[test]
    fn a_released_item_keeps_its_cursor_and_gets_its_attempt_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        for _ in 0..5 {
            let i = q.claim("w", 1, 600_000, 1).expect("claim").expect("item");
            assert_eq!(i.attempt, 1);
            q.commit_files(&i, &[part("Patient", "_parts/x", 1)], i.cursor + 1, 1, 2)
                .expect("commit")
                .expect("held");
            assert!(q.release(&i).expect("release"));
            // The released holder has lost its lease.
            assert_eq!(q.heartbeat(&i, 1, 3).expect("hb"), Lease::Lost);
        }
        let i = q.claim("w", 1, 600_000, 1).expect("claim").expect("item");
        assert_eq!(i.cursor, 5);
        assert_eq!(q.release_owned("w").expect("release"), 1);
        assert_eq!(
            q.get("a").expect("get").expect("job").state,
            JobState::Running
        );
    }

    #[test]
    fn admission_is_refused_in_the_creating_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = open(&dir);
        q.create(&job("a", 1), &[finalize()], 2).expect("a");
        q.create(&job("b", 2), &[finalize()], 2).expect("b");
        assert!(matches!(
            q.create(&job("c", 3), &[finalize()], 2),
            Err(QueueError::Full(2))
        ));
        assert!(q.get("c").expect("get").is_none());
    }

    #[test]
    fn orphans_of_a_dead_process_are_released_on_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let q = open(&dir);
            q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
                .expect("create");
            q.claim("dead", 0, 600_000, 3)
                .expect("claim")
                .expect("item");
        }
        let q = open(&dir);
        assert!(q.claim("new", 1, 600_000, 3).expect("claim").is_none());
        assert_eq!(q.release_orphans().expect("release"), 1);
        let i = q.claim("new", 2, 600_000, 3).expect("claim").expect("item");
        assert_eq!(i.attempt, 2);
        assert!(q.get("missing").expect("get").is_none());
    }
}
