//! SMART Backend Services in tests: the auth crate's test keys (`crates/auth/tests/data`, see
//! its PROVENANCE.md) and a server-side [`auth::Auth`] whose registered clients all hold one key.

use std::path::Path;
use std::time::Duration;

/// A test key of the auth crate (`rsa-a.pem`, `ec-p384.pem`, ...), without a pinned `alg` or
/// `kid`.
pub fn test_key(name: &str) -> auth::ClientKey {
    let path = key_path(name);
    let pem = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    auth::ClientKey::from_pem(&pem, None, None).expect("test key loads")
}

/// Where a test key of the auth crate is.
pub fn key_path(name: &str) -> std::path::PathBuf {
    crate::repo_root().join("crates/auth/tests/data").join(name)
}

/// `Auth` in SMART mode for a server at `base` (token endpoint `{base}/auth/token`, tokens of
/// 300 s, a replay cache of 1,000): each `(client_id, scope)` of `clients` is registered with
/// the public half of `key`.
pub fn auth(base: &str, key: &auth::ClientKey, clients: &[(&str, &str)]) -> auth::Auth {
    auth_registered(base, key, &registrations(clients))
}

/// The clients file entries (without keys) of `(client_id, scope)` pairs.
pub fn registrations(clients: &[(&str, &str)]) -> Vec<serde_json::Value> {
    clients
        .iter()
        .map(|(id, scope)| serde_json::json!({"client_id": id, "scope": scope}))
        .collect()
}

/// [`auth()`] with clients given as clients file entries without keys (`client_id`, `scope`,
/// `key_sets`, ...): each is registered with the public half of `key`.
pub fn auth_registered(
    base: &str,
    key: &auth::ClientKey,
    clients: &[serde_json::Value],
) -> auth::Auth {
    let jwks = auth::client_tools::jwks_document(std::slice::from_ref(key)).expect("jwks");
    let clients: Vec<serde_json::Value> = clients
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c["jwks"] = jwks.clone();
            c
        })
        .collect();
    let registry = auth::ClientRegistry::from_json(
        &serde_json::Value::Array(clients).to_string(),
        Path::new("clients.json"),
    )
    .expect("registry");
    auth::Auth::smart(auth::SmartAuth::new(
        registry,
        auth::TokenIssuer::new(base.to_owned(), Duration::from_secs(300)),
        token_url(base),
        1000,
    ))
}

/// The token endpoint of a server at `base`.
pub fn token_url(base: &str) -> String {
    format!("{base}/auth/token")
}

/// An access token for `client` with `scope` from the token endpoint at `token_url`, the
/// assertion signed with `key`.
pub async fn token(token_url: &str, client: &str, key: &auth::ClientKey, scope: &str) -> String {
    auth::client_tools::request_token(token_url, client, key, scope)
        .await
        .expect("token")
        .access_token
}

/// Sends a FHIR request as a SMART client would: `path` absolute (a URL from a header or a
/// manifest) or relative to `base`, `Prefer: respond-async`, the bearer token if any and a FHIR
/// JSON body if any. Returns the status, the headers and the body as text.
pub async fn send(
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, String) {
    let url = if path.starts_with("http") {
        path.to_owned()
    } else {
        format!("{base}{path}")
    };
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/fhir+json")
            .body(b.to_string());
    }
    let res = req.send().await.expect("send the request");
    let status = res.status();
    let headers = res.headers().clone();
    (status, headers, res.text().await.expect("read the body"))
}
