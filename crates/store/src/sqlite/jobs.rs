//! [`JobQueue`] on SQLite: the export job tables.
//!
//! # Why a separate file
//!
//! The job tables live in `exports.db` beside `fhirhose.db` in the data directory, not in the
//! resource database, **because SQLite has one writer lock per database file**: the bulk loader
//! (and a large transaction Bundle) holds the resource database's write lock for seconds at a
//! time, and export workers must heartbeat their items, commit file parts and admit kick-offs
//! meanwhile. In a separate file they never wait for resource writes (PostgreSQL has row
//! locks, so its job tables are in the same database as the resources). The queue is opened by
//! [`crate::Store::jobs`] of the store whose data directory it belongs to.
//!
//! # Schema (`PRAGMA user_version` = [`JOBS_SCHEMA_VERSION`])
//!
//! `export_job`, `export_item` and `export_file` (columns below); `deid_key_set` (version 3);
//! `auth_jti`, the client assertions accepted until they expire ([`AssertionRecord`], version
//! 4); `export_item.full_since_ms`, when an item's wait for space at a full destination began
//! ([`JobQueue::wait_for_space`], version 5); `export_job.expired_ms`, when a job expired
//! ([`JobQueue::purge`] counts from it), and the cleanup state `parts` (a complete job's
//! temporary parts folder left, [`Cleanup::Parts`]), version 6. Every state column is text
//! constrained by a `CHECK (… IN (…))` over the names of its enum in [`crate::jobs`]. A file of
//! the first schema (`user_version` 0, no constraints, maybe without the later columns) is
//! migrated at open in one transaction — after checking that every stored state is one this
//! version knows; if not, the open fails and names the value. A file with a newer
//! `user_version` is refused.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::StoreError;
use crate::shared::AssertionRecord;

mod keysets;
use crate::jobs::{
    Admission, Cleanup, FileKind, FileRecord, ITEM_STATES, ItemKind, ItemPlan, ItemProgress,
    JobQueue, JobRecord, JobState, Lease, NewFile, Orphans, QueueError, Retry, SpaceWait,
    SpaceWaited, TypeProgress, UnknownName, WorkItem, check_in,
};

/// The job tables' schema version (`PRAGMA user_version` of `exports.db`). 0 is the first,
/// unconstrained schema (migrated at open).
pub const JOBS_SCHEMA_VERSION: i64 = 6;

/// What version 3 added to version 2: file digests and de-identification key sets (issue 21).
const SCHEMA_V3_FROM_V2: &str = "ALTER TABLE export_file ADD COLUMN sha256 TEXT;";

/// What version 4 added to version 3: the accepted client assertions (as PostgreSQL's
/// `auth_jti`), so that a restart does not forget them.
const SCHEMA_V4_FROM_V3: &str = "
CREATE TABLE auth_jti (
    iss TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_s INTEGER NOT NULL,
    PRIMARY KEY (iss, jti)
) WITHOUT ROWID;
CREATE INDEX auth_jti_expires ON auth_jti(expires_s);
";

/// What version 5 added to version 4: when an item's wait for space began.
const SCHEMA_V5_FROM_V4: &str = "ALTER TABLE export_item ADD COLUMN full_since_ms INTEGER;";

/// What version 6 changed in version 5: `export_job` gains `expired_ms` and its `cleanup`
/// constraint the state `parts`. SQLite changes a `CHECK` constraint only by rebuilding the
/// table: renamed, created anew, its rows copied (the columns of version 5 are
/// [`JOB_COLUMNS`]).
fn schema_v6_from_v5() -> String {
    format!(
        "ALTER TABLE export_job RENAME TO old_export_job;
         DROP INDEX IF EXISTS export_job_state;
         {}
         INSERT INTO export_job ({JOB_COLUMNS}) SELECT {JOB_COLUMNS} FROM old_export_job;
         DROP TABLE old_export_job;",
        job_table()
    )
}

/// Seconds between two purges of expired assertions.
const JTI_PURGE_EVERY_S: i64 = 60;

/// The file name of the job queue in a data directory.
pub const JOBS_FILE_NAME: &str = "exports.db";

impl From<rusqlite::Error> for QueueError {
    /// An unknown stored state (refused by the `FromSql` of its enum) stays that error; every
    /// other failure is the database's, kept as the source.
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::FromSqlConversionFailure(_, _, source) = &e
            && let Some(unknown) = source.downcast_ref::<UnknownName>()
        {
            return QueueError::Unknown(unknown.clone());
        }
        QueueError::Db(StoreError::Sqlite(e))
    }
}

/// `FromSql` of a text enum: its `FromStr`, an unknown name an error.
macro_rules! from_sql_text {
    ($($t:ty),+) => {$(
        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e: UnknownName| FromSqlError::Other(Box::new(e)))
            }
        }
    )+};
}

from_sql_text!(JobState, Cleanup, ItemKind, FileKind);

/// The job table of [`JOBS_SCHEMA_VERSION`] and its index.
fn job_table() -> String {
    let job_state = check_in("state", JobState::NAMES);
    let cleanup = check_in("cleanup", Cleanup::NAMES);
    format!(
        "
CREATE TABLE export_job (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL {job_state},
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
    cleanup TEXT NOT NULL DEFAULT 'none' {cleanup},
    expired_ms INTEGER
);
CREATE INDEX export_job_state ON export_job(state);"
    )
}

