//! Start-up checks: the loopback rule of mode `none`, settings, and the clients file.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use auth::{Auth, AuthMode, AuthSettings, ClientRegistry, ConfigError, RegistryError, check_mode};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn mode_none_only_on_loopback() {
    for ok in [
        "127.0.0.1:8080",
        "127.1.2.3:80",
        "[::1]:8080",
        "[::ffff:127.0.0.1]:8080",
    ] {
        check_mode(AuthMode::None, addr(ok), false).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "0.0.0.0:8080",
        "[::]:8080",
        "192.168.1.10:8080",
        "[2001:db8::1]:443",
    ] {
        let e = check_mode(AuthMode::None, addr(bad), false).expect_err(bad);
        assert!(matches!(e, ConfigError::UnprotectedPublicListener { .. }));
        assert!(e.to_string().contains("--insecure"), "{e}");
        // --insecure accepts the risk.
        check_mode(AuthMode::None, addr(bad), true).unwrap();
    }
}

#[test]
fn mode_smart_on_any_address() {
    check_mode(AuthMode::Smart, addr("0.0.0.0:8080"), false).unwrap();
    check_mode(AuthMode::Smart, addr("127.0.0.1:8080"), false).unwrap();
}

#[test]
fn from_settings_applies_the_rules() {
    let mut s = AuthSettings::new(AuthMode::None, "http://localhost:8080");
    assert!(matches!(
        Auth::from_settings(&s, addr("0.0.0.0:8080")),
        Err(ConfigError::UnprotectedPublicListener { .. })
    ));
    s.insecure = true;
    assert_eq!(
        Auth::from_settings(&s, addr("0.0.0.0:8080"))
            .unwrap()
            .mode(),
        AuthMode::None
    );

    let mut s = AuthSettings::new(AuthMode::Smart, "http://localhost:8080");
    assert!(matches!(
        Auth::from_settings(&s, addr("0.0.0.0:8080")),
        Err(ConfigError::ClientsFileMissing)
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clients.json");
    std::fs::write(&file, common::clients_json()).unwrap();
    s.clients_file = Some(file);
    let auth = Auth::from_settings(&s, addr("0.0.0.0:8080")).unwrap();
    assert_eq!(auth.mode(), AuthMode::Smart);
    assert_eq!(
        auth.smart_auth().unwrap().token_url(),
        "http://localhost:8080/auth/token"
    );

    s.token_lifetime = Duration::ZERO;
    assert!(matches!(
        Auth::from_settings(&s, addr("0.0.0.0:8080")),
        Err(ConfigError::TokenLifetime { .. })
    ));
    s.token_lifetime = Duration::from_secs(7200);
    assert!(matches!(
        Auth::from_settings(&s, addr("0.0.0.0:8080")),
        Err(ConfigError::TokenLifetime { .. })
    ));
    s.token_lifetime = Duration::from_secs(60);
    s.base_url = "localhost:8080".into();
    assert!(matches!(
        Auth::from_settings(&s, addr("0.0.0.0:8080")),
        Err(ConfigError::BaseUrl { .. })
    ));
}

fn load(json: &str) -> Result<ClientRegistry, RegistryError> {
    ClientRegistry::from_json(json, Path::new("clients.json"))
}

fn rsa_jwk() -> serde_json::Value {
    common::rsa_key().public_jwk().unwrap()
}

#[test]
fn registry_loads_inline_and_url_clients() {
    let r = load(
        &serde_json::json!([
            {"client_id": "a", "jwks": {"keys": [rsa_jwk()]}, "scope": "system/*.rs"},
            {"client_id": "b", "jwks_url": "https://client.example/jwks.json", "scope": "system/Patient.read"},
        ])
        .to_string(),
    )
    .unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r.get("b").unwrap().jwks_url(),
        Some("https://client.example/jwks.json")
    );
    assert!(r.get("a").unwrap().max_scope.can_export("Observation"));
    assert!(r.get("c").is_none());
}

#[test]
fn registry_errors_are_specific() {
    let jwk = rsa_jwk();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"client_id": "a"}), "JSON array"),
        (
            serde_json::json!([{"client_id": "", "jwks": {"keys": [jwk]}, "scope": "system/*.rs"}]),
            "empty",
        ),
        (
            serde_json::json!([
                {"client_id": "a", "jwks": {"keys": [jwk]}, "scope": "system/*.rs"},
                {"client_id": "a", "jwks": {"keys": [jwk]}, "scope": "system/*.rs"}
            ]),
            "twice",
        ),
        (
            serde_json::json!([{"client_id": "a", "scope": "system/*.rs"}]),
            "exactly one",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [jwk]}, "jwks_url": "https://x/j", "scope": "system/*.rs"}]),
            "exactly one",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [jwk]}, "scope": "patient/*.read"}]),
            "invalid scope",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [jwk]}, "scope": "system/Nope.rs"}]),
            "Nope",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": []}, "scope": "system/*.rs"}]),
            "no keys",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "scope": "system/*.rs"}]),
            "keys[0]",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [{"kty": "RSA", "kid": "x", "n": "AQAB", "e": "AQAB"}]}, "scope": "system/*.rs"}]),
            "2048",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [{"kty": "EC", "crv": "P-384", "x": "AQAB", "y": "AQAB"}]}, "scope": "system/*.rs"}]),
            "coordinates",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks_url": "http://client.example/jwks", "scope": "system/*.rs"}]),
            "https",
        ),
        (
            serde_json::json!([{"client_id": "a", "jwks": {"keys": [jwk]}, "scope": "system/*.rs", "scopes": "x"}]),
            "unknown field",
        ),
    ];
    for (json, needle) in cases {
        let e = load(&json.to_string())
            .err()
            .unwrap_or_else(|| panic!("{json} should be refused"));
        let msg = e.to_string();
        assert!(
            msg.contains(needle),
            "{json}: `{msg}` should mention `{needle}`"
        );
        assert!(msg.contains("clients.json"), "{msg}");
    }
}

#[test]
fn registry_skips_encryption_keys_but_needs_one_signing_key() {
    let mut enc = rsa_jwk();
    enc["use"] = serde_json::json!("enc");
    let json =
        serde_json::json!([{"client_id": "a", "jwks": {"keys": [enc]}, "scope": "system/*.rs"}]);
    assert!(matches!(
        load(&json.to_string()),
        Err(RegistryError::NoKeys { .. })
    ));
    let json = serde_json::json!([{"client_id": "a", "jwks": {"keys": [enc, rsa_jwk()]}, "scope": "system/*.rs"}]);
    load(&json.to_string()).unwrap();
}

/// An inline JWKS holds at most `MAX_JWKS_KEYS` keys, as a fetched one does.
#[test]
fn registry_refuses_a_jwks_of_more_keys_than_the_limit() {
    let at_limit = vec![rsa_jwk(); auth::MAX_JWKS_KEYS];
    let json =
        serde_json::json!([{"client_id": "a", "jwks": {"keys": at_limit}, "scope": "system/*.rs"}]);
    load(&json.to_string()).unwrap();
    let over = vec![rsa_jwk(); auth::MAX_JWKS_KEYS + 1];
    let json =
        serde_json::json!([{"client_id": "a", "jwks": {"keys": over}, "scope": "system/*.rs"}]);
    let e = load(&json.to_string()).err().unwrap();
    assert!(matches!(e, RegistryError::TooManyKeys { .. }), "{e}");
    assert!(e.to_string().contains("more than 100"), "{e}");
}

#[test]
fn missing_clients_file_is_reported() {
    let e = ClientRegistry::load(Path::new("/nonexistent/clients.json"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/clients.json"));
}

#[test]
fn jwks_subcommand_output_registers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let args = auth::cli::JwksArgs {
        keys: vec![dir.join("rsa-a.pem"), dir.join("ec-p384.pem")],
        kid: None,
    };
    let jwks: serde_json::Value =
        serde_json::from_str(&auth::cli::run_jwks(&args).unwrap()).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    assert_eq!(jwks["keys"][0]["alg"], "RS384");
    assert_eq!(jwks["keys"][1]["alg"], "ES384");
    assert!(jwks["keys"][0].get("d").is_none(), "no private part");
    assert!(jwks["keys"][1].get("d").is_none(), "no private part");
    load(
        &serde_json::json!([{"client_id": "a", "jwks": jwks, "scope": "system/*.rs"}]).to_string(),
    )
    .unwrap();
    let e = auth::cli::run_jwks(&auth::cli::JwksArgs {
        keys: vec![dir.join("nope.pem")],
        kid: None,
    })
    .unwrap_err();
    assert!(e.to_string().contains("nope.pem"));
}
