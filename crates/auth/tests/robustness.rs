//! Arbitrary input never panics the scope parser, the token endpoint or the bearer check.

mod common;

use common::*;
use proptest::prelude::*;

fn shared() -> &'static auth::SmartAuth {
    shared_auth().smart_auth().unwrap()
}

fn shared_auth() -> &'static auth::Auth {
    static AUTH: std::sync::OnceLock<auth::Auth> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| auth::Auth::smart(smart()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn scope_parser_total(s in ".{0,80}") {
        let _ = auth::Scopes::parse(&s);
    }

    #[test]
    fn scope_parser_total_on_scope_like_text(
        ctx in "(system|patient|user|)", ty in "[A-Za-z*]{0,12}", act in "[a-z*]{0,8}"
    ) {
        if let Ok(s) = auth::Scopes::parse(&format!("{ctx}/{ty}.{act}")) {
            // Whatever parses renders to something that parses to the same thing.
            prop_assert_eq!(auth::Scopes::parse(&s.render()).unwrap(), s);
        }
    }

    #[test]
    fn assertion_garbage_is_refused_not_panicking(
        a in "[A-Za-z0-9_\\-]{0,40}", b in "[A-Za-z0-9_\\-]{0,60}", c in "[A-Za-z0-9_\\-]{0,40}"
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let r = rt.block_on(shared().token(&form(&format!("{a}.{b}.{c}"), "system/*.rs"), now()));
        prop_assert!(r.is_err());
    }

    #[test]
    fn encoded_json_garbage_is_refused(
        alg in "(RS384|ES384|RS256|ES256|HS256|none|)", kid in proptest::option::of(".{0,10}"),
        jku in proptest::option::of(".{0,10}"), n in 0i64..2_000_000_000
    ) {
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), alg.into());
        if let Some(k) = kid { header.insert("kid".into(), k.into()); }
        if let Some(j) = jku { header.insert("jku".into(), j.into()); }
        use base64::Engine;
        let e = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let claims = serde_json::json!({"iss": "rsa-client", "sub": "rsa-client", "exp": n, "jti": "x", "aud": TOKEN_URL});
        let token = format!("{}.{}.c2ln", e(&serde_json::Value::Object(header)), e(&claims));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        prop_assert!(rt.block_on(shared().token(&form(&token, "system/*.rs"), now())).is_err());
    }

    #[test]
    fn bearer_garbage_is_401(t in ".{0,100}") {
        let auth = shared_auth();
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("Bearer {t}")) {
            prop_assert!(auth.authenticate(Some(&v)).is_err());
        }
    }
}
