//! Issue 16 items 13 and 17: client-chosen text reaches log lines escaped and shortened, and a
//! SMART server on a plain-HTTP public base URL says loudly that tokens travel in clear. In its
//! own test binary: it installs the process-wide `tracing` subscriber.

mod common;

use std::sync::{Arc, Mutex};

use auth::{Auth, AuthMode, AuthSettings};
use axum::body::Body;
use axum::http::{Request, header};
use common::*;
use tower::ServiceExt;

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

impl Captured {
    fn take(&self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut *self.0.lock().unwrap())).into_owned()
    }
}

fn capture() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    captured
}

#[tokio::test]
async fn logs_escape_and_shorten_client_text_and_warn_about_plain_http() {
    let captured = capture();

    // A scope of escape sequences and ~60 KB: refused, and logged escaped and capped.
    let auth = Auth::smart(smart());
    let app: axum::Router = auth.routes();
    let assertion = rsa_key().sign("rsa-client", TOKEN_URL, now()).unwrap();
    let scope = format!("\u{1b}[2J\u{1b}[31msystem/{}", "x".repeat(60_000));
    let body = format!(
        "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}&scope={}",
        scope
            .replace('\u{1b}', "%1B")
            .replace('[', "%5B")
            .replace('/', "%2F")
    );
    let res = app
        .oneshot(
            Request::post("/auth/token")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let answer = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    assert!(answer.len() < 2048, "the error echoes the whole scope");
    let logs = captured.take();
    assert!(logs.contains("token request refused"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "a raw ESC reached the log");
    assert!(logs.contains("\\u{1b}"), "{logs}");
    assert!(
        !logs.contains(&"x".repeat(300)),
        "the log line is not capped"
    );

    // SMART on a plain-HTTP public base URL: a warning at start; on loopback, none.
    let dir = tempfile::tempdir().unwrap();
    let clients = dir.path().join("clients.json");
    std::fs::write(&clients, clients_json()).unwrap();
    let listen: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
    for (base, warns) in [
        ("http://fhir.example.org:8080", true),
        ("http://127.0.0.1:8080", false),
        ("https://fhir.example.org", false),
    ] {
        let mut settings = AuthSettings::new(AuthMode::Smart, base.to_owned());
        settings.clients_file = Some(clients.clone());
        Auth::from_settings(&settings, listen).unwrap();
        let logs = captured.take();
        assert_eq!(logs.contains("travel in clear"), warns, "{base}: {logs}");
    }
}
