//! Access tokens: HS256 JWTs signed with a random key made at process start, or with the key
//! the nodes sharing a database share ([`crate::shared`]).
//!
//! With a per-process key, tokens are only valid for this server process: a restart
//! invalidates every token, and clients simply ask for a new one (backend clients do that on
//! every expiry anyway). With the shared key every node accepts every node's tokens. Claims: `iss` (the server base URL), `sub` (the client_id), `scope`
//! (the granted scopes), `iat`, `exp`, `jti`.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::registry::KeySets;
use crate::scope::Scopes;

/// Why a bearer token was refused. The texts are fixed: they never echo the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum AccessTokenError {
    Malformed,
    BadSignature,
    Expired,
    BadScope,
    /// Signed with the right key, but for a client the clients file no longer lists.
    UnknownClient,
}

impl AccessTokenError {
    pub fn reason(self) -> &'static str {
        match self {
            AccessTokenError::Malformed => "the access token is malformed",
            AccessTokenError::BadSignature => {
                "the access token was not issued by this server (or before its last restart)"
            }
            AccessTokenError::Expired => "the access token has expired",
            AccessTokenError::BadScope => "the access token carries no usable scope",
            AccessTokenError::UnknownClient => "the access token's client is no longer registered",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    scope: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// A verified access token.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub client_id: String,
    pub scopes: Scopes,
    /// The key sets the client may use: none from the token itself; filled from the client's
    /// current registration ([`crate::SmartAuth::verify_access_token`]).
    pub key_sets: KeySets,
    pub expires_at: i64,
}

pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: String,
    lifetime: Duration,
}

impl TokenIssuer {
    /// A new issuer with a fresh random 256-bit key.
    pub fn new(issuer: String, lifetime: Duration) -> TokenIssuer {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        TokenIssuer {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            issuer,
            lifetime,
        }
    }

    /// An issuer signing with `key` (the key the nodes of a cluster share).
    pub fn with_key(issuer: String, lifetime: Duration, key: &[u8]) -> TokenIssuer {
        TokenIssuer {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            issuer,
            lifetime,
        }
    }

    /// The `iss` of the tokens (the server's base URL).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Issues a token for `client_id` with `scopes`, valid from `now` (unix seconds).
    pub fn issue(&self, client_id: &str, scopes: &Scopes, now: i64) -> Result<String, String> {
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: client_id.to_owned(),
            scope: scopes.render(),
            iat: now,
            exp: now.saturating_add(self.lifetime.as_secs() as i64),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| format!("cannot sign the access token: {e}"))
    }

    /// Verifies a bearer token at time `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, AccessTokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked below against `now`, without leeway: these tokens come from this
        // very process, so there is no clock skew to allow for.
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[&self.issuer]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidIssuer
                | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                    AccessTokenError::BadSignature
                }
                _ => AccessTokenError::Malformed,
            })?;
        let claims = data.claims;
        if claims.exp <= now {
            return Err(AccessTokenError::Expired);
        }
        let scopes = Scopes::parse(&claims.scope).map_err(|_| AccessTokenError::BadScope)?;
        Ok(VerifiedToken {
            client_id: claims.sub,
            scopes,
            key_sets: KeySets::none(),
            expires_at: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_expiry() {
        let issuer = TokenIssuer::new("http://x".into(), Duration::from_secs(300));
        let scopes = Scopes::parse("system/Patient.rs").unwrap();
        let t = issuer.issue("c1", &scopes, 1000).unwrap();
        let v = issuer.verify(&t, 1200).unwrap();
        assert_eq!(v.client_id, "c1");
        assert!(v.scopes.can_read("Patient"));
        assert_eq!(
            issuer.verify(&t, 1300).unwrap_err(),
            AccessTokenError::Expired
        );
        let other = TokenIssuer::new("http://x".into(), Duration::from_secs(300));
        assert_eq!(
            other.verify(&t, 1200).unwrap_err(),
            AccessTokenError::BadSignature
        );
        assert_eq!(
            issuer.verify("abc", 1200).unwrap_err(),
            AccessTokenError::Malformed
        );
    }
}
