//! OperationOutcome resources and the mapping of store errors to HTTP statuses, shared by bundle
//! responses here and (so that they agree) by the REST server.

use serde_json::{Value, json};
use store::StoreError;

/// One `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeIssue {
    /// `error`, `warning`, `information` or `fatal`.
    pub severity: &'static str,
    /// An `IssueType` code: `invalid`, `not-found`, `deleted`, `conflict`, `duplicate`,
    /// `not-supported`, `processing`, `exception`, ...
    pub code: &'static str,
    pub diagnostics: String,
    /// FHIRPath of the offending element, e.g. `Bundle.entry[2].request.url`.
    pub expression: Option<String>,
}

impl OutcomeIssue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> OutcomeIssue {
        OutcomeIssue {
            severity: "error",
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> OutcomeIssue {
        self.expression = Some(expression.into());
        self
    }
}

/// An `OperationOutcome` resource with these issues.
pub fn operation_outcome(issues: &[OutcomeIssue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v = json!({
                "severity": i.severity,
                "code": i.code,
                "diagnostics": i.diagnostics,
            });
            if let Some(e) = &i.expression {
                v["expression"] = json!([e]);
            }
            v
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

/// HTTP status and issue of a store error. Internal failures (database, i/o, corruption) get a
/// generic diagnostics text: their detail belongs in the log, not in a response.
pub fn store_error_issue(e: &StoreError) -> (u16, OutcomeIssue) {
    if e.is_storage_full() {
        return (
            507,
            OutcomeIssue::error(
                "no-store",
                "the database's disk is full: nothing of this request was written; retry once space is freed",
            ),
        );
    }
    if e.is_transient() {
        return (
            503,
            OutcomeIssue::error(
                "transient",
                "the database could not complete the request now (a timeout, a lock or a conflict): nothing of it was written; retry later",
            ),
        );
    }
    match e {
        StoreError::NotFound { .. } => (404, OutcomeIssue::error("not-found", e.to_string())),
        StoreError::Gone { .. } => (410, OutcomeIssue::error("deleted", e.to_string())),
        StoreError::VersionConflict { .. } => (412, OutcomeIssue::error("conflict", e.to_string())),
        StoreError::AlreadyExists { .. } => (409, OutcomeIssue::error("duplicate", e.to_string())),
        StoreError::UpdateWouldCreate { .. } => {
            (403, OutcomeIssue::error("forbidden", e.to_string()))
        }
        StoreError::InvalidId(_) => (400, OutcomeIssue::error("invalid", e.to_string()).at("id")),
        StoreError::InvalidType(_) | StoreError::InvalidResource(_) => {
            (400, OutcomeIssue::error("invalid", e.to_string()))
        }
        // The message names the data directory: a server path, which stays in the log.
        StoreError::Locked { .. } => (
            503,
            OutcomeIssue::error(
                "transient",
                "the data directory is in use by another process; retry later",
            ),
        ),
        StoreError::Cancelled => (503, OutcomeIssue::error("timeout", e.to_string())),
        StoreError::ConditionLocked { .. } | StoreError::GivenUp => {
            (503, OutcomeIssue::error("transient", e.to_string()))
        }
        // The message names the database host: it stays in the log.
        StoreError::Unavailable { .. } => (
            503,
            OutcomeIssue::error("transient", "the database is unavailable; retry later"),
        ),
        StoreError::QueryTooLarge(_) => (400, OutcomeIssue::error("too-costly", e.to_string())),
        StoreError::Io { .. }
        | StoreError::Sqlite(_)
        | StoreError::Postgres(_)
        | StoreError::Corrupt(_)
        | StoreError::InvalidPlan(_) => (
            500,
            OutcomeIssue::error("exception", "internal storage error"),
        ),
    }
}

/// The `Bundle.entry.response.status` text of an HTTP status.
pub fn status_line(status: u16) -> String {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        422 => "Unprocessable Entity",
        424 => "Failed Dependency",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "",
    };
    if reason.is_empty() {
        status.to_string()
    } else {
        format!("{status} {reason}")
    }
}

#[cfg(test)]
mod storage_full_tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_no_store_and_other_database_errors_stay_500() {
        let full = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        ));
        let (status, issue) = store_error_issue(&full);
        assert_eq!(status, 507);
        assert_eq!(issue.code, "no-store");
        let enospc = StoreError::Io {
            path: "/data/fhirhose.db".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(store_error_issue(&enospc).0, 507);
        let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            None,
        ));
        assert_eq!(store_error_issue(&busy).0, 500);
        assert_eq!(status_line(507), "507 Insufficient Storage");
    }
}
