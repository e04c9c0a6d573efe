//! One HTTP client for the whole run, SMART Backend Services tokens (requested when first needed,
//! renewed before they expire and once more when a server answers 401), and the retry policy:
//! transport errors, 429 and 5xx are retried with `Retry-After` or exponential backoff.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;

use crate::error::{ClientError, reason_of};

/// The client's registration at the server's authorization server.
pub struct Credentials {
    pub client_id: String,
    pub key: auth::ClientKey,
    /// `None`: discovered from `[base]/.well-known/smart-configuration` at the first token.
    pub token_url: Option<String>,
    pub scope: String,
}

struct Token {
    value: String,
    renew_at: Instant,
}

pub struct Session {
    pub http: reqwest::Client,
    base: String,
    /// The origins (scheme, host, port) the access token is sent to: the FHIR base URL's and
    /// those `--token-origin` adds. A status, page or file URL is the server's choice: on any
    /// other origin it gets no token (a hostile server would otherwise collect it by naming its
    /// own host), and an https origin's token never goes over http (the scheme is part of it).
    token_origins: Vec<reqwest::Url>,
    /// `--max-file-bytes`: no download grows past it.
    pub max_file_bytes: Option<u64>,
    credentials: Option<Credentials>,
    token: tokio::sync::Mutex<Option<Token>>,
    token_url: tokio::sync::OnceCell<String>,
    /// Attempts after the first for one request (and for one download's interrupted body).
    pub retries: u32,
    /// Access tokens obtained so far (the summary reports renewals).
    pub tokens: AtomicU32,
}

/// What a request is allowed to retry.
#[derive(Clone, Copy)]
pub struct Policy {
    /// Retry 5xx and transport errors (not for a kick-off that may have started a job: only 503).
    pub idempotent: bool,
    /// Hand a 429 back to the caller (status polling waits on it instead of counting attempts).
    pub pass_429: bool,
}

pub const IDEMPOTENT: Policy = Policy {
    idempotent: true,
    pass_429: false,
};

