//! Public keys from JWKs: which algorithms a key can verify ([`KeyKind`]) and a JWK turned into
//! a [`VerificationKey`]. Used by the clients file ([`crate::registry`]) and by JWKS fetched from
//! a client's URL ([`crate::jwks_fetch`]); it depends on neither.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Most entries a client's JWKS may hold (`keys`, usable or not), inline or fetched: each is
/// parsed, and kept for the life of the cache.
pub const MAX_JWKS_KEYS: usize = 100;
/// Keys one client assertion is checked against: exactly one, the key of the client's JWKS that
/// fits its `alg` (key type, curve, the JWK's own `alg`; signature keys only) and its `kid`, if
/// any. An assertion that leaves several candidates (no `kid` while several keys fit its `alg`,
/// or a `kid` several keys share) is refused — after one check against a decoy key, like every
/// other refusal before the signature ([`crate::token_endpoint`]) — rather than checked several
/// times: the work an unauthenticated request causes is one signature check, and does not tell
/// how many keys a client has. SMART Backend Services requires `kid` in the assertion header and
/// unique within the client's JWKS anyway.
pub const MAX_CANDIDATE_KEYS: usize = 1;

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
    /// RSA: the modulus length in bytes, which every signature of the key has.
    pub(crate) rsa_bytes: Option<usize>,
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

    /// Whether a signature of `len` bytes can be this key's. An RSA key refuses one of another
    /// length before any arithmetic, so a check against it would cost less than one against the
    /// decoy of that length and tell a registered client apart: the token endpoint checks such
    /// a signature against the decoy instead. (EC signatures of a wrong length are refused
    /// before any arithmetic by a registered key and a decoy alike.)
    pub(crate) fn fits_signature(&self, len: usize) -> bool {
        self.rsa_bytes.is_none_or(|n| n == len)
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
    let mut rsa_bytes = None;
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
            rsa_bytes = Some(n);
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
        rsa_bytes,
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
