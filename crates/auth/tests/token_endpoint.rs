//! Every refusal of `POST /auth/token`, and the successful grants, at the logic level.

mod common;

use auth::{OAuthErrorCode, TokenForm};
use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

async fn refused(form: &TokenForm, now: i64) -> (OAuthErrorCode, String) {
    let e = smart()
        .token(form, now)
        .await
        .expect_err("the request must be refused");
    (e.error, e.description)
}

fn assert_code(got: (OAuthErrorCode, String), want: OAuthErrorCode, needle: &str) {
    assert_eq!(got.0, want, "description: {}", got.1);
    assert!(
        got.1.contains(needle),
        "description `{}` should mention `{needle}`",
        got.1
    );
}

#[tokio::test]
async fn rs384_grant_succeeds() {
    let t = now();
    let assertion = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let res = smart()
        .token(&form(&assertion, "system/*.rs"), t)
        .await
        .unwrap();
    assert_eq!(res.token_type, "bearer");
    assert_eq!(res.expires_in, 300);
    assert_eq!(res.scope, "system/*.rs");
    assert!(!res.access_token.is_empty());
}

#[tokio::test]
async fn es384_and_es256_and_rs256_grants_succeed() {
    let t = now();
    let s = smart();
    let a = ec_key().sign("ec-client", TOKEN_URL, t).unwrap();
    assert_eq!(ec_key().alg, Algorithm::ES384);
    let res = s.token(&form(&a, "system/Patient.read"), t).await.unwrap();
    assert_eq!(res.scope, "system/Patient.read");

    let k256 = key("ec-p256.pem", None, "ec-256");
    assert_eq!(k256.alg, Algorithm::ES256);
    let a = k256.sign("ec-client", TOKEN_URL, t).unwrap();
    s.token(&form(&a, "system/Patient.rs"), t).await.unwrap();

    let rs256 = key("rsa-a.pem", Some(Algorithm::RS256), "rsa-1");
    let a = rs256.sign("limited", TOKEN_URL, t).unwrap();
    s.token(&form(&a, "system/Patient.rs"), t).await.unwrap();
    // rsa-client's JWK pins RS384, so the same key may not be used with RS256 there.
    let a = rs256.sign("rsa-client", TOKEN_URL, t).unwrap();
    let e = s
        .token(&form(&a, "system/Patient.rs"), t)
        .await
        .unwrap_err();
    assert_eq!(e.error, OAuthErrorCode::InvalidClient);
}

#[tokio::test]
async fn kid_is_optional() {
    let t = now();
    let a = sign_raw(
        "rsa-a.pem",
        Algorithm::RS384,
        None,
        &claims("rsa-client", t),
    );
    smart().token(&form(&a, "system/*.rs"), t).await.unwrap();
}

#[tokio::test]
async fn missing_grant_type() {
    let t = now();
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let mut f = form(&a, "system/*.rs");
    f.grant_type = None;
    assert_code(
        refused(&f, t).await,
        OAuthErrorCode::InvalidRequest,
        "grant_type",
    );
}

#[tokio::test]
async fn wrong_grant_type() {
    let t = now();
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let mut f = form(&a, "system/*.rs");
    f.grant_type = Some("authorization_code".into());
    assert_code(
        refused(&f, t).await,
        OAuthErrorCode::UnsupportedGrantType,
        "client_credentials",
    );
}

#[tokio::test]
async fn missing_or_wrong_client_assertion_type() {
    let t = now();
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let mut f = form(&a, "system/*.rs");
    f.client_assertion_type = None;
    assert_code(
        refused(&f, t).await,
        OAuthErrorCode::InvalidRequest,
        "client_assertion_type",
    );
    f.client_assertion_type =
        Some("urn:ietf:params:oauth:client-assertion-type:saml2-bearer".into());
    assert_code(
        refused(&f, t).await,
        OAuthErrorCode::InvalidRequest,
        "client_assertion_type",
    );
}

#[tokio::test]
async fn missing_client_assertion() {
    let mut f = form("", "system/*.rs");
    assert_code(
        refused(&f, now()).await,
        OAuthErrorCode::InvalidRequest,
        "client_assertion",
    );
    f.client_assertion = None;
    assert_code(
        refused(&f, now()).await,
        OAuthErrorCode::InvalidRequest,
        "client_assertion",
    );
}

#[tokio::test]
async fn missing_scope() {
    let t = now();
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let mut f = form(&a, "system/*.rs");
    f.scope = None;
    assert_code(refused(&f, t).await, OAuthErrorCode::InvalidScope, "scope");
    f.scope = Some(String::new());
    assert_code(refused(&f, t).await, OAuthErrorCode::InvalidScope, "scope");
}

