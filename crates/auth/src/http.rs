//! The axum side: the auth routes, the bearer-token middleware and the [`AuthContext`] handlers
//! use to check scopes.
//!
//! Wiring in a server:
//! ```ignore
//! let auth = auth::Auth::from_settings(&settings, listen_addr)?;
//! let api = auth.protect(api_router);           // every request needs a valid bearer token
//! let app = api.merge(auth.routes());           // /auth/token, /.well-known/smart-configuration
//! // in a handler:
//! async fn read(ctx: AuthContext, ...) -> Result<..., AuthRejection> { ctx.require_read("Patient")?; ... }
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::access_token::TokenIssuer;
use crate::config::{AuthMode, AuthSettings, ConfigError, check_mode};
use crate::registry::{ClientRegistry, KeySets};
use crate::scope::{Permission, Scopes};
use crate::token_endpoint::{ACCEPTED_ALGORITHMS, OAuthError, SmartAuth, TokenForm};

pub const TOKEN_PATH: &str = "/auth/token";
pub const SMART_CONFIGURATION_PATH: &str = "/.well-known/smart-configuration";
/// Largest `/auth/token` form body; larger ones get 413 before anything is decoded.
pub const TOKEN_BODY_LIMIT: usize = 64 * 1024;

/// The client address a request came from (a request extension the server sets on every
/// request of a connection: the peer's IPv4 address, or the `/64` of an IPv6 one). The token
/// endpoint keys its failure throttle by it beside the `iss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddress(pub IpAddr);

/// The authorization layer of a running server: cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<AuthInner>,
}

