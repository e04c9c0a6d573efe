//! Content negotiation and request hygiene: Fhirhose speaks FHIR JSON only. Requests asking for
//! another format get 406, bodies in another format 415, each with an OperationOutcome.
//!
//! The [`negotiate`] middleware also applies the [`RequestPolicy`]: the `Host` check against DNS
//! rebinding (`--allowed-hosts`), the `Content-Type` of writes (no form posts outside `_search`
//! and `/auth/token`: a web page cannot write by CSRF), `Content-Encoding` (gzip or identity,
//! decoded within the body limit), and on the way out every error answer becomes an
//! OperationOutcome without server paths. [`json_body`] parses request bodies with a bound on
//! Bundle entries, without duplicate object keys and within serde_json's nesting limit (the
//! reader of every ingestion path, [`ingest::strict_json`]).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State, rejection::BytesRejection};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ingest::strict_json::{JsonError, parse_json};
use serde_json::Value;

use crate::error::ApiError;

/// Default of `--max-bundle-entries`.
pub const DEFAULT_MAX_BUNDLE_ENTRIES: usize = 10_000;

/// The per-server request rules the [`negotiate`] middleware and [`json_body`] apply.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    /// Most entries in a request Bundle (`entry` of the body's root object); 413 beyond.
    pub max_bundle_entries: usize,
    /// Accepted `Host` headers (421 for others); `None`: any host.
    pub allowed_hosts: Option<Vec<HostPattern>>,
    /// Server directories (the data directory) that error answers must not show, longest first.
    pub server_dirs: Vec<String>,
    /// The port a `Host` without one means (the base URL's scheme's).
    pub default_port: u16,
}

/// One accepted `Host`: a lowercase host name or IP literal (IPv6 in brackets), with a port or
/// any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    pub host: String,
    pub port: Option<u16>,
}

impl HostPattern {
    /// `host`, `host:port`, `[v6]`, `[v6]:port`.
    pub fn parse(s: &str) -> Option<HostPattern> {
        let s = s.trim().to_ascii_lowercase();
        let (host, port) = if s.starts_with('[') {
            let end = s.find(']')?;
            let rest = &s[end + 1..];
            let port = match rest {
                "" => None,
                r => Some(r.strip_prefix(':')?.parse().ok()?),
            };
            (s[..=end].to_string(), port)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
                None => (s.clone(), None),
            }
        };
        let host_ok = !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
            });
        host_ok.then_some(HostPattern { host, port })
    }
}

