//! SMART Backend Services authorization for Fhirhose.
//!
//! - [`registry`]: the registered clients (`--clients FILE`), their JWKS (inline or by URL).
//! - [`scope`]: SMART v1/v2 `system/` scopes and what they allow.
//! - [`token_endpoint`]: `POST /auth/token` (client-credentials grant with a JWT assertion);
//!   [`assertion_guard`]: the decoy keys, the per-`iss` throttle and the bound on concurrent
//!   signature checks that keep its refusals uniform and its unauthenticated work bounded.
//! - [`access_token`]: the bearer tokens this server issues (HS256, per-process key, or a key
//!   shared by the nodes of a cluster through [`shared`]).
//! - [`shared`]: [`SharedAuthState`], the signing key and replay cache several nodes share.
//! - [`http`]: axum routes, the bearer middleware and [`AuthContext`] for handlers.
//! - [`log_safe`](mod@log_safe): client-supplied text made fit for a log line.
//! - [`config`]: `--auth none|smart`, the loopback rule ([`check_mode`]).
//! - [`client_tools`]: the client side (sign an assertion, publish a JWK); [`cli`]: the
//!   `fhirhose jwks` / `fhirhose token` subcommands built on it.
//!
//! Architecture Invariant: no access token, client assertion or key material is ever written to
//! a log line or to an error's `Display`; types holding them redact their `Debug`.

pub mod access_token;
pub mod assertion_guard;
pub mod cli;
pub mod client_tools;
pub mod config;
pub mod http;
mod jwk;
mod jwks_fetch;
pub mod log_safe;
pub mod registry;
pub mod replay;
pub mod scope;
pub mod shared;
pub mod token_endpoint;

pub use access_token::{AccessTokenError, TokenIssuer};
pub use client_tools::{ClientKey, ClientKeyError};
pub use config::{AuthMode, AuthSettings, ConfigError, DEFAULT_TOKEN_LIFETIME, check_mode};
pub use http::{
    Auth, AuthContext, AuthRejection, ClientAddress, SMART_CONFIGURATION_PATH, TOKEN_PATH,
};
pub use jwk::{MAX_CANDIDATE_KEYS, MAX_JWKS_KEYS};
pub use jwks_fetch::JwksFetchError;
pub use log_safe::log_safe;
pub use registry::{ClientRegistry, KeySets, RegistryError};
pub use scope::{PermSet, Permission, ScopeError, Scopes};
pub use shared::{ReplayRecord, SharedAuthState, SharedStateError};
pub use token_endpoint::{OAuthError, OAuthErrorCode, SmartAuth, TokenForm, TokenResponse};
