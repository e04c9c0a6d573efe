//! Errors of bundle processing, loading and synthesis.

use std::path::PathBuf;

use fhir_model::ValidationIssue;
use serde_json::Value;
use store::StoreError;

use crate::outcome::{OutcomeIssue, operation_outcome, store_error_issue};

/// A problem with one Bundle entry. In a transaction it fails the whole Bundle; in a batch it
/// becomes that entry's `response.outcome`.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The entry itself is malformed (no request, unknown method, bad URL, resource type not
    /// matching the URL). → 400 `invalid`.
    #[error("entry {index}: {message}")]
    Invalid {
        index: usize,
        message: String,
        expression: String,
    },
    /// The resource fails structural validation. → 400 `invalid` (one issue per problem).
    #[error("entry {index}: invalid resource: {}", issues.first().map(|i| i.to_string()).unwrap_or_default())]
    Validation {
        index: usize,
        /// Paths are relative to the resource (`Patient.name[0].given`).
        issues: Vec<ValidationIssue>,
    },
    /// A `urn:` reference that names no entry of the Bundle. → 400 `invalid`.
    #[error("entry {index}: reference '{reference}' does not resolve to an entry of the Bundle")]
    UnresolvedReference {
        index: usize,
        reference: String,
        expression: String,
    },
    /// A valid request this server does not implement (conditional update and delete, search in
    /// a Bundle, PATCH). → 501 `not-supported`.
    #[error("entry {index}: {message}")]
    NotSupported {
        index: usize,
        message: String,
        expression: String,
    },
    /// The entry would take the response beyond a bound on one request's work (the bytes of the
    /// resources its reads return). → 400 `too-costly`.
    #[error("entry {index}: {message}")]
    TooCostly { index: usize, message: String },
    /// The condition of a conditional create (`request.ifNoneExist`) stopped the entry: it
    /// matched more than one resource (412 `duplicate`), or it could not be run as the search
    /// it is (the search's status and issue code: 400 `invalid`, `too-costly`, 403, 503, ...).
    #[error("entry {index}: {message}")]
    Condition {
        index: usize,
        status: u16,
        code: &'static str,
        message: String,
    },
    /// A batch entry whose reference names (by `fullUrl`) the resource another entry was to
    /// write, and that entry failed: the reference would name nothing. → 424 `processing`.
    #[error(
        "entry {index}: entry {on} failed ({on_status}), and this entry's reference '{reference}' names the resource entry {on} was to write"
    )]
    Dependency {
        index: usize,
        /// The entry that failed.
        on: usize,
        /// Its response status line (`400 Bad Request`).
        on_status: String,
        reference: String,
        /// Where the reference is (`Bundle.entry[i].resource.subject.reference`).
        expression: String,
    },
    /// The store refused or failed the entry's operation (status from the store error).
    #[error("entry {index}: {source}")]
    Store {
        index: usize,
        #[source]
        source: StoreError,
    },
}

impl EntryError {
    /// Index of the entry in `Bundle.entry`.
    pub fn index(&self) -> usize {
        match self {
            EntryError::Invalid { index, .. }
            | EntryError::Validation { index, .. }
            | EntryError::UnresolvedReference { index, .. }
            | EntryError::NotSupported { index, .. }
            | EntryError::TooCostly { index, .. }
            | EntryError::Condition { index, .. }
            | EntryError::Dependency { index, .. }
            | EntryError::Store { index, .. } => *index,
        }
    }

    /// HTTP status of this failure.
    pub fn status(&self) -> u16 {
        match self {
            EntryError::Invalid { .. }
            | EntryError::Validation { .. }
            | EntryError::UnresolvedReference { .. }
            | EntryError::TooCostly { .. } => 400,
            EntryError::NotSupported { .. } => 501,
            EntryError::Dependency { .. } => 424,
            EntryError::Condition { status, .. } => *status,
            EntryError::Store { source, .. } => store_error_issue(source).0,
        }
    }

