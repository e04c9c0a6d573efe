//! The errors of running a job's work ([`RunError`]) and of reading a job's record
//! ([`RecordError`]), below the modules that raise them (`run`, `import`, `anonymization`,
//! `record`), so that none of those depends on another for its error type.

use crate::jobs::QueueError;
use crate::request::RequestError;
use crate::sink::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The job was cancelled (or failed elsewhere) while this item ran.
    #[error("the export was stopped")]
    Stopped,
    /// Another worker holds this item now.
    #[error("the work item's lease was lost")]
    LeaseLost,
    /// This process is shutting down: the item is given back, resumed at its cursor.
    #[error("the server is shutting down")]
    Interrupted,
    #[error("Group/{0} not found")]
    GroupNotFound(String),
    /// The Group's membership passes a bound of [`RunSettings`](crate::run::RunSettings) (nesting depth or members):
    /// this export fails, the server goes on.
    #[error("{0}")]
    GroupTooLarge(String),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("job table: {0}")]
    Queue(#[from] QueueError),
    #[error("storage: {0}")]
    Sink(#[from] SinkError),
    /// A resource could not be de-identified and the configuration says `raise`.
    #[error("{0}")]
    Anonymization(String),
    /// A payload of the job's record cannot be used (its cause kept as the source).
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl RunError {
    /// Whether another attempt of the item may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RunError::Sink(e) => e.is_transient(),
            RunError::Store(
                store::StoreError::Io { .. } | store::StoreError::Unavailable { .. },
            ) => true,
            // The job table's database went away or a statement waited too long (e.g. behind
            // a paused node's session, which the server then ends): the item is retried.
            RunError::Queue(e) => e.is_unavailable(),
            _ => false,
        }
    }

    /// The HTTP status the status endpoint answers for a job failed by this error.
    pub fn status(&self) -> u16 {
        match self {
            RunError::GroupNotFound(_)
            | RunError::GroupTooLarge(_)
            | RunError::Anonymization(_) => 400,
            RunError::Record(e) => e.status(),
            RunError::Sink(e) if e.is_transient() => 503,
            RunError::Sink(SinkError::NoSpace(_)) => 507,
            _ => 500,
        }
    }
}

/// Which payload of a job record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Request,
    Anonymization,
    Result,
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Column::Request => "request",
            Column::Anonymization => "anonymization",
            Column::Result => "result",
        })
    }
}

/// A payload of a job record that this version cannot use.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON, or not of the payload's shape (an unknown or missing field, a wrong type).
    #[error("the recorded {column} of job {job} cannot be read")]
    Decode {
        job: String,
        column: Column,
        #[source]
        source: serde_json::Error,
    },
    /// Written by a newer version.
    #[error("the recorded {column} of job {job} has format {found}, newer than this version reads")]
    Format {
        job: String,
        column: Column,
        found: u32,
    },
    /// Of the right shape, with a value that is not valid.
    #[error("the recorded {column} of job {job} is invalid: {reason}")]
    Invalid {
        job: String,
        column: Column,
        reason: String,
    },
    /// The recorded kick-off parameters no longer parse (a request valid at kick-off that this
    /// version refuses).
    #[error("the recorded request of job {job} is refused")]
    Request {
        job: String,
        #[source]
        source: RequestError,
    },
}

impl RecordError {
    /// The job whose record it is.
    pub fn job(&self) -> &str {
        match self {
            RecordError::Decode { job, .. }
            | RecordError::Format { job, .. }
            | RecordError::Invalid { job, .. }
            | RecordError::Request { job, .. } => job,
        }
    }

    /// The payload that cannot be used.
    pub fn column(&self) -> Column {
        match self {
            RecordError::Decode { column, .. }
            | RecordError::Format { column, .. }
            | RecordError::Invalid { column, .. } => *column,
            RecordError::Request { .. } => Column::Request,
        }
    }

    /// The HTTP status of a job that fails with it: 400 for recorded parameters that no longer
    /// parse (a bad request found late), 500 for a record this version cannot read.
    pub fn status(&self) -> u16 {
        match self {
            RecordError::Request { .. } => 400,
            _ => 500,
        }
    }
}
