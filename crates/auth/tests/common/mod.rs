//! Shared test fixtures: test keys (tests/data/*.pem), a registry, a SmartAuth.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth::{ClientKey, ClientRegistry, SmartAuth, TokenForm, TokenIssuer};
use jsonwebtoken::Algorithm;

pub const BASE_URL: &str = "http://127.0.0.1:8080/fhir";
pub const TOKEN_URL: &str = "http://127.0.0.1:8080/fhir/auth/token";

pub fn pem(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn key(name: &str, alg: Option<Algorithm>, kid: &str) -> ClientKey {
    ClientKey::from_pem(&pem(name), alg, Some(kid.to_owned())).expect("test key loads")
}

/// RS384 key of client `rsa-client`.
pub fn rsa_key() -> ClientKey {
    key("rsa-a.pem", None, "rsa-1")
}
/// ES384 key of client `ec-client`.
pub fn ec_key() -> ClientKey {
    key("ec-p384.pem", None, "ec-1")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Clients: `rsa-client` (system/*.rs, RSA key), `ec-client` (Patient and Observation read + v1
/// write on Observation, EC P-384 and P-256 keys), `limited` (system/Patient.rs only; the RSA
/// key without a pinned `alg`).
pub fn clients_json() -> String {
    // Deriving the JWKs costs RSA work, slow in debug builds: do it once per test binary.
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(make_clients_json).clone()
}

fn make_clients_json() -> String {
    let rsa = rsa_key().public_jwk().unwrap();
    let ec = ec_key().public_jwk().unwrap();
    let ec256 = key("ec-p256.pem", None, "ec-256").public_jwk().unwrap();
    // The same RSA key without a pinned `alg`, so it verifies RS256 as well as RS384.
    let mut rsa_any = rsa.clone();
    rsa_any.as_object_mut().unwrap().remove("alg");
    serde_json::json!([
        {"client_id": "rsa-client", "jwks": {"keys": [rsa]}, "scope": "system/*.rs"},
        {"client_id": "ec-client", "jwks": {"keys": [ec, ec256]},
         "scope": "system/Patient.read system/Observation.read system/Observation.write"},
        {"client_id": "limited", "jwks": {"keys": [rsa_any]}, "scope": "system/Patient.rs"},
    ])
    .to_string()
}

pub fn registry() -> ClientRegistry {
    ClientRegistry::from_json(&clients_json(), Path::new("clients.json")).expect("registry loads")
}

pub fn smart() -> SmartAuth {
    SmartAuth::new(
        registry(),
        TokenIssuer::new(BASE_URL.to_owned(), Duration::from_secs(300)),
        TOKEN_URL.to_owned(),
        1000,
    )
}

pub fn form(assertion: &str, scope: &str) -> TokenForm {
    TokenForm {
        grant_type: Some("client_credentials".to_owned()),
        client_assertion_type: Some(
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
        ),
        client_assertion: Some(assertion.to_owned()),
        scope: Some(scope.to_owned()),
        client_id: None,
    }
}

/// Signs arbitrary header and claims with a test key (for malformed assertions).
pub fn sign_raw(
    key_file: &str,
    alg: Algorithm,
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> String {
    let pem = pem(key_file);
    let enc = match alg {
        Algorithm::ES256 | Algorithm::ES384 => {
            jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap()
        }
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &enc).unwrap()
}

pub fn claims(client_id: &str, now: i64) -> serde_json::Value {
    serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": TOKEN_URL,
        "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string(),
    })
}