enum AuthInner {
    None,
    Smart(Box<SmartAuth>),
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Auth {
    /// Checks the settings (the loopback rule, the token lifetime, the clients file) and builds
    /// the layer. Every problem is reported here, at start.
    pub fn from_settings(
        settings: &AuthSettings,
        listen_addr: SocketAddr,
    ) -> Result<Auth, ConfigError> {
        check_mode(settings.mode, listen_addr, settings.insecure)?;
        settings.check()?;
        match settings.mode {
            AuthMode::None => {
                if !listen_addr.ip().to_canonical().is_loopback() {
                    tracing::warn!(%listen_addr, "serving WITHOUT authorization on a non-loopback address (--insecure)");
                }
                Ok(Auth::none())
            }
            AuthMode::Smart => {
                let path = settings
                    .clients_file
                    .as_ref()
                    .ok_or(ConfigError::ClientsFileMissing)?;
                let registry = ClientRegistry::load(path)?;
                if let Some(host) = plain_http_public_host(&settings.base_url) {
                    tracing::warn!(
                        base_url = %settings.base_url,
                        host,
                        "SMART authorization over plain HTTP on a non-loopback address: client assertions and access tokens travel in clear; put TLS in front (a reverse proxy) and use an https base URL"
                    );
                }
                tracing::info!(clients = registry.len(), token_url = %settings.token_url(), "SMART Backend Services authorization enabled");
                let iss = settings.base_url.trim_end_matches('/').to_owned();
                let key = settings.token_key()?;
                let issuer = match &key {
                    Some(key) => TokenIssuer::with_key(iss, settings.token_lifetime, key),
                    None => TokenIssuer::new(iss, settings.token_lifetime),
                };
                let mut smart = SmartAuth::new(
                    registry,
                    issuer,
                    settings.token_url(),
                    settings.replay_capacity,
                );
                smart.key_configured = key.is_some();
                Ok(Auth::smart(smart))
            }
        }
    }

    /// Mode `none`: every request gets an all-allowing context.
    pub fn none() -> Auth {
        Auth {
            inner: Arc::new(AuthInner::None),
        }
    }

    pub fn smart(smart: SmartAuth) -> Auth {
        Auth {
            inner: Arc::new(AuthInner::Smart(Box::new(smart))),
        }
    }

    pub fn mode(&self) -> AuthMode {
        match *self.inner {
            AuthInner::None => AuthMode::None,
            AuthInner::Smart(_) => AuthMode::Smart,
        }
    }

    /// Whether downloads need a bearer token (the manifest's `requiresAccessToken`).
    pub fn requires_access_token(&self) -> bool {
        self.mode() == AuthMode::Smart
    }

    /// Mode `smart` on a database several nodes share: the shared signing key and replay cache
    /// ([`SmartAuth::share`]). Call before the routes are built (blocks on `shared`). Mode
    /// `none` is unchanged.
    pub fn share(
        self,
        shared: Arc<dyn crate::SharedAuthState>,
    ) -> Result<Auth, crate::SharedStateError> {
        let mut inner = Arc::try_unwrap(self.inner).map_err(|_| {
            crate::SharedStateError("the authorization state is already in use".into())
        })?;
        if let AuthInner::Smart(smart) = &mut inner {
            smart.share(shared)?;
        }
        Ok(Auth {
            inner: Arc::new(inner),
        })
    }

    /// Mode `smart` on a database one process uses: accepted assertions are recorded in
    /// `record` so that a restart does not forget them ([`SmartAuth::record_assertions_in`]).
    /// Call before the routes are built. Mode `none` is unchanged.
    pub fn record_assertions_in(
        self,
        record: Arc<dyn crate::ReplayRecord>,
    ) -> Result<Auth, crate::SharedStateError> {
        let mut inner = Arc::try_unwrap(self.inner).map_err(|_| {
            crate::SharedStateError("the authorization state is already in use".into())
        })?;
        if let AuthInner::Smart(smart) = &mut inner {
            smart.record_assertions_in(record);
        }
        Ok(Auth {
            inner: Arc::new(inner),
        })
    }

    pub fn smart_auth(&self) -> Option<&SmartAuth> {
        match &*self.inner {
            AuthInner::Smart(s) => Some(s),
            AuthInner::None => None,
        }
    }

    /// `POST /auth/token` and `GET /.well-known/smart-configuration`, in mode `smart`; no routes
    /// in mode `none` (there is nothing to discover).
    pub fn routes<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        if self.smart_auth().is_none() {
            return Router::new();
        }
        let for_token = self.clone();
        let for_config = self.clone();
        Router::new()
            .route(
                TOKEN_PATH,
                post(
                    move |from: Option<axum::Extension<ClientAddress>>,
                          form: Result<axum::Form<TokenForm>, FormRejection>| {
                        let auth = for_token.clone();
                        async move { auth.token_handler(from.map(|f| f.0.0), form).await }
                    },
                )
                // Bounded before the form is decoded, whatever the server's body limit.
                .layer(DefaultBodyLimit::max(TOKEN_BODY_LIMIT)),
            )
            .route(
                SMART_CONFIGURATION_PATH,
                get(move || {
                    let auth = for_config.clone();
                    async move { auth.smart_configuration() }
                }),
            )
    }

