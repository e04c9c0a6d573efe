//! `POST /auth/token`: the SMART Backend Services client-credentials grant with a JWT client
//! assertion (RFC 7523 §2.2, §3).
//!
//! Order of checks: form parameters (presence and fixed values, scope syntax) → assertion header
//! (algorithm) → the failure throttle of its `iss` ([`crate::assertion_guard`]) → client lookup
//! by `iss` → key selection (`jku`, `kid`, key type: exactly one key, [`MAX_CANDIDATE_KEYS`]) →
//! one signature check (on a blocking thread, at most
//! [`crate::assertion_guard::max_concurrent_signature_checks`]
//! at once) → claims (`sub`, `aud`, `exp`, `nbf`, `iat`, `jti`) → replay cache → a `client_id`
//! parameter, if any, names the same client → scope grant. The `jti` is only
//! recorded for assertions whose signature verified, so nobody can fill the cache with jtis of
//! someone else's future assertions.
//!
//! Every assertion that reaches the client lookup costs exactly one signature check: against the
//! one registered key that fits it, or, when its `iss` is unknown, its `jku` is not the
//! registered one or not exactly one key fits its `alg` and `kid`, against a decoy key of its
//! `alg` made at start. All these refusals give the same answer after the same work, so neither
//! the answer nor its time tells which client ids exist.
//!
//! Status codes: `invalid_client` is 401, every other error 400 (RFC 6749 §5.2); a full replay
//! cache answers 503 `temporarily_unavailable`; so do busy signature-check slots (with
//! `Retry-After`), and a throttled `iss` 429 `temporarily_unavailable` (with `Retry-After`).

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

use crate::access_token::{AccessTokenError, TokenIssuer, VerifiedToken};
use crate::assertion_guard::{
    DecoyKeys, FailureThrottle, SIGNATURE_CHECK_WAIT, THROTTLE_REFILL_S, THROTTLE_SLOTS,
    max_concurrent_signature_checks,
};
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
    /// `temporarily_unavailable` on the wire, answered 503 with `Retry-After: 1`: every
    /// signature-check slot stayed busy for [`SIGNATURE_CHECK_WAIT`].
    #[serde(rename = "temporarily_unavailable")]
    SignatureChecksBusy,
    /// `temporarily_unavailable` on the wire, answered 429 with `Retry-After`: the assertion's
    /// `iss` has spent its failed signature checks (registered or not, the same way).
    #[serde(rename = "temporarily_unavailable")]
    Throttled,
    ServerError,
}