impl RequestPolicy {
    /// The policy of a server at `base_url`: the default entry limit; with `check_host` (the
    /// `--auth none` mode) only the base URL's host and the loopback names on its port are
    /// accepted as `Host`. `data_dir` is kept out of error answers.
    pub fn new(base_url: &str, check_host: bool, data_dir: Option<&std::path::Path>) -> Self {
        let mut server_dirs = Vec::new();
        if let Some(d) = data_dir {
            let mut forms = vec![d.to_path_buf()];
            if let Ok(c) = d.canonicalize() {
                forms.push(c);
            }
            if let Ok(cwd) = std::env::current_dir() {
                forms.push(cwd.join(d));
            }
            for f in forms {
                let s = f.display().to_string();
                let s = s.trim_end_matches('/').to_string();
                // Only absolute paths that JSON does not escape can be found in an answer's text.
                let plain = !s.contains(['"', '\\']) && !s.chars().any(char::is_control);
                if s.len() > 1 && s.starts_with('/') && plain && !server_dirs.contains(&s) {
                    server_dirs.push(s);
                }
            }
            server_dirs.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
        RequestPolicy {
            max_bundle_entries: DEFAULT_MAX_BUNDLE_ENTRIES,
            allowed_hosts: check_host.then(|| default_hosts(base_url)),
            server_dirs,
            default_port: base_authority(base_url).0,
        }
    }

    /// Adds `--allowed-hosts` entries (`*`: any host) and turns the check on.
    pub fn allow_hosts(&mut self, base_url: &str, extra: &[String]) -> Result<(), String> {
        let extra: Vec<&str> = extra
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        if extra.contains(&"*") {
            self.allowed_hosts = None;
            return Ok(());
        }
        let mut hosts = self
            .allowed_hosts
            .take()
            .unwrap_or_else(|| default_hosts(base_url));
        for e in extra {
            hosts.push(HostPattern::parse(e).ok_or_else(|| {
                format!("--allowed-hosts '{e}' is not a host name, host:port or *")
            })?);
        }
        self.allowed_hosts = Some(hosts);
        Ok(())
    }

    fn host_allowed(&self, host: Option<&str>) -> bool {
        let Some(allowed) = &self.allowed_hosts else {
            return true;
        };
        let Some(h) = host.and_then(HostPattern::parse) else {
            return false;
        };
        let port = h.port.unwrap_or(self.default_port);
        allowed
            .iter()
            .any(|a| a.host == h.host && a.port.is_none_or(|p| p == port))
    }
}

/// The scheme's default port and the `host[:port]` of a base URL.
fn base_authority(base_url: &str) -> (u16, Option<HostPattern>) {
    let (scheme, rest) = base_url.split_once("://").unwrap_or(("http", base_url));
    let default_port = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    let authority = rest.split('/').next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    (default_port, HostPattern::parse(authority))
}

/// The base URL's host and `localhost`, `127.0.0.1`, `[::1]`, each on the base URL's port.
fn default_hosts(base_url: &str) -> Vec<HostPattern> {
    let (default_port, base) = base_authority(base_url);
    let port = base.as_ref().and_then(|b| b.port).unwrap_or(default_port);
    let mut hosts: Vec<HostPattern> = ["localhost", "127.0.0.1", "[::1]"]
        .iter()
        .map(|h| HostPattern {
            host: h.to_string(),
            port: Some(port),
        })
        .collect();
    if let Some(b) = base {
        hosts.push(HostPattern {
            host: b.host,
            port: Some(port),
        });
    }
    hosts
}

fn is_json_media(m: &str) -> bool {
    let mut parts = m.split(';');
    let m = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    // `q=0` says "not this one" (RFC 9110 §12.4.2).
    let refused = parts.any(|p| {
        p.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
        })
    });
    !refused
        && matches!(
            m.as_str(),
            "application/fhir+json"
                | "application/json"
                | "application/json+fhir"
                | "application/fhir+ndjson"
                | "application/ndjson"
                | "*/*"
                | "application/*"
                | ""
        )
}

fn format_param(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|p| p.strip_prefix("_format="))
        .map(|v| {
            v.replace("%2B", "+")
                .replace("%2b", "+")
                .replace('+', " ")
                .trim()
                .to_string()
        })
}

/// Middleware: the `Host` check, then refuses non-JSON `Accept` (406), `_format` (406),
/// `Content-Type` (415) and `Content-Encoding` (415); on the way out, every error answer
/// becomes an OperationOutcome and loses the server's paths.
pub async fn negotiate(
    State(policy): State<Arc<RequestPolicy>>,
    request: Request,
    next: Next,
) -> Response {
    let token_endpoint = request.uri().path() == auth::TOKEN_PATH;
    if let Err(e) = check_host(&policy, &request).and_then(|()| {
        check(
            request.method(),
            request.uri().path(),
            request.headers(),
            request.uri().query(),
        )
    }) {
        let response = e.into_response();
        return if token_endpoint {
            oauth_answer(response).await
        } else {
            response
        };
    }
    let response = next.run(request).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        let response = error_answer(&policy, response).await;
        return if token_endpoint {
            oauth_answer(response).await
        } else {
            response
        };
    }
    response
}

/// An error answer of the token endpoint that is an OperationOutcome (a refusal before its
/// handler: content type, method, host) rewritten as the OAuth error JSON OAuth clients read
/// (RFC 6749 §5.2), with its status kept; the handler's own OAuth errors pass unchanged.
async fn oauth_answer(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let is_fhir = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/fhir+json"));
    if !is_fhir {
        return Response::from_parts(parts, body);
    }
    let outcome: Value = axum::body::to_bytes(body, ERROR_BODY_MAX)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let description = outcome["issue"][0]["diagnostics"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            parts
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_owned()
        });
    let error = match parts.status {
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            auth::OAuthErrorCode::TemporarilyUnavailable
        }
        s if s.is_server_error() => auth::OAuthErrorCode::ServerError,
        _ => auth::OAuthErrorCode::InvalidRequest,
    };
    let text = serde_json::to_string(&auth::OAuthError { error, description })
        .unwrap_or_else(|_| r#"{"error":"server_error"}"#.to_owned());
    let headers = &mut parts.headers;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(text))
}

