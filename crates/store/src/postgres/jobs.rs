//! [`JobQueue`] on PostgreSQL: the export job tables in the same database as the resources
//! (migration 2 of [`super::MIGRATIONS`]), used by every node that shares the database.
//!
//! - Claims lock the chosen item with `SELECT … FOR UPDATE OF i SKIP LOCKED`: nodes claiming at
//!   once never wait for each other and never take the same item.
//! - Admission to the concurrent-export limit is decided in the transaction that records the job,
//!   under a transaction-scoped advisory lock ([`ADMISSION_LOCK`]), so two kick-offs never both
//!   take the last slot.
//! - Every lease check locks the item row (`FOR UPDATE OF i`), and file commits lock the job row
//!   too (file numbers are allocated per job): always item before job, as claims do, so the
//!   locks cannot deadlock.
//! - The queue has its own small connection pool, so heartbeats never wait behind export scans
//!   holding the store's connections.
//!
//! - Statements that make work claimable (a kick-off's items, items given back or to be retried,
//!   the last item before a job's finalize done) `NOTIFY fhirhose_work` in their transaction;
//!   every node's export service listens on a connection of its own ([`listen`]) and wakes its
//!   workers at once. Work that becomes claimable by time alone (a retry's back-off over, a
//!   stale heartbeat) is found by the workers' poll.
//!
//! States are text under the same `CHECK` constraints as on SQLite, read back through `FromStr`
//! (an unknown value is [`QueueError::Unknown`]).

use ::postgres::Row;
use ::postgres::types::Type;

use super::statements::{Conn, Session, Tx};

use std::sync::atomic::{AtomicI64, Ordering};

use super::{Pool, Target};
use crate::StoreError;
use crate::jobs::{
    Admission, Cleanup, FileRecord, ItemKind, ItemPlan, ItemProgress, JobQueue, JobRecord,
    JobState, Lease, NewFile, Orphans, QueueError, Retry, SpaceWait, SpaceWaited, TypeProgress,
    WorkItem, WorkWatch,
};
use crate::shared::{AssertionRecord, SharedState};

mod clock;
mod keysets;
mod listen;

pub use super::ADMISSION_LOCK;

/// Connections of the queue's own pool.
const QUEUE_CONNECTIONS: usize = 4;

/// Session settings of the queue's connections. A queue transaction is a few statements sent
/// back to back (nothing slow runs inside one), so a session idle inside a transaction for
/// seconds belongs to a node that is paused (SIGSTOP, a VM freeze) or cut off: the server ends
/// it and its row locks go, so that the other nodes' `SKIP LOCKED` claims can take its items
/// over after the heartbeat timeout (at least 5 s, longer than this). The paused node finds its
/// connection gone when it runs again (a new one is opened) and its lease lost (fencing). Lock
/// and statement timeouts bound what a live node waits for behind such a session; their errors
/// are [`StoreError::Unavailable`] (transient: the item is retried), as a lost connection.
const QUEUE_SESSION: &str =
    "-c idle_in_transaction_session_timeout=3000 -c lock_timeout=10000 -c statement_timeout=60000";

/// SQLSTATEs of a queue statement that waited too long (lock or statement timeout, a deadlock or
/// serialization failure): worth another try, like a lost connection.
const RETRYABLE: [&str; 4] = ["55P03", "57014", "40P01", "40001"];

/// The job tables (migration 2). The `CHECK` lists are the names of the enums of
/// [`crate::jobs`] (a unit test keeps them equal).
pub(crate) const SCHEMA: &str = "
CREATE TABLE export_job (
    id text PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'complete', 'failed', 'cancelled', 'expired')),
    request text NOT NULL,
    watermark bigint NOT NULL,
    transaction_time text NOT NULL,
    client_id text,
    container text NOT NULL,
    folder text NOT NULL,
    anonymization text,
    result text,
    failure_status bigint,
    created_ms bigint NOT NULL,
    finished_ms bigint,
    cleanup text NOT NULL DEFAULT 'none' CHECK (cleanup IN ('none', 'pending', 'done'))
);
CREATE INDEX export_job_state ON export_job(state);
CREATE TABLE export_item (
    job_id text NOT NULL,
    item_no bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('scan', 'associated', 'finalize')),
    resource_type text NOT NULL,
    seq_after bigint NOT NULL,
    seq_up_to bigint NOT NULL,
    expected bigint NOT NULL,
    cursor bigint NOT NULL,
    scanned bigint NOT NULL DEFAULT 0,
    state text NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    owner text,
    heartbeat_ms bigint,
    attempts bigint NOT NULL DEFAULT 0,
    not_before_ms bigint,
    error text,
    error_status bigint,
    PRIMARY KEY (job_id, item_no)
);
CREATE INDEX export_item_state ON export_item(state);
CREATE TABLE export_file (
    job_id text NOT NULL,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('output', 'deleted', 'error')),
    resource_type text NOT NULL,
    prefix text NOT NULL,
    number bigint NOT NULL,
    count bigint NOT NULL,
    bytes bigint NOT NULL,
    item_no bigint NOT NULL,
    pending_rename text,
    PRIMARY KEY (job_id, name)
);
";

/// Migration 3: the hold on a job's deletion ([`JobQueue::hold_cleanup`]) and the state the
/// nodes share ([`crate::shared`]): secrets made once by the first node, and the replay cache of
/// client assertions.
pub(crate) const SCHEMA_V3: &str = "
ALTER TABLE export_job ADD COLUMN cleanup_until_ms bigint;
CREATE TABLE cluster_secret (
    name text PRIMARY KEY,
    value bytea NOT NULL,
    created_ms bigint NOT NULL
);
CREATE TABLE auth_jti (
    iss text NOT NULL,
    jti text NOT NULL,
    expires_s bigint NOT NULL,
    PRIMARY KEY (iss, jti)
);
CREATE INDEX auth_jti_expires ON auth_jti(expires_s);
";