#[tokio::test]
async fn malformed_scope_is_invalid_scope() {
    let t = now();
    for bad in [
        "patient/*.read",
        "user/Patient.rs",
        "system/Patient.sr",
        "system/Patient.delete",
        "system/NotAType.rs",
        "system/Observation.rs?category=laboratory",
        "launch",
        "   ",
    ] {
        let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
        let got = refused(&form(&a, bad), t).await;
        assert_eq!(
            got.0,
            OAuthErrorCode::InvalidScope,
            "scope {bad:?}: {}",
            got.1
        );
    }
}

#[tokio::test]
async fn scope_outside_registration_is_refused_when_nothing_remains() {
    let t = now();
    let a = rsa_key().sign("limited", TOKEN_URL, t).unwrap();
    assert_code(
        refused(&form(&a, "system/Observation.rs"), t).await,
        OAuthErrorCode::InvalidScope,
        "registered scope",
    );
    // rsa-client may only read: asking to write alone gives nothing.
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    assert_code(
        refused(&form(&a, "system/*.write"), t).await,
        OAuthErrorCode::InvalidScope,
        "registered scope",
    );
}

#[tokio::test]
async fn scope_beyond_registration_is_narrowed() {
    let t = now();
    let a = rsa_key().sign("limited", TOKEN_URL, t).unwrap();
    let res = smart().token(&form(&a, "system/*.cruds"), t).await.unwrap();
    assert_eq!(res.scope, "system/Patient.rs");
    let a = ec_key().sign("ec-client", TOKEN_URL, t).unwrap();
    let res = smart()
        .token(&form(&a, "system/*.* system/Encounter.read"), t)
        .await
        .unwrap();
    assert_eq!(res.scope, "system/Observation.* system/Patient.read");
}

#[tokio::test]
async fn not_a_jwt() {
    for bad in ["abc", "a.b", "a.b.c.d", "!!!.e30.sig"] {
        assert_code(
            refused(&form(bad, "system/*.rs"), now()).await,
            OAuthErrorCode::InvalidClient,
            "client_assertion",
        );
    }
}

#[tokio::test]
async fn unknown_client() {
    let t = now();
    let a = rsa_key().sign("nobody", TOKEN_URL, t).unwrap();
    let unknown = refused(&form(&a, "system/*.rs"), t).await;
    assert_code(
        unknown.clone(),
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
    // A registered client with a key that is not its own gets the very same answer: the
    // endpoint does not tell which client ids exist (issue 16 item 17).
    let forged = sign_raw(
        "rsa-b.pem",
        Algorithm::RS384,
        Some("rsa-1"),
        &claims("rsa-client", t),
    );
    assert_eq!(refused(&form(&forged, "system/*.rs"), t).await, unknown);
}

#[tokio::test]
async fn missing_iss() {
    let t = now();
    let mut c = claims("rsa-client", t);
    c.as_object_mut().unwrap().remove("iss");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "iss",
    );
}

#[tokio::test]
async fn missing_or_wrong_sub() {
    let t = now();
    let mut c = claims("rsa-client", t);
    c.as_object_mut().unwrap().remove("sub");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "sub",
    );
    let mut c = claims("rsa-client", t);
    c["sub"] = json!("limited");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "sub",
    );
}

#[tokio::test]
async fn wrong_or_missing_aud() {
    let t = now();
    let a = rsa_key()
        .sign("rsa-client", "http://127.0.0.1:8080/fhir/other", t)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "aud",
    );
    let mut c = claims("rsa-client", t);
    c.as_object_mut().unwrap().remove("aud");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "aud",
    );
    // An array holding the token URL is fine.
    let mut c = claims("rsa-client", t);
    c["aud"] = json!(["x", TOKEN_URL]);
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    smart().token(&form(&a, "system/*.rs"), t).await.unwrap();
}

#[tokio::test]
async fn expired_assertion() {
    let t = now();
    let a = rsa_key()
        .sign_with_exp("rsa-client", TOKEN_URL, t - 600, t - 300)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "expired",
    );
}

#[tokio::test]
async fn exp_too_far_ahead() {
    let t = now();
    let a = rsa_key()
        .sign_with_exp("rsa-client", TOKEN_URL, t, t + 3600)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "five minutes",
    );
    // The largest `exp` is refused for the same reason (it overflowed the skew once: a panic
    // in a debug build, "expired" in a release build).
    let a = rsa_key()
        .sign_with_exp("rsa-client", TOKEN_URL, t, i64::MAX)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "five minutes",
    );
}

