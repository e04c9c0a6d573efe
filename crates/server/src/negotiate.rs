//! Content negotiation: Fhirhose speaks FHIR JSON only. Requests asking for another format get
//! 406, bodies in another format 415, each with an OperationOutcome.

use axum::body::Bytes;
use axum::extract::{Request, rejection::BytesRejection};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::ApiError;

fn is_json_media(m: &str) -> bool {
    let m = m
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
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

/// Middleware: refuses non-JSON `Accept` (406), `_format` (406) and `Content-Type` (415).
pub async fn negotiate(request: Request, next: Next) -> Response {
    if let Err(e) = check(request.method(), request.headers(), request.uri().query()) {
        return e.into_response();
    }
    next.run(request).await
}

fn check(method: &Method, headers: &HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
    if let Some(f) = format_param(query) {
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
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        if !accept.split(',').any(is_json_media) {
            return Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "not-supported",
                format!(
                    "cannot answer in '{accept}': this server speaks FHIR JSON only (application/fhir+json)"
                ),
            ));
        }
    }
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let m = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            let ok = matches!(
                m.as_str(),
                "application/fhir+json"
                    | "application/json"
                    | "application/json+fhir"
                    | "application/x-www-form-urlencoded"
            );
            if !ok {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "not-supported",
                    format!("Content-Type '{ct}' is not supported: send application/fhir+json"),
                ));
            }
        }
    }
    Ok(())
}

/// Turns a request body into a JSON object, with the errors a client can act on: 413 over the
/// limit, 400 for malformed JSON or JSON that is not an object.
pub fn json_object(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-long",
                "request body exceeds the configured limit (--max-body-bytes)",
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "structure",
                format!("cannot read the request body: {rej}"),
            )
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "the request body is empty; a FHIR JSON resource is expected",
        ));
    }
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            format!(
                "malformed JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
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