/// DNS rebinding: a page on another origin reaches this server under its own host name.
fn check_host(policy: &RequestPolicy, request: &Request) -> Result<(), ApiError> {
    if policy.allowed_hosts.is_none() {
        return Ok(());
    }
    let host = match request.headers().get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => request.uri().authority().map(|a| a.as_str()),
    };
    if policy.host_allowed(host) {
        return Ok(());
    }
    let shown: String = host.unwrap_or("").chars().take(100).collect();
    Err(ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "security",
        format!(
            "Host '{}' is not this server's: use the base URL's host, or add it with --allowed-hosts",
            shown.escape_debug()
        ),
    ))
}

fn check(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), ApiError> {
    // The SQL on FHIR operations answer CSV, NDJSON and Parquet; they check `_format` themselves.
    let views_op =
        path.ends_with("/$viewdefinition-run") || path.ends_with("/$viewdefinition-export");
    if let Some(f) = format_param(query).filter(|_| !views_op) {
        let ok = matches!(
            f.as_str(),
            "json" | "application/json" | "application/fhir json" | "application/fhir+json"
        ) || f.starts_with("application/fhir json")
            || is_json_media(&f);
        if !ok {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "not-supported",
                format!("_format '{f}' is not supported: this server speaks FHIR JSON only"),
            )
            .at("_format"));
        }
    }
    if let Some(accept) = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .filter(|_| !views_op)
        && !accept.split(',').any(is_json_media)
    {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            format!(
                "cannot answer in '{accept}': this server speaks FHIR JSON only (application/fhir+json)"
            ),
        ));
    }
    if let Some(ce) = headers.get(header::CONTENT_ENCODING) {
        let ce = ce.to_str().unwrap_or("?").trim();
        if !ce.eq_ignore_ascii_case("gzip") && !ce.eq_ignore_ascii_case("identity") {
            let shown: String = ce.chars().take(100).collect();
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                format!(
                    "Content-Encoding '{}' is not supported: send gzip or no encoding",
                    shown.escape_debug()
                ),
            ));
        }
    }
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        check_content_type(method, path, headers)?;
    }
    Ok(())
}

/// Writes carry FHIR JSON. A form body (which a web page on any origin can post) is accepted
/// only where FHIR defines one: `POST [type]/_search` and the token endpoint. A body without a
/// `Content-Type` is refused too.
fn check_content_type(method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let form_allowed =
        *method == Method::POST && (path.ends_with("/_search") || path == auth::TOKEN_PATH);
    let ct = match headers.get(header::CONTENT_TYPE) {
        Some(ct) => ct.to_str().unwrap_or("?"),
        None => {
            let has_body = headers.contains_key(header::TRANSFER_ENCODING)
                || headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim() != "0");
            if !has_body {
                return Ok(());
            }
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                "the request has a body but no Content-Type: send application/fhir+json",
            ));
        }
    };
    let m = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ok = match m.as_str() {
        "application/fhir+json" | "application/json" | "application/json+fhir" => true,
        "application/x-www-form-urlencoded" => form_allowed,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let shown: String = ct.chars().take(100).collect();
    let hint = if form_allowed {
        "send application/x-www-form-urlencoded or application/fhir+json"
    } else {
        "send application/fhir+json"
    };
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not-supported",
        format!(
            "Content-Type '{}' is not supported here: {hint}",
            shown.escape_debug()
        ),
    ))
}

/// Largest error answer [`error_answer`] rewrites; larger ones pass unchanged.
const ERROR_BODY_MAX: usize = 256 * 1024;

