//! The registered clients: loaded once at start from a JSON file, checked strictly so that a
//! typo fails the start rather than a later token request.
//!
//! File format (a JSON array):
//! `[{"client_id": "…", "jwks": {"keys": […]}, "scope": "system/*.rs"}]`, or `"jwks_url"` in
//! place of `"jwks"`. `scope` is the most the client may ever be granted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::jwks_fetch::{JwksFetcher, JwksUrlSource};
use crate::scope::{ScopeError, Scopes};

/// A problem in the clients file. Each names the file and the client (by index and id).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the clients file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the clients file {path} is not a JSON array of {{client_id, jwks | jwks_url, scope}}: {message}"
    )]
    Syntax { path: PathBuf, message: String },
    #[error("clients file {path}, client #{index}: `client_id` is empty")]
    EmptyClientId { path: PathBuf, index: usize },
    #[error("clients file {path}: client_id `{client_id}` is registered twice")]
    DuplicateClientId { path: PathBuf, client_id: String },
    #[error("clients file {path}, client `{client_id}`: give exactly one of `jwks` and `jwks_url`")]
    KeySourceChoice { path: PathBuf, client_id: String },
    #[error("clients file {path}, client `{client_id}`: invalid scope: {source}")]
    Scope {
        path: PathBuf,
        client_id: String,
        #[source]
        source: ScopeError,
    },
    #[error(
        "clients file {path}, client `{client_id}`: `jwks.keys[{index}]` is not usable: {reason}"
    )]
    Key {
        path: PathBuf,
        client_id: String,
        index: usize,
        reason: String,
    },
    #[error("clients file {path}, client `{client_id}`: `jwks` has no keys")]
    NoKeys { path: PathBuf, client_id: String },
    #[error("clients file {path}, client `{client_id}`: `jwks_url` {reason}")]
    JwksUrl {
        path: PathBuf,
        client_id: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    client_id: String,
    #[serde(default)]
    jwks: Option<JwksEntry>,
    #[serde(default)]
    jwks_url: Option<String>,
    scope: String,
}

#[derive(Deserialize)]
struct JwksEntry {
    keys: Vec<serde_json::Value>,
}

/// The kind of public key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
}

impl KeyKind {
    pub fn fits(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (KeyKind::Rsa, Algorithm::RS256 | Algorithm::RS384)
                | (KeyKind::EcP256, Algorithm::ES256)
                | (KeyKind::EcP384, Algorithm::ES384)
        )
    }
}

/// A public key from a client's JWKS, ready to verify signatures.
#[derive(Clone)]
pub struct VerificationKey {
    pub kid: Option<String>,
    /// The JWK's own `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub(crate) decoding: DecodingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Public keys are not secret, but there is no reason to print key material either.
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// Whether this key may verify a signature made with `alg`.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Turns one JWK (as JSON) into a verification key. `Ok(None)` for keys that are not signature
/// keys (`"use": "enc"`, or `key_ops` without `verify`), which a JWKS may legitimately hold.
pub(crate) fn parse_jwk(value: &serde_json::Value) -> Result<Option<VerificationKey>, String> {
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| {
        format!("not a JWK ({e}); RSA keys need kty, n, e; EC keys need kty, crv, x, y")
    })?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops
            .iter()
            .any(|op| matches!(op, jsonwebtoken::jwk::KeyOperations::Verify))
    {
        return Ok(None);
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::RS384) => Some(Algorithm::RS384),
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(KeyAlgorithm::ES384) => Some(Algorithm::ES384),
        Some(other) => {
            return Err(format!(
                "`alg` {other} is not accepted (RS384, ES384, RS256, ES256)"
            ));
        }
    };
    let (kind, decoding) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = b64url_int_len(&p.n).ok_or("`n` is not base64url")?;
            if n < 256 {
                return Err(format!(
                    "RSA modulus is {} bits; at least 2048 are required",
                    n * 8
                ));
            }
            let key = DecodingKey::from_rsa_components(&p.n, &p.e)
                .map_err(|_| "RSA `n`/`e` are not valid base64url".to_owned())?;
            (KeyKind::Rsa, key)
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (kind, size) = match p.curve {
                EllipticCurve::P256 => (KeyKind::EcP256, 32),
                EllipticCurve::P384 => (KeyKind::EcP384, 48),
                _ => return Err("EC keys must use curve P-384 or P-256".to_owned()),
            };
            if b64url_len(&p.x) != Some(size) || b64url_len(&p.y) != Some(size) {
                return Err(format!(
                    "EC `x`/`y` must be {size}-byte base64url coordinates"
                ));
            }
            let key = DecodingKey::from_ec_components(&p.x, &p.y)
                .map_err(|_| "EC `x`/`y` are not valid base64url".to_owned())?;
            (kind, key)
        }
        _ => return Err("only RSA and EC (P-384, P-256) public keys are accepted".to_owned()),
    };
    if let Some(a) = alg
        && !kind.fits(a)
    {
        return Err(format!("`alg` {a:?} does not fit the key type"));
    }
    Ok(Some(VerificationKey {
        kid: jwk.common.key_id.clone(),
        alg,
        kind,
        decoding,
    }))
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