/// The tables of [`JOBS_SCHEMA_VERSION`].
fn schema() -> String {
    let job_table = job_table();
    let item_kind = check_in("kind", ItemKind::NAMES);
    let item_state = check_in("state", ITEM_STATES);
    let file_kind = check_in("kind", FileKind::NAMES);
    let key_sets = crate::keysets::KEY_SET_TABLE;
    let auth_jti = SCHEMA_V4_FROM_V3;
    format!(
        "{job_table}
CREATE TABLE export_item (
    job_id TEXT NOT NULL,
    item_no INTEGER NOT NULL,
    kind TEXT NOT NULL {item_kind},
    resource_type TEXT NOT NULL,
    seq_after INTEGER NOT NULL,
    seq_up_to INTEGER NOT NULL,
    expected INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    scanned INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL {item_state},
    owner TEXT,
    heartbeat_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before_ms INTEGER,
    error TEXT,
    error_status INTEGER,
    full_since_ms INTEGER,
    PRIMARY KEY (job_id, item_no)
);
CREATE INDEX export_item_state ON export_item(state);
CREATE TABLE export_file (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL {file_kind},
    resource_type TEXT NOT NULL,
    prefix TEXT NOT NULL,
    number INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    item_no INTEGER NOT NULL,
    pending_rename TEXT,
    sha256 TEXT,
    PRIMARY KEY (job_id, name)
);
{key_sets}{auth_jti}"
    )
}

/// Columns the first schema gained after its first release (files that predate them lack them).
const FIRST_SCHEMA_ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("export_job", "cleanup", "TEXT NOT NULL DEFAULT 'none'"),
    ("export_item", "error_status", "INTEGER"),
];

/// The stored names each state column may hold, for the check before a migration.
fn state_columns() -> [(
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
); 5] {
    [
        ("export_job", "state", "job state", JobState::NAMES),
        ("export_job", "cleanup", "cleanup state", Cleanup::NAMES),
        ("export_item", "kind", "item kind", ItemKind::NAMES),
        ("export_item", "state", "item state", ITEM_STATES),
        ("export_file", "kind", "file kind", FileKind::NAMES),
    ]
}

/// Creates the tables, or brings a file of the first schema to [`JOBS_SCHEMA_VERSION`] in one
/// transaction; refuses a newer schema or a stored state this version does not know.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), QueueError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == JOBS_SCHEMA_VERSION {
        return Ok(());
    }
    if (2..=5).contains(&version) {
        if version == 2 {
            tx.execute_batch(SCHEMA_V3_FROM_V2)?;
            tx.execute_batch(crate::keysets::KEY_SET_TABLE)?;
        }
        if version <= 3 {
            tx.execute_batch(SCHEMA_V4_FROM_V3)?;
        }
        if version <= 4 {
            tx.execute_batch(SCHEMA_V5_FROM_V4)?;
        }
        tx.execute_batch(&schema_v6_from_v5())?;
        tx.pragma_update(None, "user_version", JOBS_SCHEMA_VERSION)?;
        crate::give_up::before_commit()?;
        tx.commit()?;
        tracing::info!(file = %path.display(), version = JOBS_SCHEMA_VERSION, "export job tables migrated");
        return Ok(());
    }
    if version != 0 {
        return Err(QueueError::Db(StoreError::Corrupt(format!(
            "{} has job schema version {version}; this version of fhirhose knows {JOBS_SCHEMA_VERSION} (written by a newer version?)",
            path.display()
        ))));
    }
    let existing: bool = tx.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'export_job'",
        [],
        |r| r.get(0),
    )?;
    if !existing {
        tx.execute_batch(&schema())?;
    } else {
        for (table, column, decl) in FIRST_SCHEMA_ADDED_COLUMNS {
            let present: bool = tx.query_row(
                &format!("SELECT count(*) > 0 FROM pragma_table_info('{table}') WHERE name = ?1"),
                [column],
                |r| r.get(0),
            )?;
            if !present {
                tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            }
        }
        for (table, column, what, names) in state_columns() {
            let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
            let unknown: Option<String> = tx
                .query_row(
                    &format!(
                        "SELECT {column} FROM {table} WHERE {column} NOT IN ({}) LIMIT 1",
                        list.join(", ")
                    ),
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(value) = unknown {
                return Err(QueueError::Unknown(UnknownName { what, value }));
            }
        }
        // SQLite adds CHECK constraints only by rebuilding a table.
        tx.execute_batch(
            "ALTER TABLE export_job RENAME TO old_export_job;
             ALTER TABLE export_item RENAME TO old_export_item;
             ALTER TABLE export_file RENAME TO old_export_file;
             DROP INDEX IF EXISTS export_job_state;
             DROP INDEX IF EXISTS export_item_state;",
        )?;
        tx.execute_batch(&schema())?;
        tx.execute_batch(&format!(
            "INSERT INTO export_job ({JOB_COLUMNS}) SELECT {JOB_COLUMNS} FROM old_export_job;
             INSERT INTO export_item ({ITEM_COLUMNS}) SELECT {ITEM_COLUMNS} FROM old_export_item;
             INSERT INTO export_file ({ALL_FILE_COLUMNS}) SELECT {ALL_FILE_COLUMNS} FROM old_export_file;
             DROP TABLE old_export_job;
             DROP TABLE old_export_item;
             DROP TABLE old_export_file;"
        ))?;
        tracing::info!(file = %path.display(), version = JOBS_SCHEMA_VERSION, "export job tables migrated");
    }
    tx.pragma_update(None, "user_version", JOBS_SCHEMA_VERSION)?;
    crate::give_up::before_commit()?;
    tx.commit()?;
    Ok(())
}

