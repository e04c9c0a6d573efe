//! The two requests a pull needs (manifest and blob) of the OCI distribution API, over our own
//! HTTP client so that every host it talks to is decided here: the registry itself, and other
//! hosts only when [`OciSettings::redirect_hosts`] names them (blob redirects to a CDN, a token
//! service on another host). Answers are read within size bounds, and an error never carries
//! the remote answer's text: a status code and a fixed sentence.

use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};
use tracing::{debug, warn};

use crate::{ImageRef, OciError, OciSettings};

/// Redirects followed per request at most.
const MAX_REDIRECTS: usize = 5;
/// Largest token-service answer read.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Which request an answer belongs to (a 404 on the manifest means "no such image").
#[derive(Clone, Copy)]
pub(crate) enum Stage<'a> {
    Manifest,
    Blob(&'a str),
    Token,
}

/// `host[:port]` of a URL, lower case, with the port only when the URL names one.
fn authority(url: &Url) -> Option<String> {
    let host = url.host_str()?.to_ascii_lowercase();
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// Where a registry may send the server: itself, or a host of `redirect_hosts` (`host` admits
/// any port, `host:port` that port). Plain HTTP only to a host of `insecure_http`.
#[derive(Clone)]
struct HostRule {
    registry: String,
    redirect_hosts: Vec<String>,
    insecure_http: Vec<String>,
}

impl HostRule {
    fn admits(&self, url: &Url) -> bool {
        let Some(auth) = authority(url) else {
            return false;
        };
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let plain_ok = self
            .insecure_http
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&auth));
        match url.scheme() {
            "https" => {}
            "http" if plain_ok => {}
            _ => return false,
        }
        auth == self.registry
            || self
                .redirect_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&auth) || h.eq_ignore_ascii_case(&host))
    }
}

/// A registry as one pull sees it: the HTTP client (with the redirect rule), the base URL and
/// the credentials; the `Authorization` value once the registry asked for one.
pub(crate) struct Api {
    http: reqwest::Client,
    rule: HostRule,
    base: Url,
    image: ImageRef,
    username: Option<String>,
    password: Option<String>,
    authorization: Option<String>,
}