    async fn token_handler(
        &self,
        from: Option<IpAddr>,
        form: Result<axum::Form<TokenForm>, FormRejection>,
    ) -> Response {
        let Some(smart) = self.smart_auth() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let result = match form {
            Ok(axum::Form(form)) => smart.token_from(&form, unix_now(), from).await,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                let e = OAuthError {
                    error: crate::token_endpoint::OAuthErrorCode::InvalidRequest,
                    description: format!(
                        "the token request body exceeds {} KiB",
                        TOKEN_BODY_LIMIT / 1024
                    ),
                };
                tracing::warn!(error = ?e.error, "token request refused: body too large");
                let status = StatusCode::PAYLOAD_TOO_LARGE;
                return no_store((status, axum::Json(e)).into_response());
            }
            Err(_) => Err(OAuthError {
                error: crate::token_endpoint::OAuthErrorCode::InvalidRequest,
                description:
                    "the body must be application/x-www-form-urlencoded, each parameter once"
                        .to_owned(),
            }),
        };
        match result {
            Ok(body) => no_store(axum::Json(body).into_response()),
            Err(e) => {
                tracing::warn!(error = ?e.error, description = %crate::log_safe(&e.description), "token request refused");
                oauth_error_response(&e)
            }
        }
    }

    /// The discovery document.
    pub fn smart_configuration(&self) -> Response {
        let Some(smart) = self.smart_auth() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let doc = serde_json::json!({
            "token_endpoint": smart.token_url(),
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ACCEPTED_ALGORITHMS,
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": [
                "system/*.rs", "system/*.cruds", "system/*.read", "system/*.write", "system/*.*"
            ],
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        });
        axum::Json(doc).into_response()
    }

    /// The `rest[0].security` element of the CapabilityStatement: SMART-on-FHIR with the token
    /// endpoint (mode `smart`), or `None` (mode `none`).
    pub fn capability_security(&self) -> Option<serde_json::Value> {
        let smart = self.smart_auth()?;
        Some(serde_json::json!({
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": smart.token_url()}]
            }],
            "description": "SMART Backend Services: see /.well-known/smart-configuration"
        }))
    }

    /// Wraps `router` so that every request needs a valid bearer token (mode `smart`) and
    /// carries an [`AuthContext`] in its extensions.
    pub fn protect<S: Clone + Send + Sync + 'static>(&self, router: Router<S>) -> Router<S> {
        router.layer(axum::middleware::from_fn_with_state(
            self.clone(),
            require_bearer,
        ))
    }

    /// Resolves the request's `Authorization` headers into a context. More than one is refused
    /// (mode `smart`): which of them a server, a proxy or a cache in front of it would honour is
    /// ambiguous, and the first one used to win.
    pub fn authenticate_headers(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<AuthContext, AuthRejection> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let first = values.next();
        if self.smart_auth().is_some() && values.next().is_some() {
            return Err(AuthRejection::AmbiguousCredentials);
        }
        self.authenticate(first)
    }

    /// Resolves one `Authorization` header value (if any) into a context. A request's headers
    /// go through [`Auth::authenticate_headers`], which refuses several.
    pub fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<AuthContext, AuthRejection> {
        let smart = match &*self.inner {
            AuthInner::None => return Ok(AuthContext::unrestricted()),
            AuthInner::Smart(s) => s,
        };
        let Some(value) = authorization else {
            return Err(AuthRejection::MissingToken);
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthRejection::InvalidToken(
                "the Authorization header must be `Bearer <access token>`",
            ))?;
        let verified = smart
            .verify_access_token(token, unix_now())
            .map_err(|e| AuthRejection::InvalidToken(e.reason()))?;
        Ok(AuthContext {
            client_id: Some(verified.client_id),
            scopes: verified.scopes,
            key_sets: verified.key_sets,
        })
    }
}

/// The host of a plain `http://` base URL when it is not a loopback name or address: tokens
/// sent there travel in clear.
pub fn plain_http_public_host(base_url: &str) -> Option<String> {
    let rest = base_url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback());
    (!loopback).then(|| host.to_owned())
}

/// The middleware behind [`Auth::protect`].
pub async fn require_bearer(
    axum::extract::State(auth): axum::extract::State<Auth>,
    mut request: Request,
    next: Next,
) -> Response {
    match auth.authenticate_headers(request.headers()) {
        Ok(ctx) => {
            request.extensions_mut().insert(ctx);
            next.run(request).await
        }
        Err(rejection) => {
            tracing::debug!(reason = %rejection, path = %crate::log_safe(request.uri().path()), "request without a valid bearer token");
            rejection.into_response()
        }
    }
}

/// Who is calling and what they may do; in request extensions after [`Auth::protect`].
#[derive(Debug, Clone)]
pub struct AuthContext {
    /// `None` in mode `none`.
    pub client_id: Option<String>,
    pub scopes: Scopes,
    /// The stored de-identification key sets the caller may use (every one in mode `none`).
    pub key_sets: KeySets,
}

impl AuthContext {
    /// The context of mode `none`.
    pub fn unrestricted() -> AuthContext {
        AuthContext {
            client_id: None,
            scopes: Scopes::unrestricted(),
            key_sets: KeySets::All,
        }
    }

