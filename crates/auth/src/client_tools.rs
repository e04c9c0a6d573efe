//! The client's side of SMART Backend Services, for the `fhirhose token` / `fhirhose jwks`
//! helpers and for tests: load a PEM private key, publish its public JWK, sign an assertion.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::token_endpoint::MAX_ASSERTION_LIFETIME_S;

#[derive(Debug, thiserror::Error)]
pub enum ClientKeyError {
    #[error(
        "the key is not a PKCS#8 PEM private key for RSA (≥ 2048 bits) or EC P-384 / P-256 \
         (make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out key.pem`)"
    )]
    UnsupportedKey,
    #[error("algorithm {0:?} does not fit this key")]
    AlgorithmMismatch(Algorithm),
    #[error("cannot sign the assertion")]
    Signing,
}

/// A private signing key with the algorithm it signs with.
pub struct ClientKey {
    key: EncodingKey,
    pub alg: Algorithm,
    pub kid: String,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
}

impl ClientKey {
    /// Loads a PEM private key. RSA keys sign with RS384 and EC keys with ES384 (P-384) or ES256
    /// (P-256) unless `alg` says otherwise. `kid` defaults to the key's RFC 7638 thumbprint.
    pub fn from_pem(
        pem: &[u8],
        alg: Option<Algorithm>,
        kid: Option<String>,
    ) -> Result<ClientKey, ClientKeyError> {
        let (key, candidates): (EncodingKey, &[Algorithm]) =
            if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
                (k, &[Algorithm::RS384, Algorithm::RS256])
            } else if let Ok(k) = EncodingKey::from_ec_pem(pem) {
                (k, &[Algorithm::ES384, Algorithm::ES256])
            } else {
                return Err(ClientKeyError::UnsupportedKey);
            };
        // The public JWK derivation fails when the key does not fit the algorithm (curve), so
        // it doubles as the check.
        let fits = |a: Algorithm| Jwk::from_encoding_key(&key, a).ok();
        let (alg, jwk) = match alg {
            Some(a) => (a, fits(a).ok_or(ClientKeyError::AlgorithmMismatch(a))?),
            None => candidates
                .iter()
                .find_map(|a| fits(*a).map(|j| (*a, j)))
                .ok_or(ClientKeyError::UnsupportedKey)?,
        };
        let kid = match kid {
            Some(k) => k,
            None => jwk
                .thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .map_err(|_| ClientKeyError::UnsupportedKey)?,
        };
        let client_key = ClientKey { key, alg, kid };
        // An RSA *public* key PEM also loads above; make sure this key can actually sign.
        client_key.sign("probe", "probe", 0)?;
        Ok(client_key)
    }

    /// The public JWK to register (`kty`, `kid`, `alg`, `use`, and the public parameters).
    pub fn public_jwk(&self) -> Result<serde_json::Value, ClientKeyError> {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.alg)
            .map_err(|_| ClientKeyError::AlgorithmMismatch(self.alg))?;
        jwk.common.key_id = Some(self.kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        serde_json::to_value(&jwk).map_err(|_| ClientKeyError::UnsupportedKey)
    }

    /// A client assertion for `client_id` at `token_url`, issued at `now` (unix seconds) and
    /// valid for the five minutes SMART allows.
    pub fn sign(
        &self,
        client_id: &str,
        token_url: &str,
        now: i64,
    ) -> Result<String, ClientKeyError> {
        self.sign_with_exp(client_id, token_url, now, now + MAX_ASSERTION_LIFETIME_S)
    }

    pub fn sign_with_exp(
        &self,
        client_id: &str,
        token_url: &str,
        now: i64,
        exp: i64,
    ) -> Result<String, ClientKeyError> {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".to_owned());
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: token_url,
            exp,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|_| ClientKeyError::Signing)
    }
}

/// A JWKS document (`{"keys": [...]}`) holding the public halves of `keys`, for the `jwks`
/// field of a clients file or for publishing at a `jwks_url`.
pub fn jwks_document(keys: &[ClientKey]) -> Result<serde_json::Value, ClientKeyError> {
    let keys = keys
        .iter()
        .map(ClientKey::public_jwk)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(serde_json::json!({ "keys": keys }))
}

/// Why [`request_token`] failed. Never includes the assertion.
#[derive(Debug, thiserror::Error)]
pub enum TokenRequestError {
    #[error(transparent)]
    Key(#[from] ClientKeyError),
    #[error("cannot reach the token endpoint {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("the token endpoint refused: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the token endpoint answered something that is not a token response")]
    BadResponse,
}

/// Signs an assertion for `client_id` and exchanges it at `token_url` for an access token.
pub async fn request_token(
    token_url: &str,
    client_id: &str,
    key: &ClientKey,
    scope: &str,
) -> Result<crate::token_endpoint::TokenResponse, TokenRequestError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let assertion = key.sign(client_id, token_url, now)?;
    let transport = |e: reqwest::Error| TokenRequestError::Transport {
        url: token_url.to_owned(),
        reason: if e.is_timeout() {
            "timed out".to_owned()
        } else if e.is_connect() {
            "cannot connect".to_owned()
        } else {
            "transport error".to_owned()
        },
    };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(transport)?;
    let response = client
        .post(token_url)
        .form(&[
            ("grant_type", crate::token_endpoint::GRANT_TYPE),
            (
                "client_assertion_type",
                crate::token_endpoint::CLIENT_ASSERTION_TYPE,
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", scope),
        ])
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    let body = response.text().await.map_err(transport)?;
    if !status.is_success() {
        return Err(TokenRequestError::Refused {
            status: status.as_u16(),
            body: body.chars().take(500).collect(),
        });
    }
    serde_json::from_str(&body).map_err(|_| TokenRequestError::BadResponse)
}