    /// The issues, with expressions rooted at `Bundle.entry[i]`.
    pub fn issues(&self) -> Vec<OutcomeIssue> {
        let i = self.index();
        match self {
            EntryError::Invalid {
                message,
                expression,
                ..
            } => vec![OutcomeIssue::error("invalid", message.clone()).at(expression.clone())],
            EntryError::NotSupported {
                message,
                expression,
                ..
            } => vec![OutcomeIssue::error("not-supported", message.clone()).at(expression.clone())],
            EntryError::TooCostly { message, .. } => {
                vec![
                    OutcomeIssue::error("too-costly", message.clone())
                        .at(format!("Bundle.entry[{i}]")),
                ]
            }
            EntryError::Condition { code, message, .. } => {
                vec![
                    OutcomeIssue::error(code, message.clone())
                        .at(format!("Bundle.entry[{i}].request.ifNoneExist")),
                ]
            }
            EntryError::UnresolvedReference { expression, .. } => {
                vec![OutcomeIssue::error("invalid", self.to_string()).at(expression.clone())]
            }
            EntryError::Dependency { expression, .. } => {
                vec![OutcomeIssue::error("processing", self.to_string()).at(expression.clone())]
            }
            EntryError::Validation { issues, .. } => issues
                .iter()
                .map(|v| {
                    OutcomeIssue::error("invalid", v.message.clone()).at(format!(
                        "Bundle.entry[{i}].resource.{}",
                        strip_type(&v.path)
                    ))
                })
                .collect(),
            EntryError::Store { source, .. } => {
                let (_, mut issue) = store_error_issue(source);
                if issue.expression.is_none() {
                    issue.expression = Some(format!("Bundle.entry[{i}]"));
                } else if let Some(e) = &issue.expression {
                    issue.expression = Some(format!("Bundle.entry[{i}].resource.{e}"));
                }
                vec![issue]
            }
        }
    }

    /// An OperationOutcome describing this failure.
    pub fn to_operation_outcome(&self) -> Value {
        operation_outcome(&self.issues())
    }
}

/// `Patient.name[0]` → `name[0]` (the part below the resource root).
fn strip_type(path: &str) -> &str {
    match path.split_once('.') {
        Some((_, rest)) => rest,
        None => path,
    }
}

/// Failure of a whole `POST /` Bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The body is not a Bundle, or its `type` is not `transaction` or `batch`. → 400.
    #[error("{message}")]
    NotProcessable { message: String, expression: String },
    /// A transaction failed because of one entry; nothing was written. → that entry's status.
    #[error("transaction failed: {0}")]
    Entry(#[from] EntryError),
    /// The store failed outside any single entry; nothing was written (transaction). → by error.
    #[error("transaction failed: {0}")]
    Store(StoreError),
}

impl BundleError {
    /// HTTP status of this failure.
    pub fn status(&self) -> u16 {
        match self {
            BundleError::NotProcessable { .. } => 400,
            BundleError::Entry(e) => e.status(),
            BundleError::Store(e) => store_error_issue(e).0,
        }
    }

    /// An OperationOutcome describing this failure.
    pub fn to_operation_outcome(&self) -> Value {
        match self {
            BundleError::NotProcessable {
                message,
                expression,
            } => operation_outcome(&[
                OutcomeIssue::error("invalid", message.clone()).at(expression.clone())
            ]),
            BundleError::Entry(e) => e.to_operation_outcome(),
            BundleError::Store(e) => operation_outcome(&[store_error_issue(e).1]),
        }
    }
}

/// Failure of a load (`load --data-dir` / `load --server`) that stops it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a file nor a folder of .ndjson/.json(.gz) files")]
    NoInput { path: PathBuf },
    /// With `strict`, the first invalid resource stops the load.
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("server request failed: {0}")]
    Http(String),
    #[error("server answered {status}: {body}")]
    Server { status: u16, body: String },
    /// The loader's writing thread ended without an answer (it panicked).
    #[error("the loader's writing thread stopped")]
    WriterStopped,
}

/// Failure of `synth`.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seed {path}: {message}")]
    Seed { path: PathBuf, message: String },
}
