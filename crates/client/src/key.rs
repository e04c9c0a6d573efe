//! The client's private key for SMART Backend Services: a PKCS#8 PEM file, or a private JWK
//! (a JWK object, or a JWKS holding one private key) as the SMART reference tools hand out. A
//! JWK is re-encoded as DER (PKCS#1 for RSA, PKCS#8 for EC) and loaded through the same
//! [`auth::ClientKey`] the `fhirhose token` helper signs with, so both sign identically.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

use crate::error::ClientError;

/// Loads `path` (PEM or private JWK/JWKS). `kid`/`alg` override the key's own.
pub fn load(
    path: &Path,
    kid: Option<String>,
    alg: Option<&str>,
) -> Result<auth::ClientKey, ClientError> {
    let fail = |reason: String| ClientError::Key {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let (pem, jwk_kid, jwk_alg) = if text.trim_start().starts_with('{') {
        let doc: Value = serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
        let jwk = match doc.get("keys").and_then(Value::as_array) {
            Some(keys) => keys
                .iter()
                .find(|k| k.get("d").is_some())
                .ok_or_else(|| fail("the JWKS holds no private key (no `d`)".to_owned()))?,
            None => &doc,
        };
        let (pem, k, a) = jwk_to_pem(jwk).map_err(fail)?;
        (pem, k, a)
    } else {
        (text.into_owned(), None, None)
    };
    let alg = match alg.map(str::to_owned).or(jwk_alg).as_deref() {
        None => None,
        Some("RS384") => Some(jsonwebtoken::Algorithm::RS384),
        Some("RS256") => Some(jsonwebtoken::Algorithm::RS256),
        Some("ES384") => Some(jsonwebtoken::Algorithm::ES384),
        Some("ES256") => Some(jsonwebtoken::Algorithm::ES256),
        Some(other) => {
            return Err(fail(format!(
                "algorithm {other} is not one of RS384, RS256, ES384, ES256"
            )));
        }
    };
    auth::ClientKey::from_pem(pem.as_bytes(), alg, kid.or(jwk_kid)).map_err(|e| fail(e.to_string()))
}

type Pem = (String, Option<String>, Option<String>);

/// A private JWK as PEM, with its `kid` and `alg` when it names them.
fn jwk_to_pem(jwk: &Value) -> Result<Pem, String> {
    let field = |name: &str| -> Result<Vec<u8>, String> {
        let s = jwk
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the JWK has no `{name}`"))?;
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| format!("the JWK's `{name}` is not base64url"))
    };
    let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
    let alg = jwk.get("alg").and_then(Value::as_str).map(str::to_owned);
    let (label, der) = match jwk.get("kty").and_then(Value::as_str) {
        Some("RSA") => {
            let mut body = der_uint(&[0]);
            for name in ["n", "e", "d", "p", "q", "dp", "dq", "qi"] {
                body.extend(der_uint(&field(name)?));
            }
            ("RSA PRIVATE KEY", der(0x30, &body))
        }
        Some("EC") => {
            let curve_oid: &[u8] = match jwk.get("crv").and_then(Value::as_str) {
                Some("P-256") => &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07],
                Some("P-384") => &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22],
                other => return Err(format!("EC curve {other:?} is not P-256 or P-384")),
            };
            let (d, x, y) = (field("d")?, field("x")?, field("y")?);
            let mut point = vec![0x00, 0x04];
            point.extend(&x);
            point.extend(&y);
            let mut ec = der_uint(&[1]);
            ec.extend(der(0x04, &d));
            ec.extend(der(0xA1, &der(0x03, &point)));
            let ec_private_key = der(0x30, &ec);
            let mut algorithm = vec![0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
            algorithm.extend(curve_oid);
            let mut body = der_uint(&[0]);
            body.extend(der(0x30, &algorithm));
            body.extend(der(0x04, &ec_private_key));
            ("PRIVATE KEY", der(0x30, &body))
        }
        other => return Err(format!("key type {other:?} is not RSA or EC")),
    };
    let b64 = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(chunk));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    Ok((pem, kid, alg))
}

/// A DER TLV.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend(content);
    out
}

/// A DER INTEGER holding the unsigned big-endian `bytes`.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend(trimmed);
    der(0x02, &content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    /// The JWK files hold the same keys as auth's PEM test keys (tests/data/PROVENANCE.md):
    /// loaded either way they publish the same public key and thumbprint.
    #[test]
    fn a_private_jwk_is_the_same_key_as_its_pem() {
        let auth_data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../auth/tests/data");
        for (jwk, pem) in [
            ("rsa-a.jwk.json", "rsa-a.pem"),
            ("ec-p384.jwks.json", "ec-p384.pem"),
        ] {
            let from_jwk = load(&data(jwk), None, None).unwrap();
            let from_pem = load(&auth_data.join(pem), None, None).unwrap();
            assert_eq!(
                from_jwk.public_jwk().unwrap(),
                from_pem.public_jwk().unwrap(),
                "{jwk}"
            );
            assert!(from_jwk.sign("c", "http://t", 0).is_ok());
        }
    }

    #[test]
    fn a_public_jwk_or_garbage_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pub.json");
        std::fs::write(&p, r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#).unwrap();
        let e = load(&p, None, None).unwrap_err().to_string();
        assert!(
            e.contains("pub.json") && e.contains("no private key"),
            "{e}"
        );
        std::fs::write(&p, "not a key").unwrap();
        let e = load(&p, None, None).unwrap_err().to_string();
        assert!(e.contains("PKCS#8"), "{e}");
    }
}
