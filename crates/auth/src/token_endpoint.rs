//! `POST /auth/token`: the SMART Backend Services client-credentials grant with a JWT client
//! assertion (RFC 7523 §2.2, §3).
//!
//! Order of checks: form parameters (presence and fixed values, scope syntax) → assertion header
//! (algorithm) → client lookup by `iss` → key selection (`jku`, `kid`, key type; at most
//! [`MAX_CANDIDATE_KEYS`] candidates) → signature (on a blocking thread) →
//! claims (`sub`, `aud`, `exp`, `nbf`, `iat`, `jti`) → replay cache → a `client_id` parameter, if
//! any, names the same client → scope grant. The `jti` is only
//! recorded for assertions whose signature verified, so nobody can fill the cache with jtis of
//! someone else's future assertions.
//!
//! Status codes: `invalid_client` is 401, every other error 400 (RFC 6749 §5.2); a full replay
//! cache answers 503 `temporarily_unavailable`.

use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

use crate::access_token::{AccessTokenError, TokenIssuer, VerifiedToken};
use crate::jwk::MAX_CANDIDATE_KEYS;
use crate::registry::{ClientRegistry, KeySource, RegisteredClient, VerificationKey};
use crate::replay::{ReplayCache, ReplayError};
use crate::scope::Scopes;
use crate::shared::{ReplayRecord, SIGNING_KEY_BYTES, SharedAuthState, SharedStateError};

pub const GRANT_TYPE: &str = "client_credentials";
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Assertions may expire at most this far ahead (SMART: five minutes).
pub const MAX_ASSERTION_LIFETIME_S: i64 = 300;
/// Allowed difference between the client's clock and ours.
pub const CLOCK_SKEW_S: i64 = 30;
/// Accepted assertion algorithms, in the order advertised.
pub const ACCEPTED_ALGORITHMS: [&str; 4] = ["RS384", "ES384", "RS256", "ES256"];
const MAX_JTI_LEN: usize = 255;
/// Largest accepted `client_assertion`, checked before it is decoded.
pub const MAX_ASSERTION_BYTES: usize = 16 * 1024;
/// The one answer to a client that could not be authenticated before its signature verified:
/// the same for an unknown client_id, an unknown key and a bad signature, so that nobody learns
/// which client ids exist. The precise reason goes to the log.
const CLIENT_AUTH_FAILED: &str = "client authentication failed";

/// The OAuth 2.0 error codes this endpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OAuthErrorCode {
    InvalidRequest,
    InvalidClient,
    InvalidScope,
    UnsupportedGrantType,
    TemporarilyUnavailable,
    ServerError,
}

impl OAuthErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            OAuthErrorCode::InvalidClient => 401,
            OAuthErrorCode::TemporarilyUnavailable => 503,
            OAuthErrorCode::ServerError => 500,
            _ => 400,
        }
    }
}

/// A refused token request. `description` never contains the assertion or any key material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{error:?}: {description}")]
pub struct OAuthError {
    pub error: OAuthErrorCode,
    #[serde(rename = "error_description")]
    pub description: String,
}

impl OAuthError {
    fn new(error: OAuthErrorCode, description: impl Into<String>) -> OAuthError {
        OAuthError {
            error,
            description: description.into(),
        }
    }
    fn request(d: impl Into<String>) -> OAuthError {
        Self::new(OAuthErrorCode::InvalidRequest, d)
    }
    fn client(d: impl Into<String>) -> OAuthError {
        Self::new(OAuthErrorCode::InvalidClient, d)
    }
}

/// The form fields of a token request. `Debug` hides the assertion.
#[derive(Default, Clone, Deserialize)]
pub struct TokenForm {
    pub grant_type: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
    pub scope: Option<String>,
    /// Optional with an assertion; when given it must name the client the assertion
    /// authenticates (RFC 7521 §4.2).
    pub client_id: Option<String>,
}