/// Migration 6: who holds a job's deletion (a lease owner, `<node id>/<incarnation>`), so that
/// the next start of that node releases the hold of its dead incarnation at once
/// ([`JobQueue::release_orphans`]) instead of after the hold's 10 minutes.
pub(crate) const SCHEMA_V6: &str = "
ALTER TABLE export_job ADD COLUMN cleanup_owner text;
";

/// Migration 4 (issue 21): file digests and de-identification key sets (the table as
/// [`crate::keysets::KEY_SET_TABLE`]; a unit test keeps them equal).
pub(crate) const SCHEMA_V4: &str = "
ALTER TABLE export_file ADD COLUMN sha256 text;
CREATE TABLE deid_key_set (
    name text PRIMARY KEY,
    version bigint NOT NULL,
    crypto_hash_key text NOT NULL,
    encrypt_key text NOT NULL,
    date_shift_key text NOT NULL,
    created_ms bigint NOT NULL,
    rotated_ms bigint
);
";

/// Migration 7: when an item's wait for space at a full destination began
/// ([`JobQueue::wait_for_space`]), on the database's clock.
pub(crate) const SCHEMA_V7: &str = "
ALTER TABLE export_item ADD COLUMN full_since_ms bigint;
";

/// Migration 8: when a job expired ([`JobQueue::purge`] counts an expired job's rows from it,
/// not from its completion), and the cleanup state `parts` (a complete job whose temporary
/// parts folder is still to be removed, [`Cleanup::Parts`]). The constraint is the one
/// migration 2 declared on the column (PostgreSQL names it `<table>_<column>_check`).
pub(crate) const SCHEMA_V8: &str = "
ALTER TABLE export_job ADD COLUMN expired_ms bigint;
ALTER TABLE export_job DROP CONSTRAINT export_job_cleanup_check;
ALTER TABLE export_job ADD CONSTRAINT export_job_cleanup_check
    CHECK (cleanup IN ('none', 'pending', 'done', 'parts'));
";

/// How often (seconds) a node deletes expired replay-cache rows.
const JTI_PURGE_EVERY_S: i64 = 60;

impl From<::postgres::Error> for QueueError {
    fn from(e: ::postgres::Error) -> Self {
        QueueError::Db(StoreError::Postgres(e))
    }
}

/// [`JobQueue`] on a PostgreSQL database; also the nodes' [`SharedState`] (same small pool).
pub struct PgJobQueue {
    pool: Pool,
    /// When this process last purged expired replay-cache rows (unix seconds).
    jti_purged_s: AtomicI64,
    /// The database server's clock, on which lease times are kept (nodes' clocks differ).
    clock: clock::SharedClock,
}

impl PgJobQueue {
    /// A queue on the database of `target` (connections are opened when needed).
    pub(crate) fn new(mut target: Target) -> PgJobQueue {
        let options = match target.config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {QUEUE_SESSION}"),
            _ => QUEUE_SESSION.to_string(),
        };
        target.config.options(&options);
        PgJobQueue {
            pool: Pool::new(target, QUEUE_CONNECTIONS),
            jti_purged_s: AtomicI64::new(0),
            clock: clock::SharedClock::default(),
        }
    }

    /// The use of the queue's own connection pool (`jobs`).
    pub(crate) fn pool_stats(&self) -> crate::PoolStats {
        self.pool.stats("jobs")
    }

    /// Runs `f` on a pooled connection; a lost connection becomes [`StoreError::Unavailable`]
    /// (the pool's rule), every other error stays what it is.
    fn run<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, QueueError>) -> Result<T, QueueError> {
        self.pool
            .run(|c| self.for_pool(f(c)))
            .map_err(QueueError::Db)?
    }

    /// [`PgJobQueue::run`] for reads (status, manifest, metrics): a connection a database
    /// restart closed while it idled is replaced and `f` runs once more ([`Pool::read`]).
    fn read<T>(
        &self,
        mut f: impl FnMut(&mut Conn) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.pool
            .read(|c| self.for_pool(f(c)))
            .map_err(QueueError::Db)?
    }

    /// The result of queue work as the pool sees it: database errors (with a statement that
    /// waited too long made [`StoreError::Unavailable`]) outside, so that a lost connection is
    /// seen; the queue's own errors inside.
    fn for_pool<T>(
        &self,
        result: Result<T, QueueError>,
    ) -> Result<Result<T, QueueError>, StoreError> {
        match result {
            Ok(v) => Ok(Ok(v)),
            Err(QueueError::Db(StoreError::Postgres(e)))
                if e.code().is_some_and(|c| RETRYABLE.contains(&c.code())) =>
            {
                Err(self.pool.target.unavailable(super::target::describe(&e)))
            }
            Err(QueueError::Db(e)) => Err(e),
            Err(other) => Ok(Err(other)),
        }
    }

    /// [`PgJobQueue::run`] in one transaction, committed when `f` succeeds.
    fn tx<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, QueueError>) -> Result<T, QueueError> {
        self.run(|c| {
            let mut tx = c.transaction()?;
            let value = f(&mut tx)?;
            crate::give_up::before_commit()?;
            tx.commit()?;
            Ok(value)
        })
    }
}

const JOB_COLUMNS: &str = "id, state, request, watermark, transaction_time, client_id, container, folder, anonymization, result, failure_status, created_ms, finished_ms, cleanup";

