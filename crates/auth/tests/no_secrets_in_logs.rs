//! No access token, assertion or key material reaches a log line, at any level. In its own test
//! binary: it installs the process-wide `tracing` subscriber.

mod common;

use std::sync::{Arc, Mutex};

use auth::Auth;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use common::*;
use tower::ServiceExt;

fn app(auth: &Auth) -> Router {
    let api = Router::new().route(
        "/Patient/{id}",
        axum::routing::get(|ctx: auth::AuthContext| async move {
            ctx.require_read("Observation")?;
            Ok::<_, auth::AuthRejection>("ok")
        }),
    );
    auth.protect(api).merge(auth.routes())
}

async fn send(app: &Router, req: Request<Body>) -> serde_json::Value {
    let res = app.clone().oneshot(req).await.unwrap();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}

fn token_request(assertion: &str) -> Request<Body> {
    Request::post("/auth/token")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!(
            "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}&scope=system%2FPatient.rs"
        )))
        .unwrap()
}

fn get_with(token: &str) -> Request<Body> {
    Request::get("/Patient/1")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_in_any_log_line() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let auth = Auth::smart(smart());
    let app = app(&auth);
    let good = rsa_key().sign("rsa-client", TOKEN_URL, now()).unwrap();
    let json = send(&app, token_request(&good)).await;
    let token = json["access_token"].as_str().unwrap().to_owned();
    // Refusals: replay, forged signature, bad token, expired token, forbidden.
    send(&app, token_request(&good)).await;
    let forged = key("rsa-b.pem", None, "rsa-1")
        .sign("rsa-client", TOKEN_URL, now())
        .unwrap();
    send(&app, token_request(&forged)).await;
    send(&app, get_with(&format!("{token}x"))).await;
    let expired = auth
        .smart_auth()
        .unwrap()
        .issuer()
        .issue(
            "rsa-client",
            &auth::Scopes::parse("system/*.rs").unwrap(),
            now() - 1000,
        )
        .unwrap();
    send(&app, get_with(&expired)).await;
    send(&app, get_with(&token)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("access token issued"),
        "logging works: {logs}"
    );
    assert!(logs.contains("token request refused"));
    let jwk = rsa_key().public_jwk().unwrap();
    for (what, secret) in [
        ("assertion", good.as_str()),
        ("forged assertion", forged.as_str()),
        ("access token", token.as_str()),
        ("expired token", expired.as_str()),
        ("signature", good.rsplit('.').next().unwrap()),
        ("token signature", token.rsplit('.').next().unwrap()),
        ("public key", jwk["n"].as_str().unwrap()),
    ] {
        assert!(!logs.contains(secret), "the logs contain the {what}");
    }
    // Debug output of request/response types redacts too.
    let f = common::form(&good, "system/*.rs");
    assert!(!format!("{f:?}").contains(&good));
}