impl std::fmt::Debug for TokenForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenForm")
            .field("grant_type", &self.grant_type)
            .field("client_assertion_type", &self.client_assertion_type)
            .field(
                "client_assertion",
                &self.client_assertion.as_ref().map(|_| "<redacted>"),
            )
            .field("scope", &self.scope)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// A successful token response.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub scope: String,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish()
    }
}

#[derive(Deserialize)]
struct AssertionHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    jku: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// State of mode `smart`: the registry, the replay cache and the token issuer.
pub struct SmartAuth {
    pub(crate) registry: ClientRegistry,
    pub(crate) replay: ReplayCache,
    pub(crate) issuer: TokenIssuer,
    pub(crate) token_url: String,
    /// The database's record of accepted assertions, which replaces the in-memory cache: it
    /// outlives a restart, and on a shared database every node sees it (see
    /// [`SmartAuth::share`], [`SmartAuth::record_assertions_in`]).
    pub(crate) shared: Option<std::sync::Arc<dyn ReplayRecord>>,
    /// The signing key was configured (`--token-key`): it is kept when the state is shared.
    pub(crate) key_configured: bool,
}

impl SmartAuth {
    pub fn new(
        registry: ClientRegistry,
        issuer: TokenIssuer,
        token_url: String,
        replay_capacity: usize,
    ) -> SmartAuth {
        // Each client its share of the cache: one client cannot fill it for the others.
        let share = replay_capacity / registry.len().max(1);
        SmartAuth {
            replay: ReplayCache::new(replay_capacity).with_client_share(share),
            registry,
            issuer,
            token_url,
            shared: None,
            key_configured: false,
        }
    }