fn job_row(r: &Row) -> Result<JobRecord, QueueError> {
    Ok(JobRecord {
        id: r.get(0),
        state: r.get::<_, &str>(1).parse()?,
        request: r.get(2),
        watermark: r.get(3),
        transaction_time: r.get(4),
        client_id: r.get(5),
        container: r.get(6),
        folder: r.get(7),
        anonymization: r.get(8),
        result: r.get(9),
        failure_status: r.get::<_, Option<i64>>(10).map(|s| s as u16),
        created_ms: r.get(11),
        finished_ms: r.get(12),
        cleanup: r.get::<_, &str>(13).parse()?,
    })
}

const FILE_COLUMNS: &str =
    "kind, resource_type, number, name, count, bytes, item_no, pending_rename, sha256";

fn file_row(r: &Row) -> Result<FileRecord, QueueError> {
    Ok(FileRecord {
        kind: r.get::<_, &str>(0).parse()?,
        resource_type: r.get(1),
        number: r.get(2),
        name: r.get(3),
        count: r.get::<_, i64>(4) as u64,
        bytes: r.get::<_, i64>(5) as u64,
        item_no: r.get(6),
        pending_rename: r.get(7),
        sha256: r.get(8),
    })
}

/// Whether `item` still holds its lease and its job is active; locks the item row.
///
/// This and the other statements a worker runs per committed file (heartbeats, file commits,
/// renames) go with their parameter types (`*_typed`): one round trip each, where a statement
/// given as text is prepared first (a round trip of its own, and a close).
fn lease_state(c: &mut impl Session, item: &WorkItem) -> Result<Lease, QueueError> {
    let row = c.query_typed_opt(
        "SELECT i.state, i.owner, i.attempts, j.state
         FROM export_item i JOIN export_job j ON j.id = i.job_id
         WHERE i.job_id = $1 AND i.item_no = $2 FOR UPDATE OF i",
        &[(&item.job_id, Type::TEXT), (&item.item_no, Type::INT8)],
    )?;
    let Some(row) = row else {
        return Ok(Lease::JobStopped);
    };
    let job_state: JobState = row.get::<_, &str>(3).parse()?;
    if !job_state.is_active() {
        return Ok(Lease::JobStopped);
    }
    let held = row.get::<_, &str>(0) == "running"
        && row.get::<_, Option<&str>>(1) == Some(item.owner.as_str())
        && row.get::<_, i64>(2) == item.attempt;
    Ok(if held { Lease::Held } else { Lease::Lost })
}

/// Whether `item`'s job is complete with the item done under the same owner and attempt: its
/// completion ([`JobQueue::complete_job`]) committed already.
fn completed_by(c: &mut impl Session, item: &WorkItem) -> Result<bool, QueueError> {
    Ok(c.query_typed_opt(
        "SELECT 1 FROM export_item i JOIN export_job j ON j.id = i.job_id
             WHERE i.job_id = $1 AND i.item_no = $2 AND i.state = 'done' AND i.owner = $3
               AND i.attempts = $4 AND j.state = 'complete'",
        &[
            (&item.job_id, Type::TEXT),
            (&item.item_no, Type::INT8),
            (&item.owner, Type::TEXT),
            (&item.attempt, Type::INT8),
        ],
    )?
    .is_some())
}