#[tokio::test]
async fn missing_or_non_numeric_exp() {
    let t = now();
    let mut c = claims("rsa-client", t);
    c.as_object_mut().unwrap().remove("exp");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "exp",
    );
    let mut c = claims("rsa-client", t);
    c["exp"] = json!("soon");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "exp",
    );
}

#[tokio::test]
async fn not_yet_valid() {
    let t = now();
    let mut c = claims("rsa-client", t);
    c["nbf"] = json!(t + 200);
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "nbf",
    );
}

/// `iat` was not checked: an assertion claiming to be issued an hour (or ages) ahead of the
/// server's clock was accepted, like one whose `nbf` says so is not. Now an `iat` beyond the
/// clock skew is refused, and one that is not a number too.
#[tokio::test]
async fn issued_in_the_future() {
    let t = now();
    for iat in [
        json!(t + 3600),
        json!(1e300),
        json!(i64::MAX),
        json!("soon"),
    ] {
        let mut c = claims("rsa-client", t);
        c["iat"] = iat.clone();
        let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
        assert_code(
            refused(&form(&a, "system/*.rs"), t).await,
            OAuthErrorCode::InvalidClient,
            "iat",
        );
    }
    // Within the clock skew, and in the past: accepted.
    for iat in [t + 10, t - 100] {
        let mut c = claims("rsa-client", t);
        c["iat"] = json!(iat);
        let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
        smart().token(&form(&a, "system/*.rs"), t).await.unwrap();
    }
}

/// Keys offered by the assertion itself are never used, and key locations in its header never
/// fetched: an assertion signed by an unregistered key that carries that key (`jwk`), a URL
/// for it (`x5u`) and a certificate chain (`x5c`) in its header is refused, and nobody
/// connects to the `x5u` host.
#[tokio::test]
async fn keys_offered_in_the_assertion_header_are_ignored() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        while let Ok(_socket) = listener.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let t = now();
    let attacker = key("rsa-b.pem", None, "rsa-1");
    let mut header = jsonwebtoken::Header::new(Algorithm::RS384);
    header.kid = Some("rsa-1".into());
    header.jwk = Some(serde_json::from_value(attacker.public_jwk().unwrap()).unwrap());
    header.x5u = Some(format!("http://{addr}/cert.pem"));
    header.x5c = Some(vec!["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA".into()]);
    let a = jsonwebtoken::encode(
        &header,
        &claims("rsa-client", t),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem("rsa-b.pem")).unwrap(),
    )
    .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "x5u fetched"
    );
}

#[tokio::test]
async fn missing_or_empty_jti() {
    let t = now();
    let mut c = claims("rsa-client", t);
    c.as_object_mut().unwrap().remove("jti");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "jti",
    );
    c["jti"] = json!("");
    let a = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "jti",
    );
}

#[tokio::test]
async fn replayed_jti() {
    let t = now();
    let s = smart();
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    s.token(&form(&a, "system/*.rs"), t).await.unwrap();
    let e = s.token(&form(&a, "system/*.rs"), t + 1).await.unwrap_err();
    assert_code(
        (e.error, e.description),
        OAuthErrorCode::InvalidClient,
        "replay",
    );
    // Same jti in a freshly signed assertion is still a replay.
    let mut c = claims("rsa-client", t);
    let jti = "fixed-jti";
    c["jti"] = json!(jti);
    let a1 = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    s.token(&form(&a1, "system/*.rs"), t).await.unwrap();
    c["exp"] = json!(t + 200);
    let a2 = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    let e = s.token(&form(&a2, "system/*.rs"), t).await.unwrap_err();
    assert_eq!(e.error, OAuthErrorCode::InvalidClient);
}