impl OAuthErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            OAuthErrorCode::InvalidClient => 401,
            OAuthErrorCode::TemporarilyUnavailable | OAuthErrorCode::SignatureChecksBusy => 503,
            OAuthErrorCode::Throttled => 429,
            OAuthErrorCode::ServerError => 500,
            _ => 400,
        }
    }

    /// The `Retry-After` (seconds) of the answer, if it has one.
    pub fn retry_after(self) -> Option<u64> {
        match self {
            OAuthErrorCode::SignatureChecksBusy => Some(1),
            OAuthErrorCode::Throttled => Some(THROTTLE_REFILL_S),
            _ => None,
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
    /// What an assertion is checked against when no registered key is to be used.
    decoys: DecoyKeys,
    /// Failed signature checks per `iss`.
    throttle: FailureThrottle,
    /// Signature checks in progress at once.
    pub(crate) check_slots: Arc<tokio::sync::Semaphore>,
    /// How long a request waits for one of `check_slots`.
    pub(crate) check_wait: std::time::Duration,
    /// Signature checks made, and how many of them against a decoy.
    checks: Arc<CheckCounts>,
}

/// Signature checks made by a [`SmartAuth`] (see [`SmartAuth::signature_checks`]).
#[derive(Default)]
struct CheckCounts {
    all: std::sync::atomic::AtomicU64,
    decoy: std::sync::atomic::AtomicU64,
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
            decoys: DecoyKeys::generate(),
            throttle: FailureThrottle::new(THROTTLE_SLOTS),
            check_slots: Arc::new(tokio::sync::Semaphore::new(
                max_concurrent_signature_checks(),
            )),
            check_wait: SIGNATURE_CHECK_WAIT,
            checks: Arc::default(),
        }
    }

    /// Signature checks made so far by this state's token requests: all, and those against a
    /// decoy key (an unknown client, or no single registered key fitting the assertion).
    pub fn signature_checks(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.checks.all.load(Relaxed),
            self.checks.decoy.load(Relaxed),
        )
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
        self.token_from(form, now, None).await
    }

    /// [`SmartAuth::token`] for a request from client address `from` (the failure throttle's
    /// buckets are per `iss` and address; `None` when unknown).
    pub async fn token_from(
        &self,
        form: &TokenForm,
        now: i64,
        from: Option<IpAddr>,
    ) -> Result<TokenResponse, OAuthError> {
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

        let client = self.authenticate_client(assertion, now, from).await?;
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

    /// Validates a client assertion sent from client address `from` (`None` when unknown) and
    /// returns the client it authenticates.
    pub async fn authenticate_client(
        &self,
        assertion: &str,
        now: i64,
        from: Option<IpAddr>,
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
        // From here on the work depends on nothing the answer may reveal: one signature check,
        // against a registered key or a decoy, whatever the reason of a refusal.
        if !self.throttle.take(iss, from, now) {
            tracing::info!(
                client_id = %crate::log_safe(iss),
                "client authentication throttled: too many failed assertions for this client_id"
            );
            return Err(OAuthError::new(
                OAuthErrorCode::Throttled,
                "too many failed client assertions for this client_id; retry later",
            ));
        }
        // Unpadded base64url: the decoded length (the verifier refuses any other encoding).
        let signature_len = parts[2].len() * 3 / 4;
        let selected = self.select_key(iss, &header, alg, signature_len).await;
        let (client, key, failure) = match selected {
            Ok((client, key)) => (Some(client), key, None),
            Err(reason) => (
                None,
                self.decoys.for_assertion(alg, signature_len).clone(),
                Some(reason),
            ),
        };
        let checked = self
            .check_signature(assertion, alg, key, failure.is_some())
            .await;
        let claims = match checked {
            Ok(claims) => claims,
            Err(e) => {
                // No check ran: it does not count against the iss.
                self.throttle.give_back(iss, from, now);
                return Err(e);
            }
        };
        let (client, claims) = match (client, failure, claims) {
            (Some(client), None, Some(claims)) => {
                // The client's own key verified: its requests never throttle it.
                self.throttle.give_back(iss, from, now);
                (client, claims)
            }
            (_, Some(reason), _) => return Err(hidden_client_failure(iss, reason)),
            (_, None, _) => {
                return Err(hidden_client_failure(
                    iss,
                    "the client_assertion signature does not verify with the client's registered key"
                        .to_owned(),
                ));
            }
        };
        self.check_claims(&client, &claims, now).await
    }

    /// The client `iss` names and the one registered key its assertion is to be checked
    /// against; else why not (for the log only).
    async fn select_key(
        &self,
        iss: &str,
        header: &AssertionHeader,
        alg: Algorithm,
        signature_len: usize,
    ) -> Result<(Arc<RegisteredClient>, VerificationKey), String> {
        let client = self
            .registry
            .get(iss)
            .ok_or_else(|| "unknown client_id".to_owned())?;
        if let Some(jku) = &header.jku
            && client.jwks_url() != Some(jku.as_str())
        {
            return Err("the assertion's `jku` is not the client's registered JWKS URL".to_owned());
        }
        let mut keys = self
            .candidate_keys(&client, alg, header.kid.as_deref())
            .await
            .map_err(|e| e.description)?;
        let key = keys.pop().ok_or("no candidate key")?;
        if !key.fits_signature(signature_len) {
            return Err(format!(
                "a {signature_len}-byte signature cannot be the registered key's"
            ));
        }
        Ok((client, key))
    }

    /// One signature check of `assertion` with `key`, on a blocking thread once one of the
    /// check slots is free; `Ok(None)` when it does not verify, `Err` when no slot freed up in
    /// time (nothing was checked then).
    async fn check_signature(
        &self,
        assertion: &str,
        alg: Algorithm,
        key: VerificationKey,
        decoy: bool,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, OAuthError> {
        let permit =
            match tokio::time::timeout(self.check_wait, self.check_slots.clone().acquire_owned())
                .await
            {
                Ok(Ok(permit)) => permit,
                _ => {
                    tracing::warn!("token request refused: every signature-check slot is busy");
                    return Err(OAuthError::new(
                        OAuthErrorCode::SignatureChecksBusy,
                        "too many client assertions are being checked; retry later",
                    ));
                }
            };
        let owned = assertion.to_owned();
        let counts = self.checks.clone();
        // The permit moves to the thread: it is held until the check is over, also when the
        // request is dropped meanwhile.
        tokio::task::spawn_blocking(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let _permit = permit;
            counts.all.fetch_add(1, Relaxed);
            if decoy {
                counts.decoy.fetch_add(1, Relaxed);
            }
            verify_with(&owned, alg, &key)
        })
        .await
        .map_err(|_| {
            OAuthError::new(
                OAuthErrorCode::ServerError,
                "the signature check did not finish",
            )
        })
    }

    /// The keys of `client` that fit `alg` and `kid`: exactly one, or an error (a hidden
    /// refusal).
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
                "{} of the client's keys fit algorithm {alg:?}{}: an assertion is checked against exactly one key; {}",
                chosen.len(),
                if kid.is_some() {
                    " and share its kid"
                } else {
                    ""
                },
                if kid.is_some() {
                    "give each key a distinct `kid` (SMART: unique within the JWKS)"
                } else {
                    "name the key with `kid` in the assertion header (SMART requires it)"
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

/// Checks the signature of `assertion` with `key`; the claims when it verifies.
fn verify_with(
    assertion: &str,
    alg: Algorithm,
    key: &VerificationKey,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut validation = Validation::new(alg);
    // The claims are checked by `check_claims`, with SMART's rules and precise errors.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        assertion,
        &key.decoding,
        &validation,
    )
    .ok()
    .map(|d| d.claims)
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use jsonwebtoken::{EncodingKey, Header};

    use super::*;
    use crate::assertion_guard::THROTTLE_BURST;
    use crate::client_tools::ClientKey;

    const TOKEN_URL: &str = "http://127.0.0.1:8080/fhir/auth/token";

    fn pem(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn key(name: &str, kid: &str) -> ClientKey {
        ClientKey::from_pem(&pem(name), None, Some(kid.to_owned())).unwrap()
    }

    /// `one-key` (rsa-a, kid `a`), `two-keys` (rsa-a `a` and rsa-b `b`, both RS384), `ec`
    /// (P-384, kid `e`).
    fn smart() -> SmartAuth {
        static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let json = JSON.get_or_init(|| {
            let a = key("rsa-a.pem", "a").public_jwk().unwrap();
            let b = key("rsa-b.pem", "b").public_jwk().unwrap();
            let e = key("ec-p384.pem", "e").public_jwk().unwrap();
            serde_json::json!([
                {"client_id": "one-key", "jwks": {"keys": [a]}, "scope": "system/*.rs"},
                {"client_id": "two-keys", "jwks": {"keys": [a, b]}, "scope": "system/*.rs"},
                {"client_id": "ec", "jwks": {"keys": [e]}, "scope": "system/*.rs"},
            ])
            .to_string()
        });
        let registry = ClientRegistry::from_json(json, Path::new("clients.json")).unwrap();
        SmartAuth::new(
            registry,
            TokenIssuer::new(
                "http://127.0.0.1:8080/fhir".into(),
                Duration::from_secs(300),
            ),
            TOKEN_URL.into(),
            1000,
        )
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// An assertion of `iss` with the given header fields, signed by the key in `pem_name`.
    fn assertion(
        pem_name: &str,
        alg: Algorithm,
        kid: Option<&str>,
        jku: Option<&str>,
        iss: &str,
        t: i64,
    ) -> String {
        let enc = if pem_name.starts_with("ec-") {
            EncodingKey::from_ec_pem(&pem(pem_name)).unwrap()
        } else {
            EncodingKey::from_rsa_pem(&pem(pem_name)).unwrap()
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        header.jku = jku.map(str::to_owned);
        let claims = serde_json::json!({
            "iss": iss, "sub": iss, "aud": TOKEN_URL, "exp": t + 240,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        jsonwebtoken::encode(&header, &claims, &enc).unwrap()
    }

    /// The same assertion with its signature replaced by random bytes of the same length.
    fn random_signature(a: &str) -> String {
        let (_, sig) = a.rsplit_once('.').unwrap();
        let len = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap()
            .len();
        random_signature_of(a, len)
    }

    /// `a` with random signature bytes of length `len`.
    fn random_signature_of(a: &str, len: usize) -> String {
        let (signed, _) = a.rsplit_once('.').unwrap();
        let mut bytes = vec![0u8; len];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut bytes);
        format!(
            "{signed}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    }

    fn form(assertion: &str) -> TokenForm {
        TokenForm {
            grant_type: Some(GRANT_TYPE.into()),
            client_assertion_type: Some(CLIENT_ASSERTION_TYPE.into()),
            client_assertion: Some(assertion.into()),
            scope: Some("system/*.rs".into()),
            client_id: None,
        }
    }

    /// Finding 1: an unknown client, a key that does not fit, a bad signature — every refusal
    /// before the signature verified costs exactly one signature check (a decoy's when no single
    /// registered key is to be used) and gets the same answer. Counted, not timed.
    #[tokio::test]
    async fn every_refusal_before_the_signature_costs_one_check_and_one_answer() {
        let t = now();
        let rs = Algorithm::RS384;
        let cases: Vec<(&str, String, bool)> = vec![
            (
                "unknown iss, no kid",
                random_signature(&assertion("rsa-a.pem", rs, None, None, "nobody", t)),
                true,
            ),
            (
                "unknown iss, ES384",
                random_signature(&assertion(
                    "ec-p384.pem",
                    Algorithm::ES384,
                    Some("e"),
                    None,
                    "nobody",
                    t,
                )),
                true,
            ),
            // Review (timing): a registered key refused a signature of another length than
            // its modulus before any arithmetic, while the decoy of that length did the
            // exponentiation — a known id answered twice as fast. Such a signature is now
            // checked against the decoy for a known id too.
            (
                "known iss, RSA signature of another length than the key's",
                random_signature_of(&assertion("rsa-a.pem", rs, None, None, "one-key", t), 512),
                true,
            ),
            (
                "unknown iss, RSA signature of that length",
                random_signature_of(&assertion("rsa-a.pem", rs, None, None, "nobody", t), 512),
                true,
            ),
            (
                "known iss, random signature, no kid",
                random_signature(&assertion("rsa-a.pem", rs, None, None, "one-key", t)),
                false,
            ),
            (
                "known iss, signed by another key",
                assertion("rsa-b.pem", rs, Some("a"), None, "one-key", t),
                false,
            ),
            (
                "known iss, unknown kid",
                assertion("rsa-a.pem", rs, Some("zzz"), None, "one-key", t),
                true,
            ),
            (
                "known iss, alg its keys do not fit",
                assertion("ec-p384.pem", Algorithm::ES384, None, None, "one-key", t),
                true,
            ),
            (
                "known iss, foreign jku",
                assertion(
                    "rsa-a.pem",
                    rs,
                    Some("a"),
                    Some("https://evil.example/jwks"),
                    "one-key",
                    t,
                ),
                true,
            ),
            (
                "known iss, several keys fit and no kid (even when signed right)",
                assertion("rsa-a.pem", rs, None, None, "two-keys", t),
                true,
            ),
        ];
        let want = OAuthError::client(CLIENT_AUTH_FAILED);
        for (what, a, decoy) in cases {
            let s = smart();
            let e = s.token(&form(&a), t).await.expect_err(what);
            assert_eq!(e, want, "{what}");
            assert_eq!(e.error.http_status(), 401, "{what}");
            let (all, decoys) = s.signature_checks();
            assert_eq!(all, 1, "{what}: exactly one signature check");
            assert_eq!(decoys, u64::from(decoy), "{what}: checked against a decoy");
        }
    }

    /// A grant costs one check too, against the registered key.
    #[tokio::test]
    async fn a_grant_costs_one_check_against_the_registered_key() {
        let t = now();
        let s = smart();
        let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "one-key", t);
        s.token(&form(&a), t).await.unwrap();
        assert_eq!(s.signature_checks(), (1, 0));
        let a = assertion("ec-p384.pem", Algorithm::ES384, None, None, "ec", t);
        s.token(&form(&a), t).await.unwrap();
        assert_eq!(s.signature_checks(), (2, 0));
    }

    /// Finding 2: without `kid` a client with several keys of the assertion's alg is not tried
    /// key by key (it was up to 10 checks); with its `kid` the one key is checked and grants.
    #[tokio::test]
    async fn a_kidless_assertion_is_checked_against_one_key_at_most() {
        let t = now();
        let s = smart();
        let a = assertion("rsa-b.pem", Algorithm::RS384, None, None, "two-keys", t);
        assert_eq!(
            s.token(&form(&a), t).await.unwrap_err().error,
            OAuthErrorCode::InvalidClient
        );
        assert_eq!(s.signature_checks(), (1, 1));
        let a = assertion(
            "rsa-b.pem",
            Algorithm::RS384,
            Some("b"),
            None,
            "two-keys",
            t,
        );
        s.token(&form(&a), t).await.unwrap();
        assert_eq!(s.signature_checks(), (2, 1));
    }

    /// The failure throttle holds back a known and an unknown `iss` alike, costs no check while
    /// it does, refills, and never holds back a client whose assertions verify.
    #[tokio::test]
    async fn failed_assertions_are_throttled_per_iss_alike_for_unknown_ids() {
        let t = now();
        let s = smart();
        for iss in ["one-key", "nobody"] {
            for _ in 0..THROTTLE_BURST {
                let a = assertion("rsa-b.pem", Algorithm::RS384, None, None, iss, t);
                let e = s.token(&form(&a), t).await.unwrap_err();
                assert_eq!(e, OAuthError::client(CLIENT_AUTH_FAILED));
            }
            let before = s.signature_checks();
            let a = assertion("rsa-b.pem", Algorithm::RS384, None, None, iss, t);
            let e = s.token(&form(&a), t).await.unwrap_err();
            assert_eq!(e.error, OAuthErrorCode::Throttled, "{iss}");
            assert_eq!(e.error.http_status(), 429);
            assert_eq!(e.error.retry_after(), Some(THROTTLE_REFILL_S));
            assert_eq!(
                s.signature_checks(),
                before,
                "{iss}: no check while throttled"
            );
        }
        // The same answer for both, word for word.
        let throttled = |iss: &'static str| {
            let s = &s;
            async move {
                let a = assertion("rsa-b.pem", Algorithm::RS384, None, None, iss, t);
                s.token(&form(&a), t).await.unwrap_err()
            }
        };
        assert_eq!(throttled("one-key").await, throttled("nobody").await);
        // Held back only for a while: after the refill period the real client gets through,
        // and its verified assertion gives its check back.
        let later = t + THROTTLE_REFILL_S as i64;
        let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "one-key", later);
        s.token(&form(&a), later).await.unwrap();
        let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "one-key", later);
        s.token(&form(&a), later).await.unwrap();

        // A client whose assertions verify is never throttled by them.
        let s = smart();
        for _ in 0..2 * THROTTLE_BURST {
            let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "one-key", t);
            s.token(&form(&a), t).await.unwrap();
        }
    }

    /// When every signature-check slot stays busy the request is refused at once with 503 and
    /// `Retry-After` — nothing checked, nothing counted against its `iss` — and goes through
    /// once a slot is free.
    #[tokio::test]
    async fn busy_check_slots_answer_503_and_cost_the_iss_nothing() {
        let t = now();
        let mut s = smart();
        s.check_wait = Duration::from_millis(10);
        let n = max_concurrent_signature_checks() as u32;
        let held = s.check_slots.clone().acquire_many_owned(n).await.unwrap();
        for _ in 0..THROTTLE_BURST + 5 {
            let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "nobody", t);
            let e = s.token(&form(&a), t).await.unwrap_err();
            assert_eq!(e.error, OAuthErrorCode::SignatureChecksBusy);
            assert_eq!(e.error.http_status(), 503);
            assert_eq!(e.error.retry_after(), Some(1));
            assert_eq!(
                serde_json::to_value(&e).unwrap()["error"],
                "temporarily_unavailable"
            );
        }
        assert_eq!(s.signature_checks(), (0, 0));
        drop(held);
        // The busy answers did not spend the iss's failures: a full burst is left.
        for _ in 0..THROTTLE_BURST {
            let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "nobody", t);
            assert_eq!(
                s.token(&form(&a), t).await.unwrap_err().error,
                OAuthErrorCode::InvalidClient
            );
        }
        let a = assertion("rsa-a.pem", Algorithm::RS384, None, None, "one-key", t);
        s.token(&form(&a), t).await.unwrap();
    }
}