/// The length in bytes of a base64url big-endian integer, leading zero bytes not counted.
fn b64url_int_len(s: &str) -> Option<usize> {
    b64url_decode(s).map(|b| b.iter().skip_while(|x| **x == 0).count())
}

fn b64url_len(s: &str) -> Option<usize> {
    b64url_decode(s).map(|b| b.len())
}

/// Where a client's keys come from.
pub(crate) enum KeySource {
    Inline(Vec<VerificationKey>),
    Url(JwksUrlSource),
}

/// One registered client.
pub struct RegisteredClient {
    pub client_id: String,
    /// The most this client may be granted.
    pub max_scope: Scopes,
    pub(crate) keys: KeySource,
}

impl RegisteredClient {
    /// The registered JWKS URL, if the client registered one.
    pub fn jwks_url(&self) -> Option<&str> {
        match &self.keys {
            KeySource::Url(u) => Some(u.url().as_str()),
            KeySource::Inline(_) => None,
        }
    }
}

/// All registered clients, by `client_id`.
pub struct ClientRegistry {
    clients: HashMap<String, Arc<RegisteredClient>>,
    pub(crate) fetcher: JwksFetcher,
}

impl ClientRegistry {
    /// Loads and checks the clients file.
    pub fn load(path: &Path) -> Result<ClientRegistry, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the clients file's text; `path` is used in messages only.
    pub fn from_json(text: &str, path: &Path) -> Result<ClientRegistry, RegistryError> {
        let entries: Vec<ClientEntry> =
            serde_json::from_str(text).map_err(|e| RegistryError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let fetcher = JwksFetcher::new();
        let mut clients = HashMap::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let p = || path.to_owned();
            if entry.client_id.trim().is_empty() {
                return Err(RegistryError::EmptyClientId { path: p(), index });
            }
            let client_id = entry.client_id;
            let max_scope = Scopes::parse(&entry.scope).map_err(|source| RegistryError::Scope {
                path: p(),
                client_id: client_id.clone(),
                source,
            })?;
            let keys = match (entry.jwks, entry.jwks_url) {
                (Some(jwks), None) => {
                    let mut keys = Vec::new();
                    for (i, k) in jwks.keys.iter().enumerate() {
                        match parse_jwk(k) {
                            Ok(Some(key)) => keys.push(key),
                            Ok(None) => {}
                            Err(reason) => {
                                return Err(RegistryError::Key {
                                    path: p(),
                                    client_id,
                                    index: i,
                                    reason,
                                });
                            }
                        }
                    }
                    if keys.is_empty() {
                        return Err(RegistryError::NoKeys {
                            path: p(),
                            client_id,
                        });
                    }
                    KeySource::Inline(keys)
                }
                (None, Some(url)) => {
                    let source =
                        JwksUrlSource::new(&url).map_err(|reason| RegistryError::JwksUrl {
                            path: p(),
                            client_id: client_id.clone(),
                            reason,
                        })?;
                    KeySource::Url(source)
                }
                _ => {
                    return Err(RegistryError::KeySourceChoice {
                        path: p(),
                        client_id,
                    });
                }
            };
            if clients.contains_key(&client_id) {
                return Err(RegistryError::DuplicateClientId {
                    path: p(),
                    client_id,
                });
            }
            let client = RegisteredClient {
                client_id: client_id.clone(),
                max_scope,
                keys,
            };
            clients.insert(client_id, Arc::new(client));
        }
        Ok(ClientRegistry { clients, fetcher })
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<RegisteredClient>> {
        self.clients.get(client_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn client_ids(&self) -> impl Iterator<Item = &str> {
        self.clients.keys().map(String::as_str)
    }
}
