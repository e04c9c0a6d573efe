//! Why an export run failed: one variant per cause, each displayed as one line a user can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot read the key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(
        "no token endpoint: give --token-url or let {url} publish one (SMART configuration: {reason})"
    )]
    Discovery { url: String, reason: String },
    #[error("the token endpoint {url} refused the client: HTTP {status}: {reason}")]
    TokenRefused {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("HTTP 401 Unauthorized from {url}: {reason}")]
    Unauthorized { url: String, reason: String },
    #[error("HTTP 403 Forbidden from {url}: {reason}")]
    Forbidden { url: String, reason: String },
    #[error("HTTP 429 Too Many Requests from {url} after {attempts} attempts: {reason}")]
    TooManyRequests {
        url: String,
        attempts: u32,
        reason: String,
    },
    #[error("HTTP {status} from {url} after {attempts} attempts: {reason}")]
    ServerError {
        url: String,
        status: u16,
        attempts: u32,
        reason: String,
    },
    #[error("HTTP {status} from {url}: {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("cannot reach {url} after {attempts} attempts: {reason}")]
    Transport {
        url: String,
        attempts: u32,
        reason: String,
    },
    /// A body past its bound: a manifest page, a token or configuration document, a file past
    /// its `fileSize`, its Content-Length or `--max-file-bytes`.
    #[error("{url} sent more than {limit} bytes; stopped")]
    TooLarge { url: String, limit: u64 },
    /// A file that needs the access token on an origin the token does not go to.
    #[error(
        "{url} needs the access token (requiresAccessToken), but the token goes only to {origin} \
         (the FHIR base URL's origin) and the origins --token-origin names; not downloaded"
    )]
    TokenWithheld { url: String, origin: String },
    #[error("the export failed on the server: {0}")]
    ExportFailed(String),
    #[error("the server's answer is not what Bulk Data specifies: {0}")]
    Protocol(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("interrupted{}", if *.cancelled { "; the export was cancelled on the server (DELETE)" } else { "" })]
    Interrupted { cancelled: bool },
}

impl ClientError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The reason a server gives in an error body: an OperationOutcome's diagnostics/details, an
/// OAuth error's description, or the start of the text. Never more than one short line.
pub(crate) fn reason_of(body: &str, www_authenticate: Option<&str>) -> String {
    let mut reason = String::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        if let Some(issues) = v.get("issue").and_then(|i| i.as_array()) {
            let texts: Vec<String> = issues
                .iter()
                .filter_map(|i| {
                    i.get("diagnostics")
                        .and_then(|d| d.as_str())
                        .or_else(|| i.pointer("/details/text").and_then(|d| d.as_str()))
                        .map(str::to_owned)
                })
                .collect();
            reason = texts.join("; ");
        } else if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            reason = match v.get("error_description").and_then(|d| d.as_str()) {
                Some(d) => format!("{e}: {d}"),
                None => e.to_owned(),
            };
        }
    }
    if reason.is_empty()
        && let Some(w) = www_authenticate
    {
        reason = w.to_owned();
    }
    if reason.is_empty() {
        reason = body.trim().to_owned();
    }
    if reason.is_empty() {
        reason = "(no reason given)".to_owned();
    }
    let one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    one_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_come_from_outcomes_oauth_errors_or_text() {
        let oo = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"login","diagnostics":"the access token expired"}]}"#;
        assert_eq!(reason_of(oo, None), "the access token expired");
        let oauth = r#"{"error":"invalid_client","error_description":"unknown client"}"#;
        assert_eq!(reason_of(oauth, None), "invalid_client: unknown client");
        assert_eq!(
            reason_of("", Some("Bearer error=\"invalid_token\"")),
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(reason_of("bad\ngateway", None), "bad gateway");
    }
}