/// An error answer as it leaves the server: an OperationOutcome (a framework rejection, such as
/// an undecodable path, is plain text until here) without the server's directories.
async fn error_answer(policy: &RequestPolicy, response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let is_json = content_type.contains("json");
    // Other JSON error bodies (the OAuth errors of /auth/token) keep their form.
    let is_fhir = content_type.starts_with("application/fhir+json");
    if is_json && !is_fhir {
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, ERROR_BODY_MAX).await {
        Ok(b) => b,
        Err(_) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            return Response::from_parts(parts, Body::empty());
        }
    };
    let text = if is_fhir {
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        let message: String = String::from_utf8_lossy(&bytes)
            .chars()
            .filter(|c| !c.is_control())
            .take(1000)
            .collect();
        let message = if message.trim().is_empty() {
            parts
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_string()
        } else {
            message
        };
        let code = match parts.status {
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::METHOD_NOT_ALLOWED => "not-supported",
            StatusCode::PAYLOAD_TOO_LARGE => "too-long",
            s if s.is_server_error() => "exception",
            _ => "invalid",
        };
        let outcome = ingest::outcome::operation_outcome(&[ingest::outcome::OutcomeIssue::error(
            code, message,
        )]);
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json; charset=utf-8"),
        );
        outcome.to_string()
    };
    let text = scrub_paths(&text, &policy.server_dirs, parts.status.is_server_error());
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(text))
}

/// Removes server paths from an answer's JSON text: the data directory becomes relative names
/// (`storage/exports/…` → `exports/…`), and in a 5xx answer any other absolute path becomes
/// `<server path>`.
fn scrub_paths(text: &str, dirs: &[String], server_error: bool) -> String {
    let mut out = text.to_string();
    for d in dirs {
        if !out.contains(d.as_str()) {
            continue;
        }
        out = out
            .replace(&format!("{d}/storage/"), "")
            .replace(&format!("{d}/"), "")
            .replace(d.as_str(), "<data directory>");
    }
    if server_error {
        out = scrub_absolute_paths(&out);
    }
    out
}

/// `/a/b…` tokens that start after a space, quote or bracket (not URL paths, which follow a
/// host) → `<server path>`.
fn scrub_absolute_paths(text: &str) -> String {
    let is_end =
        |c: char| c.is_whitespace() || matches!(c, '"' | '\\' | '\'' | '`' | ',' | ')' | ']');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut prev: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let starts = c == '/'
            && prev.is_none_or(|p| {
                p.is_whitespace() || matches!(p, '"' | '\'' | '`' | '(' | '[' | '=')
            });
        if starts {
            let len = rest.find(is_end).unwrap_or(rest.len());
            let token = &rest[..len];
            let second = token[1..].contains('/');
            let first_ok = token[1..]
                .chars()
                .next()
                .is_some_and(|n| n.is_alphanumeric() || matches!(n, '.' | '_' | '-'));
            if second && first_ok {
                out.push_str("<server path>");
                prev = Some('>');
                rest = &rest[len..];
                continue;
            }
        }
        out.push(c);
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Turns a request body into a JSON object with the default [`RequestPolicy`] limits; see
/// [`json_body`].
pub fn json_object(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    json_body(body, DEFAULT_MAX_BUNDLE_ENTRIES)
}

/// A request body as read, or why it could not be: 413 over the body limit, 503 when the bodies
/// in memory are at `--max-body-memory` ([`crate::body_budget`]), 408 when it came slower than
/// `--min-body-rate` ([`crate::slow_clients`]), else 400.
pub fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-long",
                "request body exceeds the configured limit (--max-body-bytes)",
            )
        } else if crate::error::caused_by::<crate::body_budget::OverBudget>(&rej) {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "the server is holding as many request bodies as it may (--max-body-memory); retry later",
            )
            .with_header(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(crate::error::RETRY_AFTER_SECS),
            )
        } else if crate::slow_clients::too_slow(&rej) {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("cannot read the request body: {rej} (--min-body-rate)"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                format!("cannot read the request body: {rej}"),
            )
        }
    })
}

/// Turns a request body into a JSON object, with the errors a client can act on: 413 over the
/// body limit or with more than `max_entries` Bundle entries, 400 for malformed JSON, duplicate
/// object keys, nesting deeper than serde_json's limit (128) or JSON that is not an object.
pub fn json_body(
    body: Result<Bytes, BytesRejection>,
    max_entries: usize,
) -> Result<Value, ApiError> {
    let bytes = body_bytes(body)?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "the request body is empty; a FHIR JSON resource is expected",
        ));
    }
    let v = parse_json(&bytes, max_entries).map_err(|e| match e {
        JsonError::TooManyEntries => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            format!(
                "the Bundle has more than {max_entries} entries (the server's --max-bundle-entries)"
            ),
        )
        .at("Bundle.entry"),
        JsonError::Syntax(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            format!(
                "malformed JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        ),
    })?;
    if !v.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "the request body must be a JSON object (a FHIR resource)",
        ));
    }
    Ok(v)
}