/// A client sending valid assertions as fast as it can fills its own share of the replay cache,
/// not the cache: it is refused (503) while the other clients still get tokens.
#[tokio::test]
async fn one_client_cannot_fill_the_replay_cache_for_the_others() {
    let t = now();
    let capacity = 6;
    let s = auth::SmartAuth::new(
        registry(),
        auth::TokenIssuer::new(BASE_URL.to_owned(), std::time::Duration::from_secs(300)),
        TOKEN_URL.to_owned(),
        capacity,
    );
    let mut granted = 0;
    let e = loop {
        assert!(granted <= capacity, "the cache never filled");
        let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
        match s.token(&form(&a, "system/*.rs"), t).await {
            Ok(_) => granted += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(
        e.error,
        OAuthErrorCode::TemporarilyUnavailable,
        "{}",
        e.description
    );
    assert_eq!(e.error.http_status(), 503);
    assert!(granted > 0 && granted < capacity, "{granted} granted");
    let a = ec_key().sign("ec-client", TOKEN_URL, t).unwrap();
    s.token(&form(&a, "system/Patient.read"), t)
        .await
        .expect("another client still gets a token");
}

#[tokio::test]
async fn refused_assertion_does_not_burn_its_jti() {
    // A failing signature must not record the jti, or anyone could block a client's assertions.
    let t = now();
    let s = smart();
    let mut c = claims("rsa-client", t);
    c["jti"] = json!("jti-1");
    let forged = sign_raw("rsa-b.pem", Algorithm::RS384, Some("rsa-1"), &c);
    s.token(&form(&forged, "system/*.rs"), t).await.unwrap_err();
    let genuine = sign_raw("rsa-a.pem", Algorithm::RS384, Some("rsa-1"), &c);
    s.token(&form(&genuine, "system/*.rs"), t).await.unwrap();
}

#[tokio::test]
async fn bad_signature() {
    let t = now();
    // Signed by a key the client never registered, under the registered kid.
    let a = key("rsa-b.pem", None, "rsa-1")
        .sign("rsa-client", TOKEN_URL, t)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
    // A genuine assertion with its payload swapped.
    let good = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let other = rsa_key().sign("limited", TOKEN_URL, t).unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
    assert_code(
        refused(&form(&tampered, "system/Patient.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
}

#[tokio::test]
async fn wrong_alg() {
    let t = now();
    // HS256 with the public key as secret: the classic algorithm-confusion attack.
    let c = claims("rsa-client", t);
    let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let a = jsonwebtoken::encode(
        &header,
        &c,
        &jsonwebtoken::EncodingKey::from_secret(b"public"),
    )
    .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "HS256",
    );
    // RS512 and PS384 are not on the list either.
    for alg in [Algorithm::RS512, Algorithm::PS384] {
        let a = sign_raw("rsa-a.pem", alg, Some("rsa-1"), &claims("rsa-client", t));
        assert_code(
            refused(&form(&a, "system/*.rs"), t).await,
            OAuthErrorCode::InvalidClient,
            "not accepted",
        );
    }
    // alg `none`, unsigned.
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let a = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims("rsa-client", t).to_string())
    );
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "none",
    );
    // An EC key cannot sign for an RSA-only client.
    let a = key("ec-p384.pem", None, "rsa-1")
        .sign("rsa-client", TOKEN_URL, t)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
}

#[tokio::test]
async fn kid_not_found() {
    let t = now();
    let a = key("rsa-a.pem", None, "rotated-away")
        .sign("rsa-client", TOKEN_URL, t)
        .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
}

#[tokio::test]
async fn jku_must_match_registration() {
    let t = now();
    let pem = pem("rsa-a.pem");
    let mut header = jsonwebtoken::Header::new(Algorithm::RS384);
    header.kid = Some("rsa-1".into());
    header.jku = Some("https://evil.example/jwks.json".into());
    let a = jsonwebtoken::encode(
        &header,
        &claims("rsa-client", t),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap();
    assert_code(
        refused(&form(&a, "system/*.rs"), t).await,
        OAuthErrorCode::InvalidClient,
        "client authentication failed",
    );
}

#[tokio::test]
async fn status_codes_follow_rfc6749() {
    assert_eq!(OAuthErrorCode::InvalidClient.http_status(), 401);
    for c in [
        OAuthErrorCode::InvalidRequest,
        OAuthErrorCode::InvalidScope,
        OAuthErrorCode::UnsupportedGrantType,
    ] {
        assert_eq!(c.http_status(), 400);
    }
}

#[tokio::test]
async fn token_lifetime_is_reported_and_enforced() {
    let t = now();
    let s = smart();
    let a = rsa_key().sign("rsa-client", TOKEN_URL, t).unwrap();
    let res = s.token(&form(&a, "system/*.rs"), t).await.unwrap();
    let v = s.issuer().verify(&res.access_token, t + 299).unwrap();
    assert_eq!(v.client_id, "rsa-client");
    assert!(v.scopes.can_export("Patient"));
    assert!(!v.scopes.can_write("Patient"));
    assert_eq!(
        s.issuer().verify(&res.access_token, t + 300).unwrap_err(),
        auth::AccessTokenError::Expired
    );
}