    /// Uses the state the nodes of a cluster share: the shared signing key (made by the first
    /// node) replaces this process's random one — a configured key (`--token-key`) stays —
    /// and accepted assertions are recorded there. Blocks on `shared`.
    pub fn share(
        &mut self,
        shared: std::sync::Arc<dyn SharedAuthState>,
    ) -> Result<(), SharedStateError> {
        if self.key_configured {
            self.shared = Some(shared as std::sync::Arc<dyn ReplayRecord>);
            return Ok(());
        }
        let mut fresh = [0u8; SIGNING_KEY_BYTES];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut fresh);
        let key = shared.signing_key(&fresh)?;
        if key.len() < SIGNING_KEY_BYTES {
            return Err(SharedStateError(format!(
                "the shared signing key is shorter than {SIGNING_KEY_BYTES} bytes"
            )));
        }
        self.issuer = TokenIssuer::with_key(
            self.issuer.issuer().to_string(),
            self.issuer.lifetime(),
            &key,
        );
        self.shared = Some(shared as std::sync::Arc<dyn ReplayRecord>);
        Ok(())
    }

    /// Records accepted assertions in `record` (the database) instead of this process's memory,
    /// so that a restart does not forget them; the signing key stays this process's.
    pub fn record_assertions_in(&mut self, record: std::sync::Arc<dyn ReplayRecord>) {
        self.shared = Some(record);
    }

    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    pub fn issuer(&self) -> &TokenIssuer {
        &self.issuer
    }

    /// Verifies a bearer token at `now` (unix seconds): signed with this server's key, not
    /// expired, and of a client the clients file lists, its scopes cut to what that registration
    /// allows now. The key can outlive the clients file it issued under (`--token-key`, or the
    /// key the nodes of a cluster share): a client removed from the file, or registered for less,
    /// must not go on with a token issued before.
    pub fn verify_access_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<VerifiedToken, AccessTokenError> {
        let mut verified = self.issuer.verify(token, now)?;
        let client = self
            .registry
            .get(&verified.client_id)
            .ok_or(AccessTokenError::UnknownClient)?;
        verified.scopes = client.max_scope.intersect(&verified.scopes);
        verified.key_sets = client.key_sets.clone();
        Ok(verified)
    }

    /// Handles one token request at time `now` (unix seconds).
    pub async fn token(&self, form: &TokenForm, now: i64) -> Result<TokenResponse, OAuthError> {
        let grant_type = required(&form.grant_type, "grant_type")?;
        if grant_type != GRANT_TYPE {
            return Err(OAuthError::new(
                OAuthErrorCode::UnsupportedGrantType,
                format!("grant_type must be `{GRANT_TYPE}`"),
            ));
        }
        let assertion_type = required(&form.client_assertion_type, "client_assertion_type")?;
        if assertion_type != CLIENT_ASSERTION_TYPE {
            return Err(OAuthError::request(format!(
                "client_assertion_type must be `{CLIENT_ASSERTION_TYPE}`"
            )));
        }
        let assertion = required(&form.client_assertion, "client_assertion")?;
        if assertion.len() > MAX_ASSERTION_BYTES {
            return Err(OAuthError::request(format!(
                "client_assertion exceeds {} KiB",
                MAX_ASSERTION_BYTES / 1024
            )));
        }
        // An empty or missing scope asks for nothing that could be granted.
        let scope = form
            .scope
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidScope, "a scope is required"))?;
        let requested = Scopes::parse(scope)
            .map_err(|e| OAuthError::new(OAuthErrorCode::InvalidScope, e.to_string()))?;

        let client = self.authenticate_client(assertion, now).await?;
        if let Some(named) = form.client_id.as_deref()
            && named != client.client_id
        {
            return Err(OAuthError::client(
                "the `client_id` parameter names another client than the client_assertion's `iss`",
            ));
        }

        let granted = client.max_scope.intersect(&requested);
        if granted.is_empty() {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidScope,
                "none of the requested scopes is within the client's registered scope",
            ));
        }
        let access_token = self
            .issuer
            .issue(&client.client_id, &granted, now)
            .map_err(|e| OAuthError::new(OAuthErrorCode::ServerError, e))?;
        let scope = granted.render();
        tracing::info!(client_id = %crate::log_safe(&client.client_id), scope = %crate::log_safe(&scope), "access token issued");
        Ok(TokenResponse {
            access_token,
            token_type: "bearer".to_owned(),
            expires_in: self.issuer.lifetime().as_secs(),
            scope,
        })
    }

    /// Validates a client assertion and returns the client it authenticates.
    pub async fn authenticate_client(
        &self,
        assertion: &str,
        now: i64,
    ) -> Result<Arc<RegisteredClient>, OAuthError> {
        let parts: Vec<&str> = assertion.split('.').collect();
        if parts.len() != 3 {
            return Err(OAuthError::client(
                "client_assertion is not a compact JWS (three dot-separated parts)",
            ));
        }
        let header: AssertionHeader = decode_part(parts[0])
            .ok_or_else(|| OAuthError::client("the client_assertion header is not valid JSON"))?;
        if header.crit.is_some() {
            return Err(OAuthError::client(
                "the client_assertion header has `crit` extensions, which are not supported",
            ));
        }
        let alg = match header.alg.as_str() {
            "RS384" => Algorithm::RS384,
            "ES384" => Algorithm::ES384,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => {
                return Err(OAuthError::client(format!(
                    "algorithm `{}` is not accepted; use one of {}",
                    printable(other),
                    ACCEPTED_ALGORITHMS.join(", ")
                )));
            }
        };
        // Claims are read unverified only to find the client, and checked after verification.
        let unverified: serde_json::Map<String, serde_json::Value> = decode_part(parts[1])
            .ok_or_else(|| {
                OAuthError::client("the client_assertion claims are not a JSON object")
            })?;
        let iss = unverified
            .get("iss")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                OAuthError::client("the client_assertion has no `iss` (the client_id)")
            })?;
        let client = self
            .registry
            .get(iss)
            .ok_or_else(|| hidden_client_failure(iss, "unknown client_id".to_owned()))?;

        if let Some(jku) = &header.jku
            && client.jwks_url() != Some(jku.as_str())
        {
            return Err(hidden_client_failure(
                iss,
                "the assertion's `jku` is not the client's registered JWKS URL".to_owned(),
            ));
        }

        let keys = self
            .candidate_keys(&client, alg, header.kid.as_deref())
            .await
            .map_err(|e| match e.error {
                OAuthErrorCode::InvalidClient => hidden_client_failure(iss, e.description),
                _ => e,
            })?;
        // Up to MAX_CANDIDATE_KEYS signature checks: off the async workers.
        let owned = assertion.to_owned();
        let claims = tokio::task::spawn_blocking(move || verify_with_any(&owned, alg, &keys))
            .await
            .map_err(|_| {
                OAuthError::new(
                    OAuthErrorCode::ServerError,
                    "the signature check did not finish",
                )
            })?
            .ok_or_else(|| {
                hidden_client_failure(
                    iss,
                    "the client_assertion signature does not verify with the client's registered keys"
                        .to_owned(),
                )
            })?;

        self.check_claims(&client, &claims, now).await
    }

    async fn candidate_keys(
        &self,
        client: &RegisteredClient,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Vec<VerificationKey>, OAuthError> {
        let select = |keys: &[VerificationKey]| -> Vec<VerificationKey> {
            keys.iter()
                .filter(|k| k.accepts(alg))
                .filter(|k| kid.is_none_or(|want| k.kid.as_deref() == Some(want)))
                .cloned()
                .collect()
        };
        let chosen = match &client.keys {
            KeySource::Inline(keys) => select(keys),
            KeySource::Url(source) => {
                let keys = source
                    .keys(&self.registry.fetcher, false)
                    .await
                    .map_err(|e| OAuthError::client(e.to_string()))?;
                let chosen = select(&keys);
                if chosen.is_empty() && kid.is_some() {
                    // The client may have rotated its keys since we cached them.
                    let keys = source
                        .keys(&self.registry.fetcher, true)
                        .await
                        .map_err(|e| OAuthError::client(e.to_string()))?;
                    select(&keys)
                } else {
                    chosen
                }
            }
        };
        if chosen.len() > MAX_CANDIDATE_KEYS {
            return Err(OAuthError::client(format!(
                "{} of the client's keys fit algorithm {alg:?}{}: more than the {MAX_CANDIDATE_KEYS} one assertion is tried against; name the key with a distinct `kid`",
                chosen.len(),
                if kid.is_some() {
                    " and share its kid"
                } else {
                    ""
                },
            )));
        }
        if chosen.is_empty() {
            return Err(OAuthError::client(match kid {
                Some(kid) => format!(
                    "no registered key has kid `{}` and fits algorithm {alg:?}",
                    printable(kid)
                ),
                None => format!("no registered key fits algorithm {alg:?}"),
            }));
        }
        Ok(chosen)
    }

    async fn check_claims(
        &self,
        client: &Arc<RegisteredClient>,
        claims: &serde_json::Map<String, serde_json::Value>,
        now: i64,
    ) -> Result<Arc<RegisteredClient>, OAuthError> {
        let str_claim = |name: &str| claims.get(name).and_then(|v| v.as_str());
        if str_claim("iss") != Some(client.client_id.as_str()) {
            return Err(OAuthError::client("`iss` must be the client_id"));
        }
        match str_claim("sub") {
            None => return Err(OAuthError::client("the client_assertion has no `sub`")),
            Some(sub) if sub != client.client_id => {
                return Err(OAuthError::client("`sub` must equal `iss` (the client_id)"));
            }
            Some(_) => {}
        }
        let aud_ok = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => *a == self.token_url,
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .any(|a| a.as_str() == Some(self.token_url.as_str())),
            None => return Err(OAuthError::client("the client_assertion has no `aud`")),
            _ => false,
        };
        if !aud_ok {
            return Err(OAuthError::client(format!(
                "`aud` must be the token endpoint URL `{}`",
                self.token_url
            )));
        }
        let exp = int_claim(claims, "exp")?
            .ok_or_else(|| OAuthError::client("the client_assertion has no `exp`"))?;
        // Saturating: an `exp` near `i64::MAX` is "too far ahead", not an overflow.
        if exp.saturating_add(CLOCK_SKEW_S) <= now {
            return Err(OAuthError::client("the client_assertion has expired"));
        }
        if exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S {
            return Err(OAuthError::client(
                "the client_assertion `exp` is more than five minutes in the future",
            ));
        }
        if let Some(nbf) = int_claim(claims, "nbf")?
            && nbf > now + CLOCK_SKEW_S
        {
            return Err(OAuthError::client(
                "the client_assertion is not valid yet (`nbf`)",
            ));
        }
        if let Some(iat) = int_claim(claims, "iat")?
            && iat > now + CLOCK_SKEW_S
        {
            return Err(OAuthError::client(
                "the client_assertion was issued in the future (`iat`)",
            ));
        }
        let jti = match claims.get("jti") {
            None => return Err(OAuthError::client("the client_assertion has no `jti`")),
            Some(serde_json::Value::String(j)) if !j.is_empty() && j.len() <= MAX_JTI_LEN => j,
            Some(_) => {
                return Err(OAuthError::client(format!(
                    "`jti` must be a non-empty string of at most {MAX_JTI_LEN} bytes"
                )));
            }
        };
        let remembered = match &self.shared {
            None => self
                .replay
                .check_and_insert(&client.client_id, jti, exp + CLOCK_SKEW_S, now),
            Some(shared) => {
                let (shared, iss, jti) = (shared.clone(), client.client_id.clone(), jti.clone());
                let keep_until = exp + CLOCK_SKEW_S;
                match tokio::task::spawn_blocking(move || {
                    shared.remember_once(&iss, &jti, keep_until, now)
                })
                .await
                {
                    Ok(Ok(true)) => Ok(()),
                    Ok(Ok(false)) => Err(ReplayError::Replayed),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "the shared replay cache failed");
                        return Err(OAuthError::new(
                            OAuthErrorCode::TemporarilyUnavailable,
                            "the replay cache is unavailable; retry later",
                        ));
                    }
                    Err(_) => {
                        return Err(OAuthError::new(
                            OAuthErrorCode::ServerError,
                            "the replay check did not finish",
                        ));
                    }
                }
            }
        };
        remembered.map_err(|e| match e {
            ReplayError::Replayed => OAuthError::client(
                "this client_assertion's `jti` has already been used (replay refused)",
            ),
            ReplayError::Full | ReplayError::ClientFull => {
                OAuthError::new(OAuthErrorCode::TemporarilyUnavailable, e.to_string())
            }
        })?;
        Ok(client.clone())
    }
}

