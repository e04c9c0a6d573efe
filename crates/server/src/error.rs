//! The one place where errors become HTTP responses: every error is an OperationOutcome with the
//! right status. Internal details go to the log, never to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ingest::outcome::{OutcomeIssue, operation_outcome, store_error_issue};
use serde_json::Value;

/// Retry-After (seconds) of a 503 for a database that is unavailable (the pool reconnects by
/// itself once it is back).
pub const RETRY_AFTER_SECS: &str = "5";

/// An error and its `source()` chain as one line (`a: b: c`), for the log.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// An API error: an HTTP status and the issues of its OperationOutcome. Boxed, so that the
/// `Result<_, ApiError>` every handler returns stays one pointer wide on its error side; the
/// fields are read and written through `Deref` ([`ApiErrorBody`]).
#[derive(Debug)]
pub struct ApiError(Box<ApiErrorBody>);

/// What an [`ApiError`] carries.
#[derive(Debug)]
pub struct ApiErrorBody {
    pub status: StatusCode,
    pub issues: Vec<OutcomeIssue>,
    /// A ready OperationOutcome (from a bundle error) used instead of `issues`.
    pub outcome: Option<Value>,
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl std::ops::Deref for ApiError {
    type Target = ApiErrorBody;
    fn deref(&self) -> &ApiErrorBody {
        &self.0
    }
}

impl std::ops::DerefMut for ApiError {
    fn deref_mut(&mut self) -> &mut ApiErrorBody {
        &mut self.0
    }
}

impl From<ApiErrorBody> for ApiError {
    fn from(body: ApiErrorBody) -> ApiError {
        ApiError(Box::new(body))
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> ApiError {
        ApiErrorBody {
            status,
            issues: vec![OutcomeIssue::error(code, diagnostics)],
            outcome: None,
            headers: Vec::new(),
        }
        .into()
    }

    /// `503` `throttled` with `Retry-After: 1`: a bound on what one client or the server has in
    /// progress was reached; nothing waits for it.
    pub fn throttled(diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "throttled", diagnostics)
            .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// The parts, by value.
    pub fn into_body(self) -> ApiErrorBody {
        *self.0
    }

    /// 400 `invalid` at an expression.
    pub fn invalid(diagnostics: impl Into<String>, expression: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(StatusCode::BAD_REQUEST, "invalid", diagnostics);
        e.issues[0].expression = Some(expression.into());
        e
    }

    pub fn at(mut self, expression: impl Into<String>) -> ApiError {
        if let Some(i) = self.issues.first_mut() {
            i.expression = Some(expression.into());
        }
        self
    }

    pub fn not_found(diagnostics: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", diagnostics)
    }

    pub fn internal(context: &str, detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(context, error = %detail, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "internal server error",
        )
    }

    /// The database cannot be reached (refused, connection lost, pool timeout): 503 `transient`
    /// with `Retry-After`; the detail (host names) goes to the log only.
    pub fn database_unavailable(context: &str, detail: impl std::fmt::Display) -> ApiError {
        tracing::error!(context, error = %detail, "database unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the database is unavailable; retry later",
        )
        .with_header(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        )
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }
}

impl From<store::StoreError> for ApiError {
    fn from(e: store::StoreError) -> ApiError {
        let (status, issue) = store_error_issue(&e);
        if status >= 500 {
            tracing::error!(error = %e, "store error");
        }
        let mut headers = Vec::new();
        if matches!(e, store::StoreError::ConditionLocked { .. }) {
            // Another request holds the condition for as long as its search and write take.
            headers.push((header::RETRY_AFTER, HeaderValue::from_static("1")));
        } else if matches!(e, store::StoreError::Unavailable { .. }) || e.is_transient() {
            headers.push((
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            ));
        }
        ApiErrorBody {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            issues: vec![issue],
            outcome: None,
            headers,
        }
        .into()
    }
}

impl From<ingest::BundleError> for ApiError {
    fn from(e: ingest::BundleError) -> ApiError {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %e, "bundle processing failed");
        }
        ApiErrorBody {
            status,
            issues: Vec::new(),
            outcome: Some(e.to_operation_outcome()),
            headers: Vec::new(),
        }
        .into()
    }
}

impl From<search::SearchError> for ApiError {
    fn from(e: search::SearchError) -> ApiError {
        match &e {
            search::SearchError::Store(detail) => ApiError::internal("search", detail),
            search::SearchError::Unavailable(detail) => {
                ApiError::database_unavailable("search", detail)
            }
            search::SearchError::UnknownParameter { .. }
            | search::SearchError::Unsupported { .. }
            | search::SearchError::UnknownResourceType { .. } => {
                let mut err =
                    ApiError::new(StatusCode::BAD_REQUEST, "not-supported", e.to_string());
                if let Some(p) = e.param() {
                    err = err.at(p.to_string());
                }
                err
            }
            search::SearchError::InvalidValue { .. } => {
                let mut err = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
                if let Some(p) = e.param() {
                    err = err.at(p.to_string());
                }
                err
            }
            search::SearchError::TooCostly { .. }
            | search::SearchError::Timeout { .. }
            | search::SearchError::Cancelled => {
                let status = StatusCode::from_u16(e.http_status())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let mut err = ApiError::new(status, e.issue_code(), e.to_string());
                if let Some(p) = e.param() {
                    err = err.at(p.to_string());
                }
                err
            }
        }
    }
}

impl From<auth::AuthRejection> for ApiError {
    fn from(e: auth::AuthRejection) -> ApiError {
        let (status, code, challenge) = match &e {
            auth::AuthRejection::Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                r#"Bearer realm="fhirhose", error="insufficient_scope""#,
            ),
            auth::AuthRejection::AmbiguousCredentials => (
                StatusCode::BAD_REQUEST,
                "invalid",
                r#"Bearer realm="fhirhose", error="invalid_request""#,
            ),
            _ => (
                StatusCode::UNAUTHORIZED,
                "login",
                r#"Bearer realm="fhirhose""#,
            ),
        };
        ApiError::new(status, code, e.to_string()).with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.into_body();
        let body = e.outcome.unwrap_or_else(|| operation_outcome(&e.issues));
        let mut resp = (e.status, crate::fhir_json(&body)).into_response();
        for (k, v) in e.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

/// Whether `err` or an error in its chain of sources is an `E` (a body read error comes
/// wrapped by the extractors, and `io::Error::source` skips the error it wraps: looked into).
pub fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<E>() {
            return true;
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && caused_by::<E>(inner)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// A warning an attacker could repeat at will, logged at most once per interval.
pub struct WarnEvery {
    every: std::time::Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl WarnEvery {
    pub const fn new(every: std::time::Duration) -> WarnEvery {
        WarnEvery {
            every,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Whether to log now (and then not again for the interval).
    pub fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= self.every) {
            *last = Some(std::time::Instant::now());
            true
        } else {
            false
        }
    }
}
