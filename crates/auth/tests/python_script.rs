//! `scripts/smart-token.py` (the README's client recipe) interoperates with the server side:
//! its JWKS registers, its kid matches ours, its RS384 / ES384 / ES256 assertions are accepted.
//! Skipped (with a note on stderr) where `python3` with the `cryptography` package is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use auth::{ClientRegistry, SmartAuth, TokenIssuer};
use common::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/smart-token.py")
}

fn key_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn python(args: &[&str]) -> Option<String> {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named") {
            return None;
        }
        panic!("smart-token.py {args:?} failed: {err}");
    }
    Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
}

#[tokio::test]
async fn script_jwks_and_assertions_are_accepted() {
    let keys = ["rsa-a.pem", "ec-p384.pem", "ec-p256.pem"];
    let paths: Vec<String> = keys
        .iter()
        .map(|k| key_path(k).display().to_string())
        .collect();
    let mut args = vec!["jwks"];
    args.extend(paths.iter().map(String::as_str));
    let Some(jwks) = python(&args) else {
        eprintln!("skipped: python3 with the `cryptography` package is not available");
        return;
    };
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    // Same kid (RFC 7638 thumbprint) as the Rust helper computes.
    let ours = auth::ClientKey::from_pem(&pem("ec-p384.pem"), None, None).unwrap();
    assert_eq!(jwks["keys"][1]["kid"], serde_json::json!(ours.kid));
    assert_eq!(jwks["keys"][1], ours.public_jwk().unwrap());

    let registry = ClientRegistry::from_json(
        &serde_json::json!([{"client_id": "py", "jwks": jwks, "scope": "system/*.rs"}]).to_string(),
        Path::new("clients.json"),
    )
    .unwrap();
    let smart = SmartAuth::new(
        registry,
        TokenIssuer::new(BASE_URL.into(), Duration::from_secs(300)),
        TOKEN_URL.into(),
        100,
    );
    for path in &paths {
        let a = python(&[
            "assertion",
            "--client-id",
            "py",
            "--key",
            path,
            "--token-url",
            TOKEN_URL,
        ])
        .unwrap();
        let res = smart.token(&form(&a, "system/Patient.rs"), now()).await;
        assert!(res.is_ok(), "{path}: {:?}", res.err());
    }
}
