//! [`ExportError`], what the export API answers (each variant names its HTTP status), and the
//! diagnostics of a failed work item (what failed and where, without secrets or server paths).

use crate::anonymization::AnonymizationError;
use crate::jobs::{JobRecord, QueueError};
use crate::record::RecordError;
use crate::request::RequestError;
use crate::run::RunError;
use crate::sink::Sink;

/// Errors of the export API; each names the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A kick-off parameter is invalid → 400.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A kick-off asks for more work than one request may (more `patient` references than
    /// `--export-group-max-members`) → 400 `too-costly` naming the parameter.
    #[error("{}", .0.message)]
    TooCostly(RequestError),
    /// The Group of a Group-level export does not exist → 404.
    #[error("Group/{0} not found")]
    GroupNotFound(String),
    /// The de-identification configuration is missing, invalid or not allowed → 400
    /// (503 when the storage could not be read).
    #[error(transparent)]
    Anonymization(#[from] AnonymizationError),
    /// No such job, or not the caller's → 404.
    #[error("no export job '{0}'")]
    UnknownJob(String),
    /// The caller's current scopes do not cover what the export needs → 403.
    #[error("{0}")]
    Forbidden(String),
    /// No such file in a finished export → 404.
    #[error("no file '{0}' in this export")]
    UnknownFile(String),
    /// The export's retention period is over and its files are removed → 410.
    #[error("export '{0}' has expired: its files were removed after the retention period")]
    Expired(String),
    /// The export destination cannot be reached or is overloaded at kick-off → 503 with
    /// Retry-After. Names the destination, never its credentials or its answer.
    #[error("{0}")]
    DestinationUnavailable(String),
    /// The export destination refused at kick-off (credentials, missing bucket) → 500 naming
    /// the destination and the reason.
    #[error("{0}")]
    Destination(String),
    /// The request conflicts with the server's state (an `$import` InitialLoad into a server that
    /// holds data) → 409.
    #[error("{0}")]
    Conflict(String),
    /// Too many exports at once → 429 with Retry-After.
    #[error("too many exports in progress ({0}); retry later")]
    TooMany(u64),
    /// The caller's client has as many exports queued or running as one client may
    /// (`--export-max-per-client`) → 429 with Retry-After.
    #[error(
        "this client has {active} exports or imports in progress, the most one client may run at once ({limit}); retry when one has finished"
    )]
    TooManyForClient { active: u64, limit: u64 },
    /// A payload of a job's record cannot be used (written by a newer version, or edited by
    /// hand; the cause kept as the source) → 500.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// An export worker thread could not be started → 500.
    #[error("cannot start an export thread")]
    Thread(#[source] std::io::Error),
    /// Planning the export's work items failed (the cause kept as the source) → 500.
    #[error("cannot plan the export")]
    Plan(#[source] Box<RunError>),
    /// The export settings are invalid (the cause kept as the source) → 500.
    #[error("invalid export settings")]
    Settings(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The resource store failed (its cause kept as the source): 503 when the database is
    /// unavailable, else 500.
    #[error("export: {0}")]
    Store(#[source] store::StoreError),
    /// The job queue failed (its cause kept as the source) → 500.
    #[error(transparent)]
    Queue(QueueError),
    /// A manifest page that this export does not have → 404.
    #[error("this export's manifest has no page {0}")]
    UnknownPage(i64),
}

impl From<QueueError> for ExportError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Full(n) => ExportError::TooMany(n),
            // The limit is the service's: `queue_job` names it.
            QueueError::ClientFull(n) => ExportError::TooManyForClient {
                active: n,
                limit: n,
            },
            e => ExportError::Queue(e),
        }
    }
}

/// Drops the query of every URL in `text` (an Azure SAS travels in it).
pub(super) fn without_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_query = false;
    for c in text.chars() {
        if c == '?' {
            in_query = true;
        } else if in_query && (c.is_whitespace() || matches!(c, '"' | '\'' | ')' | ',')) {
            in_query = false;
        }
        if !in_query {
            out.push(c);
        }
    }
    out
}

/// The diagnostics of a failed item: what failed and where, without secrets or server paths.
pub(super) fn failure_text(e: &RunError, sink: &dyn Sink, job: Option<&JobRecord>) -> String {
    match e {
        RunError::Sink(crate::sink::SinkError::NoSpace(_)) => format!(
            "the {} export destination is full (no space left on the device): {e}",
            sink.kind()
        ),
        RunError::Sink(s) => {
            let at = job.map_or_else(String::new, |j| {
                format!(
                    " at {}",
                    without_queries(&sink.location(&j.container, &j.folder))
                )
            });
            let what = if s.is_transient() {
                "is unavailable"
            } else {
                "failed"
            };
            format!(
                "the {} export destination{at} {what}: {}",
                sink.kind(),
                without_queries(&s.to_string())
            )
        }
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_dropped_from_urls() {
        assert_eq!(
            without_queries("GET http://a/b?sig=secret&sv=1 failed (http://c?x)"),
            "GET http://a/b failed (http://c)"
        );
    }
}