impl Api {
    pub(crate) fn new(settings: &OciSettings, image: &ImageRef) -> Result<Api, OciError> {
        let registry = image.registry.to_ascii_lowercase();
        let insecure_http: Vec<String> = settings
            .insecure_http
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let rule = HostRule {
            registry: registry.clone(),
            redirect_hosts: settings
                .redirect_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            insecure_http: insecure_http.clone(),
        };
        let scheme = if insecure_http.contains(&registry) {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{registry}/"))
            .map_err(|_| OciError::InvalidReference(image.to_string()))?;
        let policy_rule = rule.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(RedirectRefused)
            } else if policy_rule.admits(attempt.url()) {
                attempt.follow()
            } else {
                warn!(
                    registry = %policy_rule.registry,
                    to = %authority(attempt.url()).unwrap_or_default(),
                    "registry redirect to a host that is not allowed was refused"
                );
                attempt.error(RedirectRefused)
            }
        });
        let http = reqwest::Client::builder()
            .redirect(policy)
            .no_gzip()
            .no_proxy()
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .read_timeout(settings.timeout)
            .user_agent(concat!("fhirhose-oci/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OciError::Internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(Api {
            http,
            rule,
            base,
            image: image.clone(),
            username: settings.username.clone(),
            password: settings.password.clone(),
            authorization: None,
        })
    }

    fn registry_error(&self, message: impl Into<String>, transient: bool) -> OciError {
        OciError::Registry {
            registry: self.image.registry.clone(),
            message: message.into(),
            transient,
        }
    }

    /// A failed request: the kind of failure, never the remote text.
    fn request_error(&self, e: &reqwest::Error) -> OciError {
        let mut refused = false;
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            refused |= s.is::<RedirectRefused>();
            source = s.source();
        }
        if e.is_redirect() || refused {
            self.registry_error(
                "the registry redirected to a host that is not allowed (see --registry-redirect-hosts), or too often",
                false,
            )
        } else if e.is_timeout() {
            self.registry_error("no answer in time", true)
        } else if e.is_connect() {
            self.registry_error("cannot connect", true)
        } else if e.is_body() || e.is_decode() {
            self.registry_error("the answer was cut off or malformed", true)
        } else {
            self.registry_error("the request failed", true)
        }
    }

    /// An answer that is not a success: the status and a fixed sentence.
    fn status_error(&self, status: StatusCode, stage: Stage<'_>) -> OciError {
        let code = status.as_u16();
        match (code, stage) {
            (404, Stage::Manifest) => OciError::ImageNotFound(self.image.to_string()),
            (404, Stage::Blob(digest)) => self.registry_error(
                format!("layer {digest} of '{}' is missing", self.image),
                false,
            ),
            (401, _) => self.registry_error(
                "not authorized (HTTP 401): credentials are missing or refused",
                false,
            ),
            (408 | 429 | 500..=599, _) => {
                self.registry_error(format!("the registry answered HTTP {code}"), true)
            }
            _ => self.registry_error(format!("the registry answered HTTP {code}"), false),
        }
    }

    /// `GET` of a path under the registry's root (authenticating when the registry asks),
    /// following redirects the rule admits. Answers other than 2xx are errors.
    pub(crate) async fn get(
        &mut self,
        path: &str,
        accept: &str,
        stage: Stage<'_>,
    ) -> Result<Response, OciError> {
        let url = self
            .base
            .join(path)
            .map_err(|_| OciError::InvalidReference(self.image.to_string()))?;
        let mut answer = self.send(&url, accept).await?;
        if answer.status() == StatusCode::UNAUTHORIZED && self.authorization.is_none() {
            self.authorize(answer.headers()).await?;
            answer = self.send(&url, accept).await?;
        }
        if !answer.status().is_success() {
            return Err(self.status_error(answer.status(), stage));
        }
        Ok(answer)
    }

    async fn send(&self, url: &Url, accept: &str) -> Result<Response, OciError> {
        let mut request = self.http.get(url.clone()).header(ACCEPT, accept);
        if let Some(a) = &self.authorization {
            request = request.header(AUTHORIZATION, a);
        }
        request.send().await.map_err(|e| self.request_error(&e))
    }

    /// Answers a `401` challenge: `Basic` with the configured credentials, or `Bearer` with a
    /// token from the challenge's realm (which must be a host the rule admits).
    async fn authorize(&mut self, headers: &HeaderMap) -> Result<(), OciError> {
        let unauthorized = self.status_error(StatusCode::UNAUTHORIZED, Stage::Token);
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim()
            .to_string();
        let (scheme, params) = challenge.split_once(' ').unwrap_or((&challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let Some(user) = &self.username else {
                return Err(unauthorized);
            };
            self.authorization = Some(basic(user, self.password.as_deref().unwrap_or("")));
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(unauthorized);
        }
        let params = challenge_params(params);
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let Some(mut realm) = param("realm").and_then(|r| Url::parse(r).ok()) else {
            return Err(
                self.registry_error("the registry's token challenge has no usable realm", false)
            );
        };
        if !self.rule.admits(&realm) {
            warn!(
                registry = %self.rule.registry,
                realm = %authority(&realm).unwrap_or_default(),
                "token service on a host that is not allowed was refused"
            );
            return Err(self.registry_error(
                "the registry's token service is on a host that is not allowed (see --registry-redirect-hosts)",
                false,
            ));
        }
        {
            let mut query = realm.query_pairs_mut();
            if let Some(service) = param("service") {
                query.append_pair("service", service);
            }
            query.append_pair(
                "scope",
                &format!("repository:{}:pull", self.image.repository),
            );
        }
        debug!(registry = %self.rule.registry, "requesting a registry token");
        let mut request = self.http.get(realm);
        if let Some(user) = &self.username {
            request = request.header(
                AUTHORIZATION,
                basic(user, self.password.as_deref().unwrap_or("")),
            );
        }
        let answer = request.send().await.map_err(|e| self.request_error(&e))?;
        if !answer.status().is_success() {
            return Err(self.status_error(answer.status(), Stage::Token));
        }
        let body = read_bounded(answer, MAX_TOKEN_BYTES)
            .await
            .map_err(|e| match e {
                Bounded::TooLarge(_) => self.registry_error("the token answer is too large", false),
                Bounded::Failed(e) => self.request_error(&e),
            })?;
        let token = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            })
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| self.registry_error("the token service gave no usable token", false))?;
        self.authorization = Some(format!("Bearer {token}"));
        Ok(())
    }

    /// A body that could not be read to its end.
    pub(crate) fn chunk_error(&self, e: &reqwest::Error) -> OciError {
        self.request_error(e)
    }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// Standard base64 with padding (the one encoding Basic authentication needs).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `key="value", key=value` pairs of a challenge.
fn challenge_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_string();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (quoted[..end].to_string(), &quoted[end + 1..]),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// Why a bounded read stopped.
pub(crate) enum Bounded {
    /// More than the bound (the size seen so far, or announced).
    TooLarge(u64),
    Failed(reqwest::Error),
}

/// Reads a whole answer of at most `limit` bytes.
pub(crate) async fn read_bounded(mut answer: Response, limit: u64) -> Result<Vec<u8>, Bounded> {
    if let Some(length) = answer.content_length()
        && length > limit
    {
        return Err(Bounded::TooLarge(length));
    }
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(Bounded::Failed)? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(Bounded::TooLarge((body.len() + chunk.len()) as u64));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error a refused redirect carries through reqwest.
#[derive(Debug)]
struct RedirectRefused;

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("redirect refused")
    }
}

impl std::error::Error for RedirectRefused {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_challenges() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        let p = challenge_params(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:x:pull""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(p[1], ("service".into(), "registry.example".into()));
        assert_eq!(p[2].1, "repository:x:pull");
    }

    #[test]
    fn host_rule() {
        let rule = HostRule {
            registry: "reg.example".into(),
            redirect_hosts: vec!["cdn.example".into(), "127.0.0.1:9000".into()],
            insecure_http: vec!["127.0.0.1:9000".into()],
        };
        let ok = |u: &str| rule.admits(&Url::parse(u).unwrap());
        assert!(ok("https://reg.example/v2/x"));
        assert!(ok("https://cdn.example:8443/blob"));
        assert!(ok("http://127.0.0.1:9000/blob"));
        assert!(!ok("http://cdn.example/blob"), "no downgrade to plain HTTP");
        assert!(!ok("https://169.254.169.254/latest/meta-data"));
        assert!(!ok("https://127.0.0.1:9001/blob"));
        assert!(!ok("https://reg.example.evil/x"));
    }
}