const ITEM_COLUMNS: &str = "job_id, item_no, kind, resource_type, seq_after, seq_up_to, expected, cursor, scanned, state, owner, heartbeat_ms, attempts, not_before_ms, error, error_status";

const ALL_FILE_COLUMNS: &str =
    "job_id, name, kind, resource_type, prefix, number, count, bytes, item_no, pending_rename";

const JOB_COLUMNS: &str = "id, state, request, watermark, transaction_time, client_id, container, folder, anonymization, result, failure_status, created_ms, finished_ms, cleanup";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: r.get(0)?,
        state: r.get(1)?,
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
        cleanup: r.get(13)?,
    })
}

const FILE_COLUMNS: &str =
    "kind, resource_type, number, name, count, bytes, item_no, pending_rename, sha256";

fn file_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        kind: r.get(0)?,
        resource_type: r.get(1)?,
        number: r.get(2)?,
        name: r.get(3)?,
        count: r.get::<_, i64>(4)? as u64,
        bytes: r.get::<_, i64>(5)? as u64,
        item_no: r.get(6)?,
        pending_rename: r.get(7)?,
        sha256: r.get(8)?,
    })
}

/// Whether lease or hold `owner` is an earlier incarnation of node `node` (not `current`), as
/// the SQL of [`JobQueue::release_orphans`] decides it.
fn orphans_owner(owner: &str, node: &str, current: &str) -> bool {
    owner != current
        && owner
            .strip_prefix(node)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// [`JobQueue`] in a SQLite file (WAL).
pub struct SqliteJobQueue {
    conn: Mutex<Connection>,
    /// Deletions in progress ([`JobQueue::hold_cleanup`]): job → (held until (ms), owner).
    cleanup_holds: Mutex<std::collections::HashMap<String, (i64, String)>>,
    /// When expired assertions were last purged (unix seconds).
    jti_purged_s: std::sync::atomic::AtomicI64,
}

impl SqliteJobQueue {
    /// Opens (creating or migrating) the job tables in the SQLite file at `path`.
    pub fn open(path: &Path) -> Result<SqliteJobQueue, QueueError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn, path)?;
        Ok(SqliteJobQueue {
            conn: Mutex::new(conn),
            cleanup_holds: Mutex::new(std::collections::HashMap::new()),
            jti_purged_s: std::sync::atomic::AtomicI64::new(0),
        })
    }

    /// A private queue in memory (a one-off export run in the calling thread).
    pub fn open_in_memory() -> Result<SqliteJobQueue, QueueError> {
        let mut conn = Connection::open_in_memory()?;
        migrate(&mut conn, Path::new(":memory:"))?;
        Ok(SqliteJobQueue {
            conn: Mutex::new(conn),
            cleanup_holds: Mutex::new(std::collections::HashMap::new()),
            jti_purged_s: std::sync::atomic::AtomicI64::new(0),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a job's cleanup `from` as done (`to`) and drops its hold.
    fn cleanup_done(&self, id: &str, from: &str, to: &str) -> Result<(), QueueError> {
        self.conn().execute(
            "UPDATE export_job SET cleanup = ?3 WHERE id = ?1 AND cleanup = ?2",
            rusqlite::params![id, from, to],
        )?;
        self.cleanup_holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }
}

impl AssertionRecord for SqliteJobQueue {
    fn remember_once(
        &self,
        scope: &str,
        key: &str,
        until_s: i64,
        now_s: i64,
    ) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering;
        let last = self.jti_purged_s.load(Ordering::Relaxed);
        let purge = now_s.saturating_sub(last) >= JTI_PURGE_EVERY_S;
        let c = self.conn();
        if purge {
            self.jti_purged_s.store(now_s, Ordering::Relaxed);
            c.execute("DELETE FROM auth_jti WHERE expires_s < ?1", [now_s])?;
        }
        // Inserted, or an expired row of the same key taken over: a row comes back. A live row
        // of the key (a replay) returns none.
        Ok(c.query_row(
            "INSERT INTO auth_jti (iss, jti, expires_s) VALUES (?1, ?2, ?3)
             ON CONFLICT (iss, jti) DO UPDATE SET expires_s = excluded.expires_s
               WHERE auth_jti.expires_s < ?4
             RETURNING 1",
            params![scope, key, until_s, now_s],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
    }
}

/// Whether `item` still holds its lease and its job is running; inside a transaction.
fn lease_state(c: &Connection, item: &WorkItem) -> rusqlite::Result<Lease> {
    let row: Option<(String, Option<String>, i64, JobState)> = c
        .query_row(
            "SELECT i.state, i.owner, i.attempts, j.state FROM export_item i JOIN export_job j ON j.id = i.job_id
             WHERE i.job_id = ?1 AND i.item_no = ?2",
            params![item.job_id, item.item_no],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(match row {
        None => Lease::JobStopped,
        Some((_, _, _, job_state)) if !job_state.is_active() => Lease::JobStopped,
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

/// Whether `item`'s job is complete with the item done under the same owner and attempt: its
/// completion ([`JobQueue::complete_job`]) committed already.
fn completed_by(c: &Connection, item: &WorkItem) -> rusqlite::Result<bool> {
    Ok(c.query_row(
        "SELECT 1 FROM export_item i JOIN export_job j ON j.id = i.job_id
             WHERE i.job_id = ?1 AND i.item_no = ?2 AND i.state = 'done' AND i.owner = ?3
               AND i.attempts = ?4 AND j.state = 'complete'",
        params![item.job_id, item.item_no, item.owner, item.attempt],
        |_| Ok(()),
    )
    .optional()?
    .is_some())
}

impl JobQueue for SqliteJobQueue {
    fn create_admitted(
        &self,
        j: &JobRecord,
        items: &[ItemPlan],
        admission: Admission,
    ) -> Result<(), QueueError> {
        let mut c = self.conn();
        // IMMEDIATE: the counts and the insert happen under the write lock, so two kick-offs
        // can never both take the last slot (the server's, or one client's).
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let active: i64 = tx.query_row(
            "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running')",
            [],
            |r| r.get(0),
        )?;
        if active as u64 >= admission.max_active {
            return Err(QueueError::Full(active as u64));
        }
        if let Some(client) = &j.client_id {
            let mine: i64 = tx.query_row(
                "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running') AND client_id = ?1",
                [client],
                |r| r.get(0),
            )?;
            if mine as u64 >= admission.max_per_client {
                return Err(QueueError::ClientFull(mine as u64));
            }
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
        crate::give_up::before_commit()?;
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

    fn active_count_of(&self, client: &str) -> Result<u64, QueueError> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running') AND client_id = ?1",
            [client],
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
        /// An item out of attempts: job, item, attempts, its last error and status, and whether
        /// it was running (its worker stopped responding).
        type Exhausted = (String, i64, i64, Option<String>, Option<i64>, bool);
        let exhausted: Vec<Exhausted> = {
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
            crate::give_up::before_commit()?;
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
                    kind: r.get(0)?,
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
        crate::give_up::before_commit()?;
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
        crate::give_up::before_commit()?;
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
            let name = crate::jobs::file_name(&file.prefix, number);
            tx.execute(
                "INSERT INTO export_file (job_id, name, kind, resource_type, prefix, number, count, bytes, item_no, pending_rename, sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![item.job_id, name, file.kind.as_str(), file.resource_type, file.prefix, number, file.count as i64, file.bytes as i64, item.item_no, file.temp_path, file.sha256],
            )?;
            records.push(FileRecord {
                kind: file.kind,
                resource_type: file.resource_type.clone(),
                number,
                name,
                count: file.count,
                bytes: file.bytes,
                sha256: file.sha256.clone(),
                item_no: item.item_no,
                pending_rename: Some(file.temp_path.clone()),
            });
        }
        tx.execute(
            "UPDATE export_item SET cursor = ?3, scanned = ?4, heartbeat_ms = ?5, full_since_ms = NULL
             WHERE job_id = ?1 AND item_no = ?2",
            params![item.job_id, item.item_no, cursor, scanned as i64, now_ms],
        )?;
        crate::give_up::before_commit()?;
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
        crate::give_up::before_commit()?;
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
                    fail_item_and_job(&tx, item, &message, status, now_ms)?;
                    job_failed = true;
                }
            }
        }
        crate::give_up::before_commit()?;
        tx.commit()?;
        Ok(job_failed)
    }

    fn wait_for_space(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        wait: SpaceWait,
        now_ms: i64,
    ) -> Result<SpaceWaited, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if lease_state(&tx, item)? != Lease::Held {
            return Ok(SpaceWaited::NotHeld);
        }
        let since: i64 = tx
            .query_row(
                "SELECT full_since_ms FROM export_item WHERE job_id = ?1 AND item_no = ?2",
                params![item.job_id, item.item_no],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .unwrap_or(now_ms);
        let waited_ms = now_ms.saturating_sub(since).max(0);
        let outcome = match wait.next_try(since, now_ms) {
            Some(at) => {
                tx.execute(
                    "UPDATE export_item SET state = 'pending', owner = NULL, attempts = max(attempts - 1, 0),
                       not_before_ms = ?3, full_since_ms = ?4
                     WHERE job_id = ?1 AND item_no = ?2",
                    params![item.job_id, item.item_no, at, since],
                )?;
                SpaceWaited::Waiting {
                    waited_ms,
                    retry_in_ms: at - now_ms,
                }
            }
            None => {
                let message = crate::jobs::space_wait_over(message, waited_ms);
                fail_item_and_job(&tx, item, &message, status, now_ms)?;
                SpaceWaited::JobFailed
            }
        };
        crate::give_up::before_commit()?;
        tx.commit()?;
        Ok(outcome)
    }

    fn space_wait(&self, id: &str, now_ms: i64) -> Result<Option<i64>, QueueError> {
        let since: Option<i64> = self.conn().query_row(
            "SELECT MIN(full_since_ms) FROM export_item
             WHERE job_id = ?1 AND state IN ('pending', 'running')",
            [id],
            |r| r.get(0),
        )?;
        Ok(since.map(|s| now_ms.saturating_sub(s).max(0)))
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
        crate::give_up::before_commit()?;
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

    fn release_unheld(
        &self,
        owner: &str,
        held: &[(String, i64)],
        ran: &[(String, i64)],
    ) -> Result<u64, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let running = tx
            .prepare(
                "SELECT job_id, item_no FROM export_item WHERE state = 'running' AND owner = ?1",
            )?
            .query_map([owner], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut n = 0;
        for key in running.iter().filter(|k| !held.contains(k)) {
            // A claim whose answer was lost never ran: its attempt is not spent.
            let refund: i64 = if ran.contains(key) { 0 } else { 1 };
            n += tx.execute(
                "UPDATE export_item SET state = 'pending', owner = NULL, not_before_ms = NULL,
                   attempts = max(attempts - ?4, 0)
                 WHERE job_id = ?1 AND item_no = ?2 AND state = 'running' AND owner = ?3",
                params![key.0, key.1, owner, refund],
            )?;
        }
        crate::give_up::before_commit()?;
        tx.commit()?;
        Ok(n as u64)
    }

    fn complete_job(
        &self,
        item: &WorkItem,
        scanned: u64,
        result: &str,
        parts_left: bool,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let cleanup = if parts_left {
            Cleanup::Parts
        } else {
            Cleanup::None
        };
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        match lease_state(&tx, item)? {
            Lease::Held => {}
            // A repeat of a completion that committed but whose answer was lost.
            Lease::JobStopped => return Ok(completed_by(&tx, item)?),
            Lease::Lost => return Ok(false),
        }
        tx.execute(
            "UPDATE export_item SET state = 'done', scanned = ?3, heartbeat_ms = ?4 WHERE job_id = ?1 AND item_no = ?2",
            params![item.job_id, item.item_no, scanned as i64, now_ms],
        )?;
        let n = tx.execute(
            "UPDATE export_job SET state = 'complete', result = ?2, failure_status = NULL, finished_ms = ?3, cleanup = ?4
             WHERE id = ?1 AND state IN ('queued', 'running')",
            params![item.job_id, result, now_ms, cleanup.as_str()],
        )?;
        crate::give_up::before_commit()?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn requeue_stranded(&self, now_ms: i64, timeout_ms: i64) -> Result<u64, QueueError> {
        let n = self.conn().execute(
            "UPDATE export_item SET state = 'pending', owner = NULL, not_before_ms = NULL,
               attempts = max(attempts - 1, 0)
             WHERE kind = 'finalize' AND state = 'done' AND COALESCE(heartbeat_ms, 0) <= ?1
               AND job_id IN (SELECT id FROM export_job WHERE state = 'running')
               AND NOT EXISTS (SELECT 1 FROM export_item o
                               WHERE o.job_id = export_item.job_id AND o.state <> 'done')",
            [now_ms.saturating_sub(timeout_ms)],
        )?;
        Ok(n as u64)
    }

    fn cancel(&self, id: &str, now_ms: i64) -> Result<(), QueueError> {
        self.conn().execute(
            "UPDATE export_job SET state = 'cancelled', finished_ms = ?2, cleanup = 'pending'
             WHERE id = ?1 AND state IN ('queued', 'running', 'complete')",
            params![id, now_ms],
        )?;
        Ok(())
    }

    fn expire(&self, finished_before_ms: i64, now_ms: i64) -> Result<u64, QueueError> {
        let n = self.conn().execute(
            "UPDATE export_job SET state = 'expired', cleanup = 'pending', result = NULL, expired_ms = ?2
             WHERE state = 'complete' AND finished_ms <= ?1",
            [finished_before_ms, now_ms],
        )?;
        Ok(n as u64)
    }

    fn cleanups(&self) -> Result<Vec<JobRecord>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM export_job WHERE cleanup IN ('pending', 'parts') ORDER BY finished_ms"
        ))?;
        let rows = stmt.query_map([], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn recent(&self, limit: u64, client: Option<&str>) -> Result<Vec<JobRecord>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM export_job WHERE ?1 IS NULL OR client_id = ?1
             ORDER BY created_ms DESC, id LIMIT ?2"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![client, limit], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn count_by_state(&self) -> Result<Vec<(JobState, bool, u64)>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT state, instr(request, '\"operation\":\"import\"') > 0 AS imp, count(*)
             FROM export_job GROUP BY state, imp",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, JobState>(0)?,
                r.get::<_, bool>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (state, import, n) = row?;
            out.push((state, import, n as u64));
        }
        Ok(out)
    }

    fn cleaned(&self, id: &str) -> Result<(), QueueError> {
        self.cleanup_done(id, "pending", "done")
    }

    fn parts_cleaned(&self, id: &str) -> Result<(), QueueError> {
        self.cleanup_done(id, "parts", "none")
    }

    fn key_sets(&self) -> Option<&dyn crate::keysets::KeySets> {
        Some(self)
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

    fn item_states(&self, job_id: &str) -> Result<Vec<(i64, bool)>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT item_no, state = 'done' FROM export_item WHERE job_id = ?1 ORDER BY item_no",
        )?;
        let rows = stmt.query_map([job_id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? == 1)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn item_progress(&self, job_id: &str) -> Result<Vec<ItemProgress>, QueueError> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT item_no, kind, resource_type, cursor, scanned, state = 'done'
             FROM export_item WHERE job_id = ?1 ORDER BY item_no",
        )?;
        let rows = stmt.query_map([job_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)? == 1,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (item_no, kind, resource_type, cursor, scanned, done) = row?;
            out.push(ItemProgress {
                item_no,
                kind: kind.parse()?,
                resource_type,
                cursor,
                scanned: scanned as u64,
                done,
            });
        }
        Ok(out)
    }

    fn release_orphans(&self, orphans: Orphans<'_>) -> Result<u64, QueueError> {
        // The attempt stays counted (a crash loop ends when the attempts run out), and the
        // cause is recorded for the failure that names it.
        const RELEASE: &str = "UPDATE export_item SET state = 'pending', owner = NULL,
               error = 'the server stopped while it ran', error_status = 500
             WHERE state = 'running'";
        {
            let mut holds = self.cleanup_holds.lock().unwrap_or_else(|p| p.into_inner());
            holds.retain(|_, (_, owner)| match orphans {
                Orphans::All => false,
                Orphans::OfNode { node, current } => !orphans_owner(owner, node, current),
            });
        }
        let c = self.conn();
        let n = match orphans {
            Orphans::All => c.execute(RELEASE, [])?,
            Orphans::OfNode { node, current } => c.execute(
                &format!(
                    "{RELEASE} AND substr(owner, 1, length(?1) + 1) = ?1 || '/' AND owner <> ?2"
                ),
                params![node, current],
            )?,
        };
        Ok(n as u64)
    }

    fn hold_cleanup(
        &self,
        id: &str,
        owner: &str,
        now_ms: i64,
        hold_ms: i64,
    ) -> Result<bool, QueueError> {
        // One process uses this file (the data-directory lock): the holds live in memory, and
        // die with it.
        let pending: bool = self
            .conn()
            .query_row(
                "SELECT cleanup IN ('pending', 'parts') FROM export_job WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false);
        let mut holds = self.cleanup_holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.retain(|_, (until, _)| *until > now_ms);
        if !pending || holds.contains_key(id) {
            return Ok(false);
        }
        holds.insert(
            id.to_string(),
            (now_ms.saturating_add(hold_ms), owner.to_string()),
        );
        Ok(true)
    }

    fn release_cleanup(&self, id: &str, owner: &str) -> Result<(), QueueError> {
        let mut holds = self.cleanup_holds.lock().unwrap_or_else(|p| p.into_inner());
        if holds.get(id).is_some_and(|(_, o)| o == owner) {
            holds.remove(id);
        }
        Ok(())
    }

    fn purge(&self, finished_before_ms: i64, expired_before_ms: i64) -> Result<u64, QueueError> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let gone = format!(
            "SELECT id FROM export_job WHERE state IN ('failed', 'cancelled', 'expired')
               AND cleanup = 'done' AND {PURGE_AFTER}"
        );
        let cutoffs = [finished_before_ms, expired_before_ms];
        tx.execute(
            &format!("DELETE FROM export_file WHERE job_id IN ({gone})"),
            cutoffs,
        )?;
        tx.execute(
            &format!("DELETE FROM export_item WHERE job_id IN ({gone})"),
            cutoffs,
        )?;
        let n = tx.execute(
            &format!("DELETE FROM export_job WHERE id IN ({gone})"),
            cutoffs,
        )?;
        crate::give_up::before_commit()?;
        tx.commit()?;
        Ok(n as u64)
    }
}

/// Whether a removed job's row is old enough to purge (`?1`: finished at or before, `?2`:
/// expired at or before): an expired job counts from its expiry, so that its status answers
/// 410 for the whole period after it however long ago it completed; one expired by an older
/// version (no `expired_ms`) from its completion, as before.
const PURGE_AFTER: &str = "CASE WHEN state = 'expired' AND expired_ms IS NOT NULL
                                THEN expired_ms <= ?2 ELSE finished_ms <= ?1 END";

/// Fails `item` and its job (while still queued or running) with `message` and HTTP `status`:
/// an item out of attempts ([`JobQueue::fail_item`]) or past its wait for space
/// ([`JobQueue::wait_for_space`]).
fn fail_item_and_job(
    tx: &rusqlite::Connection,
    item: &WorkItem,
    message: &str,
    status: u16,
    now_ms: i64,
) -> rusqlite::Result<()> {
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
    Ok(())
}

#[cfg(test)]
mod tests {
    //! What only SQLite has: the `exports.db` file and its migration. The queue's contract is
    //! tested on both backends in `tests/job_queue.rs`.

    use super::*;

    /// A file of job schema version 3 (before the assertion record) gains it at open.
    #[test]
    fn a_version_3_file_gains_the_assertion_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOBS_FILE_NAME);
        drop(SqliteJobQueue::open(&path).expect("create"));
        Connection::open(&path)
            .expect("open")
            .execute_batch(
                "DROP TABLE auth_jti; ALTER TABLE export_item DROP COLUMN full_since_ms;
                 PRAGMA user_version = 3;",
            )
            .expect("make a version 3 file");
        let q = SqliteJobQueue::open(&path).expect("migrated");
        assert!(q.remember_once("c", "j1", 100, 10).expect("recorded"));
        let version: i64 = q
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, JOBS_SCHEMA_VERSION);
    }

    /// A file of job schema version 4 (before waits for space) gains the wait's column at
    /// open, and its items can wait.
    #[test]
    fn a_version_4_file_gains_the_wait_for_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOBS_FILE_NAME);
        drop(SqliteJobQueue::open(&path).expect("create"));
        Connection::open(&path)
            .expect("open")
            .execute_batch(
                "ALTER TABLE export_item DROP COLUMN full_since_ms; PRAGMA user_version = 4;",
            )
            .expect("make a version 4 file");
        let q = SqliteJobQueue::open(&path).expect("migrated");
        assert_eq!(q.space_wait("none", 10).expect("read"), None);
        let version: i64 = q
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, JOBS_SCHEMA_VERSION);
    }

    /// A file of job schema version 5 (before expiry instants and `parts` cleanups) has its
    /// job table rebuilt at open, rows kept, and takes both.
    #[test]
    fn a_version_5_file_gains_expiry_instants_and_parts_cleanups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOBS_FILE_NAME);
        drop(SqliteJobQueue::open(&path).expect("create"));
        Connection::open(&path)
            .expect("open")
            .execute_batch(&format!(
                "DROP TABLE export_job;
                 CREATE TABLE export_job (
                    id TEXT PRIMARY KEY,
                    state TEXT NOT NULL {},
                    request TEXT NOT NULL, watermark INTEGER NOT NULL,
                    transaction_time TEXT NOT NULL, client_id TEXT, container TEXT NOT NULL,
                    folder TEXT NOT NULL, anonymization TEXT, result TEXT,
                    failure_status INTEGER, created_ms INTEGER NOT NULL, finished_ms INTEGER,
                    cleanup TEXT NOT NULL DEFAULT 'none'
                        CHECK (cleanup IN ('none', 'pending', 'done')));
                 CREATE INDEX export_job_state ON export_job(state);
                 INSERT INTO export_job VALUES ('done', 'complete', '{{}}', 7, 't', NULL,
                    'exports', 'done', NULL, '{{\"output\":[]}}', NULL, 1, 2, 'none');
                 PRAGMA user_version = 5;",
                check_in("state", JobState::NAMES)
            ))
            .expect("make a version 5 file");
        let q = SqliteJobQueue::open(&path).expect("migrated");
        let version: i64 = q
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, JOBS_SCHEMA_VERSION);
        let done = q.get("done").expect("get").expect("kept");
        assert_eq!(
            (done.state, done.finished_ms),
            (JobState::Complete, Some(2))
        );
        q.conn()
            .execute(
                "UPDATE export_job SET cleanup = 'parts' WHERE id = 'done'",
                [],
            )
            .expect("the new cleanup state is allowed");
        assert_eq!(q.cleanups().expect("cleanups").len(), 1);
        assert_eq!(q.expire(2, 50).expect("expire"), 1);
        let expired_ms: Option<i64> = q
            .conn()
            .query_row(
                "SELECT expired_ms FROM export_job WHERE id = 'done'",
                [],
                |r| r.get(0),
            )
            .expect("read");
        assert_eq!(expired_ms, Some(50));
    }

    #[test]
    fn accepted_assertions_outlive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOBS_FILE_NAME);
        let q = SqliteJobQueue::open(&path).expect("open");
        assert!(q.remember_once("c", "j1", 100, 10).expect("first"));
        assert!(!q.remember_once("c", "j1", 100, 20).expect("replay"));
        assert!(
            q.remember_once("other", "j1", 100, 20)
                .expect("another client's")
        );
        drop(q);
        let q = SqliteJobQueue::open(&path).expect("reopen");
        assert!(
            !q.remember_once("c", "j1", 100, 30).expect("after a reopen"),
            "a replay after a restart"
        );
        // Expired entries are taken over (and purged).
        assert!(q.remember_once("c", "j1", 300, 101).expect("expired"));
        assert!(q.remember_once("c", "j2", 300, 200).expect("purge"));
        let left: i64 = q
            .conn()
            .query_row("SELECT count(*) FROM auth_jti", [], |r| r.get(0))
            .expect("count");
        assert_eq!(left, 2);
    }

    /// The first schema, as the previous release created it (no constraints, no `cleanup` and
    /// `error_status` columns yet).
    const FIRST_SCHEMA: &str = "
        CREATE TABLE export_job (id TEXT PRIMARY KEY, state TEXT NOT NULL, request TEXT NOT NULL,
            watermark INTEGER NOT NULL, transaction_time TEXT NOT NULL, client_id TEXT,
            container TEXT NOT NULL, folder TEXT NOT NULL, anonymization TEXT, result TEXT,
            failure_status INTEGER, created_ms INTEGER NOT NULL, finished_ms INTEGER);
        CREATE INDEX export_job_state ON export_job(state);
        CREATE TABLE export_item (job_id TEXT NOT NULL, item_no INTEGER NOT NULL,
            kind TEXT NOT NULL, resource_type TEXT NOT NULL, seq_after INTEGER NOT NULL,
            seq_up_to INTEGER NOT NULL, expected INTEGER NOT NULL, cursor INTEGER NOT NULL,
            scanned INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, owner TEXT,
            heartbeat_ms INTEGER, attempts INTEGER NOT NULL DEFAULT 0, not_before_ms INTEGER,
            error TEXT, PRIMARY KEY (job_id, item_no));
        CREATE INDEX export_item_state ON export_item(state);
        CREATE TABLE export_file (job_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
            resource_type TEXT NOT NULL, prefix TEXT NOT NULL, number INTEGER NOT NULL,
            count INTEGER NOT NULL, bytes INTEGER NOT NULL, item_no INTEGER NOT NULL,
            pending_rename TEXT, PRIMARY KEY (job_id, name));
        INSERT INTO export_job VALUES ('done', 'complete', '{}', 7, '2026-01-01T00:00:00Z', NULL,
            'exports', 'done', NULL, '{\"output\":[]}', NULL, 1, 2);
        INSERT INTO export_job VALUES ('busy', 'running', '{}', 7, '2026-01-01T00:00:00Z', NULL,
            'exports', 'busy', NULL, NULL, NULL, 3, NULL);
        INSERT INTO export_item VALUES ('busy', 1, 'scan', 'Patient', 0, 10, 10, 4, 4, 'running',
            'gone', 5, 1, NULL, NULL);
        INSERT INTO export_file VALUES ('busy', 'Patient-1.ndjson', 'output', 'Patient', 'Patient',
            1, 4, 40, 1, NULL);
    ";

    fn first_schema_file(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOBS_FILE_NAME);
        let c = Connection::open(&path).expect("open");
        c.execute_batch(FIRST_SCHEMA).expect("first schema");
        c.execute_batch(extra).expect("extra rows");
        (dir, path)
    }

    #[test]
    fn a_file_of_the_first_schema_is_migrated_with_its_jobs() {
        let (_dir, path) = first_schema_file("");
        let q = SqliteJobQueue::open(&path).expect("migrated");
        let done = q.get("done").expect("get").expect("done");
        assert_eq!(
            (done.state, done.cleanup),
            (JobState::Complete, Cleanup::None)
        );
        assert_eq!(
            q.get("busy").expect("get").expect("busy").state,
            JobState::Running
        );
        assert_eq!(q.files("busy").expect("files")[0].kind, FileKind::Output);
        // The running item of the dead process resumes at its cursor.
        assert_eq!(q.release_orphans(Orphans::All).expect("release"), 1);
        let item = q
            .claim("new", 10, 600_000, 5)
            .expect("claim")
            .expect("item");
        assert_eq!(
            (item.cursor, item.attempt, item.kind),
            (4, 2, ItemKind::Scan)
        );
        drop(q);
        // Opened again: nothing left to migrate, and the states are now constrained.
        let q = SqliteJobQueue::open(&path).expect("reopen");
        let version: i64 = q
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, JOBS_SCHEMA_VERSION);
        let refused = q.conn().execute(
            "UPDATE export_job SET state = 'paused' WHERE id = 'done'",
            [],
        );
        assert!(
            refused.is_err(),
            "the CHECK constraint refuses unknown states"
        );
    }

    #[test]
    fn a_first_schema_file_with_an_unknown_state_is_refused_and_left_as_it_was() {
        let (_dir, path) = first_schema_file(
            "INSERT INTO export_job VALUES ('odd', 'paused', '{}', 7, 't', NULL, 'exports',
                'odd', NULL, NULL, NULL, 4, NULL);",
        );
        match SqliteJobQueue::open(&path) {
            Err(QueueError::Unknown(u)) => {
                assert_eq!((u.what, u.value.as_str()), ("job state", "paused"));
                let text = QueueError::Unknown(u).to_string();
                assert!(text.contains("unknown export job state 'paused'"), "{text}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("an unknown state was accepted"),
        }
        // The migration rolled back: the file is still the first schema, rows intact.
        let c = Connection::open(&path).expect("open");
        let (version, jobs): (i64, i64) = c
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version), count(*) FROM export_job",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("read");
        assert_eq!((version, jobs), (0, 3));
    }

    #[test]
    fn an_unknown_state_read_back_is_an_error_not_another_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SqliteJobQueue::open(&dir.path().join(JOBS_FILE_NAME)).expect("open");
        // Only a hand edit that bypasses the constraints can store one.
        q.conn()
            .execute_batch(
                "PRAGMA ignore_check_constraints = ON;
                 INSERT INTO export_job (id, state, request, watermark, transaction_time,
                   container, folder, created_ms, cleanup)
                 VALUES ('x', 'paused', '{}', 1, 't', 'c', 'x', 1, 'none');
                 PRAGMA ignore_check_constraints = OFF;",
            )
            .expect("tamper");
        match q.get("x") {
            Err(QueueError::Unknown(u)) => assert_eq!(u.value, "paused"),
            other => panic!("expected an unknown-state error, got {other:?}"),
        }
        assert!(matches!(q.cleanups(), Ok(v) if v.is_empty()));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOBS_FILE_NAME);
        Connection::open(&path)
            .expect("open")
            .pragma_update(None, "user_version", JOBS_SCHEMA_VERSION + 1)
            .expect("version");
        let e = SqliteJobQueue::open(&path).err().expect("refused");
        let newer = format!("job schema version {}", JOBS_SCHEMA_VERSION + 1);
        assert!(e.to_string().contains(&newer), "{e}");
    }
}