impl Session {
    /// `token_origins`: origins besides the base URL's the token may go to.
    pub fn new(
        base: &str,
        token_origins: &[String],
        credentials: Option<Credentials>,
        retries: u32,
        timeout: Duration,
    ) -> Result<Session, ClientError> {
        let origins = std::iter::once(base)
            .chain(token_origins.iter().map(String::as_str))
            .map(|u| match reqwest::Url::parse(u) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
                _ => Err(ClientError::Usage(format!("{u} is not an http(s) URL"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // No gzip: a resumed download's Range counts bytes of the identity encoding, and a
        // server compressing NDJSON on the fly spends the CPU the export needs.
        let http = reqwest::Client::builder()
            .no_gzip()
            .redirect(manifest::redirect_policy())
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(timeout)
            .user_agent(concat!("fhirhose-export/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Usage(format!("cannot build the HTTP client: {e}")))?;
        Ok(Session {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token_origins: origins,
            max_file_bytes: None,
            credentials,
            token: tokio::sync::Mutex::new(None),
            token_url: tokio::sync::OnceCell::new(),
            retries,
            tokens: AtomicU32::new(0),
        })
    }

    /// The current access token, renewed when it is about to expire or when `stale` is the one
    /// a server just refused.
    pub async fn bearer(&self, stale: Option<&str>) -> Result<Option<String>, ClientError> {
        let Some(creds) = &self.credentials else {
            return Ok(None);
        };
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && Instant::now() < t.renew_at
            && stale != Some(t.value.as_str())
        {
            return Ok(Some(t.value.clone()));
        }
        let token_url = self
            .token_url
            .get_or_try_init(|| self.discover_token_url(creds))
            .await?
            .clone();
        let (value, expires_in) = self.request_token(creds, &token_url).await?;
        // Renew at 80 % of the lifetime, at most a minute early; a lifetime past a day is taken
        // as a day (an Instant that far ahead may not exist: adding it would panic).
        let expires_in = expires_in.min(MAX_TOKEN_SECONDS);
        let margin = (expires_in / 5).min(60);
        let renew_at = Instant::now() + Duration::from_secs(expires_in.saturating_sub(margin));
        self.tokens.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(expires_in, "access token obtained");
        *slot = Some(Token {
            value: value.clone(),
            renew_at,
        });
        Ok(Some(value))
    }

    /// Whether the access token may go to `url`: one of [`Session::token_origins`].
    pub fn token_may_go_to(&self, url: &str) -> bool {
        reqwest::Url::parse(url)
            .is_ok_and(|u| self.token_origins.iter().any(|o| o.origin() == u.origin()))
    }

    /// Whether the session has credentials (requests can carry a token at all).
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The FHIR base URL's origin, for messages.
    pub fn base_origin(&self) -> String {
        self.token_origins
            .first()
            .map(|u| u.origin().ascii_serialization())
            .unwrap_or_default()
    }

    async fn discover_token_url(&self, creds: &Credentials) -> Result<String, ClientError> {
        if let Some(u) = &creds.token_url {
            return Ok(u.clone());
        }
        let url = format!("{}/.well-known/smart-configuration", self.base);
        let fail = |reason: String| ClientError::Discovery {
            url: url.clone(),
            reason,
        };
        let resp = self
            .http
            .get(&url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| fail(transport_reason(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}")));
        }
        let body = read_body(resp, &url, MAX_DOCUMENT_BYTES).await?;
        let doc: Value = serde_json::from_str(&body).map_err(|_| fail("not JSON".to_owned()))?;
        doc.get("token_endpoint")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| fail("no token_endpoint".to_owned()))
    }

    async fn request_token(
        &self,
        creds: &Credentials,
        token_url: &str,
    ) -> Result<(String, u64), ClientError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let assertion = creds
            .key
            .sign(&creds.client_id, token_url, now)
            .map_err(|e| ClientError::Usage(format!("cannot sign the client assertion: {e}")))?;
        let form = [
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", creds.scope.as_str()),
        ];
        let mut attempt = 0;
        loop {
            let result = self
                .http
                .post(token_url)
                .header("accept", "application/json")
                .form(&form)
                .send()
                .await;
            let resp = match result {
                Ok(r) => r,
                Err(e) if attempt < self.retries => {
                    tracing::debug!(error = %transport_reason(&e), "token request failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => {
                    return Err(ClientError::Transport {
                        url: token_url.to_owned(),
                        attempts: attempt + 1,
                        reason: transport_reason(&e),
                    });
                }
            };
            let status = resp.status();
            if (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error())
                && attempt < self.retries
            {
                attempt += 1;
                let wait = retry_after(resp.headers()).unwrap_or_else(|| backoff(attempt));
                tokio::time::sleep(wait).await;
                continue;
            }
            if !status.is_success() {
                let body = error_body(resp).await;
                return Err(ClientError::TokenRefused {
                    url: token_url.to_owned(),
                    status: status.as_u16(),
                    reason: reason_of(&body, None),
                });
            }
            let body = read_body(resp, token_url, MAX_DOCUMENT_BYTES).await?;
            let doc: Value = serde_json::from_str(&body).map_err(|_| {
                ClientError::Protocol(format!("{token_url} answered no JSON token response"))
            })?;
            let token = doc
                .get("access_token")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ClientError::Protocol(format!("{token_url} answered no access_token"))
                })?;
            let expires_in = doc.get("expires_in").and_then(Value::as_u64).unwrap_or(300);
            return Ok((token.to_owned(), expires_in));
        }
    }

    /// Sends a request (with the access token when the session has credentials and `auth`),
    /// retrying as `policy` allows. Returns any answer that is not retried: the caller decides
    /// on 2xx and the 4xx it expects; [`Session::fail`] turns the rest into errors.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: Option<(&'static str, String)>,
        auth: bool,
        policy: Policy,
    ) -> Result<Response, ClientError> {
        let mut attempt: u32 = 0;
        let mut stale: Option<String> = None;
        let mut renewed_after_401 = false;
        let auth = auth && self.token_may_go_to(url);
        loop {
            let token = if auth {
                self.bearer(stale.as_deref()).await?
            } else {
                None
            };
            let mut req = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            if let Some((content_type, b)) = &body {
                req = req.header("content-type", *content_type).body(b.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    let retry = policy.idempotent || e.is_connect();
                    if retry && attempt < self.retries {
                        attempt += 1;
                        tracing::warn!(url, error = %transport_reason(&e), attempt, "request failed; retrying");
                        tokio::time::sleep(backoff(attempt)).await;
                        continue;
                    }
                    return Err(ClientError::Transport {
                        url: url.to_owned(),
                        attempts: attempt + 1,
                        reason: transport_reason(&e),
                    });
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && token.is_some() && !renewed_after_401 {
                // The token may have expired early or been revoked: one new token, one retry.
                renewed_after_401 = true;
                stale = token;
                continue;
            }
            let retryable = match status {
                StatusCode::TOO_MANY_REQUESTS => !policy.pass_429,
                StatusCode::SERVICE_UNAVAILABLE => true,
                s if s.is_server_error() => policy.idempotent,
                _ => false,
            };
            if retryable && attempt < self.retries {
                attempt += 1;
                let wait = retry_after(resp.headers()).unwrap_or_else(|| backoff(attempt));
                tracing::warn!(
                    url,
                    status = status.as_u16(),
                    attempt,
                    wait_s = wait.as_secs_f32(),
                    "retrying"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            if retryable {
                return Err(self.fail(url, resp, attempt + 1).await);
            }
            return Ok(resp);
        }
    }

    /// The error for an answer the caller did not expect, with the server's reason.
    pub async fn fail(&self, url: &str, resp: Response, attempts: u32) -> ClientError {
        let status = resp.status();
        let www = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = error_body(resp).await;
        let reason = reason_of(&body, www.as_deref());
        let url = url.to_owned();
        match status {
            StatusCode::UNAUTHORIZED => ClientError::Unauthorized { url, reason },
            StatusCode::FORBIDDEN => ClientError::Forbidden { url, reason },
            StatusCode::TOO_MANY_REQUESTS => ClientError::TooManyRequests {
                url,
                attempts,
                reason,
            },
            s if s.is_server_error() => ClientError::ServerError {
                url,
                status: s.as_u16(),
                attempts,
                reason,
            },
            s => ClientError::Refused {
                url,
                status: s.as_u16(),
                reason,
            },
        }
    }
}

/// The longest token lifetime taken from a token endpoint (a day): renewed by then at the latest.
const MAX_TOKEN_SECONDS: u64 = 24 * 60 * 60;

/// The largest SMART configuration or token response read: such documents are a few hundred
/// bytes, a larger one is no answer of a token endpoint.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// How much of an error answer's body is read for its reason (which is cut to 300 characters
/// anyway): the rest is never received.
pub const MAX_ERROR_BODY_BYTES: usize = 8 * 1024;

/// The body of `resp` as text, at most `limit` bytes: a longer one is refused as soon as it
/// passes the limit, so a server cannot make the client hold more.
pub async fn read_body(mut resp: Response, url: &str, limit: usize) -> Result<String, ClientError> {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(ClientError::TooLarge {
                        url: url.to_owned(),
                        limit: limit as u64,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ClientError::Transport {
                    url: url.to_owned(),
                    attempts: 1,
                    reason: transport_reason(&e),
                });
            }
        }
    }
    String::from_utf8(body)
        .map_err(|_| ClientError::Protocol(format!("{url} answered no UTF-8 text")))
}

/// The start of an error answer's body (at most [`MAX_ERROR_BODY_BYTES`]; reading stops there,
/// and at the first transport error), for its reason.
async fn error_body(mut resp: Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).into_owned()
}

/// `Retry-After` as seconds or an HTTP date, at most ten minutes.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    let d = match v.parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(d.min(Duration::from_secs(600)))
}

/// 0.5 s, 1 s, 2 s, ... at most 30 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.saturating_sub(1).min(6)))
        .min(Duration::from_secs(30))
}

pub fn transport_reason(e: &reqwest::Error) -> String {
    manifest::transport_reason(e, || "connection error".to_owned())
}

pub fn header(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(100));
        h.insert("retry-after", HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(90) && d <= Duration::from_secs(100),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("86400"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(600)));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(20), Duration::from_secs(30));
    }
}