/// A failure before the assertion's signature verified that depends on the client: logged with
/// its reason, answered with [`CLIENT_AUTH_FAILED`] only.
fn hidden_client_failure(client_id: &str, reason: String) -> OAuthError {
    tracing::info!(
        client_id = %crate::log_safe(client_id),
        reason = %crate::log_safe(&reason),
        "client authentication failed"
    );
    OAuthError::client(CLIENT_AUTH_FAILED)
}

fn required<'a>(field: &'a Option<String>, name: &str) -> Result<&'a str, OAuthError> {
    match field.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(OAuthError::request(format!("missing `{name}`"))),
    }
}

fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Option<T> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A claim that must be an integer number of seconds when present.
fn int_claim(
    claims: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<i64>, OAuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| OAuthError::client(format!("`{name}` must be a number of seconds"))),
    }
}

/// Tries each candidate key; returns the verified claims of the first that verifies.
fn verify_with_any(
    assertion: &str,
    alg: Algorithm,
    keys: &[VerificationKey],
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut validation = Validation::new(alg);
    // The claims are checked by `check_claims`, with SMART's rules and precise errors.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    keys.iter().find_map(|k| {
        jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            assertion,
            &k.decoding,
            &validation,
        )
        .ok()
        .map(|d| d.claims)
    })
}

/// Client-supplied text echoed in an error: short, printable, so it cannot smuggle a whole
/// token into a response or log line.
fn printable(s: &str) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).take(64).collect();
    if s.chars().count() > 64 {
        format!("{clean}…")
    } else {
        clean
    }
}