    pub fn require(&self, resource_type: &str, p: Permission) -> Result<(), AuthRejection> {
        if self.scopes.allows(resource_type, p) {
            Ok(())
        } else {
            Err(AuthRejection::Forbidden(format!(
                "the granted scopes do not allow `{}` on {resource_type}",
                p.letter()
            )))
        }
    }

    /// Read, vread, instance history: `r`.
    pub fn require_read(&self, resource_type: &str) -> Result<(), AuthRejection> {
        self.require(resource_type, Permission::Read)
    }

    /// Search (type and system history need it too): `s`.
    pub fn require_search(&self, resource_type: &str) -> Result<(), AuthRejection> {
        self.require(resource_type, Permission::Search)
    }

    /// A system-level interaction (system `_history`, a Bundle entry without a type) lists every
    /// type the server stores: each permission of `needs` on every one of them, `ViewDefinition`
    /// included ([`Scopes::allows_on_every_type`]).
    pub fn require_on_every_type(
        &self,
        needs: &[Permission],
        interaction: &str,
    ) -> Result<(), AuthRejection> {
        if needs.iter().all(|p| self.scopes.allows_on_every_type(*p)) {
            return Ok(());
        }
        let letters: String = needs.iter().map(|p| p.letter()).collect();
        Err(AuthRejection::Forbidden(format!(
            "{interaction} needs `{letters}` on every resource type (ViewDefinition included)"
        )))
    }

    /// v1 `write`: create, update and delete. Prefer [`AuthContext::require`] with the exact
    /// permission when the interaction is known.
    pub fn require_write(&self, resource_type: &str) -> Result<(), AuthRejection> {
        if self.scopes.can_write(resource_type) {
            Ok(())
        } else {
            Err(AuthRejection::Forbidden(format!(
                "the granted scopes do not allow writing {resource_type}"
            )))
        }
    }

    /// Whether this caller may see a job started by `owner` (the client_id recorded at kick-off).
    /// The all-allowing context of mode `none` sees every job.
    pub fn owns(&self, owner: Option<&str>) -> bool {
        self.scopes.is_unrestricted() || self.client_id.as_deref() == owner
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuthContext {
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Without the layer there is no context: refuse rather than allow.
        parts
            .extensions
            .get::<AuthContext>()
            .cloned()
            .ok_or(AuthRejection::MissingToken)
    }
}

/// Why a request was refused: 401 (no or bad token), 400 (more than one `Authorization`
/// header) or 403 (scopes fall short).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRejection {
    #[error("no bearer token")]
    MissingToken,
    #[error("the request has more than one Authorization header; send exactly one bearer token")]
    AmbiguousCredentials,
    #[error("{0}")]
    InvalidToken(&'static str),
    #[error("{0}")]
    Forbidden(String),
}

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        let (status, code, text, challenge) = match &self {
            AuthRejection::MissingToken => (
                StatusCode::UNAUTHORIZED,
                "login",
                "a bearer access token is required (see /.well-known/smart-configuration)"
                    .to_owned(),
                r#"Bearer realm="fhirhose""#.to_owned(),
            ),
            AuthRejection::InvalidToken(reason) => (
                StatusCode::UNAUTHORIZED,
                "login",
                (*reason).to_owned(),
                format!(
                    r#"Bearer realm="fhirhose", error="invalid_token", error_description="{reason}""#
                ),
            ),
            // RFC 6750 §3.1: a malformed request (here: two sets of credentials) is 400
            // `invalid_request`.
            AuthRejection::AmbiguousCredentials => (
                StatusCode::BAD_REQUEST,
                "invalid",
                self.to_string(),
                format!(
                    r#"Bearer realm="fhirhose", error="invalid_request", error_description="{self}""#
                ),
            ),
            AuthRejection::Forbidden(reason) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                reason.clone(),
                r#"Bearer realm="fhirhose", error="insufficient_scope""#.to_owned(),
            ),
        };
        let body = serde_json::json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            headers.insert(header::WWW_AUTHENTICATE, v);
        }
        response
    }
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn oauth_error_response(e: &OAuthError) -> Response {
    let status = StatusCode::from_u16(e.error.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = no_store((status, axum::Json(e)).into_response());
    if let Some(secs) = e.error.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
