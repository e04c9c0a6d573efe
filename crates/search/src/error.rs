//! Search errors. Every variant is a client error (HTTP 400 with an OperationOutcome) except
//! [`SearchError::Store`], which is a server-side failure.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SearchError {
    /// The resource type is not a known FHIR R4 resource type. → 400 (`not-supported`).
    #[error("unknown resource type '{resource_type}'")]
    UnknownResourceType { resource_type: String },
    /// The parameter is not a search parameter of the type. → 400 (`not-supported`) unless the
    /// request is lenient, in which case it is reported in [`crate::Ignored`] instead.
    #[error("unknown search parameter '{param}' for resource type {resource_type}")]
    UnknownParameter {
        resource_type: String,
        param: String,
    },
    /// The parameter exists but this server does not support it (composite, special, `:above`…).
    /// → 400 (`not-supported`) unless lenient.
    #[error("search parameter '{param}' is not supported: {reason}")]
    Unsupported { param: String, reason: String },
    /// A malformed value, prefix or modifier. → 400 (`invalid`), lenient or not.
    #[error("invalid value for search parameter '{param}': {reason}")]
    InvalidValue { param: String, reason: String },
    /// The request asks for more than a bound of [`crate::SearchLimits`] allows (parameters,
    /// lengths, values, sort keys, includes), or more than the database can take in one
    /// statement. `param` names the parameter (empty when no single one is to blame).
    /// → 400 (`too-costly`), lenient or not.
    #[error("search parameter '{param}' exceeds a limit: {reason}")]
    TooCostly { param: String, reason: String },
    /// The search ran longer than the server's time limit (`--search-timeout`) and was stopped.
    /// → 503 (`timeout`).
    #[error(
        "the search was stopped after the server's time limit of {limit:?}; narrow it (fewer values, sort keys or includes, a smaller _count)"
    )]
    Timeout { limit: std::time::Duration },
    /// The search was stopped because its client went away (nobody reads the answer).
    /// → 503 (`timeout`).
    #[error("the search was cancelled")]
    Cancelled,
    /// The database could not be reached, or the connection was lost, during the search.
    /// → 503 (`transient`, Retry-After); the details (host) go to the log only.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The storage layer failed while executing a search. → 500.
    #[error("store error: {0}")]
    Store(String),
}

impl SearchError {
    pub(crate) fn invalid(param: &str, reason: impl Into<String>) -> Self {
        SearchError::InvalidValue {
            param: param.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn too_costly(param: &str, reason: impl Into<String>) -> Self {
        SearchError::TooCostly {
            param: param.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(param: &str, reason: impl Into<String>) -> Self {
        SearchError::Unsupported {
            param: param.to_string(),
            reason: reason.into(),
        }
    }

    /// The search parameter (as written by the client) the error is about, for the
    /// OperationOutcome's `expression`.
    pub fn param(&self) -> Option<&str> {
        match self {
            SearchError::UnknownParameter { param, .. }
            | SearchError::Unsupported { param, .. }
            | SearchError::InvalidValue { param, .. } => Some(param),
            SearchError::TooCostly { param, .. } if !param.is_empty() => Some(param),
            _ => None,
        }
    }

    /// True for errors that `Prefer: handling=lenient` turns into ignored parameters.
    pub fn is_lenient_ignorable(&self) -> bool {
        matches!(
            self,
            SearchError::UnknownParameter { .. } | SearchError::Unsupported { .. }
        )
    }
}

impl SearchError {
    /// The HTTP status this error maps to: 400 for every client error, 503 for a search stopped
    /// by the time limit (or its client), 500 for the store.
    pub fn http_status(&self) -> u16 {
        match self {
            SearchError::Store(_) => 500,
            SearchError::Timeout { .. } | SearchError::Cancelled | SearchError::Unavailable(_) => {
                503
            }
            _ => 400,
        }
    }

    /// The OperationOutcome `issue.code`.
    pub fn issue_code(&self) -> &'static str {
        match self {
            SearchError::UnknownResourceType { .. }
            | SearchError::UnknownParameter { .. }
            | SearchError::Unsupported { .. } => "not-supported",
            SearchError::InvalidValue { .. } => "invalid",
            SearchError::TooCostly { .. } => "too-costly",
            SearchError::Timeout { .. } | SearchError::Cancelled => "timeout",
            SearchError::Unavailable(_) => "transient",
            SearchError::Store(_) => "exception",
        }
    }

    /// An OperationOutcome for the client; store details are not exposed.
    pub fn operation_outcome(&self) -> serde_json::Value {
        let diagnostics = match self {
            SearchError::Store(_) => "the search failed on the server".to_string(),
            SearchError::Unavailable(_) => "the database is unavailable; retry later".to_string(),
            other => other.to_string(),
        };
        let mut issue = serde_json::json!({
            "severity": "error",
            "code": self.issue_code(),
            "diagnostics": diagnostics,
        });
        if let Some(p) = self.param() {
            issue["expression"] = serde_json::json!([p]);
        }
        serde_json::json!({"resourceType": "OperationOutcome", "issue": [issue]})
    }
}
