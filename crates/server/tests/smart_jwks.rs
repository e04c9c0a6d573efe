//! Clients registered by `jwks_url`, through the real server's token endpoint: where the server
//! may connect for a client's keys, what one client's JWKS may cost, and that one client's slow
//! JWKS host does not hold up another client. (The test keys are the auth crate's, see
//! crates/auth/tests/data/PROVENANCE.md.)

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

/// A server with `--auth smart` whose clients file is `clients`.
struct JwksServer {
    token_url: String,
    _dir: tempfile::TempDir,
    _db: store::testing::TestStore,
}

async fn start(clients: Value) -> JwksServer {
    let dir = tempfile::tempdir().unwrap();
    let db = common::test_store_async().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let token_url = test_support::smart::token_url(&base);
    let registry =
        auth::ClientRegistry::from_json(&clients.to_string(), Path::new("clients.json")).unwrap();
    let auth = auth::Auth::smart(auth::SmartAuth::new(
        registry,
        auth::TokenIssuer::new(base.clone(), Duration::from_secs(300)),
        token_url.clone(),
        1000,
    ));
    let state = common::app_state(db.store.clone(), &base, auth, 1 << 20, dir.path()).await;
    let app = server::router(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    JwksServer {
        token_url,
        _dir: dir,
        _db: db,
    }
}

impl JwksServer {
    /// A token request of `client` with an assertion signed by `key`: the status and the body.
    async fn token(&self, client: &str, key: &auth::ClientKey) -> (StatusCode, Value) {
        let assertion = key.sign(client, &self.token_url, now()).unwrap();
        self.token_with(&assertion).await
    }

    async fn token_with(&self, assertion: &str) -> (StatusCode, Value) {
        let res = reqwest::Client::new()
            .post(&self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=client_credentials&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}&scope=system%2FPatient.rs"
            ))
            .send()
            .await
            .unwrap();
        let st = res.status();
        let text = res.text().await.unwrap();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// This machine's host name, when it resolves to one of this machine's IPv4 addresses that is
/// loopback or private (`/etc/hosts` maps it to 127.0.x.x, or in a container to its private
/// address): a name, not an address literal, that leads into the server's own network.
async fn internal_host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_owned();
    let addrs: Vec<_> = tokio::net::lookup_host((name.as_str(), 0))
        .await
        .ok()?
        .collect();
    let internal = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        std::net::IpAddr::V6(_) => false,
    };
    (!addrs.is_empty() && addrs.iter().all(|a| internal(a.ip()))).then_some(name)
}

/// A JWKS URL whose host is a *name* that resolves to an internal address was fetched: only
/// address literals (and `localhost`) were refused as internal, so a registration for a public
/// looking name that resolves (or is rebound) to 127.0.0.1, 10/8, 169.254.169.254 … made the
/// server connect into its own network. Measured before the fix: the listener below, on every
/// local address, accepted the server's connection. Now the addresses a name resolves to are
/// checked when the fetch connects, and the connection is never opened.
#[tokio::test]
async fn a_jwks_host_name_resolving_to_an_internal_address_is_not_connected_to() {
    let Some(name) = internal_host_name().await else {
        eprintln!(
            "skipped: this machine's host name does not resolve to a loopback or private IPv4 address"
        );
        return;
    };
    // Any local address: the name may resolve to 127.0.x.x or to the container's own address.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let s = start(json!([
        {"client_id": "named", "jwks_url": format!("https://{name}:{port}/jwks.json"),
         "scope": "system/*.rs"},
    ]))
    .await;
    let key = test_support::smart::test_key("ec-p384.pem");
    let (st, body) = s.token("named", &key).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client", "{body}");
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the server connected to {name}:{port}, an internal address"
    );
}