/// `Prefer: handling=lenient`.
pub fn lenient(headers: &HeaderMap) -> bool {
    prefer(headers, "handling").as_deref() == Some("lenient")
}

/// The preferences of every `Prefer` header, as `(name, value)` (value empty for a bare token
/// such as `respond-async`).
fn preferences(headers: &HeaderMap) -> impl Iterator<Item = (String, String)> + '_ {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_ascii_lowercase(),
            ),
            None => (p.trim().to_ascii_lowercase(), String::new()),
        })
}

/// The value of one `Prefer` preference, e.g. `return` or `handling`.
pub fn prefer(headers: &HeaderMap, name: &str) -> Option<String> {
    preferences(headers)
        .find_map(|(k, v)| (k.eq_ignore_ascii_case(name) && !v.is_empty()).then_some(v))
}

/// Whether a bare `Prefer` token such as `respond-async` is present.
pub fn prefer_token(headers: &HeaderMap, token: &str) -> bool {
    preferences(headers).any(|(k, v)| v.is_empty() && k.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_json_family_only() {
        assert!(is_json_media("application/fhir+json; charset=utf-8"));
        assert!(is_json_media("*/*"));
        assert!(!is_json_media("application/fhir+xml"));
        assert!(!is_json_media("text/html"));
        assert!(is_json_media("application/fhir+json; q=0.5"));
        assert!(!is_json_media("application/fhir+json;q=0"));
        assert!(!is_json_media("*/*; q=0.000"));
    }

    #[test]
    fn error_texts_lose_server_paths() {
        let dirs = vec!["/srv/fhirhose-data".to_string()];
        let text = r#"{"diagnostics":"export failed: /srv/fhirhose-data/storage/exports/j1/Patient-1.ndjson: Permission denied; db /srv/fhirhose-data/exports.db; /srv/fhirhose-data"}"#;
        let out = scrub_paths(text, &dirs, false);
        assert_eq!(
            out,
            r#"{"diagnostics":"export failed: exports/j1/Patient-1.ndjson: Permission denied; db exports.db; <data directory>"}"#
        );
        // In a 5xx answer any other absolute path goes too; URLs and FHIR paths stay.
        let text = r#"{"diagnostics":"cannot open '/tmp/x/y.db' (/var/lib/z): see https://example.org/a/b and Patient/1 at /metadata"}"#;
        assert_eq!(
            scrub_paths(text, &[], true),
            r#"{"diagnostics":"cannot open '<server path>' (<server path>): see https://example.org/a/b and Patient/1 at /metadata"}"#
        );
        assert_eq!(scrub_paths(text, &[], false), text);
    }

    #[test]
    fn host_patterns_and_defaults() {
        assert_eq!(
            HostPattern::parse("Example.ORG:8080"),
            Some(HostPattern {
                host: "example.org".into(),
                port: Some(8080)
            })
        );
        assert_eq!(HostPattern::parse("[::1]").unwrap().host, "[::1]");
        assert_eq!(HostPattern::parse("[::1]:80").unwrap().port, Some(80));
        for bad in ["", "a b", "host:99999", "host:x", "[::1"] {
            assert_eq!(HostPattern::parse(bad), None, "{bad}");
        }
        let p = RequestPolicy::new("https://fhir.example.org/r4", true, None);
        assert!(p.host_allowed(Some("fhir.example.org")));
        assert!(p.host_allowed(Some("fhir.example.org:443")));
        assert!(p.host_allowed(Some("localhost:443")));
        assert!(!p.host_allowed(Some("fhir.example.org:8443")));
        assert!(!p.host_allowed(Some("localhost:8080")));
        assert!(!p.host_allowed(None));
        assert!(RequestPolicy::new("https://x", false, None).host_allowed(Some("any")));
    }

    #[test]
    fn reads_preferences() {
        let mut h = HeaderMap::new();
        h.insert(
            "prefer",
            "return=minimal, handling=lenient".parse().unwrap(),
        );
        assert!(lenient(&h));
        assert_eq!(prefer(&h, "return").as_deref(), Some("minimal"));
    }
}
