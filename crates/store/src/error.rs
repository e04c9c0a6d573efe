//! The store's error type. Each variant's doc says how it must reach an HTTP client; the server maps
//! it in one place.

/// Errors of every [`crate::Store`] operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The resource (or that version of it) does not exist. → 404 `not-found`.
    #[error("{resource_type}/{id} not found")]
    NotFound { resource_type: String, id: String },
    /// The resource's current version (or the requested version) is a delete tombstone.
    /// → 410 `deleted`.
    #[error("{resource_type}/{id} was deleted (version {version})")]
    Gone {
        resource_type: String,
        id: String,
        version: i64,
    },
    /// `If-Match` named a version that is not the current one (`actual` is `None` when the
    /// resource does not exist). → 412 `conflict`.
    #[error("version conflict on {resource_type}/{id}: expected version {expected}, current is {}", actual.map(|v| v.to_string()).unwrap_or_else(|| "none".into()))]
    VersionConflict {
        resource_type: String,
        id: String,
        expected: i64,
        actual: Option<i64>,
    },
    /// A create with a caller-chosen id that already exists (also if deleted). → 409 `duplicate`.
    #[error("{resource_type}/{id} already exists")]
    AlreadyExists { resource_type: String, id: String },
    /// A [`crate::WriteOp::Replace`] of a resource that does not exist (or is deleted): the
    /// caller may update, not create. → 403 `forbidden`.
    #[error("{resource_type}/{id} does not exist, and this update may not create it")]
    UpdateWouldCreate { resource_type: String, id: String },
    /// Not a valid FHIR id (`[A-Za-z0-9\-\.]{1,64}`). → 400 `invalid`.
    #[error("invalid resource id '{0}'")]
    InvalidId(String),
    /// Not a syntactically valid resource type name. → 400 `invalid` (or 404 for a URL segment).
    #[error("invalid resource type '{0}'")]
    InvalidType(String),
    /// The resource JSON cannot be stored as given (not an object, `resourceType` missing or not
    /// matching, body id differing from the URL id). → 400 `invalid`.
    #[error("invalid resource: {0}")]
    InvalidResource(String),
    /// Another process holds the data directory's lock. → fail at start-up with this message.
    #[error(
        "data directory {path} is in use by another fhirhose process (lock file {lock_file}); stop it or use `load --server`"
    )]
    Locked { path: String, lock_file: String },
    /// File system error (creating the data directory, the lock file). → 500.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The database failed. → 500 (details to the log only).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A search was stopped by its stop check (client gone, time limit) while it ran.
    /// → 503 `timeout` (the search crate tells the two apart).
    #[error("the search was stopped")]
    Cancelled,
    /// A search is larger than the database takes in one statement (too many values, too deep
    /// an expression). → 400 `too-costly`.
    #[error("the search is too large for one statement: {0}")]
    QueryTooLarge(String),
    /// A search plan that does not hold together (a caller's bug, e.g. a cursor with another
    /// number of sort values than the plan has sort keys). → 500.
    #[error("invalid search plan: {0}")]
    InvalidPlan(String),
    /// The database server cannot be reached: refused or timed out at open, or the connection
    /// was lost during the call (server restart, network, `pg_terminate_backend`). `target` is
    /// `host:port` (never credentials). → 503 `transient` (retry later); at start-up, a clear
    /// message and exit. The connection pool recovers by itself once the database is back.
    #[error("database at {target} is unavailable: {reason}")]
    Unavailable { target: String, reason: String },
    /// PostgreSQL failed (not a lost connection: that is [`StoreError::Unavailable`]). → 500
    /// (details to the log only).
    #[error("postgres: {}", postgres_detail(.0))]
    Postgres(#[from] ::postgres::Error),
    /// A conditional interaction's condition stayed locked by another request (of this node or
    /// another) for all of `waited` ([`crate::Store::lock_conditions`]). → 503 `transient` with
    /// `Retry-After`; nothing was written.
    #[error(
        "the condition is locked by another request with the same condition (waited {waited:?})"
    )]
    ConditionLocked { waited: std::time::Duration },
    /// The caller stopped waiting for the database before this transaction committed
    /// ([`crate::Patience::give_up`]): it was rolled back, nothing written. → 503 `transient`
    /// (the caller has normally answered already).
    #[error("the request stopped waiting for the database before its commit; nothing was written")]
    GivenUp,
    /// The database content is not what this version of the store expects (unknown schema
    /// version, malformed stored row). → 500, and refuse to start.
    #[error("store is corrupt or from an incompatible version: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The database could not do it now and did nothing of it: a statement cancelled by the
    /// database's `statement_timeout` (57014), a lock not granted within `lock_timeout`
    /// (55P03), a serialization failure or a deadlock (40001, 40P01), the server short of
    /// memory or resources (53000, 53200); SQLite busy or locked beyond its timeout. The
    /// transaction was rolled back and the same request may succeed later: 503 `transient`
    /// with `Retry-After`, not a 500. (A search's own cancel is [`StoreError::Cancelled`].)
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            StoreError::Postgres(e) => e.code().is_some_and(|c| {
                matches!(
                    c.code(),
                    "57014" | "55P03" | "40001" | "40P01" | "53000" | "53200"
                )
            }),
            StoreError::GivenUp => true,
            _ => false,
        }
    }

    /// The database's disk (or quota) is full: SQLite's `SQLITE_FULL`, PostgreSQL's
    /// `disk_full` (53100), or `ENOSPC`/`EDQUOT` on a file of the store. The write was not made
    /// (SQLite rolls the transaction back; PostgreSQL aborts it), and the same write may succeed
    /// once space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Postgres(e) => e.code() == Some(&::postgres::error::SqlState::DISK_FULL),
            StoreError::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source.kind() == std::io::ErrorKind::QuotaExceeded
            }
            _ => false,
        }
    }
}

/// A PostgreSQL error as an operator needs it: the client's `Display` says only "db error" for
/// an error the server sent, whose SQLSTATE, message and detail are in its source.
fn postgres_detail(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            if let Some(table) = db.table() {
                text.push_str(&format!(" [table {table}]"));
            }
            text
        }
        None => e.to_string(),
    }
}

impl From<rusqlite::types::FromSqlError> for StoreError {
    /// A stored value of an unexpected SQL type means the database is not what we wrote.
    fn from(e: rusqlite::types::FromSqlError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// A stored state name this version does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown export {what} '{value}' in the job table (written by a newer version, or edited by hand)"
)]
pub struct UnknownName {
    /// What the value names (`job state`, `cleanup state`, `item kind`, `file kind`).
    pub what: &'static str,
    pub value: String,
}

/// Errors of a [`JobQueue`](crate::JobQueue) (and of its key sets, [`crate::keysets`]).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database failed (the driver's error is the source). → 500.
    #[error("export job table: {0}")]
    Db(#[from] StoreError),
    /// The concurrent-export limit is reached (the number of active jobs). → 429.
    #[error("{0} exports in progress")]
    Full(u64),
    /// The new job's client has as many jobs queued or running as one client may (the number
    /// of its active jobs). → 429.
    #[error("{0} exports of this client in progress")]
    ClientFull(u64),
    /// A stored state this version does not know (a newer version wrote it, or the table was
    /// edited by hand): refused, never read as some other state. → 500.
    #[error(transparent)]
    Unknown(#[from] UnknownName),
}

impl QueueError {
    /// The job table's database went away or a statement waited too long: the same call may
    /// succeed once it is back.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, QueueError::Db(StoreError::Unavailable { .. }))
    }
}