impl JobQueue for PgJobQueue {
    fn create_admitted(
        &self,
        j: &JobRecord,
        items: &[ItemPlan],
        admission: Admission,
    ) -> Result<(), QueueError> {
        self.tx(|tx| {
            // Every admission takes the lock: the counts and the insert of one kick-off are
            // never interleaved with another's (of any client).
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ADMISSION_LOCK])?;
            let active: i64 = tx
                .query_one(
                    "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running')",
                    &[],
                )?
                .get(0);
            if active as u64 >= admission.max_active {
                return Err(QueueError::Full(active as u64));
            }
            if let Some(client) = &j.client_id {
                let mine: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running') AND client_id = $1",
                        &[client],
                    )?
                    .get(0);
                if mine as u64 >= admission.max_per_client {
                    return Err(QueueError::ClientFull(mine as u64));
                }
            }
            tx.execute(
                &format!(
                    "INSERT INTO export_job ({JOB_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                ),
                &[
                    &j.id,
                    &j.state.as_str(),
                    &j.request,
                    &j.watermark,
                    &j.transaction_time,
                    &j.client_id,
                    &j.container,
                    &j.folder,
                    &j.anonymization,
                    &j.result,
                    &j.failure_status.map(i64::from),
                    &j.created_ms,
                    &j.finished_ms,
                    &j.cleanup.as_str(),
                ],
            )?;
            for (n, it) in items.iter().enumerate() {
                tx.execute(
                    "INSERT INTO export_item (job_id, item_no, kind, resource_type, seq_after, seq_up_to, expected, cursor, state)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $5, 'pending')",
                    &[
                        &j.id,
                        &(n as i64 + 1),
                        &it.kind.as_str(),
                        &it.resource_type,
                        &it.seq_after,
                        &it.seq_up_to,
                        &(it.expected as i64),
                    ],
                )?;
            }
            tx.batch_execute(listen::NOTIFY)?;
            Ok(())
        })
    }

    fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        self.read(|c| {
            c.query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM export_job WHERE id = $1"),
                &[&id],
            )?
            .as_ref()
            .map(job_row)
            .transpose()
        })
    }

    fn active_count(&self) -> Result<u64, QueueError> {
        self.read(|c| {
            Ok(c.query_one(
                "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running')",
                &[],
            )?
            .get::<_, i64>(0) as u64)
        })
    }

    fn active_count_of(&self, client: &str) -> Result<u64, QueueError> {
        self.read(|c| {
            Ok(c.query_one(
                "SELECT count(*) FROM export_job WHERE state IN ('queued', 'running') AND client_id = $1",
                &[&client],
            )?
            .get::<_, i64>(0) as u64)
        })
    }

    fn claim(
        &self,
        owner: &str,
        now_ms: i64,
        timeout_ms: i64,
        max_attempts: i64,
    ) -> Result<Option<WorkItem>, QueueError> {
        self.tx(|tx| {
            // Leases on the database's clock; the job's finish time on this node's.
            let lease_now = self.clock.shared(tx, now_ms)?;
            let stale_before = lease_now - timeout_ms;
            // Items whose attempts ran out fail their job (see the SQLite queue).
            let exhausted = tx.query(
                "SELECT i.job_id, i.item_no, i.attempts, i.error, i.error_status, i.state = 'running'
                 FROM export_item i JOIN export_job j ON j.id = i.job_id
                 WHERE j.state IN ('queued', 'running') AND i.attempts >= $2
                   AND (i.state = 'pending' OR (i.state = 'running' AND i.heartbeat_ms < $1))
                 FOR UPDATE OF i SKIP LOCKED",
                &[&stale_before, &max_attempts],
            )?;
            for r in exhausted {
                let (job, item_no, attempts): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                let (error, status, stale): (Option<String>, Option<i64>, bool) =
                    (r.get(3), r.get(4), r.get(5));
                let cause = match (stale, error) {
                    (true, _) => "its worker stopped responding".to_string(),
                    (false, Some(e)) => e,
                    (false, None) => "the server stopped while it ran".to_string(),
                };
                let message = format!(
                    "work item {item_no} failed {attempts} times (attempts exhausted): {cause}"
                );
                tx.execute(
                    "UPDATE export_item SET state = 'failed', error = $3 WHERE job_id = $1 AND item_no = $2",
                    &[&job, &item_no, &message],
                )?;
                let status: i64 = if stale { 500 } else { status.unwrap_or(500) };
                tx.execute(
                    "UPDATE export_job SET state = 'failed', failure_status = $3, finished_ms = $2,
                       result = $4, cleanup = 'pending'
                     WHERE id = $1 AND state IN ('queued', 'running')",
                    &[&job, &now_ms, &status, &message],
                )?;
            }
            let found = tx.query_opt(
                "SELECT i.job_id, i.item_no FROM export_item i JOIN export_job j ON j.id = i.job_id
                 WHERE j.state IN ('queued', 'running')
                   AND (i.state = 'pending' OR (i.state = 'running' AND i.heartbeat_ms < $1))
                   AND i.attempts < $2
                   AND (i.not_before_ms IS NULL OR i.not_before_ms <= $3)
                   AND (i.kind <> 'finalize' OR NOT EXISTS (
                        SELECT 1 FROM export_item o WHERE o.job_id = i.job_id
                          AND o.kind <> 'finalize' AND o.state <> 'done'))
                 ORDER BY j.created_ms, i.item_no LIMIT 1
                 FOR UPDATE OF i SKIP LOCKED",
                &[&stale_before, &max_attempts, &lease_now],
            )?;
            let Some(found) = found else {
                return Ok(None);
            };
            let (job_id, item_no): (String, i64) = (found.get(0), found.get(1));
            let r = tx.query_one(
                "UPDATE export_item SET state = 'running', owner = $3, heartbeat_ms = $4,
                   attempts = attempts + 1
                 WHERE job_id = $1 AND item_no = $2
                 RETURNING kind, resource_type, seq_after, seq_up_to, cursor, expected, scanned, attempts",
                &[&job_id, &item_no, &owner, &lease_now],
            )?;
            tx.execute(
                "UPDATE export_job SET state = 'running' WHERE id = $1 AND state = 'queued'",
                &[&job_id],
            )?;
            let kind: ItemKind = r.get::<_, &str>(0).parse()?;
            Ok(Some(WorkItem {
                job_id,
                item_no,
                kind,
                resource_type: r.get(1),
                seq_after: r.get(2),
                seq_up_to: r.get(3),
                cursor: r.get(4),
                expected: r.get::<_, i64>(5) as u64,
                scanned: r.get::<_, i64>(6) as u64,
                attempt: r.get(7),
                owner: owner.to_string(),
            }))
        })
    }

    fn heartbeat(&self, item: &WorkItem, scanned: u64, now_ms: i64) -> Result<Lease, QueueError> {
        self.tx(|tx| {
            let lease = lease_state(tx, item)?;
            if lease == Lease::Held {
                let lease_now = self.clock.shared(tx, now_ms)?;
                tx.execute_typed(
                    "UPDATE export_item SET heartbeat_ms = $3, scanned = $4 WHERE job_id = $1 AND item_no = $2",
                    &[
                        (&item.job_id, Type::TEXT),
                        (&item.item_no, Type::INT8),
                        (&lease_now, Type::INT8),
                        (&(scanned as i64), Type::INT8),
                    ],
                )?;
            }
            Ok(lease)
        })
    }

    fn commit_files(
        &self,
        item: &WorkItem,
        files: &[NewFile],
        cursor: i64,
        scanned: u64,
        now_ms: i64,
    ) -> Result<Option<Vec<FileRecord>>, QueueError> {
        self.tx(|tx| {
            if lease_state(tx, item)? != Lease::Held {
                return Ok(None);
            }
            // File numbers are per job: commits of one job's items take turns.
            tx.execute_typed(
                "SELECT 1 FROM export_job WHERE id = $1 FOR UPDATE",
                &[(&item.job_id, Type::TEXT)],
            )?;
            let mut records = Vec::with_capacity(files.len());
            for file in files {
                let number: i64 = tx
                    .query_typed_one(
                        "SELECT COALESCE(MAX(number), 0) + 1 FROM export_file WHERE job_id = $1 AND prefix = $2",
                        &[(&item.job_id, Type::TEXT), (&file.prefix, Type::TEXT)],
                    )?
                    .get(0);
                let name = crate::jobs::file_name(&file.prefix, number);
                tx.execute_typed(
                    "INSERT INTO export_file (job_id, name, kind, resource_type, prefix, number, count, bytes, item_no, pending_rename, sha256)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    &[
                        (&item.job_id, Type::TEXT),
                        (&name, Type::TEXT),
                        (&file.kind.as_str(), Type::TEXT),
                        (&file.resource_type, Type::TEXT),
                        (&file.prefix, Type::TEXT),
                        (&number, Type::INT8),
                        (&(file.count as i64), Type::INT8),
                        (&(file.bytes as i64), Type::INT8),
                        (&item.item_no, Type::INT8),
                        (&file.temp_path, Type::TEXT),
                        (&file.sha256, Type::TEXT),
                    ],
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
            let lease_now = self.clock.shared(tx, now_ms)?;
            tx.execute_typed(
                "UPDATE export_item SET cursor = $3, scanned = $4, heartbeat_ms = $5, full_since_ms = NULL
                 WHERE job_id = $1 AND item_no = $2",
                &[
                    (&item.job_id, Type::TEXT),
                    (&item.item_no, Type::INT8),
                    (&cursor, Type::INT8),
                    (&(scanned as i64), Type::INT8),
                    (&lease_now, Type::INT8),
                ],
            )?;
            Ok(Some(records))
        })
    }

    fn renamed(&self, job_id: &str, name: &str) -> Result<(), QueueError> {
        self.run(|c| {
            c.execute_typed(
                "UPDATE export_file SET pending_rename = NULL WHERE job_id = $1 AND name = $2",
                &[(&job_id, Type::TEXT), (&name, Type::TEXT)],
            )?;
            Ok(())
        })
    }

    fn complete_item(
        &self,
        item: &WorkItem,
        scanned: u64,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        self.tx(|tx| {
            if lease_state(tx, item)? != Lease::Held {
                return Ok(false);
            }
            let lease_now = self.clock.shared(tx, now_ms)?;
            tx.execute(
                "UPDATE export_item SET state = 'done', scanned = $3, heartbeat_ms = $4 WHERE job_id = $1 AND item_no = $2",
                &[&item.job_id, &item.item_no, &(scanned as i64), &lease_now],
            )?;
            // The last item before the job's finalize makes that claimable. (Two last items
            // committing at once may each see the other undone: then the poll finds it.)
            if item.kind != ItemKind::Finalize {
                let unblocked: bool = tx
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM export_item WHERE job_id = $1
                                          AND kind = 'finalize' AND state = 'pending')
                           AND NOT EXISTS (SELECT 1 FROM export_item WHERE job_id = $1
                                          AND kind <> 'finalize' AND state <> 'done')",
                        &[&item.job_id],
                    )?
                    .get(0);
                if unblocked {
                    tx.batch_execute(listen::NOTIFY)?;
                }
            }
            Ok(true)
        })
    }

    fn fail_item(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        retry: Option<Retry>,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let status = i64::from(status);
        self.tx(|tx| {
            if lease_state(tx, item)? != Lease::Held {
                return Ok(false);
            }
            match retry {
                Some(r) if item.attempt < r.max_attempts => {
                    let lease_now = self.clock.shared(tx, now_ms)?;
                    tx.execute(
                        "UPDATE export_item SET state = 'pending', owner = NULL, error = $3, error_status = $4,
                           not_before_ms = $5 WHERE job_id = $1 AND item_no = $2",
                        &[
                            &item.job_id,
                            &item.item_no,
                            &message,
                            &status,
                            &r.not_before(item.attempt, lease_now),
                        ],
                    )?;
                    tx.batch_execute(listen::NOTIFY)?;
                    Ok(false)
                }
                _ => {
                    let message = match retry {
                        Some(_) => format!(
                            "work item {} failed {} times (attempts exhausted): {message}",
                            item.item_no, item.attempt
                        ),
                        None => message.to_string(),
                    };
                    fail_item_and_job(tx, item, &message, status, now_ms)?;
                    Ok(true)
                }
            }
        })
    }

    fn wait_for_space(
        &self,
        item: &WorkItem,
        message: &str,
        status: u16,
        wait: SpaceWait,
        now_ms: i64,
    ) -> Result<SpaceWaited, QueueError> {
        let status = i64::from(status);
        self.tx(|tx| {
            if lease_state(tx, item)? != Lease::Held {
                return Ok(SpaceWaited::NotHeld);
            }
            // The wait's times on the database's clock, as every lease time.
            let lease_now = self.clock.shared(tx, now_ms)?;
            let since: i64 = tx
                .query_one(
                    "SELECT full_since_ms FROM export_item WHERE job_id = $1 AND item_no = $2",
                    &[&item.job_id, &item.item_no],
                )?
                .get::<_, Option<i64>>(0)
                .unwrap_or(lease_now);
            let waited_ms = lease_now.saturating_sub(since).max(0);
            match wait.next_try(since, lease_now) {
                Some(at) => {
                    tx.execute(
                        "UPDATE export_item SET state = 'pending', owner = NULL,
                           attempts = GREATEST(attempts - 1, 0), not_before_ms = $3, full_since_ms = $4
                         WHERE job_id = $1 AND item_no = $2",
                        &[&item.job_id, &item.item_no, &at, &since],
                    )?;
                    Ok(SpaceWaited::Waiting {
                        waited_ms,
                        retry_in_ms: at - lease_now,
                    })
                }
                None => {
                    let message = crate::jobs::space_wait_over(message, waited_ms);
                    fail_item_and_job(tx, item, &message, status, now_ms)?;
                    Ok(SpaceWaited::JobFailed)
                }
            }
        })
    }

    fn space_wait(&self, id: &str, now_ms: i64) -> Result<Option<i64>, QueueError> {
        self.read(|c| {
            let lease_now = self.clock.shared(c, now_ms)?;
            let since: Option<i64> = c
                .query_one(
                    "SELECT MIN(full_since_ms) FROM export_item
                     WHERE job_id = $1 AND state IN ('pending', 'running')",
                    &[&id],
                )?
                .get(0);
            Ok(since.map(|s| lease_now.saturating_sub(s).max(0)))
        })
    }

    fn release(&self, item: &WorkItem) -> Result<bool, QueueError> {
        self.tx(|tx| {
            if lease_state(tx, item)? != Lease::Held {
                return Ok(false);
            }
            tx.execute(
                "UPDATE export_item SET state = 'pending', owner = NULL, attempts = GREATEST(attempts - 1, 0),
                   not_before_ms = NULL
                 WHERE job_id = $1 AND item_no = $2",
                &[&item.job_id, &item.item_no],
            )?;
            tx.batch_execute(listen::NOTIFY)?;
            Ok(true)
        })
    }

    fn release_owned(&self, owner: &str) -> Result<u64, QueueError> {
        self.tx(|tx| {
            let released = tx.execute(
                "UPDATE export_item SET state = 'pending', owner = NULL, attempts = GREATEST(attempts - 1, 0),
                   not_before_ms = NULL
                 WHERE state = 'running' AND owner = $1",
                &[&owner],
            )?;
            if released > 0 {
                tx.batch_execute(listen::NOTIFY)?;
            }
            Ok(released)
        })
    }

    fn release_unheld(
        &self,
        owner: &str,
        held: &[(String, i64)],
        ran: &[(String, i64)],
    ) -> Result<u64, QueueError> {
        self.tx(|tx| {
            let running = tx.query(
                "SELECT job_id, item_no FROM export_item WHERE state = 'running' AND owner = $1
                 FOR UPDATE",
                &[&owner],
            )?;
            let mut n = 0;
            for row in &running {
                let key = (row.get::<_, String>(0), row.get::<_, i64>(1));
                if held.contains(&key) {
                    continue;
                }
                // A claim whose answer was lost never ran: its attempt is not spent.
                let refund: i64 = if ran.contains(&key) { 0 } else { 1 };
                n += tx.execute(
                    "UPDATE export_item SET state = 'pending', owner = NULL, not_before_ms = NULL,
                       attempts = GREATEST(attempts - $3, 0)
                     WHERE job_id = $1 AND item_no = $2",
                    &[&key.0, &key.1, &refund],
                )?;
            }
            if n > 0 {
                tx.batch_execute(listen::NOTIFY)?;
            }
            Ok(n)
        })
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
        self.tx(|tx| {
            match lease_state(tx, item)? {
                Lease::Held => {}
                // A repeat of a completion that committed but whose answer was lost.
                Lease::JobStopped => return completed_by(tx, item),
                Lease::Lost => return Ok(false),
            }
            let lease_now = self.clock.shared(tx, now_ms)?;
            tx.execute(
                "UPDATE export_item SET state = 'done', scanned = $3, heartbeat_ms = $4 WHERE job_id = $1 AND item_no = $2",
                &[&item.job_id, &item.item_no, &(scanned as i64), &lease_now],
            )?;
            let n = tx.execute(
                "UPDATE export_job SET state = 'complete', result = $2, failure_status = NULL, finished_ms = $3, cleanup = $4
                 WHERE id = $1 AND state IN ('queued', 'running')",
                &[&item.job_id, &result, &now_ms, &cleanup.as_str()],
            )?;
            Ok(n == 1)
        })
    }

    fn requeue_stranded(&self, now_ms: i64, timeout_ms: i64) -> Result<u64, QueueError> {
        self.tx(|tx| {
            let lease_now = self.clock.shared(tx, now_ms)?;
            // Only item rows are written (no claim takes a done item); a job an older node
            // completes meanwhile keeps its state, and its pending finalize is never claimed.
            let n = tx.execute(
                "UPDATE export_item i SET state = 'pending', owner = NULL, not_before_ms = NULL,
                   attempts = greatest(i.attempts - 1, 0)
                 FROM export_job j
                 WHERE j.id = i.job_id AND j.state = 'running'
                   AND i.kind = 'finalize' AND i.state = 'done'
                   AND COALESCE(i.heartbeat_ms, 0) <= $1
                   AND NOT EXISTS (SELECT 1 FROM export_item o
                                   WHERE o.job_id = i.job_id AND o.state <> 'done')",
                &[&lease_now.saturating_sub(timeout_ms)],
            )?;
            if n > 0 {
                tx.batch_execute(listen::NOTIFY)?;
            }
            Ok(n)
        })
    }

    fn cancel(&self, id: &str, now_ms: i64) -> Result<(), QueueError> {
        self.run(|c| {
            c.execute(
                "UPDATE export_job SET state = 'cancelled', finished_ms = $2, cleanup = 'pending'
                 WHERE id = $1 AND state IN ('queued', 'running', 'complete')",
                &[&id, &now_ms],
            )?;
            Ok(())
        })
    }

    fn expire(&self, finished_before_ms: i64, now_ms: i64) -> Result<u64, QueueError> {
        self.run(|c| {
            Ok(c.execute(
                "UPDATE export_job SET state = 'expired', cleanup = 'pending', result = NULL, expired_ms = $2
                 WHERE state = 'complete' AND finished_ms <= $1",
                &[&finished_before_ms, &now_ms],
            )?)
        })
    }

    fn cleanups(&self) -> Result<Vec<JobRecord>, QueueError> {
        self.run(|c| {
            c.query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM export_job WHERE cleanup IN ('pending', 'parts') ORDER BY finished_ms"
                ),
                &[],
            )?
            .iter()
            .map(job_row)
            .collect()
        })
    }

    fn recent(&self, limit: u64, client: Option<&str>) -> Result<Vec<JobRecord>, QueueError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            c.query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM export_job WHERE $1::text IS NULL OR client_id = $1
                     ORDER BY created_ms DESC, id LIMIT $2"
                ),
                &[&client, &limit],
            )?
            .iter()
            .map(job_row)
            .collect()
        })
    }

    fn count_by_state(&self) -> Result<Vec<(JobState, bool, u64)>, QueueError> {
        self.read(|c| {
            c.query(
                "SELECT state, strpos(request, '\"operation\":\"import\"') > 0, count(*)
                 FROM export_job GROUP BY 1, 2",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.get::<_, &str>(0).parse()?,
                    r.get::<_, bool>(1),
                    r.get::<_, i64>(2) as u64,
                ))
            })
            .collect()
        })
    }

    fn cleaned(&self, id: &str) -> Result<(), QueueError> {
        self.run(|c| {
            c.execute(
                "UPDATE export_job SET cleanup = 'done', cleanup_until_ms = NULL
                 WHERE id = $1 AND cleanup = 'pending'",
                &[&id],
            )?;
            Ok(())
        })
    }

    fn parts_cleaned(&self, id: &str) -> Result<(), QueueError> {
        self.run(|c| {
            c.execute(
                "UPDATE export_job SET cleanup = 'none', cleanup_until_ms = NULL, cleanup_owner = NULL
                 WHERE id = $1 AND cleanup = 'parts'",
                &[&id],
            )?;
            Ok(())
        })
    }

    fn key_sets(&self) -> Option<&dyn crate::keysets::KeySets> {
        Some(self)
    }

    fn files(&self, job_id: &str) -> Result<Vec<FileRecord>, QueueError> {
        self.read(|c| {
            c.query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM export_file WHERE job_id = $1 ORDER BY kind, prefix, number"
                ),
                &[&job_id],
            )?
            .iter()
            .map(file_row)
            .collect()
        })
    }

    fn progress(&self, job_id: &str) -> Result<Vec<TypeProgress>, QueueError> {
        self.read(|c| {
            Ok(c.query(
                "SELECT resource_type, SUM(scanned)::bigint, SUM(expected)::bigint, bool_and(state = 'done')
                 FROM export_item WHERE job_id = $1 AND kind = 'scan'
                 GROUP BY resource_type ORDER BY MIN(item_no)",
                &[&job_id],
            )?
            .iter()
            .map(|r| TypeProgress {
                resource_type: r.get(0),
                scanned: r.get::<_, i64>(1) as u64,
                expected: r.get::<_, i64>(2) as u64,
                done: r.get(3),
            })
            .collect())
        })
    }

    fn item_states(&self, job_id: &str) -> Result<Vec<(i64, bool)>, QueueError> {
        self.read(|c| {
            Ok(c.query(
                "SELECT item_no, state = 'done' FROM export_item WHERE job_id = $1 ORDER BY item_no",
                &[&job_id],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn item_progress(&self, job_id: &str) -> Result<Vec<ItemProgress>, QueueError> {
        let rows = self.read(|c| {
            Ok(c.query(
                "SELECT item_no, kind, resource_type, cursor, scanned, state = 'done'
                 FROM export_item WHERE job_id = $1 ORDER BY item_no",
                &[&job_id],
            )?)
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(ItemProgress {
                item_no: r.get(0),
                kind: r.get::<_, String>(1).parse()?,
                resource_type: r.get(2),
                cursor: r.get(3),
                scanned: r.get::<_, i64>(4) as u64,
                done: r.get(5),
            });
        }
        Ok(out)
    }

    fn release_orphans(&self, orphans: Orphans<'_>) -> Result<u64, QueueError> {
        const RELEASE: &str = "UPDATE export_item SET state = 'pending', owner = NULL,
               error = 'the server stopped while it ran', error_status = 500
             WHERE state = 'running'";
        const UNHOLD: &str = "UPDATE export_job SET cleanup_until_ms = NULL, cleanup_owner = NULL
             WHERE cleanup_until_ms IS NOT NULL";
        // `left(owner, n)` rather than LIKE: a node id is matched literally.
        const OF_NODE: &str = "left({col}, length($1) + 1) = $1 || '/' AND {col} <> $2";
        self.tx(|tx| {
            let released = match orphans {
                Orphans::All => {
                    tx.execute(UNHOLD, &[])?;
                    tx.execute(RELEASE, &[])?
                }
                Orphans::OfNode { node, current } => {
                    let of_node = |col: &str| OF_NODE.replace("{col}", col);
                    tx.execute(
                        &format!("{UNHOLD} AND {}", of_node("cleanup_owner")),
                        &[&node, &current],
                    )?;
                    tx.execute(
                        &format!("{RELEASE} AND {}", of_node("owner")),
                        &[&node, &current],
                    )?
                }
            };
            if released > 0 {
                tx.batch_execute(listen::NOTIFY)?;
            }
            Ok(released)
        })
    }

    fn hold_cleanup(
        &self,
        id: &str,
        owner: &str,
        now_ms: i64,
        hold_ms: i64,
    ) -> Result<bool, QueueError> {
        self.run(|c| {
            let lease_now = self.clock.shared(c, now_ms)?;
            Ok(c.execute(
                "UPDATE export_job SET cleanup_until_ms = $2, cleanup_owner = $4
                 WHERE id = $1 AND cleanup IN ('pending', 'parts')
                   AND (cleanup_until_ms IS NULL OR cleanup_until_ms <= $3)",
                &[&id, &lease_now.saturating_add(hold_ms), &lease_now, &owner],
            )? == 1)
        })
    }

    fn release_cleanup(&self, id: &str, owner: &str) -> Result<(), QueueError> {
        self.run(|c| {
            c.execute(
                "UPDATE export_job SET cleanup_until_ms = NULL, cleanup_owner = NULL
                 WHERE id = $1 AND cleanup_owner = $2",
                &[&id, &owner],
            )?;
            Ok(())
        })
    }

    fn watch_work(
        &self,
        wake: std::sync::Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Option<WorkWatch>, QueueError> {
        let watch = listen::spawn(self.pool.target.clone(), wake).map_err(|e| {
            QueueError::Db(
                self.pool
                    .target
                    .unavailable(format!("cannot start the work listener thread: {e}")),
            )
        })?;
        Ok(Some(watch))
    }

    fn purge(&self, finished_before_ms: i64, expired_before_ms: i64) -> Result<u64, QueueError> {
        // One statement: the jobs deleted are exactly those whose items and files go (nodes
        // purging at once wait for each other's row locks and delete each row once).
        self.run(|c| {
            Ok(c.query_one(
                "WITH gone AS (
                   DELETE FROM export_job WHERE state IN ('failed', 'cancelled', 'expired')
                     AND cleanup = 'done'
                     AND CASE WHEN state = 'expired' AND expired_ms IS NOT NULL
                              THEN expired_ms <= $2 ELSE finished_ms <= $1 END
                   RETURNING id),
                 files AS (DELETE FROM export_file WHERE job_id IN (SELECT id FROM gone)),
                 items AS (DELETE FROM export_item WHERE job_id IN (SELECT id FROM gone))
                 SELECT count(*) FROM gone",
                &[&finished_before_ms, &expired_before_ms],
            )?
            .get::<_, i64>(0) as u64)
        })
    }
}

impl SharedState for PgJobQueue {
    fn secret(&self, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.pool.run(|c| {
            // The first insert wins; every node then reads the same value.
            c.execute(
                "INSERT INTO cluster_secret (name, value, created_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &fresh, &now_ms],
            )?;
            Ok(
                c.query_one("SELECT value FROM cluster_secret WHERE name = $1", &[&name])?
                    .get::<_, Vec<u8>>(0),
            )
        })
    }
}

impl AssertionRecord for PgJobQueue {
    fn remember_once(
        &self,
        scope: &str,
        key: &str,
        until_s: i64,
        now_s: i64,
    ) -> Result<bool, StoreError> {
        let last = self.jti_purged_s.load(Ordering::Relaxed);
        let purge = now_s.saturating_sub(last) >= JTI_PURGE_EVERY_S
            && self
                .jti_purged_s
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        self.pool.run(|c| {
            if purge {
                c.execute("DELETE FROM auth_jti WHERE expires_s < $1", &[&now_s])?;
            }
            // Inserted, or an expired row of the same key taken over: a row comes back. A live
            // row of the key (a replay, at this node or any other) returns none.
            Ok(c.query_opt(
                "INSERT INTO auth_jti (iss, jti, expires_s) VALUES ($1, $2, $3)
                 ON CONFLICT (iss, jti) DO UPDATE SET expires_s = EXCLUDED.expires_s
                   WHERE auth_jti.expires_s < $4
                 RETURNING 1",
                &[&scope, &key, &until_s, &now_s],
            )?
            .is_some())
        })
    }
}

/// Fails `item` and its job (while still queued or running) with `message` and HTTP `status`:
/// an item out of attempts ([`JobQueue::fail_item`]) or past its wait for space
/// ([`JobQueue::wait_for_space`]).
fn fail_item_and_job(
    tx: &mut Tx<'_>,
    item: &WorkItem,
    message: &str,
    status: i64,
    now_ms: i64,
) -> Result<(), ::postgres::Error> {
    tx.execute(
        "UPDATE export_item SET state = 'failed', error = $3, error_status = $4 WHERE job_id = $1 AND item_no = $2",
        &[&item.job_id, &item.item_no, &message, &status],
    )?;
    tx.execute(
        "UPDATE export_job SET state = 'failed', result = $2, failure_status = $3, finished_ms = $4,
           cleanup = 'pending'
         WHERE id = $1 AND state IN ('queued', 'running')",
        &[&item.job_id, &message, &status, &now_ms],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{FileKind, ITEM_STATES, check_in};

    #[test]
    fn the_check_constraints_list_exactly_the_enum_names() {
        let flat = SCHEMA.split_whitespace().collect::<Vec<_>>().join(" ");
        // The cleanup constraint as migration 8 replaced it.
        let v8 = SCHEMA_V8.split_whitespace().collect::<Vec<_>>().join(" ");
        let cleanup = check_in("cleanup", Cleanup::NAMES);
        assert!(v8.contains(&cleanup), "{cleanup} missing from migration 8");
        for (column, names) in [
            ("state", JobState::NAMES),
            ("kind", ItemKind::NAMES),
            ("state", ITEM_STATES),
            ("kind", FileKind::NAMES),
        ] {
            let check = check_in(column, names);
            assert!(flat.contains(&check), "{check} missing from the schema");
        }
    }
}
